"""The hip parameters (model.measure.measure_hip_parameters) on label maps with known answers:
a synthetic pelvis of simple solids (a cup cut by a plane of chosen orientation over a
spherical head on a cylindrical neck, spines and tubercles where the anterior pelvic plane
should rest) on anisotropic and turned grids, cut fields of view, and a subject phantom's
pelvis against the phantom's own geometry."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from model.labels import Bone, Side, sided_label
from model.measure import HipParameters, measure_hip_parameters
from model.measure.acetabulum import ALPHA_EXCEEDS_MM
from model.volume_io import Volume

HEAD_RADIUS = 24.0
CUP_INNER = HEAD_RADIUS + 1.0  # the joint space: 1 mm
NECK_RADIUS = 17.0
CUP_OFFSET_MM = 2.0  # the opening plane lies this far beyond the head centre
TILT_DEG, VERSION_DEG = 55.0, 20.0  # the cup's axis: from straight down, and anteverted
SPACING = (1.5, 1.2, 2.5)  # x, y, z mm: anisotropic on purpose
ANTERIOR = np.array([0.0, -1.0, 0.0])
UP = np.array([0.0, 0.0, 1.0])


def _lateral(side: Side) -> np.ndarray:
    return np.array([1.0 if side is Side.LEFT else -1.0, 0.0, 0.0])


def _cup_axis(side: Side) -> np.ndarray:
    tilt, version = np.radians(TILT_DEG), np.radians(VERSION_DEG)
    return (
        np.sin(tilt) * (np.cos(version) * _lateral(side) + np.sin(version) * ANTERIOR)
        - np.cos(tilt) * UP
    )


def _near_segment(points: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    ab = b - a
    t = np.clip(((points - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[..., None] * ab), axis=-1) < radius


def _head(side: Side) -> np.ndarray:
    return 100.0 * _lateral(side)


def _neck(side: Side) -> np.ndarray:
    direction = 0.75 * _lateral(side) - 0.6 * UP + 0.15 * ANTERIOR
    return direction / np.linalg.norm(direction)


@functools.cache
def synthetic_pelvis(
    direction: tuple[float, ...] | None = None,
    sides: tuple[Side, ...] = (Side.RIGHT, Side.LEFT),
    z_top: float = 120.0,
) -> Volume:
    """Both hips of simple solids in LPS mm, the head centres at x = -+100 mm: per side a cup
    (a shell 1-12 mm beyond the head's sphere, on the side of the opening plane away from
    `_cup_axis`, CUP_OFFSET_MM beyond the head centre), an ASIS and a pubic tubercle (balls
    whose fronts lie in the plane y = -60, joined to the cup by rods behind it) and a femur
    (the head, a neck of NECK_RADIUS along `_neck`, a shaft). Sampled on a grid of SPACING
    whose axes are ``direction``'s columns; the axis-aligned grid ends at patient z
    ``z_top``."""
    rotation = np.eye(3) if direction is None else np.asarray(direction).reshape(3, 3)
    lo, hi = np.array([-165.0, -75.0, -90.0]), np.array([165.0, 55.0, 100.0])
    centre = (lo + hi) / 2
    shape_xyz = np.ceil((np.abs(rotation.T) @ (hi - lo) + 20.0) / np.array(SPACING)).astype(int)
    origin = centre - rotation @ (shape_xyz * np.array(SPACING) / 2)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape_xyz[::-1]), indexing="ij"), axis=-1)[
        ..., ::-1
    ]
    points = ((index * np.array(SPACING)) @ rotation.T + origin).astype(np.float32)
    labels = np.zeros(points.shape[:3], np.uint8)
    for side in sides:
        head, lateral = _head(side), _lateral(side)
        near = np.abs(points[..., 0] - head[0]) < 95.0  # this side's half
        at, offsets = points[near], points[near] - head
        distance = np.linalg.norm(offsets, axis=-1)
        cup = (distance > CUP_INNER) & (distance < HEAD_RADIUS + 12.0)
        cup &= offsets @ _cup_axis(side) < CUP_OFFSET_MM
        asis = head + 10.0 * lateral + np.array([0.0, -52.0, 70.0])
        tubercle = head - 70.0 * lateral + np.array([0.0, -52.0, -30.0])
        hip = cup | (np.linalg.norm(at - asis, axis=-1) < 8.0)
        hip |= np.linalg.norm(at - tubercle, axis=-1) < 8.0
        hip |= _near_segment(at, head + np.array([0.0, 0.0, 30.0]), asis, 6.0)
        hip |= _near_segment(at, head - 30.0 * lateral, tubercle, 6.0)
        neck_end = head + 60.0 * _neck(side)
        femur = distance < HEAD_RADIUS
        femur |= _near_segment(at, head, neck_end, NECK_RADIUS)
        femur |= _near_segment(at, neck_end, neck_end - np.array([0.0, 0.0, 200.0]), 15.0)
        values = np.where(hip, sided_label(Bone.HIP_BONE, side), 0)
        values[femur] = sided_label(Bone.FEMUR, side)
        labels[near] = np.maximum(labels[near], values)
    rows = int(np.searchsorted(points[:, 0, 0, 2], z_top, side="right"))
    if direction is None:  # the grid ends at z_top: the field of view cuts the bones there
        labels = labels[:rows].copy()
    ox, oy, oz = (float(v) for v in origin)
    sx, sy, sz = SPACING
    return Volume(labels, (sx, sy, sz), (ox, oy, oz), tuple(float(v) for v in rotation.ravel()))


@functools.cache
def measured(
    direction: tuple[float, ...] | None = None,
    sides: tuple[Side, ...] = (Side.RIGHT, Side.LEFT),
    z_top: float = 120.0,
) -> dict[Side, HipParameters]:
    """`measure_hip_parameters` of the `synthetic_pelvis` of these arguments."""
    return measure_hip_parameters(synthetic_pelvis(direction, sides, z_top))


def _expected_lce() -> float:
    """The frontal ray from the head centre that meets the opening plane's edge on the cup's
    inner surface: e . axis = offset / inner radius, e = cos(a) up + sin(a) lateral."""
    axis = _cup_axis(Side.LEFT)
    along_up, along_lateral = axis @ UP, axis @ _lateral(Side.LEFT)
    angles = np.radians(np.arange(0.0, 90.0, 0.001))
    edge = np.cos(angles) * along_up + np.sin(angles) * along_lateral
    return float(np.degrees(angles[np.argmax(edge > CUP_OFFSET_MM / CUP_INNER)]))


def test_synthetic_pelvis_gives_its_version_lce_coverage_and_alpha() -> None:
    hips = measured()
    coverage = 100.0 * (1 + CUP_OFFSET_MM / CUP_INNER)  # % of a hemisphere
    alpha = float(np.degrees(np.arcsin(NECK_RADIUS / (HEAD_RADIUS + ALPHA_EXCEEDS_MM))))
    for side in Side:
        hip = hips[side]
        assert hip.pelvic_frame is not None and "both ASIS" in hip.pelvic_frame
        assert hip.acetabular_version.value == pytest.approx(VERSION_DEG, abs=1.0)
        assert hip.lateral_centre_edge.value == pytest.approx(_expected_lce(), abs=1.5)
        assert hip.coverage.value == pytest.approx(coverage, abs=2.0)
        assert hip.alpha.value == pytest.approx(alpha, abs=2.0)
        asis = np.array(hip.landmark("asis"))
        assert asis[1] == pytest.approx(-60.0, abs=1.5)  # the ball's front


def test_an_island_in_the_joint_changes_nothing() -> None:
    """A spurious island of hip bone in the cup's opening, over the head beyond the roof's
    edge, is not read: the measurements stay as they were (read from every voxel, it would
    cover part of the head)."""
    volume = synthetic_pelvis()
    clean = measured()[Side.LEFT]
    labels = volume.array.copy()
    beyond_rim = _cup_axis(Side.LEFT) + UP  # between the roof's edge and the neck
    point = _head(Side.LEFT) + 27.5 * beyond_rim / np.linalg.norm(beyond_rim)
    x, y, z = np.rint((point - np.asarray(volume.origin)) / np.asarray(volume.spacing)).astype(int)
    labels[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2] = sided_label(Bone.HIP_BONE, Side.LEFT)
    island = measure_hip_parameters(volume.with_array(labels))[Side.LEFT]
    for name in ("acetabular_version", "lateral_centre_edge", "coverage", "alpha"):
        assert getattr(island, name).value == pytest.approx(getattr(clean, name).value, abs=0.01)


def test_the_same_pelvis_turned_on_another_grid_gives_the_same_angles() -> None:
    a, b = np.radians(12.0), np.radians(7.0)
    turn = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    straight = measured()[Side.LEFT]
    turned = measured(tuple((turn @ tilt).ravel()))[Side.LEFT]
    for name in ("acetabular_version", "lateral_centre_edge", "alpha"):
        assert getattr(turned, name).value == pytest.approx(getattr(straight, name).value, abs=1.5)
    assert turned.coverage.value == pytest.approx(straight.coverage.value, abs=2.0)


def test_one_hip_bone_gives_a_frame_of_its_own() -> None:
    hip = measured(sides=(Side.LEFT,))[Side.LEFT]
    assert hip.pelvic_frame is not None and "left hip bone alone" in hip.pelvic_frame
    assert hip.acetabular_version.value == pytest.approx(VERSION_DEG, abs=1.0)
    assert hip.lateral_centre_edge.value == pytest.approx(_expected_lce(), abs=1.5)


def test_a_field_of_view_below_the_spines_has_no_pelvic_frame() -> None:
    """Cut 50 mm above the head centres: the ASIS (70 mm up) is out of view on both sides, so
    version and LCE are not measurable; coverage and alpha need no frame."""
    hip = measured(z_top=50.0)[Side.RIGHT]
    for result in (hip.acetabular_version, hip.lateral_centre_edge):
        assert not result.measurable
        assert "anterior pelvic plane not found" in str(result.reason)
        assert "ASIS not in view: cut by the superior edge" in str(result.reason)
    assert hip.coverage.measurable and hip.alpha.measurable


def test_a_field_of_view_through_the_cup_is_said() -> None:
    """Cut 32 mm above the head centres: the head (24 mm) is whole, its cup (36 mm) is not."""
    hip = measured(z_top=32.0)[Side.LEFT]
    assert not hip.coverage.measurable
    assert "acetabulum not in view: cut by the superior edge" in str(hip.coverage.reason)


def test_phantom_hips_match_its_geometry() -> None:
    """A held-out subject's pelvis at 1 x 1.2 x 2 mm against its truth (the hip voxelised at
    0.5 mm, the frame on the meshes), the alpha angle on the same neck axis."""
    from model.measure import measure_femoral_angles, measure_leg_alignment
    from model.phantom.subjects.shapes import HELD_OUT_SUBJECTS
    from model.phantom.subjects.skeleton import build_skeleton
    from model.phantom.subjects.truth import pelvis_label_map, true_hip_parameters

    skeleton = build_skeleton(np.random.default_rng([1900, 18]), subject=HELD_OUT_SUBJECTS[0])
    volume = pelvis_label_map(skeleton, spacing=(1.0, 1.2, 2.0), below_heads_mm=70.0)
    legs = measure_leg_alignment(volume)
    femoral = measure_femoral_angles(volume, legs)
    hip = measure_hip_parameters(volume, legs, femoral)[Side.LEFT]
    truth, _ = true_hip_parameters(skeleton, {"left": np.array(femoral[Side.LEFT].neck_axis)})
    assert hip.acetabular_version.value == pytest.approx(truth["left"].version, abs=2.0)
    assert hip.lateral_centre_edge.value == pytest.approx(truth["left"].lce, abs=2.5)
    assert hip.coverage.value == pytest.approx(truth["left"].coverage, abs=3.0)
    assert hip.alpha.value == pytest.approx(truth["left"].alpha, abs=5.0)
