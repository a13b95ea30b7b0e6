"""The results folder: a SEG (and the files beside it: its SR, ...) per segmentation attempt,
and the removal of the files no attempt will record or send.

Each attempt writes under a name of its own, `<series>-<generation>-<attempt>.dcm`
(`seg_file_name`), so that an attempt that lost its claim never overwrites the one that took
over. An attempt can end without recording its SEG: its process crashed after writing it, its
worker was killed, its claim was taken over, its series reopened. Such files are orphans;
`remove_orphans` deletes them, asking the store (`NodeState.results_in_use`) which files are
still needed: the SEG each series records, and every file of an attempt that still runs
(it may be writing it now, on this machine or another). It runs once an attempt's outcome is
recorded (for its series) and at each start-up (the whole folder).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from dicom_node.pipeline.spool import PARTIAL_SUFFIX
from dicom_node.pipeline.state import ClaimedSeries, NodeState

log = logging.getLogger(__name__)

# A file of an attempt: its SEG `<stem>.dcm`, what goes beside it (`<stem>_sr.dcm`, a key
# image `<stem>_key.png`, ...), or any of them cut short mid-write.
_RESULT_NAME = re.compile(rf"(\d+)-(\d+)-(\d+)(?:_[a-z]+)?\.[a-z]+(?:{re.escape(PARTIAL_SUFFIX)})?")


def seg_file_name(claim: ClaimedSeries) -> str:
    """The SEG's file name under results/: chosen by the node, one per attempt. An attempt
    that lost its claim (a cluster worker whose lease ran out while it still worked) then
    writes, and discards, a file of its own, never the one of the attempt that took over."""
    return _seg_name(claim.series_id, claim.generation, claim.attempt)


def _seg_name(series_id: int, generation: int, attempt: int) -> str:
    return f"{series_id}-{generation}-{attempt}.dcm"


def remove_orphans(state: NodeState, results_dir: Path, series_id: int | None = None) -> int:
    """Delete the files of attempts that will never be recorded or sent: of `series_id`, or of
    every series (None). Returns how many files were deleted."""
    pattern = f"{series_id}-*" if series_id is not None else "*"
    attempts: dict[Path, tuple[int, int, int]] = {}
    for path in results_dir.glob(pattern):  # listed before the store is asked (see there)
        if (match := _RESULT_NAME.fullmatch(path.name)) is not None:
            series, generation, attempt = (int(n) for n in match.group(1, 2, 3))
            attempts[path] = (series, generation, attempt)
    if not attempts:
        return 0
    in_use = state.results_in_use({series for series, _, _ in attempts.values()})
    removed = []
    for path, (series, generation, attempt) in attempts.items():
        needed = in_use.get(series)
        if needed is not None and (
            needed.seg_file == _seg_name(series, generation, attempt)
            or needed.running == (generation, attempt)
        ):
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError as error:  # housekeeping: the next sweep tries again
            log.warning("cannot remove %s: %s", path.name, error.strerror or error)
            continue
        removed.append(path.name)
    if removed:
        log.info("removed the files of attempts that ended unrecorded: %s", ", ".join(removed))
    return len(removed)
