"""Each bone of a sided label map as points on its surface, in physical millimetres.

A bone is its sided label's largest connected piece (spurious islands of segmentation, and
pieces of the bone far from the rest, are left out); its surface is the centres of the voxels
just inside and just outside its boundary, which straddle the true surface, so a sphere fitted
to them has the head's radius rather than half a voxel less. Points are mapped through the
volume's origin, spacing and direction into DICOM patient coordinates (LPS, mm). Surface
voxels on a face of the grid mark where the field of view cut the bone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.labels import Bone, Side, sided_label
from model.volume_io import Volume

# The patient direction each face of the grid looks towards (LPS axes, outward normal).
_DIRECTION_NAMES = {
    (0, 1): "left",
    (0, -1): "right",
    (1, 1): "posterior",
    (1, -1): "anterior",
    (2, 1): "superior",
    (2, -1): "inferior",
}


@dataclass(frozen=True)
class BoneSurface:
    """Surface points of one bone: ``points`` (N, 3) mm in LPS; ``cut_by`` (N,) the face of
    the grid each lies on as an index into ``faces`` (-1: inside the grid)."""

    points: np.ndarray
    cut_by: np.ndarray
    faces: tuple[str, ...]
    voxels: int

    def cut_faces(self, near: np.ndarray) -> list[str]:
        """The edges of the field of view (patient directions) that cut the bone among the
        points selected by the boolean array ``near``."""
        hit = np.unique(self.cut_by[near & (self.cut_by >= 0)])
        return [self.faces[int(i)] for i in hit]


def index_to_physical(volume: Volume, index_zyx: np.ndarray) -> np.ndarray:
    """Voxel indices (N, 3) in numpy (z, y, x) order to LPS points (N, 3) in mm."""
    direction = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    xyz = np.asarray(index_zyx, dtype=np.float64)[:, ::-1] * np.asarray(volume.spacing)
    return xyz @ direction.T + np.asarray(volume.origin)


def face_names(volume: Volume) -> tuple[str, ...]:
    """The patient direction of each face of the grid, in the order (x low, x high, y low,
    y high, z low, z high) of the SimpleITK index axes."""
    direction = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    names = []
    for axis in range(3):
        for sign in (-1, 1):
            normal = sign * direction[:, axis]
            dominant = int(np.argmax(np.abs(normal)))
            names.append(_DIRECTION_NAMES[(dominant, int(np.sign(normal[dominant])))])
    return tuple(names)


def bone_surfaces(sided: Volume, side: Side, bones: tuple[Bone, ...]) -> dict[Bone, BoneSurface]:
    """The surface of each of ``bones`` of ``side`` present in the sided label map."""
    array = sided.array
    boxes = ndimage.find_objects(array, max_label=2 * len(Bone))
    faces = face_names(sided)
    out = {}
    for bone in bones:
        found = _largest_piece(array, boxes, sided_label(bone, side))
        if found is None:
            continue
        mask, start = found
        inner = mask & ~ndimage.binary_erosion(mask, border_value=0)
        outer = ndimage.binary_dilation(mask) & ~mask
        index = np.argwhere(inner | outer) + start
        out[bone] = BoneSurface(
            points=index_to_physical(sided, index),
            cut_by=_face_of(index[:, ::-1], array.shape[::-1]),
            faces=faces,
            voxels=int(mask.sum()),
        )
    return out


def bone_voxels(sided: Volume, side: Side, bone: Bone) -> np.ndarray | None:
    """The centres (N, 3, LPS mm) of the voxels of the bone's largest piece: its solid, whose
    centroids and axes, unlike its surface's, do not lean with anisotropic voxels."""
    boxes = ndimage.find_objects(sided.array, max_label=2 * len(Bone))
    found = _largest_piece(sided.array, boxes, sided_label(bone, side))
    if found is None:
        return None
    mask, start = found
    return index_to_physical(sided, np.argwhere(mask) + start)


def largest_pieces(sided: Volume, bones: tuple[Bone, ...]) -> Volume:
    """The sided label map with only ``bones`` of either side, each its largest piece: what
    is read voxel by voxel (:mod:`model.measure.acetabulum`) without the islands."""
    boxes = ndimage.find_objects(sided.array, max_label=2 * len(Bone))
    out = np.zeros_like(sided.array)
    for side in Side:
        for bone in bones:
            label = sided_label(bone, side)
            found = _largest_piece(sided.array, boxes, label)
            if found is None:
                continue
            mask, start = found
            box = tuple(slice(a, a + n) for a, n in zip(start, mask.shape, strict=True))
            out[box][mask] = label
    return sided.with_array(out)


def _largest_piece(
    array: np.ndarray, boxes: list, label: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The label's largest connected piece as a mask in its bounding box (one voxel of margin
    where the grid allows, so the outer surface is inside it) and the box's first index."""
    box = boxes[label - 1]
    if box is None:
        return None
    box = tuple(
        slice(max(s.start - 1, 0), min(s.stop + 1, n))
        for s, n in zip(box, array.shape, strict=True)
    )
    mask = array[box] == label
    pieces, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        mask = pieces == int(np.argmax(sizes))
    return mask, np.array([s.start for s in box])


def _face_of(index_xyz: np.ndarray, shape_xyz: tuple[int, ...]) -> np.ndarray:
    """The face (0..5, as `face_names`) each voxel lies on, -1 for none (the first if two)."""
    face = np.full(len(index_xyz), -1, dtype=np.int64)
    for axis in (2, 1, 0):
        face[index_xyz[:, axis] == shape_xyz[axis] - 1] = 2 * axis + 1
        face[index_xyz[:, axis] == 0] = 2 * axis
    return face
