"""The node's Prometheus metrics, in a registry of its own (not prometheus-client's global one,
which a library imported into the daemon could fill with metrics of its own).

Two kinds, by where the truth lives:
- events the node sees once (an instance answered, an association opened, a stage's duration,
  a delivery attempt) are counted as they happen, through `dicom_node.pipeline.observer`:
  a counter incremented or a histogram observed on the reporting thread, nothing more;
- what something else already holds (series by state in the database, free space on the
  disk, the worker's restarts and model, the associations in progress) is read when scraped
  (`_ScrapeTimeCollector`), so it cannot drift from its source, also across restarts.

Every metric is named `dicom_node_*`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.net.statuses import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from dicom_node.pipeline.observer import Stage
from dicom_node.pipeline.spool import Spool
from dicom_node.pipeline.state import SeriesState

if TYPE_CHECKING:
    from dicom_node.pipeline.state import NodeState
    from dicom_node.pipeline.worker import InferenceWorker

log = logging.getLogger(__name__)

# No `*_created` series beside each counter: a Prometheus scraping the text format stores
# each as a series of its own, and a start time per counter tells nothing the node's does not
# (a switch for the whole process, which is the daemon's).
disable_created_metrics()

# Seconds: a delivery attempt or an assembly takes under one, a series' reception or its
# inference on a CPU minutes, `[worker] timeout_s` half an hour by default.
STAGE_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


def status_label(status: int) -> str:
    """A DIMSE status as DICOM writes it: '0xA700'."""
    return f"0x{status:04X}"


class NodeMetrics:
    """The registry, and the `PipelineObserver` that counts into it."""

    def __init__(
        self,
        state: NodeState,
        spool: Spool,
        worker: InferenceWorker | None,  # None: a cluster's reception node (no worker)
        destinations: Sequence[str] = (),
        associations_elsewhere: Callable[[], int] = lambda: 0,
    ) -> None:
        """`associations_elsewhere`: those in progress in the node's other receiving
        processes (`net.receivers`), added to the daemon's own."""
        self.registry = CollectorRegistry()
        self._received = Counter(
            "dicom_node_instances_received",
            "Instances stored and acknowledged (C-STORE answered 0x0000), duplicates included",
            registry=self.registry,
        )
        self._refused = Counter(
            "dicom_node_instances_refused",
            "C-STOREs answered a failure, by status (0xA700 out of resources, e.g. below "
            "node.min_free_mb; 0xC000 cannot understand)",
            ["status"],
            registry=self.registry,
        )
        self._bytes = Counter(
            "dicom_node_received_bytes",
            "Bytes of dataset received and stored (duplicates and refused instances not counted)",
            registry=self.registry,
        )
        self._associations = Counter(
            "dicom_node_associations",
            "Connections to the DICOM port, each an association (or an attempt at one)",
            registry=self.registry,
        )
        self._stage = Histogram(
            "dicom_node_stage_duration_seconds",
            "Time per series in each stage: receive (first to last instance), assemble, "
            "segment, seg (encode and write); send per delivery attempt",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self._attempts = Counter(
            "dicom_node_delivery_attempts",
            "SEG delivery attempts, by [[destinations]] name",
            ["destination"],
            registry=self.registry,
        )
        self._failures = Counter(
            "dicom_node_delivery_failures",
            "SEG delivery attempts that failed (retried with backoff until max_attempts)",
            ["destination"],
            registry=self.registry,
        )
        # Every label value the node knows of is shown from the start, at 0, so that rates
        # and alerts work before the first event.
        for status in (OUT_OF_RESOURCES, CANNOT_UNDERSTAND):
            self._refused.labels(status_label(status))
        for stage in Stage:
            self._stage.labels(stage.value)
        for name in destinations:
            self._attempts.labels(name)
            self._failures.labels(name)
        collector = _ScrapeTimeCollector(state, spool, worker, associations_elsewhere)
        self.registry.register(collector)

    # PipelineObserver ----------------------------------------------------------------------

    def instance_answered(self, status: int, size_bytes: int) -> None:
        if status == SUCCESS:
            self._received.inc()
            self._bytes.inc(size_bytes)
        else:
            self._refused.labels(status_label(status)).inc()

    def counted_elsewhere(
        self, received: int, size_bytes: int, refused: Mapping[int, int], connections: int
    ) -> None:
        """What the node's other receiving processes counted since they last reported
        (`net.receivers`): instances stored, their bytes, refusals by status, connections."""
        self._received.inc(received)
        self._bytes.inc(size_bytes)
        for status, count in refused.items():
            self._refused.labels(status_label(status)).inc(count)
        self._associations.inc(connections)

    def stage_timed(self, stage: Stage, seconds: float) -> None:
        self._stage.labels(stage.value).observe(seconds)

    def delivery_attempted(self, destination: str, failed: bool) -> None:
        self._attempts.labels(destination).inc()
        if failed:
            self._failures.labels(destination).inc()

    # pynetdicom ------------------------------------------------------------------------------

    def event_handlers(self) -> list[tuple[evt.EventType, Callable, list]]:
        """For the DICOM server, beside reception's: count each connection as it opens."""
        return [(evt.EVT_CONN_OPEN, self._connection_opened, [])]

    def _connection_opened(self, event: Event) -> None:
        self._associations.inc()


def _associations_in_progress() -> int:
    """The daemon's acceptor association threads: the DICOM port's (deliveries request)."""
    return sum(1 for t in threading.enumerate() if isinstance(t, Association) and t.is_acceptor)


class _ScrapeTimeCollector(Collector):
    """What is read from its source at each scrape. A source that fails (the database down)
    leaves its metrics out of that scrape, logged, instead of failing the whole scrape."""

    def __init__(
        self,
        state: NodeState,
        spool: Spool,
        worker: InferenceWorker | None,
        associations_elsewhere: Callable[[], int],
    ) -> None:
        self.state = state
        self.spool = spool
        self.worker = worker
        self.associations_elsewhere = associations_elsewhere

    def collect(self) -> Iterable[Metric]:
        yield from self._series()
        yield GaugeMetricFamily(
            "dicom_node_associations_active",
            "Associations in progress on the DICOM port",
            value=_associations_in_progress() + self.associations_elsewhere(),
        )
        yield from self._disk()
        if self.worker is None:
            return
        yield CounterMetricFamily(
            "dicom_node_worker_restarts",
            "Inference worker processes replaced after dying or hanging (since the node started)",
            value=self.worker.restarts,
        )
        algorithm = self.worker.algorithm
        if algorithm is not None:  # known once a worker has loaded the model
            yield InfoMetricFamily(
                "dicom_node_model",
                "The model the worker runs: code version and the weights' SHA-256",
                value={
                    "name": algorithm.name,
                    "version": algorithm.version,
                    "weights_sha256": algorithm.weights_sha256,
                },
            )

    def _series(self) -> Iterable[Metric]:
        try:
            counts = self.state.counts()
        except SQLAlchemyError as error:
            log.warning("metrics: series counts unavailable: %s", type(error).__name__)
            return
        by_state = GaugeMetricFamily(
            "dicom_node_series", "Series in the state database, by state", labels=["state"]
        )
        for state in SeriesState:
            by_state.add_metric([state.value], counts.get(state.value, 0))
        yield by_state
        yield GaugeMetricFamily(
            "dicom_node_queue_depth",
            "Series queued for segmentation",
            value=counts.get(SeriesState.QUEUED.value, 0),
        )

    def _disk(self) -> Iterable[Metric]:
        try:
            free = self.spool.free_bytes()
        except OSError as error:
            log.warning("metrics: free space unavailable: %s", error)
            return
        yield GaugeMetricFamily(
            "dicom_node_data_disk_free_bytes",
            "Free space on the data_dir's file system, as the node may use it",
            value=free,
        )
        yield GaugeMetricFamily(
            "dicom_node_data_disk_min_free_bytes",
            "node.min_free_mb: below this much free space C-STOREs are refused (0: off)",
            value=self.spool.min_free_bytes,
        )
