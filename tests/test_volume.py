"""Series -> volume: sorting, rescale, stacks, tilt, spacing, Enhanced CT; synthetic and real.

Geometry is checked in patient coordinates: synthetic series sample a known function of the
patient position, so the assembled volume must give that function back at its own voxels'
positions, whatever tilt and gaps the slices had.

One file for one module's public behaviour (`dicom_node.imaging.volume`): its rules share the
synthetic-series builders at the top, which a split would have to import back and forth.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from scipy import ndimage

from dicom_node.app.cli import main
from dicom_node.imaging.volume.assemble import AssembledVolume, assemble_volume, select_series
from dicom_node.imaging.volume.geometry import analyse_spacing
from dicom_node.imaging.volume.headers import read_headers
from dicom_node.imaging.volume.policy import AssemblyError, AssemblyPolicy
from model.volume_io import Volume, read_volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
QA = DATA / "dcm_qa_ct"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real DICOM test data not found at {DATA} (shared/ beside the repo)"
)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PIXEL_SPACING = (1.0, 1.2)  # DICOM order: between rows (y), between columns (x)
FEW = AssemblyPolicy(min_slices=2)
# The real series at hand are heads: these tests are about their geometry, not selection.
HEADS = AssemblyPolicy(skip_body_parts=())
Field = Callable[[np.ndarray], np.ndarray]  # HU at (..., 3) patient positions


def linear_field(points: np.ndarray) -> np.ndarray:
    """Trilinear interpolation reproduces it exactly: any misplaced voxel shows."""
    return points @ np.array([0.6, -0.4, 0.9]) + 20.0


def constant_field(points: np.ndarray) -> np.ndarray:
    return np.full(points.shape[:-1], 100.0)


def tilted_orientation(degrees: float) -> tuple[float, ...]:
    """Rows along x, columns tilted about x: a gantry tilt as GE and Philips write it."""
    angle = math.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, math.cos(angle), -math.sin(angle))


def table_positions(z_steps: Sequence[float], start=(-10.0, -12.0, -20.0)) -> np.ndarray:
    """Slice positions moving along the patient z axis only (the table), whatever the tilt."""
    z = np.concatenate([[0.0], np.cumsum(z_steps)])
    return np.asarray(start) + z[:, None] * np.array([0.0, 0.0, 1.0])


@dataclass
class Slice:
    hu: np.ndarray  # (rows, columns)
    position: Sequence[float]
    slope: float = 1.0
    intercept: float = 0.0
    acquisition: int = 1


def sample_slices(
    field: Field,
    positions: np.ndarray,
    orientation: Sequence[float] = AXIAL,
    shape: tuple[int, int] = (24, 20),
    slope: float = 1.0,
) -> list[Slice]:
    """Slices holding `field` at their pixel centres (rounded to what `slope` can store)."""
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    j, i = np.mgrid[: shape[0], : shape[1]]
    offsets = i[..., None] * PIXEL_SPACING[1] * row + j[..., None] * PIXEL_SPACING[0] * column
    return [
        Slice(np.rint(field(np.asarray(p) + offsets) / slope) * slope, p, slope) for p in positions
    ]


def _dataset(sop_class: str, shape: tuple[int, int], series_uid: str) -> Dataset:
    """What every synthetic instance shares: SOP, series, frame of reference, image pixel."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _stored(item: Slice) -> np.ndarray:
    return np.rint((item.hu - item.intercept) / item.slope).astype("<i2")


