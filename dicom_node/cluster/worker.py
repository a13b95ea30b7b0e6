"""`dicom-node serve --role worker`: a Celery worker that segments the series the broker hands
it, one at a time.

Each job names a series and its generation. The worker claims the series through the store
(`NodeState.claim_series`), which moves it to `segmenting` under this worker's node id with a
lease; nothing else moves a series there, so a job delivered twice, or one whose series was
done, reopened or taken by another worker, does nothing. While the inference worker process
(`pipeline.worker`, the model loaded once and kept warm) runs, a thread renews the lease; the
outcome is recorded as the one-machine node records it (`pipeline.segment`), and only then is
the job acknowledged.

A worker that dies loses its broker connection, and RabbitMQ hands its job to another worker
at once. That worker finds the series `segmenting` under the dead worker's lease and waits for
the lease to run out (the job comes back after it, `held_for_s`), then takes the series over:
the claim check (`rows.held`) discards whatever the first worker might still record. A job
the broker delivers for the first time while another worker's lease runs is a duplicate (each
reception node publishes each queue entry) and is dropped.

At start-up the worker requeues the series it held before a restart (its own, by node id),
never another's, and removes the result files of attempts that ended unrecorded
(`pipeline.results`).

With `[http] enabled` it serves `/metrics`, `/healthz` and `/readyz` as a reception node does
(`web.server`, no dashboard), with a worker's readiness checks (`web.health.worker_checks`).

Under systemd (`Type=notify`, `deploy/dicom-node-worker.service`) it says READY=1 once Celery
takes jobs (the model loaded before), STOPPING=1 when a SIGTERM begins its warm shutdown, and
pings the watchdog while those checks pass (`app.systemd.HealthWatchdog`): a worker whose
inference process died while idle, or whose broker connection is gone, stops pinging and is
restarted. A full disk is the exception: `/readyz` reports it, but a restart frees nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import worker_ready, worker_shutting_down

from dicom_node.app.config import Config
from dicom_node.app.systemd import HealthWatchdog, SystemdNotifier
from dicom_node.cluster.broker import SEGMENT_TASK, celery_app
from dicom_node.cluster.lease import LeaseKeeper
from dicom_node.cluster.storage import results_dir, shared_spool
from dicom_node.pipeline.results import remove_orphans
from dicom_node.pipeline.segment import SegmentationStage
from dicom_node.pipeline.spool import Spool
from dicom_node.pipeline.state import NodeState
from dicom_node.pipeline.worker import InferenceWorker
from dicom_node.web.health import worker_checks
from dicom_node.web.metrics import NodeMetrics
from dicom_node.web.server import HttpEndpoint

log = logging.getLogger(__name__)

# A job whose series another worker's lease holds comes back this long after the lease's end.
_AFTER_LEASE_S = 0.5


def run_worker(config: Config) -> None:
    """Load the model, then take jobs until SIGTERM (the job in hand is finished first)."""
    cluster = config.cluster
    state = NodeState(config.node.database_url, cluster.owner)
    results = results_dir(cluster)
    # The folder it writes to, with [node] min_free_mb as its watermark (`/readyz`, metrics).
    results_disk = Spool(results, config.node.min_free_mb << 20)
    inference = InferenceWorker(config)
    lease = LeaseKeeper(state, cluster.lease_s)
    metrics = NodeMetrics(state, results_disk, inference)
    # Delivery is the reception nodes' (they poll the state for SEGs to send): nothing to wake.
    stage = SegmentationStage(
        config, state, shared_spool(cluster), results, inference, _nothing, metrics
    )
    app = celery_app(cluster)
    http = HttpEndpoint(config.http, metrics.registry) if config.http.enabled else None

    @app.task(name=SEGMENT_TASK, bind=True, max_retries=None)
    def segment(task: Task, series_id: int, generation: int, takeover: bool = False) -> str:
        answer = state.claim_series(series_id, generation, cluster.lease_s, config.worker.retries)
        if answer.claim is None:
            # Redelivered: its worker may have died holding it. Look again after the lease.
            redelivered = takeover or bool((task.request.delivery_info or {}).get("redelivered"))
            if answer.held_for_s is not None and redelivered:
                kwargs = {"series_id": series_id, "generation": generation, "takeover": True}
                raise task.retry(kwargs=kwargs, countdown=answer.held_for_s + _AFTER_LEASE_S)
            log.info("series %d: nothing to do (claimed elsewhere, done or superseded)", series_id)
            return "not claimed"
        with lease.holding(answer.claim):
            stage.process(answer.claim)
        return "processed"

    if http is not None:
        http.start()  # `/readyz` says "starting" while the model loads
    inference.start()  # a broken model or config fails the start, not the first job
    requeued = state.requeue_own()
    if requeued:
        log.info("requeued %d series this worker held before its restart", len(requeued))
    remove_orphans(state, results)  # after requeueing: this worker's attempts ended
    worker = app.Worker(
        hostname=f"{cluster.owner}@dicom-node",
        pool_cls="solo",  # jobs in this process, one at a time; the model is in `inference`
        concurrency=1,
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=True,
        quiet=True,
        loglevel=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
    )
    checks = worker_checks(state, results_disk, inference, worker)
    if http is not None:
        http.checks = checks
    systemd = SystemdNotifier()
    # A disk below the watermark is in `/readyz`, but no reason for systemd to restart it.
    watchdog = HealthWatchdog(systemd, {n: c for n, c in checks.items() if n != "free_space"})

    def ready(**_: Any) -> None:
        log.info("cluster worker %s ready: taking jobs", cluster.owner)
        systemd.ready("taking jobs")
        watchdog.start()

    def shutting_down(**_: Any) -> None:
        systemd.stopping()  # the job in hand is finished first (Celery's warm shutdown)

    worker_ready.connect(ready, weak=False)
    worker_shutting_down.connect(shutting_down, weak=False)
    lease.start()
    try:
        worker.start()
    finally:
        watchdog.stop()
        lease.stop()
        inference.stop()
        state.close()
        if http is not None:
            http.stop()
    log.info("stopped")


def _nothing() -> None:
    pass
