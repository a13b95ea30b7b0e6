"""The node on PostgreSQL (`[node] database = "postgresql+psycopg://..."`), with a real server.

tests/test_state.py runs every state test on SQLite and PostgreSQL; here are the parts only
PostgreSQL has: transactions that really run at once (SQLite's BEGIN IMMEDIATE queues them),
so two associations may create the same series in the same instant, and the daemon itself
keeping its state there across a SIGKILL.
"""

from __future__ import annotations

import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy import create_engine, event, text

from dicom_node.pipeline.spool import SpooledFile
from dicom_node.pipeline.state import NodeState, ReceivedInstance, Recorded
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.node_process import NodeProcess, storescu
from dicom_node.testbed.postgres import PostgresServer
from model.volume_io import Volume
from tests.support import require
from tests.support.network import send_at_once

PATIENT = PatientInfo(name="POSTGRES^TESTPATIENT", patient_id="PID-POSTGRES-0815")
MIN_SLICES = 20  # the node's default series.min_slices: every series here has fewer


def _database(server: PostgresServer) -> str:
    return server.create_database(f"node_{uuid.uuid4().hex}")


def _instance(sop: str) -> ReceivedInstance:
    return ReceivedInstance(sop, CTImageStorage, ExplicitVRLittleEndian, "1.2.3", "1.2", "CT", "A")


def _wait_for_lock_wait(url: str, timeout: float = 30) -> None:
    """Until some session of the database waits for a lock another transaction holds."""
    engine = create_engine(url)
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            with engine.connect() as connection:
                if connection.scalar(query):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"no session waited for a lock within {timeout} s")
            time.sleep(0.02)
    finally:
        engine.dispose()


@pytest.mark.parametrize("second_sop", ["1.2", "1.1"], ids=["new-instance", "same-instance"])
def test_two_associations_create_the_same_series_at_once(
    postgres: PostgresServer, second_sop: str
) -> None:
    """The retry in `record_instance`, made to happen rather than hoped for: the first
    association's transaction has created the series and is about to commit when the second
    one looks for the series (not there yet), inserts it too and waits on the unique index.
    Once the first commits, the second fails with IntegrityError and must end up in the same
    series: as a second instance, or as a duplicate when it carries the same instance."""
    url = _database(postgres)
    first, second = NodeState(url), NodeState(url)  # two engines: two associations' sessions
    at_commit, go_on = threading.Event(), threading.Event()

    def hold_commit(_connection: Any) -> None:
        at_commit.set()
        assert go_on.wait(30), "never released"

    # Listened to after create_all, so that only the first association's commit is held.
    event.listen(first.engine, "commit", hold_commit)
    try:
        with ThreadPoolExecutor(2) as pool:
            recording_first = pool.submit(
                first.record_instance, _instance("1.1"), SpooledFile("a.dcm", 10)
            )
            assert at_commit.wait(30), "the first association never reached its commit"
            recording_second = pool.submit(
                second.record_instance, _instance(second_sop), SpooledFile("b.dcm", 10)
            )
            try:
                _wait_for_lock_wait(url)
            finally:
                go_on.set()
            a: Recorded = recording_first.result(timeout=30)
            b: Recorded = recording_second.result(timeout=30)
        assert not a.duplicate and b.series_id == a.series_id
        assert b.duplicate == (second_sop == "1.1")
        (series,) = second.jobs()
        assert series.instance_count == (1 if b.duplicate else 2)
        assert second.file_names() == ({"a.dcm"} if b.duplicate else {"a.dcm", "b.dcm"})
        transitions = second.job(series.id).transitions
        assert [(t.from_state, t.to_state) for t in transitions] == [(None, "receiving")]
    finally:
        go_on.set()
        first.close()
        second.close()


def test_times_come_back_in_utc_whatever_the_session_time_zone(postgres: PostgresServer) -> None:
    """PostgreSQL returns timestamptz in the session's TimeZone, which defaults to the server's
    (often local time): the state hands out UTC all the same, as it does on SQLite."""
    url = _database(postgres) + "?options=-c%20TimeZone%3DPacific/Chatham"  # UTC+12:45/13:45
    state = NodeState(url)
    try:
        state.record_instance(_instance("1.1"), SpooledFile("a.dcm", 10))
        (series,) = state.jobs()
        assert series.last_received_at.tzinfo is UTC
        assert series.last_received_at.isoformat().endswith("+00:00")  # as `status` shows it
    finally:
        state.close()


def _series(directory: Path, slices: int, seed: str) -> list[Path]:
    """A small CT series of noise, with UIDs from `seed`: too few slices to be segmented."""
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    volume = Volume(rng.integers(-1000, 2000, (slices, 64, 64)).astype(np.int16), (0.8, 0.8, 2))
    return write_ct_series(volume, directory / seed, patient=PATIENT, uid_seed=seed)


def test_daemon_keeps_its_state_in_postgresql_across_a_sigkill(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    require("storescu")
    url = _database(postgres)
    slices = {"split-a": 12, "split-b": 9, "whole-c": 6, "whole-d": 10}
    files = {seed: _series(tmp_path / "ct", n, seed) for seed, n in slices.items()}
    uid_of = {seed: str(dcmread(paths[0]).SeriesInstanceUID) for seed, paths in files.items()}
    # Two series each split over two associations that start together (alternate slices, so
    # both halves arrive throughout), two sent whole: six associations at once. The idle time
    # is generous so that a slow start of one half does not complete its series early.
    associations = [files["whole-c"], files["whole-d"]]
    for seed in ("split-a", "split-b"):
        associations += [files[seed][0::2], files[seed][1::2]]
    node = NodeProcess(tmp_path / "node", complete_after_s=2.0, database=url).start()
    try:
        send_at_once(node.port, associations)
        node.wait_for_states(set(uid_of.values()), {"skipped"})
        # A resend of a whole series is all duplicates: nothing moves, nothing is counted twice.
        assert storescu(node.port, *files["whole-c"]).returncode == 0
        before = node.series()
        assert {uid: (s["instances"], s["state"], s["reason"]) for uid, s in before.items()} == {
            uid_of[seed]: (n, "skipped", f"too few slices ({n} < {MIN_SLICES})")
            for seed, n in slices.items()
        }
        engine = create_engine(url)
        try:
            with engine.connect() as connection:
                query = text("SELECT sop_instance_uid, file_name FROM instances")
                stored = {sop: name for sop, name in connection.execute(query)}
        finally:
            engine.dispose()
        sent = {str(dcmread(p).SOPInstanceUID) for paths in files.values() for p in paths}
        assert set(stored) == sent and set(stored.values()) == node.spool_files()
        assert not (node.data_dir / "node.db").exists()  # PostgreSQL, not SQLite by default

        node.kill()  # SIGKILL: no shutdown, whatever a transaction had open is rolled back
        node.start()
        status = node.status()  # one CLI run: each costs seconds on a busy machine
        assert {s["series_instance_uid"]: s for s in status["series"]} == before
        assert {state: n for state, n in status["counts"].items() if n} == {"skipped": len(slices)}
        assert node.stop() == 0, node.log.read_text()
    finally:
        node.kill()  # after a failure: leave no node behind
