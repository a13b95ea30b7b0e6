"""`dicom-node serve`: wires the stages together and runs until SIGTERM or SIGINT.

receive (network) -> spool (disk) -> state (database) -> series (completion, selection)
-> segment (the worker process: volume, inference, SEG) -> deliver (C-STORE to the PACS);
retention purges old files.

Start-up order matters: the HTTP endpoint (`[http]`, if on) comes first, so that `/healthz`
answers and `/readyz` says "starting" while the inference worker loads its model; then the
scheduler resumes idle timers and selections, the database and spool are made consistent
(partial writes removed, spooled files the database lacks recorded, result files of
attempts that ended unrecorded removed), and only then does the node listen; the pid file
appears once it listens, so "pid file present and its process alive" means "accepting
associations". Under systemd (`Type=notify`) it then says READY=1,
and its scheduler pings the watchdog (`dicom_node.app.systemd`).

With `[node] receive_processes` > 1 the daemon starts that many receiving processes less one
beside its own reception, once the spool is consistent (every `receiver-*` folder recovered
too) and before it listens; all share the DICOM port (`dicom_node.net.receivers`). The pid
file lists their pids; its scheduler sweeps the database every second for series they
received, and `/readyz` says whether they all run.

Stop order: stop accepting (the receiving processes too), give associations in flight
`net.access.SHUTDOWN_GRACE_S` to finish, abort the rest (an aborted C-STORE was never
acknowledged, so the sender still has it), stop the segmentation (a series in flight is
re-queued at the next start) and delivery (an attempt in flight is due again at the next
start), stop the scheduler, remove the pid file; the HTTP endpoint goes last (`/readyz`
answers 503 from the moment the DICOM port closes).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.app.config import Config
from dicom_node.app.systemd import SystemdNotifier
from dicom_node.cluster.lease import LeaseKeeper
from dicom_node.cluster.storage import node_spool
from dicom_node.cluster.storage import results_dir as shared_results_dir
from dicom_node.net.access import check_permissions, start_server, stop_server
from dicom_node.net.receive import Reception, build_ae, event_handlers
from dicom_node.net.receivers import Receivers, recover_all
from dicom_node.net.tls import server_context
from dicom_node.pipeline.completion import SeriesCompletion
from dicom_node.pipeline.deliver import DeliveryStage
from dicom_node.pipeline.results import remove_orphans
from dicom_node.pipeline.retention import schedule_retention
from dicom_node.pipeline.segment import SegmentationStage
from dicom_node.pipeline.spool import Spool
from dicom_node.pipeline.state import NodeState
from dicom_node.pipeline.worker import InferenceWorker
from dicom_node.web.dashboard import Dashboard
from dicom_node.web.health import CheckResult, node_checks
from dicom_node.web.metrics import NodeMetrics
from dicom_node.web.server import HttpEndpoint

if TYPE_CHECKING:
    from dicom_node.cluster.dispatch import Dispatcher

log = logging.getLogger(__name__)

PID_FILE = "node.pid"
SPOOL_DIR = "spool"
RESULTS_DIR = "results"
SWEEP_S = 1.0  # with receiving processes: how often series they received get idle timers


@dataclass(frozen=True)
class DaemonInfo:
    """The pid file's content: which process serves this data_dir, as whom, since when."""

    pid: int
    ae_title: str
    bind: str
    port: int
    started_at: str  # ISO 8601, UTC
    receivers: list[int] = field(default_factory=list)  # pids of the receiving processes

    def alive(self) -> bool:
        """The pid is running and is the process that wrote the file (pids get reused)."""
        try:
            created = psutil.Process(self.pid).create_time()
        except psutil.Error:
            return False
        return created <= datetime.fromisoformat(self.started_at).timestamp() + 1.0


