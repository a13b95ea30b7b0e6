"""The subject phantom's true leg alignment, and label maps of its bones alone.

:func:`joint_landmarks` finds the knee and ankle centres and the posterior condyles on the
posed bones' true surfaces (points sampled evenly over the meshes) with the very definitions
the measurement applies to a label map (:mod:`model.measure.geometry`), the femoral head's
centre among them (the phantom's ``hip`` landmark, fitted to the coarse mesh's vertices
before posing, lies up to ~5 mm off the sphere of the dense surface). :func:`true_hka`
gives the HKA those landmarks make, :func:`true_femoral_angles` the femoral neck axis,
inclination and version (:mod:`model.measure.femur`) on the femur voxelised at 0.5 mm, and
:func:`true_hip_parameters` the pelvic frame of the anterior pelvic plane on the hip bones'
dense surfaces and the acetabular parameters and alpha angle (:mod:`model.measure.acetabulum`)
read from the hip voxelised at 0.5 mm. A difference between it and a measurement on a label
map is then the label map's (voxels, field of view, islands), not a second definition.

:func:`leg_label_map` voxelises one leg's bones (and the hip bone) on any grid, turned and
cut as asked: the whole leg at once, which no phantom region holds (a `long` phantom spans
250-420 mm); :func:`pelvis_label_map` both hip bones and the femurs' tops.
:func:`sided_phantom_labels` splits a phantom's bone labels into sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from model.labels import Bone, Side, sided_label
from model.measure.acetabulum import HipMeasures, LabelReader, hip_parameters
from model.measure.bones import bone_surfaces
from model.measure.femur import femoral_angles
from model.measure.geometry import (
    femoral_head_sphere,
    femoral_knee_centre,
    hka_angles,
    posterior_condyles,
    tibial_centres,
)
from model.measure.pelvis import PelvicFrame, anterior_pelvic_plane
from model.phantom.subjects.shapes import Mesh
from model.phantom.subjects.voxelise import voxelise
from model.volume_io import Volume

if TYPE_CHECKING:
    from model.phantom.subjects import SubjectPhantom
    from model.phantom.subjects.skeleton import BonePart, Skeleton

SURFACE_SAMPLES_PER_MM2 = 2.0
# The true femoral angles are measured on the femur voxelised this finely (isotropic).
TRUE_SOLID_SPACING_MM = 0.5
# The true hip parameters read the hip voxelised in a cube this many head radii (plus 10 mm)
# around the head: the cup's sphere and the surface it is fitted to lie within it.
TRUE_HIP_BOX_RADII = 2.5
# Later bones overwrite earlier ones where voxels of two meet: the femoral head stays whole.
PAINT_ORDER = (Bone.HIP_BONE, Bone.CALCANEUS, Bone.FIBULA, Bone.TALUS, Bone.TIBIA, Bone.FEMUR)
PART_NAMES = {
    Bone.FEMUR: "femur",
    Bone.HIP_BONE: "hip_bone",
    Bone.TIBIA: "tibia",
    Bone.FIBULA: "fibula",
    Bone.TALUS: "talus",
    Bone.CALCANEUS: "calcaneus",
}


def surface_samples(mesh: Mesh, per_mm2: float = SURFACE_SAMPLES_PER_MM2) -> np.ndarray:
    """Points spread evenly (by area) over the mesh's surface, the same ones every call."""
    corners = mesh.vertices[mesh.faces]
    area = (
        np.linalg.norm(
            np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1
        )
        / 2
    )
    rng = np.random.default_rng(0)  # its own generator: the phantom's draws stay as they were
    count = max(1, int(area.sum() * per_mm2))
    face = rng.choice(len(area), size=count, p=area / area.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    a, b, c = corners[face, 0], corners[face, 1], corners[face, 2]
    return a + u[:, None] * (b - a) + v[:, None] * (c - a)


def joint_landmarks(
    parts: Sequence[BonePart], hip_centre: np.ndarray, side: str
) -> dict[str, np.ndarray]:
    """The knee and ankle centres and posterior condyles of one posed leg (keys suffixed with
    ``_<side>``), from its bones' surfaces."""
    meshes = {p.name: p.mesh for p in parts}
    femur = surface_samples(meshes[f"femur_{side}"])
    tibia = surface_samples(meshes[f"tibia_{side}"])
    talus = surface_samples(meshes[f"talus_{side}"])
    sphere = femoral_head_sphere(femur, surface_samples(meshes[f"hip_bone_{side}"]))
    head = hip_centre if sphere is None else sphere[0]
    knee_f = femoral_knee_centre(femur, head)
    knee_t, ankle, _ = tibial_centres(tibia, talus, None, knee_f - tibia.mean(axis=0))
    medial, lateral = posterior_condyles(femur, head, knee_f)
    found = {
        "femoral_head_centre": head,
        "knee_femoral": knee_f,
        "knee_tibial": knee_t,
        "ankle_centre": ankle,
        "posterior_condyle_medial": medial,
        "posterior_condyle_lateral": lateral,
    }
    return {f"{name}_{side}": point for name, point in found.items()}


def true_hka(geometry: dict, side: str) -> tuple[float, float]:
    """The phantom's HKA of ``side`` ("left" or "right"), 3-D and coronal, degrees, varus
    negative (`model.measure.geometry.hka_angles`), from its geometry's landmarks."""
    lm = {k: np.asarray(v, dtype=np.float64) for k, v in geometry["landmarks"].items()}
    return hka_angles(
        lm[f"femoral_head_centre_{side}"],
        lm[f"knee_femoral_{side}"],
        lm[f"knee_tibial_{side}"],
        lm[f"ankle_centre_{side}"],
        lm[f"posterior_condyle_medial_{side}"],
        lm[f"posterior_condyle_lateral_{side}"],
    )


def true_femoral_angles(
    skeleton: Skeleton, side: str
) -> tuple[np.ndarray | None, float | None, float | None]:
    """The phantom's femoral neck axis (unit, from the head centre towards the neck's base),
    inclination and version (deg, anteversion positive) of ``side``, on its posed femur's
    bone (voxelised at TRUE_SOLID_SPACING_MM) with the head sphere of its dense surface and
    the posterior condyles of its landmarks
    (`model.measure.femur.femoral_angles`). Draws nothing."""
    meshes = {p.name: p.mesh for p in skeleton.parts}
    femur = surface_samples(meshes[f"femur_{side}"])
    sphere = femoral_head_sphere(femur, surface_samples(meshes[f"hip_bone_{side}"]))
    lm = {k: np.asarray(v, dtype=np.float64) for k, v in skeleton.landmarks.items()}
    head = lm[f"femoral_head_centre_{side}"]
    if sphere is None:
        return None, None, None
    condyles = (
        lm[f"knee_femoral_{side}"],
        lm[f"posterior_condyle_medial_{side}"],
        lm[f"posterior_condyle_lateral_{side}"],
    )
    solid = _solid_points(meshes[f"femur_{side}"], TRUE_SOLID_SPACING_MM)
    neck, _, inclination, version = femoral_angles(solid, head, sphere[1], condyles)
    return neck, inclination, version


def true_hip_parameters(
    skeleton: Skeleton, necks: dict[str, np.ndarray | None]
) -> tuple[dict[str, HipMeasures], PelvicFrame]:
    """The phantom's acetabular parameters and alpha angle per side of ``necks`` ("left",
    "right": `true_femoral_angles`' neck axis, or None), by
    `model.measure.acetabulum.hip_parameters`, and its pelvic frame: the anterior pelvic
    plane of both hip bones' dense surfaces; each head the sphere of the femur's dense
    surface; read from the hip bone and femur voxelised at TRUE_SOLID_SPACING_MM around the
    head. Draws nothing."""
    meshes = {p.name: p.mesh for p in skeleton.parts}
    hips, heads = {}, {}
    for side in ("left", "right"):
        hips[side] = surface_samples(meshes[f"hip_bone_{side}"])
        sphere = femoral_head_sphere(surface_samples(meshes[f"femur_{side}"]), hips[side])
        if sphere is None:
            raise ValueError(f"the phantom's {side} femoral head has no sphere")
        heads[side] = (sphere[0], sphere[1])
    label_sides = {"left": Side.LEFT, "right": Side.RIGHT}
    frame = anterior_pelvic_plane(
        {label_sides[s]: hips[s] for s in hips}, {label_sides[s]: heads[s][0] for s in heads}
    )
    found = {}
    for side, neck in necks.items():
        centre, radius = heads[side]
        fine = hip_region_label_map(skeleton, side, centre, TRUE_HIP_BOX_RADII * radius + 10.0)
        hip_bone = bone_surfaces(fine, label_sides[side], (Bone.HIP_BONE,))[Bone.HIP_BONE]
        found[side] = hip_parameters(
            LabelReader(fine), label_sides[side], hip_bone.points, heads[side], neck, frame
        )
    return found, frame


def hip_region_label_map(
    skeleton: Skeleton,
    side: str,
    centre: np.ndarray,
    half_mm: float,
    spacing_mm: float = TRUE_SOLID_SPACING_MM,
) -> Volume:
    """The hip bone and femur of ``side`` as sided labels (the femur painted over the hip bone,
    as in `leg_label_map`) on an isotropic grid of ``spacing_mm`` in the cube of ``half_mm``
    around ``centre``."""
    lo = np.asarray(centre, dtype=np.float64) - half_mm
    step = np.full(3, spacing_mm)
    count = int(np.ceil(2 * half_mm / spacing_mm)) + 1
    labels = np.zeros((count, count, count), np.uint8)
    label_side = Side.LEFT if side == "left" else Side.RIGHT
    for bone in (Bone.HIP_BONE, Bone.FEMUR):
        mesh = next(p.mesh for p in skeleton.parts if p.name == f"{PART_NAMES[bone]}_{side}")
        labels[voxelise(mesh.vertices, mesh.faces, lo, step, labels.shape)] = sided_label(
            bone, label_side
        )
    ox, oy, oz = (float(v) for v in lo)
    return Volume(labels, (spacing_mm, spacing_mm, spacing_mm), (ox, oy, oz))


def pelvis_label_map(
    skeleton: Skeleton,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    below_heads_mm: float = 120.0,
    margin_mm: float = 10.0,
) -> Volume:
    """Both hip bones and the femurs' tops as sided labels on a grid of ``spacing`` (x, y, z
    mm, LPS axes): from the iliac crests (plus ``margin_mm``) to ``below_heads_mm`` below the
    lower femoral head, where the femurs meet the grid's edge as in a pelvic scan."""
    wanted = [
        (bone, side, p)
        for bone in (Bone.HIP_BONE, Bone.FEMUR)
        for side in ("right", "left")
        for p in skeleton.parts
        if p.name == f"{PART_NAMES[bone]}_{side}"
    ]
    heads = [skeleton.landmarks[f"femoral_head_centre_{side}"][2] for side in ("right", "left")]
    hips = [p.mesh for bone, _, p in wanted if bone is Bone.HIP_BONE]
    lo = np.min([m.lo for m in hips], axis=0) - margin_mm
    hi = np.max([m.hi for m in hips], axis=0) + margin_mm
    lo[2] = min(heads) - below_heads_mm
    # Wide enough for the greater trochanters, which stand out of the hip bones.
    tops = np.vstack([p.mesh.vertices for _, _, p in wanted])
    tops = tops[tops[:, 2] > lo[2]]
    lo[:2] = np.minimum(lo[:2], tops[:, :2].min(axis=0) - margin_mm)
    hi[:2] = np.maximum(hi[:2], tops[:, :2].max(axis=0) + margin_mm)
    step = np.asarray(spacing, dtype=np.float64)
    shape_xyz = np.ceil((hi - lo) / step).astype(int) + 1
    labels = np.zeros(tuple(shape_xyz[::-1]), np.uint8)
    for bone, side, part in wanted:
        inside = voxelise(part.mesh.vertices, part.mesh.faces, lo, step, labels.shape)
        labels[inside] = sided_label(bone, Side.LEFT if side == "left" else Side.RIGHT)
    sx, sy, sz = (float(s) for s in step)
    ox, oy, oz = (float(o) for o in lo)
    return Volume(labels, (sx, sy, sz), (ox, oy, oz))


def _solid_points(mesh: Mesh, spacing_mm: float) -> np.ndarray:
    """The centres of the voxels inside the mesh on an isotropic grid of ``spacing_mm``."""
    lo = mesh.vertices.min(axis=0) - spacing_mm
    shape_xyz = np.ceil((mesh.vertices.max(axis=0) + spacing_mm - lo) / spacing_mm).astype(int)
    step = np.full(3, spacing_mm)
    nx, ny, nz = (int(n) for n in shape_xyz)
    inside = voxelise(mesh.vertices, mesh.faces, lo, step, (nz, ny, nx))
    return np.argwhere(inside)[:, ::-1] * spacing_mm + lo


def leg_label_map(
    skeleton: Skeleton,
    side: str,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    direction: np.ndarray | None = None,
    z_range: tuple[float, float] | None = None,
    margin_mm: float = 10.0,
) -> Volume:
    """One leg's bones and its hip bone, voxelised as sided labels (`model.labels`) on a grid
    of ``spacing`` (x, y, z mm) whose axes are the columns of ``direction`` (identity: LPS),
    covering the bones (plus ``margin_mm``), cut to patient z in ``z_range`` if given."""
    rotation = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    wanted = [
        (bone, p)
        for bone in PAINT_ORDER
        for p in skeleton.parts
        if p.name == f"{PART_NAMES[bone]}_{side}"
    ]
    # Meshes in the grid's own axes: voxelise there, then the grid's direction maps back.
    local = {p.name: p.mesh.vertices @ rotation for _, p in wanted}
    lo = np.min([v.min(axis=0) for v in local.values()], axis=0) - margin_mm
    hi = np.max([v.max(axis=0) for v in local.values()], axis=0) + margin_mm
    step = np.asarray(spacing, dtype=np.float64)
    shape_xyz = np.ceil((hi - lo) / step).astype(int) + 1
    labels = np.zeros(tuple(shape_xyz[::-1]), np.uint8)
    label_side = Side.LEFT if side == "left" else Side.RIGHT
    for bone, part in wanted:
        inside = voxelise(local[part.name], part.mesh.faces, lo, step, labels.shape)
        labels[inside] = sided_label(bone, label_side)
    sx, sy, sz = (float(s) for s in step)
    ox, oy, oz = (float(o) for o in rotation @ lo)
    volume = Volume(labels, (sx, sy, sz), (ox, oy, oz), tuple(float(d) for d in rotation.ravel()))
    if z_range is not None:
        volume = _cut_to_z(volume, *z_range)
    return volume


def _cut_to_z(volume: Volume, z_lo: float, z_hi: float) -> Volume:
    """Background outside patient z in [z_lo, z_hi]; for an axis-aligned grid the slices
    outside are dropped, so the bones meet the grid's edge there as in a cut scan."""
    direction = np.asarray(volume.direction).reshape(3, 3)
    if np.allclose(direction, np.eye(3)):
        z = volume.origin[2] + volume.spacing[2] * np.arange(volume.array.shape[0])
        keep = np.nonzero((z >= z_lo) & (z <= z_hi))[0]
        origin = (volume.origin[0], volume.origin[1], float(z[keep[0]]))
        return Volume(volume.array[keep[0] : keep[-1] + 1].copy(), volume.spacing, origin)
    raise ValueError("cutting to a z range needs an axis-aligned grid")


def sided_phantom_labels(phantom: SubjectPhantom) -> Volume:
    """The phantom's bone labels (1..6) as sided labels (right 1..6, left 7..12): a bone is
    left where it lies left (+x) of the midway between the femoral heads."""
    lm = phantom.geometry["landmarks"]
    midline = (lm["hip_left"][0] + lm["hip_right"][0]) / 2
    labels = phantom.labels
    x = labels.origin[0] + labels.spacing[0] * np.arange(labels.array.shape[2])
    left = np.broadcast_to((x > midline)[None, None, :], labels.array.shape)
    sided = labels.array.copy()
    shift = left & (sided > 0)
    sided[shift] += len(Bone)
    return labels.with_array(sided)
