"""The state database and its transition table, without the network: fast and exhaustive."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy import select, text

from dicom_node.app.config import ConfigError, RetentionConfig
from dicom_node.net.receive import Reception
from dicom_node.pipeline.results import remove_orphans
from dicom_node.pipeline.retention import purge_expired
from dicom_node.pipeline.spool import Spool, SpooledFile
from dicom_node.pipeline.state import (
    TRANSITIONS,
    ClaimAnswer,
    ClaimedSeries,
    IllegalTransitionError,
    NodeState,
    ReceivedInstance,
    Recorded,
    SeriesState,
    Target,
    utcnow,
)
from dicom_node.pipeline.state.rows import transition
from dicom_node.pipeline.state.schema import (
    Claim,
    Delivery,
    DeliveryClaim,
    SchemaMismatchError,
    Series,
)
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.postgres import PostgresServer
from model.volume_io import Volume


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NodeState]:
    """A fresh state database, on each backend the node supports ([node] database)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'node.db'}"
    else:  # looked up only here, so that the SQLite runs neither start nor need the server
        server: PostgresServer = request.getfixturevalue("postgres")
        url = server.create_database(f"state_{uuid.uuid4().hex}")
    state = NodeState(url)
    yield state
    state.close()


def test_a_database_an_older_build_made_is_refused_by_name(state: NodeState) -> None:
    """A table without a column this build uses (delivery_claims as an earlier build made it)
    stops the node when it opens the database, naming table and column, instead of failing at
    its first delivery."""
    url = state.engine.url.render_as_string(hide_password=False)
    with state.engine.begin() as connection:
        connection.execute(text("ALTER TABLE delivery_claims DROP COLUMN attempt"))
    with pytest.raises(SchemaMismatchError, match=r"\(table delivery_claims lacks attempt\)"):
        NodeState(url)


def _instance(sop: str, series: str = "1.2.3") -> ReceivedInstance:
    return ReceivedInstance(sop, CTImageStorage, ExplicitVRLittleEndian, series, "1.2", "CT", "CT1")


def _receive(state: NodeState, sop: str, series: str = "1.2.3") -> int:
    return state.record_instance(_instance(sop, series), SpooledFile(f"{sop}.dcm", 10)).series_id


def _force(state: NodeState, series_id: int, *path: SeriesState) -> None:
    with state._session() as session:
        series = session.get_one(Series, series_id)
        for to in path:
            transition(session, series, to)


def test_every_state_has_its_moves_and_can_reopen() -> None:
    assert set(TRANSITIONS) == set(SeriesState)
    for state, targets in TRANSITIONS.items():
        assert (SeriesState.RECEIVING in targets) == (state is not SeriesState.RECEIVING)
    assert TRANSITIONS[SeriesState.RECEIVING] == {SeriesState.COMPLETE}


def test_illegal_transition_raises(state: NodeState) -> None:
    series_id = _receive(state, "1.1")
    with pytest.raises(IllegalTransitionError, match="receiving -> queued"):
        _force(state, series_id, SeriesState.QUEUED)
    with pytest.raises(IllegalTransitionError, match="receiving -> done"):
        _force(state, series_id, SeriesState.DONE)


def test_instances_group_by_series_and_duplicates_change_nothing(state: NodeState) -> None:
    first = _receive(state, "1.1")
    assert _receive(state, "1.2") == first
    assert _receive(state, "2.1", series="9.9") != first
    again = state.record_instance(_instance("1.1"), SpooledFile("other.dcm", 10))
    assert again.duplicate and again.series_id == first
    (series,) = [s for s in state.jobs() if s.id == first]
    assert series.instance_count == 2 and series.state == SeriesState.RECEIVING


def test_completion_waits_for_idle_then_selection_moves_on(state: NodeState) -> None:
    series_id = _receive(state, "1.1")
    assert state.complete_if_idle(series_id, idle_s=60) is not None  # not idle yet: a deadline
    assert state.complete_if_idle(series_id, idle_s=0) is None
    files = state.complete_series_files(series_id)
    assert files is not None and files.file_names == ["1.1.dcm"] and files.generation == 1
    assert state.enqueue(series_id, files.generation)
    assert state.counts() == {"queued": 1}


