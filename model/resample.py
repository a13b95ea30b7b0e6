"""Moving volumes between the scanner's grid and the model's 0.8 mm grid (SimpleITK)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from model.volume_io import Volume

AIR_HU = -1024


def needs_resampling(image: sitk.Image, spacing_mm: float, tolerance: float = 0.01) -> bool:
    return any(abs(s - spacing_mm) > tolerance * spacing_mm for s in image.GetSpacing())


def to_model_grid(
    image: sitk.Image, spacing_mm: float, interpolator: int, default: float
) -> sitk.Image:
    """Reorient to LPS (an exact axis permutation/flip) and resample to isotropic `spacing_mm`.

    The model was trained on axial LPS volumes; reorienting first means a NIfTI stored RAS or a
    coronal reconstruction shows the anatomy the same way. The grid keeps the (reoriented)
    direction, so an oblique series stays oblique rather than being interpolated twice.
    """
    # Already LPS (an axial DICOM series): reorienting would only copy it.
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines
    if orientation(image.GetDirection()) != "LPS":
        image = sitk.DICOMOrient(image, "LPS")
    if not needs_resampling(image, spacing_mm):
        return image
    size_mm = np.array(image.GetSize()) * np.array(image.GetSpacing())
    size = [max(1, round(n)) for n in size_mm / spacing_mm]
    # Keep the physical centre of the first voxel's extent: origin shifts by half the change.
    old_sp = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    shift = direction @ ((spacing_mm - old_sp) / 2)
    origin = np.array(image.GetOrigin()) + shift
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        interpolator,
        origin.tolist(),
        [spacing_mm] * 3,
        image.GetDirection(),
        default,
        image.GetPixelID(),
    )


def image_to_model_grid(volume: Volume, spacing_mm: float) -> sitk.Image:
    image = volume.to_sitk()
    if image.GetPixelID() not in (sitk.sitkInt16, sitk.sitkFloat32):
        image = sitk.Cast(image, sitk.sitkFloat32)
    return to_model_grid(image, spacing_mm, sitk.sitkLinear, AIR_HU)


def labels_to_model_grid(volume: Volume, spacing_mm: float) -> sitk.Image:
    return to_model_grid(volume.to_sitk(), spacing_mm, sitk.sitkNearestNeighbor, 0)


def labels_to_grid(labels: Volume, reference: Volume) -> np.ndarray:
    """Nearest-neighbour resampling of `labels` onto the reference volume's grid, as an array
    in a SimpleITK image's buffer (`Volume.blank`: written with no copy).

    The model's grid is the input's reoriented to LPS, so the two grids' axes run along each
    other and each axis of the result takes its voxels from one axis of `labels`: one index
    per plane, row and column (`_nearest_indices`) and a gather plane by plane, 3x faster than
    `sitk.Resample` and with no copy of either array into SimpleITK. Equal to SimpleITK's
    nearest neighbour wherever one voxel is nearest; where a voxel centre lies exactly half-way
    between two (an input spacing an even multiple of the model's), each takes one of the two
    by rounding noise. Grids whose axes do not run along each other go through SimpleITK.
    """
    if (
        labels.array.shape == reference.array.shape
        and np.allclose(labels.spacing, reference.spacing)
        and np.allclose(labels.origin, reference.origin)
        and np.allclose(labels.direction, reference.direction)
    ):
        return labels.array  # an input at 0.8 mm LPS costs no resampling on the way out
    out = reference.blank(labels.array.dtype.type)
    maps = _nearest_indices(labels, reference)
    if maps is None:
        resampled = sitk.Resample(
            labels.to_sitk(), out.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor
        )
        out.array[...] = sitk.GetArrayViewFromImage(resampled)
        return out.array
    (x_axis, columns), (y_axis, rows), (z_axis, planes) = maps
    # labels' axes (numpy order: z, y, x) in the order of the reference's z, y, x
    source = labels.array.transpose(2 - z_axis, 2 - y_axis, 2 - x_axis)
    outside_rows, outside_columns = rows < 0, columns < 0
    rows, columns = np.maximum(rows, 0), np.maximum(columns, 0)
    plane, previous = out.array[0], -1
    for k, index in enumerate(planes):
        if index < 0:
            continue  # out.array is zeros
        if index != previous:  # consecutive planes often take the same one: made once
            plane = source[index].take(rows, axis=0).take(columns, axis=1)
            plane[outside_rows] = 0
            plane[:, outside_columns] = 0
            previous = index
        out.array[k] = plane
    return out.array


def _nearest_indices(grid: Volume, reference: Volume) -> list[tuple[int, np.ndarray]] | None:
    """For each axis (x, y, z) of the reference grid: the axis of `grid` it runs along and, for
    each of its voxels, the index of the nearest voxel of `grid` on that axis (-1 outside it,
    as SimpleITK has it: half a voxel past the last centre). None when an axis of one grid runs
    along no single axis of the other."""
    to_index = np.linalg.inv(np.reshape(grid.direction, (3, 3)) * np.asarray(grid.spacing))
    # reference voxel index -> grid continuous index: step per axis, and where index 0 lands
    steps = to_index @ (np.reshape(reference.direction, (3, 3)) * np.asarray(reference.spacing))
    start = to_index @ (np.asarray(reference.origin) - np.asarray(grid.origin))
    along = np.abs(steps) > 1e-6 * np.abs(steps).max()
    if not ((along.sum(axis=0) == 1).all() and (along.sum(axis=1) == 1).all()):
        return None
    maps = []
    for axis_in_reference, n in enumerate(reference.array.shape[::-1]):
        axis = int(np.flatnonzero(along[:, axis_in_reference])[0])
        position = steps[axis, axis_in_reference] * np.arange(n) + start[axis]
        index = np.floor(position + 0.5).astype(np.int64)
        index[(position < -0.5) | (position >= grid.array.shape[2 - axis] - 0.5)] = -1
        maps.append((axis, index))
    return maps
