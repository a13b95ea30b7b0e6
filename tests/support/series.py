"""CT series for the tests: reading one back as another tool would and comparing it with the
volume it was written from (tests/test_ct_series.py, tests/test_phantom_cli.py), and a series
with no bone that a node segments in seconds (the node tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from model.volume_io import Volume

GEOMETRY_TOLERANCE = 1e-4


def read_series(directory: Path) -> Volume:
    """Read a written series back the way a DICOM-consuming tool would: SimpleITK (GDCM)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    return Volume.from_sitk(reader.Execute())


def assert_same_volume(actual: Volume, expected: Volume) -> None:
    np.testing.assert_array_equal(actual.array, expected.array)
    np.testing.assert_allclose(actual.spacing, expected.spacing, atol=GEOMETRY_TOLERANCE)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=GEOMETRY_TOLERANCE)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=GEOMETRY_TOLERANCE)


def no_bone_series(directory: Path, slices: int, name: str) -> list[Path]:
    """A soft-tissue cylinder in air: segmented in seconds, no findings. `name` makes its
    patient and UIDs its own."""
    _, y, x = np.mgrid[:slices, :64, :64]
    hu = np.where((y - 32) ** 2 + (x - 32) ** 2 < 26**2, 40, -1000).astype(np.int16)
    volume = Volume(hu, spacing=(1.5, 1.5, 2.0), origin=(-48.0, -48.0, 0.0))
    patient = PatientInfo(name=f"NOBONE^{name.upper()}", patient_id=f"NB-{name.upper()}", sex="O")
    return write_ct_series(volume, directory, patient=patient, uid_seed=f"{name}-no-bone")
