"""The series state machine: the states and every legal move, in plain Python (no database).

A series moves through these states; `TRANSITIONS` lists every legal move and
`rows.transition` (the only code that writes `Series.state`) refuses anything else:

    receiving -> complete -> queued -> segmenting -> sending -> done
                         \\-> skipped (reason)       \\-> no_findings, failed (reason)
                                                    \\-> review -> sending (`dicom-node release`)
                                                              \\-> rejected (`dicom-node reject`)
    failed -> queued or sending (`dicom-node retry`)

- `receiving`: instances arrive; the series completes after `series.complete_after_s` idle.
- `complete`: nothing arrived for that long; selection (`volume.select_series`) runs next.
- `skipped`: not something the node segments (scout, secondary capture, ...), with a reason.
- `queued`, `segmenting`, `sending`, `done`, `no_findings`, `failed`: the processing stages.
- `review`: the SEG is on disk, but the node is unsure of it and `[verdict] policy = "hold"`:
  it waits for a person, who sends it (`release`: on to `sending`) or not (`reject`:
  `rejected`, final). A restart leaves it waiting; retention does not touch it.
  After a restart a series found `segmenting` goes back to `queued`; one found `sending`
  carries on sending its SEG (already on disk). A worker crash or hang sends the series back
  to `queued` while it has retries left (`worker.retries`), else to `failed`.
- Delivery: entering `sending` creates one `Delivery` per destination; each is attempted
  until the peer answers success or `delivery.max_attempts` is spent, waiting with
  exponential backoff in between. The series is `done` once every destination has it,
  `failed` (with every destination's last error) once none is pending and one gave up.
- Any state but `receiving` reopens to `receiving` when an instance of the series arrives
  later. The series' `generation` then goes up by one: whatever a previous generation
  produced is superseded (the next SEG gets a new SeriesInstanceUID), and results of work
  started on an older generation are discarded rather than applied (see the store's
  generation check, `rows.current`).
"""

from __future__ import annotations

from enum import StrEnum


class SeriesState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    SKIPPED = "skipped"
    QUEUED = "queued"
    SEGMENTING = "segmenting"
    SENDING = "sending"
    DONE = "done"
    NO_FINDINGS = "no_findings"
    FAILED = "failed"
    REVIEW = "review"
    REJECTED = "rejected"


_S = SeriesState
_FORWARD: dict[SeriesState, frozenset[SeriesState]] = {
    _S.RECEIVING: frozenset({_S.COMPLETE}),
    # failed: the spooled headers could not be read at all.
    _S.COMPLETE: frozenset({_S.SKIPPED, _S.QUEUED, _S.FAILED}),
    _S.QUEUED: frozenset({_S.SEGMENTING}),
    # queued again: a restart or a worker crash interrupted the work; review: an unsure SEG held.
    _S.SEGMENTING: frozenset({_S.SENDING, _S.NO_FINDINGS, _S.FAILED, _S.QUEUED, _S.REVIEW}),
    # done without any delivery: no destinations configured.
    _S.SENDING: frozenset({_S.DONE, _S.FAILED}),
    _S.SKIPPED: frozenset(),
    _S.DONE: frozenset(),
    _S.NO_FINDINGS: frozenset(),
    # `dicom-node release` sends the held SEG, `dicom-node reject` ends it unsent.
    _S.REVIEW: frozenset({_S.SENDING, _S.REJECTED}),
    _S.REJECTED: frozenset(),
    # `dicom-node retry`: segment again, or only deliver again when the SEG is on disk.
    _S.FAILED: frozenset({_S.QUEUED, _S.SENDING}),
}
# Every legal move: the forward ones, plus reopening to receiving from anywhere else.
TRANSITIONS: dict[SeriesState, frozenset[SeriesState]] = {
    state: targets | ({_S.RECEIVING} if state is not _S.RECEIVING else frozenset())
    for state, targets in _FORWARD.items()
}
# Final states: the work on this generation is over (retention may purge their files).
FINAL_STATES = (_S.DONE, _S.NO_FINDINGS, _S.SKIPPED, _S.FAILED, _S.REJECTED)


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # gave up after delivery.max_attempts


class IllegalTransitionError(RuntimeError):
    """A state change the table does not allow: a bug in the caller, never silently ignored."""
