"""Metal implants at the measurement sites (model.measure.implants): which sites a metal mask
occupies on synthetic legs with a known answer (a ball in a femoral head, metal in a knee,
a speck, a nail in the shaft), what the measurements then say, and the primitive phantom's
implants (a total hip, a total knee, a distal tibial plate) rendered with their CT."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from model.engine.postprocess import split_sides
from model.labels import Side
from model.measure import (
    ImplantFinding,
    Site,
    find_implants,
    measure_femoral_angles,
    measure_hip_parameters,
    measure_leg_alignment,
)
from model.measure.implants import METAL_HU
from model.phantom import Phantom, generate_phantom
from model.volume_io import Volume
from tests.test_measure import synthetic_leg


def _points(volume: Volume) -> np.ndarray:
    """The LPS position (mm) of every voxel of an axis-aligned volume, (z, y, x, 3)."""
    axes = [
        o + s * np.arange(n)
        for o, s, n in zip(volume.origin, volume.spacing, volume.array.shape[::-1], strict=True)
    ]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return np.stack([x, y, z], axis=-1)


def metal_ct(volume: Volume, metal: np.ndarray) -> Volume:
    """A CT on the volume's grid: METAL_HU + 500 where ``metal`` is, soft tissue elsewhere."""
    return volume.with_array(np.where(metal, METAL_HU + 500, 40).astype(np.int16))


def metal_ball(volume: Volume, centre: np.ndarray, radius: float) -> Volume:
    """A CT holding a ball of metal, on the grid of an axis-aligned volume."""
    return metal_ct(volume, np.linalg.norm(_points(volume) - centre, axis=-1) < radius)


def _rod(volume: Volume, a: np.ndarray, b: np.ndarray, radius: float) -> Volume:
    points = _points(volume)
    t = np.clip(((points - a) @ (b - a)) / ((b - a) @ (b - a)), 0.0, 1.0)
    return metal_ct(volume, np.linalg.norm(points - (a + t[..., None] * (b - a)), axis=-1) < radius)


def test_a_ball_in_the_femoral_head_occupies_that_head_alone() -> None:
    """A prosthetic ball (r 15 mm) where the head (r 24) is: the femoral head's site (the
    ball lies on the femur, 12 mm short of the hip bone's cup); nothing at the knee or ankle."""
    labels, truth = synthetic_leg(4.0, Side.LEFT)
    finding = find_implants(labels, metal_ball(labels, truth["head"], 15.0))
    assert finding.sites == {(Side.LEFT, Site.FEMORAL_HEAD)}
    assert finding.reason(Side.LEFT, Site.FEMORAL_HEAD) == "metal implant at the left femoral head"
    assert finding.reason(Side.LEFT, Site.KNEE) is None
    where = finding.hip_metal(Side.LEFT)
    assert where is not None and np.linalg.norm(where - truth["head"]) < 15.0

    leg = measure_leg_alignment(labels, finding)[Side.LEFT]
    assert leg.landmark("femoral_head_centre") is None
    assert leg.femoral_head_radius.reason == "metal implant at the left femoral head"
    assert leg.hka_3d.reason == "metal implant at the left femoral head"
    assert leg.landmark("femoral_knee_centre") is not None  # the knee is free of metal
    assert leg.landmark("ankle_centre") is not None
    angles = measure_femoral_angles(labels, implants=finding)[Side.LEFT]
    assert angles.inclination.reason == angles.version.reason == leg.hka_3d.reason
    measured = measure_leg_alignment(labels)[Side.LEFT]  # without the finding: as before
    assert measured.hka_3d.measurable and measured.landmark("femoral_head_centre") is not None


def test_metal_in_the_knee_blocks_the_knee_and_the_version() -> None:
    """A slab of metal on the tibial plateau, under the condyles: the knee's site; the HKA
    and femoral version are not measurable, the head and inclination are."""
    labels, truth = synthetic_leg(4.0, Side.LEFT)
    tray = _rod(labels, truth["knee"] - [25.0, 0, 6], truth["knee"] + [25.0, 0, -6], 4.0)
    finding = find_implants(labels, tray)
    assert finding.sites == {(Side.LEFT, Site.KNEE)} and finding.hip_metal(Side.LEFT) is None
    leg = measure_leg_alignment(labels, finding)[Side.LEFT]
    assert leg.hka_3d.reason == "metal implant at the left knee"
    assert leg.landmark("femoral_knee_centre") is None and leg.landmark("ankle_centre") is not None
    assert leg.landmark("femoral_head_centre") is not None
    angles = measure_femoral_angles(labels, implants=finding)[Side.LEFT]
    assert angles.inclination.measurable
    assert angles.version.reason == "metal implant at the left knee"


