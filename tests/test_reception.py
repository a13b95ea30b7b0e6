"""Reception against real peers over real sockets: DCMTK storescu/echoscu and Orthanc.

Each test runs `dicom-node serve` as a subprocess on a free loopback port with its own
data_dir (dicom_node/testbed/node_process.py) and stops it with SIGTERM, as an operator would.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.node_process import NodeProcess, start_storescu, storescu
from dicom_node.testbed.peers import PEER_ENV, OrthancProcess
from model.volume_io import Volume
from tests.support import require, require_data

J2K = JPEG2000Lossless
PATIENT = PatientInfo(name="RECEPTION^TESTPATIENT", patient_id="PID-RECEPTION-4711")
# Selected for segmentation shows as queued or any state after it (the worker may be quick).
SELECTED = {"queued", "segmenting", "sending", "done", "no_findings"}
SETTLED = {"skipped", "failed", *SELECTED}


def _series(directory: Path, slices: int, size: int, seed: str) -> list[Path]:
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    volume = Volume(rng.integers(-1000, 2000, (slices, size, size)).astype(np.int16), (0.8, 0.8, 2))
    return write_ct_series(volume, directory, patient=PATIENT, uid_seed=seed)


def _instances(folder: Path, fixed: Path) -> dict[Path, Any]:
    """Every DICOM instance under `folder` (not the Philips DIRFILEs, nor licences and other
    files that are not DICOM), header only.

    The TotalSegmentator example has empty SOP class, SOP instance, series and study UIDs:
    nothing a sender can put in a C-STORE request (storescu refuses it). Those are sent as
    copies under `fixed` with the UIDs filled in (SOP ones from the file meta, series and study
    from the folder name); everything else, JPEG 2000 pixel data included, as it is.
    """
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in ("DIRFILE", "LICENSE"):
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except InvalidDicomError:  # e.g. ibsi_sts/LICENSE.md
                continue
            if not ds.SOPInstanceUID:
                full = dcmread(path)
                full.SOPClassUID = full.file_meta.MediaStorageSOPClassUID
                full.SOPInstanceUID = full.file_meta.MediaStorageSOPInstanceUID
                for keyword in ("SeriesInstanceUID", "StudyInstanceUID"):
                    setattr(full, keyword, generate_uid(entropy_srcs=[path.parent.name, keyword]))
                path = fixed / path.parent.name / path.name
                path.parent.mkdir(parents=True, exist_ok=True)
                full.save_as(path)
                ds = dcmread(path, stop_before_pixels=True)
            found[path] = ds
    return found


def test_storescu_real_studies_grouped_by_series(node: NodeProcess, tmp_path: Path) -> None:
    data = require_data()
    require("storescu")
    instances = _instances(data, tmp_path / "fixed")
    folders = sorted({path.parent for path in instances})
    for folder in folders:  # one association per folder, as a scanner sends series
        files = [p for p in instances if p.parent == folder]
        # storescu proposes uncompressed syntaxes only, unless told to propose the file's.
        j2k = any(instances[p].file_meta.TransferSyntaxUID == J2K for p in files)
        result = storescu(node.port, *files, extra=("-xv",) if j2k else ())
        assert result.returncode == 0, f"{folder}: {result.stdout}{result.stderr}"

    expected = Counter(str(ds.SeriesInstanceUID) for ds in instances.values())
    node.wait_for_states(set(expected), SETTLED)
    series = node.series()
    assert {uid: s["instances"] for uid, s in series.items()} == expected
    # Scouts and secondary captures are kept but not segmented; regular axial CT is queued.
    outcome = {}
    for path, ds in instances.items():
        found = series[str(ds.SeriesInstanceUID)]
        outcome[f"{path.parent.parent.name}/{path.parent.name}"] = (found["state"], found["reason"])
    for scan in ("S21570", "S21610"):
        assert outcome[f"{scan}/S1000"] == ("skipped", "localizer")
        assert outcome[f"{scan}/S4010"] == ("skipped", "secondary capture")
    # Heads, by their Body Part Examined: no bone of the legs to find, no inference spent.
    for folder in ("S21570/S2010", "S21610/S2010", "S21610/S3010"):
        assert outcome[folder] == ("skipped", "body part examined BRAIN (series.skip_body_parts)")
    assert outcome["dcm_qa_ct/GE"] == (
        "skipped",
        "body part examined HEAD (series.skip_body_parts)",
    )
    # A slab of a body (PARTIALBODY) is segmented; the "bones" a phantom-trained model finds in
    # it cannot be a lower extremity's, so no SEG comes of it.
    body = "fixed/totalseg_example_ct_dicom"
    assert outcome[body][0] in SELECTED, outcome
    (body_uid,) = {str(ds.SeriesInstanceUID) for p, ds in instances.items() if "totalseg" in str(p)}
    node.wait_for_states({body_uid}, {"no_findings", "done", "failed"}, timeout=300)
    state, reason = node.series()[body_uid]["state"], node.series()[body_uid]["reason"]
    assert state == "no_findings" and "anatomically implausible" in reason, reason
    assert all(s["calling_ae"] == "SCANNER" for s in series.values())
    # Every instance is on disk under a name the node chose, as it was sent.
    stored = node.db_instances()
    assert set(stored) == {str(ds.SOPInstanceUID) for ds in instances.values()}
    assert set(stored.values()) == node.spool_files()
    assert all(re.fullmatch(r"[0-9a-f]{32}\.dcm", name) for name in stored.values())
    # The JPEG 2000 series is kept in its transfer syntax, pixel data intact.
    j2k = next(p for p, ds in instances.items() if ds.file_meta.TransferSyntaxUID == J2K)
    spooled = dcmread(node.data_dir / "spool" / stored[str(instances[j2k].SOPInstanceUID)])
    assert spooled.file_meta.TransferSyntaxUID == J2K
    assert np.array_equal(spooled.pixel_array, dcmread(j2k).pixel_array)


def test_duplicates_are_idempotent_and_a_late_instance_reopens(
    node: NodeProcess, tmp_path: Path
) -> None:
    require("storescu")
    paths = _series(tmp_path / "ct", 12, 64, "duplicates")
    assert storescu(node.port, *paths).returncode == 0
    uid = str(dcmread(paths[0]).SeriesInstanceUID)
    node.wait_for_states({uid}, SETTLED)
    assert node.series()[uid]["reason"] == "too few slices (12 < 20)"
    assert storescu(node.port, *paths[:5]).returncode == 0  # a resend changes nothing
    assert node.series()[uid]["state"] == "skipped"
    assert len(node.db_instances()) == len(node.spool_files()) == 12
    # Files are the received bytes behind the node's file meta: same dataset, same pixels.
    original = dcmread(paths[3])
    spooled = dcmread(node.data_dir / "spool" / node.db_instances()[original.SOPInstanceUID])
    assert spooled == original
    assert spooled.file_meta.SourceApplicationEntityTitle == "SCANNER"
    # One more slice of the same series (same seed, same UIDs) reopens it: a new generation.
    later = _series(tmp_path / "ct13", 13, 64, "duplicates")[-1]
    assert storescu(node.port, later).returncode == 0
    node.wait_for_states({uid}, SETTLED)  # reopened (receiving), then completed again
    series = node.series()[uid]
    assert (series["state"], series["generation"], series["instances"]) == ("skipped", 2, 13)
    log = node.log.read_text()
    assert PATIENT.name not in log and PATIENT.patient_id not in log


def test_orthanc_routes_a_study_to_the_node(
    node: NodeProcess, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    paths = _series(tmp_path / "ct", 10, 64, "orthanc")
    orthanc.add_modality("node", "BONESEG", "127.0.0.1", node.port)
    uploads = [orthanc.upload(p) for p in paths]
    studies = {upload["ParentStudy"] for upload in uploads}
    result = orthanc.store_to("node", sorted(studies))
    assert result["InstancesCount"] == 10 and result["FailedInstancesCount"] == 0
    assert set(node.db_instances()) == {str(dcmread(p).SOPInstanceUID) for p in paths}
    assert next(iter(node.series().values()))["calling_ae"] == "ORTHANC"


def test_sigkill_mid_transfer_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    require("storescu")
    paths = _series(tmp_path / "ct", 40, 256, "sigkill")
    uid_of = {str(p): str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    # Longer than the node is down below: what is resent after the restart must find the
    # series still open.
    node = NodeProcess(tmp_path / "node", complete_after_s=4).start()
    try:
        sender = start_storescu(node.port, *paths)
        assert sender.stdout is not None
        acknowledged, sending = [], None
        for line in sender.stdout:  # "Sending file: X" ... "Received Store Response (Success)"
            if match := re.search(r"Sending file: (\S+)", line):
                sending = match.group(1)
            elif "Received Store Response (Success)" in line:
                acknowledged.append(uid_of[sending])
                if len(acknowledged) == 10:
                    node.process.send_signal(signal.SIGKILL)
        sender.wait(timeout=30)
        node.kill()
        assert 10 <= len(acknowledged) < 40, "the kill did not land mid-transfer"
        time.sleep(5)  # down for longer than complete_after_s: the scanner waits to resend

        node.start()  # restart: nothing acknowledged is lost, debris of the crash is gone
        stored = node.db_instances()
        assert set(acknowledged) <= set(stored)
        assert set(stored.values()) == node.spool_files()
        for sop_uid, name in stored.items():
            assert dcmread(node.data_dir / "spool" / name).SOPInstanceUID == sop_uid

        assert storescu(node.port, *paths).returncode == 0  # resend all: the rest completes
        assert set(node.db_instances()) == set(uid_of.values())
        series_uid = str(dcmread(paths[0]).SeriesInstanceUID)
        node.wait_for_states({series_uid}, SETTLED | {"complete"})
        # The restart gave the senders a whole idle window: the part received before the crash
        # was not completed on its own, so the resent rest did not reopen it for a second SEG.
        assert node.series()[series_uid]["generation"] == 1
        assert node.series()[series_uid]["instances"] == 40
    finally:
        assert node.stop() == 0, node.log.read_text()


def test_calling_ae_not_allowed_is_rejected(tmp_path: Path) -> None:
    echoscu = require("echoscu")
    node = NodeProcess(tmp_path, allowed_calling_aets=["SCANNER", "PACS"]).start()
    try:

        def echo(aet: str) -> int:
            command = [echoscu, "-aet", aet, "-aec", "BONESEG", "127.0.0.1", str(node.port)]
            return subprocess.run(command, capture_output=True, env=PEER_ENV).returncode

        assert echo("INTRUDER") != 0
        assert echo("PACS") == 0
    finally:
        assert node.stop() == 0


def test_failed_disk_write_answers_a_failure_status(node: NodeProcess, tmp_path: Path) -> None:
    require("storescu")
    paths = _series(tmp_path / "ct", 2, 64, "disk-failure")
    spool = node.data_dir / "spool"
    shutil.rmtree(spool)
    spool.write_text("not a directory")  # every write into the spool now fails (also as root)
    result = storescu(node.port, paths[0], verbose=True)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Received Store Response (Refused: OutOfResources)" in output, output
    assert "Received Store Response (Success)" not in output
    assert node.db_instances() == {}
    spool.unlink()  # the node must still be able to stop cleanly


def test_status_with_and_without_the_daemon(tmp_path: Path) -> None:
    require("storescu")
    node = NodeProcess(tmp_path / "node")
    status = node.status()  # never started: no database, nothing running
    assert status["running"] is False and status["series"] == []
    assert not node.data_dir.exists(), "status must not create the data_dir"

    node.start()
    try:
        status = node.status()
        assert status["running"] is True and status["pid"] == node.process.pid
        storescu(node.port, *_series(tmp_path / "ct", 3, 64, "status"))
        human = node.cli("status")
        assert human.returncode == 0 and "running" in human.stdout
    finally:
        assert node.stop() == 0
    assert not (node.data_dir / "node.pid").exists()
    status = node.status()
    assert status["running"] is False
    (series,) = status["series"]
    assert series["instances"] == 3 and series["state"] in SETTLED | {"receiving", "complete"}
    assert {"series_instance_uid", "state", "reason", "instances"} <= set(series)


def test_compressed_and_deflated_transfer_syntaxes_kept_as_sent(
    node: NodeProcess, tmp_path: Path
) -> None:
    require("storescu")
    paths = _series(tmp_path / "ct", 4, 64, "syntaxes")
    # (compressor, storescu option proposing its syntax, the syntax); storescu does not
    # transcode to compressed syntaxes, so files are compressed first, as the peers doc says.
    cases = [
        ("dcmcjpeg", "-xs", JPEGLosslessSV1),
        ("dcmcjpls", "-xt", JPEGLSLossless),
        ("dcmcrle", "-xr", RLELossless),
        ("dcmconv", "-xd", DeflatedExplicitVRLittleEndian),
    ]
    for path, (tool, option, syntax) in zip(paths, cases, strict=True):
        sent = tmp_path / f"{tool}.dcm"
        command = [require(tool), str(path), str(sent)]
        if tool == "dcmconv":
            command.insert(1, "+td")  # write deflated explicit VR little endian
        subprocess.run(command, check=True, capture_output=True)
        result = storescu(node.port, sent, extra=(option,))
        assert result.returncode == 0, result.stdout + result.stderr
        original = dcmread(path)
        spooled = dcmread(node.data_dir / "spool" / node.db_instances()[original.SOPInstanceUID])
        assert spooled.file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(spooled.pixel_array, original.pixel_array)


def test_sigterm_lets_the_association_in_flight_finish(tmp_path: Path) -> None:
    require("storescu")
    paths = _series(tmp_path / "ct", 30, 128, "sigterm")
    node = NodeProcess(tmp_path / "node").start()
    try:
        sender = start_storescu(node.port, *paths)
        assert sender.stdout is not None
        acknowledged = 0
        for line in sender.stdout:
            if "Received Store Response (Success)" in line:
                acknowledged += 1
                if acknowledged == 5:
                    node.process.send_signal(signal.SIGTERM)
        assert sender.wait(timeout=30) == 0 and acknowledged == 30
        assert node.process.wait(timeout=30) == 0
        assert len(node.db_instances()) == 30
        assert not (node.data_dir / "node.pid").exists()
    finally:
        node.kill()
