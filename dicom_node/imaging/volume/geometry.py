"""Source geometry and the numerics of a stack of slices (pure functions of arrays).

The source frames' own grid (`SourceGeometry`: the SEG is written on it, not on the volume's),
where slices sit along the normal and in-plane (`stack_coordinates`, `tilt_degrees`), whether
their spacing is regular (`analyse_spacing`), and resampling a tilted or irregular stack onto
an orthogonal grid (`resample_stack`). Nothing here reads DICOM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from model.resample import AIR_HU
from model.volume_io import Volume


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
        return tuple(np.column_stack(orientation_axes(self.orientation)).ravel().tolist())

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


def orientation_axes(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    row, column, normal = orientation_axes(orientation)
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