def test_late_instance_reopens_and_supersedes_an_older_decision(state: NodeState) -> None:
    series_id = _receive(state, "1.1")
    state.complete_if_idle(series_id, idle_s=0)
    files = state.complete_series_files(series_id)
    assert files is not None
    _receive(state, "1.2")  # arrives while selection runs: reopens, generation 2
    assert not state.mark_skipped(series_id, files.generation, "too few slices")
    (series,) = state.jobs()
    assert series.state == SeriesState.RECEIVING and series.generation == 2
    state.complete_if_idle(series_id, idle_s=0)
    assert state.mark_skipped(series_id, 2, "too few slices")
    _receive(state, "1.3")  # after a decision too
    (series,) = state.jobs()
    assert (series.state, series.generation, series.instance_count) == ("receiving", 3, 3)


def _queued(state: NodeState, sop: str, series: str) -> int:
    series_id = _receive(state, sop, series=series)
    _force(state, series_id, SeriesState.COMPLETE, SeriesState.QUEUED)
    return series_id


PACS = Target("pacs", "ORTHANC", "127.0.0.1", 4242)
BACKUP = Target("backup", "ARCHIVE", "127.0.0.1", 4243)


def _segmented(state: NodeState, targets: list[Target]) -> ClaimedSeries:
    job = state.claim_next_queued()
    assert job is not None
    assert state.mark_segmented(job, f"{job.series_id}.dcm", ("9.1", "9.2"), "{}", targets)
    return job


def test_resume_requeues_segmenting_and_resumes_deliveries_in_flight(state: NodeState) -> None:
    receiving = _receive(state, "1.1", series="1")
    complete = _receive(state, "2.1", series="2")
    _force(state, complete, SeriesState.COMPLETE)
    sending = _queued(state, "4.1", series="4")
    _segmented(state, [PACS])
    segmenting = _queued(state, "3.1", series="3")
    assert state.claim_next_queued().series_id == segmenting  # type: ignore[union-attr]
    (in_flight,) = state.claim_due_deliveries()
    assert state.claim_due_deliveries() == []  # claimed: not handed out twice
    resumed = state.resume()
    assert set(resumed.receiving) == {receiving}
    assert resumed.complete == [complete]
    assert resumed.requeued == [segmenting]
    with state._session() as session:
        reasons = session.scalars(select(Series.reason).where(Series.id == segmenting)).all()
    assert reasons == ["node restarted"]
    (again,) = state.claim_due_deliveries()  # the SEG is on disk: only delivery resumes
    assert (again.delivery_id, again.series_id, again.attempt) == (
        in_flight.delivery_id,
        sending,
        2,
    )


def test_series_is_done_when_every_destination_has_its_seg(state: NodeState) -> None:
    _queued(state, "1.1", series="1")
    job = _segmented(state, [PACS, BACKUP])
    first, second = state.claim_due_deliveries()
    assert state.record_delivery(first, None, None) is None  # backup still pending
    retry_at = utcnow() + timedelta(hours=1)
    assert state.record_delivery(second, "connection refused", retry_at) is None
    assert state.claim_due_deliveries() == []  # not due before retry_at
    (series,) = state.jobs()
    assert series.state == SeriesState.SENDING and series.delivered_to == ("pacs",)
    with state._session() as session:
        session.get_one(Delivery, second.delivery_id).next_attempt_at = utcnow()
    (third,) = state.claim_due_deliveries()
    assert third.attempt == 2 and third.target == BACKUP
    assert state.record_delivery(third, None, None) == SeriesState.DONE
    (series,) = state.jobs()
    assert sorted(series.delivered_to) == ["backup", "pacs"]
    assert series.seg_sop_instance_uid == "9.2" and job.attempt == 1


def test_given_up_delivery_fails_the_series_and_retry_only_redelivers(state: NodeState) -> None:
    series_id = _queued(state, "1.1", series="1")
    _segmented(state, [PACS])
    (attempt,) = state.claim_due_deliveries()
    assert state.record_delivery(attempt, "C-STORE failed: 0xA700", None) == SeriesState.FAILED
    (series,) = state.jobs()
    assert "delivery to pacs failed after 1 attempts: C-STORE failed: 0xA700" in str(series.reason)
    assert state.retry(series_id) == SeriesState.SENDING
    (again,) = state.claim_due_deliveries()
    assert again.attempt == 1
    with pytest.raises(IllegalTransitionError, match="only failed jobs"):
        state.retry(series_id)
    with pytest.raises(LookupError, match="no job 99"):
        state.retry(99)


