"""What reception and the stages report as they work, for the node's metrics.

`PipelineObserver` is the one interface they call; `dicom_node.web.metrics` implements it with
Prometheus counters and histograms, and `UNOBSERVED` (the default) ignores everything, for the
offline command line and for tests that build a stage alone. The pipeline never imports the
metrics: it only knows this protocol.

The calls run on reception's and the stages' own threads, so they must stay cheap: a counter
incremented or a histogram observed, never I/O. What can be read when scraped (series by
state, free space, the worker's restarts) is read then instead, and reported nowhere here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class Stage(StrEnum):
    """The stages a series goes through, as their durations are reported."""

    RECEIVE = "receive"  # first to last instance of the series, observed when it completes
    ASSEMBLE = "assemble"  # the volume from the spooled files (in the worker)
    SEGMENT = "segment"  # inference and post-processing (in the worker)
    SEG = "seg"  # encoding the SEG and writing it durably (in the worker)
    SEND = "send"  # one delivery attempt to one destination


class PipelineObserver(Protocol):
    def instance_answered(self, status: int, size_bytes: int) -> None:
        """A C-STORE was answered `status`, having stored `size_bytes` of dataset anew (0 when
        refused, or a duplicate of an instance already stored)."""

    def stage_timed(self, stage: Stage, seconds: float) -> None:
        """A series (or, for SEND, one delivery attempt) spent `seconds` in `stage`."""

    def delivery_attempted(self, destination: str, failed: bool) -> None:
        """One attempt to deliver a SEG to the `[[destinations]]` entry named `destination`."""


class _Unobserved:
    """Reports go nowhere."""

    def instance_answered(self, status: int, size_bytes: int) -> None:
        pass

    def stage_timed(self, stage: Stage, seconds: float) -> None:
        pass

    def delivery_attempted(self, destination: str, failed: bool) -> None:
        pass


UNOBSERVED: PipelineObserver = _Unobserved()
