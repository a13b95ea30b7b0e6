"""The state database and its transition table, without the network: fast and exhaustive."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.ct_series import PatientInfo, write_ct_series
from dicom_node.receive import Reception
from dicom_node.spool import Spool, SpooledFile
from dicom_node.state import (
    TRANSITIONS,
    IllegalTransitionError,
    NodeState,
    ReceivedInstance,
    Recorded,
    Series,
    SeriesState,
    _transition,
)
from model.volume_io import Volume


@pytest.fixture
def state(tmp_path: Path) -> NodeState:
    state = NodeState(f"sqlite:///{tmp_path / 'node.db'}")
    yield state
    state.close()


def _instance(sop: str, series: str = "1.2.3") -> ReceivedInstance:
    return ReceivedInstance(sop, CTImageStorage, ExplicitVRLittleEndian, series, "1.2", "CT", "CT1")


def _receive(state: NodeState, sop: str, series: str = "1.2.3") -> int:
    return state.record_instance(_instance(sop, series), SpooledFile(f"{sop}.dcm", 10)).series_id


def _force(state: NodeState, series_id: int, *path: SeriesState) -> None:
    with state._session() as session:
        series = session.get_one(Series, series_id)
        for to in path:
            _transition(session, series, to)


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
    (series,) = [s for s in state.recent_series() if s.id == first]
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
    (series,) = state.recent_series()
    assert series.state == SeriesState.RECEIVING and series.generation == 2
    state.complete_if_idle(series_id, idle_s=0)
    assert state.mark_skipped(series_id, 2, "too few slices")
    _receive(state, "1.3")  # after a decision too
    (series,) = state.recent_series()
    assert (series.state, series.generation, series.instance_count) == ("receiving", 3, 3)


def test_resume_requeues_interrupted_work(state: NodeState) -> None:
    receiving = _receive(state, "1.1", series="1")
    complete = _receive(state, "2.1", series="2")
    segmenting = _receive(state, "3.1", series="3")
    sending = _receive(state, "4.1", series="4")
    _force(state, complete, SeriesState.COMPLETE)
    _force(state, segmenting, SeriesState.COMPLETE, SeriesState.QUEUED, SeriesState.SEGMENTING)
    path = (SeriesState.COMPLETE, SeriesState.QUEUED, SeriesState.SEGMENTING, SeriesState.SENDING)
    _force(state, sending, *path)
    resumed = state.resume()
    assert set(resumed.receiving) == {receiving}
    assert resumed.complete == [complete]
    assert sorted(resumed.requeued) == sorted([segmenting, sending])
    with state._session() as session:
        reasons = session.scalars(select(Series.reason).where(Series.id == sending)).all()
    assert reasons == ["node restarted"]


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
    (series,) = state.recent_series()
    assert series.instance_count == 3 and len(told) == 3
