"""The CT series writer, checked against an independent reader (SimpleITK/GDCM) and dciodvfy."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.testbed.ct_series import PatientInfo, StudyInfo, write_ct_series
from model.volume_io import Volume
from tests.support.series import assert_same_volume, read_series

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENT = PatientInfo(name="TEST^SERIES", patient_id="T1", sex="O")
_COS10, _SIN10 = math.cos(math.radians(10)), math.sin(math.radians(10))
ROTATED_10_ABOUT_Z = (_COS10, -_SIN10, 0.0, _SIN10, _COS10, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _volume(low: int, high: int, direction: tuple[float, ...] = IDENTITY) -> Volume:
    """A small volume spanning low..high exactly, with rows != columns and anisotropic spacing."""
    array = np.random.default_rng(7).integers(low, high + 1, size=(5, 6, 9), dtype=np.int16)
    array[0, 0, 0], array[-1, -1, -1] = low, high
    return Volume(
        array, spacing=(0.7, 0.9, 2.5), origin=(-120.5, 33.25, -812.0), direction=direction
    )


@pytest.mark.parametrize("direction", [IDENTITY, ROTATED_10_ABOUT_Z], ids=["axial", "rotated"])
@pytest.mark.parametrize(("low", "high"), [(-1024, 3071), (-3000, 12000)], ids=["12bit", "16bit"])
def test_series_reads_back_as_the_volume(
    tmp_path: Path, direction: tuple[float, ...], low: int, high: int
) -> None:
    volume = _volume(low, high, direction)
    paths = write_ct_series(volume, tmp_path, patient=PATIENT)

    assert [p.name for p in paths] == [f"CT{i:06d}.dcm" for i in range(1, 6)]
    assert_same_volume(read_series(tmp_path), volume)


def test_left_handed_volume_is_written_as_the_same_image(tmp_path: Path) -> None:
    """DICOM slices have no direction of their own, so a z-flipped volume comes back unflipped."""
    volume = _volume(-1024, 3071, direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    write_ct_series(volume, tmp_path, patient=PATIENT)

    last_slice_z = volume.origin[2] - volume.spacing[2] * (volume.array.shape[0] - 1)
    expected = Volume(
        volume.array[::-1], volume.spacing, (*volume.origin[:2], last_slice_z), IDENTITY
    )
    assert_same_volume(read_series(tmp_path), expected)


def test_headers(tmp_path: Path) -> None:
    study = StudyInfo(accession_number="A1", description="legs", referring_physician="DOC^TOR")
    paths = write_ct_series(
        _volume(-1024, 3071), tmp_path, patient=PATIENT, study=study, slice_thickness_mm=3.0
    )
    first, last = (pydicom.dcmread(paths[i]) for i in (0, -1))

    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == first.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
    assert first.SOPInstanceUID == first.file_meta.MediaStorageSOPInstanceUID
    assert (first.Modality, first.RescaleType, first.PatientName) == ("CT", "HU", "TEST^SERIES")
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (first.BitsStored, first.PixelRepresentation, first.RescaleIntercept) == (12, 0, -1024)
    assert [float(v) for v in first.PixelSpacing] == [0.9, 0.7]  # row (y), then column (x)
    assert float(first.SliceThickness) == 3.0
    assert (first.InstanceNumber, last.InstanceNumber) == (1, 5)
    assert float(last.SliceLocation) - float(first.SliceLocation) == pytest.approx(4 * 2.5)
    assert first.AccessionNumber == "A1"


def test_uids_are_deterministic_with_a_seed_and_unique_per_slice(tmp_path: Path) -> None:
    volume = _volume(-1024, 3071)
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID")

    def uids(name: str, seed: str | None) -> list[tuple[str, ...]]:
        paths = write_ct_series(volume, tmp_path / name, patient=PATIENT, uid_seed=seed)
        datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        return [tuple(str(ds[k].value) for k in keys) for ds in datasets]

    first, again, other = uids("a", "seed-1"), uids("b", "seed-1"), uids("c", "seed-2")
    assert first == again
    assert len({row[3] for row in first}) == len(first)
    assert len({row[:3] for row in first}) == 1  # one study, series and frame of reference
    all_first = {uid for row in first for uid in row}
    assert not {uid for row in other for uid in row} & all_first
    random_1, random_2 = uids("d", None), uids("e", None)
    assert not {uid for row in random_1 for uid in row} & {uid for row in random_2 for uid in row}


def test_refuses_what_it_cannot_write_faithfully(tmp_path: Path) -> None:
    volume = _volume(-1024, 3071)
    with pytest.raises(ValueError, match="whole Hounsfield"):
        write_ct_series(volume.with_array(volume.array + 0.5), tmp_path / "a", patient=PATIENT)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "other.dcm").touch()
    with pytest.raises(FileExistsError):
        write_ct_series(volume, tmp_path / "b", patient=PATIENT)


def test_dciodvfy_finds_no_errors(tmp_path: Path) -> None:
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    paths = write_ct_series(_volume(-1024, 3071, ROTATED_10_ABOUT_Z), tmp_path, patient=PATIENT)
    result = subprocess.run([dciodvfy, str(paths[0])], capture_output=True, text=True, check=False)
    report = (result.stdout + result.stderr).splitlines()
    assert "CTImage" in report, report  # it recognised the IOD it checked
    assert [line for line in report if line.startswith("Error")] == []
