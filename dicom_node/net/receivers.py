"""Receiving processes that share the DICOM port (`[node] receive_processes`, Linux only).

One Python process receives on about one core whatever the number of associations: its
C-STOREs, their records and pynetdicom's threads share one interpreter lock. With
`receive_processes = N` the daemon starts N - 1 more processes, and every one of them, the
daemon included, binds the DICOM port with SO_REUSEPORT: the kernel hands each new
connection to one of them, so concurrent senders use more cores. Each association stays in
the process that accepted it, and `node.max_associations` holds in each process. Linux lets
only processes of the same user share a port so; a second node of that user started on the
same port with `receive_processes` > 1 would share it too instead of failing to start.

Each extra process runs the daemon's reception unchanged (`receive.build_ae`, its handlers,
`access.start_server` with the access checks, TLS and bounds): the same durable write, into a
folder of its own under the spool (`receiver-<k>/`, named `receiver-<k>/<uuid>.dcm` in the
database), so that its start-up recovery (partial writes removed, files the database lacks
recorded) touches its own files only, as a cluster's reception nodes do on a shared spool;
and the same database (SQLite in WAL mode serialises the writers of several processes, each
waiting up to 30 s; PostgreSQL as it is). Everything after reception stays in the daemon: its
completion sweeps the database every second for receiving series without an idle timer
(`SeriesCompletion.sweep`), and selects, segments and delivers as before.

Counts: each process adds into its own row of an array in shared memory (instances, bytes,
refusals, connections, associations in progress); the daemon adds what is new to its metrics
every `SUPERVISE_S`, so `/metrics` shows the node's totals as before, plus the processes
running, their restarts and the connections each accepted.

Lifecycle: the processes die with the daemon (PDEATHSIG); one that dies is replaced within
`SUPERVISE_S` and counted; at stop each gets SIGTERM and gives its associations in flight the
daemon's grace (`access.SHUTDOWN_GRACE_S`) before aborting them; the kernel resets
connections still waiting in a dead process' accept queue (never answered, so the sender
still has their instances). A process killed between an answer and its record leaves the
record to the daemon's next start, which recovers every `receiver-*` folder before starting
them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable
from enum import IntEnum
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pynetdicom import evt
from pynetdicom.events import Event

from dicom_node.app.children import die_with_parent
from dicom_node.app.config import Config
from dicom_node.cluster.storage import NodeSpool
from dicom_node.logs import setup_logging
from dicom_node.net.access import SHUTDOWN_GRACE_S, start_server, stop_server
from dicom_node.net.receive import Reception, build_ae, event_handlers
from dicom_node.net.statuses import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from dicom_node.net.tls import server_context
from dicom_node.pipeline.observer import Stage
from dicom_node.pipeline.spool import Spool
from dicom_node.pipeline.state import NodeState, Recorded

if TYPE_CHECKING:
    from dicom_node.web.metrics import NodeMetrics

log = logging.getLogger(__name__)

PREFIX = "receiver-"  # a process' spool folder and log name: receiver-1, receiver-2, ...
SUPERVISE_S = 0.5  # how often the daemon looks for a dead process and reports the counts
START_TIMEOUT_S = 60.0  # from spawn to listening (imports, recovery of its folder)
# Beyond the grace its associations get, how long a process may take to record and exit.
STOP_MARGIN_S = 10.0


class Count(IntEnum):
    """A process' row in the shared array."""

    RECEIVED = 0
    BYTES = 1
    OUT_OF_RESOURCES = 2
    CANNOT_UNDERSTAND = 3
    CONNECTIONS = 4
    ACTIVE = 5  # associations in progress


_REFUSED = {OUT_OF_RESOURCES: Count.OUT_OF_RESOURCES, CANNOT_UNDERSTAND: Count.CANNOT_UNDERSTAND}


class SharedCounts:
    """One row of `Count` per extra process, in shared memory: each process writes its own
    row (its threads under a lock of its own), the daemon reads them all. Doubles, so that
    bytes do not overflow; aligned 8-byte writes, which a reader never sees half done."""

    def __init__(self, context: Any, processes: int) -> None:
        self.processes = processes
        self._values = context.RawArray("d", processes * len(Count))

    def get(self, number: int, count: Count) -> int:
        """Process `number`'s (1..processes) count."""
        return int(self._values[(number - 1) * len(Count) + count])

    def total(self, count: Count) -> int:
        return sum(self.get(number, count) for number in range(1, self.processes + 1))

    def add(self, number: int, count: Count, amount: int) -> None:
        """In process `number`, under its lock."""
        self._values[(number - 1) * len(Count) + count] += amount