def _ds(values: Sequence[float]) -> list[str]:
    """Decimal strings as a scanner writes them (16 characters at most)."""
    return [f"{v:.8f}"[:16] for v in values]


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path,
    slices: Sequence[Slice],
    orientation: Sequence[float] = AXIAL,
    *,
    thickness: float = 2.0,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_uid: str | None = None,
    sop_class: str = CTImageStorage,
) -> list[Path]:
    """One single-frame CT file per slice, in reverse order (the reader must sort)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    paths = []
    for number, item in reversed(list(enumerate(slices, 1))):
        ds = _dataset(sop_class, item.hu.shape, series_uid)
        ds.SOPInstanceUID = generate_uid()
        ds.ImageType = list(image_type)
        ds.InstanceNumber = number
        ds.AcquisitionNumber = item.acquisition
        ds.ImagePositionPatient = _ds(item.position)
        ds.ImageOrientationPatient = _ds(orientation)
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = thickness
        ds.RescaleSlope, ds.RescaleIntercept = f"{item.slope:g}", f"{item.intercept:g}"
        ds.PixelData = _stored(item).tobytes()
        paths.append(_save(ds, folder / f"{series_uid[-6:]}_{number:04d}.dcm"))
    return paths


def _item(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def write_enhanced_ct(
    path: Path, slices: Sequence[Slice], orientation: Sequence[float], order: Sequence[int]
) -> Path:
    """An Enhanced CT of `slices` in frame `order`: orientation and pixel measures shared,
    position, rescale and acquisition per frame (PS3.3 C.8.15)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _dataset(EnhancedCTImageStorage, slices[0].hu.shape, generate_uid())
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(order)
    ds.SharedFunctionalGroupsSequence = [
        _item(
            PlaneOrientationSequence=[_item(ImageOrientationPatient=_ds(orientation))],
            PixelMeasuresSequence=[_item(PixelSpacing=list(PIXEL_SPACING), SliceThickness=2.0)],
        )
    ]
    ds.PerFrameFunctionalGroupsSequence = [
        _item(
            PlanePositionSequence=[_item(ImagePositionPatient=_ds(slices[k].position))],
            PixelValueTransformationSequence=[
                _item(
                    RescaleSlope=slices[k].slope,
                    RescaleIntercept=slices[k].intercept,
                    RescaleType="HU",
                )
            ],
            FrameContentSequence=[_item(FrameAcquisitionNumber=1)],
        )
        for k in order
    ]
    ds.PixelData = np.stack([_stored(slices[k]) for k in order]).tobytes()
    return _save(ds, path)


def voxel_points(volume: Volume) -> np.ndarray:
    """Patient position (x, y, z) of every voxel, shaped like the array plus 3."""
    k, j, i = np.indices(volume.array.shape)
    index = np.stack([i, j, k], axis=-1) * np.asarray(volume.spacing)
    matrix = np.asarray(volume.direction).reshape(3, 3)
    return np.asarray(volume.origin) + index @ matrix.T


def assert_field(assembled: AssembledVolume, covered: np.ndarray, field: Field) -> None:
    """The volume holds `field` at its voxels' patient positions wherever slices cover it.

    `covered` is where a constant series assembles to its constant, shrunk by one voxel:
    SimpleITK holds the edge pixel's value over the outer half pixel instead of extrapolating.
    """
    inside = ndimage.binary_erosion(covered)
    assert inside.mean() > 0.3
    expected = field(voxel_points(assembled.volume))
    np.testing.assert_allclose(assembled.volume.array[inside], expected[inside], atol=0.02)


def assemble_field(
    folder: Path, field: Field, positions: np.ndarray, orientation: Sequence[float]
) -> tuple[AssembledVolume, list[Slice]]:
    """`field` sampled on the slices (to 0.01 HU), written, assembled; and the slices."""
    slices = sample_slices(field, positions, orientation, slope=0.01)
    return assemble_volume(write_series(folder, slices, orientation), FEW), slices


# -- policy --------------------------------------------------------------------------------------


def test_policy_defaults_have_simple_types() -> None:
    """config.py's loader checks TOML values against these: int, float, str, or a tuple of str
    (a TOML array)."""
    for field in dataclasses.fields(AssemblyPolicy):
        default = field.default
        assert type(default) in (int, float, str) or (
            type(default) is tuple and all(type(v) is str for v in default)
        ), field.name


