"""Reading and writing 3-D volumes (NIfTI, NRRD, MHA) with their geometry, via SimpleITK."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Volume:
    """A voxel array in numpy (z, y, x) order with its geometry in SimpleITK (x, y, z) order.

    Coordinates are DICOM patient coordinates (LPS, millimetres), as SimpleITK uses them.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(o) for o in self.origin])
        image.SetDirection([float(d) for d in self.direction])
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"expected a scalar 3-D image, got {image.GetDimension()}-D with "
                f"{image.GetNumberOfComponentsPerPixel()} components"
            )
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(image.GetSpacing()),
            origin=tuple(image.GetOrigin()),
            direction=tuple(image.GetDirection()),
        )

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid carrying other voxel values (e.g. labels for an image)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)


def is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def read_volume(path: str | Path) -> Volume:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such volume file: {path}")
    if not is_volume_file(path):
        raise ValueError(f"{path}: not a NIfTI, NRRD or MHA file ({', '.join(VOLUME_SUFFIXES)})")
    return Volume.from_sitk(sitk.ReadImage(str(path)))


def write_volume(volume: Volume, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume.to_sitk(), str(path), useCompression=True)
