"""Series -> volume: a received CT series as a volume in Hounsfield units, and the way back.

The stage between reception and segmentation. It takes the files of one series, decides from
the headers alone whether the series qualifies (`select_series`, a skip reason or None) and
builds the volume (`assemble_volume`): frames sorted along the slice normal, HU from each
frame's own rescale, on a regular orthogonal grid. Tilted or irregularly spaced stacks are
resampled or rejected by policy; the source frames and their geometry are kept, because the
DICOM SEG must be written on the source images' grid, not on ours.

The rules, in the order they are applied (the first that fails is the reason); headers the
rules cannot make sense of (NaN or infinite positions, zero or negative pixel spacing, zero
rows or columns, orientation cosines that are not unit vectors, ...) are a reason too, never
an exception of another kind:

1. Instances: CT Image, Enhanced CT or Legacy Converted Enhanced CT, by SOP Class UID (from the
   file meta information, or Modality CT with an image plane, when the dataset's is empty).
   Others give "secondary capture" or "not a CT image (<SOP class>)". Files that are not DICOM
   instances (a Philips DIRFILE, a DICOMDIR, junk) are skipped and counted by `read_headers`.
2. Frames: single-frame instances give one frame, Enhanced CT one per frame, with per-frame
   functional groups overriding the shared ones. Copies of one instance count once. Localizer
   frames (ImageType or FrameType value 3 LOCALIZER) are left out; if nothing else remains the
   reason is "localizer".
3. Every remaining frame must share rows/columns, pixel spacing and orientation, else
   "inconsistent ...": a series mixing geometries is broken, not a second stack to trust.
4. Stacks: acquisitions (AcquisitionNumber) whose ranges along the normal overlap are separate
   stacks (a re-scan); the one with the most slices is assembled and the others are named in
   the notes; equal largest stacks are ambiguous and rejected. Acquisitions that do not
   overlap (GE writes one per rotation) are one stack. Duplicate positions left in the stack
   are rejected: nothing says which frame is right.
5. Selection policy: axial within `axial_tolerance_deg`, at least `min_slices`, no slice
   thicker than `max_slice_thickness_mm`.
6. Size: at most `max_slices` frames in the series (checked before frames are expanded, so a
   header claiming 2^31 frames costs nothing) and at most `max_voxels` voxels, on the grid the
   volume would be assembled on and on the model's 0.8 mm grid over the same extent (an
   absurd pixel spacing makes a small image a huge volume there). Checked on headers alone,
   before any pixel data is decoded or any memory allocated for it.
7. Geometry policy: gantry tilt (slices shifted in-plane along the stack, as GE and Philips
   write tilted series) and irregular spacing (missing slices included) are resampled or
   rejected; a gap wider than `max_gap_factor` times the spacing is always rejected.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MediaStorageDirectoryStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from dicom_node.logs import escape
from model.resample import AIR_HU
from model.volume_io import Volume

log = logging.getLogger(__name__)

CT_SOP_CLASSES = frozenset(
    {CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)
SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {
        SecondaryCaptureImageStorage,
        MultiFrameSingleBitSecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)
_POLICY_CHOICES = ("resample", "reject")
_CHOICE_RULE = "expected 'resample' or 'reject'"
# Positions closer than this along the normal are the same slice (DICOM writes positions to
# ~1e-5 mm; no scanner reconstructs slices 0.01 mm apart).
_DUPLICATE_MM = 0.01
# In-plane shifts along the stack below this fraction of a pixel are rounding, not tilt.
_SHEAR_TOLERANCE_PX = 0.1
# Orientation cosines and pixel spacings are compared at this many decimals (rounding noise in
# the headers is ~1e-7; a real difference is larger than 1e-3).
_GEOMETRY_DECIMALS = 3
_ORTHONORMAL_TOLERANCE = 1e-3
# Orientation cosines are unit vectors; DICOM writes them to a few decimals, so allow that much.
_UNIT_TOLERANCE = 1e-2
# Patient coordinates beyond a kilometre are corrupt headers, and they would overflow the
# arithmetic along the stack into inf and NaN.
_MAX_COORDINATE_MM = 1e6
# The model's grid (model.network.CascadeConfig.spacing_mm; not imported: this module runs in
# the daemon, which does not load torch).
MODEL_SPACING_MM = 0.8
_INT16 = np.iinfo(np.int16)
_SPECIFIC_CHARACTER_SET = 0x00080005
# Attributes that an Enhanced CT keeps in functional group macros (PS3.3 C.7.6.16).
_FUNCTIONAL_GROUP_OF = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "FrameType": "CTImageFrameTypeSequence",
    "FrameAcquisitionNumber": "FrameContentSequence",
}


@dataclass(frozen=True)
class AssemblyPolicy:
    """Which series qualify and how their geometry is handled: `[series]` in config.toml.

    `axial_tolerance_deg` 30: the largest gantry tilt CT scanners offer is about 30 deg (the
    tilted series at hand are 16.5 and 18.5 deg), so every tilted axial acquisition qualifies,
    while coronal and sagittal reformats (90 deg) and steep obliques do not.
    `spacing_tolerance`: how far (fraction of the spacing) a slice may sit from the regular
    grid and still count as on it. `max_gap_factor` 3: up to two consecutive missing slices
    are interpolated; a wider hole means the series does not cover one continuous region.
    `resample_spacing_mm` 0: resample along the normal at the stack's own spacing (the mean
    when regular, else the smallest gap that repeats, e.g. 4.0 mm for a 4 mm + 7 mm series:
    no detail is lost where slices are dense, and no single odd gap sets the grid). The
    spacing is then adjusted to whole steps from the first slice to the last.
    `min_slices` is at least 2: one slice is not a volume. `max_slices` 5000 and `max_voxels`
    500 M bound what a header can make the node allocate: a full-leg CT at 0.5 mm has ~2600
    slices, and inference peaked at 8.9 GB for the 378 M voxels of the full-leg phantom at
    0.8 mm (bench/README.md), so the default keeps the worker near 12 GB.
    """

    min_slices: int = 20
    max_slices: int = 5000
    max_voxels: int = 500_000_000
    max_slice_thickness_mm: float = 5.0
    axial_tolerance_deg: float = 30.0
    irregular_spacing: str = "resample"  # "resample" or "reject"
    gantry_tilt: str = "resample"  # "resample" or "reject"
    spacing_tolerance: float = 0.05
    max_gap_factor: float = 3.0
    resample_spacing_mm: float = 0.0  # 0: the stack's own spacing
    # Body Part Examined values (PS3.16 Annex L, compared ignoring case and spacing) of series
    # that hold none of the six bones: skipped before any inference. A series without the
    # attribute, or with another value (PELVIS, LEG, WHOLEBODY, PARTIALBODY, ...), goes on; what
    # the model then finds is checked for anatomical sense (model/anatomy.py).
    skip_body_parts: tuple[str, ...] = (
        "HEAD", "BRAIN", "SKULL", "FACE", "ORBIT", "SINUS", "IAC", "EAR", "JAW", "TMJ", "NECK",
        "CSPINE", "TSPINE", "CHEST", "THORAX", "LUNG", "HEART", "BREAST", "CLAVICLE", "SHOULDER",
        "SCAPULA", "ARM", "UPRARM", "HUMERUS", "ELBOW", "FOREARM", "WRIST", "HAND", "FINGER",
    )  # fmt: skip

    def __post_init__(self) -> None:
        rules = (
            ("min_slices", self.min_slices >= 2, "must be >= 2 (one slice is not a volume)"),
            ("max_slices", self.max_slices >= self.min_slices, "must be >= series.min_slices"),
            ("max_voxels", self.max_voxels >= 1, "must be >= 1"),
            ("max_slice_thickness_mm", self.max_slice_thickness_mm > 0, "must be > 0"),
            ("axial_tolerance_deg", 0 <= self.axial_tolerance_deg <= 90, "must be 0..90"),
            ("irregular_spacing", self.irregular_spacing in _POLICY_CHOICES, _CHOICE_RULE),
            ("gantry_tilt", self.gantry_tilt in _POLICY_CHOICES, _CHOICE_RULE),
            ("spacing_tolerance", 0 < self.spacing_tolerance < 0.5, "must be in (0, 0.5)"),
            ("max_gap_factor", self.max_gap_factor >= 1, "must be >= 1"),
            ("resample_spacing_mm", self.resample_spacing_mm >= 0, "must be >= 0"),
        )
        for name, valid, rule in rules:
            if not valid:
                raise ValueError(f"series.{name}: {rule}, got {getattr(self, name)!r}")

    @classmethod
    def from_section(cls, section: object) -> AssemblyPolicy:
        """The policy keys of a config section object (`[series]` holds other keys too)."""
        names = [f.name for f in fields(cls)]
        return cls(**{name: getattr(section, name) for name in names if hasattr(section, name)})


class AssemblyError(ValueError):
    """A series that cannot (or by policy must not) become a volume; str() is the reason.

    Reasons quote header values (UIDs, acquisition numbers, library messages) and end up in
    the database and the log: characters that are not printable are escaped, so that a
    hostile value cannot forge a log line."""

    def __init__(self, reason: str) -> None:
        super().__init__(escape(reason))


@dataclass(frozen=True)
class FrameRef:
    """One source frame: what a SEG's Referenced Image / Source Image items point at."""

    sop_instance_uid: str
    frame_number: int | None  # 1-based for multi-frame instances, None for single-frame ones
    path: Path


