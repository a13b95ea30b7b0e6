"""Readiness: is the node fit to take a series now? One small function per check, each with
the reason it gives, for `/readyz` (`dicom_node.web.server`).

Ready means all of: the state database answers a query; the data_dir takes a write and its
disk has more free space than `[node] min_free_mb` (below it every C-STORE is refused); the
inference worker runs with its model loaded (a worker that died is replaced within seconds,
and ready again once it has loaded the model); the scheduler (idle timers, delivery,
retention) runs; the DICOM port listens. A cluster's worker (`worker_checks`) has no
scheduler or port: ready means the database answers, its broker connection is up (it takes
jobs through it), the results folder takes a write above `min_free_mb`, and its inference
process runs with its model loaded. Liveness (`/healthz`) asks none of this: a process that
answers HTTP is alive, and restarting it would not cure a full disk.
"""

from __future__ import annotations

import socket
import socketserver
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from dicom_node.pipeline.spool import Spool

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler
    from celery.apps.worker import Worker

    from dicom_node.pipeline.state import NodeState
    from dicom_node.pipeline.worker import InferenceWorker

_MIB = 1 << 20


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str


ReadinessCheck = Callable[[], CheckResult]


def database_reachable(state: NodeState) -> CheckResult:
    with state.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return CheckResult(True, f"{state.engine.dialect.name} answers")


def data_dir_writable(data_dir: Path) -> CheckResult:
    """A byte written to a new file there (and removed): a read-only or failing disk fails."""
    with tempfile.TemporaryFile(dir=data_dir, prefix=".readyz-") as probe:
        probe.write(b"\0")
        probe.flush()
    return CheckResult(True, f"{data_dir} takes writes")


def free_space(spool: Spool, below: str = "C-STOREs are refused") -> CheckResult:
    """More free space than the watermark; `below` says what happens under it."""
    free, floor = spool.free_bytes(), spool.min_free_bytes
    if free <= floor:  # the spool refuses a write that would leave less than `floor`
        return CheckResult(
            False, f"{free // _MIB} MiB free, below node.min_free_mb ({floor // _MIB} MiB): {below}"
        )
    watermark = f", node.min_free_mb {floor // _MIB} MiB" if floor else ""
    return CheckResult(True, f"{free // _MIB} MiB free{watermark}")


def worker_ready(worker: InferenceWorker) -> CheckResult:
    if worker.ready:
        return CheckResult(True, f"worker {worker.pid} ready")
    if worker.pid is not None:
        return CheckResult(False, f"worker {worker.pid} not ready (loading its model, or died)")
    return CheckResult(False, "no worker process (being restarted)")


def scheduler_running(scheduler: BaseScheduler) -> CheckResult:
    if scheduler.running:
        return CheckResult(True, "running")
    return CheckResult(False, "stopped: no idle timers, deliveries or retention")


def dicom_port_listening(server: socketserver.TCPServer, address: str) -> CheckResult:
    """The DICOM server's socket is in the listening state (closed once it shut down)."""
    sock = server.socket
    try:
        listening = sock.fileno() != -1 and bool(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        )
    except OSError:
        listening = False
    return CheckResult(listening, f"{address} {'listening' if listening else 'closed'}")


def broker_connected(worker: Worker) -> CheckResult:
    """The Celery worker's consumer holds an open connection to the broker (none while it
    connects, or reconnects after losing it: no job reaches it then)."""
    consumer = getattr(worker, "consumer", None)  # set once the worker has started
    connection = getattr(consumer, "connection", None)
    if connection is None or not connection.connected:
        return CheckResult(False, "not connected to the broker (connecting or reconnecting)")
    return CheckResult(True, f"connected to {connection.as_uri()}")  # without the password


def node_checks(
    state: NodeState,
    spool: Spool,
    data_dir: Path,
    worker: InferenceWorker | None,
    scheduler: BaseScheduler,
    server: socketserver.TCPServer,
    address: str,
) -> dict[str, ReadinessCheck]:
    """The checks of a running node, by the name `/readyz` reports them under (no `worker`
    on a cluster's reception node: its workers run elsewhere)."""
    checks: dict[str, ReadinessCheck] = {
        "database": partial(database_reachable, state),
        "data_dir": partial(data_dir_writable, data_dir),
        "free_space": partial(free_space, spool),
    }
    if worker is not None:
        checks["worker"] = partial(worker_ready, worker)
    checks["scheduler"] = partial(scheduler_running, scheduler)
    checks["scp"] = partial(dicom_port_listening, server, address)
    return checks


def worker_checks(
    state: NodeState, results: Spool, inference: InferenceWorker, worker: Worker
) -> dict[str, ReadinessCheck]:
    """The checks of a cluster's worker (`serve --role worker`), by the name `/readyz`
    reports them under; `results` is the shared results folder it writes its SEGs to, with
    `[node] min_free_mb` as its watermark."""
    return {
        "database": partial(database_reachable, state),
        "broker": partial(broker_connected, worker),
        "results_dir": partial(data_dir_writable, results.directory),
        "free_space": partial(free_space, results, "the disk of the SEGs is nearly full"),
        "worker": partial(worker_ready, inference),
    }


def readiness(checks: Mapping[str, ReadinessCheck]) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Every check run, each as {"ok", "reason"} (a check that raises fails with the error as
    its reason); ready if there are checks and all passed."""
    results: dict[str, dict[str, Any]] = {}
    for name, check in checks.items():
        try:
            result = check()
        except Exception as error:  # the reason is the point: a database error, EROFS, ...
            first_line = str(error).strip().splitlines()[:1]  # SQLAlchemy appends its SQL
            result = CheckResult(False, ": ".join([type(error).__name__, *first_line]))
        results[name] = {"ok": result.ok, "reason": result.reason}
    return bool(results) and all(r["ok"] for r in results.values()), results
