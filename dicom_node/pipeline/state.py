"""The node's state: received series and instances, and the one place that moves a series on.

Everything the node knows survives a restart because it lives in this database (SQLite in WAL
mode under data_dir by default, or PostgreSQL). A C-STORE is acknowledged only after its
instance is spooled and committed here, so the node never knows less than the sender was told
(after a power cut, `Reception.recover` re-records spooled files a lost commit left out).

A series moves through these states; `TRANSITIONS` lists every legal move and `_transition`
(the only code that writes `Series.state`) refuses anything else:

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
  started on an older generation are discarded rather than applied (see `enqueue`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from dicom_node.pipeline.spool import SpooledFile

log = logging.getLogger(__name__)


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


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # SQLite gives back the naive UTC stored above; PostgreSQL gives the session's
        # TimeZone (the server's by default: often local), the same instant in another zone.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    calling_ae: Mapped[str] = mapped_column(String(16))  # of the first instance
    calling_host: Mapped[str] = mapped_column(String(255), default="")  # its IP address
    instance_count: Mapped[int] = mapped_column(default=0)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)  # why skipped, failed, held, ...
    generation: Mapped[int] = mapped_column(default=1)  # +1 each time the series reopens
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Processing of the current generation:
    attempts: Mapped[int] = mapped_column(default=0)  # worker runs started
    seg_file: Mapped[str | None] = mapped_column(String(128))  # under data_dir/results
    seg_series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    seg_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    result: Mapped[str | None] = mapped_column(Text)  # JSON: segments, volumes, timings
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # files deleted


class Delivery(Base):
    """One SEG to one destination: attempts, the last error, when to try next."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int]
    destination: Mapped[str] = mapped_column(String(32))  # its name in config.toml
    ae_title: Mapped[str] = mapped_column(String(16))  # resolved (reply_to_caller)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int]
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    # None while an attempt is in flight (a restart makes it due again).
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    file_name: Mapped[str] = mapped_column(String(64))  # in the spool; named by the node
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int]
    generation: Mapped[int]  # the series generation it arrived in
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Transition(Base):
    """Every state change, with its time: the series' timeline for status and audits."""

    __tablename__ = "transitions"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int]
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class ReceivedInstance:
    """What reception files an instance by: UIDs, modality and sender, no identifiers."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    calling_ae: str
    calling_host: str = ""  # unknown for files recovered from the spool


@dataclass(frozen=True)
class Recorded:
    """The outcome of recording an instance, for the series' idle timer."""

    series_id: int
    duplicate: bool  # the SOP Instance UID was already recorded: nothing changed
    last_received_at: datetime


@dataclass(frozen=True)
class SeriesFiles:
    """A complete series ready for selection: its generation and spooled file names."""

    series_id: int
    generation: int
    file_names: list[str]


@dataclass(frozen=True)
class Job:
    """A queued series claimed for the worker."""

    series_id: int
    generation: int
    attempt: int  # 1 for the first run of this generation
    series_instance_uid: str
    file_names: list[str]


@dataclass(frozen=True)
class Target:
    """Where a SEG goes: a configured destination, resolved for this series."""

    name: str
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class DeliveryJob:
    """A due delivery, claimed (in flight) until its outcome is recorded."""

    delivery_id: int
    series_id: int
    generation: int
    attempt: int
    target: Target
    seg_file: str


@dataclass(frozen=True)
class Resumed:
    """What a restart found: idle timers to restart and selections to redo."""

    receiving: list[int]
    complete: list[int]
    requeued: list[int]


def _transition(
    session: Session, series: Series, to: SeriesState, reason: str | None = None
) -> None:
    """The only code that changes Series.state: checks the table, stamps the time, keeps the
    history (a new series starts in `receiving`, in `_new_series`)."""
    current = SeriesState(series.state)
    if to not in TRANSITIONS[current]:
        raise IllegalTransitionError(f"series {series.id}: {current} -> {to} is not allowed")
    if to is SeriesState.RECEIVING:
        series.generation += 1
        series.attempts = 0
    now = utcnow()
    series.state, series.reason, series.state_changed_at = to, reason, now
    session.add(
        Transition(
            series_id=series.id,
            generation=series.generation,
            from_state=current,
            to_state=to,
            reason=reason,
            at=now,
        )
    )
    # Logged once committed (see `_session`): a write the database refuses moved nothing.
    session.info.setdefault("transitions", []).append(
        f"series {series.id}: {current} -> {to}" + (f" ({reason})" if reason else "")
    )


def _file_names(session: Session, series_id: int) -> list[str]:
    """A series' spooled files, in the order they arrived."""
    query = select(Instance.file_name).where(Instance.series_id == series_id)
    return list(session.scalars(query.order_by(Instance.id)))


