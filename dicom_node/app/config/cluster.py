"""[cluster]: reception nodes and inference workers on several machines (off by default).

Off, `dicom-node serve` is the one-machine node: SQLite or PostgreSQL, the spool and results
under data_dir, its own inference worker. On, each process is a reception node or a worker
(`dicom-node serve --role receive|worker`, see `dicom_node.cluster`): they share the state in
PostgreSQL, the files under `shared_dir` (a path every machine mounts) and a RabbitMQ broker
that hands queued series to the workers.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from dicom_node.app.config.checks import ConfigError, check_timeout

# A node id names the node's spool folder and is written in front of each file name it spools
# (`<node_id>/<uuid>.dcm`, 41 characters after the id, in a 64-character column).
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,20}")


def default_node_id() -> str:
    """This machine's host name (its first label, cut to 20 characters, other characters
    made '-'): distinct per machine, the same after a restart."""
    label = socket.gethostname().split(".")[0] or "node"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", label)[:20]


@dataclass(frozen=True)
class ClusterConfig:
    enabled: bool = False
    # Who this process is among the cluster's: the owner of the jobs it claims, and the name of
    # its spool folder. "": the host name. Two processes of one machine need two ids.
    node_id: str = ""
    # The broker, as Celery names it: "amqp://user:password@host:5672//" (RabbitMQ).
    broker: str = ""
    # A folder every node and worker mounts at this path (NFS, CephFS, ...): spool/<node_id>/
    # holds what each reception node received, results/ the SEGs and SRs.
    shared_dir: str = ""
    # A worker renews its claim on a series, and a reception node its claim on each delivery in
    # flight, every lease_s / 3; a claim not renewed for lease_s is its owner's death, and
    # another worker takes the series over (another reception node the delivery).
    lease_s: float = 30.0

    def __post_init__(self) -> None:
        if self.node_id and not NODE_ID_PATTERN.fullmatch(self.node_id):
            raise ConfigError(
                f"cluster.node_id: 1 to 20 letters, digits, '_', '.', '-', got {self.node_id!r}"
            )
        check_timeout("cluster.lease_s", self.lease_s)
        if self.enabled:
            for key in ("broker", "shared_dir"):
                if not getattr(self, key):
                    raise ConfigError(f"cluster.{key}: required when cluster.enabled is true")

    @property
    def owner(self) -> str:
        """The node id in effect (the configured one, else the host name's)."""
        return self.node_id or default_node_id()
