"""`dicom-node jobs --state --limit`: the database filters and limits, so old failures show up
however many series finished after them. `dicom-node retry --state failed [--since]`: every
failed job (since a time) retried at once, each printed with its outcome."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
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


def _node_state(tmp_path: Path) -> tuple[Path, NodeState]:
    config = tmp_path / "config.toml"
    config.write_text('[node]\ndata_dir = "var"\n')
    (tmp_path / "var").mkdir()
    return config, NodeState(load_config(config).node.database_url)


def _jobs(capsys: pytest.CaptureFixture[str], config: Path, *options: str) -> list[dict]:
    assert main(["jobs", "--config", str(config), *options, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_jobs_shows_the_newest_failed_series_behind_a_hundred_newer_done_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, state = _node_state(tmp_path)
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


def _retry(capsys: pytest.CaptureFixture[str], config: Path, *options: str) -> tuple[int, str]:
    code = main(["retry", "--config", str(config), *options])
    return code, capsys.readouterr().out


def test_retry_in_bulk_takes_the_failed_jobs_since_a_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, state = _node_state(tmp_path)
    try:
        older = [_process(state, f"1.{n}", fail=True) for n in range(3)]
        time.sleep(0.01)
        since = datetime.now(UTC)
        newer = [_process(state, f"2.{n}", fail=True) for n in range(2)]
        done = _process(state, "3.1", fail=False)
    finally:
        state.close()

    code, out = _retry(capsys, config, "--state", "failed", "--since", since.isoformat())
    assert code == 0
    assert out.splitlines() == [
        *(f"job {id_} (series 2.{n}): queued" for n, id_ in enumerate(newer)),
        f"retried 2 of 2 failed job(s) since {since.isoformat()}",
    ]
    code, out = _retry(capsys, config, "--state", "failed")  # the rest: the older ones
    assert code == 0
    assert out.splitlines()[:-1] == [
        f"job {id_} (series 1.{n}): queued" for n, id_ in enumerate(older)
    ]
    queued = {job["id"] for job in _jobs(capsys, config, "--state", "queued")}
    assert queued == {*older, *newer} and done not in queued
    assert _retry(capsys, config, "--state", "failed") == (0, "retried 0 of 0 failed job(s)\n")
    code, out = _retry(capsys, config, "--state", "failed", "--since", "2026-12-01T08:00")
    assert out.endswith("since 2026-12-01T08:00:00+00:00\n")  # no offset given: UTC


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["7", "--state", "failed"], "argument --state: not allowed with argument ID"),
        ([], "one of the arguments ID --state is required"),
        (["--state", "done"], "argument --state: invalid choice: 'done'"),
        (["--state", "failed", "--since", "yesterday"], "got 'yesterday'"),
    ],
)
def test_retry_takes_one_job_or_a_state(
    options: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["retry", *options])
    assert exit_.value.code == 2
    assert error in capsys.readouterr().err


def test_retry_since_needs_the_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, state = _node_state(tmp_path)
    state.close()
    assert main(["retry", "7", "--since", "2026-12-01", "--config", str(config)]) == 2
    assert "--since goes with --state failed" in capsys.readouterr().err


def test_retry_in_bulk_passes_over_failed_jobs_whose_files_were_purged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, state = _node_state(tmp_path)
    try:
        purged, kept = (_process(state, f"1.{n}", fail=True) for n in range(2))
        state.mark_purged(purged)  # [retention] failed_after_h
    finally:
        state.close()
    code, out = _retry(capsys, config, "--state", "failed")
    assert code == 0
    assert out.splitlines() == [
        f"job {purged} (series 1.0): not retried: job {purged}: its files were purged "
        "([retention] failed_after_h); send the series again",
        f"job {kept} (series 1.1): queued",
        "retried 1 of 2 failed job(s) (1 purged: send them again)",
    ]
