"""The store's work on rows inside one of its transactions: `transition`, the one code that
moves a series (by the table of `machine`), locked lookups, the generation check (`current`),
new rows, and ORM rows copied into the records that leave the store.

Every function takes the `Session` that a `NodeState` method opened; none commits.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.pipeline.state.machine import (
    TRANSITIONS,
    DeliveryState,
    IllegalTransitionError,
    SeriesState,
)
from dicom_node.pipeline.state.records import (
    ClaimedSeries,
    DeliveryRecord,
    JobRecord,
    ReceivedInstance,
    SeriesRecord,
    Target,
    TransitionRecord,
)
from dicom_node.pipeline.state.schema import (
    Claim,
    Delivery,
    DeliveryClaim,
    Instance,
    Lease,
    Series,
    Transition,
    utcnow,
)

# One logger for the whole store, named for the package, as its lines always were.
if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_R = TypeVar("_R", bound="DataclassInstance")

log = logging.getLogger(__package__)


def transition(
    session: Session, series: Series, to: SeriesState, reason: str | None = None
) -> None:
    """The only code that changes Series.state: checks the table, stamps the time, keeps the
    history (a new series starts in `receiving`, in `new_series`)."""
    from_state = SeriesState(series.state)
    if to not in TRANSITIONS[from_state]:
        raise IllegalTransitionError(f"series {series.id}: {from_state} -> {to} is not allowed")
    if to is SeriesState.RECEIVING:
        series.generation += 1
        series.attempts = 0
    now = utcnow()
    series.state, series.reason, series.state_changed_at = to, reason, now
    session.add(
        Transition(
            series_id=series.id,
            generation=series.generation,
            from_state=from_state,
            to_state=to,
            reason=reason,
            at=now,
        )
    )
    # Logged once committed (see `NodeState._session`): a write the database refuses moved
    # nothing.
    session.info.setdefault("transitions", []).append(
        f"series {series.id}: {from_state} -> {to}" + (f" ({reason})" if reason else "")
    )


def file_names(session: Session, series_id: int) -> list[str]:
    """A series' spooled files, in the order they arrived."""
    query = select(Instance.file_name).where(Instance.series_id == series_id)
    return list(session.scalars(query.order_by(Instance.id)))


def new_series(session: Session, received: ReceivedInstance, now: datetime) -> Series:
    """A series for the first instance received of it: `receiving`, generation 1."""
    series = Series(
        series_instance_uid=received.series_instance_uid,
        study_instance_uid=received.study_instance_uid,
        modality=received.modality,
        calling_ae=received.calling_ae,
        calling_host=received.calling_host,
        state=SeriesState.RECEIVING,
        first_received_at=now,
        last_received_at=now,
        state_changed_at=now,
    )
    session.add(series)
    session.flush()  # assigns series.id
    session.add(
        Transition(series_id=series.id, generation=1, to_state=SeriesState.RECEIVING, at=now)
    )
    log.info("series %d: new, from %s", series.id, received.calling_ae)
    return series


def current(session: Session, series_id: int, generation: int) -> Series | None:
    """The generation check: the series (locked) if it is still at `generation`, else None.

    Work and decisions carry the generation they were made on; once the series has reopened
    they are about data that is no longer the whole series, and are discarded."""
    series = session.get_one(Series, series_id, with_for_update=True)
    if series.generation != generation:
        log.info("series %d: generation %d superseded", series_id, generation)
        return None
    return series


def lease_until(lease_s: float | None) -> datetime | None:
    """When a lease taken or renewed now runs out (None: no lease, the one-machine node)."""
    return utcnow() + timedelta(seconds=lease_s) if lease_s is not None else None


def held_lease(lease: Lease | None, owner: str, attempt: int) -> bool:
    """The lease is `owner`'s on `attempt` (nobody took the attempt over since)."""
    return lease is not None and lease.owner == owner and lease.attempt == attempt


def lease_lapsed(lease: Lease, owner: str, now: datetime) -> bool:
    """Another owner may take the attempt over: its lease ran out, or it is `owner`'s own
    from before a restart. A lease without an end is a one-machine node's: its own restart
    makes it due again, never another owner."""
    if lease.owner == owner:
        return True
    return lease.expires_at is not None and lease.expires_at <= now


def claim(session: Session, series: Series, owner: str, lease_s: float | None) -> ClaimedSeries:
    """A queued series on to `segmenting` for `owner`: a new attempt, and its claim (with a
    lease of `lease_s` from now; None: no lease)."""
    series.attempts += 1
    reason = f"attempt {series.attempts}" + (f" on {owner}" if lease_s is not None else "")
    transition(session, series, SeriesState.SEGMENTING, reason)
    session.merge(
        Claim(
            series_id=series.id,
            attempt=series.attempts,
            owner=owner,
            expires_at=lease_until(lease_s),
        )
    )
    names = file_names(session, series.id)
    return ClaimedSeries(
        series.id, series.generation, series.attempts, series.series_instance_uid, names
    )


def held(session: Session, claimed: ClaimedSeries) -> Series | None:
    """The claim check: the series (locked) if `claimed` is still its running attempt, else
    None (the generation was superseded, or another worker took the series over)."""
    series = current(session, claimed.series_id, claimed.generation)
    if series is None:
        return None
    if series.state != SeriesState.SEGMENTING or series.attempts != claimed.attempt:
        log.info("series %d: attempt %d was taken over", series.id, claimed.attempt)
        return None
    return series