def test_a_speck_and_a_shaft_nail_block_nothing() -> None:
    """A bright speck in the knee's joint space (under MIN_PIECE_ML) is not an implant; a
    nail in the femoral shaft, 100 mm and more from the hip and the knee, occupies no site."""
    labels, truth = synthetic_leg(4.0, Side.LEFT)
    speck = metal_ball(labels, truth["knee"] + [0.0, 0.0, 2.0], 2.5)
    assert (speck.array >= METAL_HU).sum() > 0
    assert find_implants(labels, speck) == ImplantFinding()
    top, bottom = truth["head"] + [40.0, 0, -120], truth["knee"] + [5.0, 0, 120]
    nail = _rod(labels, top, bottom, 5.0)
    assert (nail.array >= METAL_HU).sum() * np.prod(labels.spacing) > 5000  # 5 ml of steel
    assert find_implants(labels, nail) == ImplantFinding()
    with pytest.raises(ValueError):
        find_implants(labels, nail.with_array(nail.array[1:]))


@functools.cache
def _phantom(seed: int, region: str) -> tuple[Phantom, Volume]:
    """A primitive phantom at 2 mm, both legs in a 440 x 300 mm field, and its sided truth."""
    phantom = generate_phantom(seed, "full", region=region, spacing=(2.0,) * 3, shape_xy=(220, 150))
    labels = phantom.labels.array
    sided = split_sides(labels, phantom.image.array, phantom.image.to_sitk())
    return phantom, phantom.labels.with_array(sided)


def test_a_phantom_hip_prosthesis_leaves_that_hip_not_measurable() -> None:
    """Seed 12 has a right total hip (ball, stem, cup; the head resected). On its truth labels
    the right hip measured without the finding gives numbers fitted to the stump; with it,
    none, for the metal; the left hip measures as without the finding, on a pelvic frame of
    both hip bones (the metal stands in for the right head to place it)."""
    phantom, sided = _phantom(12, "torso")
    assert phantom.geometry["implant"] == {"type": "hip_prosthesis", "side": "right"}
    finding = find_implants(sided, phantom.image)
    assert finding.sites == {(Side.RIGHT, Site.FEMORAL_HEAD), (Side.RIGHT, Site.ACETABULUM)}
    true_head = np.array(phantom.geometry["sides"]["right"]["femoral_head_centre_mm"])
    where = finding.hip_metal(Side.RIGHT)
    assert where is not None and np.linalg.norm(where - true_head) < 15.0

    before = measure_hip_parameters(sided)
    after = measure_hip_parameters(sided, implants=finding)
    names = ("acetabular_version", "lateral_centre_edge", "coverage", "alpha")
    right = after[Side.RIGHT]
    for name in names:
        assert getattr(right, name).reason == "metal implant at the right femoral head"
    assert right.landmarks == () and right.rim_mm == ()
    assert before[Side.RIGHT].coverage.measurable  # silently wrong without the finding
    left = after[Side.LEFT]
    assert left.pelvic_frame is not None and "both ASIS" in left.pelvic_frame
    for name in names:
        assert getattr(left, name).value == getattr(before[Side.LEFT], name).value is not None
    angles = measure_femoral_angles(sided, implants=finding)
    assert angles[Side.RIGHT].inclination.reason == "metal implant at the right femoral head"
    assert angles[Side.LEFT].inclination.measurable


def test_a_phantom_total_knee_blocks_its_knee_and_a_tibial_plate_nothing() -> None:
    """Seed 30: a left total knee (femoral shell, tibial tray and keel): the left knee's site,
    its landmarks left out; the right knee measured. Seed 1: a right distal tibial plate
    ending about 20 mm above the talus, in the shaft and metaphysis: no site."""
    phantom, sided = _phantom(30, "lower_legs")
    assert phantom.geometry["implant"] == {"type": "knee_prosthesis", "side": "left"}
    finding = find_implants(sided, phantom.image)
    assert finding.sites == {(Side.LEFT, Site.KNEE)}
    legs = measure_leg_alignment(sided, finding)
    assert legs[Side.LEFT].landmark("tibial_knee_centre") is None
    assert "metal implant at the left knee" in str(legs[Side.LEFT].hka_3d.reason)
    assert legs[Side.RIGHT].landmark("tibial_knee_centre") is not None

    plate, plated = _phantom(1, "lower_legs")
    assert plate.geometry["implant"] == {"type": "tibial_plate", "side": "right"}
    assert (plate.image.array >= METAL_HU).sum() * 8.0 > 2000  # over 2 ml of plate and screws
    assert find_implants(plated, plate.image) == ImplantFinding()
