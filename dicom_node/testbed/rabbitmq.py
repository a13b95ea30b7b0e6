"""A throw-away RabbitMQ broker, for the tests that run the node as a cluster.

The broker is the one Debian ships (`rabbitmq-server`, installed by `make system-deps`), run
as its own Erlang node with everything under a temporary directory (its database, logs, the
Erlang cookie in its HOME, an empty plugin list): it listens for AMQP on a free loopback port
and for Erlang distribution on another, and is SIGKILLed with its process group when done.
Erlang's port mapper (epmd), which the first broker starts, is shared and stays running, as
it does for the system's broker.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from dicom_node.testbed.peers import (
    PeerDidNotStartError,
    PeerNotInstalledError,
    _listening,
    _tail,
    free_port,
)

# Debian's script that runs the broker in the foreground as whoever starts it (the one on PATH,
# /usr/sbin/rabbitmq-server, switches to the `rabbitmq` user, who cannot write here).
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
START_TIMEOUT_S = 90.0  # about 6 s on an idle machine; the tests share two busy cores


class RabbitMQServer:
    """One broker in a temporary directory; `start` raises PeerNotInstalledError (a skip, in
    the tests) if RabbitMQ or Celery (the `cluster` extra) is not installed."""

    def __init__(self) -> None:
        self.port = 0
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "broker.log"

    def start(self) -> RabbitMQServer:
        server = SERVER
        if not Path(server).is_file():
            raise PeerNotInstalledError(
                "RabbitMQ not installed (rabbitmq-server; make system-deps)"
            )
        if importlib.util.find_spec("celery") is None:
            raise PeerNotInstalledError("celery not installed (pip install -e '.[dev]')")
        self.directory = Path(tempfile.mkdtemp(prefix="dicom-node-rabbitmq-"))
        self.port = free_port()
        for folder in ("mnesia", "log"):
            (self.directory / folder).mkdir()
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").touch()
        env = {
            **os.environ,
            "HOME": str(self.directory),  # the Erlang cookie
            "RABBITMQ_NODENAME": f"dicom-node-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_PID_FILE": str(self.directory / "broker.pid"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq"),  # none: the defaults
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "ERL_CRASH_DUMP": str(self.directory / "erl_crash.dump"),
        }
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [server],
                env=env,
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = _tail(self.log)
                self.stop()
                raise PeerDidNotStartError(f"RabbitMQ did not start:\n{tail}")
            time.sleep(0.1)
        return self

    @property
    def url(self) -> str:
        """The broker's URL as `[cluster] broker` takes it (RabbitMQ's default user, which it
        accepts from loopback only)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def stop(self) -> None:
        """SIGKILL the broker (its shell script and the Erlang VM: one process group) and
        delete its files."""
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


@contextmanager
def running_rabbitmq() -> Iterator[RabbitMQServer]:
    """A started broker, stopped and deleted afterwards (for module-scoped fixtures)."""
    server = RabbitMQServer()
    try:
        yield server.start()
    finally:
        server.stop()
