"""The store: `NodeState`, the node's state database and every operation on it.

Everything the node knows survives a restart because it lives in this database (SQLite in WAL
mode under data_dir by default, or PostgreSQL). A C-STORE is acknowledged only after its
instance is spooled and committed here, so the node never knows less than the sender was told
(after a power cut, `Reception.recover` re-records spooled files a lost commit left out).

Each method is one transaction (`rows` holds what they do on rows inside one); those that
change nothing are in `queries` (`NodeState` inherits them). The ORM stays inside this
package: callers give and get the plain records of `records`. Series move only through
`rows.transition`, by the table of `machine`, which describes how they move.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import create_engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.pipeline.spool import SpooledFile
from dicom_node.pipeline.state import rows
from dicom_node.pipeline.state.machine import DeliveryState, IllegalTransitionError, SeriesState
from dicom_node.pipeline.state.queries import Queries
from dicom_node.pipeline.state.records import (
    ClaimAnswer,
    ClaimedSeries,
    DueDelivery,
    ReceivedInstance,
    Recorded,
    Resumed,
    Target,
)
from dicom_node.pipeline.state.schema import (
    Base,
    Claim,
    Delivery,
    DeliveryClaim,
    Instance,
    Series,
    check_schema,
    configure_sqlite,
    utcnow,
)

# One logger for the whole store, named for the package, as its lines always were.
log = logging.getLogger(__package__)


class NodeState(Queries):
    """The database and every operation on it; each method is one transaction. The reads,
    which change nothing, are inherited from `Queries`.

    `owner` names this process among those sharing the database (`[cluster] node_id`): the
    series it claims are its own, and a restart requeues its own only."""

    def __init__(self, url: str, owner: str = "") -> None:
        self.owner = owner
        if url.startswith("sqlite"):
            self.engine = create_engine(url, connect_args={"timeout": 30})
            configure_sqlite(self.engine)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        check_schema(self.engine)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session
        for transition in session.info.pop("transitions", ()):
            log.info("%s", transition)

    # Reception -------------------------------------------------------------------------

    def record_instance(self, received: ReceivedInstance, spooled: SpooledFile) -> Recorded:
        """Record a spooled instance in its series (created, or reopened if it had moved on).

        A SOP Instance UID seen before changes nothing (`duplicate`), also when two
        associations deliver it at once: the unique index decides.
        """
        # Two attempts: with PostgreSQL two associations may create the same series at once
        # (SQLite's BEGIN IMMEDIATE serialises them); the loser retries and finds it.
        for attempt in (1, 2):
            try:
                return self._record(received, spooled)
            except IntegrityError:
                duplicate = self._duplicate(received.sop_instance_uid)
                if duplicate is not None:
                    return duplicate
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _record(self, received: ReceivedInstance, spooled: SpooledFile) -> Recorded:
        now = utcnow()
        with self._session() as session:
            series = session.scalar(
                select(Series)
                .where(Series.series_instance_uid == received.series_instance_uid)
                .with_for_update()
            )
            if series is None:
                series = rows.new_series(session, received, now)
            instance = Instance(
                sop_instance_uid=received.sop_instance_uid,
                series_id=series.id,
                file_name=spooled.name,
                sop_class_uid=received.sop_class_uid,
                transfer_syntax_uid=received.transfer_syntax_uid,
                size_bytes=spooled.size_bytes,
                generation=series.generation,
                received_at=now,
            )
            session.add(instance)
            # The unique index speaks first: a duplicate raises here, before a reopen is
            # logged (and rolled back) for an instance that changes nothing.
            session.flush()
            if series.state != SeriesState.RECEIVING:
                rows.transition(session, series, SeriesState.RECEIVING)
                instance.generation = series.generation
            series.instance_count += 1
            series.last_received_at = now
            return Recorded(series.id, False, now)

    def _duplicate(self, sop_instance_uid: str) -> Recorded | None:
        with self._session() as session:
            instance = session.scalar(
                select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
            )
            if instance is None:
                return None
            series = session.get_one(Series, instance.series_id)
            return Recorded(series.id, True, series.last_received_at)

    # Completion and selection ----------------------------------------------------------

    def complete_if_idle(self, series_id: int, idle_s: float) -> datetime | None:
        """Mark a receiving series complete once `idle_s` passed since its last instance.

        Returns when it will be idle if that is still ahead (the caller waits until then),
        None when it completed now or is not receiving (nothing to wait for).
        """
        with self._session() as session:
            series = session.get(Series, series_id, with_for_update=True)
            if series is None or series.state != SeriesState.RECEIVING:
                return None
            due = series.last_received_at + timedelta(seconds=idle_s)
            if due > utcnow():
                return due
            rows.transition(session, series, SeriesState.COMPLETE)
            return None

    def _move_if_current(
        self, series_id: int, generation: int, to: SeriesState, reason: str | None = None
    ) -> bool:
        """Apply a decision made on `generation`; False (nothing done) if it was superseded."""
        with self._session() as session:
            series = rows.current(session, series_id, generation)
            if series is None:
                return False
            rows.transition(session, series, to, reason)
            return True

    def mark_skipped(self, series_id: int, generation: int, reason: str) -> bool:
        return self._move_if_current(series_id, generation, SeriesState.SKIPPED, reason)

    def enqueue(self, series_id: int, generation: int) -> bool:
        return self._move_if_current(series_id, generation, SeriesState.QUEUED)

    def mark_failed(self, series_id: int, generation: int, reason: str) -> bool:
        return self._move_if_current(series_id, generation, SeriesState.FAILED, reason)

    # Segmentation ----------------------------------------------------------------------

    def claim_next_queued(self) -> ClaimedSeries | None:
        """The longest-queued series, moved to `segmenting` for the worker (None: no work)."""
        with self._session() as session:
            series = session.scalar(
                select(Series)
                .where(Series.state == SeriesState.QUEUED)
                .order_by(Series.state_changed_at, Series.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if series is None:
                return None
            return rows.claim(session, series, self.owner, None)

    def claim_series(
        self, series_id: int, generation: int, lease_s: float, retries: int
    ) -> ClaimAnswer:
        """A cluster worker's claim on one series (a broker delivered its job), under a lease
        of `lease_s`. Only a `queued` series of that generation is claimed; a `segmenting` one
        whose owner's lease ran out (or that this owner held before a restart) is taken over,
        or fails once `retries` are spent; one whose lease runs is left to its owner (the
        answer says how long it runs); anything else was done or superseded. So a job the
        broker delivers twice is claimed once."""
        with self._session() as session:
            series = session.get(Series, series_id, with_for_update=True)
            if series is None or series.generation != generation:
                return ClaimAnswer(None)
            if series.state == SeriesState.SEGMENTING:
                lease = session.get(Claim, series_id)
                now = utcnow()
                if lease is not None and not rows.lease_lapsed(lease, self.owner, now):
                    if lease.expires_at is None:  # a one-machine node's: it requeues it
                        return ClaimAnswer(None, lease_s)
                    return ClaimAnswer(None, (lease.expires_at - now).total_seconds())
                lost = f"{lease.owner if lease else 'its worker'} lost attempt {series.attempts}"
                if series.attempts > retries:
                    rows.transition(session, series, SeriesState.FAILED, lost)
                    return ClaimAnswer(None)
                rows.transition(session, series, SeriesState.QUEUED, f"{lost}; retrying")
            if series.state != SeriesState.QUEUED:
                return ClaimAnswer(None)
            return ClaimAnswer(rows.claim(session, series, self.owner, lease_s))

    def renew(self, attempt: ClaimedSeries | DueDelivery, lease_s: float) -> bool:
        """Extend this owner's lease on `attempt` (a series' segmentation or a delivery's
        send) to `lease_s` from now; False if it is no longer this owner's running attempt
        (taken over or superseded)."""
        with self._session() as session:
            lease: Claim | DeliveryClaim | None
            if isinstance(attempt, DueDelivery):
                held = rows.held_delivery(session, attempt.delivery_id, attempt.attempt, self.owner)
                lease = held[1] if held is not None else None
            else:
                lease = session.get(Claim, attempt.series_id, with_for_update=True)
                if not rows.held_lease(lease, self.owner, attempt.attempt):
                    return False
                if rows.held(session, attempt) is None:
                    return False
            if lease is None:
                return False
            lease.expires_at = rows.lease_until(lease_s)
            return True

    def requeue(self, claim: ClaimedSeries, reason: str) -> bool:
        """A worker crash or hang interrupted `claim`: queue it again (the caller checks
        retries)."""
        return self._end_held(claim, SeriesState.QUEUED, reason)

    def fail_claim(self, claim: ClaimedSeries, reason: str) -> bool:
        """The attempt `claim` failed for good: `failed`, with the reason."""
        return self._end_held(claim, SeriesState.FAILED, reason)

    def _end_held(self, claim: ClaimedSeries, to: SeriesState, reason: str) -> bool:
        """Move the series of `claim` to `to`, if the attempt still holds it."""
        with self._session() as session:
            series = rows.held(session, claim)
            if series is None:
                return False
            rows.transition(session, series, to, reason)
            return True

    def mark_no_findings(self, claim: ClaimedSeries, result: str, reason: str) -> bool:
        with self._session() as session:
            series = rows.held(session, claim)
            if series is None:
                return False
            series.result = result
            rows.transition(session, series, SeriesState.NO_FINDINGS, reason)
            return True

    def mark_segmented(
        self,
        claim: ClaimedSeries,
        seg_file: str,
        seg_uids: tuple[str, str],
        result: str,
        targets: list[Target],
    ) -> bool:
        """The SEG is on disk: `sending`, with a pending delivery per target (none: `done`)."""
        with self._session() as session:
            series = self._with_seg(session, claim, seg_file, seg_uids, result)
            if series is None:
                return False
            rows.start_sending(session, series, targets)
            return True

    def mark_held(
        self,
        claim: ClaimedSeries,
        seg_file: str,
        seg_uids: tuple[str, str],
        result: str,
        reason: str,
    ) -> bool:
        """The SEG is on disk but unsure, and the policy holds it: `review`, with the reason."""
        with self._session() as session:
            series = self._with_seg(session, claim, seg_file, seg_uids, result)
            if series is None:
                return False
            rows.transition(session, series, SeriesState.REVIEW, reason)
            return True

    def _with_seg(
        self,
        session: Session,
        claim: ClaimedSeries,
        seg_file: str,
        seg_uids: tuple[str, str],
        result: str,
    ) -> Series | None:
        """The claimed series with its SEG recorded, or None if the claim was superseded."""
        series = rows.held(session, claim)
        if series is not None:
            series.seg_file = seg_file
            series.seg_series_instance_uid, series.seg_sop_instance_uid = seg_uids
            series.result = result
        return series

    def release(self, series_id: int, targets: list[Target]) -> SeriesState:
        """`dicom-node release`: a held SEG goes out to `targets` as it is. Returns the state
        it moved to (`sending`, or `done` without destinations)."""
        with self._session() as session:
            series = rows.locked_in(
                session, series_id, SeriesState.REVIEW, "jobs in review are released"
            )
            rows.start_sending(session, series, targets, "released after review")
            return SeriesState(series.state)

    def reject(self, series_id: int) -> SeriesState:
        """`dicom-node reject`: a held SEG is never sent; the series ends `rejected`."""
        with self._session() as session:
            series = rows.locked_in(
                session, series_id, SeriesState.REVIEW, "jobs in review are rejected"
            )
            rows.transition(session, series, SeriesState.REJECTED, "rejected after review")
            return SeriesState.REJECTED

    # Delivery --------------------------------------------------------------------------

    def claim_due_deliveries(
        self, limit: int = 8, lease_s: float | None = None
    ) -> list[DueDelivery]:
        """Pending deliveries whose time has come, marked in flight (next_attempt_at None) by
        this owner, under a lease of `lease_s` (a cluster's reception node; None: no lease).
        An attempt in flight whose lease ran out (its reception node died or hangs) is taken
        over as the next attempt."""
        now = utcnow()
        lapsed = Delivery.next_attempt_at.is_(None) & (DeliveryClaim.expires_at <= now)
        with self._session() as session:
            claimed = session.execute(
                select(Delivery, Series)
                .join(Series, Series.id == Delivery.series_id)
                .outerjoin(DeliveryClaim, DeliveryClaim.delivery_id == Delivery.id)
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    (Delivery.next_attempt_at <= now) | lapsed,
                    Series.state == SeriesState.SENDING,
                    Series.generation == Delivery.generation,
                )
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(limit)
                .with_for_update(skip_locked=True, of=(Delivery, Series))
            ).all()
            due = []
            for delivery, series in claimed:
                if delivery.next_attempt_at is None:
                    log.warning(
                        "series %d: the lease of delivery attempt %d to %s ran out; taking it over",
                        series.id,
                        delivery.attempts,
                        delivery.destination,
                    )
                rows.claim_delivery(session, delivery, self.owner, lease_s, now)
                target = Target(
                    delivery.destination, delivery.ae_title, delivery.host, delivery.port
                )
                due.append(
                    DueDelivery(
                        delivery.id,
                        series.id,
                        delivery.generation,
                        delivery.attempts,
                        target,
                        str(series.seg_file),
                    )
                )
            return due

    def record_delivery(
        self, due: DueDelivery, error: str | None, retry_at: datetime | None
    ) -> SeriesState | None:
        """The outcome of one attempt: delivered (error None), retry at `retry_at`, or given
        up (retry_at None); nothing if another reception node took the attempt over (its
        lease ran out). Settles the series once no delivery is pending; returns its new
        state then, else None."""
        with self._session() as session:
            held = rows.held_delivery(session, due.delivery_id, due.attempt, self.owner)
            if held is None:
                return None
            delivery = held[0]
            now = utcnow()
            if error is None:
                delivery.state, delivery.delivered_at, delivery.last_error = (
                    DeliveryState.DELIVERED,
                    now,
                    None,
                )
                log.info("series %d: delivered to %s", due.series_id, delivery.destination)
            else:
                delivery.last_error = error
                if retry_at is None:
                    delivery.state = DeliveryState.FAILED
                else:
                    delivery.next_attempt_at = retry_at
                log.warning(
                    "series %d: delivery %d to %s failed: %s%s",
                    due.series_id,
                    due.attempt,
                    delivery.destination,
                    error,
                    " (giving up)" if retry_at is None else f" (next at {retry_at:%H:%M:%S})",
                )
            series = rows.current(session, due.series_id, due.generation)
            if series is None or series.state != SeriesState.SENDING:
                return None
            deliveries = rows.deliveries(session, series)
            if any(d.state == DeliveryState.PENDING for d in deliveries):
                return None
            failed = [d for d in deliveries if d.state == DeliveryState.FAILED]
            if not failed:
                rows.transition(session, series, SeriesState.DONE)
                return SeriesState.DONE
            reason = "; ".join(
                f"delivery to {d.destination} failed after {d.attempts} attempts: {d.last_error}"
                for d in failed
            )
            rows.transition(session, series, SeriesState.FAILED, reason)
            return SeriesState.FAILED

    def retry(self, series_id: int) -> SeriesState:
        """`dicom-node retry`: a failed series is delivered again if its SEG is on disk and
        only delivery failed, else segmented again. Returns the state it moved to."""
        with self._session() as session:
            series = rows.locked_in(
                session, series_id, SeriesState.FAILED, "failed jobs are retried"
            )
            if series.purged_at is not None:
                raise IllegalTransitionError(
                    f"job {series_id}: its files were purged ([retention] failed_after_h); "
                    "send the series again"
                )
            failed = [
                d for d in rows.deliveries(session, series) if d.state == DeliveryState.FAILED
            ]
            if series.seg_file and failed:
                for delivery in failed:
                    delivery.state, delivery.attempts = DeliveryState.PENDING, 0
                    delivery.next_attempt_at = utcnow()
                rows.transition(session, series, SeriesState.SENDING, "retry requested")
                return SeriesState.SENDING
            series.attempts = 0
            rows.transition(session, series, SeriesState.QUEUED, "retry requested")
            return SeriesState.QUEUED

    # Retention -------------------------------------------------------------------------

    def mark_purged(self, series_id: int) -> None:
        """Files deleted: forget the instances too, so that a resend is received anew (it
        reopens the series) instead of being taken for a duplicate of a deleted file."""
        with self._session() as session:
            series = session.get_one(Series, series_id, with_for_update=True)
            for instance in session.scalars(
                select(Instance).where(Instance.series_id == series_id)
            ):
                session.delete(instance)
            series.purged_at, series.seg_file = utcnow(), None
            log.info("series %d: files purged (retention)", series_id)

    # Restart ---------------------------------------------------------------------------

    def requeue_own(self) -> list[int]:
        """After a restart: re-queue the segmentation this owner had claimed (and series
        claimed before claims were recorded); never another owner's. Returns their ids."""
        with self._session() as session:
            segmenting = (
                select(Series)
                .outerjoin(Claim, Claim.series_id == Series.id)
                .where(Series.state == SeriesState.SEGMENTING)
                .where((Claim.owner == self.owner) | Claim.owner.is_(None))
                .with_for_update(of=Series)
            )
            requeued = list(session.scalars(segmenting))
            reason = f"{self.owner or 'node'} restarted"
            for series in requeued:
                rows.transition(session, series, SeriesState.QUEUED, reason)
            return [series.id for series in requeued]

    def resume(self) -> Resumed:
        """After a restart: re-queue this owner's interrupted segmentation, make its
        deliveries that were in flight due again, and say which series need their idle timer
        or selection again."""
        self.requeue_own()
        with self._session() as session:
            in_flight = (
                select(Delivery)
                .outerjoin(DeliveryClaim, DeliveryClaim.delivery_id == Delivery.id)
                .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at.is_(None))
                .where((DeliveryClaim.owner == self.owner) | DeliveryClaim.owner.is_(None))
            )
            for delivery in session.scalars(in_flight):
                delivery.next_attempt_at = utcnow()
            states = session.execute(select(Series.id, Series.state))
            receiving: list[int] = []
            complete: list[int] = []
            requeued: list[int] = []
            for series_id, state in states:
                if state == SeriesState.RECEIVING:
                    receiving.append(series_id)
                elif state == SeriesState.COMPLETE:
                    complete.append(series_id)
                elif state == SeriesState.QUEUED:
                    requeued.append(series_id)
            return Resumed(receiving, complete, requeued)
