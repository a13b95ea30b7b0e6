"""The inference worker: series files in, a SEG file (or "no findings") out.

`segment_series` is the whole volume -> segment -> SEG stage as one function; the offline
`dicom-node segment DICOM_DIR -o seg.dcm` calls it directly, the daemon through
`InferenceWorker`, which runs it in a separate process that loads the model once and keeps it
warm. The process boundary is the point: a crash, an out-of-memory kill or a hang in
assembly, decoding or inference takes down the worker, never reception. The supervisor sees
the process die (or a job overrun `worker.timeout_s`), kills and restarts it, and reports the
job as lost with the reason; the segmentation stage decides whether to retry.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from dicom_node.app.config import Config, InferenceConfig, UnsurePolicy
from dicom_node.imaging.seg import AlgorithmInfo, SegWriter
from dicom_node.imaging.volume import AssemblyError, AssemblyPolicy, assemble_volume
from dicom_node.pipeline.spool import write_durably
from model.verdict import Verdict
from model.volume_io import Volume

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Model loading takes seconds; a worker that is not ready after this is broken.
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class SeriesResult:
    """What became of a series: a SEG (dataset) or none (no bone, or failed with a reason)."""

    dataset: Dataset | None
    reason: str | None  # why it failed; None for a SEG or no findings
    summary: dict[str, Any] = field(default_factory=dict)  # segments, timings, notes
    labels: Volume | None = None  # the sided labels the SEG encodes (misplaced pieces left out)

    @property
    def no_findings(self) -> str | None:
        """Why there is no SEG of a series that did not fail."""
        return self.summary.get("no_findings")

    @property
    def failed(self) -> bool:
        return self.reason is not None


def build_segmenter(config: InferenceConfig, anatomy_check: bool = True) -> Any:
    """The cascade from the [inference] section (imported here: torch loads slowly); the CLI
    can leave the anatomy check out to score the raw output."""
    from model.inference import InferenceSettings, Segmenter
    from model.weights import DEFAULT_WEIGHTS

    settings = InferenceSettings(
        strategy=config.strategy,
        device=config.device,
        precision=config.precision,
        threads=config.threads or None,
        anatomy_check=anatomy_check,
    )
    return Segmenter(Path(config.weights) if config.weights else DEFAULT_WEIGHTS, settings)


def build_writer(config: Config, segmenter: Any) -> SegWriter:
    """The SEG writer for this model (named by its weights' hash) and the [seg] section."""
    return SegWriter(
        AlgorithmInfo.from_metadata(segmenter.metadata),
        series_number=config.seg.series_number,
        series_description=config.seg.series_description,
    )


NO_BONE = "none of the six bones found"


def segment_series(
    paths: list[Path],
    policy: AssemblyPolicy,
    segmenter: Any,
    writer: SegWriter,
    generation: int = 1,
    mark_unsure: bool = False,
) -> SeriesResult:
    """Assemble the series, segment it, write its SEG dataset (not yet to disk).

    A series that cannot be assembled fails with the assembler's reason; a volume without any
    of the six bones, or whose segmentation is implausible (`model.verdict`: bones where no
    lower extremity has them, bones no adult has, a model unsure of much of it), is "no
    findings" (no SEG), with the reason in the summary; a few misplaced bones are left out of
    the SEG. `mark_unsure`: a SEG the verdict is unsure of says UNVERIFIED and why in its
    Series Description and each segment's description.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    try:
        assembled = assemble_volume(paths, policy)
    except AssemblyError as error:
        return SeriesResult(None, f"cannot assemble: {error}")
    timings["assemble_s"] = time.perf_counter() - t
    t = time.perf_counter()
    # The segmentation comes checked for anatomical sense (`model.anatomy`): misplaced pieces
    # are already left out of it, and an implausible one gets no SEG.
    segmentation = segmenter.segment(assembled.volume)
    timings["segment_s"] = time.perf_counter() - t
    t = time.perf_counter()
    assessment, sided = segmentation.assessment, segmentation.sided
    dataset = None
    if assessment.verdict is not Verdict.IMPLAUSIBLE:
        unsure = mark_unsure and assessment.verdict is Verdict.UNSURE
        notes = assessment.segment_notes() if unsure else None
        dataset = writer.write(assembled, sided, generation, unverified=notes)
    timings["seg_encode_s"] = time.perf_counter() - t
    reported = ("segments", "dropped_as_misplaced", "implausible", "verdict")
    summary = {
        "series_instance_uid": assembled.series_instance_uid,
        "frames": len(assembled.frames),
        "notes": assembled.notes,
        "segments": segmentation.summary["segments"],
        # Pieces found where no lower extremity has them (model/anatomy.py): not in the SEG.
        "dropped_as_misplaced": segmentation.summary["dropped_as_misplaced"],
        # How far to trust it (model/verdict.py): what the node does with it follows.
        "verdict": segmentation.summary["verdict"],
        "inference": {k: v for k, v in segmentation.summary.items() if k not in reported},
        "timings_s": {
            **{k: round(v, 3) for k, v in timings.items()},
            "inference_detail": segmentation.timings,
        },
    }
    if dataset is None:
        implausible = assessment.verdict is Verdict.IMPLAUSIBLE
        summary["no_findings"] = assessment.headline() if implausible else NO_BONE
    return SeriesResult(dataset, None, summary, sided if dataset is not None else None)


def save_seg(dataset: Dataset, path: Path) -> int:
    """Write a SEG durably (see `spool.write_durably`); returns its size in bytes."""
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return write_durably(path, [buffer.getbuffer()])


# -- the worker process ------------------------------------------------------------------


@dataclass(frozen=True)
class WorkRequest:
    paths: list[str]
    generation: int
    seg_path: str  # where to write the SEG (durably) if there is one


@dataclass(frozen=True)
class WorkOutcome:
    """The worker's answer: `reason` set means failed; `seg_uids` None means no SEG."""

    reason: str | None
    seg_uids: tuple[str, str] | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def unsure(self) -> bool:
        """A SEG the verdict is unsure of (`model.verdict`)."""
        return self.summary.get("verdict", {}).get("verdict") == Verdict.UNSURE


class WorkerLostError(RuntimeError):
    """The worker process died or overran its time-out; str() is the reason."""


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when the daemon dies.

    Otherwise a daemon killed mid-inference leaves its worker running: it competes with the
    restarted node's worker for the CPU and may write the SEG file the new worker is writing.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker ends at its next request
        log.warning("worker: cannot ask to die with the daemon on this platform")
    if os.getppid() == 1:  # the daemon died before prctl took effect
        os._exit(1)


def _serve(connection: Connection, config: Config) -> None:
    """The worker process: load the model, then answer requests until the pipe closes."""
    _die_with_parent()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s worker %(name)s: %(message)s"
    )
    segmenter = build_segmenter(config.inference)
    writer = build_writer(config, segmenter)
    connection.send("ready")
    while True:
        try:
            request: WorkRequest = connection.recv()
        except EOFError:
            return
        try:
            outcome = _work(request, config, segmenter, writer)
        except Exception as error:  # the job fails with the reason; the warm worker stays
            # Library messages may quote header values (a patient's name, a birth date): the
            # reason and the default log carry the error's type only, the details go to DEBUG.
            log.error("series processing failed: %s", type(error).__name__)
            log.debug("series processing failed", exc_info=True)
            outcome = WorkOutcome(
                f"internal error: {type(error).__name__} (details: node log at debug level)"
            )
        connection.send(outcome)