def _held(state: NodeState, sop: str, series: str) -> int:
    series_id = _queued(state, sop, series=series)
    job = state.claim_next_queued()
    assert job is not None
    reason = "unsure: right femur: the model was unsure of 30 % of its voxels"
    assert state.mark_held(job, f"{series_id}.dcm", ("9.1", f"9.{series}"), "{}", reason)
    return series_id


def test_a_held_seg_waits_in_review_until_released_or_rejected(state: NodeState) -> None:
    released, rejected = _held(state, "1.1", series="1"), _held(state, "2.1", series="2")
    assert state.claim_due_deliveries() == []  # nothing goes out while in review
    assert state.resume().requeued == []  # nor does a restart move it
    assert state.purgeable(utcnow() + timedelta(days=365)) == []  # nor retention
    with pytest.raises(IllegalTransitionError, match="only failed jobs"):
        state.retry(released)
    assert state.release(released, [PACS]) == SeriesState.SENDING
    (delivery,) = state.claim_due_deliveries()
    assert (delivery.series_id, delivery.target, delivery.seg_file) == (released, PACS, "1.dcm")
    assert state.record_delivery(delivery, None, None) == SeriesState.DONE
    assert state.reject(rejected) == SeriesState.REJECTED
    assert state.claim_due_deliveries() == []
    series = {s.id: s for s in state.jobs()}
    assert series[rejected].state == SeriesState.REJECTED
    assert series[rejected].reason == "rejected after review"
    assert [p[0] for p in state.purgeable(utcnow() + timedelta(seconds=1))] == [
        released,
        rejected,
    ]
    for command in (state.release, state.reject):
        args = (released, [PACS]) if command == state.release else (released,)
        with pytest.raises(IllegalTransitionError, match="only jobs in review"):
            command(*args)  # type: ignore[operator]
    with pytest.raises(LookupError, match="no job 99"):
        state.reject(99)


def test_a_released_seg_without_destinations_is_done(state: NodeState) -> None:
    series_id = _held(state, "1.1", series="1")
    assert state.release(series_id, []) == SeriesState.DONE


def test_failed_segmentation_is_retried_from_the_queue(state: NodeState) -> None:
    series_id = _queued(state, "1.1", series="1")
    job = state.claim_next_queued()
    assert job is not None and state.requeue(job, "worker crashed (exit -9)")
    job = state.claim_next_queued()
    assert job is not None and job.attempt == 2
    assert state.mark_failed(series_id, job.generation, "worker crashed (exit -9)")
    assert state.retry(series_id) == SeriesState.QUEUED
    job = state.claim_next_queued()
    assert job is not None and job.attempt == 1


def test_work_on_a_superseded_generation_is_discarded(state: NodeState) -> None:
    _queued(state, "1.1", series="1")
    job = state.claim_next_queued()
    assert job is not None
    _receive(state, "1.2", series="1")  # a late instance reopens the series
    assert not state.mark_segmented(job, "1.dcm", ("9.1", "9.2"), "{}", [PACS])
    assert not state.mark_no_findings(job, "{}", "none of the six bones found")
    (series,) = state.jobs()
    assert series.state == SeriesState.RECEIVING and series.seg_file is None


def test_purge_forgets_instances_so_a_resend_reopens(state: NodeState) -> None:
    series_id = _queued(state, "1.1", series="1")
    _segmented(state, [])  # no destinations: done at once
    assert state.purgeable(utcnow() - timedelta(hours=1)) == []
    ((purged_id, names, seg_file),) = state.purgeable(utcnow() + timedelta(seconds=1))
    assert (purged_id, names, seg_file) == (series_id, ["1.1.dcm"], f"{series_id}.dcm")
    state.mark_purged(series_id)
    assert state.file_names() == set()
    again = state.record_instance(_instance("1.1", "1"), SpooledFile("new.dcm", 10))
    assert not again.duplicate
    (series,) = state.jobs()
    assert series.state == SeriesState.RECEIVING and series.generation == 2