class ProcessCounter:
    """An extra process' `PipelineObserver` (reception calls only `instance_answered`) and
    its connection handlers, counting into its row of the shared counts."""

    def __init__(self, counts: SharedCounts, number: int) -> None:
        self._counts = counts
        self._number = number
        self._lock = threading.Lock()

    def _add(self, *changes: tuple[Count, int]) -> None:
        with self._lock:
            for count, amount in changes:
                self._counts.add(self._number, count, amount)

    def instance_answered(self, status: int, size_bytes: int) -> None:
        if status == SUCCESS:
            self._add((Count.RECEIVED, 1), (Count.BYTES, size_bytes))
        elif status in _REFUSED:
            self._add((_REFUSED[status], 1))

    def stage_timed(self, stage: Stage, seconds: float) -> None:
        """Stages are timed in the daemon."""

    def delivery_attempted(self, destination: str, failed: bool) -> None:
        """Deliveries are the daemon's."""

    def event_handlers(self) -> list[tuple[evt.EventType, Callable, list]]:
        return [
            (evt.EVT_CONN_OPEN, self._opened, []),
            (evt.EVT_CONN_CLOSE, self._closed, []),
        ]

    def _opened(self, event: Event) -> None:
        self._add((Count.CONNECTIONS, 1), (Count.ACTIVE, 1))

    def _closed(self, event: Event) -> None:
        self._add((Count.ACTIVE, -1))


def receiver_folder(spool: Spool, number: int) -> tuple[Path, str]:
    """Process `number`'s folder under the daemon's spool (a cluster reception node's
    `<node_id>/` folder included): the root its files are named from, and its path there."""
    if isinstance(spool, NodeSpool):
        return spool.root, f"{spool.prefix}/{PREFIX}{number}"
    return spool.directory, f"{PREFIX}{number}"


def recover_all(spool: Spool, state: NodeState, on_recorded: Callable[[Recorded], None]) -> int:
    """At the daemon's start, before any extra process runs: what every `receiver-*` folder
    holds that the database lacks is recorded (also folders of processes that no longer run,
    `receive_processes` having been lowered); returns how many."""
    recovered = 0
    for folder in sorted(spool.directory.glob(PREFIX + "*")):
        number = folder.name.removeprefix(PREFIX)
        if folder.is_dir() and number.isdigit():
            folder_spool = NodeSpool(*receiver_folder(spool, int(number)))
            recovered += Reception(folder_spool, state, on_recorded).recover()
    return recovered


def _ignore(recorded: Recorded) -> None:
    """The daemon's completion finds the series in the database (`SeriesCompletion.sweep`)."""


def _receive(
    ready: Connection,
    config: Config,
    number: int,
    spool_folder: tuple[Path, str],
    counts: SharedCounts,
    log_level: int,
) -> None:
    """An extra process: recover its folder, listen on the shared port, receive until
    SIGTERM (or SIGINT), then stop as the daemon stops its own server."""
    die_with_parent()
    setup_logging(config.log.format, log_level, process=f"{PREFIX}{number}")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    node = config.node
    spool = NodeSpool(*spool_folder, node.min_free_mb << 20)
    state = NodeState(node.database_url, config.cluster.owner)
    counter = ProcessCounter(counts, number)
    reception = Reception(spool, state, _ignore, counter)
    try:
        reception.recover()
        ae = build_ae(node)
        handlers = [*event_handlers(reception, node), *counter.event_handlers()]
        server = start_server(ae, node, handlers, server_context(node), reuse_port=True)
        ready.send(os.getpid())
        log.info("receiving on %s:%d as %s", node.bind, node.port, node.ae_title)
        try:
            while not stop.wait(1.0):
                pass
        finally:
            stop_server(ae, server)
            reception.records.close()
    finally:
        state.close()


