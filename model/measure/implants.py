"""Metal implants at the measurement sites, from the CT's metal and the sided label map.

A hip prosthesis replaces the femoral head and lines the acetabulum, a total knee replaces the
condyles and the tibial plateau: a landmark found on the bone around such metal is fitted to
a stump or to the hole the metal leaves in the segmentation, and a number measured on it is
silently wrong. :func:`find_implants` says, per side, which measurement sites carry metal
(:class:`Site`); the measurements (:mod:`.alignment`, :mod:`.femur`, :mod:`.hip`) report what
depends on such a site as not measurable, with the reason (:meth:`ImplantFinding.reason`).

Metal is the CT at or above METAL_HU, in pieces (26-connected) of at least MIN_PIECE_ML;
pieces within JOINT_REACH_MM of one another are one implant (the metal parts of a total
joint, across the plastic between them). An implant is at a joint when it comes within
JOINT_REACH_MM of bones on both sides of the joint space, so a nail or plate in a shaft, away
from the joints, blocks nothing. docs/measurements.md ("Implants") gives the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import cc3d
import numpy as np
from scipy import ndimage

from model.labels import Bone, Side, sided_label
from model.measure.bones import index_to_physical
from model.volume_io import Volume

# Cortical bone stays below ~2000 HU; steel, titanium and cobalt-chrome lie far above 2500 HU.
METAL_HU = 2500
# Smaller pieces are noise, a dense calcification or a metal streak's speck, not an implant.
MIN_PIECE_ML = 0.2
# More than the plastic between a total joint's metal parts (a hip's liner, a knee's insert)
# and a native joint's space with a screw or plate at the joint line.
JOINT_REACH_MM = 15.0
# Metal this close to a bone lies in it or on its surface (a voxel or two at CT spacings).
ON_BONE_MM = 5.0
# Slices thresholded at a time to find the metal: a mask of a whole-leg scan would be 400 MB.
SLAB_SLICES = 32
JOINT_BONES = (Bone.FEMUR, Bone.HIP_BONE, Bone.TIBIA, Bone.FIBULA, Bone.TALUS)
_JOINT_LABELS = {sided_label(bone, side): (side, bone) for side in Side for bone in JOINT_BONES}


class Site(Enum):
    """A measurement site metal can occupy; the value names it in a reason."""

    FEMORAL_HEAD = "femoral head"  # and neck
    ACETABULUM = "acetabulum"
    KNEE = "knee"  # distal femur and proximal tibia
    ANKLE = "ankle"  # talar dome, distal tibia and malleoli


@dataclass(frozen=True)
class ImplantFinding:
    """Which sites of which side carry metal (none: an empty finding); ``hip_metal_mm``, per
    side with metal at the femoral head, the centroid (LPS mm) of that implant's metal within
    JOINT_REACH_MM of the hip bone: where the head was, near enough to tell the pelvic frame
    which of the hip bone lies above the acetabulum and which below."""

    sites: frozenset[tuple[Side, Site]] = frozenset()
    hip_metal_mm: tuple[tuple[Side, tuple[float, float, float]], ...] = ()

    def hip_metal(self, side: Side) -> np.ndarray | None:
        """``hip_metal_mm`` of ``side``, or None."""
        return next((np.asarray(p) for s, p in self.hip_metal_mm if s is side), None)

    def reason(self, side: Side, site: Site) -> str | None:
        """Why what depends on ``site`` of ``side`` is not measurable, or None: no metal there."""
        if (side, site) not in self.sites:
            return None
        return f"metal implant at the {side.name.lower()} {site.value}"


def find_implants(sided: Volume, ct: Volume) -> ImplantFinding:
    """The sites of the sided label map (``model.labels.sided_label`` values) that the metal
    of the CT on the same grid (HU at or above METAL_HU) occupies: for each implant (pieces of
    MIN_PIECE_ML or more, those within JOINT_REACH_MM of one another together), each joint
    whose bones on both sides of the joint space it comes within JOINT_REACH_MM of (`_sites`)."""
    if ct.array.shape != sided.array.shape:
        raise ValueError(f"the CT {ct.array.shape} is not on the label map's grid")
    box = _metal_box(ct.array)
    if box is None:
        return ImplantFinding()
    pieces = cc3d.connected_components(ct.array[box] >= METAL_HU, connectivity=26)
    voxel_ml = float(np.prod(sided.spacing)) / 1000.0
    sizes_ml = np.bincount(pieces.ravel()) * voxel_ml
    kept = [int(piece) for piece in np.flatnonzero(sizes_ml >= MIN_PIECE_ML) if piece > 0]
    start = np.array([s.start for s in box])
    margin = np.ceil(JOINT_REACH_MM / np.asarray(sided.spacing)[::-1]).astype(int) + 1
    piece_boxes = ndimage.find_objects(pieces)
    contacts = {}
    for piece in kept:
        local = piece_boxes[piece - 1]
        assert local is not None
        crop = tuple(
            slice(max(s.start + o - m, 0), min(s.stop + o + m, n))
            for s, o, m, n in zip(local, start, margin, ct.array.shape, strict=True)
        )
        contacts[piece] = _contacts(sided, _on_crop(pieces, start, crop), piece, crop)
    group = {piece: piece for piece in kept}  # union-find: pieces near one another are one
    for piece, contact in contacts.items():
        for other in contact.pieces & group.keys():
            group[_root(group, piece)] = _root(group, other)
    implants: dict[int, list[_Contacts]] = {}
    for piece in kept:
        implants.setdefault(_root(group, piece), []).append(contacts[piece])
    found: set[tuple[Side, Site]] = set()
    hip_metal: list[tuple[Side, tuple[float, float, float]]] = []
    for members in implants.values():
        for side in Side:
            near = {bone for c in members for s, bone in c.near if s is side}
            on = {bone for c in members for s, bone in c.on if s is side}
            sites = _sites(near, on)
            found |= {(side, site) for site in sites}
            if Site.FEMORAL_HEAD in sites:
                sums = [c.at_hip[side] for c in members if side in c.at_hip]
                mean = sum(total for total, _ in sums) / sum(count for _, count in sums)
                x, y, z = index_to_physical(sided, np.asarray(mean)[None, :])[0]
                hip_metal.append((side, (float(x), float(y), float(z))))
    return ImplantFinding(frozenset(found), tuple(hip_metal))


@dataclass
class _Contacts:
    """What one piece of metal comes near: ``near`` the (side, bone)s within JOINT_REACH_MM,
    ``on`` those within ON_BONE_MM, ``pieces`` the other pieces within JOINT_REACH_MM;
    ``at_hip`` per side the sum and count of its voxels' indices within JOINT_REACH_MM of
    that side's hip bone."""

    near: set[tuple[Side, Bone]] = field(default_factory=set)
    on: set[tuple[Side, Bone]] = field(default_factory=set)
    pieces: set[int] = field(default_factory=set)
    at_hip: dict[Side, tuple[np.ndarray, int]] = field(default_factory=dict)