def test_policy_from_a_config_section_with_other_keys() -> None:
    section = SimpleNamespace(complete_after_s=20.0, gantry_tilt="reject", min_slices=5)
    policy = AssemblyPolicy.from_section(section)
    assert (policy.gantry_tilt, policy.min_slices, policy.max_gap_factor) == ("reject", 5, 3.0)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"gantry_tilt": "fix"}, "series.gantry_tilt"),
        ({"irregular_spacing": "interpolate"}, "series.irregular_spacing"),
        ({"min_slices": 0}, "series.min_slices"),
        ({"axial_tolerance_deg": 95.0}, "series.axial_tolerance_deg"),
        ({"spacing_tolerance": 0.0}, "series.spacing_tolerance"),
        ({"max_gap_factor": 0.5}, "series.max_gap_factor"),
    ],
)
def test_bad_policy_names_the_key(values: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        AssemblyPolicy(**values)


# -- synthetic series ----------------------------------------------------------------------------


def test_slices_sorted_and_rescaled_per_slice(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    positions = table_positions([2.0] * 5)
    hu = rng.integers(-500, 500, size=(6, 8, 10)) * 2  # even: slope 2 stores them exactly
    rescales = [(1, -1024), (2, -1000), (1, 0), (2, 0), (1, -1024), (2, -2000)]
    slices = [Slice(h, p, s, i) for h, p, (s, i) in zip(hu, positions, rescales, strict=True)]
    paths = write_series(tmp_path, slices)

    assembled = assemble_volume(paths, FEW)

    np.testing.assert_array_equal(assembled.volume.array, hu)
    assert assembled.volume.spacing == (1.2, 1.0, pytest.approx(2.0))
    assert assembled.volume.origin == pytest.approx(tuple(positions[0]))
    assert [f.path for f in assembled.frames] == paths[::-1]  # written last to first
    assert assembled.frames[0].frame_number is None
    assert not assembled.resampled and assembled.notes == []


def test_regular_series_is_int16_and_keeps_its_grid(tmp_path: Path) -> None:
    positions = table_positions([2.5] * 20)
    slices = sample_slices(lambda p: np.rint(linear_field(p)), positions)
    assembled = assemble_volume(write_series(tmp_path, slices), FEW)
    assert assembled.volume.array.dtype == np.int16
    np.testing.assert_array_equal(assembled.volume.array, [s.hu for s in slices])
    geometry = assembled.source_geometry
    np.testing.assert_allclose(geometry.positions, positions, atol=1e-6)
    assert geometry.orientation == AXIAL and geometry.pixel_spacing == PIXEL_SPACING


@pytest.mark.parametrize(
    ("tilt", "z_steps"),
    [
        (20.0, [2.0] * 24),
        (0.0, [2.0] * 10 + [0.8] + [3.5] * 8),
        (-15.0, [2.0] * 10 + [0.8] + [3.5] * 8),
    ],
    ids=["tilted", "irregular", "tilted-irregular"],
)
def test_resampled_series_is_right_in_patient_coordinates(
    tmp_path: Path, tilt: float, z_steps: list[float]
) -> None:
    orientation = tilted_orientation(tilt)
    positions = table_positions(z_steps)
    assembled, slices = assemble_field(tmp_path / "linear", linear_field, positions, orientation)
    constant, _ = assemble_field(tmp_path / "constant", constant_field, positions, orientation)

    assert assembled.resampled
    direction = np.asarray(assembled.volume.direction).reshape(3, 3)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(direction[:, 2], np.cross(orientation[:3], orientation[3:]))
    assert_field(assembled, np.abs(constant.volume.array - 100) < 1e-3, linear_field)
    # ... and back onto the source frames (what the SEG writer does) gives the slices again,
    # except where a frame's edge falls between output planes that the slab does not cover.
    geometry = assembled.source_geometry
    back = geometry.resample_to_frames(assembled.volume, sitk.sitkLinear)
    covered = np.abs(geometry.resample_to_frames(constant.volume, sitk.sitkLinear) - 100) < 1e-3
    covered = ndimage.binary_erosion(covered, np.ones((1, 3, 3)))  # as in assert_field
    assert covered.mean() > 0.6
    source = np.asarray([s.hu for s in slices])
    np.testing.assert_allclose(back[covered], source[covered], atol=0.02)


def test_tilted_blob_lands_where_it_was(tmp_path: Path) -> None:
    """Non-linear content: a Gaussian blob's centre of mass stays at its patient position."""
    centre = np.array([10.0, 8.0, 15.0])

    def blob(points: np.ndarray) -> np.ndarray:
        return 1000.0 * np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2 * 4.0**2))

    positions = table_positions([2.0] * 9 + [0.9] + [3.0] * 10, start=(-10, -15, -20))
    orientation = tilted_orientation(18.5)
    slices = sample_slices(blob, positions, orientation, shape=(40, 36))
    volume = assemble_volume(write_series(tmp_path, slices, orientation), FEW).volume
    weights = np.where(volume.array > 300, volume.array, 0.0)
    found = (voxel_points(volume) * weights[..., None]).sum(axis=(0, 1, 2)) / weights.sum()
    np.testing.assert_allclose(found, centre, atol=0.3)


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        ({"gantry_tilt": "reject"}, "gantry tilt 20.0 deg (policy: reject)"),
        # Gaps along the slice normal: the table's 0.8 and 3.5 mm times cos(20 deg).
        ({"irregular_spacing": "reject"}, "irregular slice spacing 0.75-3.29 mm (policy: reject)"),
    ],
)
def test_reject_policies_give_the_reason(tmp_path: Path, policy: dict, reason: str) -> None:
    positions = table_positions([2.0] * 10 + [0.8] + [3.5] * 9)
    slices = sample_slices(constant_field, positions, tilted_orientation(20.0))
    paths = write_series(tmp_path, slices, tilted_orientation(20.0))
    with pytest.raises(AssemblyError, match=re.escape(reason)):
        assemble_volume(paths, AssemblyPolicy(**policy))
    assert select_series(read_headers(paths), AssemblyPolicy(**policy)) == reason