def _configure_sqlite(engine: Engine) -> None:
    """WAL (readers never block the writer); synchronous=NORMAL (a commit survives a crash of
    the node, not a power cut: the spool, fsynced before success, is the durable record and
    `Reception.recover` re-records what the database lost; this saves an fsync per instance);
    BEGIN IMMEDIATE, so that concurrent associations queue for the write lock instead of
    failing with 'database is locked' when a read transaction tries to upgrade."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's begin below opens transactions
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class NodeState:
    """The database and every operation on it; each method is one transaction."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite"):
            self.engine = create_engine(url, connect_args={"timeout": 30})
            _configure_sqlite(self.engine)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
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
                series = self._new_series(session, received, now)
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
                _transition(session, series, SeriesState.RECEIVING)
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

    @staticmethod
    def _new_series(session: Session, received: ReceivedInstance, now: datetime) -> Series:
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
            _transition(session, series, SeriesState.COMPLETE)
            return None

    def complete_series_files(self, series_id: int) -> SeriesFiles | None:
        """The spooled files of a complete series, or None if it is not complete (any more)."""
        with self._session() as session:
            series = session.get(Series, series_id)
            if series is None or series.state != SeriesState.COMPLETE:
                return None
            return SeriesFiles(series_id, series.generation, _file_names(session, series_id))

    def _move_if_current(
        self, series_id: int, generation: int, to: SeriesState, reason: str | None = None
    ) -> bool:
        """Apply a decision made on `generation`; False (nothing done) if the series has since
        reopened, because the decision is about data that is no longer the whole series."""
        with self._session() as session:
            series = session.get_one(Series, series_id, with_for_update=True)
            if series.generation != generation:
                log.info("series %d: generation %d superseded", series_id, generation)
                return False
            _transition(session, series, to, reason)
            return True

    def mark_skipped(self, series_id: int, generation: int, reason: str) -> bool:
        return self._move_if_current(series_id, generation, SeriesState.SKIPPED, reason)

    def enqueue(self, series_id: int, generation: int) -> bool:
        return self._move_if_current(series_id, generation, SeriesState.QUEUED)

    def mark_failed(self, series_id: int, generation: int, reason: str) -> bool:
        return self._move_if_current(series_id, generation, SeriesState.FAILED, reason)

    # Segmentation ----------------------------------------------------------------------

    def claim_next_queued(self) -> Job | None:
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
            series.attempts += 1
            _transition(session, series, SeriesState.SEGMENTING, f"attempt {series.attempts}")
            names = _file_names(session, series.id)
            return Job(
                series.id,
                series.generation,
                series.attempts,
                series.series_instance_uid,
                names,
            )

    def requeue(self, job: Job, reason: str) -> bool:
        """A worker crash or hang interrupted `job`: queue it again (the caller checks retries)."""
        return self._move_if_current(job.series_id, job.generation, SeriesState.QUEUED, reason)

    def mark_no_findings(self, job: Job, result: str, reason: str) -> bool:
        with self._session() as session:
            series = self._current(session, job.series_id, job.generation)
            if series is None:
                return False
            series.result = result
            _transition(session, series, SeriesState.NO_FINDINGS, reason)
            return True

    def mark_segmented(
        self,
        job: Job,
        seg_file: str,
        seg_uids: tuple[str, str],
        result: str,
        targets: list[Target],
    ) -> bool:
        """The SEG is on disk: `sending`, with a pending delivery per target (none: `done`)."""
        with self._session() as session:
            series = self._with_seg(session, job, seg_file, seg_uids, result)
            if series is None:
                return False
            self._start_sending(session, series, targets)
            return True

    def mark_held(
        self, job: Job, seg_file: str, seg_uids: tuple[str, str], result: str, reason: str
    ) -> bool:
        """The SEG is on disk but unsure, and the policy holds it: `review`, with the reason."""
        with self._session() as session:
            series = self._with_seg(session, job, seg_file, seg_uids, result)
            if series is None:
                return False
            _transition(session, series, SeriesState.REVIEW, reason)
            return True

    def _with_seg(
        self, session: Session, job: Job, seg_file: str, seg_uids: tuple[str, str], result: str
    ) -> Series | None:
        """The job's series with its SEG recorded, or None if the job was superseded."""
        series = self._current(session, job.series_id, job.generation)
        if series is not None:
            series.seg_file = seg_file
            series.seg_series_instance_uid, series.seg_sop_instance_uid = seg_uids
            series.result = result
        return series

    def _start_sending(
        self, session: Session, series: Series, targets: list[Target], reason: str | None = None
    ) -> None:
        """On to `sending` with a pending delivery per target (none: straight on to `done`)."""
        _transition(session, series, SeriesState.SENDING, reason)
        self._add_deliveries(session, series, targets)
        if not targets:
            _transition(session, series, SeriesState.DONE, "no destinations configured")

    @staticmethod
    def _locked_in(session: Session, series_id: int, state: SeriesState, only: str) -> Series:
        """Series `series_id`, locked, which must be in `state` (else the error says `only`
        which jobs the command takes)."""
        series = session.get(Series, series_id, with_for_update=True)
        if series is None:
            raise LookupError(f"no job {series_id}")
        if series.state != state:
            raise IllegalTransitionError(f"job {series_id} is {series.state}: only {only}")
        return series

    def release(self, series_id: int, targets: list[Target]) -> SeriesState:
        """`dicom-node release`: a held SEG goes out to `targets` as it is. Returns the state
        it moved to (`sending`, or `done` without destinations)."""
        with self._session() as session:
            series = self._locked_in(
                session, series_id, SeriesState.REVIEW, "jobs in review are released"
            )
            self._start_sending(session, series, targets, "released after review")
            return SeriesState(series.state)

    def reject(self, series_id: int) -> SeriesState:
        """`dicom-node reject`: a held SEG is never sent; the series ends `rejected`."""
        with self._session() as session:
            series = self._locked_in(
                session, series_id, SeriesState.REVIEW, "jobs in review are rejected"
            )
            _transition(session, series, SeriesState.REJECTED, "rejected after review")
            return SeriesState.REJECTED

    @staticmethod
    def _add_deliveries(session: Session, series: Series, targets: list[Target]) -> None:
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

    @staticmethod
    def _current(session: Session, series_id: int, generation: int) -> Series | None:
        """The series if it is still at `generation` (locked), else None: superseded work."""
        series = session.get_one(Series, series_id, with_for_update=True)
        if series.generation != generation:
            log.info("series %d: generation %d superseded", series_id, generation)
            return None
        return series

    def calling_peer(self, series_id: int) -> tuple[str, str]:
        """(calling AE title, host) of the series' sender, for reply_to_caller destinations."""
        with self._session() as session:
            series = session.get(Series, series_id)
            if series is None:
                raise LookupError(f"no job {series_id}")
            return series.calling_ae, series.calling_host

    # Delivery --------------------------------------------------------------------------

    def claim_due_deliveries(self, limit: int = 8) -> list[DeliveryJob]:
        """Pending deliveries whose time has come, marked in flight (next_attempt_at None)."""
        with self._session() as session:
            rows = session.execute(
                select(Delivery, Series)
                .join(Series, Series.id == Delivery.series_id)
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at <= utcnow(),
                    Series.state == SeriesState.SENDING,
                    Series.generation == Delivery.generation,
                )
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            jobs = []
            for delivery, series in rows:
                delivery.attempts += 1
                delivery.next_attempt_at = None
                target = Target(
                    delivery.destination, delivery.ae_title, delivery.host, delivery.port
                )
                jobs.append(
                    DeliveryJob(
                        delivery.id,
                        series.id,
                        delivery.generation,
                        delivery.attempts,
                        target,
                        str(series.seg_file),
                    )
                )
            return jobs

    def record_delivery(
        self, job: DeliveryJob, error: str | None, retry_at: datetime | None
    ) -> SeriesState | None:
        """The outcome of one attempt: delivered (error None), retry at `retry_at`, or given
        up (retry_at None). Settles the series once no delivery is pending; returns its new
        state then, else None."""
        with self._session() as session:
            delivery = session.get_one(Delivery, job.delivery_id, with_for_update=True)
            now = utcnow()
            if error is None:
                delivery.state, delivery.delivered_at, delivery.last_error = (
                    DeliveryState.DELIVERED,
                    now,
                    None,
                )
                log.info("series %d: delivered to %s", job.series_id, delivery.destination)
            else:
                delivery.last_error = error
                if retry_at is None:
                    delivery.state = DeliveryState.FAILED
                else:
                    delivery.next_attempt_at = retry_at
                log.warning(
                    "series %d: delivery %d to %s failed: %s%s",
                    job.series_id,
                    job.attempt,
                    delivery.destination,
                    error,
                    " (giving up)" if retry_at is None else f" (next at {retry_at:%H:%M:%S})",
                )
            series = self._current(session, job.series_id, job.generation)
            if series is None or series.state != SeriesState.SENDING:
                return None
            deliveries = self._deliveries(session, series)
            if any(d.state == DeliveryState.PENDING for d in deliveries):
                return None
            failed = [d for d in deliveries if d.state == DeliveryState.FAILED]
            if not failed:
                _transition(session, series, SeriesState.DONE)
                return SeriesState.DONE
            reason = "; ".join(
                f"delivery to {d.destination} failed after {d.attempts} attempts: {d.last_error}"
                for d in failed
            )
            _transition(session, series, SeriesState.FAILED, reason)
            return SeriesState.FAILED

    @staticmethod
    def _deliveries(session: Session, series: Series) -> list[Delivery]:
        return list(
            session.scalars(
                select(Delivery)
                .where(Delivery.series_id == series.id, Delivery.generation == series.generation)
                .order_by(Delivery.id)
            )
        )

    def retry(self, series_id: int) -> SeriesState:
        """`dicom-node retry`: a failed series is delivered again if its SEG is on disk and
        only delivery failed, else segmented again. Returns the state it moved to."""
        with self._session() as session:
            series = self._locked_in(
                session, series_id, SeriesState.FAILED, "failed jobs are retried"
            )
            failed = [
                d for d in self._deliveries(session, series) if d.state == DeliveryState.FAILED
            ]
            if series.seg_file and failed:
                for delivery in failed:
                    delivery.state, delivery.attempts = DeliveryState.PENDING, 0
                    delivery.next_attempt_at = utcnow()
                _transition(session, series, SeriesState.SENDING, "retry requested")
                return SeriesState.SENDING
            series.attempts = 0
            _transition(session, series, SeriesState.QUEUED, "retry requested")
            return SeriesState.QUEUED

    # Retention -------------------------------------------------------------------------

    def purgeable(self, older_than: datetime) -> list[tuple[int, list[str], str | None]]:
        """(series id, spooled file names, SEG file) of series final before `older_than`
        (failed ones are kept for `dicom-node retry`)."""
        with self._session() as session:
            series_list = session.scalars(
                select(Series).where(
                    Series.state.in_([_S.DONE, _S.NO_FINDINGS, _S.REJECTED, _S.SKIPPED]),
                    Series.state_changed_at < older_than,
                    Series.purged_at.is_(None),
                )
            ).all()
            return [
                (
                    series.id,
                    _file_names(session, series.id),
                    series.seg_file,
                )
                for series in series_list
            ]

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

    def resume(self) -> Resumed:
        """After a restart: re-queue interrupted segmentation, make deliveries that were in
        flight due again, and say which series need their idle timer or selection again."""
        with self._session() as session:
            segmenting = select(Series).where(Series.state == SeriesState.SEGMENTING)
            for series in session.scalars(segmenting):
                _transition(session, series, SeriesState.QUEUED, "node restarted")
            in_flight = select(Delivery).where(
                Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at.is_(None)
            )
            for delivery in session.scalars(in_flight):
                delivery.next_attempt_at = utcnow()
            rows = session.execute(select(Series.id, Series.state))
            receiving: list[int] = []
            complete: list[int] = []
            requeued: list[int] = []
            for series_id, state in rows:
                if state == SeriesState.RECEIVING:
                    receiving.append(series_id)
                elif state == SeriesState.COMPLETE:
                    complete.append(series_id)
                elif state == SeriesState.QUEUED:
                    requeued.append(series_id)
            return Resumed(receiving, complete, requeued)

    def file_names(self) -> set[str]:
        """Every spooled file the database knows (the rest of the spool is debris)."""
        with self._session() as session:
            return set(session.scalars(select(Instance.file_name)))

    # Reporting -------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._session() as session:
            rows = session.execute(select(Series.state, func.count()).group_by(Series.state))
            return {state: count for state, count in rows}

    def delivered_to(self, series: Series) -> list[str]:
        """Destinations that hold the current generation's SEG."""
        with self._session() as session:
            return [
                d.destination
                for d in self._deliveries(session, series)
                if d.state == DeliveryState.DELIVERED
            ]

    def job(self, series_id: int) -> tuple[Series, list[Transition], list[Delivery]]:
        """A series with its whole timeline and every delivery (all generations)."""
        with self._session() as session:
            series = session.get(Series, series_id)
            if series is None:
                raise LookupError(f"no job {series_id}")
            transitions = session.scalars(
                select(Transition).where(Transition.series_id == series_id).order_by(Transition.id)
            ).all()
            deliveries = session.scalars(
                select(Delivery).where(Delivery.series_id == series_id).order_by(Delivery.id)
            ).all()
            return series, list(transitions), list(deliveries)

    def recent_series(self, limit: int = 20) -> list[Series]:
        with self._session() as session:
            return list(
                session.scalars(
                    select(Series).order_by(Series.last_received_at.desc()).limit(limit)
                )
            )
