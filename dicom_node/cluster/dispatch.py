"""A reception node's hand-off: every queued series becomes a job on the broker.

The state database says what is queued, whichever way it got there (selection on this node or
another, `dicom-node retry`, a worker that lost its inference process and queued the series
again); the dispatcher looks when woken and every `POLL_S`, and publishes each queue entry it
has not published yet (an entry: a series, its generation and when it was queued). Each
reception node publishes each entry once, so with N nodes a job may be on the broker N times:
the store claims a series once, and the other deliveries find nothing to do.

A node that dies between queueing a series and publishing it publishes it at its next start
(it has published nothing then), or another node does within `POLL_S`.

The dispatcher also publishes, once per attempt, every `segmenting` series whose worker's
lease ran out: RabbitMQ hands a job on at once when its worker's connection closes (a crash,
a kill), but a worker that hangs, or whose machine loses power or network, may hold its
connection, and its job, far longer. The worker that takes the job over finds the lease run
out and claims the series (`NodeState.claim_series`).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from dicom_node.app.config import ClusterConfig
from dicom_node.cluster.broker import celery_app, publish
from dicom_node.pipeline.state import NodeState, SeriesState

log = logging.getLogger(__name__)

POLL_S = 2.0


class Dispatcher:
    """The thread that publishes queued series as jobs (in place of the one-machine node's
    segmentation stage)."""

    def __init__(self, state: NodeState, cluster: ClusterConfig) -> None:
        self.state = state
        self.app = celery_app(cluster)
        self._published: set[tuple[int, int, datetime]] = set()
        self._lapsed: set[tuple[int, int, int]] = set()  # (series, generation, attempt)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A series was queued: publish now."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.dispatch()
            except Exception:  # a broker or database hiccup: try again at the next poll
                log.exception("dispatch")
            self._wake.wait(POLL_S)
            self._wake.clear()

    def dispatch(self) -> int:
        """Publish the queue entries not published yet, and the series whose lease ran out
        not published yet; returns how many."""
        queued = self.state.jobs(SeriesState.QUEUED, limit=None)
        entries = {(job.id, job.generation, job.state_changed_at) for job in queued}
        new = sorted(entries - self._published, key=lambda entry: entry[2])
        for series_id, generation, at in new:
            publish(self.app, series_id, generation)
            self._published.add((series_id, generation, at))
            log.info("series %d: job published", series_id)
        self._published &= entries  # forget entries no longer queued
        lapsed = set(self.state.lapsed_claims())
        for series_id, generation, attempt in sorted(lapsed - self._lapsed):
            publish(self.app, series_id, generation)
            log.warning(
                "series %d: the lease of attempt %d ran out; job published", series_id, attempt
            )
        new_lapsed = len(lapsed - self._lapsed)
        self._lapsed = lapsed
        return len(new) + new_lapsed
