"""The inference worker: a process of its own that runs `dicom_node.pipeline.inference`.

`InferenceWorker` runs `segment_series` in a separate process that loads the model once and
keeps it warm. The process boundary is the point: a crash, an out-of-memory kill or a hang in
assembly, decoding or inference takes down the worker, never reception. The supervisor sees
the process die (or a request overrun `worker.timeout_s`), kills and restarts it, and reports
the series as lost with the reason; the segmentation stage decides whether to retry.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import resource
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from dicom_node.app.children import die_with_parent
from dicom_node.app.config import Config, UnsurePolicy
from dicom_node.imaging.seg import AlgorithmInfo, SegWriter
from dicom_node.imaging.sr import SrWriter
from dicom_node.logs import setup_logging
from dicom_node.pipeline.inference import (
    build_segmenter,
    build_sr_writer,
    build_writer,
    key_image_path_beside,
    key_image_sc_path_beside,
    save_dicom,
    segment_series,
    sr_path_beside,
)
from dicom_node.pipeline.spool import write_durably
from model.engine.verdict import Verdict

log = logging.getLogger(__name__)

# Model loading takes seconds; a worker that is not ready after this is broken.
START_TIMEOUT_S = 300.0


# -- the worker process ------------------------------------------------------------------


@dataclass(frozen=True)
class WorkRequest:
    paths: list[str]
    generation: int
    seg_path: str  # where to write the SEG (durably) if there is one; its SR goes beside it


@dataclass(frozen=True)
class WorkOutcome:
    """The worker's answer: `reason` set means failed; `seg_uids` None means no SEG."""

    reason: str | None
    seg_uids: tuple[str, str] | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def unsure(self) -> bool:
        """A SEG the verdict is unsure of (`model.engine.verdict`)."""
        return self.summary.get("verdict", {}).get("verdict") == Verdict.UNSURE


class WorkerLostError(RuntimeError):
    """The worker process died or overran its time-out; str() is the reason."""


@dataclass(frozen=True)
class LoadFailure:
    """What a worker that could not load its model sends instead of its algorithm."""

    reason: str


def _limit_memory(memory_max_mb: int) -> None:
    """Cap this process' address space at `worker.memory_max_mb` (0: none), and make it the
    kernel's first choice in an out-of-memory kill: the worker, never the daemon, pays for a
    series too large for the machine, and the daemon replaces it."""
    if memory_max_mb:
        limit = memory_max_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:  # raising one's own score needs no privilege
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:  # not Linux
        log.debug("worker: no /proc/self/oom_score_adj")


def _yield_to_reception() -> None:
    """SCHED_BATCH for every thread (Linux; threads started later inherit it from the thread
    that starts them; imports have started some already): a sender waits for every
    C-STORE's answer, so the daemon's threads, when they wake, take the CPU from the worker at
    once, and the worker never preempts them when it wakes. Not a niceness: that would also
    yield the worker's share to every other process on the machine, and on one shared with
    other work (a training run) it slowed segmentations to time-outs."""
    if not hasattr(os, "SCHED_BATCH"):
        return
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setscheduler(int(thread), os.SCHED_BATCH, os.sched_param(0))


def _serve(connection: Connection, config: Config, log_level: int = logging.INFO) -> None:
    """The worker process: load the model, then answer requests until the pipe closes. It
    logs as the daemon does ([log] format, at the daemon's level: DEBUG with `-v`), and runs
    as a batch job for the scheduler (`_yield_to_reception`)."""
    die_with_parent()
    _yield_to_reception()
    _limit_memory(config.worker.memory_max_mb)
    setup_logging(config.log.format, log_level, process="worker")
    try:
        segmenter = build_segmenter(config.inference)
        writer = build_writer(config, segmenter)
        sr_writer = build_sr_writer(config, writer.algorithm)
    except Exception as error:  # the daemon names the reason it cannot start (no patient data)
        connection.send(LoadFailure(f"{type(error).__name__}: {error}"))
        raise
    connection.send(writer.algorithm)  # ready, and which model (for the node's metrics)
    while True:
        try:
            request: WorkRequest = connection.recv()
        except EOFError:
            return
        try:
            outcome = _work(request, config, segmenter, writer, sr_writer)
        except Exception as error:  # the request fails with the reason; the warm worker stays
            # Library messages may quote header values (a patient's name, a birth date): the
            # reason and the default log carry the error's type only, the details go to DEBUG.
            log.error("series processing failed: %s", type(error).__name__)
            log.debug("series processing failed", exc_info=True)
            outcome = WorkOutcome(
                f"internal error: {type(error).__name__} (details: node log at debug level)"
            )
        connection.send(outcome)