@dataclass(frozen=True, eq=False)
class SourceGeometry:
    """The source frames' own grid, in stack order: a SEG is written on it, not on the volume's.

    For a tilted or irregular series the volume was resampled, so the frames are not its
    slices; `resample_to_frames` brings a volume (e.g. the label map) back onto them.
    """

    positions: np.ndarray  # (frames, 3) ImagePositionPatient, mm LPS
    orientation: tuple[float, ...]  # ImageOrientationPatient: row direction, column direction
    pixel_spacing: tuple[float, float]  # PixelSpacing as DICOM: between rows, between columns
    rows: int
    columns: int
    slice_thickness_mm: float | None
    frame_of_reference_uid: str

    @property
    def direction(self) -> tuple[float, ...]:
        """SimpleITK direction (row, column, normal as matrix columns) of every frame."""
        return tuple(np.column_stack(_axes(self.orientation)).ravel().tolist())

    def frame_grid(self, index: int) -> sitk.Image:
        """An empty one-slice image on frame `index`'s pixel grid (a resampling reference)."""
        image = sitk.Image(self.columns, self.rows, 1, sitk.sitkUInt8)
        row_spacing, column_spacing = self.pixel_spacing
        image.SetSpacing((column_spacing, row_spacing, self.slice_thickness_mm or 1.0))
        image.SetOrigin([float(v) for v in self.positions[index]])
        image.SetDirection(self.direction)
        return image

    def resample_to_frames(
        self,
        volume: Volume,
        interpolator: int = sitk.sitkNearestNeighbor,
        default: float = 0.0,
    ) -> np.ndarray:
        """`volume` sampled at every source frame's pixel centres: (frames, rows, columns).

        Nearest neighbour by default, for label maps; points outside the volume get `default`.
        """
        image = volume.to_sitk()
        out = np.empty((len(self.positions), self.rows, self.columns), volume.array.dtype)
        for index in range(len(self.positions)):
            reference = self.frame_grid(index)
            out[index] = sitk.GetArrayFromImage(
                sitk.Resample(image, reference, sitk.Transform(), interpolator, default)
            )[0]
        return out


@dataclass
class AssembledVolume:
    """A series as a volume, with the way back to its frames.

    `volume.array` holds HU as int16 when every frame's rescale gives whole HU that fit (the
    usual CT: slope 1, integer intercept) and nothing was resampled, else float32. Its grid is
    regular and orthogonal: direction (row, column, row x column) of ImageOrientationPatient,
    slices in increasing order along that normal (inferior to superior for a standard axial
    IOP), origin the first slice's first pixel; for a tilted stack, the corner of the in-plane
    box that holds every slice (outside the slices: -1024 HU). `frames` and
    `source_geometry` are the source frames in stack order, before any resampling.
    """

    volume: Volume
    frames: list[FrameRef]
    source_geometry: SourceGeometry
    notes: list[str]
    series_instance_uid: str
    resampled: bool = False
    # The headers assembly read (no pixel data), by file: the SEG writer references them
    # instead of reading every source file again.
    headers: dict[Path, Dataset] = field(default_factory=dict)


