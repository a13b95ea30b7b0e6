"""Retention: received instances and results are deleted a while after the work is over.

A series that is `done`, `no_findings`, `rejected` or `skipped` keeps its files for
`retention.delete_after_h` hours (time to look at a result, or to resend it by hand), then
its spooled instances and its SEG are deleted and the series is marked purged; its history
stays in the database. A `failed` series keeps them for `retention.failed_after_h` (longer by
default: time for `dicom-node retry`; 0 keeps them until an operator deals with it); once
purged it cannot be retried, only sent again. A scheduled task (an apscheduler interval
trigger) runs the check.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from apscheduler.schedulers.base import BaseScheduler

from dicom_node.app.config import RetentionConfig
from dicom_node.pipeline.inference import result_files
from dicom_node.pipeline.spool import Spool
from dicom_node.pipeline.state import NodeState, utcnow

log = logging.getLogger(__name__)


def purge_expired(
    state: NodeState, spool: Spool, results_dir: Path, config: RetentionConfig
) -> int:
    """Delete the files of series final for longer than their retention time (failed ones:
    `failed_after_h`); returns how many series were purged (0 when retention is off)."""
    now = utcnow()
    older_than, failed_older_than = (
        now - timedelta(hours=hours) if hours > 0 else None
        for hours in (config.delete_after_h, config.failed_after_h)
    )
    purged = 0
    for series_id, file_names, seg_file in state.purgeable(older_than, failed_older_than):
        for name in file_names:
            spool.discard(name)
        if seg_file:
            for path in result_files(results_dir / seg_file):  # SEG, SR, key image
                path.unlink(missing_ok=True)
        state.mark_purged(series_id)
        purged += 1
    if purged:
        log.info("retention: purged the files of %d series", purged)
    return purged


def schedule_retention(
    scheduler: BaseScheduler,
    state: NodeState,
    spool: Spool,
    results_dir: Path,
    config: RetentionConfig,
) -> None:
    """The retention check as a scheduled task: now, then every `retention.check_every_s`."""
    scheduler.add_job(
        purge_expired,
        "interval",
        seconds=config.check_every_s,
        args=[state, spool, results_dir, config],
        id="retention",
        max_instances=1,
        coalesce=True,
        replace_existing=True,
        next_run_time=utcnow(),
    )