def _contacts(sided: Volume, ids: np.ndarray, piece: int, crop: tuple[slice, ...]) -> _Contacts:
    """The contacts of piece number ``piece`` of the pieces ``ids`` on ``crop`` of the grid,
    the crop reaching JOINT_REACH_MM past the piece: all within reach of it lies in it."""
    spacing = np.asarray(sided.spacing, dtype=np.float64)[::-1]  # (z, y, x) as the arrays
    distance = ndimage.distance_transform_edt(ids != piece, sampling=spacing)  # mm
    labels = sided.array[crop]
    found = _Contacts()
    for label in np.unique(labels):
        if int(label) not in _JOINT_LABELS:
            continue
        side, bone = _JOINT_LABELS[int(label)]
        closest = float(distance[labels == label].min())
        if closest <= ON_BONE_MM:
            found.on.add((side, bone))
        if closest > JOINT_REACH_MM:
            continue
        found.near.add((side, bone))
        if bone is Bone.HIP_BONE:
            index = _within_reach(labels == label, ids == piece, distance, spacing)
            found.at_hip[side] = ((index + [s.start for s in crop]).sum(axis=0), len(index))
    for other in np.unique(ids):
        if other not in (0, piece) and float(distance[ids == other].min()) <= JOINT_REACH_MM:
            found.pieces.add(int(other))
    return found