def test_spool_writes_durably_under_its_own_names(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    written = spool.write([b"DICM", memoryview(b" data")])
    assert spool.path(written.name).read_bytes() == b"DICM data" and written.size_bytes == 9
    (tmp_path / "spool" / "0123.dcm.part").write_bytes(b"half")  # a crash mid-write
    assert spool.remove_partial() == 1
    assert spool.names() == {written.name}


def test_recover_records_spooled_files_the_database_lost(tmp_path: Path, state: NodeState) -> None:
    volume = Volume(np.zeros((3, 8, 8), np.int16), (1.0, 1.0, 1.0))
    paths = write_ct_series(volume, tmp_path / "ct", patient=PatientInfo("A^B", "1"))
    spool = Spool(tmp_path / "spool")
    names = {spool.write([path.read_bytes()]).name for path in paths}  # commits lost
    (tmp_path / "spool" / "x.dcm.part").write_bytes(b"half")
    (tmp_path / "spool" / "junk.dcm").write_bytes(b"not DICOM")
    told: list[Recorded] = []
    assert Reception(spool, state, told.append).recover() == 3
    assert spool.names() == names == state.file_names()
    (series,) = state.jobs()
    assert series.instance_count == 3 and len(told) == 3


def test_retention_deletes_the_files_of_finished_series_only(tmp_path: Path) -> None:
    state = NodeState(f"sqlite:///{tmp_path / 'node.db'}")
    spool = Spool(tmp_path / "spool")
    results = tmp_path / "results"
    results.mkdir()
    try:
        files = {}
        for series in ("done", "failed"):
            spooled = spool.write([b"DICM"])
            received = _instance(f"{series}.1", series)
            files[series] = spooled.name
            series_id = state.record_instance(received, spooled).series_id
            _force(state, series_id, SeriesState.COMPLETE, SeriesState.QUEUED)
            job = state.claim_next_queued()
            assert job is not None
            (results / f"{series}.dcm").write_bytes(b"SEG")
            state.mark_segmented(job, f"{series}.dcm", ("9.1", f"9.{series}"), "{}", [PACS])
            (delivery,) = state.claim_due_deliveries()
            state.record_delivery(delivery, None if series == "done" else "refused", None)
        config = RetentionConfig(delete_after_h=1.0)
        assert purge_expired(state, spool, results, config) == 0  # finished just now
        with state._session() as session:  # an hour and a bit later
            for series in session.scalars(select(Series)):
                series.state_changed_at -= timedelta(hours=1, minutes=1)
        assert purge_expired(state, spool, results, config) == 1
        assert spool.names() == {files["failed"]}  # failed: kept for `dicom-node retry`
        assert sorted(p.name for p in results.iterdir()) == ["failed.dcm"]
        assert purge_expired(state, spool, results, RetentionConfig(delete_after_h=0)) == 0
    finally:
        state.close()


def test_failed_series_have_their_own_retention(tmp_path: Path) -> None:
    """[retention] failed_after_h: a failed series keeps its files longer than a done one
    (time to retry it), 0 keeps them; once purged it cannot be retried, only sent again."""
    state = NodeState(f"sqlite:///{tmp_path / 'node.db'}")
    spool = Spool(tmp_path / "spool")
    results = tmp_path / "results"
    results.mkdir()
    try:
        ids = {}
        for series in ("done", "failed"):
            received = _instance(f"{series}.1", series)
            ids[series] = state.record_instance(received, spool.write([b"DICM"])).series_id
            _force(state, ids[series], SeriesState.COMPLETE, SeriesState.QUEUED)
        job = state.claim_next_queued()
        assert job is not None
        state.mark_segmented(job, "done.dcm", ("9.1", "9.2"), "{}", [])  # done at once
        job = state.claim_next_queued()
        assert job is not None and state.mark_failed(job.series_id, job.generation, "broken")
        with state._session() as session:  # two days later
            for row in session.scalars(select(Series)):
                row.state_changed_at -= timedelta(hours=48)
        keep_failed = RetentionConfig(delete_after_h=24, failed_after_h=0)
        assert purge_expired(state, spool, results, keep_failed) == 1  # the done one only
        assert RetentionConfig().failed_after_h > RetentionConfig().delete_after_h
        assert purge_expired(state, spool, results, RetentionConfig(delete_after_h=24)) == 0
        three_days = RetentionConfig(delete_after_h=0, failed_after_h=72)
        assert purge_expired(state, spool, results, three_days) == 0  # failed 48 h ago
        a_day = RetentionConfig(delete_after_h=0, failed_after_h=24)
        assert purge_expired(state, spool, results, a_day) == 1
        assert spool.names() == set()
        failed = next(job for job in state.jobs() if job.id == ids["failed"])
        assert failed.state == SeriesState.FAILED and failed.purged_at is not None
        with pytest.raises(IllegalTransitionError, match="files were purged"):
            state.retry(ids["failed"])
    finally:
        state.close()


def test_retention_times_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"retention\.failed_after_h: must be >= 0, got -1"):
        RetentionConfig(failed_after_h=-1)


