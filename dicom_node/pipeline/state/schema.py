"""The state database's tables (SQLAlchemy ORM), its time type and its SQLite settings.

Only the store (`dicom_node.pipeline.state.store`, its reads in `queries`) and the state
machine that it calls use these classes; everything outside the store sees the plain records of
`dicom_node.pipeline.state.records`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    String,
    Text,
    TypeDecorator,
    event,
    inspect,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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


class Lease:
    """Who runs an attempt (a series' segmentation, a delivery's send): the node or worker
    that claimed it, its attempt number and, in a cluster, until when its lease runs
    (renewed while it works; None: the one-machine node, no lease). Columns of `Claim` and
    `DeliveryClaim`; `rows.held_lease` and `rows.lease_until` are their rules."""

    attempt: Mapped[int]
    owner: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Claim(Lease, Base):
    """The lease on a `segmenting` series' attempt. Written with each claim and left
    afterwards, naming the last owner."""

    __tablename__ = "claims"

    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), primary_key=True)


class DeliveryClaim(Lease, Base):
    """The lease on a delivery's attempt in flight (`next_attempt_at` None): a restart makes
    due again its own attempts only, and in a cluster (several reception nodes deliver side
    by side) another node takes over an attempt whose lease ran out. Written with each claim
    and left afterwards."""

    __tablename__ = "delivery_claims"

    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), primary_key=True)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime)


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


class SchemaMismatchError(RuntimeError):
    """The database holds this node's tables as an older build made them."""


def check_schema(engine: Engine) -> None:
    """Refuse a database whose tables lack columns this build uses, naming them. `create_all`
    adds missing tables, never missing columns: without this check the node would start and
    fail at the first statement that needs one (a delivery, hours later)."""
    database = inspect(engine)
    lacking = []
    for table in Base.metadata.sorted_tables:
        if database.has_table(table.name):
            present = {column["name"] for column in database.get_columns(table.name)}
            missing = [column.name for column in table.columns if column.name not in present]
            if missing:
                lacking.append(f"table {table.name} lacks {', '.join(missing)}")
    if lacking:
        raise SchemaMismatchError(
            f"{engine.url.render_as_string(hide_password=True)} was made by an older build "
            f"({'; '.join(lacking)}); CHANGELOG.md says how to upgrade it"
        )


def configure_sqlite(engine: Engine) -> None:
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
