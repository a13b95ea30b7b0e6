"""The tissue map of a subject phantom: a body around a posed skeleton, on a 0.8 mm grid.

Layers, each written over the last (`paint`): the body outline (leg tubes around each leg's
mechanical axis, an elliptic pelvis and abdomen, the feet's soft tissue around their bones);
skin, subcutaneous fat of varying thickness, muscle split into groups by fat planes (sheets
along the limb) with some marbling; vessels along each leg (femoral, popliteal, tibial; the
artery with contrast now and then, calcified in some); pelvic organs where the pelvis is in
view (bladder, rectum with gas and stool, bowel loops, prostate or uterus) and the lowest
lumbar vertebrae; arms lying beside the body; soft-tissue masses; the table, cushions and a
blanket; then the bones (cortex of varying thickness, cancellous bone, fatty marrow in the
shafts, growth plates in young subjects) and metal implants. Bone labels (`model.labels.Bone`)
are written with the bones; metal and bones that are not ours stay 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from model.phantom.subjects.skeleton import SIDES, BonePart, Skeleton
from model.phantom.subjects.voxelise import mesh_box, voxelise
from model.training.synthesis import Tissue, smooth_field

COARSE = 4  # the body outline is computed on a 4x coarser grid (3.2 mm) and interpolated


@dataclass(frozen=True)
class Grid:
    """A 0.8 mm-style grid: numpy shape (z, y, x); origin (x, y, z) of voxel 0, spacing mm."""

    shape: tuple[int, int, int]
    origin: np.ndarray
    spacing: float

    def axis(self, i: int, step: int = 1) -> np.ndarray:
        """Voxel-centre coordinates along x (0), y (1) or z (2), every ``step`` voxels."""
        n = self.shape[2 - i]
        return (self.origin[i] + self.spacing * np.arange(0, n, step)).astype(np.float32)

    def index(self, point: np.ndarray) -> np.ndarray:
        """(z, y, x) voxel index (float) of an (x, y, z) point."""
        return ((np.asarray(point) - self.origin) / self.spacing)[::-1]


@dataclass
class Habitus:
    """Body build of one subject."""

    fat_mm: float  # subcutaneous fat at the thigh
    thigh_mm: float  # muscle radius at the top of the thigh
    calf_mm: float
    pelvis_margin_mm: float  # soft tissue lateral of the hips
    belly_mm: float  # soft tissue anterior of the pubis
    male: bool
    young: bool
    prone: bool

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Habitus:
        fat = float(np.exp(rng.uniform(np.log(4.0), np.log(45.0))))
        return cls(
            fat_mm=fat,
            thigh_mm=float(rng.uniform(55, 80)),
            calf_mm=float(rng.uniform(40, 55)),
            pelvis_margin_mm=float(rng.uniform(25, 55)) + 0.6 * fat,
            belly_mm=float(rng.uniform(30, 80)) + 1.5 * fat,
            male=bool(rng.random() < 0.5),
            young=bool(rng.random() < 0.1),
            prone=bool(rng.random() < 0.1),
        )


def _segment_distance(
    points: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of (..., 3) points to the segment a-b, and the position t in [0, 1] along it."""
    ab = b - a
    t = np.clip(((points - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.linalg.norm(points - closest, axis=-1), t


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear interpolation of a field on the coarse grid (every COARSE-th voxel) onto the
    fine grid of ``shape``."""
    size = [(n - 1) * COARSE + 1 for n in coarse.shape]
    full = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[None, None],
        size=size,
        mode="trilinear",
        align_corners=True,
    )[0, 0].numpy()
    pad = [(0, max(0, s - f)) for s, f in zip(shape, full.shape, strict=True)]
    full = np.pad(full, pad, mode="edge")
    return np.ascontiguousarray(full[: shape[0], : shape[1], : shape[2]])


def body_depth(
    skeleton: Skeleton, habitus: Habitus, grid: Grid, rng: np.random.Generator
) -> np.ndarray:
    """Depth below the skin (mm, negative outside the body) on the coarse grid."""
    x, y, z = (grid.axis(i, COARSE) for i in range(3))
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    points = np.stack([X, Y, Z], axis=-1)
    lm = skeleton.landmarks
    fat = habitus.fat_mm
    depth = np.full(Z.shape, -1e3, np.float32)
    # Legs: tubes around hip -> knee -> ankle, the radius tapering thigh -> knee -> calf -> ankle.
    for side in SIDES:
        hip, knee, ankle = lm[f"hip_{side}"], lm[f"knee_{side}"], lm[f"ankle_{side}"]
        medial = np.array([-1.0 if side == "left" else 1.0, 0.0, 0.0])
        thigh_axis = (hip + medial * 25.0, knee + np.array([0.0, 10.0, 0.0]))
        d, t = _segment_distance(points, *thigh_axis)
        radius = np.interp(t, [0.0, 0.5, 1.0], [habitus.thigh_mm + 10, habitus.thigh_mm, 48.0])
        depth = np.maximum(depth, radius + fat - d)
        calf_axis = (knee + np.array([0.0, 10.0, 0.0]), ankle + np.array([0.0, 0.0, -10.0]))
        d, t = _segment_distance(points, *calf_axis)
        radius = np.interp(t, [0.0, 0.3, 0.75, 1.0], [48.0, habitus.calf_mm, 30.0, 27.0])
        # The calf's bulk lies behind the tibia.
        behind = np.clip((Y - (knee[1] + 5.0)) / 40.0, 0.0, 1.0) * np.interp(
            t, [0, 0.3, 0.7], [0, 12, 0]
        )
        depth = np.maximum(depth, radius + 0.5 * fat + behind - d)
    # Feet: soft tissue around their bones.
    foot = np.zeros(Z.shape, bool)
    coarse_origin = grid.origin
    coarse_spacing = np.full(3, grid.spacing * COARSE)
    for part in skeleton.parts:
        if part.name.split("_")[0] in ("talus", "calcaneus", "navicular", "cuboid", "metatarsals"):
            box = mesh_box(part.mesh.vertices, coarse_origin, coarse_spacing, Z.shape)
            if box is not None:
                lo = coarse_origin + coarse_spacing * np.array([b.start for b in box][::-1])
                foot[box] |= voxelise(
                    part.mesh.vertices,
                    part.mesh.faces,
                    lo,
                    coarse_spacing,
                    tuple(b.stop - b.start for b in box),
                )
    if foot.any():
        distance = ndimage.distance_transform_edt(~foot, sampling=grid.spacing * COARSE)
        depth = np.maximum(depth, float(rng.uniform(9, 16)) + 0.2 * fat - distance)
    # Pelvis and abdomen: an elliptic cylinder from below the hips upwards.
    hips = [p for p in skeleton.parts if p.name.startswith("hip_bone")]
    lo = np.min([p.mesh.lo for p in hips], axis=0)
    hi = np.max([p.mesh.hi for p in hips], axis=0)
    sacrum = next(p for p in skeleton.parts if p.name == "sacrum")
    cx = (lo[0] + hi[0]) / 2
    a = (hi[0] - lo[0]) / 2 + habitus.pelvis_margin_mm
    front = lo[1] - habitus.belly_mm
    back = max(hi[1], sacrum.mesh.hi[1]) + 25.0 + 0.6 * fat
    cy, b = (front + back) / 2, (back - front) / 2
    r = np.sqrt(((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2)
    pelvic = (1.0 - r) * min(a, b)
    hip_z = min(lm["hip_left"][2], lm["hip_right"][2])
    pelvic -= np.clip(hip_z - 60.0 - Z, 0.0, None) * 1.5
    depth = np.maximum(depth, pelvic)
    # A lumpy outline: a few millimetres of smooth variation.
    depth += smooth_field(depth.shape, 30.0 / (grid.spacing * COARSE), rng) * 3.0
    return depth.astype(np.float32)


def paint_soft_tissue(
    tissues: np.ndarray, depth: np.ndarray, habitus: Habitus, rng: np.random.Generator
) -> np.ndarray:
    """Skin, fat and muscle by depth; fat planes and marbling in the muscle. Returns the muscle
    mask (organs and masses go inside it)."""
    skin = float(rng.uniform(1.2, 2.5))
    fat = habitus.fat_mm * (1.0 + 0.35 * smooth_field(depth.shape, 50.0, rng))
    tissues[depth > 0] = Tissue.SKIN
    tissues[depth > skin] = Tissue.FAT
    muscle = depth > skin + np.maximum(fat, 2.0)
    tissues[muscle] = Tissue.MUSCLE
    # Fat planes between muscle groups: thin sheets running along the limb (long correlation
    # along z, short across).
    sheets = smooth_field(
        depth.shape, (90.0, float(rng.uniform(35.0, 55.0)), float(rng.uniform(35.0, 55.0))), rng
    )
    width = float(rng.uniform(0.02, 0.06))
    tissues[muscle & (np.abs(sheets) < width)] = Tissue.FAT
    if rng.random() < 0.5:  # intramuscular fat of older or less fit subjects
        marbling = smooth_field(depth.shape, 4.0, rng)
        tissues[muscle & (marbling > rng.uniform(1.8, 2.6))] = Tissue.FAT
    return muscle


def paint_ellipsoid(
    tissues: np.ndarray,
    grid: Grid,
    centre: np.ndarray,
    radii: np.ndarray,
    tissue: Tissue,
    within: np.ndarray | None = None,
) -> np.ndarray | None:
    """Set ``tissue`` inside an axis-aligned ellipsoid (optionally only where ``within``);
    returns the (box-local) mask and its box, or None when it misses the grid."""
    lo = np.floor(grid.index(centre - radii)).astype(int)
    hi = np.ceil(grid.index(centre + radii)).astype(int) + 1
    box = tuple(
        slice(max(0, int(a)), min(n, int(b))) for a, b, n in zip(lo, hi, tissues.shape, strict=True)
    )
    if any(s.stop <= s.start for s in box):
        return None
    z = grid.axis(2)[box[0]][:, None, None]
    y = grid.axis(1)[box[1]][None, :, None]
    x = grid.axis(0)[box[2]][None, None, :]
    inside = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (z - centre[2]) / radii[2]
    ) ** 2 <= 1.0
    if within is not None:
        inside &= within[box]
    tissues[box][inside] = tissue
    return inside, box  # type: ignore[return-value]


def paint_tube(
    tissues: np.ndarray,
    grid: Grid,
    path: list[np.ndarray],
    radius: float,
    tissue: Tissue,
    within: np.ndarray | None = None,
) -> None:
    """Set ``tissue`` within ``radius`` of the polyline ``path`` (x, y, z points)."""
    for a, b in itertools.pairwise(path):
        lo = np.floor(grid.index(np.minimum(a, b) - radius)).astype(int)
        hi = np.ceil(grid.index(np.maximum(a, b) + radius)).astype(int) + 1
        box = tuple(
            slice(max(0, int(p)), min(n, int(q)))
            for p, q, n in zip(lo, hi, tissues.shape, strict=True)
        )
        if any(s.stop <= s.start for s in box):
            continue
        z, y, x = (grid.axis(2 - i)[box[i]] for i in range(3))
        Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
        d, _ = _segment_distance(np.stack([X, Y, Z], axis=-1), a, b)
        inside = d <= radius
        if within is not None:
            inside &= within[box]
        tissues[box][inside] = tissue


def paint_vessels(
    tissues: np.ndarray,
    grid: Grid,
    skeleton: Skeleton,
    muscle: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Femoral, popliteal and tibial artery and vein along each leg."""
    contrast = rng.random() < 0.3
    calcified = rng.random() < 0.2
    lm = skeleton.landmarks
    for side in SIDES:
        medial = np.array([-1.0 if side == "left" else 1.0, 0.0, 0.0])
        hip, knee, ankle = lm[f"hip_{side}"], lm[f"knee_{side}"], lm[f"ankle_{side}"]
        artery = [
            hip + medial * 12 + np.array([0.0, -35.0, -20.0]),
            (hip + knee) / 2 + medial * 30 + np.array([0.0, -5.0, 0.0]),
            knee + np.array([0.0, 30.0, 60.0]),
            knee + np.array([0.0, 28.0, -50.0]),
            ankle + medial * 12 + np.array([0.0, 15.0, 50.0]),
        ]
        vein = [p + np.array([0.0, 6.0, 0.0]) + medial * 4 for p in artery]
        paint_tube(tissues, grid, vein, float(rng.uniform(3.5, 6.0)), Tissue.BLOOD, muscle)
        radius = float(rng.uniform(2.5, 4.5))
        paint_tube(
            tissues, grid, artery, radius, Tissue.CONTRAST if contrast else Tissue.BLOOD, muscle
        )
        if calcified:
            for _ in range(int(rng.integers(3, 15))):
                i = int(rng.integers(len(artery) - 1))
                point = artery[i] + rng.random() * (artery[i + 1] - artery[i])
                offset = rng.normal(size=3)
                offset *= radius / np.linalg.norm(offset)
                paint_ellipsoid(
                    tissues,
                    grid,
                    point + offset,
                    rng.uniform(0.8, 2.0, size=3),
                    Tissue.CALCIFICATION,
                )


def paint_pelvic_organs(
    tissues: np.ndarray,
    grid: Grid,
    skeleton: Skeleton,
    habitus: Habitus,
    muscle: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Bladder, rectum, bowel, prostate or uterus inside the pelvis and lower abdomen."""
    hips = [p for p in skeleton.parts if p.name.startswith("hip_bone")]
    sacrum = next(p for p in skeleton.parts if p.name == "sacrum").mesh
    vertices = np.concatenate([p.mesh.vertices for p in hips])
    midline = float(np.mean([p.mesh.vertices[:, 0].mean() for p in hips]))
    near_midline = vertices[np.abs(vertices[:, 0] - midline) < 15.0]
    front = near_midline[near_midline[:, 1] < np.percentile(near_midline[:, 1], 30)]
    symphysis = front.mean(axis=0) if len(front) else vertices.mean(axis=0)
    fill = rng.uniform(0.4, 1.2)
    bladder = symphysis + np.array([0.0, 40.0, 25.0 + 15 * fill])
    paint_ellipsoid(
        tissues, grid, bladder, np.array([40.0, 30.0, 30.0]) * fill, Tissue.FLUID, muscle
    )
    if habitus.male:
        paint_ellipsoid(
            tissues,
            grid,
            symphysis + np.array([0.0, 30.0, -12.0]),
            rng.uniform(14, 24, 3),
            Tissue.ORGAN,
            muscle,
        )
    else:
        paint_ellipsoid(
            tissues,
            grid,
            bladder + np.array([0.0, 35.0, 30.0]),
            np.array([28.0, 22.0, 40.0]),
            Tissue.ORGAN,
            muscle,
        )
    sacrum_front = sacrum.vertices[sacrum.vertices[:, 1] < np.percentile(sacrum.vertices[:, 1], 25)]
    top = sacrum_front[sacrum_front[:, 2].argmax()] + np.array([0.0, -20.0, 0.0])
    rectum = [
        top,
        sacrum_front.mean(axis=0) + np.array([0.0, -22.0, 0.0]),
        symphysis + np.array([0.0, 70.0, -35.0]),
    ]
    paint_tube(tissues, grid, rectum, float(rng.uniform(10, 20)), Tissue.BOWEL, muscle)
    # Bowel loops above the bladder: content with gas bubbles, a wall of soft tissue.
    crest = max(p.mesh.hi[2] for p in hips)
    for _ in range(int(rng.integers(6, 16))):
        centre = np.array(
            [
                midline + rng.uniform(-90, 90),
                symphysis[1] + rng.uniform(-10, 80),
                rng.uniform(bladder[2] + 20, crest + 80),
            ]
        )
        radii = rng.uniform(12, 28, 3)
        paint_ellipsoid(tissues, grid, centre, radii, Tissue.ORGAN, muscle)
        paint_ellipsoid(tissues, grid, centre, radii - 2.5, Tissue.BOWEL, muscle)
        if rng.random() < 0.6:
            bubble = centre + np.array([0.0, -radii[1] * 0.4, 0.0])
            paint_ellipsoid(
                tissues, grid, bubble, radii * rng.uniform(0.3, 0.6), Tissue.GAS, muscle
            )
    for _ in range(int(rng.integers(0, 6))):  # gas in the rectum
        point = rectum[int(rng.integers(2))] + rng.random() * (rectum[2] - rectum[0]) * 0.5
        paint_ellipsoid(tissues, grid, point, rng.uniform(4, 10, 3), Tissue.GAS, muscle)


def lumbar_vertebrae(
    skeleton: Skeleton, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Centres and radii of L5 and L4 bodies (ellipsoid-ish cylinders) above the sacrum."""
    sacrum = next(p for p in skeleton.parts if p.name == "sacrum").mesh.vertices
    top = sacrum[sacrum[:, 2] > sacrum[:, 2].max() - 20.0]
    front = top[top[:, 1] < np.percentile(top[:, 1], 50)]
    base = np.array([*front[:, :2].mean(axis=0), sacrum[:, 2].max()])
    out = []
    height = float(rng.uniform(24, 30))
    for level in range(2):
        centre = base + np.array([0.0, 8.0, 8.0 + height / 2 + level * (height + 9.0)])
        out.append((centre, np.array([25.0, 18.0, height / 2])))
    return out


def paint_bone(
    tissues: np.ndarray,
    labels: np.ndarray,
    grid: Grid,
    part: BonePart,
    cortex_mm: tuple[float, float],
    growth_plates: bool,
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Voxelise one bone: cortex (``cortex_mm`` = thickness at the ends and, for long bones, at
    mid-shaft), cancellous bone or marrow inside, its label. Returns its box in the grid and
    its mask there (None if it misses the grid)."""
    spacing = np.full(3, grid.spacing)
    box = mesh_box(part.mesh.vertices, grid.origin, spacing, grid.shape, margin=3)
    if box is None:
        return None
    lo = grid.origin + spacing * np.array([b.start for b in box][::-1])
    shape = tuple(b.stop - b.start for b in box)
    inside = voxelise(part.mesh.vertices, part.mesh.faces, lo, spacing, shape)
    # The LLP26 surfaces are facetted (6 samples per element edge): smooth the mask a little.
    inside = ndimage.gaussian_filter(inside.astype(np.float32), 0.8) > 0.5
    if not inside.any():
        return None
    # Depth below the bone surface; planes past the grid's edge repeat, so a cut bone is not
    # given a cortex along the cut.
    pad = 6
    depth = ndimage.distance_transform_edt(np.pad(inside, pad, mode="edge"), sampling=grid.spacing)
    depth = depth[pad:-pad, pad:-pad, pad:-pad]
    interior = np.full(shape, Tissue.CANCELLOUS, np.uint8)
    thickness: np.ndarray | float = cortex_mm[0]
    if part.kind == "long" and part.axis is not None:
        top, bottom = part.axis
        z, y, x = (lo[2 - i] + grid.spacing * np.arange(shape[i]) for i in range(3))
        Z, Y, X = np.meshgrid(z, y, x, indexing="ij", copy=False)
        _, t = _segment_distance(np.stack([X, Y, Z], axis=-1), top, bottom)
        shaft = np.clip(np.minimum((t - 0.18) / 0.12, (0.82 - t) / 0.12), 0.0, 1.0).astype(
            np.float32
        )
        thickness = cortex_mm[0] + shaft * (cortex_mm[1] - cortex_mm[0])
        interior[shaft > 0.5] = Tissue.MARROW
        if growth_plates:
            length = float(np.linalg.norm(top - bottom))
            for distance in (22.0, length - 20.0):  # a physis near each end
                plate = np.abs(t * length - distance) < 1.0
                interior[plate] = Tissue.GROWTH_PLATE
    bone = np.where(depth <= thickness, np.uint8(Tissue.CORTEX), interior)
    view_t, view_l = tissues[box], labels[box]
    view_t[inside] = bone[inside]
    if part.label:
        view_l[inside & (view_l == 0)] = part.label
    return box, inside


# Joint spaces (mm between the bones' surfaces) as CT shows them, cartilage and fluid being
# soft tissue: LLP26's and the placed feet's bones nearly touch or overlap in places (0.6 mm
# between femur and tibia vertices in subject 0), and posing about approximate joint centres
# closes gaps further. Where two bones come closer than this, both give up bone to cartilage.
JOINT_SPACE_MM = {"default": (3.0, 5.0), "tibia-fibula": (1.0, 2.0), "sacrum-hip": (2.0, 3.5)}


def open_joint_spaces(
    tissues: np.ndarray,
    labels: np.ndarray,
    grid: Grid,
    bones: dict[str, tuple[tuple[slice, ...], np.ndarray]],
    rng: np.random.Generator,
) -> None:
    """Cartilage (label 0) wherever a bone lies within half a joint space of another; where
    two bones overlap, the one painted later (``bones`` is in painting order) keeps the
    overlap."""
    names = list(bones)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            box_a, box_b = bones[a][0], bones[b][0]
            lo = [max(p.start, q.start) - 4 for p, q in zip(box_a, box_b, strict=True)]
            hi = [min(p.stop, q.stop) + 4 for p, q in zip(box_a, box_b, strict=True)]
            if any(top <= bottom for bottom, top in zip(lo, hi, strict=True)):
                continue
            kinds = {a.split("_")[0], b.split("_")[0]}
            key = (
                "tibia-fibula"
                if kinds == {"tibia", "fibula"}
                else ("sacrum-hip" if kinds == {"sacrum", "hip"} else "default")
            )
            half = float(rng.uniform(*JOINT_SPACE_MM[key])) / 2
            union = tuple(
                slice(max(0, min(p.start, q.start)), min(n, max(p.stop, q.stop)))
                for p, q, n in zip(box_a, box_b, tissues.shape, strict=True)
            )
            masks = []
            for box, inside in (bones[a], bones[b]):
                mask = np.zeros(tuple(s.stop - s.start for s in union), bool)
                local = tuple(
                    slice(s.start - u.start, s.stop - u.start)
                    for s, u in zip(box, union, strict=True)
                )
                mask[local] = inside
                masks.append(mask)
            # Bones from the shape models overlap where their surfaces are approximate (the
            # femur's mesh closes its intercondylar notch, which the tibial eminence rises
            # into, up to ~35 mm deep): the overlap is the bone painted last, which already
            # holds it in `labels` and `tissues`, and the joint space opens around that bone.
            # As cartilage the overlap was a blob in the middle of the knee.
            masks[0] &= ~masks[1]
            near_a = ndimage.distance_transform_edt(~masks[0], sampling=grid.spacing) < half
            near_b = ndimage.distance_transform_edt(~masks[1], sampling=grid.spacing) < half
            joint = (masks[0] & near_b) | (masks[1] & near_a)
            if joint.any():
                tissues[union][joint] = Tissue.CARTILAGE
                labels[union][joint] = 0