def test_missing_slices_interpolated_or_rejected(tmp_path: Path) -> None:
    positions = np.delete(table_positions([2.0] * 24), [8, 15, 16], axis=0)  # 1 + 2 missing
    paths = write_series(tmp_path, sample_slices(linear_field, positions, slope=0.01))
    assembled = assemble_volume(paths)
    assert assembled.volume.array.shape[0] == 25
    assert assembled.notes == [
        "resampled 3 missing slices (spacing 2.00 mm) to 2.00 mm (25 slices from 22)"
    ]
    assert_field(assembled, np.ones(assembled.volume.array.shape, bool), linear_field)
    with pytest.raises(AssemblyError, match=re.escape("3 missing slices (spacing 2.00 mm)")):
        assemble_volume(paths, AssemblyPolicy(irregular_spacing="reject"))
    wide = AssemblyPolicy(max_gap_factor=2.5)
    assert "gap of 6.00 mm between slices is 3.0x" in str(select_series(read_headers(paths), wide))


def test_spacing_analysis_catches_drift() -> None:
    """Gaps each within 4 % of the mean, but positions drifting by half a slice: irregular."""
    depths = np.concatenate([[0.0], np.cumsum([1.04] * 12 + [0.96] * 12)])
    assert not analyse_spacing(depths, 0.05).regular
    assert analyse_spacing(np.arange(30) * 1.5 + 0.01 * (np.arange(30) % 2), 0.05).regular


def test_overlapping_acquisitions_largest_chosen(tmp_path: Path) -> None:
    first = sample_slices(constant_field, table_positions([2.0] * 23))
    second = sample_slices(linear_field, table_positions([2.0] * 9, start=(-10, -12, 0)))
    for item in second:
        item.acquisition = 2
    paths = write_series(tmp_path, first + second, series_uid="1.2.3")
    assembled = assemble_volume(paths)
    assert len(assembled.frames) == 24
    assert np.all(assembled.volume.array == 100)
    assert assembled.notes == [
        "left out acquisition 2 (10 slices), which overlaps the assembled acquisition 1 (24 slices)"
    ]
    tie = write_series(tmp_path / "tie", first[10:20] + second, series_uid="1.2.4")
    reason = select_series(read_headers(tie), FEW)
    assert reason == "ambiguous: overlapping acquisitions 1 and 2 have 10 slices each"


def test_duplicate_positions_rejected(tmp_path: Path) -> None:
    slices = sample_slices(constant_field, table_positions([2.0] * 21))
    paths = write_series(tmp_path, slices + slices[5:7])
    assert select_series(read_headers(paths)).startswith("duplicate slice positions (2 frames")


def test_resent_instance_counts_once(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "a", sample_slices(constant_field, table_positions([2.0] * 20)))
    copy = tmp_path / "a" / "copy.dcm"
    copy.write_bytes(paths[3].read_bytes())
    assembled = assemble_volume([tmp_path / "a"])
    assert len(assembled.frames) == 21
    assert assembled.notes == ["ignored 1 duplicate instance (same SOP Instance UID)"]


def test_enhanced_ct_equals_single_frame_series(tmp_path: Path) -> None:
    orientation = tilted_orientation(12.0)
    slices = sample_slices(linear_field, table_positions([2.0] * 7), orientation, slope=0.5)
    for index, item in enumerate(slices):
        item.intercept = -1024.0 + 8 * index  # a different rescale on every frame
    order = [3, 0, 7, 1, 5, 2, 6, 4]
    enhanced_ct = write_enhanced_ct(tmp_path / "e.dcm", slices, orientation, order)
    enhanced = assemble_volume([enhanced_ct], FEW)
    single = assemble_volume(write_series(tmp_path / "single", slices, orientation), FEW)

    np.testing.assert_array_equal(enhanced.volume.array, single.volume.array)
    for attribute in ("spacing", "origin", "direction"):
        actual, expected = (getattr(a.volume, attribute) for a in (enhanced, single))
        np.testing.assert_allclose(actual, expected, atol=1e-9)
    assert [f.frame_number for f in enhanced.frames] == [order.index(k) + 1 for k in range(8)]
    np.testing.assert_allclose(enhanced.source_geometry.positions, single.source_geometry.positions)