class Headers(list[tuple[Path, Dataset]]):
    """`read_headers`' (path, header) pairs, and how many files were not DICOM instances."""

    skipped: int = 0


@dataclass(frozen=True)
class SeriesSurvey:
    """One series found among headers: its files and whether it qualifies."""

    series_instance_uid: str
    paths: list[Path]
    slices: int  # slices in the stack that would be assembled; 0 when it does not qualify
    reason: str | None  # None: qualifies


@dataclass(frozen=True)
class SpacingAnalysis:
    """How the slices sit along the normal (see `analyse_spacing`)."""

    regular: bool
    spacing: float  # the mean gap when regular, else the smallest gap that repeats
    min_gap: float
    max_gap: float
    missing: int  # slices missing from an otherwise regular grid (irregular only)

    def describe(self) -> str:
        if self.missing:
            plural = "s" if self.missing > 1 else ""
            return f"{self.missing} missing slice{plural} (spacing {self.spacing:.2f} mm)"
        return f"irregular slice spacing {self.min_gap:.2f}-{self.max_gap:.2f} mm"


@dataclass(frozen=True)
class _Frame:
    """What the stage needs of one source frame, from the headers only."""

    ref: FrameRef
    position: tuple[float, ...]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, ...]
    rows: int
    columns: int
    thickness: float | None
    slope: float
    intercept: float
    acquisition: str
    localizer: bool
    stored_range: tuple[int, int]
    padding: tuple[int, int] | None  # stored values that are not image (outside the FOV)
    frame_of_reference_uid: str


@dataclass
class _Plan:
    """Everything decided from the headers: which frames, in which order, on which grid."""

    series_instance_uid: str
    frames: list[_Frame]
    offsets: np.ndarray  # (frames, 2) in-plane shift from the first frame, mm (0 if not tilted)
    depths: np.ndarray  # distance from the first frame along the normal, mm
    spacing: float  # output slice spacing, mm
    output_depths: np.ndarray | None  # output slice depths when resampling, else None
    notes: list[str]
    plane_low: tuple[float, float] = (0.0, 0.0)  # output grid's in-plane origin (tilt), mm
    plane_size: tuple[int, int] = (0, 0)  # output grid's (columns, rows)


# -- numerics (pure) ---------------------------------------------------------------------------


