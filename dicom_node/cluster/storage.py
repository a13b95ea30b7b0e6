"""The cluster's files: one shared directory that every reception node and worker mounts.

    <shared_dir>/spool/<node_id>/<uuid>.dcm   what reception node <node_id> received
    <shared_dir>/results/<series>-<gen>-<attempt>.dcm   SEGs (and the SR beside each)

Each reception node spools into a folder of its own, so that what a node does to its spool at
start-up (removing partial writes a crash left, recording files the database lacks) touches its
own files only, never those another node is writing. The state database records a file as
`<node_id>/<uuid>.dcm`, a path under the shared spool, so that selection and the workers find
every file of a series whichever node received it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dicom_node.app.config import ClusterConfig
from dicom_node.pipeline.spool import Spool, SpooledFile

SPOOL_DIR = "spool"
RESULTS_DIR = "results"


def shared_spool(cluster: ClusterConfig) -> Spool:
    """The whole shared spool, to read files by the names the database holds."""
    return Spool(Path(cluster.shared_dir) / SPOOL_DIR)


def results_dir(cluster: ClusterConfig) -> Path:
    return Path(cluster.shared_dir) / RESULTS_DIR


def node_spool(cluster: ClusterConfig, min_free_bytes: int = 0) -> NodeSpool:
    """A reception node's own folder of the shared spool, `<node_id>/`."""
    return NodeSpool(Path(cluster.shared_dir) / SPOOL_DIR, cluster.owner, min_free_bytes)


class NodeSpool(Spool):
    """A folder of its own under a spool `root` that others write too (a reception node's
    under the shared spool, a receiving process' under its node's): it writes there, and names
    what it writes by the path under `root` (`<prefix>/<uuid>.dcm`)."""

    def __init__(self, root: Path, prefix: str, min_free_bytes: int = 0) -> None:
        self.root = root
        self.prefix = prefix
        super().__init__(self.root / self.prefix, min_free_bytes)

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, parts: Sequence[bytes | memoryview]) -> SpooledFile:
        spooled = super().write(parts)
        return SpooledFile(f"{self.prefix}/{spooled.name}", spooled.size_bytes)

    def names(self) -> set[str]:
        return {f"{self.prefix}/{name}" for name in super().names()}
