"""A throw-away PostgreSQL server, for the tests that run the node's state on PostgreSQL.

The server is the real one Debian ships (`postgresql`, installed by `make system-deps`), run
from its binaries under /usr/lib/postgresql/*/bin with a data directory of its own: it
listens on a free loopback port only (no unix socket), trusts local connections, and skips
fsync, because nothing it holds outlives the test run. initdb refuses to run as root, so as
root the server runs as the `postgres` user the package creates.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicom_node.testbed.peers import PeerNotInstalledError, free_port

# Debian's layout: one directory per major version, none of it on PATH.
BINARY_GLOB = "/usr/lib/postgresql/*/bin"
USER = "postgres"
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",  # TCP only: no socket file for another user to reach
    # Durability is not under test here; these make initdb, CREATE DATABASE and every
    # commit cheap on a machine that is busy with other work.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


def _version(bin_dir: Path) -> tuple[int, ...]:
    """15 from /usr/lib/postgresql/15/bin (9.6 style names too), for picking the newest."""
    return tuple(int(part) for part in bin_dir.parent.name.split(".") if part.isdigit())


def find_binaries() -> Path | None:
    """The newest installed version's bin directory with a server in it, or None."""
    found = [
        path
        for path in Path("/").glob(BINARY_GLOB.lstrip("/"))
        if all((path / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))
    ]
    return max(found, key=_version) if found else None


class PostgresServer:
    """One PostgreSQL server in a temporary directory; `start` raises PeerNotInstalledError (a
    skip, in the tests) if PostgreSQL or psycopg (the driver the node's postgresql+psycopg://
    URLs name) is not installed."""

    def __init__(self) -> None:
        self.bin_dir: Path | None = None
        self.port = 0
        self.directory: Path | None = None

    @property
    def data_dir(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "data"

    def _run(self, *command: str) -> None:
        """Run a server binary as the server's owner (the postgres user when we are root)."""
        assert self.bin_dir is not None
        argv = [str(self.bin_dir / command[0]), *command[1:]]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", USER, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.data_dir / "server.log"
            server_log = log.read_text() if log.is_file() else ""
            raise RuntimeError(
                f"{' '.join(argv)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}{server_log}"
            )

    def start(self) -> PostgresServer:
        self.bin_dir = find_binaries()
        if self.bin_dir is None:
            raise PeerNotInstalledError(
                f"PostgreSQL not installed (no {BINARY_GLOB}/initdb; make system-deps)"
            )
        if importlib.util.find_spec("psycopg") is None:
            raise PeerNotInstalledError("psycopg not installed (pip install -e '.[dev]')")
        # Not pytest's tmp_path: it is private to root, and the server runs as postgres.
        self.directory = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.directory, USER, USER)
        self._run(
            "initdb",
            f"--pgdata={self.data_dir}",
            f"--username={USER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        self.port = free_port()
        settings = {"port": str(self.port), **SETTINGS}
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        log = self.data_dir / "server.log"
        self._run(
            "pg_ctl", "start", "--wait", "--timeout=60", "-D", str(self.data_dir), "-l", str(log)
        )
        return self

    def stop(self) -> None:
        """Stop at once (nothing in it needs a clean shutdown) and delete its files."""
        if self.directory is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "--wait", "-m", "immediate", "-D", str(self.data_dir))
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of `database`, as it goes in `[node] database`."""
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import psycopg  # only here: without it `start` has already refused
        from psycopg import sql

        conninfo = f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres"
        with psycopg.connect(conninfo, autocommit=True) as connection:  # no CREATE in a txn
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server, stopped and deleted afterwards (for module-scoped fixtures)."""
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()