class Receivers:
    """The daemon's extra receiving processes: starts them, replaces one that dies, reports
    their counts to the daemon's metrics, stops them."""

    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        # spawn, not fork: the daemon has threads (see InferenceWorker)
        self._context = multiprocessing.get_context("spawn")
        self.count = config.node.receive_processes - 1
        self.counts = SharedCounts(self._context, self.count)
        self._processes: list[BaseProcess | None] = [None] * self.count
        self._reported = {count: 0 for count in Count}
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.restarts = 0  # processes replaced after dying (read by the metrics)
        self.on_replaced: Callable[[], None] = lambda: None  # e.g. rewrite the pid file

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p is not None and p.pid is not None]

    def running(self) -> int:
        return sum(1 for p in self._processes if p is not None and p.is_alive())

    def start(self, metrics: NodeMetrics) -> None:
        """Start every process, return once all listen; then supervise them."""
        started = [self._spawn(number) for number in range(1, self.count + 1)]
        try:
            for number, (process, ready) in enumerate(started, 1):
                self._await(number, process, ready)
        except RuntimeError:
            for process, _ in started:
                process.kill()
            raise
        self._supervisor = threading.Thread(
            target=self._supervise, args=(metrics,), name="receivers", daemon=True
        )
        self._supervisor.start()

    def _spawn(self, number: int) -> tuple[BaseProcess, Connection]:
        ready, child = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_receive,
            args=(
                child,
                self.config,
                number,
                receiver_folder(self.spool, number),
                self.counts,
                logging.getLogger().getEffectiveLevel(),
            ),
            name=f"dicom-node-{PREFIX}{number}",
            daemon=True,
        )
        process.start()
        child.close()
        self._processes[number - 1] = process
        return process, ready

    def _await(self, number: int, process: BaseProcess, ready: Connection) -> None:
        try:
            if not ready.poll(START_TIMEOUT_S):
                process.kill()
                raise RuntimeError(f"{PREFIX}{number} not listening after {START_TIMEOUT_S} s")
            ready.recv()
        except EOFError:
            process.join(5)
            raise RuntimeError(
                f"{PREFIX}{number} did not start (exit {process.exitcode}; its log says why)"
            ) from None
        finally:
            ready.close()
        log.info("%s%d listening (pid %d)", PREFIX, number, process.pid)

    def _supervise(self, metrics: NodeMetrics) -> None:
        while not self._stopping.wait(SUPERVISE_S):
            for number, process in enumerate(self._processes, 1):
                if process is not None and not process.is_alive() and not self._stopping.is_set():
                    self._replace(number, process)
            self.report(metrics)

    def _replace(self, number: int, process: BaseProcess) -> None:
        log.error(
            "%s%d (pid %s) died (exit %s); starting another",
            PREFIX,
            number,
            process.pid,
            process.exitcode,
        )
        self.restarts += 1
        # Its associations ended with it: none is in progress any more.
        self.counts.add(number, Count.ACTIVE, -self.counts.get(number, Count.ACTIVE))
        try:
            self._await(number, *self._spawn(number))
        except RuntimeError as error:  # tried again at the next look
            log.error("%s", error)
        self.on_replaced()

    def report(self, metrics: NodeMetrics) -> None:
        """Add to the daemon's metrics what the processes counted since the last report."""
        new = {count: self.counts.total(count) - self._reported[count] for count in Count}
        if not any(new[count] for count in Count if count != Count.ACTIVE):
            return
        metrics.counted_elsewhere(
            new[Count.RECEIVED],
            new[Count.BYTES],
            {status: new[count] for status, count in _REFUSED.items()},
            new[Count.CONNECTIONS],
        )
        self._reported = {count: self._reported[count] + new[count] for count in Count}

    def active_associations(self) -> int:
        return self.counts.total(Count.ACTIVE)

    def stop_accepting(self) -> None:
        """SIGTERM to every process: each stops accepting and gives its associations in
        flight the grace period (while the daemon does the same with its own)."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        for process in self._processes:
            if process is not None and process.is_alive():
                process.terminate()

    def join(self) -> None:
        """Wait for the processes to end (killed past the grace and a margin)."""
        for process in self._processes:
            if process is None:
                continue
            process.join(SHUTDOWN_GRACE_S + STOP_MARGIN_S)
            if process.is_alive():
                log.warning("%s did not stop; killing it", process.name)
                process.kill()
                process.join(5)

    def collector(self) -> Collector:
        return _ReceiversCollector(self)


class _ReceiversCollector(Collector):
    """The extra processes, as read at each scrape."""

    def __init__(self, receivers: Receivers) -> None:
        self.receivers = receivers

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "dicom_node_receivers",
            "Receiving processes running beside the daemon ([node] receive_processes - 1 "
            "when all run)",
            value=self.receivers.running(),
        )
        yield CounterMetricFamily(
            "dicom_node_receiver_restarts",
            "Receiving processes replaced after dying (since the node started)",
            value=self.receivers.restarts,
        )
        connections = CounterMetricFamily(
            "dicom_node_receiver_associations",
            "Connections each receiving process beside the daemon accepted (the daemon's are "
            "dicom_node_associations less these)",
            labels=["receiver"],
        )
        counts = self.receivers.counts
        for number in range(1, counts.processes + 1):
            connections.add_metric([str(number)], counts.get(number, Count.CONNECTIONS))
        yield connections
