"""Running under systemd: the unit files (the daemon's, a cluster worker's) as systemd reads
them, and the daemon's notifications (READY=1, WATCHDOG=1, STOPPING=1) on a real unix
datagram socket given as NOTIFY_SOCKET, as systemd gives it to a `Type=notify` service (a
cluster worker's: `tests/test_cluster.py`); the worker's memory cap ([worker]
memory_max_mb) on the worker process, not the daemon."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dicom_node.app.systemd import SystemdNotifier
from dicom_node.testbed.node_process import NodeProcess
from tests.support import ROOT
from tests.support.systemd import NotifySocket

UNIT = ROOT / "deploy" / "dicom-node.service"
WORKER_UNIT = ROOT / "deploy" / "dicom-node-worker.service"  # a cluster's inference worker
INSTALLED_AT = "/opt/dicom-node/.venv/bin/dicom-node"
HARDENING = ("User", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp")


def _verified(unit: Path, tmp_path: Path) -> dict[str, str]:
    """The unit's settings, once `systemd-analyze verify` had nothing to say of it, the
    install path being this checkout's virtual environment (it checks that ExecStart's
    program exists)."""
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze not installed (Debian's systemd package)")
    program = Path(sys.executable).parent / "dicom-node"
    assert program.is_file(), "the package is installed in this environment (make install)"
    checked = tmp_path / unit.name
    checked.write_text(unit.read_text().replace(INSTALLED_AT, str(program)))
    result = subprocess.run([verify, "verify", str(checked)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""  # an unknown key or bad value is only a warning
    settings = dict(
        line.split("=", 1)
        for line in unit.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert int(settings["WatchdogSec"]) >= 10
    assert settings["User"] != "root"
    assert settings["OOMPolicy"] == "continue"  # the inference process killed, the unit on
    return settings


def test_the_unit_file_verifies_clean(tmp_path: Path) -> None:
    settings = _verified(UNIT, tmp_path)
    assert settings["ExecStart"].startswith(INSTALLED_AT + " serve --config")
    assert settings["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"


def test_the_worker_s_unit_file_verifies_clean(tmp_path: Path) -> None:
    """A cluster's worker (`tests/test_cluster.py` runs its notifications) listens on no
    port: no capability; otherwise it is hardened as the daemon is."""
    settings = _verified(WORKER_UNIT, tmp_path)
    assert settings["ExecStart"].startswith(INSTALLED_AT + " serve --role worker --config")
    assert settings["CapabilityBoundingSet"] == ""
    assert "AmbientCapabilities" not in settings
    assert "MemoryMax" in settings
    daemon = _verified(UNIT, tmp_path)
    assert {key: settings[key] for key in HARDENING} == {key: daemon[key] for key in HARDENING}


def _listening(port: int) -> bool:
    """Whether the port accepts a connection now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_the_daemon_notifies_systemd_and_caps_its_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = NodeProcess(tmp_path, extra_config="[worker]\nmemory_max_mb = 20000\n")
    systemd = NotifySocket(tmp_path / "notify", lambda: _listening(node.port))
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # pinged every 0.5 s
    try:
        node.start()
        try:
            ((ready_at, _, listening),) = systemd.wait_for("READY=1")
            assert listening, "READY=1 before the DICOM port listened"
            pings = systemd.wait_for("WATCHDOG=1", count=4, timeout=10)
            later = [at for at, _, _ in pings if at > ready_at]
            assert len(later) >= 2 and max(later) - min(later) < 3  # on, every 0.5 s
            worker = psutil.Process(node.worker_pid())
            assert node.process is not None
            daemon = psutil.Process(node.process.pid)
            capped = 20000 << 20
            assert worker.rlimit(psutil.RLIMIT_AS) == (capped, capped)
            assert daemon.rlimit(psutil.RLIMIT_AS) == resource.getrlimit(resource.RLIMIT_AS)
            assert Path(f"/proc/{worker.pid}/oom_score_adj").read_text().strip() == "1000"
            own = Path("/proc/self/oom_score_adj").read_text()
            assert Path(f"/proc/{daemon.pid}/oom_score_adj").read_text() == own
        finally:
            assert node.stop() == 0, node.log.read_text()
        systemd.wait_for("STOPPING=1")
    finally:
        systemd.close()


def test_notifications_reach_an_abstract_socket_and_respect_watchdog_pid() -> None:
    name = f"dicom-node-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000"})
        assert notifier.watchdog_s == 30
        assert notifier.ready()
        assert receiver.recv(4096).decode().splitlines()[0] == "READY=1"
    other = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    assert SystemdNotifier(other).watchdog_s is None  # the watchdog is another process'
    assert not SystemdNotifier({}).ready()  # not under systemd: nothing sent
