"""The whole node: a CT series in over C-STORE, its SEG out to a real PACS (Orthanc).

Every test runs `dicom-node serve` as a process with its inference worker, sends with DCMTK
storescu, and checks what Orthanc holds, what the CLI reports and what dciodvfy says.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.app.config import Config, DeliveryConfig, Destination
from dicom_node.pipeline.deliver import backoff_s, next_attempt_at
from dicom_node.pipeline.segment import resolve_targets
from dicom_node.pipeline.state import Target, utcnow
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.node_process import NodeProcess, destination_toml, storescu
from dicom_node.testbed.peers import OrthancProcess
from model.labels import BONE_NAMES
from model.volume_io import Volume, read_volume
from tests.support import ROOT, PhantomSeries, dciodvfy_errors

# What the shipped (phantom-trained, under-trained) weights reach on any bone vs background;
# the SEG must carry that mask onto the source frames, so the same bound applies.
BONE_MASK_DICE = 0.85
PROCESSED = {"done", "no_findings", "failed"}


@pytest.fixture(scope="module")
def hip_phantom(phantom_series: PhantomSeries) -> dict[str, Path]:
    """A small hip CT series (femur and hip bone of one side) and its truth."""
    return phantom_series(1003)


def _no_bone_series(directory: Path) -> Path:
    """A soft-tissue cylinder in air, 30 slices: a CT with none of the six bones."""
    _, y, x = np.mgrid[:30, :64, :64]
    hu = np.where((y - 32) ** 2 + (x - 32) ** 2 < 26**2, 40, -1000).astype(np.int16)
    volume = Volume(hu, spacing=(1.5, 1.5, 2.0), origin=(-48.0, -48.0, 0.0))
    write_ct_series(
        volume,
        directory,
        patient=PatientInfo(name="NOBONE^TEST", patient_id="NB1", sex="O"),
        uid_seed="no-bone-test",
    )
    return directory


def _ct_uids_in_z_order(ct_dir: Path) -> list[str]:
    headers = [dcmread(p, stop_before_pixels=True) for p in sorted(ct_dir.iterdir())]
    headers.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return [str(ds.SOPInstanceUID) for ds in headers]


def _seg_bones(seg: hd.seg.Segmentation, source_uids: list[str]) -> np.ndarray:
    """The SEG as a bone label map (0..6) on the source slices, in the given order."""
    pixels = seg.get_pixels_by_source_instance(source_uids, combine_segments=True)
    bones = np.zeros(pixels.shape, np.uint8)
    for number in seg.segment_numbers:
        label = seg.get_segment_description(number).segment_label.lower()
        bone = next(b for b, name in BONE_NAMES.items() if label.endswith(name))
        bones[pixels == number] = bone
    return bones


def _job(node: NodeProcess, job_id: int) -> dict[str, Any]:
    result = node.cli("job", str(job_id), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_ct_series_comes_back_as_seg_in_the_same_study(
    tmp_path: Path, orthanc: OrthancProcess, hip_phantom: dict[str, Path]
) -> None:
    node = NodeProcess(tmp_path, extra_config=destination_toml(orthanc.destination())).start()
    try:
        no_bone = _no_bone_series(tmp_path / "no_bone")
        for folder in (hip_phantom["ct"], no_bone):
            result = storescu(node.port, folder, extra=("+sd", "+r"))
            assert result.returncode == 0, result.stderr
        ct = dcmread(next(hip_phantom["ct"].iterdir()), stop_before_pixels=True)
        empty = dcmread(next(no_bone.iterdir()), stop_before_pixels=True)
        uids = {str(ct.SeriesInstanceUID), str(empty.SeriesInstanceUID)}
        node.wait_for_states(uids, PROCESSED, timeout=240)
        series = node.series()
        status = series[str(ct.SeriesInstanceUID)]
        assert status["state"] == "done", status
        assert series[str(empty.SeriesInstanceUID)]["state"] == "no_findings"
        assert status["delivered_to"] == ["pacs"]
    finally:
        node.stop()

    # Orthanc holds one SEG, in the CT's study and patient (none for the bone-less series).
    (seg_series,) = orthanc.find_series("SEG", StudyInstanceUID=str(ct.StudyInstanceUID))
    assert orthanc.find_series("SEG", StudyInstanceUID=str(empty.StudyInstanceUID)) == []
    (instance,) = orthanc.instances_of_series(seg_series["ID"])
    path = tmp_path / "seg.dcm"
    path.write_bytes(orthanc.download(instance["ID"]))
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    assert seg.SOPInstanceUID == status["seg_sop_instance_uid"]
    # A normal result: confident (model/engine/verdict.py), so sent unmarked under the default
    # policy.
    assert status["verdict"] == "confident" and status["verdict_reasons"] == []
    assert seg.SeriesDescription == Config().seg.series_description
    assert (seg.StudyInstanceUID, seg.PatientID) == (ct.StudyInstanceUID, ct.PatientID)
    assert seg.PatientName == ct.PatientName

    # Its segments are the ones the node reported, and its mask overlays the truth.
    job = _job(node, status["id"])
    reported = {f"{s['side']} {s['bone']}" for s in job["result"]["segments"]}
    labels = {seg.get_segment_description(n).segment_label.lower() for n in seg.segment_numbers}
    assert labels == reported and labels
    assert all(0 <= s["unsure_percent"] < 50 for s in job["result"]["segments"])
    shown = node.cli("job", str(status["id"]))
    assert shown.returncode == 0 and "unsure (%)" in shown.stdout, shown.stderr
    bones = _seg_bones(seg, _ct_uids_in_z_order(hip_phantom["ct"]))
    truth = read_volume(hip_phantom["labels"]).array
    dice = 2 * np.sum((bones > 0) & (truth > 0)) / (np.sum(bones > 0) + np.sum(truth > 0))
    assert dice >= BONE_MASK_DICE
    assert [t["to"] for t in job["timeline"]][-4:] == ["queued", "segmenting", "sending", "done"]
    assert set(job["result"]["timings_s"]) >= {"assemble_s", "segment_s", "seg_encode_s"}


def test_delivery_retries_gives_up_and_dicom_node_retry_delivers(
    tmp_path: Path, hip_phantom: dict[str, Path]
) -> None:
    pacs = OrthancProcess(tmp_path / "orthanc")  # its ports are chosen; it is not up yet
    delivery = {"max_attempts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 0.4, "timeout_s": 5}
    node = NodeProcess(
        tmp_path / "node", extra_config=destination_toml(pacs.destination(), **delivery)
    ).start()
    try:
        uid = node.send_series(hip_phantom["ct"])
        node.wait_for_states({uid}, PROCESSED, timeout=240)
        status = node.series()[uid]
        assert status["state"] == "failed"
        assert "delivery to pacs failed after 3 attempts" in status["reason"]
        (attempts,) = _job(node, status["id"])["deliveries"]
        assert attempts["attempts"] == 3 and attempts["state"] == "failed"
        assert node.cli("echo", "pacs").returncode == 1

        with pacs:
            echo = node.cli("echo", "pacs")
            assert echo.returncode == 0 and "ok" in echo.stdout, echo.stderr
            retry = node.cli("retry", str(status["id"]))
            assert retry.returncode == 0 and "sending" in retry.stdout, retry.stderr
            node.wait_for_states({uid}, {"done"}, timeout=60)
            assert (
                len(
                    pacs.wait_for_series("SEG", SeriesInstanceUID=status["seg_series_instance_uid"])
                )
                == 1
            )
            again = node.cli("retry", str(status["id"]))
            assert again.returncode == 2 and "only failed jobs" in again.stderr
    finally:
        node.stop()


def test_worker_crash_is_retried_and_reception_goes_on(
    tmp_path: Path, hip_phantom: dict[str, Path]
) -> None:
    node = NodeProcess(tmp_path).start()  # no destinations: done once the SEG is written
    try:
        first_worker = node.worker_pid()
        uid = node.send_series(hip_phantom["ct"])
        node.wait_for_db_state(uid, {"segmenting"}, 60)
        os.kill(first_worker, signal.SIGKILL)
        # Reception does not notice: another series is stored meanwhile.
        no_bone = _no_bone_series(tmp_path / "no_bone")
        assert storescu(node.port, no_bone, extra=("+sd", "+r")).returncode == 0
        node.wait_for_states({uid}, PROCESSED, timeout=240)
        status = node.series()[uid]
        assert status["state"] == "done", status
        reasons = [t["reason"] or "" for t in _job(node, status["id"])["timeline"]]
        assert any("worker died (exit -9); retry 1 of 1" in r for r in reasons), reasons
        assert node.worker_pid() != first_worker
    finally:
        node.stop()


def test_worker_hang_fails_the_job_with_the_time_out(
    tmp_path: Path, hip_phantom: dict[str, Path]
) -> None:
    node = NodeProcess(tmp_path, extra_config="[worker]\ntimeout_s = 0.2\nretries = 0\n").start()
    try:
        first_worker = node.worker_pid()
        uid = node.send_series(hip_phantom["ct"])
        node.wait_for_states({uid}, PROCESSED, timeout=120)
        status = node.series()[uid]
        assert status["state"] == "failed"
        assert status["reason"] == "timed out after 0.2 s (worker.timeout_s)"
        assert node.worker_pid() != first_worker  # replaced, warm for the next series
    finally:
        node.stop()


def test_offline_segment_writes_a_valid_seg(tmp_path: Path, hip_phantom: dict[str, Path]) -> None:
    out = tmp_path / "seg.dcm"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "segment",
            str(hip_phantom["ct"]),
            "-o",
            str(out),
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert dciodvfy_errors(out) == []
    seg = hd.seg.segread(out)
    assert seg.SeriesDescription == Config().seg.series_description
    assert len(seg.segment_numbers) >= 1


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    config = DeliveryConfig(max_attempts=5, backoff_initial_s=10, backoff_max_s=60, jitter=0.2)
    rng = random.Random(1)
    for attempt, base in ((1, 10), (2, 20), (3, 40), (4, 60), (9, 60)):
        waits = [backoff_s(attempt, config, rng) for _ in range(200)]
        assert base <= min(waits) and max(waits) <= base * 1.2
        assert max(waits) - min(waits) > base * 0.1  # jittered, not lockstep
    now = utcnow()
    assert next_attempt_at(4, config, rng, now) is not None
    assert next_attempt_at(5, config, rng, now) is None  # attempts spent


def test_reply_to_caller_sends_to_the_sender() -> None:
    config = Config(
        destinations=(
            Destination("pacs", "ORTHANC", "10.0.0.5", 4242),
            Destination("back", "ANY", "127.0.0.1", 104, reply_to_caller=True),
        )
    )
    assert resolve_targets(config, "CT_SCANNER", "10.1.2.3") == [
        Target("pacs", "ORTHANC", "10.0.0.5", 4242),
        Target("back", "CT_SCANNER", "10.1.2.3", 104),
    ]
