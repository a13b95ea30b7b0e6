"""`dicom-node jobs --state --limit`: the database filters and limits, so old failures show up
however many series finished after them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_node.app.cli import main
from dicom_node.app.config import load_config
from dicom_node.pipeline.spool import SpooledFile
from dicom_node.pipeline.state import NodeState, ReceivedInstance, SeriesState


def _process(state: NodeState, uid: str, fail: bool) -> int:
    """One series through the store as the node moves it: received, complete, queued, claimed
    by the worker, then failed (the worker's reason) or segmented with no destinations (done)."""
    received = ReceivedInstance(
        f"{uid}.1", CTImageStorage, ExplicitVRLittleEndian, uid, "1.2", "CT", "CT1"
    )
    series_id = state.record_instance(received, SpooledFile(f"{uid}.dcm", 10)).series_id
    assert state.complete_if_idle(series_id, idle_s=0) is None
    files = state.complete_series_files(series_id)
    assert files is not None and state.enqueue(series_id, files.generation)
    claim = state.claim_next_queued()
    assert claim is not None and claim.series_id == series_id
    if fail:
        assert state.mark_failed(series_id, claim.generation, "worker died (exit -9)")
    else:
        assert state.mark_segmented(claim, f"{series_id}.dcm", ("9.1", f"9.{uid}"), "{}", [])
    return series_id


def _jobs(capsys: pytest.CaptureFixture[str], config: Path, *options: str) -> list[dict]:
    assert main(["jobs", "--config", str(config), *options, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_jobs_shows_the_newest_failed_series_behind_a_hundred_newer_done_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[node]\ndata_dir = "var"\n')
    (tmp_path / "var").mkdir()
    state = NodeState(load_config(config).node.database_url)
    try:
        failed = [_process(state, f"1.{n}", fail=True) for n in range(8)]
        done = [_process(state, f"2.{n}", fail=False) for n in range(100)]
    finally:
        state.close()

    jobs = _jobs(capsys, config, "--state", "failed", "--limit", "5")
    assert [job["id"] for job in jobs] == failed[::-1][:5]  # the five newest, newest first
    assert {job["state"] for job in jobs} == {SeriesState.FAILED}
    assert not {job["id"] for job in jobs} & set(done)
    newest = _jobs(capsys, config, "--limit", "5")  # without a state: the done ones lead
    assert [job["id"] for job in newest] == done[::-1][:5]


def test_jobs_refuses_a_state_that_does_not_exist(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["jobs", "--state", "finished"])
    assert exit_.value.code == 2
    assert "invalid choice: 'finished'" in capsys.readouterr().err
