"""Port 104 without root, end to end: the node run as an unprivileged user with only the
capability the systemd unit grants it (CAP_NET_BIND_SERVICE, ambient), through util-linux's
`setpriv`, listens on 104, answers DCMTK's C-ECHO and stores a series; the same user without
the capability is refused the port, with one line that says so and no traceback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.testbed.node_process import AE_TITLE, PACKAGE_PARENT
from tests.support import PhantomSeries, require

USER = 65534  # nobody
PORT = 104
CAPABILITY = ("--inh-caps", "+net_bind_service", "--ambient-caps", "+net_bind_service")


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """A folder the unprivileged user can enter (pytest's own are root's alone), holding a
    virtual environment with this one's packages: this interpreter may lie where only root can
    enter (pyenv under /root), and the node's worker starts the interpreter again, as an
    installation in /opt/dicom-node does."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the node as another user (setpriv)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed (Debian's util-linux)")
    if subprocess.run(["ss", "-Hltn", f"sport = :{PORT}"], capture_output=True).stdout.strip():
        pytest.skip(f"port {PORT} is taken on this machine")
    directory = Path(tempfile.mkdtemp(prefix="dicom-node-port104-"))
    try:
        directory.chmod(0o755)
        venv = directory / "venv"
        command = [sys.executable, "-m", "venv", "--copies", "--without-pip", str(venv)]
        subprocess.run(command, check=True)
        site_packages = next((venv / "lib").glob("python3*/site-packages"))
        packages = sysconfig.get_paths()["purelib"]
        (site_packages / "checkout.pth").write_text(
            f"import site; site.addsitedir({packages!r})\n{PACKAGE_PARENT}\n"
        )
        check = [*as_user(), str(venv / "bin" / "python"), "-c", "import dicom_node, torch"]
        readable = subprocess.run(check, capture_output=True, text=True, timeout=60)
        if readable.returncode != 0:
            pytest.skip(f"user {USER} cannot read the checkout or its packages: {readable.stderr}")
        yield directory
    finally:
        shutil.rmtree(directory)


def as_user(*capabilities: str) -> list[str]:
    """The command prefix that runs what follows as USER, with `capabilities` (setpriv's)."""
    return ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", *capabilities]


def node_config(home: Path, name: str) -> Path:
    """A node on 127.0.0.1:104 whose data_dir the user owns; series stay `receiving` for a
    minute, so that nothing is segmented while the test runs."""
    data = home / name
    data.mkdir()
    os.chown(data, USER, USER)
    config = home / f"{name}.toml"
    config.write_text(
        f'[node]\nae_title = "{AE_TITLE}"\nbind = "127.0.0.1"\nport = {PORT}\n'
        f'data_dir = "{data}"\n[series]\ncomplete_after_s = 60\n[inference]\nthreads = 1\n'
    )
    return config


def serve_command(home: Path, config: Path, *capabilities: str) -> list[str]:
    python = str(home / "venv" / "bin" / "python")
    return [*as_user(*capabilities), python, "-m", "dicom_node", "serve", "--config", str(config)]


def test_the_node_listens_on_104_as_a_user_with_the_capability_only(
    home: Path, phantom_series: PhantomSeries
) -> None:
    echoscu, storescu = require("/usr/bin/echoscu"), require("/usr/bin/storescu")
    series = phantom_series(1003)["ct"]
    config = node_config(home, "granted")
    log = home / "granted.log"
    with log.open("wb") as output:
        node = subprocess.Popen(
            serve_command(home, config, *CAPABILITY),
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(config.parent / "granted")},
        )
    try:
        deadline = time.monotonic() + 90
        while b"listening on 127.0.0.1:104" not in log.read_bytes():
            assert node.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        echo = subprocess.run(
            [echoscu, "-aec", AE_TITLE, "127.0.0.1", str(PORT)], capture_output=True, timeout=30
        )
        assert echo.returncode == 0, echo.stderr
        store = subprocess.run(
            [storescu, "-aec", AE_TITLE, "+sd", "+r", "127.0.0.1", str(PORT), str(series)],
            capture_output=True,
            timeout=60,
        )
        assert store.returncode == 0, store.stderr
        spooled = list((home / "granted" / "spool").rglob("*.dcm"))
        assert len(spooled) == len(list(series.iterdir()))
        assert all(path.stat().st_uid == USER for path in spooled)
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=30) == 0, log.read_text()


def test_without_the_capability_the_port_is_refused_in_one_line(home: Path) -> None:
    config = node_config(home, "refused")
    run = subprocess.run(
        serve_command(home, config),
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "HOME": str(config.parent / "refused")},
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("dicom-node serve: error: 127.0.0.1:104: Permission denied")
    assert "CAP_NET_BIND_SERVICE" in lines[-1]