def test_too_few_slices(tmp_path: Path) -> None:
    paths = write_series(tmp_path, sample_slices(constant_field, table_positions([2.0] * 2)))
    assert select_series(read_headers(paths)) == "too few slices (3 < 20)"
    with pytest.raises(AssemblyError, match=re.escape("too few slices (3 < 20)")):
        assemble_volume(paths)


def test_inconsistent_rows_columns_rejected(tmp_path: Path) -> None:
    slices = sample_slices(constant_field, table_positions([2.0] * 21))
    for item in slices[4:7]:
        item.hu = item.hu[:, :18]
    paths = write_series(tmp_path, slices)
    reason = "inconsistent rows/columns (24x20: 19 frames, 24x18: 3 frames)"
    assert select_series(read_headers(paths)) == reason
    with pytest.raises(AssemblyError, match=re.escape(reason)):
        assemble_volume(paths)


def test_selection_reasons(tmp_path: Path) -> None:
    positions = table_positions([2.0] * 21)
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    along_x = positions[:, [2, 1, 0]]  # sagittal slices stack along x
    thick = write_series(tmp_path / "thick", sample_slices(constant_field, positions), thickness=6)
    cases = {
        "slice thickness 6 mm > 5 mm (22 of 22 slices)": thick,
        "not axial (slice normal 90.0 deg from the patient z axis > 30)": write_series(
            tmp_path / "sagittal", sample_slices(constant_field, along_x, sagittal), sagittal
        ),
        "localizer": write_series(
            tmp_path / "scout",
            sample_slices(constant_field, positions[:1]),
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        ),
        "secondary capture": write_series(
            tmp_path / "sc",
            sample_slices(constant_field, positions[:1]),
            sop_class=SecondaryCaptureImageStorage,
        ),
    }
    for reason, paths in cases.items():
        assert select_series(read_headers(paths)) == reason


def test_bad_input_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    paths = write_series(tmp_path, sample_slices(constant_field, table_positions([2.0] * 20)))
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert read_headers([tmp_path]).skipped == 1
    ds = pydicom.dcmread(paths[0])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[0])
    with pytest.raises(AssemblyError, match="cannot decode pixel data of instance"):
        assemble_volume([tmp_path])
    del ds.ImagePositionPatient
    ds.save_as(paths[0])
    assert select_series(read_headers(paths)).endswith("ImagePositionPatient missing or malformed")


# -- absurd volumes: a reason from the headers, before any pixel is decoded ---------------------


def _rewrite(paths: Sequence[Path], **values: object) -> list[Path]:
    """Set (or with None, delete) header attributes in every file of a written series."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    return list(paths)


def _reason(paths: Sequence[Path], policy: AssemblyPolicy | None = None) -> str:
    """select_series' reason, which assemble_volume must raise as well (same rules)."""
    reason = select_series(read_headers(paths), policy)
    assert reason is not None
    with pytest.raises(AssemblyError) as raised:
        assemble_volume(paths, policy)
    assert str(raised.value) == reason
    return reason


def _constant_series(folder: Path, slices: int = 21) -> list[Path]:
    positions = table_positions([2.0] * (slices - 1))
    return write_series(folder, sample_slices(constant_field, positions))


def test_one_slice_is_not_a_volume(tmp_path: Path) -> None:
    one = write_series(tmp_path, sample_slices(constant_field, table_positions([])))
    assert _reason(one, FEW) == "too few slices (1 < 2)"
    with pytest.raises(ValueError, match=re.escape("series.min_slices: must be >= 2")):
        AssemblyPolicy(min_slices=1)


def test_too_many_slices_rejected_before_frames_are_expanded(tmp_path: Path) -> None:
    paths = _constant_series(tmp_path / "a", 21)
    assert _reason(paths, AssemblyPolicy(max_slices=20)) == "too many slices (21 > 20)"
    # An Enhanced CT header claiming 2^31 - 1 frames: refused at once, nothing expanded.
    slices = sample_slices(constant_field, table_positions([2.0] * 3))
    enhanced = write_enhanced_ct(tmp_path / "e.dcm", slices, AXIAL, range(4))
    _rewrite([enhanced], NumberOfFrames=2**31 - 1)
    assert _reason([enhanced], FEW) == "too many slices (2147483647 > 5000)"
    _rewrite([enhanced], NumberOfFrames=-1)
    assert _reason([enhanced], FEW).endswith(": NumberOfFrames -1")
    with pytest.raises(
        ValueError, match=re.escape("series.max_slices: must be >= series.min_slices")
    ):
        AssemblyPolicy(min_slices=30, max_slices=29)