def _axes(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row direction, column direction and slice normal (row x column) of an IOP."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    column = np.asarray(orientation[3:6], dtype=np.float64)
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    return row, column, np.cross(row, column)


def stack_coordinates(
    positions: np.ndarray, orientation: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's distance from the first along the normal, and its in-plane shift (mm).

    The shift (along the row and column directions) is zero for an ordinary stack and grows
    linearly along a gantry-tilted one, whose slices are stacked along the table, not along
    their normal.
    """
    row, column, normal = _axes(orientation)
    relative = np.asarray(positions, dtype=np.float64) - positions[0]
    return relative @ normal, np.stack([relative @ row, relative @ column], axis=1)


def tilt_degrees(depths: np.ndarray, offsets: np.ndarray) -> float:
    """Angle between the stacking direction (first to last frame) and the slice normal."""
    if len(depths) < 2:
        return 0.0
    shift = float(np.linalg.norm(offsets[-1] - offsets[0]))
    return math.degrees(math.atan2(shift, abs(float(depths[-1] - depths[0]))))


def _grid_steps(depths: np.ndarray, spacing: float, tolerance: float) -> np.ndarray | None:
    """Grid index of every depth if each lies within tolerance x spacing of k x spacing."""
    steps = np.rint(depths / spacing)
    if np.all(np.abs(depths - steps * spacing) <= tolerance * spacing):
        return steps.astype(np.int64)
    return None


def _smallest_repeating_gap(gaps: np.ndarray, tolerance: float) -> float:
    """The smallest gap that occurs at least twice (their mean), else the median gap."""
    for gap in np.sort(gaps):
        close = np.abs(gaps - gap) <= tolerance * gap
        if close.sum() >= 2:
            return float(gaps[close].mean())
    return float(np.median(gaps))


def analyse_spacing(depths: np.ndarray, tolerance: float) -> SpacingAnalysis:
    """Regular, regular with missing slices, or irregular, from sorted depths along the normal.

    Regular means every slice lies within `tolerance` x spacing of a regular grid of the mean
    spacing: positions, not gaps, are compared, so small errors that add up along a long stack
    are caught too. highdicom's `get_volume_positions` answers the same question with a yes or
    no; the reason and the grid to resample to need the numbers, hence this function.
    """
    gaps = np.diff(depths)
    if gaps.size == 0:
        return SpacingAnalysis(True, 0.0, 0.0, 0.0, 0)
    extremes = (float(gaps.min()), float(gaps.max()))
    mean = float(depths[-1] - depths[0]) / gaps.size
    steps = _grid_steps(depths - depths[0], mean, tolerance)
    if steps is not None and np.array_equal(steps, np.arange(depths.size)):
        return SpacingAnalysis(True, mean, *extremes, 0)
    spacing = _smallest_repeating_gap(gaps, tolerance)
    steps = _grid_steps(depths - depths[0], spacing, tolerance)
    missing = 0
    if steps is not None and np.all(np.diff(steps) > 0):
        missing = int(steps[-1]) + 1 - depths.size
    return SpacingAnalysis(False, spacing, *extremes, missing)


def _shift_plane(
    plane: np.ndarray,
    offset: np.ndarray,
    pixel_size: tuple[float, float],
    origin: tuple[float, float],
    size: tuple[int, int],
    fill: float,
) -> np.ndarray:
    """A slice whose first pixel sits at `offset` (mm, in-plane) on the common in-plane grid.

    Bilinear (SimpleITK); the grid starts at `origin` and has `size` (columns, rows) pixels of
    the slice's own `pixel_size`. Outside the slice is `fill`.
    """
    plane = np.asarray(plane, dtype=np.float32)
    same_grid = size == (plane.shape[1], plane.shape[0]) and np.allclose(offset, origin)
    if same_grid:
        return plane
    image = sitk.GetImageFromArray(plane)
    image.SetSpacing(pixel_size)
    image.SetOrigin([float(v) for v in offset])
    resampled = sitk.Resample(
        image,
        list(size),
        sitk.Transform(),
        sitk.sitkLinear,
        origin,
        pixel_size,
        (1.0, 0.0, 0.0, 1.0),
        fill,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(resampled)


def resample_stack(
    slices: np.ndarray,
    depths: np.ndarray,
    offsets: np.ndarray,
    pixel_size: tuple[float, float],
    output_depths: np.ndarray,
    plane_origin: tuple[float, float],
    plane_size: tuple[int, int],
    fill: float = AIR_HU,
) -> np.ndarray:
    """Parallel slices at any depths and in-plane shifts, resampled onto an orthogonal grid.

    Slice k lies at `depths[k]` along the normal with its first pixel shifted by `offsets[k]`
    (mm, along the row and column directions). Each output plane at `output_depths[j]` is the
    linear blend of the two source slices around it, each first shifted bilinearly onto the
    common in-plane grid (`plane_origin`, `plane_size` = columns, rows, `pixel_size` = x, y):
    trilinear interpolation on the slices' own lattice, which is what is right for tilted and
    for irregular stacks alike. Depths outside the stack are clamped to its end slices.
    Returns float32 (output planes, rows, columns).
    """
    columns, rows = plane_size
    out = np.empty((len(output_depths), rows, columns), dtype=np.float32)
    shifted: dict[int, np.ndarray] = {}  # output planes go in order: two source slices suffice

    def plane(k: int) -> np.ndarray:
        if k not in shifted:
            if len(shifted) >= 2:
                del shifted[min(shifted)]
            shifted[k] = _shift_plane(
                slices[k], offsets[k], pixel_size, plane_origin, plane_size, fill
            )
        return shifted[k]

    last = len(depths) - 1
    for j, depth in enumerate(output_depths):
        k = int(np.clip(np.searchsorted(depths, depth, side="right") - 1, 0, max(last - 1, 0)))
        if last == 0:
            out[j] = plane(0)
            continue
        weight = float(np.clip((depth - depths[k]) / (depths[k + 1] - depths[k]), 0.0, 1.0))
        if weight < 1e-6:
            out[j] = plane(k)
        elif weight > 1 - 1e-6:
            out[j] = plane(k + 1)
        else:
            out[j] = (1 - weight) * plane(k) + weight * plane(k + 1)
    return out


# -- headers -----------------------------------------------------------------------------------


def _file_meta(ds: Dataset) -> Dataset:
    return getattr(ds, "file_meta", None) or Dataset()


def _sop_class(ds: Dataset) -> str:
    return str(ds.get("SOPClassUID") or _file_meta(ds).get("MediaStorageSOPClassUID") or "")


def _sop_instance(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID") or _file_meta(ds).get("MediaStorageSOPInstanceUID") or "")


def _check_body_part(headers: Sequence[tuple[Path, Dataset]], policy: AssemblyPolicy) -> None:
    skipped = {part.replace(" ", "").upper() for part in policy.skip_body_parts}
    for _, ds in headers:
        part = str(ds.get("BodyPartExamined") or "")
        if part.replace(" ", "").upper() in skipped:
            raise AssemblyError(f"body part examined {part} (series.skip_body_parts)")


def _is_ct_image(ds: Dataset) -> bool:
    sop_class = _sop_class(ds)
    if sop_class:
        return sop_class in CT_SOP_CLASSES
    return ds.get("Modality") == "CT" and "ImagePositionPatient" in ds


def _kind_of_non_ct(ds: Dataset) -> str:
    sop_class = _sop_class(ds)
    if sop_class in SECONDARY_CAPTURE_SOP_CLASSES:
        return "secondary capture"
    return f"not a CT image ({UID(sop_class).name if sop_class else 'no SOP class'})"


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def read_headers(paths: Iterable[str | Path]) -> Headers:
    """Headers (no pixel data) of every DICOM instance among `paths` (files or folders).

    Files that are not DICOM instances (junk, a Philips DIRFILE or DICOMDIR, i.e. a Media
    Storage Directory) are skipped; their number is `.skipped` on the result.
    """
    headers = Headers()
    for path in _expand(paths):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception as error:  # pydicom raises many kinds on junk; junk is skipped
            log.debug("not DICOM: %s (%s)", path.name, type(error).__name__)
            headers.skipped += 1
            continue
        try:
            directory = _sop_class(ds) == MediaStorageDirectoryStorage
        except Exception:  # an undecodable SOP Class UID: the rules give the reason
            directory = False
        if directory:
            headers.skipped += 1
            continue
        headers.append((path, ds))
    if headers.skipped:
        log.info("skipped %d files that are not DICOM instances", headers.skipped)
    return headers


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return [value]


def _frame_value(ds: Dataset, index: int, keyword: str) -> Any:
    """An attribute of frame `index`: per-frame functional group, shared group, top level."""
    group = _FUNCTIONAL_GROUP_OF.get(keyword)
    if group is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        shared = ds.get("SharedFunctionalGroupsSequence") or []
        for item in [*per_frame[index : index + 1], *shared[:1]]:
            for macro in item.get(group) or []:
                if keyword in macro:
                    return macro[keyword].value
    return ds.get(keyword)


def _floats(value: Any, count: int, keyword: str, where: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in _values(value))
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise AssemblyError(f"instance {where}: {keyword} missing or malformed")
    return numbers


def _optional_float(value: Any, default: float | None) -> float | None:
    try:
        number = float(_values(value)[0])
    except (IndexError, TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if ds.get("PixelRepresentation") == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _padding(ds: Dataset) -> tuple[int, int] | None:
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit", value)
    try:
        return min(int(value), int(limit)), max(int(value), int(limit))
    except (TypeError, ValueError):  # an unresolved US/SS value: no padding is the safe reading
        return None


def _is_localizer(ds: Dataset, index: int) -> bool:
    image_types = (_values(ds.get("ImageType")), _values(_frame_value(ds, index, "FrameType")))
    return any(len(t) > 2 and str(t[2]).upper() == "LOCALIZER" for t in image_types)


def _malformed(
    path: Path, ds: Dataset, error: BaseException, element: BaseTag | None = None
) -> AssemblyError:
    """The reason for a header pydicom cannot decode: the error's type and, when known, the
    element, not the message (library messages quote values, which may identify the
    patient)."""
    try:
        where = _sop_instance(ds) or path.name
    except Exception:  # the SOP Instance UID itself is what is broken
        where = path.name
    at = f" in {element}" if element is not None else ""
    return AssemblyError(f"instance {where}: malformed header ({type(error).__name__}{at})")


def _check_decodes(path: Path, ds: Dataset, decoded: set[tuple[Any, ...]]) -> None:
    """Every standard element of the header, in sequences too, decodes (private elements are
    the vendor's business). pydicom decodes on access, so without this a broken value (a US
    of 3 bytes, an unknown VR) raises in whatever reads it first, the SEG writer copying the
    patient module included; here it is the reason the series is skipped.

    `decoded` holds the raw elements (with the character set they were decoded in) already
    found good in this series: the slices of a series repeat most of their header, and
    decoding all of every one took longer than reading them."""
    charset = ds.get_item(_SPECIFIC_CHARACTER_SET)
    charset_bytes = charset.value if charset is not None else None
    trail: list[BaseTag] = []  # the element being decoded, innermost last

    def check(dataset: Dataset) -> None:
        for tag in list(dataset.keys()):
            if tag.is_private:
                continue
            raw = dataset.get_item(tag)
            key = None
            if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
                key = (
                    tag,
                    raw.VR,
                    raw.is_implicit_VR,
                    raw.is_little_endian,
                    raw.value,
                    charset_bytes,
                )
                if key in decoded:
                    continue
            trail.append(tag)
            element = dataset[tag]  # converts the raw element
            if element.VR == "SQ":
                for item in element.value:
                    check(item)
            trail.pop()
            if key is not None:
                decoded.add(key)

    try:
        check(ds)
    except Exception as error:  # any kind: ValueError, NotImplementedError, RecursionError...
        raise _malformed(path, ds, error, trail[-1] if trail else None) from error


def _declared_frames(path: Path, ds: Dataset) -> int:
    """NumberOfFrames (1 when absent), read before any frame is expanded."""
    try:
        count = int(ds.get("NumberOfFrames") or 1)
    except Exception as error:  # an IS that is not a number, a wrong VR, ...
        raise _malformed(path, ds, error) from error
    if count < 1:
        raise AssemblyError(f"instance {_sop_instance(ds) or path.name}: NumberOfFrames {count}")
    return count


def _frames_of(path: Path, ds: Dataset) -> list[_Frame]:
    """The frames of one instance: one for single-frame CT, NumberOfFrames for Enhanced CT."""
    try:
        return _parse_frames(path, ds)
    except AssemblyError:
        raise
    except Exception as error:  # pydicom converts elements lazily: malformed ones raise here
        raise _malformed(path, ds, error) from error


def _parse_frames(path: Path, ds: Dataset) -> list[_Frame]:
    uid = _sop_instance(ds)
    where = uid or path.name
    count = _declared_frames(path, ds)
    multiframe = "PerFrameFunctionalGroupsSequence" in ds or count > 1
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or columns <= 0:
        raise AssemblyError(f"instance {where}: Rows/Columns missing")
    frames = []
    for index in range(count):

        def value(keyword: str, index: int = index) -> Any:
            return _frame_value(ds, index, keyword)

        pixel_spacing = _floats(value("PixelSpacing"), 2, "PixelSpacing", where)
        if min(pixel_spacing) <= 0:
            raise AssemblyError(f"instance {where}: PixelSpacing must be positive")
        acquisition = value("FrameAcquisitionNumber")
        if acquisition is None:
            acquisition = ds.get("AcquisitionNumber")
        slope = _optional_float(value("RescaleSlope"), 1.0)
        if not slope:
            raise AssemblyError(f"instance {where}: RescaleSlope is 0")
        position = _floats(value("ImagePositionPatient"), 3, "ImagePositionPatient", where)
        if max(map(abs, position)) > _MAX_COORDINATE_MM:
            raise AssemblyError(f"instance {where}: ImagePositionPatient out of range")
        # 0 or negative: written by some scanners for "unknown"; never a geometry to use.
        thickness = _optional_float(value("SliceThickness"), None)
        frames.append(
            _Frame(
                ref=FrameRef(uid, index + 1 if multiframe else None, path),
                position=position,
                orientation=_floats(
                    value("ImageOrientationPatient"), 6, "ImageOrientationPatient", where
                ),
                pixel_spacing=pixel_spacing,
                rows=rows,
                columns=columns,
                thickness=thickness if thickness is not None and thickness > 0 else None,
                slope=slope,
                intercept=_optional_float(value("RescaleIntercept"), 0.0) or 0.0,
                acquisition="" if acquisition is None else str(acquisition),
                localizer=_is_localizer(ds, index),
                stored_range=_stored_range(ds),
                padding=_padding(ds),
                frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
            )
        )
    return frames


# -- planning (headers only) -------------------------------------------------------------------


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(v, _GEOMETRY_DECIMALS) + 0.0 for v in values)


def _format(values: Sequence[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


def _check_consistent(frames: list[_Frame]) -> None:
    """Every frame must share rows/columns, pixel spacing and orientation."""
    attributes = (
        ("rows/columns", lambda f: f"{f.rows}x{f.columns}"),
        ("pixel spacing", lambda f: _format(_rounded(f.pixel_spacing)) + " mm"),
        ("image orientation", lambda f: _format(_rounded(f.orientation))),
        ("frame of reference", lambda f: f.frame_of_reference_uid or "none"),
    )
    for label, key in attributes:
        counts = Counter(key(f) for f in frames)
        if len(counts) > 1:
            found = ", ".join(f"{k}: {n} frames" for k, n in counts.most_common())
            raise AssemblyError(f"inconsistent {label} ({found})")
    orientation = np.asarray(frames[0].orientation, dtype=np.float64)
    norms = np.linalg.norm(orientation[:3]), np.linalg.norm(orientation[3:])
    if any(abs(norm - 1.0) > _UNIT_TOLERANCE for norm in norms):
        raise AssemblyError("image orientation: direction cosines are not unit vectors")
    row, column, _ = _axes(frames[0].orientation)
    if abs(float(row @ column)) > _ORTHONORMAL_TOLERANCE:
        raise AssemblyError("image orientation: row and column directions are not orthogonal")


def _unique_frames(frames: list[_Frame], notes: list[str]) -> list[_Frame]:
    """Copies of one instance (a re-send) count once."""
    seen: set[tuple[str, int | None]] = set()
    unique = []
    for frame in frames:
        key = (frame.ref.sop_instance_uid, frame.ref.frame_number)
        if frame.ref.sop_instance_uid and key in seen:
            continue
        seen.add(key)
        unique.append(frame)
    if len(unique) < len(frames):
        duplicates = _count(len(frames) - len(unique), "duplicate instance")
        notes.append(f"ignored {duplicates} (same SOP Instance UID)")
    return unique


def _choose_stack(frames: list[_Frame], notes: list[str]) -> list[_Frame]:
    """The frames of the stack to assemble, sorted along the normal (rule 4, module doc)."""
    normal = _axes(frames[0].orientation)[2]

    def depth(frame: _Frame) -> float:
        return float(np.dot(frame.position, normal))

    by_acquisition: dict[str, list[_Frame]] = defaultdict(list)
    for frame in frames:
        by_acquisition[frame.acquisition].append(frame)
    ranges = sorted((min(map(depth, fs)), max(map(depth, fs))) for fs in by_acquisition.values())
    reach = ranges[0][1]
    overlap = False
    for low, high in ranges[1:]:
        overlap = overlap or low < reach - _DUPLICATE_MM
        reach = max(reach, high)
    if overlap:
        stacks = sorted(by_acquisition.items(), key=lambda item: (-len(item[1]), item[0]))
        (chosen, stack), (runner_up, other) = stacks[0], stacks[1]
        if len(stack) == len(other):
            raise AssemblyError(
                f"ambiguous: overlapping acquisitions {chosen or '?'} and {runner_up or '?'} "
                f"have {len(stack)} slices each"
            )
        for name, left_out in stacks[1:]:
            notes.append(
                f"left out acquisition {name or '?'} ({len(left_out)} slices), which overlaps "
                f"the assembled acquisition {chosen or '?'} ({len(stack)} slices)"
            )
        frames = stack
    frames = sorted(frames, key=depth)
    duplicates = int(np.sum(np.diff([depth(f) for f in frames]) < _DUPLICATE_MM))
    if duplicates:
        raise AssemblyError(
            f"duplicate slice positions ({duplicates} frames at the position of another, "
            "not told apart by acquisition number)"
        )
    return frames


def _check_selection(frames: list[_Frame], policy: AssemblyPolicy) -> None:
    normal = _axes(frames[0].orientation)[2]
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if angle > policy.axial_tolerance_deg:
        raise AssemblyError(
            f"not axial (slice normal {angle:.1f} deg from the patient z axis "
            f"> {policy.axial_tolerance_deg:g})"
        )
    if len(frames) < policy.min_slices:
        raise AssemblyError(f"too few slices ({len(frames)} < {policy.min_slices})")
    thicknesses = [f.thickness for f in frames if f.thickness]
    if thicknesses and max(thicknesses) > policy.max_slice_thickness_mm + 1e-6:
        thickest = max(thicknesses)
        count = sum(t > policy.max_slice_thickness_mm + 1e-6 for t in thicknesses)
        raise AssemblyError(
            f"slice thickness {thickest:g} mm > {policy.max_slice_thickness_mm:g} mm "
            f"({count} of {len(frames)} slices)"
        )


def _plan(headers: Sequence[tuple[Path, Dataset]], policy: AssemblyPolicy) -> _Plan:
    """Rules 1-7 of the module doc on headers alone; raises AssemblyError with the reason."""
    notes: list[str] = []
    skipped = getattr(headers, "skipped", 0)
    if skipped:
        notes.append(f"ignored {_count(skipped, 'non-DICOM file')}")
    if not headers:
        raise AssemblyError("no DICOM instances")
    decoded: set[tuple[Any, ...]] = set()
    for path, ds in headers:
        _check_decodes(path, ds, decoded)
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise AssemblyError(f"{len(series)} series in one input; assemble one at a time")
    ct = [(path, ds) for path, ds in headers if _is_ct_image(ds)]
    if not ct:
        raise AssemblyError(Counter(_kind_of_non_ct(ds) for _, ds in headers).most_common(1)[0][0])
    if len(ct) < len(headers):
        notes.append(f"left out {_count(len(headers) - len(ct), 'non-CT instance')}")
    declared = sum(_declared_frames(path, ds) for path, ds in ct)
    if declared > policy.max_slices:  # before expanding frames: NumberOfFrames may be 2^31
        raise AssemblyError(f"too many slices ({declared} > {policy.max_slices})")
    no_class = sum(not ds.get("SOPClassUID") for _, ds in ct)
    if no_class:
        notes.append(f"empty SOP Class UID in {_count(no_class, 'instance')}: taken as CT")
    frames = _unique_frames([f for path, ds in ct for f in _frames_of(path, ds)], notes)
    images = [f for f in frames if not f.localizer]
    if not images:
        raise AssemblyError("localizer")
    _check_body_part(ct, policy)
    if len(images) < len(frames):
        notes.append(f"left out {_count(len(frames) - len(images), 'localizer frame')}")
    _check_consistent(images)
    stack = _choose_stack(images, notes)
    _check_selection(stack, policy)
    return _plan_grid(stack, policy, notes, series.pop())


def _plan_grid(
    stack: list[_Frame], policy: AssemblyPolicy, notes: list[str], series_uid: str
) -> _Plan:
    """Rule 6: the output grid, resampling the tilted or irregular stack or rejecting it."""
    orientation = stack[0].orientation
    depths, offsets = stack_coordinates(np.array([f.position for f in stack]), orientation)
    analysis = analyse_spacing(depths, policy.spacing_tolerance)
    shear = float(np.abs(offsets).max(initial=0.0))
    tilted = shear > _SHEAR_TOLERANCE_PX * min(stack[0].pixel_spacing)
    tilt = tilt_degrees(depths, offsets)
    if tilted and policy.gantry_tilt == "reject":
        raise AssemblyError(f"gantry tilt {tilt:.1f} deg (policy: reject)")
    if not analysis.regular:
        if policy.irregular_spacing == "reject":
            raise AssemblyError(f"{analysis.describe()} (policy: reject)")
        if analysis.max_gap > policy.max_gap_factor * analysis.spacing:
            raise AssemblyError(
                f"gap of {analysis.max_gap:.2f} mm between slices is "
                f"{analysis.max_gap / analysis.spacing:.1f}x the {analysis.spacing:.2f} mm "
                f"spacing (max_gap_factor {policy.max_gap_factor:g})"
            )
    if not tilted:
        offsets = np.zeros_like(offsets)
    first = stack[0]
    if analysis.regular and not tilted:
        spacing = analysis.spacing or first.thickness or 1.0
        size = (first.columns, first.rows)
        _check_size(len(stack), size, first.pixel_spacing, spacing, policy)
        return _Plan(series_uid, stack, offsets, depths, spacing, None, notes, (0.0, 0.0), size)
    # Whole steps from the first slice to the last, as close to the target as can be: the
    # volume then covers every source slice, and the SEG can be sampled back on each of them.
    steps = max(1, round(float(depths[-1]) / (policy.resample_spacing_mm or analysis.spacing)))
    spacing, count = float(depths[-1]) / steps, steps + 1
    # The in-plane box that holds every shifted slice (a tilted stack is wider than a slice).
    low = offsets.min(axis=0)
    extent = offsets.max(axis=0) - low
    row_spacing, column_spacing = first.pixel_spacing
    size = (
        first.columns + math.ceil(extent[0] / column_spacing - 1e-6),
        first.rows + math.ceil(extent[1] / row_spacing - 1e-6),
    )
    _check_size(count, size, first.pixel_spacing, spacing, policy)  # before arange(count)
    if tilted:
        notes.append(
            f"gantry tilt {tilt:.1f} deg corrected: slices moved onto an orthogonal grid "
            f"(in-plane shifts up to {shear:.1f} mm)"
        )
    if not analysis.regular:
        notes.append(
            f"resampled {analysis.describe()} to {spacing:.2f} mm "
            f"({count} slices from {len(stack)})"
        )
    elif policy.resample_spacing_mm:
        notes.append(f"resampled to {spacing:.2f} mm ({count} slices from {len(stack)})")
    output_depths = np.arange(count) * spacing
    plane_low = (float(low[0]), float(low[1]))
    return _Plan(series_uid, stack, offsets, depths, spacing, output_depths, notes, plane_low, size)


def _check_size(
    slices: int,
    plane_size: tuple[int, int],
    pixel_spacing: tuple[float, ...],
    slice_spacing: float,
    policy: AssemblyPolicy,
) -> None:
    """Rule 6: the volume, on its own grid and on the model's 0.8 mm grid, fits `max_voxels`.

    Python integers and floats, not numpy's: 65535 x 65535 x 5000 must not wrap around."""
    columns, rows = plane_size
    voxels = slices * rows * columns
    row_spacing, column_spacing = pixel_spacing
    extent_mm = (columns * column_spacing, rows * row_spacing, slices * slice_spacing)
    model_voxels = math.prod(max(1.0, mm / MODEL_SPACING_MM) for mm in extent_mm)
    largest = max(voxels, model_voxels)
    if largest > policy.max_voxels:
        where = "" if voxels >= model_voxels else f" at the model's {MODEL_SPACING_MM} mm"
        raise AssemblyError(
            f"volume too large: {_voxels(largest)}{where} > max_voxels "
            f"{_voxels(policy.max_voxels).removesuffix(' voxels')} ({columns}x{rows}x{slices} "
            f"at {column_spacing:g} x {row_spacing:g} x {slice_spacing:.3g} mm)"
        )


def _voxels(count: float) -> str:
    return f"{count / 1e6:,.0f} M voxels" if count >= 1e6 else f"{count:,.0f} voxels"


# -- public stage ------------------------------------------------------------------------------


def group_series(headers: Iterable[tuple[Path, Dataset]]) -> dict[str, list[tuple[Path, Dataset]]]:
    """Headers by SeriesInstanceUID ('' for instances without one or with an undecodable
    one, which the rules then name), in order of appearance."""
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path, ds in headers:
        try:
            uid = str(ds.get("SeriesInstanceUID", ""))
        except Exception:
            uid = ""
        groups[uid].append((path, ds))
    return dict(groups)


def select_series(
    headers: Sequence[tuple[Path, Dataset]], policy: AssemblyPolicy | None = None
) -> str | None:
    """None if the series (headers of one series) qualifies, else the reason to skip it.

    Decided from headers alone by the same rules `assemble_volume` applies, so a series that
    passes here fails there only on its pixel data (e.g. an undecodable transfer syntax).
    """
    try:
        _plan(headers, policy or AssemblyPolicy())
    except AssemblyError as error:
        return str(error)
    return None


def survey_series(
    headers: Iterable[tuple[Path, Dataset]], policy: AssemblyPolicy | None = None
) -> list[SeriesSurvey]:
    """Every series among `headers` with its skip reason, qualifying and largest first."""
    surveys = []
    for uid, members in group_series(headers).items():
        paths = [path for path, _ in members]
        try:
            plan = _plan(members, policy or AssemblyPolicy())
        except AssemblyError as error:
            surveys.append(SeriesSurvey(uid, paths, 0, str(error)))
        else:
            surveys.append(SeriesSurvey(uid, paths, len(plan.frames), None))
    return sorted(surveys, key=lambda s: (s.reason is not None, -s.slices))


def choose_series(surveys: Sequence[SeriesSurvey], uid: str | None = None) -> SeriesSurvey:
    """The series `uid`, or the qualifying one with most slices; else every series' reason."""
    if not surveys:
        raise AssemblyError("no DICOM instances")
    if uid is not None:
        for survey in surveys:
            if survey.series_instance_uid == uid:
                if survey.reason is not None:
                    raise AssemblyError(f"series {uid}: {survey.reason}")
                return survey
        raise AssemblyError(f"no series {uid}")
    qualifying = [s for s in surveys if s.reason is None]
    if not qualifying:
        listed = "; ".join(
            f"{s.series_instance_uid or '(no UID)'} ({_count(len(s.paths), 'file')}): {s.reason}"
            for s in surveys
        )
        raise AssemblyError(f"no qualifying series: {listed}")
    return max(qualifying, key=lambda s: s.slices)


def _hu_dtype(frames: list[_Frame], resampling: bool) -> np.dtype:
    """int16 when every frame's rescale maps its stored range to whole HU in int16."""
    if resampling:
        return np.dtype(np.float32)
    for frame in frames:
        if not (frame.slope.is_integer() and frame.intercept.is_integer()):
            return np.dtype(np.float32)
        ends = [v * frame.slope + frame.intercept for v in frame.stored_range]
        if min(ends) < _INT16.min or max(ends) > _INT16.max:
            return np.dtype(np.float32)
    return np.dtype(np.int16)


def _read_hu(frames: list[_Frame], dtype: np.dtype) -> np.ndarray:
    """HU of every frame, in order: stored x slope + intercept of that frame; padding -> air.

    Pixel data is decoded by pydicom (pylibjpeg for JPEG, JPEG-LS and JPEG 2000). Stored
    values marked as Pixel Padding (outside the reconstructed circle, e.g. -1500 on GE) are
    not image: they become air (-1024 HU), as the resampling fills outside the slices.
    """
    first = frames[0]
    hu = np.empty((len(frames), first.rows, first.columns), dtype=dtype)
    by_path: dict[Path, list[int]] = defaultdict(list)
    for index, frame in enumerate(frames):
        by_path[frame.ref.path].append(index)
    for path, indices in by_path.items():
        where = frames[indices[0]].ref.sop_instance_uid or path.name
        try:
            stored = pixel_array(path)
        except Exception as error:  # decoders raise many kinds on bad or unsupported data
            raise AssemblyError(f"cannot decode pixel data of instance {where}: {error}") from error
        if stored.size % (first.rows * first.columns):
            raise AssemblyError(f"instance {where}: pixel data does not match Rows x Columns")
        stored = stored.reshape(-1, first.rows, first.columns)
        for index in indices:
            frame = frames[index]
            number = (frame.ref.frame_number or 1) - 1
            if number >= len(stored):
                raise AssemblyError(f"instance {where}: frame {number + 1} missing")
            if hu.dtype == np.int16:  # whole slope and intercept (_hu_dtype): exact in int32
                values = stored[number].astype(np.int32)
                if frame.slope != 1:
                    values *= int(frame.slope)
                values += int(frame.intercept)
            else:
                values = np.multiply(stored[number], frame.slope, dtype=np.float64)
                values += frame.intercept
            if frame.padding is not None:
                low, high = frame.padding
                values[(stored[number] >= low) & (stored[number] <= high)] = AIR_HU
            if hu.dtype == np.int16 and (values.min() < _INT16.min or values.max() > _INT16.max):
                hu = hu.astype(np.float32)  # stored values beyond BitsStored: keep them exact
            hu[index] = values
    return hu


def assemble_volume(
    paths: Iterable[str | Path], policy: AssemblyPolicy | None = None
) -> AssembledVolume:
    """The volume of one series' files (or folders), or AssemblyError with the reason."""
    policy = policy or AssemblyPolicy()
    headers = read_headers(paths)
    by_path = dict(headers)
    plan = _plan(headers, policy)
    frames, first = plan.frames, plan.frames[0]
    row, column, normal = _axes(first.orientation)
    row_spacing, column_spacing = first.pixel_spacing
    hu = _read_hu(frames, _hu_dtype(frames, plan.output_depths is not None))
    origin = np.asarray(first.position, dtype=np.float64)
    if plan.output_depths is not None:
        hu = resample_stack(
            hu,
            plan.depths,
            plan.offsets,
            (column_spacing, row_spacing),
            plan.output_depths,
            plan.plane_low,
            plan.plane_size,
        )
        origin = origin + plan.plane_low[0] * row + plan.plane_low[1] * column
    if any(f.padding is not None for f in frames):
        plan.notes.append("pixel padding (outside the reconstructed field) set to -1024 HU")
    volume = Volume(
        hu,
        spacing=(column_spacing, row_spacing, plan.spacing),
        origin=tuple(origin.tolist()),
        direction=tuple(np.column_stack([row, column, normal]).ravel().tolist()),
    )
    geometry = SourceGeometry(
        positions=np.array([f.position for f in frames]),
        orientation=first.orientation,
        pixel_spacing=(row_spacing, column_spacing),
        rows=first.rows,
        columns=first.columns,
        slice_thickness_mm=first.thickness,
        frame_of_reference_uid=first.frame_of_reference_uid,
    )
    log.info(
        "assembled series %s: %d frames -> %s voxels (%s)",
        plan.series_instance_uid,
        len(frames),
        "x".join(map(str, hu.shape[::-1])),
        "; ".join(plan.notes) or "as stacked",
    )
    return AssembledVolume(
        volume=volume,
        frames=[f.ref for f in frames],
        source_geometry=geometry,
        notes=plan.notes,
        series_instance_uid=plan.series_instance_uid,
        resampled=plan.output_depths is not None,
        headers={f.ref.path: by_path[f.ref.path] for f in frames},
    )
