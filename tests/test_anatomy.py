"""Anatomical plausibility (model/engine/anatomy.py) on label maps with known geometry."""

from __future__ import annotations

import numpy as np
import pytest

from model.engine.anatomy import (
    AnatomyCheck,
    bone_extents,
    check_anatomy,
    slice_heights_mm,
    without_misplaced,
)
from model.labels import Bone, Side, sided_label
from model.phantom import generate_phantom
from model.volume_io import Volume

SPACING = (2.0, 2.0, 5.0)  # x, y, z mm


def _leg(bands: dict[Bone, tuple[int, int]], flip: bool = False) -> Volume:
    """Bones in slices [start, stop) counted from the feet, 5 mm apart, each in its own column
    (neighbours overlap along z as in a body, not in space), right side. `flip`: the same
    body stored head first (z falls with the array index)."""
    labels = np.zeros((240, 8, 8), np.uint8)
    for bone, (start, stop) in bands.items():
        labels[start:stop, 2:6, bone] = bone
    if flip:  # the same body, stored head first
        labels = labels[::-1].copy()
    direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0 if flip else 1.0)
    origin = (0.0, 0.0, 1195.0 if flip else 0.0)
    return Volume(labels, SPACING, origin, direction)


# A whole leg from the foot up, in slices of 5 mm: calcaneus, talus, tibia and fibula, femur,
# hip bone, each touching the next as in an adult.
WHOLE_LEG = {
    Bone.CALCANEUS: (0, 12),
    Bone.TALUS: (8, 16),
    Bone.FIBULA: (14, 90),
    Bone.TIBIA: (15, 95),
    Bone.FEMUR: (94, 186),
    Bone.HIP_BONE: (170, 210),
}


def test_slice_heights_follow_the_direction() -> None:
    heights = slice_heights_mm(_leg({}))
    assert heights[0] == 0.0 and heights[1] == 5.0
    flipped = slice_heights_mm(_leg({}, flip=True))
    assert flipped[0] == 1195.0 and flipped[1] == 1190.0


@pytest.mark.parametrize("flip", [False, True])
def test_a_whole_leg_is_plausible(flip: bool) -> None:
    leg = _leg(WHOLE_LEG, flip)
    femur = bone_extents(leg)[Bone.FEMUR]
    assert femur.voxels == 92 * 4
    # 92 slices; the 10 % and 90 % quantiles of its voxels fall in its 10th and 83rd slices.
    assert femur.high_mm - femur.low_mm == 73 * 5.0
    assert check_anatomy(leg) == AnatomyCheck()


def test_bones_crowded_into_a_slab_are_implausible() -> None:
    """What a phantom-trained model found in a 4 cm slab of a real body: every bone at once."""
    slab = _leg({bone: (100, 108) for bone in Bone})
    check = check_anatomy(slab)
    assert check.reason == (
        "anatomically implausible: hip bone and tibia found -35 mm apart along the body "
        "(at least 150 mm in any adult)"
    )
    # The hip bone conflicts with four bones of its size, then the femur with two; no piece of
    # either can stay beside the foot and leg bones kept, and a third of the bone is dropped.
    assert check.dropped_bones == (Bone.FEMUR, Bone.HIP_BONE)
    assert check.dropped_voxels == 2 * 8 * 4


def test_a_few_misplaced_voxels_are_dropped_not_the_scan() -> None:
    """A hip with a speck of "talus" and of "calcaneus" in it, on both sides: the specks go,
    the hip stays."""
    hip = {Bone.FEMUR: (100, 190), Bone.HIP_BONE: (170, 230)}
    leg = _leg(hip)
    array = leg.array.copy()
    array[150, 0, 0] = Bone.TALUS
    array[151, 0, 1] = sided_label(Bone.TALUS, Side.LEFT)
    array[160, 7, 7] = Bone.CALCANEUS
    check = check_anatomy(leg.with_array(array))
    assert check.reason is None and set(check.dropped_bones) == {Bone.TALUS, Bone.CALCANEUS}
    assert check.dropped_voxels == 3
    cleaned = without_misplaced(leg.with_array(array), check)
    np.testing.assert_array_equal(cleaned.array, leg.array)


def test_a_false_leg_bone_at_a_hip_goes_not_the_hip_bone() -> None:
    """A hip with a patch of "tibia" and one of "fibula" in it (held-out phantom 2009, the
    session-7 weights): the hip bone is in two conflicts, each patch in one, but it is the
    large bone; the patches go and the scan stands."""
    hip = {Bone.FEMUR: (100, 190), Bone.HIP_BONE: (170, 230)}
    leg = _leg(hip)
    array = leg.array.copy()
    array[175:180, 0:2, 0:2] = Bone.TIBIA
    array[176:178, 6:8, 6:8] = sided_label(Bone.FIBULA, Side.LEFT)
    check = check_anatomy(leg.with_array(array))
    assert check.reason is None
    assert set(check.dropped_bones) == {Bone.TIBIA, Bone.FIBULA}
    assert check.dropped_voxels == 5 * 4 + 2 * 4
    np.testing.assert_array_equal(without_misplaced(leg.with_array(array), check).array, leg.array)


def test_only_the_misplaced_pieces_of_a_bone_are_dropped() -> None:
    """A whole leg whose talus also shows up as a blob in the pelvis: the blob goes, the talus
    at the ankle stays (a per-bone check would have dropped both)."""
    leg = _leg(WHOLE_LEG)
    array = leg.array.copy()
    array[180:200, 0:2, 0:2] = Bone.TALUS  # 20 slices x 4 voxels, beside the hip bone
    check = check_anatomy(leg.with_array(array))
    ((bone, low, high),) = check.dropped
    # A talus must lie 200 mm below the femur's 10 % quantile (and 400 mm below the hip
    # bone's, which is higher).
    extents = bone_extents(leg)
    assert bone == Bone.TALUS and low == -np.inf
    assert high == extents[Bone.FEMUR].low_mm - 200.0 < extents[Bone.HIP_BONE].low_mm - 400.0
    assert check.reason is None and check.dropped_voxels == 80
    cleaned = without_misplaced(leg.with_array(array), check)
    np.testing.assert_array_equal(cleaned.array, leg.array)


def test_a_foot_above_the_knee_is_implausible_and_sides_count_alike() -> None:
    bands = {Bone.FEMUR: (40, 90), Bone.CALCANEUS: (100, 150)}  # a heel above the femur
    leg = _leg(bands)
    left = leg.with_array(np.where(leg.array > 0, leg.array + len(Bone), 0).astype(np.uint8))
    assert sided_label(Bone.FEMUR, Side.LEFT) in left.array
    for labels in (leg, left):
        reason = check_anatomy(labels).reason
        assert reason is not None and "femur and calcaneus found -500 mm apart" in reason


def test_one_bone_or_neighbours_only_is_never_judged() -> None:
    for bands in ({Bone.HIP_BONE: (0, 10)}, {Bone.TIBIA: (0, 50), Bone.TALUS: (0, 50)}, {}):
        assert check_anatomy(_leg(bands)) == AnatomyCheck()


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_phantom_truths_are_plausible(seed: int) -> None:
    """The generator's own ground truth, whatever region and build it draws."""
    phantom = generate_phantom(seed, "small")
    assert check_anatomy(phantom.labels) == AnatomyCheck()