def test_volume_too_large_for_memory_rejected_from_headers(tmp_path: Path) -> None:
    # 65535 x 65535 pixels claimed by every header: 90 G voxels; never allocated.
    huge = _constant_series(tmp_path / "huge")
    _rewrite(huge, Rows=65535, Columns=65535, PixelSpacing=[0.5, 0.5])
    assert _reason(huge) == (
        "volume too large: 90,192 M voxels > max_voxels 500 M (65535x65535x21 at 0.5 x 0.5 x 2 mm)"
    )
    # Small images with an absurd pixel spacing are huge on the model's 0.8 mm grid.
    wide = _rewrite(_constant_series(tmp_path / "wide"), PixelSpacing=[500.0, 500.0])
    assert _reason(wide).startswith("volume too large: ")
    assert "M voxels at the model's 0.8 mm > max_voxels" in _reason(wide)
    # A policy can lower the cap. 20 x 24 pixels of 1.2 x 1 mm, 21 slices 2 mm apart: 10,080
    # voxels as they are, 30 x 30 x 52.5 = 47,250 on the model's grid.
    small = _constant_series(tmp_path / "small")
    assert select_series(read_headers(small), AssemblyPolicy(max_voxels=48_000)) is None
    assert _reason(small, AssemblyPolicy(max_voxels=47_000)) == (
        "volume too large: 47,250 voxels at the model's 0.8 mm > max_voxels 47,000 "
        "(20x24x21 at 1.2 x 1 x 2 mm)"
    )
    with pytest.raises(ValueError, match=re.escape("series.max_voxels")):
        AssemblyPolicy(max_voxels=0)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"PixelSpacing": [0.0, 1.0]}, "PixelSpacing must be positive"),
        ({"PixelSpacing": [-1.0, 1.0]}, "PixelSpacing must be positive"),
        ({"Rows": 0}, "Rows/Columns missing"),
        ({"Columns": 0}, "Rows/Columns missing"),
        ({"ImagePositionPatient": ["nan", "0", "0"]}, "ImagePositionPatient missing or malformed"),
        ({"ImagePositionPatient": ["0", "inf", "0"]}, "ImagePositionPatient missing or malformed"),
        ({"ImagePositionPatient": ["0", "0", "1e300"]}, "ImagePositionPatient out of range"),
        ({"ImageOrientationPatient": [0, 0, 0, 0, 1, 0]}, "not unit vectors"),
        ({"ImageOrientationPatient": [2, 0, 0, 0, 1, 0]}, "not unit vectors"),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # NaN and inf, on purpose
def test_absurd_geometry_is_a_reason(tmp_path: Path, values: dict, reason: str) -> None:
    paths = _constant_series(tmp_path)
    _rewrite(paths[:1] if "ImagePositionPatient" in values else paths, **values)
    assert reason in _reason(paths)


def test_unreadable_number_of_frames_is_a_reason(tmp_path: Path) -> None:
    paths = _constant_series(tmp_path)
    rows = b"\x28\x00\x10\x00US"  # (0028,0010) Rows; NumberOfFrames (0028,0008) goes before
    data = paths[0].read_bytes()
    assert data.count(rows) == 1
    paths[0].write_bytes(data.replace(rows, b"\x28\x00\x08\x00IS\x04\x00many" + rows))
    assert "malformed header" in _reason(paths)


def _raw(path: Path, tag: int, vr: str, value: bytes) -> None:
    """Put an element into a file exactly as given (pydicom writes raw elements verbatim).
    pydicom will not write an unknown VR: that one is written as UN and patched."""
    ds = pydicom.dcmread(path)
    written_vr = "UN" if vr == "XX" else vr
    ds[tag] = RawDataElement(Tag(tag), written_vr, len(value), value, 0, False, True)
    ds.save_as(path)
    if vr == "XX":  # UN: tag, VR, 2 reserved bytes, 4-byte length; XX: tag, VR, 2-byte length
        tag_bytes = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        long_form = tag_bytes + b"UN\0\0" + struct.pack("<I", len(value))
        data = path.read_bytes()
        assert data.count(long_form) == 1
        path.write_bytes(data.replace(long_form, tag_bytes + b"XX" + struct.pack("<H", len(value))))


