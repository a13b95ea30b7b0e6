"""The node's state: received series and instances, and the one place that moves a series on.

- `machine`: the series states and every legal move (plain Python, no database);
- `records`: the plain frozen dataclasses that the store takes and hands out;
- `schema`: the database tables (SQLAlchemy ORM), the UTC time type, SQLite's settings;
- `store`: `NodeState`, the database and every operation on it, each one transaction;
- `queries`: the operations of `NodeState` that only read (`Queries`, which it inherits);
- `rows`: what those operations do on rows inside a transaction: `transition` (the one code
  that moves a series), the generation check, ORM rows copied into records.

Callers import from here; the ORM classes stay inside the package. `NodeState` and `utcnow`
load on first use: SQLAlchemy takes most of a second to import, and the command line reads
the states (for `dicom-node jobs --state`) when it builds its parser, `--help` included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dicom_node.pipeline.state.machine import (
    FINAL_STATES,
    TRANSITIONS,
    DeliveryState,
    IllegalTransitionError,
    SeriesState,
)
from dicom_node.pipeline.state.records import (
    ClaimAnswer,
    ClaimedSeries,
    DeliveryRecord,
    DueDelivery,
    JobRecord,
    ReceivedInstance,
    Recorded,
    ResultsInUse,
    Resumed,
    SeriesFiles,
    SeriesRecord,
    Target,
    TransitionRecord,
)

if TYPE_CHECKING:
    from dicom_node.pipeline.state.schema import utcnow
    from dicom_node.pipeline.state.store import NodeState


def __getattr__(name: str) -> Any:
    """`NodeState` and `utcnow`, imported (with SQLAlchemy) when first asked for."""
    if name == "NodeState":
        from dicom_node.pipeline.state.store import NodeState

        return NodeState
    if name == "utcnow":
        from dicom_node.pipeline.state.schema import utcnow

        return utcnow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FINAL_STATES",
    "TRANSITIONS",
    "ClaimAnswer",
    "ClaimedSeries",
    "DeliveryRecord",
    "DeliveryState",
    "DueDelivery",
    "IllegalTransitionError",
    "JobRecord",
    "NodeState",
    "ReceivedInstance",
    "Recorded",
    "ResultsInUse",
    "Resumed",
    "SeriesFiles",
    "SeriesRecord",
    "SeriesState",
    "Target",
    "TransitionRecord",
    "utcnow",
]
