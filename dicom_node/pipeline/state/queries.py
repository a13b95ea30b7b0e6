"""The store's reads: `Queries`, the operations of `NodeState` that change nothing.

What the stages look up to decide (a complete series' files, a sender, what retention may
delete, the spool's known files) and what `dicom-node status`, `jobs` and `job` report. Each is
one transaction of `NodeState._session`, as the store's writes are; a mixin rather than a
store of its own so that callers keep one object for both.
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import AbstractContextManager
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from dicom_node.pipeline.state import rows
from dicom_node.pipeline.state.machine import SeriesState
from dicom_node.pipeline.state.records import JobRecord, ResultsInUse, SeriesFiles, SeriesRecord
from dicom_node.pipeline.state.schema import Claim, Instance, Series, utcnow

_S = SeriesState


class Queries:
    """The reads of `NodeState`, which provides `_session` (one transaction)."""

    def _session(self) -> AbstractContextManager[Session]:
        raise NotImplementedError  # NodeState's

    # Completion and delivery -----------------------------------------------------------

    def complete_series_files(self, series_id: int) -> SeriesFiles | None:
        """The spooled files of a complete series, or None if it is not complete (any more)."""
        with self._session() as session:
            series = session.get(Series, series_id)
            if series is None or series.state != SeriesState.COMPLETE:
                return None
            names = rows.file_names(session, series_id)
            span = series.last_received_at - series.first_received_at
            return SeriesFiles(series_id, series.generation, names, span.total_seconds())

    def receiving_series(self) -> dict[int, datetime]:
        """Each receiving series' last arrival, by id (for idle timers on series whose
        instances another process recorded)."""
        query = select(Series.id, Series.last_received_at).where(Series.state == _S.RECEIVING)
        with self._session() as session:
            return {series_id: last for series_id, last in session.execute(query)}

    def calling_peer(self, series_id: int) -> tuple[str, str]:
        """(calling AE title, host) of the series' sender, for reply_to_caller destinations."""
        with self._session() as session:
            series = session.get(Series, series_id)
            if series is None:
                raise LookupError(f"no job {series_id}")
            return series.calling_ae, series.calling_host

    # Retention and restart -------------------------------------------------------------

    def purgeable(
        self, older_than: datetime | None, failed_older_than: datetime | None = None
    ) -> list[tuple[int, list[str], str | None]]:
        """(series id, spooled file names, SEG file) of series that ended before `older_than`
        (done, no findings, rejected, skipped) or failed before `failed_older_than` (failed
        ones wait for `dicom-node retry` longer); None: none of those."""
        ended = [_S.DONE, _S.NO_FINDINGS, _S.REJECTED, _S.SKIPPED]
        due = [(ended, older_than), ([_S.FAILED], failed_older_than)]
        expired = [
            Series.state.in_(states) & (Series.state_changed_at < before)
            for states, before in due
            if before is not None
        ]
        if not expired:
            return []
        query = select(Series).where(or_(*expired), Series.purged_at.is_(None))
        with self._session() as session:
            return [
                (series.id, rows.file_names(session, series.id), series.seg_file)
                for series in session.scalars(query).all()
            ]

    def lapsed_claims(self) -> list[tuple[int, int, int]]:
        """(series id, generation, attempt) of the `segmenting` series whose lease ran out:
        their worker stopped renewing it (died, hung, or lost the network) and may never
        give its job back, so the series must be handed out again."""
        query = (
            select(Series.id, Series.generation, Series.attempts)
            .join(Claim, Claim.series_id == Series.id)
            .where(Series.state == _S.SEGMENTING, Claim.expires_at < utcnow())
        )
        with self._session() as session:
            return [(series_id, gen, attempt) for series_id, gen, attempt in session.execute(query)]

    def results_in_use(self, series_ids: Collection[int]) -> dict[int, ResultsInUse]:
        """What of each series' result files may still be needed (`ResultsInUse`); a series
        the database does not know needs none. Read in one transaction: a file listed before
        the call was written by an attempt that was claimed before it, so an attempt that
        runs is seen running here, and its files are kept."""
        query = select(Series).where(Series.id.in_(series_ids))
        with self._session() as session:
            return {
                series.id: ResultsInUse(
                    series.seg_file,
                    (series.generation, series.attempts) if series.state == _S.SEGMENTING else None,
                )
                for series in session.scalars(query)
            }

    def file_names(self) -> set[str]:
        """Every spooled file the database knows (the rest of the spool is debris)."""
        with self._session() as session:
            return set(session.scalars(select(Instance.file_name)))

    # Reporting -------------------------------------------------------------------------

    def any_file_name(self, series_id: int) -> str | None:
        """One spooled file of the series (None: none, e.g. purged), to read its header."""
        query = select(Instance.file_name).where(Instance.series_id == series_id).limit(1)
        with self._session() as session:
            return session.scalars(query).first()

    def counts(self) -> dict[str, int]:
        with self._session() as session:
            counted = session.execute(select(Series.state, func.count()).group_by(Series.state))
            return {state: count for state, count in counted}

    def jobs(
        self,
        state: SeriesState | None = None,
        limit: int | None = 20,
        since: datetime | None = None,
    ) -> list[SeriesRecord]:
        """The newest series (by their last instance), newest first, only those in `state`
        and that reached their state at or after `since` if given: filtered, ordered and
        limited (None: all) by the database, so a few failed series are found among any
        number of newer done ones."""
        query = select(Series)
        if state is not None:
            query = query.where(Series.state == state)
        if since is not None:
            query = query.where(Series.state_changed_at >= since)
        query = query.order_by(Series.last_received_at.desc(), Series.id.desc()).limit(limit)
        with self._session() as session:
            return rows.series_records(session, list(session.scalars(query)))

    def job(self, series_id: int) -> JobRecord:
        """A series with its whole timeline and every delivery (all generations)."""
        with self._session() as session:
            return rows.job_record(session, series_id)
