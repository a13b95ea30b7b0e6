"""The node's state: received series and instances, and the one place that moves a series on.

Everything the node knows survives a restart because it lives in this database (SQLite in WAL
mode under data_dir by default, or PostgreSQL). A C-STORE is acknowledged only after its
instance is spooled and committed here, so the node never knows less than the sender was told
(after a power cut, `Reception.recover` re-records spooled files a lost commit left out).

A series moves through these states; `TRANSITIONS` lists every legal move and `_transition`
(the only code that writes `Series.state`) refuses anything else:

    receiving -> complete -> queued -> segmenting -> sending -> done
                         \\-> skipped (reason)       \\-> no_findings, failed (reason)

- `receiving`: instances arrive; the series completes after `series.complete_after_s` idle.
- `complete`: nothing arrived for that long; selection (`volume.select_series`) runs next.
- `skipped`: not something the node segments (scout, secondary capture, ...), with a reason.
- `queued`, `segmenting`, `sending`, `done`, `no_findings`, `failed`: the processing stages.
  After a restart a series found `segmenting` or `sending` goes back to `queued`.
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

from dicom_node.spool import SpooledFile

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


_S = SeriesState
_FORWARD: dict[SeriesState, frozenset[SeriesState]] = {
    _S.RECEIVING: frozenset({_S.COMPLETE}),
    # failed: the spooled headers could not be read at all.
    _S.COMPLETE: frozenset({_S.SKIPPED, _S.QUEUED, _S.FAILED}),
    _S.QUEUED: frozenset({_S.SEGMENTING}),
    # queued again: a restart interrupted the work.
    _S.SEGMENTING: frozenset({_S.SENDING, _S.NO_FINDINGS, _S.FAILED, _S.QUEUED}),
    _S.SENDING: frozenset({_S.DONE, _S.FAILED, _S.QUEUED}),
    _S.SKIPPED: frozenset(),
    _S.DONE: frozenset(),
    _S.NO_FINDINGS: frozenset(),
    _S.FAILED: frozenset(),
}
# Every legal move: the forward ones, plus reopening to receiving from anywhere else.
TRANSITIONS: dict[SeriesState, frozenset[SeriesState]] = {
    state: targets | ({_S.RECEIVING} if state is not _S.RECEIVING else frozenset())
    for state, targets in _FORWARD.items()
}
# States whose work a restart interrupted: they go back to queued.
_INTERRUPTED = (_S.SEGMENTING, _S.SENDING)


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
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


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
    instance_count: Mapped[int] = mapped_column(default=0)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)  # why skipped or failed
    generation: Mapped[int] = mapped_column(default=1)  # +1 each time the series reopens
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime)


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
class Resumed:
    """What a restart found: idle timers to restart and selections to redo."""

    receiving: dict[int, datetime]  # series id -> last instance received
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
    log.info("series %d: %s -> %s%s", series.id, current, to, f" ({reason})" if reason else "")


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
            elif series.state != SeriesState.RECEIVING:
                _transition(session, series, SeriesState.RECEIVING)
            series.instance_count += 1
            series.last_received_at = now
            session.add(
                Instance(
                    sop_instance_uid=received.sop_instance_uid,
                    series_id=series.id,
                    file_name=spooled.name,
                    sop_class_uid=received.sop_class_uid,
                    transfer_syntax_uid=received.transfer_syntax_uid,
                    size_bytes=spooled.size_bytes,
                    generation=series.generation,
                    received_at=now,
                )
            )
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
            names = session.scalars(
                select(Instance.file_name)
                .where(Instance.series_id == series_id)
                .order_by(Instance.id)
            ).all()
            return SeriesFiles(series_id, series.generation, list(names))

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

    # Restart ---------------------------------------------------------------------------

    def resume(self) -> Resumed:
        """After a restart: re-queue interrupted work, and say which series need their idle
        timer or their selection again."""
        with self._session() as session:
            for series in session.scalars(select(Series).where(Series.state.in_(_INTERRUPTED))):
                _transition(session, series, SeriesState.QUEUED, "node restarted")
            rows = session.execute(select(Series.id, Series.state, Series.last_received_at))
            receiving: dict[int, datetime] = {}
            complete: list[int] = []
            requeued: list[int] = []
            for series_id, state, last_received in rows:
                if state == SeriesState.RECEIVING:
                    receiving[series_id] = last_received
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

    def recent_series(self, limit: int = 20) -> list[Series]:
        with self._session() as session:
            return list(
                session.scalars(
                    select(Series).order_by(Series.last_received_at.desc()).limit(limit)
                )
            )
