"""Reading and writing 3-D volumes (NIfTI, NRRD, MHA) with their geometry, via SimpleITK.

A volume read, or made with `Volume.blank`, keeps its voxels in a SimpleITK image's buffer, and
`Volume.to_sitk` hands that image back: a whole-leg scan is 1 GB, and a copy each way cost a
second and a gigabyte more at the peak of `dicom-node segment`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

_PIXEL_TYPES = {
    np.dtype(np.uint8): sitk.sitkUInt8,
    np.dtype(np.int16): sitk.sitkInt16,
    np.dtype(np.uint16): sitk.sitkUInt16,
    np.dtype(np.float32): sitk.sitkFloat32,
}
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class _ImageVoxels:
    """A SimpleITK image's voxel buffer as the base of numpy arrays: the image lives as long as
    any array viewing it. The image is held only here, so writing through the arrays is safe."""

    def __init__(self, image: sitk.Image):
        self.image = image
        interface = dict(sitk.GetArrayViewFromImage(image).__array_interface__)
        interface["data"] = (interface["data"][0], False)  # writable: no one else holds it
        self.__array_interface__ = interface


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
        """The volume as a SimpleITK image: the image its voxels live in when they do (read
        from a file or made by `blank`, on this grid), so that the two share the voxels, else a
        copy."""
        image = self._image()
        if image is not None:
            return image
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(o) for o in self.origin])
        image.SetDirection([float(d) for d in self.direction])
        return image

    def _image(self) -> sitk.Image | None:
        """The image whose whole buffer `array` is, when its geometry is this volume's."""
        voxels = self.array.base
        if not isinstance(voxels, _ImageVoxels):
            return None
        image = voxels.image
        same_grid = (
            self.array.shape == tuple(image.GetSize())[::-1]
            and self.array.flags.c_contiguous
            and image.GetSpacing() == tuple(float(s) for s in self.spacing)
            and image.GetOrigin() == tuple(float(o) for o in self.origin)
            and image.GetDirection() == tuple(float(d) for d in self.direction)
        )
        return image if same_grid else None

    def blank(self, dtype: type[np.generic] = np.uint8) -> Volume:
        """A volume of zeros on this grid, its voxels in a SimpleITK image (`to_sitk`)."""
        image = sitk.Image([int(n) for n in self.array.shape[::-1]], _PIXEL_TYPES[np.dtype(dtype)])
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(o) for o in self.origin])
        image.SetDirection([float(d) for d in self.direction])
        return Volume.from_sitk(image)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        """The image as a volume whose array is the image's own voxels (no copy): the volume
        owns the image from here on."""
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"expected a scalar 3-D image, got {image.GetDimension()}-D with "
                f"{image.GetNumberOfComponentsPerPixel()} components"
            )
        return cls(
            array=np.asarray(_ImageVoxels(image)),
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