def _within_reach(
    bone: np.ndarray, piece: np.ndarray, distance: np.ndarray, spacing: np.ndarray
) -> np.ndarray:
    """The indices of the ``piece``'s voxels within JOINT_REACH_MM of the ``bone`` (masks on
    one crop; ``distance`` the piece's distance map there). The bone's distance map is taken
    only about the bone within reach of the piece: a stem's crop is large, the bone near it
    small."""
    reach = np.ceil(JOINT_REACH_MM / spacing).astype(int) + 1
    near = np.argwhere(bone & (distance <= JOINT_REACH_MM))
    box = tuple(
        slice(max(int(low) - r, 0), int(high) + r + 1)
        for low, high, r in zip(near.min(axis=0), near.max(axis=0), reach, strict=True)
    )
    from_bone = ndimage.distance_transform_edt(~bone[box], sampling=spacing)
    return np.argwhere(piece[box] & (from_bone <= JOINT_REACH_MM)) + [s.start for s in box]


def _sites(near: set[Bone], on: set[Bone]) -> set[Site]:
    """The sites of one side an implant occupies, from the bones it comes near and lies on:
    at the hip, the femoral head when it lies on the femur, the acetabulum when on the hip
    bone (both when on neither: metal loose in the joint)."""
    sites = set()
    if {Bone.FEMUR, Bone.HIP_BONE} <= near:
        on_femur, on_hip_bone = Bone.FEMUR in on, Bone.HIP_BONE in on
        if on_femur or not on_hip_bone:
            sites.add(Site.FEMORAL_HEAD)
        if on_hip_bone or not on_femur:
            sites.add(Site.ACETABULUM)
    if {Bone.FEMUR, Bone.TIBIA} <= near:
        sites.add(Site.KNEE)
    if Bone.TALUS in near and near & {Bone.TIBIA, Bone.FIBULA}:
        sites.add(Site.ANKLE)
    return sites


def _metal_box(hu: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (z, y, x) holding every voxel at or above METAL_HU, or None when there
    is none; SLAB_SLICES at a time."""
    lows, highs = [], []
    for z in range(0, hu.shape[0], SLAB_SLICES):
        slab = hu[z : z + SLAB_SLICES] >= METAL_HU
        if not slab.any():
            continue
        hits = [np.flatnonzero(slab.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1))]
        lows.append([z + hits[0][0], hits[1][0], hits[2][0]])
        highs.append([z + hits[0][-1] + 1, hits[1][-1] + 1, hits[2][-1] + 1])
    if not lows:
        return None
    return tuple(
        slice(int(low), int(high))
        for low, high in zip(np.min(lows, axis=0), np.max(highs, axis=0), strict=True)
    )


def _on_crop(pieces: np.ndarray, start: np.ndarray, crop: tuple[slice, ...]) -> np.ndarray:
    """The piece numbers (labelled in the metal's box at ``start``) on ``crop`` of the whole
    grid; 0 where the crop reaches past the box."""
    out = np.zeros(tuple(s.stop - s.start for s in crop), pieces.dtype)
    inside_out, inside_pieces = [], []
    for s, o, n in zip(crop, start, pieces.shape, strict=True):
        low, high = max(s.start, o), min(s.stop, o + n)
        inside_out.append(slice(low - s.start, high - s.start))
        inside_pieces.append(slice(low - o, high - o))
    out[tuple(inside_out)] = pieces[tuple(inside_pieces)]
    return out


def _root(group: dict[int, int], piece: int) -> int:
    while group[piece] != piece:
        piece = group[piece]
    return piece