def _work(request: WorkRequest, config: Config, segmenter: Any, writer: SegWriter) -> WorkOutcome:
    paths = [Path(p) for p in request.paths]
    # Held SEGs are written as they are: whoever releases one vouches for it.
    mark = config.verdict.policy == UnsurePolicy.UNVERIFIED
    result = segment_series(paths, config.series, segmenter, writer, request.generation, mark)
    if result.reason is not None:
        return WorkOutcome(result.reason)
    if result.dataset is None:
        return WorkOutcome(None, None, result.summary)
    t = time.perf_counter()
    size = save_seg(result.dataset, Path(request.seg_path))
    result.summary["timings_s"]["seg_write_s"] = round(time.perf_counter() - t, 3)
    result.summary["seg_bytes"] = size
    uids = (str(result.dataset.SeriesInstanceUID), str(result.dataset.SOPInstanceUID))
    return WorkOutcome(None, uids, result.summary)


class InferenceWorker:
    """Supervises one worker process: starts it, hands it jobs, replaces it when it is lost."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # spawn, not fork: the daemon has threads (scheduler, associations) and a fork of a
        # threaded process can inherit a held lock; torch also dislikes being forked.
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the process and wait until its model is loaded."""
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_serve, args=(child, self.config), name="dicom-node-worker", daemon=True
        )
        process.start()
        child.close()
        self._process, self._connection = process, parent
        if not parent.poll(START_TIMEOUT_S):
            self.stop()
            raise WorkerLostError(f"worker not ready after {START_TIMEOUT_S:.0f} s")
        try:
            parent.recv()
        except EOFError:
            code = process.exitcode
            self.stop()
            raise WorkerLostError(f"worker died while loading the model (exit {code})") from None
        log.info("worker %d ready", process.pid)

    def run(self, request: WorkRequest) -> WorkOutcome:
        """Process one series; WorkerLostError if the process died or timed out (it is
        restarted before the error is raised, so the next job finds a warm worker)."""
        if self._process is None or not self._process.is_alive():
            self.start()
        assert self._connection is not None and self._process is not None
        timeout = self.config.worker.timeout_s
        try:
            self._connection.send(request)
            if self._connection.poll(timeout):
                return self._connection.recv()
            reason = f"timed out after {timeout:g} s (worker.timeout_s)"
        except (EOFError, OSError):
            if self._stopping:  # `shutdown` killed it: the job is re-queued at next start
                raise WorkerLostError("node stopping") from None
            self._process.join(5)
            reason = f"worker died (exit {self._process.exitcode})"
        log.error("worker %s lost: %s; restarting it", self._process.pid, reason)
        self.stop()
        self.start()
        raise WorkerLostError(reason)

    def shutdown(self) -> None:
        """For the daemon's stop, from another thread: a job in flight ends at once."""
        self._stopping = True
        self.stop()

    def stop(self) -> None:
        """Kill the process (a job in flight is lost: its series is re-queued at start)."""
        if self._connection is not None:
            self._connection.close()
        if self._process is not None:
            self._process.kill()
            self._process.join(10)
        self._process, self._connection = None, None