@pytest.mark.parametrize(
    ("tag", "vr", "value", "error"),
    [
        (0x00280106, "US", b"\x01\x02\x03", "BytesLengthException"),  # a US of 3 bytes
        (0x00080016, "XX", b"1.2.3\0", "NotImplementedError"),  # an unknown VR
        (0x00080008, "SQ", b"\xfe\xff\x00\xe0\xff\xff", "OSError"),  # a cut item
    ],
    ids=["length", "vr", "sequence"],
)
def test_undecodable_header_element_is_a_reason(
    tmp_path: Path, tag: int, vr: str, value: bytes, error: str
) -> None:
    """An element nothing in this module reads would break the SEG writer later: it is the
    reason now, by its type and tag, never its value (it may identify the patient)."""
    paths = _constant_series(tmp_path)
    _raw(paths[3], tag, vr, value)
    reason = _reason(paths)
    assert reason.startswith("instance ") and "malformed header (" in reason
    assert reason.endswith(f" in {Tag(tag)})") and error in reason, reason


def test_reason_quoting_a_hostile_value_cannot_forge_a_log_line(tmp_path: Path) -> None:
    paths = _constant_series(tmp_path)
    _raw(paths[0], 0x00200052, "UI", b"1.2.3\n2024-01-01 00:00:00 ERROR forged\0")
    reason = _reason(paths)
    assert reason.startswith("inconsistent frame of reference (")
    assert "\n" not in reason and "1.2.3\\n2024-01-01 00:00:00 ERROR forged" in reason


def test_zero_spacing_between_slices_rejected(tmp_path: Path) -> None:
    same_place = write_series(tmp_path, sample_slices(constant_field, table_positions([0.0] * 20)))
    assert _reason(same_place).startswith("duplicate slice positions (20 frames")


def test_zero_or_negative_slice_thickness_is_unknown(tmp_path: Path) -> None:
    paths = _rewrite(_constant_series(tmp_path), SliceThickness=-2.0)
    assembled = assemble_volume(paths)
    assert assembled.source_geometry.slice_thickness_mm is None
    assert assembled.volume.spacing[2] == pytest.approx(2.0)  # from the positions


def test_model_spacing_matches_the_network() -> None:
    from dicom_node.imaging.volume.policy import MODEL_SPACING_MM
    from model.engine.network import CascadeConfig

    assert CascadeConfig().spacing_mm == MODEL_SPACING_MM


