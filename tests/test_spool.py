"""The spool on its own: the free-space watermark, writes that fail midway, and the recovery
at start of files whose tail is malformed (tests/test_disk_full.py fills a real disk)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from dicom_node.net.receive import Reception
from dicom_node.pipeline.spool import LowDiskSpaceError, Spool, write_durably
from dicom_node.pipeline.state import NodeState, Recorded
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from model.volume_io import Volume


@pytest.fixture
def state(tmp_path: Path):
    state = NodeState(f"sqlite:///{tmp_path / 'node.db'}")
    yield state
    state.close()


def test_watermark_refuses_before_writing_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    free = spool.free_bytes()
    spool.min_free_bytes = free + (1 << 30)  # more than the disk has: every write refused
    with caplog.at_level(logging.INFO, logger="dicom_node.pipeline.spool"):
        for _ in range(3):
            with pytest.raises(LowDiskSpaceError) as refused:
                spool.write([b"DICM"])
        assert refused.value.errno == 28  # ENOSPC: an OSError like any full disk
        assert list((tmp_path / "spool").iterdir()) == []  # not even a temporary file
        spool.min_free_bytes = max(1, free - (64 << 20))  # space freed
        written = spool.write([b"DICM"])
    assert spool.names() == {written.name}
    messages = [record.getMessage() for record in caplog.records]
    assert sum("refusing C-STOREs" in m for m in messages) == 1
    assert sum("accepting C-STOREs (3 refused meanwhile)" in m for m in messages) == 1


def test_a_write_failing_midway_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "x.dcm"
    with pytest.raises(TypeError):  # the second part is not bytes: the write fails after one
        write_durably(target, [b"DICM" * 1000, 12345])  # type: ignore[list-item]
    assert list(tmp_path.iterdir()) == []


def _spooled_series(tmp_path: Path, spool: Spool) -> list[Path]:
    """Three CT instances written to the spool as reception would (file meta + dataset)."""
    volume = Volume(np.zeros((3, 8, 8), np.int16), (1.0, 1.0, 1.0))
    paths = write_ct_series(volume, tmp_path / "ct", patient=PatientInfo("A^B", "1"))
    return [spool.path(spool.write([path.read_bytes()]).name) for path in paths]


def test_recovery_keeps_a_file_whose_tail_is_malformed(tmp_path: Path, state: NodeState) -> None:
    """Reception acknowledged it (its leading elements were fine): it must not be lost."""
    spool = Spool(tmp_path / "spool")
    first, second, third = _spooled_series(tmp_path, spool)
    data = first.read_bytes()
    first.write_bytes(data[: len(data) - 40] + b"\xff\xff\xff\xff" * 10)  # a broken tail
    second.write_bytes(second.read_bytes()[:-100])  # truncated in the pixel data
    told: list[Recorded] = []
    assert Reception(spool, state, told.append).recover() == 3
    assert state.file_names() == {first.name, second.name, third.name}


def test_recovery_discards_unreadable_files_without_stopping_the_start(
    tmp_path: Path, state: NodeState
) -> None:
    spool = Spool(tmp_path / "spool")
    good, bad, worse = _spooled_series(tmp_path, spool)
    bad.write_bytes(bad.read_bytes()[:200])  # cut inside the file meta
    worse.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)  # junk after the prefix
    assert Reception(spool, state, lambda _: None).recover() == 1
    assert state.file_names() == spool.names() == {good.name}
