"""Sloppy sources: the SEG copies the source's Patient and Study attributes, made valid
(`dicom_node.imaging.source_repairs`), and lists what it changed. Checked with dciodvfy on the
phantom with the faults written into it and on the real GE extremity CT whose Study ID is too
long (`../shared/data/dicom/ibsi_sts`, read in place)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import config, dcmread

from dicom_node.imaging.seg import SegWriter
from dicom_node.imaging.volume.assemble import assemble_volume
from dicom_node.pipeline.inference import save_seg
from tests.support import PhantomSeries, dciodvfy_errors, require_data
from tests.test_seg import ALGORITHM, threshold_labels

STUDY_ID = "ABCDEFGHIJ1234567"  # 17 characters: SH allows 16
DESCRIPTION = "Lower extremity CT angiography run-off with a description too long for LO"
FAULTS = {
    "StudyID": STUDY_ID,
    "StudyDescription": DESCRIPTION,  # 73 characters: LO allows 64
    "StudyDate": "2021.03.04",  # a DA in another form: rewritten
    "PatientBirthDate": "17.04.1923",  # not a DA at all: emptied (Type 2)
    "PatientSex": "m",
    "PatientAge": "45",  # not an AS (045Y): dropped (Type 3)
    "PatientWeight": "70.12345678901234",  # 17 characters: DS allows 16
}


@pytest.fixture
def unvalidated() -> Iterator[None]:
    """pydicom writes what it is given, as a sloppy scanner does."""
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.writing_validation_mode = mode


def _faulty_series(source: Path, out: Path, faults: dict[str, str]) -> Path:
    out.mkdir()
    for path in sorted(source.iterdir()):
        ds = dcmread(path)
        for keyword, value in faults.items():
            setattr(ds, keyword, value)
        ds.save_as(out / path.name)
    return out


def _seg(series: Path, out: Path) -> tuple[Path, list[str]]:
    assembled = assemble_volume([series])
    repairs: list[str] = []
    seg = SegWriter(ALGORITHM).write(assembled, threshold_labels(assembled), repairs=repairs)
    assert seg is not None
    save_seg(seg, out)
    return out, repairs


def test_faults_written_into_a_phantom_are_repaired_and_listed(
    phantom_series: PhantomSeries, tmp_path: Path, unvalidated: None
) -> None:
    series = _faulty_series(phantom_series(2)["ct"], tmp_path / "ct", FAULTS)
    assert dciodvfy_errors(next(series.iterdir()))  # the source is invalid
    path, repairs = _seg(series, tmp_path / "seg.dcm")
    assert repairs == [
        "PatientBirthDate (DA): not a valid DA: emptied",
        "PatientSex (CS): not in CS form: rewritten",
        "StudyDate (DA): not in DA form: rewritten",
        "StudyDescription (LO): 73 characters (at most 64): cut to 64",
        "StudyID (SH): 17 characters (at most 16): cut to 16",
        "PatientAge (AS): not a valid AS: dropped",
        "PatientWeight (DS): not in DS form: rewritten",
    ]
    long_values = [value for value in FAULTS.values() if len(value) > 3]  # "m" is in "emptied"
    assert not [r for r in repairs for value in long_values if value in r]  # no values
    assert dciodvfy_errors(path) == []
    seg = dcmread(path)
    assert (seg.StudyID, seg.StudyDescription) == (STUDY_ID[:16], DESCRIPTION[:64].rstrip())
    assert (seg.StudyDate, seg.PatientBirthDate, seg.PatientSex) == ("20210304", "", "M")
    assert "PatientAge" not in seg and len(str(seg.PatientWeight)) <= 16
    assert abs(float(seg.PatientWeight) - 70.12345678901234) < 1e-9


def test_identifiers_are_kept_as_they_are(
    phantom_series: PhantomSeries, tmp_path: Path, unvalidated: None
) -> None:
    """A changed Patient ID could file the SEG with another patient: kept, and said so."""
    patient_id = "P" * 70
    series = _faulty_series(phantom_series(2)["ct"], tmp_path / "ct", {"PatientID": patient_id})
    path, repairs = _seg(series, tmp_path / "seg.dcm")
    assert repairs == [
        "PatientID (LO): 70 characters (at most 64): kept as it is (it identifies the patient "
        "or study)"
    ]
    assert dcmread(path).PatientID == patient_id


def test_real_ge_extremity_ct_with_a_long_study_id_gives_a_valid_seg(tmp_path: Path) -> None:
    ct = require_data() / "ibsi_sts" / "STS_001" / "CT" / "image"
    first = next(path for path in sorted(ct.rglob("*")) if path.is_file())
    assert len(dcmread(first, stop_before_pixels=True).StudyID) == 17
    path, repairs = _seg(ct, tmp_path / "seg.dcm")
    assert repairs == ["StudyID (SH): 17 characters (at most 16): cut to 16"]
    assert dciodvfy_errors(path) == []
    assert len(dcmread(path).StudyID) == 16
    assert np.any(dcmread(path).pixel_array)
