"""The segmentation stage: queued series -> the worker -> `sending`, `no_findings` or `failed`,
or `review` when `[verdict] policy = "hold"` and the node is unsure of the SEG.

One thread takes the longest-queued series from the state database (so a restart, a retry
from the CLI or a new series all arrive the same way), hands it to the `InferenceWorker`
and records the outcome. Series are segmented one at a time: inference already uses every
core, and one warm model is what keeps the node's memory bounded.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from dicom_node.app.config import Config, UnsurePolicy
from dicom_node.pipeline.observer import UNOBSERVED, PipelineObserver, Stage
from dicom_node.pipeline.results import remove_orphans, seg_file_name
from dicom_node.pipeline.spool import Spool
from dicom_node.pipeline.state import ClaimedSeries, NodeState, Target
from dicom_node.pipeline.worker import InferenceWorker, WorkerLostError, WorkOutcome, WorkRequest

log = logging.getLogger(__name__)

# How often the stage looks for queued series when nobody woke it (CLI retries, restarts),
# and so how soon an idle worker that died is replaced.
POLL_S = 2.0
# The worker's timings (`inference.segment_series`, `worker._work`) by the stage they time.
_TIMED_STAGES = {
    "assemble_s": Stage.ASSEMBLE,
    "segment_s": Stage.SEGMENT,
    "seg_encode_s": Stage.SEG,
    "seg_write_s": Stage.SEG,
    "measure_s": Stage.SEG,  # the measurements and their SR travel with the SEG
}


def resolve_targets(config: Config, calling_ae: str, calling_host: str) -> list[Target]:
    """Configured destinations as addresses; reply_to_caller ones point at the sender."""
    targets = []
    for d in config.destinations:
        if d.reply_to_caller and calling_ae:
            targets.append(Target(d.name, calling_ae, calling_host or d.host, d.port))
        else:
            targets.append(Target(d.name, d.ae_title, d.host, d.port))
    return targets


class SegmentationStage:
    """The thread that feeds queued series to the worker and records what came back."""

    def __init__(
        self,
        config: Config,
        state: NodeState,
        spool: Spool,
        results_dir: Path,
        worker: InferenceWorker,
        on_segmented: Callable[[], None],
        observer: PipelineObserver = UNOBSERVED,
    ) -> None:
        self.config = config
        self.state = state
        self.spool = spool
        self.results_dir = results_dir
        self.worker = worker
        self.on_segmented = on_segmented  # e.g. deliver now rather than at the next poll
        self.observer = observer
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="segmentation", daemon=True)

    def start(self) -> None:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def wake(self) -> None:
        """A series was queued: look now."""
        self._wake.set()

    def stop(self) -> None:
        """Stop taking work and end the series in flight (it is re-queued at the next start)."""
        self._stop.set()
        self._wake.set()
        self.worker.shutdown()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                claim = self.state.claim_next_queued()
                if claim is None:
                    # A worker killed while idle is replaced now, not by the next series:
                    # until then the node is not ready (dicom_node/web/health.py).
                    self.worker.ensure_running()
                    self._wake.wait(POLL_S)
                    self._wake.clear()
                    continue
                self.process(claim)
            except Exception:  # the stage must outlive any one series (or a database hiccup)
                log.exception("segmentation stage")
                self._stop.wait(POLL_S)

    def process(self, claim: ClaimedSeries) -> None:
        """Run one claimed series through the worker and record the outcome."""
        log.info(
            "series %d: segmenting %s (%d files, attempt %d)",
            claim.series_id,
            claim.series_instance_uid,
            len(claim.file_names),
            claim.attempt,
        )
        seg_name = seg_file_name(claim)
        request = WorkRequest(
            paths=[str(self.spool.path(name)) for name in claim.file_names],
            generation=claim.generation,
            seg_path=str(self.results_dir / seg_name),
        )
        try:
            outcome = self.worker.run(request)
        except WorkerLostError as error:
            if self._stop.is_set():
                return  # still `segmenting`: the next start re-queues it
            self._lost(claim, str(error))
        else:
            self._record(claim, seg_name, outcome)
        # What this attempt wrote and did not record (it died after writing its SEG, it was
        # superseded), and what an attempt before it left behind.
        remove_orphans(self.state, self.results_dir, claim.series_id)

    def _observe(self, timings: dict[str, float]) -> None:
        """Report the worker's timings per stage (its SEG encoding and writing as one)."""
        by_stage: dict[Stage, float] = {}
        for key, stage in _TIMED_STAGES.items():
            if isinstance(timings.get(key), int | float):
                by_stage[stage] = by_stage.get(stage, 0.0) + timings[key]
        for stage, seconds in by_stage.items():
            self.observer.stage_timed(stage, seconds)

    def _lost(self, claim: ClaimedSeries, reason: str) -> None:
        retries = self.config.worker.retries
        if claim.attempt <= retries:
            self.state.requeue(claim, f"{reason}; retry {claim.attempt} of {retries}")
        else:
            self.state.fail_claim(claim, reason)

    def _record(self, claim: ClaimedSeries, seg_name: str, outcome: WorkOutcome) -> None:
        self._observe(outcome.summary.get("timings_s", {}))
        summary = json.dumps(outcome.summary)
        if outcome.reason is not None:
            self.state.fail_claim(claim, outcome.reason)
        elif outcome.seg_uids is None:
            self.state.mark_no_findings(claim, summary, outcome.summary["no_findings"])
        elif outcome.unsure and self.config.verdict.policy == UnsurePolicy.HOLD:
            reason = outcome.summary["verdict"]["headline"]
            self.state.mark_held(claim, seg_name, outcome.seg_uids, summary, reason)
        else:
            calling_ae, calling_host = self.state.calling_peer(claim.series_id)
            targets = resolve_targets(self.config, calling_ae, calling_host)
            # Superseded while segmenting (False), its SEG is removed as an orphan.
            if self.state.mark_segmented(claim, seg_name, outcome.seg_uids, summary, targets):
                self.on_segmented()
