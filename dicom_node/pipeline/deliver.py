"""The delivery stage: SEG files (and the SR beside each) to their destinations by C-STORE,
with retries.

The state database holds every delivery and when it is next due, so a retry survives a
restart and `dicom-node retry` works by changing rows. A scheduled task (an apscheduler
interval trigger) claims due deliveries and attempts them on a small thread pool; a failed
attempt is due again after an exponential backoff with jitter (many nodes retrying a PACS that
just came back should not arrive in lockstep), until `delivery.max_attempts` is spent.

In a cluster several reception nodes deliver side by side: each attempt in flight is held
under a lease (`[cluster] lease_s`) renewed while the send runs (`cluster.lease`), and an
attempt whose node died or hangs is taken over by another node once its lease ran out
(`NodeState.claim_due_deliveries`). The SEG's UIDs are derived from the series, so the PACS
stores the repeated C-STORE as the same instance. The one-machine node keeps no lease: its
own restart makes its attempts in flight due again.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from apscheduler.schedulers.base import BaseScheduler

from dicom_node.app.config import Config, DeliveryConfig, Destination
from dicom_node.net.send import send_files
from dicom_node.pipeline.inference import result_paths
from dicom_node.pipeline.observer import UNOBSERVED, PipelineObserver, Stage
from dicom_node.pipeline.state import DueDelivery, NodeState, utcnow

if TYPE_CHECKING:
    from dicom_node.cluster.lease import LeaseKeeper

log = logging.getLogger(__name__)

DISPATCH_EVERY_S = 1.0
_DISPATCH_TASK_ID = "delivery-dispatch"  # the scheduled task's id in apscheduler


def backoff_s(attempt: int, config: DeliveryConfig, rng: random.Random) -> float:
    """Wait after failed attempt number `attempt` (1-based): initial x 2^(attempt-1), capped
    at the maximum, then stretched by up to `jitter` at random."""
    base = min(config.backoff_initial_s * 2 ** (attempt - 1), config.backoff_max_s)
    return base * (1.0 + config.jitter * rng.random())


def next_attempt_at(
    attempt: int, config: DeliveryConfig, rng: random.Random, now: datetime
) -> datetime | None:
    """When to try again after failed attempt `attempt`, or None once attempts are spent."""
    if attempt >= config.max_attempts:
        return None
    return now + timedelta(seconds=backoff_s(attempt, config, rng))


class DeliveryStage:
    """Claims due deliveries and sends them; records each outcome in the state."""

    def __init__(
        self,
        config: Config,
        state: NodeState,
        results_dir: Path,
        scheduler: BaseScheduler,
        observer: PipelineObserver = UNOBSERVED,
        leases: LeaseKeeper | None = None,
    ) -> None:
        """`leases`: a cluster's reception node holds its attempts under leases it renews
        (None: the one-machine node, no lease)."""
        self.config = config
        self.observer = observer
        self.leases = leases
        self.state = state
        self.results_dir = results_dir
        self.scheduler = scheduler
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="delivery")
        self._rng = random.Random()

    def start(self) -> None:
        self.scheduler.add_job(
            self.dispatch,
            "interval",
            seconds=DISPATCH_EVERY_S,
            id=_DISPATCH_TASK_ID,
            max_instances=1,
            coalesce=True,
            replace_existing=True,
        )
        if self.leases is not None:
            self.leases.start()

    def wake(self) -> None:
        """A SEG is ready: dispatch now instead of at the next tick."""
        self.scheduler.modify_job(_DISPATCH_TASK_ID, next_run_time=utcnow())

    def stop(self) -> None:
        # Attempts in flight are abandoned, not awaited: they stay claimed and become due
        # again at the next start (a SEG received twice is one instance at the PACS).
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.leases is not None:
            self.leases.stop()  # unrenewed, those attempts are taken over by another node

    def _destination(self, due: DueDelivery) -> Destination:
        """Where the delivery goes (the target resolved when the SEG was made, e.g. the
        caller's address for reply_to_caller) with the TLS settings of its [[destinations]]
        entry."""
        target = due.target
        for configured in self.config.destinations:
            if configured.name == target.name:
                return dataclasses.replace(
                    configured, ae_title=target.ae_title, host=target.host, port=target.port
                )
        # No longer configured (the config changed since): plain, as queued.
        return Destination(target.name, target.ae_title, target.host, target.port)

    def dispatch(self) -> None:
        lease_s = self.leases.lease_s if self.leases is not None else None
        for due in self.state.claim_due_deliveries(lease_s=lease_s):
            self._pool.submit(self.attempt, due)

    def _held(self, due: DueDelivery) -> AbstractContextManager[None]:
        """The lease on `due` renewed meanwhile (a cluster's), or nothing to hold."""
        return self.leases.holding(due) if self.leases is not None else nullcontext()

    def attempt(self, due: DueDelivery) -> None:
        with self._held(due):
            self._attempt(due)

    def _attempt(self, due: DueDelivery) -> None:
        destination = self._destination(due)
        # The SEG and, where one was written, its SR, over one association (a repeated
        # delivery sends the same instances). Delivered when the SEG is stored: a PACS that
        # does not take SRs must not hold back the segmentation, so a refused SR is a
        # warning in the log, and the measurements stay in the job.
        paths = result_paths(self.results_dir / due.seg_file)
        started = time.perf_counter()
        try:
            result = send_files(
                destination, paths, self.config.node.ae_title, self.config.delivery.timeout_s
            )
            seg_stored = any(f.stored and f.path == paths[0] for f in result.files)
            error = None if seg_stored else (result.reason or "the SEG was not stored")
            if seg_stored and not result.delivered:
                log.warning(
                    "series %d: %s stored the SEG but not all that goes with it (%s): %s",
                    due.series_id,
                    due.target.name,
                    ", ".join(f.path.name for f in result.files if not f.stored),
                    result.reason,
                )
        except Exception as error_:  # e.g. the SEG file is gone: a reason, not a dead thread
            log.exception("series %d: delivery attempt", due.series_id)
            error = f"{type(error_).__name__}: {error_}"
        self.observer.stage_timed(Stage.SEND, time.perf_counter() - started)
        self.observer.delivery_attempted(due.target.name, failed=error is not None)
        retry_at = None
        if error is not None:
            retry_at = next_attempt_at(due.attempt, self.config.delivery, self._rng, utcnow())
        self.state.record_delivery(due, error, retry_at)