def claim_delivery(
    session: Session, delivery: Delivery, owner: str, lease_s: float | None, now: datetime
) -> None:
    """A due delivery (or one whose lease ran out) in flight for `owner`: a new attempt,
    and its claim (with a lease of `lease_s` from now; None: no lease)."""
    delivery.attempts += 1
    delivery.next_attempt_at = None
    session.merge(
        DeliveryClaim(
            delivery_id=delivery.id,
            attempt=delivery.attempts,
            owner=owner,
            expires_at=lease_until(lease_s),
            claimed_at=now,
        )
    )


def held_delivery(
    session: Session, delivery_id: int, attempt: int, owner: str
) -> tuple[Delivery, DeliveryClaim] | None:
    """The delivery check: the delivery and its claim (locked) if `owner`'s `attempt` is
    still in flight, else None (another reception node took it over)."""
    delivery = session.get_one(Delivery, delivery_id, with_for_update=True)
    lease = session.get(DeliveryClaim, delivery_id, with_for_update=True)
    in_flight = delivery.state == DeliveryState.PENDING and delivery.next_attempt_at is None
    if lease is None or not in_flight or not held_lease(lease, owner, attempt):
        log.info("series %d: delivery attempt %d was taken over", delivery.series_id, attempt)
        return None
    return delivery, lease


def start_sending(
    session: Session, series: Series, targets: list[Target], reason: str | None = None
) -> None:
    """On to `sending` with a pending delivery per target (none: straight on to `done`)."""
    transition(session, series, SeriesState.SENDING, reason)
    add_deliveries(session, series, targets)
    if not targets:
        transition(session, series, SeriesState.DONE, "no destinations configured")


def locked_in(session: Session, series_id: int, state: SeriesState, only: str) -> Series:
    """Series `series_id`, locked, which must be in `state` (else the error says `only`
    which jobs the command takes)."""
    series = session.get(Series, series_id, with_for_update=True)
    if series is None:
        raise LookupError(f"no job {series_id}")
    if series.state != state:
        raise IllegalTransitionError(f"job {series_id} is {series.state}: only {only}")
    return series


def add_deliveries(session: Session, series: Series, targets: list[Target]) -> None:
    """A pending delivery per target, due now."""
    now = utcnow()
    for target in targets:
        session.add(
            Delivery(
                series_id=series.id,
                generation=series.generation,
                destination=target.name,
                ae_title=target.ae_title,
                host=target.host,
                port=target.port,
                state=DeliveryState.PENDING,
                next_attempt_at=now,
            )
        )


def deliveries(session: Session, series: Series) -> list[Delivery]:
    """The deliveries of the series' current generation, in the order they were made."""
    return list(
        session.scalars(
            select(Delivery)
            .where(Delivery.series_id == series.id, Delivery.generation == series.generation)
            .order_by(Delivery.id)
        )
    )


def job_record(session: Session, series_id: int) -> JobRecord:
    """A series with its whole timeline and every delivery (all generations)."""
    series = session.get(Series, series_id)
    if series is None:
        raise LookupError(f"no job {series_id}")
    timeline = session.scalars(
        select(Transition).where(Transition.series_id == series_id).order_by(Transition.id)
    )
    every_delivery = session.scalars(
        select(Delivery).where(Delivery.series_id == series_id).order_by(Delivery.id)
    )
    (record,) = series_records(session, [series])
    return JobRecord(
        record,
        tuple(_transition_record(t) for t in timeline),
        tuple(_delivery_record(d) for d in every_delivery),
    )


def series_records(session: Session, series_list: list[Series]) -> list[SeriesRecord]:
    """Records of `series_list`, each with the destinations that hold its current SEG (one
    query for all of them)."""
    generations = {series.id: series.generation for series in series_list}
    delivered: dict[int, list[str]] = {series_id: [] for series_id in generations}
    delivered_rows = session.execute(
        select(Delivery.series_id, Delivery.generation, Delivery.destination)
        .where(Delivery.series_id.in_(generations), Delivery.state == DeliveryState.DELIVERED)
        .order_by(Delivery.id)
    )
    for series_id, generation, destination in delivered_rows:
        if generation == generations[series_id]:
            delivered[series_id].append(destination)
    return [_series_record(series, tuple(delivered[series.id])) for series in series_list]


def _record(cls: type[_R], row: object, **given: Any) -> _R:
    """A `cls` record of an ORM row: each field not `given` is the row's attribute of that name
    (the records name their fields after the columns)."""
    copied = {f.name: getattr(row, f.name) for f in fields(cls) if f.name not in given}
    return cls(**copied, **given)


def _series_record(series: Series, delivered_to: tuple[str, ...]) -> SeriesRecord:
    return _record(SeriesRecord, series, state=SeriesState(series.state), delivered_to=delivered_to)


def _transition_record(transition: Transition) -> TransitionRecord:
    from_state = SeriesState(transition.from_state) if transition.from_state else None
    return _record(
        TransitionRecord,
        transition,
        from_state=from_state,
        to_state=SeriesState(transition.to_state),
    )


def _delivery_record(delivery: Delivery) -> DeliveryRecord:
    return _record(DeliveryRecord, delivery, state=DeliveryState(delivery.state))