def test_cli_assembles_the_qualifying_series(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    positions = table_positions([2.0] * 21)
    slices = sample_slices(lambda p: np.rint(linear_field(p)), positions)
    write_series(tmp_path / "in" / "ct", slices, series_uid="1.2.826.0.1.3680043.8.498.10")
    scout = sample_slices(constant_field, positions[:1])
    write_series(tmp_path / "in" / "scout", scout, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    out = tmp_path / "ct.nii.gz"

    assert main(["assemble", str(tmp_path / "in"), "-o", str(out)]) == 0
    np.testing.assert_array_equal(read_volume(out).array, [s.hu for s in slices])
    assert ": localizer" in capsys.readouterr().out

    assert main(["assemble", str(tmp_path / "in"), "-o", str(out), "--min-slices", "30"]) == 2
    error = capsys.readouterr().err
    assert "1.2.826.0.1.3680043.8.498.10 (22 files): too few slices (22 < 30)" in error
    assert "localizer" in error


def test_cli_takes_the_policy_from_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.app.config import Config

    if not hasattr(Config().series, "gantry_tilt"):
        pytest.skip("config.py's [series] section has no AssemblyPolicy keys yet")
    orientation = tilted_orientation(20.0)
    slices = sample_slices(constant_field, table_positions([2.0] * 4), orientation)
    write_series(tmp_path / "in", slices, orientation)
    config = tmp_path / "config.toml"
    config.write_text('[series]\ngantry_tilt = "reject"\nmin_slices = 2\n')
    argv = ["assemble", str(tmp_path / "in"), "-o", str(tmp_path / "ct.nii.gz")]
    assert main([*argv, "--config", str(config)]) == 2
    assert "gantry tilt 20.0 deg (policy: reject)" in capsys.readouterr().err
    assert main([*argv, "--config", str(config), "--gantry-tilt", "resample"]) == 0


# -- real series (shared/data/dicom) ---------------------------------------------------------


def _source_hu(path: Path) -> np.ndarray:
    """pydicom's own reading: stored x slope + intercept."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def assert_round_trip(assembled: AssembledVolume, frames: Sequence[int]) -> None:
    """The volume sampled at the source frames' pixels gives their HU back, up to the two
    in-plane linear interpolations (there and back) on sharp real edges."""
    geometry = dataclasses.replace(
        assembled.source_geometry, positions=assembled.source_geometry.positions[list(frames)]
    )
    back = geometry.resample_to_frames(assembled.volume, sitk.sitkLinear, -1024)
    for index, frame in zip(frames, back, strict=True):
        source = _source_hu(assembled.frames[index].path)
        tissue = source > -500
        error = np.abs(frame - source)[tissue]
        assert np.median(error) < 5 and np.percentile(error, 95) < 40, index


@needs_data
def test_ge_tilt_and_irregular_spacing() -> None:
    paths = [QA / "GE"]
    headers = read_headers(paths)
    assert select_series(headers) == "body part examined HEAD (series.skip_body_parts)"
    assert select_series(headers, HEADS) == "slice thickness 7 mm > 5 mm (14 of 28 slices)"
    thick = dataclasses.replace(HEADS, max_slice_thickness_mm=7.0)
    reasons = {
        "irregular slice spacing 1.08-7.00 mm (policy: reject)": {"irregular_spacing": "reject"},
        "gantry tilt 18.5 deg (policy: reject)": {"gantry_tilt": "reject"},
    }
    for reason, policy in reasons.items():
        assert select_series(headers, dataclasses.replace(thick, **policy)) == reason

    assembled = assemble_volume(paths, thick)
    assert assembled.notes == [
        "gantry tilt 18.5 deg corrected: slices moved onto an orthogonal grid "
        "(in-plane shifts up to 48.2 mm)",
        "resampled irregular slice spacing 1.08-7.00 mm to 4.00 mm (37 slices from 28)",
        "pixel padding (outside the reconstructed field) set to -1024 HU",
    ]
    assert assembled.volume.array.shape == (37, 611, 512)
    assert assembled.volume.spacing[2] == pytest.approx(4.0019, abs=1e-3)
    # The 4 mm part's output planes sit on its slices: only in-plane interpolation there.
    assert_round_trip(assembled, [0, 6, 13])


@needs_data
def test_philips_tilted_series() -> None:
    paths = [QA / "Philips" / "S21610" / "S2010"]
    reason = select_series(read_headers(paths), dataclasses.replace(HEADS, gantry_tilt="reject"))
    assert reason == "gantry tilt 18.5 deg (policy: reject)"
    assembled = assemble_volume(paths, HEADS)
    assert assembled.notes[0] == "ignored 1 non-DICOM file"  # DIRFILE
    assert assembled.notes[1].startswith("gantry tilt 18.5 deg corrected")
    assert len(assembled.frames) == 54 and assembled.volume.array.shape[0] == 54
    assert_round_trip(assembled, [0, 27, 53])


@needs_data
def test_philips_regular_series_scouts_and_secondary_captures() -> None:
    study = QA / "Philips" / "S21570"
    headers = read_headers([study / "S2010"])
    assert (len(headers), headers.skipped) == (28, 1)  # DIRFILE is not an instance
    assert select_series(read_headers([study / "S1000"])) == "localizer"
    assert select_series(read_headers([study / "S4010"])) == "secondary capture"
    reason = select_series(read_headers([study / "S2010"]))
    assert reason == "body part examined BRAIN (series.skip_body_parts)"
    assembled = assemble_volume([study / "S2010"], HEADS)
    assert not assembled.resampled and assembled.volume.array.dtype == np.int16
    np.testing.assert_array_equal(assembled.volume.array[5], _source_hu(assembled.frames[5].path))


@needs_data
def test_jpeg2000_series_with_empty_sop_class() -> None:
    assembled = assemble_volume([DATA / "totalseg_example_ct_dicom"])
    assert "empty SOP Class UID in 20 instances: taken as CT" in assembled.notes
    assert assembled.frames[0].sop_instance_uid  # from the file meta information
    for index in (0, 9, 19):
        expected = _source_hu(assembled.frames[index].path)
        np.testing.assert_array_equal(assembled.volume.array[index], expected)
    assert np.median(assembled.volume.array[:, :20, :20]) == pytest.approx(-1000, abs=50)
    assert np.diff(assembled.source_geometry.positions[:, 2]) == pytest.approx(2.0)