# Claims: several processes on one database (the node as a cluster, dicom_node/cluster) ------


def _as_owner(state: NodeState, owner: str) -> NodeState:
    """Another process on the same database, claiming as `owner`."""
    return NodeState(state.engine.url.render_as_string(hide_password=False), owner)


def _lapse(state: NodeState, series_id: int) -> None:
    """The series' lease runs out (its worker stopped renewing it)."""
    with state._session() as session:
        session.get_one(Claim, series_id).expires_at = utcnow() - timedelta(seconds=1)


def _reasons(state: NodeState, series_id: int) -> list[str]:
    return [t.reason or "" for t in state.job(series_id).transitions]


def test_a_job_delivered_twice_is_claimed_once_and_a_lapsed_lease_is_taken_over(
    state: NodeState,
) -> None:
    series_id = _queued(state, "1.1", series="1")
    first, second = _as_owner(state, "w1"), _as_owner(state, "w2")
    try:
        claimed = first.claim_series(series_id, 1, lease_s=60, retries=1).claim
        assert claimed is not None and claimed.attempt == 1
        duplicate = second.claim_series(series_id, 1, lease_s=60, retries=1)
        assert duplicate.claim is None
        assert duplicate.held_for_s is not None and 0 < duplicate.held_for_s <= 60
        assert second.claim_series(series_id, 2, 60, 1) == ClaimAnswer(None)  # no such generation
        assert first.renew(claimed, 60)
        _lapse(state, series_id)  # w1 died
        taken = second.claim_series(series_id, 1, lease_s=60, retries=1).claim
        assert taken is not None and taken.attempt == 2
        # w1, had it lived on, can neither renew nor record: its attempt was taken over.
        assert not first.renew(claimed, 60)
        assert not first.mark_no_findings(claimed, "{}", "none of the six bones found")
        assert not first.requeue(claimed, "worker died")
        assert second.mark_no_findings(taken, "{}", "none of the six bones found")
        assert second.claim_series(series_id, 1, 60, 1) == ClaimAnswer(None)  # done: nothing
        reasons = _reasons(state, series_id)
        assert "w1 lost attempt 1; retrying" in reasons
        assert [r for r in reasons if r.startswith("attempt")] == [
            "attempt 1 on w1",
            "attempt 2 on w2",
        ]
    finally:
        first.close()
        second.close()


def test_a_lapsed_lease_with_no_retries_left_fails_the_series(state: NodeState) -> None:
    series_id = _queued(state, "1.1", series="1")
    first, second = _as_owner(state, "w1"), _as_owner(state, "w2")
    try:
        assert first.claim_series(series_id, 1, lease_s=60, retries=0).claim is not None
        _lapse(state, series_id)
        assert second.claim_series(series_id, 1, lease_s=60, retries=0) == ClaimAnswer(None)
        job = state.job(series_id).series
        assert (job.state, job.reason) == (SeriesState.FAILED, "w1 lost attempt 1")
    finally:
        first.close()
        second.close()


def test_a_restart_requeues_its_own_claims_only(state: NodeState) -> None:
    mine, theirs = _queued(state, "1.1", series="1"), _queued(state, "2.1", series="2")
    node_a, node_b = _as_owner(state, "a"), _as_owner(state, "b")
    try:
        assert node_a.claim_next_queued().series_id == mine  # type: ignore[union-attr]
        assert node_b.claim_series(theirs, 1, lease_s=60, retries=1).claim is not None
        assert node_a.resume().requeued == [mine]  # b's series is not a's to requeue
        assert state.job(theirs).series.state == SeriesState.SEGMENTING
        assert _reasons(state, mine)[-1] == "a restarted"
        assert node_b.requeue_own() == [theirs]
    finally:
        node_a.close()
        node_b.close()


def test_a_restart_makes_due_again_its_own_deliveries_in_flight_only(state: NodeState) -> None:
    _queued(state, "1.1", series="1")
    _segmented(state, [PACS, BACKUP])
    node_a, node_b = _as_owner(state, "a"), _as_owner(state, "b")
    try:
        (theirs,) = node_b.claim_due_deliveries(limit=1)
        (mine,) = node_a.claim_due_deliveries(limit=1)
        node_a.resume()
        (again,) = node_a.claim_due_deliveries()  # its own, not b's still in flight
        assert (again.delivery_id, again.attempt) == (mine.delivery_id, 2)
        assert theirs.delivery_id != mine.delivery_id
    finally:
        node_a.close()
        node_b.close()


