"""Fixtures the test modules share: the peers (Orthanc, PostgreSQL), the node as a process and
phantom CT series, all from `dicom_node.testbed`. A peer that is not installed skips the test
that needs it (`make system-deps` installs them; CI does)."""

from __future__ import annotations

import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from dicom_node.testbed.node_process import NodeProcess
from dicom_node.testbed.peers import OrthancProcess, PeerNotInstalledError
from dicom_node.testbed.phantom_series import write_phantom
from dicom_node.testbed.postgres import PostgresServer, running_postgres
from tests.support import PhantomSeries


def _skip_for_missing_peers() -> Generator[None, None, None]:
    """The body of a hook wrapper: PeerNotInstalledError becomes a skip."""
    try:
        return (yield)
    except PeerNotInstalledError as missing:
        pytest.skip(str(missing))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """A fixture whose peer is not installed skips the test instead of failing it."""
    return (yield from _skip_for_missing_peers())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Likewise for a peer the test starts itself."""
    return (yield from _skip_for_missing_peers())


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """One Orthanc per module. It checks the called AE title, so that the same Orthanc serves
    the tests that send to it under a wrong one."""
    with OrthancProcess(tmp_path_factory.mktemp("orthanc"), check_called_aet=True) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server per module; each test creates the databases it needs."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A node with the default settings in `tmp_path`, started; it must shut down cleanly."""
    node = NodeProcess(tmp_path).start()
    yield node
    assert node.stop() == 0, node.log.read_text()


@pytest.fixture(scope="session")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    """`phantom_series(seed)`: a small phantom CT series and its truth (write_phantom's
    "ct" and "labels"), written once per seed and session; the tests only read them."""
    written: dict[int, dict[str, Path]] = {}

    def phantom(seed: int) -> dict[str, Path]:
        if seed not in written:
            directory = tmp_path_factory.mktemp(f"phantom-{seed}")
            written[seed] = write_phantom(directory, seed=seed, size="small")
        return written[seed]

    return phantom


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/node/data as a 32 MiB tmpfs: the data_dir of a NodeProcess in tmp_path/node,
    for tests that fill the node's disk. Mounting needs root: the test skips otherwise."""
    mount_point = tmp_path / "node" / "data"
    mount_point.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
