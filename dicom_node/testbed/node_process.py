"""`dicom-node serve` as a real subprocess on a free loopback port, for the demo, the tests
and the benchmarks.

The node is started and stopped the way an operator would (its CLI, SIGTERM), and peers talk
to it over real sockets; only the config and data_dir are temporary.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from pydicom import dcmread

import dicom_node
from dicom_node.app.config import Destination
from dicom_node.testbed.peers import PEER_ENV, PeerDidNotStartError, find_binary, free_port

# The folder holding the dicom_node package this process imported: the node subprocess runs
# from there, so that it runs the same code (a checkout's, not some other installed copy).
PACKAGE_PARENT = Path(dicom_node.__file__).resolve().parents[1]
AE_TITLE = "BONESEG"
WORKER_READY = b"ready: taking jobs"  # dicom_node.cluster.worker's line


def _toml(value: Any) -> str:
    return json.dumps(value)  # JSON strings, numbers and lists are valid TOML values


class NodeProcess:
    """One node: its config file, data_dir and (while running) its process."""

    def __init__(
        self,
        directory: Path,
        complete_after_s: float = 1.0,
        extra_config: str = "",
        series: dict[str, Any] | None = None,
        threads: int = 2,
        verbose: bool = False,
        role: str | None = None,
        **node: Any,
    ) -> None:
        """`node` and `series`: keys of those config sections; `extra_config`: more sections;
        `threads`: [inference] threads (the tests' two: they share one or two cores with other
        work; 0 lets the node use every core); `verbose`: `dicom-node -v serve` (DEBUG);
        `role`: `serve --role` (receive or worker, with a [cluster] section)."""
        self.directory = directory
        self.verbose = verbose
        self.role = role
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.data_dir = directory / "data"
        self.config = directory / "config.toml"
        settings = {"ae_title": AE_TITLE, "port": self.port, "data_dir": "data", **node}
        lines = ["[node]", *(f"{k} = {_toml(v)}" for k, v in settings.items())]
        lines += ["[series]", f"complete_after_s = {complete_after_s}"]
        lines += [f"{k} = {_toml(v)}" for k, v in (series or {}).items()]
        lines += ["[inference]", f"threads = {threads}"]
        self.config.write_text("\n".join(lines) + "\n" + extra_config)
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "node.log"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicom_node", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            cwd=PACKAGE_PARENT,
            timeout=60,
        )

    def start(self, timeout_s: float = 90) -> NodeProcess:
        """Start `dicom-node serve`; returns once it listens (its pid file names it). The
        inference worker loads its model first, hence the long `timeout_s`."""
        verbosity = ["-v"] if self.verbose else []
        command = [sys.executable, "-m", "dicom_node", *verbosity, "serve"]
        if self.role is not None:
            command += ["--role", self.role]
        log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PACKAGE_PARENT,
            )
        deadline = time.monotonic() + timeout_s
        while not self._started(log_start):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise PeerDidNotStartError(f"node did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        return self

    def _started(self, log_start: int) -> bool:
        """A node listens (its pid file names it); a cluster worker listens on no port: it
        says in its log (past `log_start`) when it takes jobs."""
        assert self.process is not None
        if self.role == "worker":
            with self.log.open("rb") as log:
                log.seek(log_start)
                return WORKER_READY in log.read()
        return self._pid_in_file() == self.process.pid

    def _pid_in_file(self) -> int | None:
        try:  # a SIGKILLed node leaves its pid file behind
            return json.loads((self.data_dir / "node.pid").read_text())["pid"]
        except (OSError, ValueError):
            return None

    def stop(self) -> int:
        """SIGTERM and wait: the exit status of a clean shutdown."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        finally:
            self.kill()

    def crash(self) -> None:
        """SIGKILL the daemon; its worker must die with it (it asks the kernel to)."""
        assert self.process is not None
        children = psutil.Process(self.process.pid).children()
        self.kill()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"worker outlived the daemon: {alive}"

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def series(self) -> dict[str, dict[str, Any]]:
        return {s["series_instance_uid"]: s for s in self.status()["series"]}

    def wait_for_states(self, uids: set[str], states: set[str], timeout: float = 30) -> None:
        """Until every series in `uids` is in one of `states`."""
        deadline = time.monotonic() + timeout
        while True:
            series = self.series()
            if all(series.get(uid, {}).get("state") in states for uid in uids):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"series not {states} after {timeout} s: {series}")
            time.sleep(0.2)

    def worker_pid(self) -> int:
        """The inference worker: the node's spawned child (not multiprocessing's resource
        tracker, its other child)."""
        assert self.process is not None
        (child,) = [
            p
            for p in psutil.Process(self.process.pid).children()
            if "spawn_main" in " ".join(p.cmdline())
        ]
        return child.pid

    def db_instances(self) -> dict[str, str]:
        """SOP Instance UID -> spool file name, straight from the database."""
        with sqlite3.connect(self.data_dir / "node.db") as db:
            return dict(db.execute("SELECT sop_instance_uid, file_name FROM instances"))

    def db_state(self, series_uid: str) -> str | None:
        """A series' state straight from the database: cheap enough to poll for a state the
        pipeline passes through in a moment (the CLI takes a second to start)."""
        with sqlite3.connect(self.data_dir / "node.db") as db:
            row = db.execute(
                "SELECT state FROM series WHERE series_instance_uid = ?", (series_uid,)
            ).fetchone()
        return row[0] if row else None

    def wait_for_db_state(self, series_uid: str, states: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (state := self.db_state(series_uid)) not in states:
            assert time.monotonic() < deadline, f"{series_uid} not {states}: {state}"
            time.sleep(0.02)

    def send_series(self, folder: Path) -> str:
        """Send a folder of one series with storescu; its Series Instance UID."""
        result = storescu(self.port, folder, extra=("+sd", "+r"))
        assert result.returncode == 0, result.stdout + result.stderr
        first = next(p for p in sorted(folder.rglob("*")) if p.is_file())
        return str(dcmread(first, stop_before_pixels=True).SeriesInstanceUID)

    def spool_files(self) -> set[str]:
        """Every file in the spool, by its path there (as the database names it): the
        receiving processes' folders included (`[node] receive_processes`)."""
        spool = self.data_dir / "spool"
        return {str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file()}


def destination_toml(destination: Destination, **delivery: Any) -> str:
    """A `[[destinations]]` table for `destination` (and a `[delivery]` one of `delivery`),
    for NodeProcess(extra_config=...)."""
    lines = [
        "[[destinations]]",
        f'name = "{destination.name}"',
        f'ae_title = "{destination.ae_title}"',
        'host = "127.0.0.1"',
        f"port = {destination.port}",
    ]
    if delivery:
        lines.append("[delivery]")
        lines += [f"{key} = {value}" for key, value in delivery.items()]
    return "\n".join(lines) + "\n"


def storescu_command(
    port: int,
    *files_or_dirs: Path,
    aet: str = "SCANNER",
    verbose: bool = False,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The DCMTK storescu command line that sends files to the node (one association)."""
    command = [find_binary("storescu"), "-aet", aet, "-aec", AE_TITLE, *extra]
    if verbose:
        command.append("-v")
    return [*command, "127.0.0.1", str(port), *map(str, files_or_dirs)]


def storescu(
    port: int,
    *files_or_dirs: Path,
    aet: str = "SCANNER",
    verbose: bool = False,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Send files and wait for storescu to finish."""
    command = storescu_command(port, *files_or_dirs, aet=aet, verbose=verbose, extra=extra)
    return subprocess.run(command, capture_output=True, text=True, env=PEER_ENV, timeout=120)


def start_storescu(port: int, *files: Path) -> subprocess.Popen[str]:
    """Start sending files verbosely (one "Received Store Response" line per acknowledged
    instance on stdout), for tests that interrupt the node mid-transfer."""
    return subprocess.Popen(
        storescu_command(port, *files, verbose=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=PEER_ENV,
    )