def running_daemon(data_dir: Path) -> DaemonInfo | None:
    """The daemon serving `data_dir`, or None (no pid file, or a stale one)."""
    try:
        info = DaemonInfo(**json.loads((Path(data_dir) / PID_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return info if info.alive() else None


def serve(config: Config, config_path: Path | None = None) -> None:
    """Run the node until SIGTERM or SIGINT; `config_path` is checked for permissions."""
    node = config.node
    data_dir = node.data_path
    data_dir.mkdir(parents=True, exist_ok=True)
    check_permissions(config, config_path)
    ssl_context = server_context(node)  # a bad certificate or key fails here, not later
    other = running_daemon(data_dir)
    if other is not None:
        raise RuntimeError(f"a node (pid {other.pid}) already serves {data_dir}")

    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # a line per timer otherwise
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    cluster = config.cluster
    state = NodeState(node.database_url, cluster.owner)
    min_free = node.min_free_mb << 20  # the watermark, in bytes
    if cluster.enabled:  # a reception node: files on the shared path, workers elsewhere
        spool: Spool = node_spool(cluster, min_free)
        results_dir = shared_results_dir(cluster)
        worker = None
    else:
        spool = Spool(data_dir / SPOOL_DIR, min_free)
        results_dir = data_dir / RESULTS_DIR
        worker = InferenceWorker(config)
    scheduler = BackgroundScheduler(timezone=UTC)
    receivers = Receivers(config, spool) if node.receive_processes > 1 else None
    metrics = NodeMetrics(
        state,
        spool,
        worker,
        [d.name for d in config.destinations],
        receivers.active_associations if receivers is not None else lambda: 0,
    )
    if receivers is not None:
        metrics.registry.register(receivers.collector())
    http = None
    if config.http.enabled:
        dashboard = (
            Dashboard(config.http, state, spool, results_dir) if config.http.dashboard else None
        )
        http = HttpEndpoint(config.http, metrics.registry, dashboard)
    if http is not None:
        http.start()  # a taken port fails the start before the model loads
    # A reception node of a cluster holds its deliveries in flight under leases (another
    # node takes over those of a node that died); the one-machine node keeps none.
    leases = LeaseKeeper(state, cluster.lease_s) if cluster.enabled else None
    delivery = DeliveryStage(config, state, results_dir, scheduler, metrics, leases)
    segmentation: SegmentationStage | Dispatcher
    if worker is None:
        from dicom_node.cluster.dispatch import Dispatcher  # Celery: the `cluster` extra

        segmentation = Dispatcher(state, cluster)
    else:
        worker.start()  # a broken model or config fails the start, not the first series
        segmentation = SegmentationStage(
            config, state, spool, results_dir, worker, delivery.wake, metrics
        )
    completion = SeriesCompletion(
        state, spool, config.series, scheduler, segmentation.wake, metrics
    )
    reception = Reception(spool, state, completion.received, metrics)
    systemd = SystemdNotifier()
    if systemd.watchdog_s is not None:  # pings stop when the scheduler does
        interval = systemd.watchdog_s / 2
        scheduler.add_job(systemd.watchdog, "interval", seconds=interval, id="systemd-watchdog")
    scheduler.start()
    try:
        completion.resume()
        remove_orphans(state, results_dir)  # after `resume` requeued this node's attempts
        reception.recover()
        recover_all(spool, state, completion.received)
        segmentation.start()
        delivery.start()
        schedule_retention(scheduler, state, spool, results_dir, config.retention)
        ae = build_ae(node)
        handlers = [*event_handlers(reception, node), *metrics.event_handlers()]
        if receivers is not None:
            scheduler.add_job(completion.sweep, "interval", seconds=SWEEP_S, id="sweep")
            receivers.start(metrics)
        server = start_server(ae, node, handlers, ssl_context, reuse_port=receivers is not None)
        if http is not None:
            address = f"{node.bind}:{node.port}"
            http.checks = node_checks(state, spool, data_dir, worker, scheduler, server, address)
            if receivers is not None:
                http.checks["receivers"] = lambda: _receivers_running(receivers)
        pid_file = data_dir / PID_FILE
        try:
            info = DaemonInfo(
                os.getpid(), node.ae_title, node.bind, node.port, datetime.now(UTC).isoformat()
            )
            _write_pid_file(pid_file, info, receivers)
            if receivers is not None:
                receivers.on_replaced = lambda: _write_pid_file(pid_file, info, receivers)
            log.info(
                "%s listening on %s:%d%s, data in %s",
                node.ae_title,
                node.bind,
                node.port,
                " (TLS)" if node.tls else "",
                data_dir,
            )
            systemd.ready()
            while not stop.wait(1.0):
                pass
            log.info("stopping")
            systemd.stopping()
        finally:
            if receivers is not None:
                receivers.stop_accepting()  # their grace runs beside the daemon's own
            stop_server(ae, server)
            reception.records.close()  # what the associations stored, recorded before stopping
            if receivers is not None:
                receivers.join()
            pid_file.unlink(missing_ok=True)
    finally:
        segmentation.stop()
        delivery.stop()
        scheduler.shutdown(wait=True)
        if worker is not None:
            worker.stop()
        state.close()
        if http is not None:
            http.stop()
    log.info("stopped")


def _write_pid_file(path: Path, info: DaemonInfo, receivers: Receivers | None) -> None:
    """Written whole under another name, then renamed: `status` never reads half of it."""
    if receivers is not None:
        info = replace(info, receivers=receivers.pids)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(asdict(info)))
    partial.replace(path)


def _receivers_running(receivers: Receivers) -> CheckResult:
    running, expected = receivers.running(), receivers.count
    return CheckResult(
        running == expected,
        f"{running} of {expected} receiving processes running (pids {receivers.pids})",
    )
