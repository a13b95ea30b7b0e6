"""A full disk, with a real node on a small file system (a tmpfs mounted as its data_dir).

With the free-space watermark (`[node] min_free_mb`) the node refuses new instances with
out-of-resources (0xA700) before the disk fills; without it, a write the disk fails midway
(ENOSPC) answers 0xA700 too. Either way every acknowledged instance is on disk and recorded,
nothing partial is left or counted, the node stays up, and it accepts again once space is
freed. Mounting needs root: the tests skip otherwise.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.net.statuses import OUT_OF_RESOURCES, SUCCESS
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.node_process import AE_TITLE, NodeProcess
from model.volume_io import Volume
from tests.support.disk import MIB, free_bytes, write_ballast

PATIENT = PatientInfo(name="DISKFULL^TESTPATIENT", patient_id="PID-DISKFULL-0042")


def _series(directory: Path, slices: int) -> list[Path]:
    """256 x 256 int16 slices: 131 KB per instance."""
    rng = np.random.default_rng(11)
    hu = rng.integers(-1000, 2000, (slices, 256, 256)).astype(np.int16)
    return write_ct_series(Volume(hu, (0.8, 0.8, 2.0)), directory, patient=PATIENT)


def _send(port: int, paths: list[Path]) -> dict[Path, int]:
    """C-STORE each file on one association; the status of each (-1: no answer)."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        statuses = {}
        for path in paths:
            answer = assoc.send_c_store(path)
            statuses[path] = int(answer.Status) if "Status" in answer else -1
        return statuses
    finally:
        assoc.release()


def _echo(port: int) -> bool:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


def _assert_consistent(node: NodeProcess, acknowledged: set[str]) -> None:
    """Exactly the acknowledged instances are recorded, each in a complete spool file."""
    recorded = node.db_instances()
    assert set(recorded) == acknowledged
    files = list((node.data_dir / "spool").iterdir())
    assert not [f.name for f in files if not f.name.endswith(".dcm")]  # no .part left
    assert {f.name for f in files} == set(recorded.values())
    for uid, name in recorded.items():
        assert (
            dcmread(node.data_dir / "spool" / name, stop_before_pixels=True).SOPInstanceUID == uid
        )


def _uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_watermark_refuses_before_the_disk_fills(small_disk: Path, tmp_path: Path) -> None:
    paths = _series(tmp_path / "ct", 150)  # 19.7 MB: more than the small disk leaves
    node = NodeProcess(tmp_path / "node", complete_after_s=600, min_free_mb=8)
    ballast = write_ballast(small_disk, 12 * MIB)  # 32 - 12 - 8: room for ~90 instances
    node.start()
    try:
        statuses = _send(node.port, paths)
        assert set(statuses.values()) == {SUCCESS, OUT_OF_RESOURCES}, statuses
        refused = [p for p, status in statuses.items() if status == OUT_OF_RESOURCES]
        accepted = [p for p, status in statuses.items() if status == SUCCESS]
        assert len(accepted) >= 50
        # Refused before the disk filled: the watermark's 8 MiB are still free (but for
        # what the database's last commits took).
        assert free_bytes(small_disk) > 6 * MIB
        assert _echo(node.port)
        _assert_consistent(node, _uids(accepted))
        log = node.log.read_text()
        assert "below the node.min_free_mb watermark (8 MiB)" in log
        assert log.count("refusing C-STOREs") == 1  # once, not once per refused instance

        ballast.unlink()  # space freed: the refused instances are accepted now
        assert set(_send(node.port, refused).values()) == {SUCCESS}
        _assert_consistent(node, _uids(paths))
        log = node.log.read_text()
        assert f"accepting C-STOREs ({len(refused)} refused meanwhile)" in log
        assert PATIENT.name not in log and PATIENT.patient_id not in log
    finally:
        assert node.stop() == 0, node.log.read_text()


def test_write_failing_midway_leaves_nothing_partial(small_disk: Path, tmp_path: Path) -> None:
    paths = _series(tmp_path / "ct", 40)  # 5.2 MB
    node = NodeProcess(tmp_path / "node", complete_after_s=600, min_free_mb=0).start()
    try:
        # Fill the disk but for ~1.5 MB: about ten instances fit, the next write hits ENOSPC.
        ballast = write_ballast(small_disk, free_bytes(small_disk) - 1536 * 1024)
        statuses = _send(node.port, paths)
        assert set(statuses.values()) == {SUCCESS, OUT_OF_RESOURCES}, statuses
        accepted = {p for p, status in statuses.items() if status == SUCCESS}
        assert _echo(node.port)
        _assert_consistent(node, _uids(sorted(accepted)))
        assert "No space left on device" in node.log.read_text()

        ballast.unlink()
        rest = [p for p in paths if p not in accepted]
        assert set(_send(node.port, rest).values()) == {SUCCESS}
        _assert_consistent(node, _uids(paths))
    finally:
        assert node.stop() == 0, node.log.read_text()


def _fill(data_dir: Path) -> Path:
    """Fill the small disk to the last byte: every write that needs a new block fails."""
    ballast = data_dir / "ballast"
    with ballast.open("wb", buffering=0) as file:
        for chunk in (MIB, 4096, 1):
            try:
                while True:
                    file.write(b"\xff" * chunk)
            except OSError:  # ENOSPC: on to a smaller chunk
                continue
    assert free_bytes(data_dir) == 0
    return ballast


def test_completion_survives_a_database_write_failure(small_disk: Path, tmp_path: Path) -> None:
    """The idle timer fires while the disk is full: the database cannot record the series'
    completion. The timer is armed again and the series moves on once space is freed."""
    paths = _series(tmp_path / "ct", 5)
    node = NodeProcess(tmp_path / "node", complete_after_s=2, min_free_mb=0).start()
    try:
        assert set(_send(node.port, paths).values()) == {SUCCESS}
        (uid,) = {str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in paths}
        ballast = _fill(small_disk)
        deadline = time.monotonic() + 30
        while "completion could not be recorded" not in node.log.read_text():
            assert time.monotonic() < deadline, node.log.read_text()
            time.sleep(0.2)
        assert node.series()[uid]["state"] == "receiving"

        ballast.unlink()
        node.wait_for_states({uid}, {"skipped"})  # five slices: too few to segment
        assert "too few slices" in node.series()[uid]["reason"]
    finally:
        assert node.stop() == 0, node.log.read_text()