def _work(
    request: WorkRequest,
    config: Config,
    segmenter: Any,
    writer: SegWriter,
    sr_writer: SrWriter | None = None,
) -> WorkOutcome:
    paths = [Path(p) for p in request.paths]
    # Held SEGs are written as they are: whoever releases one vouches for it.
    mark = config.verdict.policy == UnsurePolicy.UNVERIFIED
    result = segment_series(
        paths,
        config.series,
        segmenter,
        writer,
        request.generation,
        mark,
        sr_writer,
        config.measurements.key_image,
    )
    if result.reason is not None:
        return WorkOutcome(result.reason)
    if result.dataset is None:
        return WorkOutcome(None, None, result.summary)
    t = time.perf_counter()
    # The SR first: once the SEG is on disk the result counts, and its SR must be there too.
    sr_path = sr_path_beside(Path(request.seg_path))
    if result.sr is not None:
        result.summary["sr_bytes"] = save_dicom(result.sr, sr_path)
        result.summary["sr_sop_instance_uid"] = str(result.sr.SOPInstanceUID)
    else:  # an attempt before a config change may have left one
        sr_path.unlink(missing_ok=True)
    key_image_path = key_image_path_beside(Path(request.seg_path))
    if result.key_image is not None:
        write_durably(key_image_path, [result.key_image])
        result.summary["key_image"] = str(key_image_path)
    else:
        key_image_path.unlink(missing_ok=True)
    sc_path = key_image_sc_path_beside(Path(request.seg_path))
    if result.key_image_sc is not None:
        save_dicom(result.key_image_sc, sc_path)
    else:
        sc_path.unlink(missing_ok=True)
    size = save_dicom(result.dataset, Path(request.seg_path))
    result.summary["timings_s"]["seg_write_s"] = round(time.perf_counter() - t, 3)
    result.summary["seg_bytes"] = size
    uids = (str(result.dataset.SeriesInstanceUID), str(result.dataset.SOPInstanceUID))
    return WorkOutcome(None, uids, result.summary)


class InferenceWorker:
    """Supervises one worker process: starts it, hands it requests, replaces it when it is lost."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # spawn, not fork: the daemon has threads (scheduler, associations) and a fork of a
        # threaded process can inherit a held lock; torch also dislikes being forked.
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None
        self._stopping = False
        self._ready = False  # the process has loaded its model
        self.algorithm: AlgorithmInfo | None = None  # the model, once a worker has loaded it
        self.restarts = 0  # processes replaced after dying or hanging (read by the metrics)

    @property
    def pid(self) -> int | None:
        process = self._process  # read by the health checks while the supervisor replaces it
        return process.pid if process is not None else None

    @property
    def ready(self) -> bool:
        """A process is running with its model loaded (read from other threads: the health
        checks; a process that died is seen here before the supervisor replaces it)."""
        process = self._process
        return self._ready and process is not None and process.is_alive()

    def start(self) -> None:
        """Start the process and wait until its model is loaded."""
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_serve,
            args=(child, self.config, logging.getLogger().getEffectiveLevel()),
            name="dicom-node-worker",
            daemon=True,
        )
        process.start()
        child.close()
        self._process, self._connection = process, parent
        if not parent.poll(START_TIMEOUT_S):
            self.stop()
            raise WorkerLostError(f"worker not ready after {START_TIMEOUT_S:.0f} s")
        try:
            loaded = parent.recv()
        except EOFError:
            code = process.exitcode
            self.stop()
            raise WorkerLostError(f"worker died while loading the model (exit {code})") from None
        if isinstance(loaded, LoadFailure):
            self.stop()
            raise WorkerLostError(f"worker could not load the model: {loaded.reason}")
        self.algorithm = loaded
        self._ready = True
        log.info("worker %d ready", process.pid)

    def ensure_running(self) -> None:
        """Start a worker if none runs: the first, or one to replace a process that died
        while idle (counted as a restart). Not once the node is stopping."""
        process = self._process  # `shutdown` may clear it from another thread
        if self._stopping or (process is not None and process.is_alive()):
            return
        if process is not None:
            log.error(
                "worker %s died while idle (exit %s); restarting it", process.pid, process.exitcode
            )
            self.restarts += 1
            self.stop()
        self.start()

    def run(self, request: WorkRequest) -> WorkOutcome:
        """Process one series; WorkerLostError if the process died or timed out (it is
        restarted before the error is raised, so the next series finds a warm worker)."""
        self.ensure_running()
        if self._stopping:
            raise WorkerLostError("node stopping")
        assert self._connection is not None and self._process is not None
        timeout = self.config.worker.timeout_s
        try:
            self._connection.send(request)
            if self._connection.poll(timeout):
                return self._connection.recv()
            reason = f"timed out after {timeout:g} s (worker.timeout_s)"
        except (EOFError, OSError):
            if self._stopping:  # `shutdown` killed it: the series is re-queued at next start
                raise WorkerLostError("node stopping") from None
            self._process.join(5)
            reason = f"worker died (exit {self._process.exitcode})"
        log.error("worker %s lost: %s; restarting it", self._process.pid, reason)
        self.restarts += 1
        self.stop()
        self.start()
        raise WorkerLostError(reason)

    def shutdown(self) -> None:
        """For the daemon's stop, from another thread: a request in flight ends at once."""
        self._stopping = True
        self.stop()

    def stop(self) -> None:
        """Kill the process (a request in flight is lost: its series is re-queued at start)."""
        if self._connection is not None:
            self._connection.close()
        self._ready = False
        if self._process is not None:
            self._process.kill()
            self._process.join(10)
        self._process, self._connection = None, None
