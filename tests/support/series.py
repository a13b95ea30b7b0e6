"""Reading a written CT series back as another tool would, and comparing it with the volume it
was written from (tests/test_ct_series.py, tests/test_phantom_cli.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

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
