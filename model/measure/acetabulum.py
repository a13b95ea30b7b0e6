"""The acetabulum over the femoral head: coverage, rim and opening plane, acetabular version,
lateral centre-edge (LCE) angle, and the femoral head-neck junction's alpha angle.

Everything is found by casting rays from the femoral head's centre through the label map,
read voxel by voxel (nearest voxel): a direction is covered when the hip bone lies along it
within ACETABULUM_SHELL_MM of the head's sphere. Reading the label map itself, rather than
points on its surface, puts each boundary where the voxels put it, with no half-voxel lean,
on any grid; the subject phantom's truth reads its meshes voxelised at 0.5 mm the same way
(:func:`model.phantom.subjects.truth.true_hip_parameters`). Angles are taken in the pelvic
frame of the anterior pelvic plane (:mod:`model.measure.pelvis`). docs/measurements.md defines
each measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from model.labels import Bone, Side, sided_label
from model.measure.bones import face_names
from model.measure.geometry import fit_sphere, refine_sphere, unit
from model.measure.pelvis import SUPERIOR, PelvicFrame
from model.volume_io import Volume

# The cup: the hip bone within ACETABULUM_SHELL_MM of the sphere fitted to the acetabulum's
# surface (first on the surface within CUP_SEED_MM of the head's sphere).
ACETABULUM_SHELL_MM = 4.0
CUP_SEED_MM = 10.0
CUP_RADIUS_RANGE = (0.8, 1.6)  # head radii
# Refits of the cup's sphere: a cup that is no sphere (the phantoms' are not) has more than one
# sphere a long refitting settles on, and which one would then be the voxels' choice.
CUP_ROUNDS = 3
# Rays from the head centre start this far out (head radii).
INSIDE_SPHERE = 0.5
RAY_STEP_MM = 0.25
DIRECTIONS = 6000  # rays over the sphere: about 2.6 deg apart
NEIGHBOURS = 6
# Rim points more than this on the cup's side of the fitted opening plane are the notch's.
NOTCH_DEPTH_MM = 3.0
PLANE_ROUNDS = 4
# LCE: rays in the frontal plane every LCE_STEP_DEG.
LCE_STEP_DEG = 0.25
# Alpha: the neck leaves the head's sphere where it lies ALPHA_EXCEEDS_MM beyond it; clock
# positions from 12 (superior) to 3 o'clock (anterior), every half hour.
ALPHA_EXCEEDS_MM = 1.0
ALPHA_CLOCK_HOURS = (12.0, 12.5, 1.0, 1.5, 2.0, 2.5, 3.0)
# Each position's outline is the median of a fan of planes this far either side (deg): one
# plane's outline is as ragged as the voxels it crosses.
ALPHA_FAN_DEG = (-6.0, -3.0, 0.0, 3.0, 6.0)
ALPHA_FROM_DEG, ALPHA_TO_DEG, ALPHA_STEP_DEG = 100.0, 15.0, 0.25
ANTERIOR = np.array([0.0, -1.0, 0.0])  # LPS: -y is the patient's anterior


@cache
def sphere_directions(count: int = DIRECTIONS) -> tuple[np.ndarray, np.ndarray]:
    """``count`` unit vectors spread evenly over the sphere (a Fibonacci lattice) and, per
    vector, the indices of its NEIGHBOURS nearest."""
    i = np.arange(count) + 0.5
    polar = np.arccos(1 - 2 * i / count)
    azimuth = np.pi * (1 + 5**0.5) * i
    directions = np.stack(
        [np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1
    )
    _, neighbours = cKDTree(directions).query(directions, NEIGHBOURS + 1)
    return directions, neighbours[:, 1:]


class LabelReader:
    """The label map's value at physical points (nearest voxel); 0 outside the grid, and
    which faces of the grid the points left through."""

    def __init__(self, volume: Volume) -> None:
        self.array = volume.array
        direction = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
        self.to_index = np.linalg.inv(direction * np.asarray(volume.spacing))
        self.origin = np.asarray(volume.origin, dtype=np.float64)
        self.faces = face_names(volume)

    def _index(self, points: np.ndarray) -> np.ndarray:
        return np.rint((points - self.origin) @ self.to_index.T).astype(np.int64)  # x, y, z

    def __call__(self, points: np.ndarray) -> np.ndarray:
        index = self._index(points.reshape(-1, 3))
        shape = np.array(self.array.shape[::-1])
        inside = np.all((index >= 0) & (index < shape), axis=1)
        out = np.zeros(len(index), self.array.dtype)
        x, y, z = index[inside].T
        out[inside] = self.array[z, y, x]
        return out.reshape(points.shape[:-1])

    def cut_by(self, points: np.ndarray) -> list[str]:
        """The faces (patient directions) of the grid that ``points`` lie beyond."""
        index = self._index(points.reshape(-1, 3))
        shape = np.array(self.array.shape[::-1])
        hit = []
        for axis in range(3):
            if np.any(index[:, axis] < 0):
                hit.append(self.faces[2 * axis])
            if np.any(index[:, axis] >= shape[axis]):
                hit.append(self.faces[2 * axis + 1])
        return list(dict.fromkeys(hit))


def cup_sphere(
    hip_bone: np.ndarray, head_centre: np.ndarray, head_radius: float
) -> tuple[np.ndarray, float] | None:
    """The acetabular cup's own sphere (centre, radius) on the hip bone's surface points: first
    fitted to those within CUP_SEED_MM of the head's sphere, then refitted on the surface near
    it CUP_ROUNDS times (`refine_sphere`: the rim, the fossa and the bone beyond do not pull
    it). None when no
    cup of CUP_RADIUS_RANGE head radii faces the head."""
    near = np.linalg.norm(hip_bone - head_centre, axis=1) < head_radius + CUP_SEED_MM
    if near.sum() < 50:
        return None
    centre, radius = fit_sphere(hip_bone[near])
    centre, radius, used = refine_sphere(hip_bone, centre, radius, rounds=CUP_ROUNDS)
    low, high = CUP_RADIUS_RANGE
    if used < 50 or not low * head_radius <= radius <= high * head_radius:
        return None
    return centre, radius


@dataclass(frozen=True)
class Coverage:
    """The femoral head's sphere as the acetabulum covers it: per direction of
    `sphere_directions` from the head centre, whether covered (holes inside the cup, the
    fossa, filled) and where its ray meets the cup; the rim (covered directions next to the
    open part)."""

    covered: np.ndarray
    hits: np.ndarray
    rim: np.ndarray

    @property
    def percent(self) -> float:
        """The covered area as a percentage of a hemisphere of the head (Dandachli et al.
        2008's scale: 2 pi r2 is 100 %, a head covered beyond its equator more)."""
        return 200.0 * float(self.covered.mean())


def cup_hits(
    read: LabelReader,
    hip_label: int,
    head: tuple[np.ndarray, float],
    cup: tuple[np.ndarray, float],
    rays: np.ndarray,
) -> np.ndarray:
    """Per ray from the head centre, the distance at which it first meets the cup: the hip
    bone within ACETABULUM_SHELL_MM of the cup's sphere (inf where it does not)."""
    (centre, radius), (cup_centre, cup_radius) = head, cup
    reach = cup_radius + float(np.linalg.norm(cup_centre - centre)) + ACETABULUM_SHELL_MM
    radii = np.arange(INSIDE_SPHERE * radius, reach + RAY_STEP_MM / 2, RAY_STEP_MM)
    points = centre + rays[:, None, :] * radii[None, :, None]
    shell = np.abs(np.linalg.norm(points - cup_centre, axis=2) - cup_radius)
    hit = (read(points) == hip_label) & (shell <= ACETABULUM_SHELL_MM)
    return np.where(hit.any(axis=1), radii[np.argmax(hit, axis=1)], np.inf)


def head_coverage(
    read: LabelReader,
    hip_label: int,
    head: tuple[np.ndarray, float],
    cup: tuple[np.ndarray, float],
) -> Coverage | None:
    """The acetabulum's coverage of the head (None when the cup covers nothing)."""
    directions, neighbours = sphere_directions()
    hits = cup_hits(read, hip_label, head, cup, directions)
    covered = np.isfinite(hits)
    if covered.sum() < NEIGHBOURS:
        return None
    # Uncovered directions not joined to the open side (the fossa, holes) count as covered.
    open_pole = int(np.argmin(directions @ directions[covered].mean(axis=0)))
    rows = np.repeat(np.arange(len(directions)), NEIGHBOURS)
    cols = neighbours.ravel()
    both_open = ~covered[rows] & ~covered[cols]
    graph = coo_matrix(
        (np.ones(both_open.sum()), (rows[both_open], cols[both_open])),
        shape=(len(directions), len(directions)),
    )
    _, component = connected_components(graph, directed=False)
    open_part = ~covered & (component == component[open_pole])
    filled = ~open_part
    rim = filled & open_part[neighbours].any(axis=1) & np.isfinite(hits)
    return Coverage(filled, hits, rim)


def opening_plane(
    coverage: Coverage, centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The acetabular opening plane: a plane fitted (least squares) to the rim's points (where
    the rim's rays meet the bone), refitted without the points more than NOTCH_DEPTH_MM on
    the cup's side of it (the edges of the acetabular notch). Returns a point on it, its
    normal pointing out of the cup (the acetabular axis) and the rim points it rests on."""
    directions, _ = sphere_directions()
    points = centre + directions[coverage.rim] * coverage.hits[coverage.rim, None]
    into_cup = unit(directions[coverage.covered].mean(axis=0))
    keep = np.ones(len(points), bool)
    middle, normal = points.mean(axis=0), -into_cup
    for _ in range(PLANE_ROUNDS):
        middle = points[keep].mean(axis=0)
        _, _, vt = np.linalg.svd(points[keep] - middle, full_matrices=False)
        normal = vt[2] if vt[2] @ into_cup < 0 else -vt[2]
        keep = (points - middle) @ normal > -NOTCH_DEPTH_MM
    return middle, normal, points[keep]


def acetabular_version_deg(axis: np.ndarray, frame: PelvicFrame, lateral: np.ndarray) -> float:
    """Anatomical acetabular version (Murray 1993), degrees, anteversion positive: the angle
    between the acetabular axis projected on the pelvis' transverse plane and its lateral
    direction on that side."""
    return float(np.degrees(np.arctan2(axis @ frame.anterior, axis @ lateral)))


def lateral_centre_edge_deg(
    read: LabelReader,
    hip_label: int,
    head: tuple[np.ndarray, float],
    cup: tuple[np.ndarray, float],
    coverage: Coverage,
    frame: PelvicFrame,
    lateral: np.ndarray,
) -> tuple[float, np.ndarray] | None:
    """Wiberg's lateral centre-edge angle in 3-D, degrees, and the lateral edge: in the
    pelvis' frontal plane through the head centre, the angle from the frame's superior axis
    to the last ray, going laterally from the top, that meets the cup before the rays reach
    the head's open part (`head_coverage`: a hole in the roof does not end it); negative when
    the cup ends medial of the vertical. None when no cup lies within 90 deg of the top."""
    angles = np.arange(-90.0, 90.0 + LCE_STEP_DEG / 2, LCE_STEP_DEG)
    rad = np.radians(angles)
    rays = np.cos(rad)[:, None] * frame.superior + np.sin(rad)[:, None] * lateral
    hits = cup_hits(read, hip_label, head, cup, rays)
    directions, _ = sphere_directions()
    _, cell = cKDTree(directions).query(rays)
    open_ray = ~np.isfinite(hits) & ~coverage.covered[cell]
    covered = np.isfinite(hits)
    top = int(np.argmin(np.abs(angles)))
    if open_ray[top] or not covered[: top + 1].any():
        medial = np.nonzero(covered[:top])[0]
        if not len(medial):
            return None
        edge = int(medial[-1])
    else:
        beyond = np.nonzero(open_ray[top:])[0]
        stop = top + int(beyond[0]) if len(beyond) else len(angles)
        edge = int(np.nonzero(covered[:stop])[0][-1])
    return float(angles[edge]), head[0] + rays[edge] * hits[edge]


def alpha_angle_deg(
    read: LabelReader,
    femur_label: int,
    head: tuple[np.ndarray, float],
    neck: np.ndarray,
    superior: np.ndarray,
    anterior: np.ndarray,
) -> tuple[float, float] | None:
    """The alpha angle (Nötzli et al. 2002) carried to 3-D: in each plane through the neck
    axis at the clock positions ALPHA_CLOCK_HOURS (12 o'clock superior, 3 o'clock anterior, on
    either side), the angle between the neck axis and the ray from the head centre where the
    femur's outline (the median over a fan of planes, ALPHA_FAN_DEG) leaves the head's
    sphere: followed from the neck towards the head, the last ray along which the femur
    reaches ALPHA_EXCEEDS_MM beyond the sphere. Returns the
    largest and its clock position (hours); None when no position has one."""
    centre, radius = head
    neck = unit(neck)
    up = unit(superior - (superior @ neck) * neck)
    front = unit(np.cross(neck, up))
    if front @ anterior < 0:
        front = -front
    polar = np.radians(np.arange(ALPHA_TO_DEG, ALPHA_FROM_DEG, ALPHA_STEP_DEG))
    best: tuple[float, float] | None = None
    for hour in ALPHA_CLOCK_HOURS:
        exits = []
        for fan in ALPHA_FAN_DEG:
            turn = np.radians((hour % 12) * 30.0 + fan)
            across = np.cos(turn) * up + np.sin(turn) * front
            rays = np.cos(polar)[:, None] * neck + np.sin(polar)[:, None] * across
            exits.append(_exits(read, femur_label, centre, rays, radius))
        beyond = np.median(exits, axis=0) > radius + ALPHA_EXCEEDS_MM
        if not beyond[0] or beyond.all():
            continue
        alpha = float(np.degrees(polar[int(np.argmin(beyond)) - 1]))
        if best is None or alpha > best[0]:
            best = (alpha, hour)
    return best


def _exits(
    read: LabelReader, label: int, centre: np.ndarray, rays: np.ndarray, radius: float
) -> np.ndarray:
    """Per ray from ``centre``, the distance at which it first leaves ``label``, looked for
    from INSIDE_SPHERE head radii out to ALPHA_EXCEEDS_MM beyond the head's ``radius`` (the
    far end where it does not leave by then)."""
    radii = np.arange(INSIDE_SPHERE * radius, radius + ALPHA_EXCEEDS_MM + RAY_STEP_MM, RAY_STEP_MM)
    left = read(centre + rays[:, None, :] * radii[None, :, None]) != label
    return np.where(left.any(axis=1), radii[np.argmax(left, axis=1)], radii[-1] + RAY_STEP_MM)


@dataclass
class HipMeasures:
    """What `hip_parameters` found of one hip (None: not found)."""

    cup_centre: np.ndarray | None = None
    axis: np.ndarray | None = None
    coverage: float | None = None
    version: float | None = None
    lce: float | None = None
    lateral_edge: np.ndarray | None = None
    alpha: float | None = None
    alpha_clock: float | None = None
    rim: np.ndarray | None = None  # the rim points the opening plane rests on (LPS mm)


def hip_parameters(
    read: LabelReader,
    side: Side,
    hip_bone: np.ndarray,
    head: tuple[np.ndarray, float],
    neck: np.ndarray | None,
    frame: PelvicFrame | None,
) -> HipMeasures:
    """The acetabular parameters and the alpha angle of one hip, read from the sided label map
    behind ``read``: ``hip_bone`` its hip bone's surface points (the cup's sphere; empty: no
    cup), ``head`` the femoral head's centre and radius, ``neck`` the neck axis (None: no
    alpha), ``frame`` the pelvic frame (None: no version or LCE; alpha's 12 o'clock is then
    the patient's superior). Values are None where not found."""
    out = HipMeasures()
    hip_label, femur_label = sided_label(Bone.HIP_BONE, side), sided_label(Bone.FEMUR, side)
    cup = cup_sphere(hip_bone, *head) if len(hip_bone) else None
    coverage = None if cup is None else head_coverage(read, hip_label, head, cup)
    if cup is not None and coverage is not None:
        out.cup_centre = cup[0]
        out.coverage = coverage.percent
        _, out.axis, out.rim = opening_plane(coverage, head[0])
        if frame is not None:
            out.version = acetabular_version_deg(out.axis, frame, frame.lateral(side))
            edge = lateral_centre_edge_deg(
                read, hip_label, head, cup, coverage, frame, frame.lateral(side)
            )
            if edge is not None:
                out.lce, out.lateral_edge = edge
    if neck is not None:
        superior, anterior = (
            (SUPERIOR, ANTERIOR) if frame is None else (frame.superior, frame.anterior)
        )
        alpha = alpha_angle_deg(read, femur_label, head, neck, superior, anterior)
        if alpha is not None:
            out.alpha, out.alpha_clock = alpha
    return out