def _lapse_delivery(state: NodeState, delivery_id: int) -> None:
    """The delivery attempt's lease runs out (its reception node stopped renewing it)."""
    with state._session() as session:
        session.get_one(DeliveryClaim, delivery_id).expires_at = utcnow() - timedelta(seconds=1)


def test_a_delivery_in_flight_whose_lease_lapsed_is_taken_over_by_another_node(
    state: NodeState,
) -> None:
    series_id = _queued(state, "1.1", series="1")
    _segmented(state, [PACS])
    node_a, node_b = _as_owner(state, "a"), _as_owner(state, "b")
    try:
        (sending,) = node_a.claim_due_deliveries(lease_s=60)
        assert node_b.claim_due_deliveries(lease_s=60) == []  # a's lease runs
        assert node_a.renew(sending, 60)
        _lapse_delivery(state, sending.delivery_id)  # node a died mid-send
        (taken,) = node_b.claim_due_deliveries(lease_s=60)
        assert (taken.delivery_id, taken.attempt) == (sending.delivery_id, 2)
        # a, had it lived on, can neither renew nor record: its attempt was taken over.
        assert not node_a.renew(sending, 60)
        assert node_a.record_delivery(sending, "association aborted", utcnow()) is None
        assert node_b.record_delivery(taken, None, None) == SeriesState.DONE
        (delivery,) = state.job(series_id).deliveries
        assert (delivery.state, delivery.attempts, delivery.last_error) == ("delivered", 2, None)
    finally:
        node_a.close()
        node_b.close()


def test_a_delivery_in_flight_without_a_lease_is_never_taken_over(state: NodeState) -> None:
    """The one-machine node keeps no lease: only its own restart makes the attempt due."""
    _queued(state, "1.1", series="1")
    _segmented(state, [PACS])
    other = _as_owner(state, "b")
    try:
        (in_flight,) = state.claim_due_deliveries()
        with state._session() as session:
            claim = session.get_one(DeliveryClaim, in_flight.delivery_id)
            assert claim.expires_at is None
            claim.claimed_at = utcnow() - timedelta(days=1)
        assert other.claim_due_deliveries(lease_s=60) == []
    finally:
        other.close()


def test_orphan_results_are_removed_and_live_or_recorded_ones_kept(
    tmp_path: Path, state: NodeState
) -> None:
    """The files of attempts that ended unrecorded go; the SEG a series records, the running
    attempt's files (it may be writing them) and files not named by attempt stay."""
    results = tmp_path / "results"
    results.mkdir()
    done = _queued(state, "1.1", series="1")
    claim = _segmented(state, [])  # recorded as "<id>.dcm" (a name from before attempts)
    running = _queued(state, "2.1", series="2")
    first = state.claim_next_queued()
    assert first is not None and first.series_id == running
    assert state.requeue(first, "worker died")
    second = state.claim_next_queued()
    assert second is not None and second.attempt == 2
    names = {
        f"{done}.dcm",  # recorded SEG of `done`
        f"{done}-1-1.dcm",  # its attempt that crashed after writing, before recording
        f"{running}-1-1.dcm",  # the lost attempt's SEG, SR, key image, a write cut short
        f"{running}-1-1_sr.dcm",
        f"{running}-1-1_key.png",
        f"{running}-1-1.dcm.part",
        f"{running}-1-2.dcm",  # the running attempt's, being written
        f"{running}-1-2.dcm.part",
        "999-1-1.dcm",  # of a series the database does not know
        "notes.txt",  # not the node's naming: left alone
    }
    for name in names:
        (results / name).write_bytes(b"")
    assert claim.series_id == done
    assert remove_orphans(state, results) == 6
    kept = {f"{done}.dcm", f"{running}-1-2.dcm", f"{running}-1-2.dcm.part", "notes.txt"}
    assert {p.name for p in results.iterdir()} == kept
    assert state.fail_claim(second, "worker died")  # the running attempt ended too
    assert remove_orphans(state, results, series_id=done) == 0  # only `done`'s looked at
    assert remove_orphans(state, results, series_id=running) == 2
    assert {p.name for p in results.iterdir()} == {f"{done}.dcm", "notes.txt"}
