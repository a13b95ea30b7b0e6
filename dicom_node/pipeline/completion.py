"""Series completion: when has a series arrived in full, and does it qualify for segmentation.

DICOM has no "end of series" message: a scanner or PACS sends instances, possibly over several
associations, and stops. A series is therefore complete once `series.complete_after_s` passed
without a new instance. One idle timer (an apscheduler date trigger) per receiving series fires
at that deadline; it re-reads the last arrival time from the state database, so a timer that
fires early (more instances came) simply waits again. A restart gives every series still
receiving a whole idle window from the restart: its senders could not send while the node was
down, and resend when it is back. Resumed at its old deadline, a series cut off by a crash
completed at once, was segmented in part, and the resent rest reopened it: two SEGs at the
PACS, one of them of a partial series (seen in the crash benchmark, `bench/crash.py`).

On completion the spooled headers go through `volume.select_series`: the series is `skipped`
with the reason (scout, secondary capture, too few slices, ...) or `queued` for segmentation.

Instances arriving after completion reopen the series (back to `receiving`, a new idle window,
`generation` + 1; see `dicom_node.pipeline.state`). The earlier result is superseded: the next
segmentation covers the whole series and its SEG gets a new SeriesInstanceUID. A selection
made on an older generation is discarded rather than applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.app.config import SeriesConfig
from dicom_node.imaging.volume.assemble import select_series
from dicom_node.imaging.volume.headers import read_headers
from dicom_node.pipeline.observer import UNOBSERVED, PipelineObserver, Stage
from dicom_node.pipeline.spool import Spool
from dicom_node.pipeline.state import NodeState, Recorded, utcnow

log = logging.getLogger(__name__)


class SeriesCompletion:
    """Idle timers on receiving series, and selection when one completes."""

    def __init__(
        self,
        state: NodeState,
        spool: Spool,
        config: SeriesConfig,
        scheduler: BaseScheduler,
        on_queued: Callable[[], None],
        observer: PipelineObserver = UNOBSERVED,
    ) -> None:
        self.state = state
        self.spool = spool
        self.config = config
        self.scheduler = scheduler
        self.on_queued = on_queued  # wake the segmentation stage
        self.observer = observer

    def received(self, recorded: Recorded) -> None:
        """An instance was recorded: make sure its series has an idle timer.

        One timer per series, not one per instance: the timer checks the last arrival when it
        fires and waits again if needed, so a 1000-slice series costs a few timer firings.
        """
        self._arm(recorded.series_id, recorded.last_received_at)

    def sweep(self) -> None:
        """Give an idle timer to each receiving series that has none: those whose instances
        only another process recorded (the node's other receiving processes, `[node]
        receive_processes`). Whichever process recorded the instances, the timer decides from
        the database (`complete_if_idle` re-reads the last arrival), as the timers of a
        cluster's reception nodes do for a series that each received part of."""
        for series_id, last_received in self.state.receiving_series().items():
            self._arm(series_id, last_received)

    def _arm(self, series_id: int, last_received: datetime) -> None:
        if self.scheduler.get_job(_timer_id(series_id)) is None:
            self._schedule(series_id, self._deadline(last_received))

    def resume(self) -> None:
        """After a (re)start: requeue interrupted work, restart idle timers, redo selections
        that a stop interrupted."""
        resumed = self.state.resume()
        for series_id in resumed.receiving:
            self._schedule(series_id, self._deadline(utcnow()))
        for series_id in resumed.complete:
            self._schedule(series_id, utcnow())
        log.info(
            "resumed: %d series receiving, %d to select, %d queued",
            len(resumed.receiving),
            len(resumed.complete),
            len(resumed.requeued),
        )

    def _deadline(self, last_received: datetime) -> datetime:
        return last_received + timedelta(seconds=self.config.complete_after_s)

    def _schedule(self, series_id: int, at: datetime) -> None:
        self.scheduler.add_job(
            self._on_idle,
            "date",
            run_date=at,
            args=[series_id],
            id=_timer_id(series_id),
            replace_existing=True,
            misfire_grace_time=None,  # late is fine (a busy or restarted node): never drop it
        )

    def _on_idle(self, series_id: int) -> None:
        try:
            due = self.state.complete_if_idle(series_id, self.config.complete_after_s)
            if due is not None:
                self._schedule(series_id, due)
                return
            self.select(series_id)
        except (OSError, SQLAlchemyError) as error:
            # A full disk or a locked database fails the write; the series is still in the
            # database as it was, so its timer is armed again instead of dying with the task
            # (the series would stay `receiving` until the next restart).
            retry_at = self._deadline(utcnow())
            log.error(
                "series %d: completion could not be recorded (%s); trying again at %s",
                series_id,
                type(error).__name__,
                retry_at.isoformat(timespec="seconds"),
            )
            self._schedule(series_id, retry_at)

    def select(self, series_id: int) -> None:
        """Decide on a complete series: skipped with a reason, or queued."""
        files = self.state.complete_series_files(series_id)
        if files is None:  # reopened, or already decided
            return
        self.observer.stage_timed(Stage.RECEIVE, files.receiving_s)
        paths = [self.spool.path(name) for name in files.file_names]
        try:
            reason = select_series(read_headers(paths), self.config)
        except Exception as error:  # a timer must not die silently: the series would stay put
            log.exception("series %d: selection failed", series_id)
            self.state.mark_failed(series_id, files.generation, f"selection failed: {error}")
            return
        if reason is None:
            if self.state.enqueue(series_id, files.generation):
                self.on_queued()
        else:
            self.state.mark_skipped(series_id, files.generation, reason)


def _timer_id(series_id: int) -> str:
    return f"series-complete-{series_id}"
