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


def labels_to_grid(labels: sitk.Image, reference: Volume) -> sitk.Image:
    """Nearest-neighbour resampling of a label map onto the reference volume's grid (none when
    the grids already agree: an input at 0.8 mm LPS costs no resampling on the way out).

    The grid is given by the volume's geometry: no SimpleITK copy of its voxels is needed.
    """
    size = reference.array.shape[::-1]
    if (
        labels.GetSize() == size
        and np.allclose(labels.GetSpacing(), reference.spacing)
        and np.allclose(labels.GetOrigin(), reference.origin)
        and np.allclose(labels.GetDirection(), reference.direction)
    ):
        return labels
    return sitk.Resample(
        labels,
        [int(n) for n in size],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        [float(o) for o in reference.origin],
        [float(s) for s in reference.spacing],
        [float(d) for d in reference.direction],
        0,
        labels.GetPixelID(),
    )
