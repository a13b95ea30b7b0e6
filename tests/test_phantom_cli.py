"""`dicom-node phantom`: the DICOM series is the NIfTI phantom, with its truth on the same grid."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.app.cli import main
from model.volume_io import read_volume
from tests.support.series import assert_same_volume, read_series

PHANTOM_ARGS = ["phantom", "--seed", "3", "--size", "small"]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """The seed-3 small phantom written as DICOM and as NIfTI, and what the DICOM run printed."""
    dicom_dir = tmp_path_factory.mktemp("dicom")
    nifti_dir = tmp_path_factory.mktemp("nifti")
    capture = tmp_path_factory.mktemp("stdout") / "printed.txt"
    with capture.open("w") as stdout, contextlib.redirect_stdout(stdout):
        assert main([*PHANTOM_ARGS, "--out", str(dicom_dir), "--format", "dicom"]) == 0
    assert main([*PHANTOM_ARGS, "--out", str(nifti_dir), "--format", "nifti"]) == 0
    return dicom_dir, nifti_dir, capture.read_text().splitlines()


def test_dicom_series_is_the_nifti_phantom(written: tuple[Path, Path, list[str]]) -> None:
    dicom_dir, nifti_dir, printed = written
    assert printed == [str(dicom_dir / name) for name in ("ct", "labels.nii.gz", "geometry.json")]

    series = read_series(dicom_dir / "ct")
    assert_same_volume(series, read_volume(nifti_dir / "image.nii.gz"))
    labels = read_volume(dicom_dir / "labels.nii.gz")
    assert_same_volume(series.with_array(labels.array), labels)  # truth on the series' grid
    np.testing.assert_array_equal(labels.array, read_volume(nifti_dir / "labels.nii.gz").array)
    assert json.loads((dicom_dir / "geometry.json").read_text()) == json.loads(
        (nifti_dir / "geometry.json").read_text()
    )


def test_synthetic_patient_and_stable_study(
    written: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    dicom_dir, _, _ = written
    first = pydicom.dcmread(dicom_dir / "ct" / "CT000001.dcm", stop_before_pixels=True)
    assert (str(first.PatientName), first.PatientID) == ("PHANTOM^SEED3", "PH3")

    assert main([*PHANTOM_ARGS, "--out", str(tmp_path), "--format", "dicom"]) == 0
    again = pydicom.dcmread(tmp_path / "ct" / "CT000001.dcm", stop_before_pixels=True)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyDate"):
        assert again[key].value == first[key].value


def test_refuses_to_mix_series(written: tuple[Path, Path, list[str]]) -> None:
    dicom_dir, _, _ = written
    assert main([*PHANTOM_ARGS, "--out", str(dicom_dir), "--format", "dicom"]) == 2
