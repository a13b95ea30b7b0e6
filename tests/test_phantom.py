"""Tests of the synthetic CT phantom: determinism, anatomy per region, HU, joint gaps, geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from model.labels import Bone
from model.phantom import PHANTOM_VERSION, Phantom, generate_phantom, write_phantom_nifti
from model.phantom.anatomy import SIDES, build_anatomy, coronal_hka
from model.volume_io import read_volume

REGION_BONES = {
    "hip": {Bone.FEMUR, Bone.HIP_BONE},
    "knee": {Bone.FEMUR, Bone.TIBIA, Bone.FIBULA},
    "ankle": {Bone.TIBIA, Bone.FIBULA, Bone.TALUS, Bone.CALCANEUS},
}


@pytest.fixture(scope="module")
def small() -> dict[str, Phantom]:
    return {region: generate_phantom(3, "small", region=region) for region in REGION_BONES}


@pytest.fixture(scope="module")
def full() -> Phantom:
    """The only full-size call: whole legs at a coarse grid to stay quick."""
    return generate_phantom(
        5, "full", spacing=(1.6, 1.6, 1.6), region="whole_legs", shape_xy=(256, 256)
    )


def _touching_labels(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different bone labels that share a voxel face."""
    pairs: set[tuple[int, int]] = set()
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)
        lo, hi = a[:-1], a[1:]
        hit = (lo != hi) & (lo > 0) & (hi > 0)
        pairs |= {tuple(sorted(p)) for p in zip(lo[hit].tolist(), hi[hit].tolist(), strict=True)}
    return pairs


def test_same_seed_is_bit_identical_and_seeds_differ() -> None:
    a = generate_phantom(11, "small", region="knee")
    b = generate_phantom(11, "small", region="knee")
    c = generate_phantom(12, "small", region="knee")
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.labels.array, b.labels.array)
    assert a.geometry == b.geometry
    assert not np.array_equal(a.image.array, c.image.array)


def test_small_phantom_types_and_size(small: dict[str, Phantom]) -> None:
    for p in small.values():
        assert p.image.array.dtype == np.int16 and p.labels.array.dtype == np.uint8
        assert p.image.array.shape == p.labels.array.shape
        assert max(p.image.array.shape) <= 160
        assert p.image.spacing == p.labels.spacing and p.image.origin == p.labels.origin
        assert set(np.unique(p.labels.array)) <= {0, *map(int, Bone)}
        assert p.slice_thickness_mm >= p.image.spacing[2]


@pytest.mark.parametrize("region", sorted(REGION_BONES))
def test_each_region_holds_its_bones_and_no_others(small: dict[str, Phantom], region: str) -> None:
    counts = np.bincount(small[region].labels.array.ravel(), minlength=len(Bone) + 1)
    present = {Bone(i) for i in range(1, len(Bone) + 1) if counts[i] > 50}
    assert present == REGION_BONES[region]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_joint_spaces_keep_different_bones_apart(seed: int, small: dict[str, Phantom]) -> None:
    """Dilating a bone by one voxel (6-neighbourhood) never reaches another bone."""
    region = sorted(REGION_BONES)[seed % 3]
    phantom = small[region] if seed == 3 else generate_phantom(seed, "small", region=region)
    assert _touching_labels(phantom.labels.array) == set()
    for label in REGION_BONES[region]:
        grown = ndimage.binary_dilation(phantom.labels.array == label)
        others = (phantom.labels.array > 0) & (phantom.labels.array != label)
        assert not np.any(grown & others)


def test_full_phantom_bones_and_tissue_hu(full: Phantom) -> None:
    hu, labels = full.image.array, full.labels.array
    assert hu.shape[1:] == (256, 256)
    assert set(full.geometry["bones_present"]) == {b.name.lower() for b in Bone}
    # Air in the anterior corners (row 0 is anterior, far from the patient and the table).
    assert -1030 < float(hu[:, :8, :8].mean()) < -970
    body = hu > -500
    fat = np.mean((hu[body] > -150) & (hu[body] < -50))
    muscle = np.mean((hu[body] > 20) & (hu[body] < 80))
    assert fat > 0.05 and muscle > 0.2
    femur = hu[labels == Bone.FEMUR]
    assert np.percentile(femur, 95) > 900  # thick diaphyseal cortex
    assert -100 < np.percentile(femur, 25) < 450  # marrow and cancellous bone inside


def test_full_phantom_covers_the_region_and_geometry_is_json(full: Phantom) -> None:
    g = full.geometry
    json.dumps(g)
    assert g["phantom_version"] == PHANTOM_VERSION and g["seed"] == 5
    nz = full.image.array.shape[0]
    extent = nz * full.image.spacing[2]
    assert 900 < extent < 1400
    z0 = full.image.origin[2]
    for side in ("left", "right"):
        head, ankle = (
            g["sides"][side]["femoral_head_centre_mm"],
            g["sides"][side]["ankle_centre_mm"],
        )
        assert z0 < ankle[2] < head[2] < z0 + extent
        assert (head[0] > 0) == (side == "left")  # LPS: +x is the patient's left


def test_distractors_look_like_bone_but_are_unlabelled(small: dict[str, Phantom]) -> None:
    """The patella (knee) and the foot bones (ankle) are bone-bright with label 0."""
    for region in ("knee", "ankle"):
        hu, labels = small[region].image.array, small[region].labels.array
        far_from_labels = ndimage.distance_transform_edt(labels == 0) > 3
        assert np.count_nonzero((hu > 700) & far_from_labels) > 300
    assert "patella" in small["knee"].geometry["distractors_present"]


def test_geometry_ranges_and_hka_sign() -> None:
    for seed in range(30):
        g = build_anatomy(np.random.default_rng([seed, 0])).geometry
        assert 0.85 <= g["scale"] <= 1.15
        for side, sign in SIDES:
            s = g["sides"][side]
            assert 120 <= s["neck_shaft_angle_deg"] <= 140
            assert 0 <= s["femoral_version_deg"] <= 25
            assert 22 <= s["femoral_head_radius_mm"] <= 26
            assert -8 <= s["hka_deg"] <= 8
            assert 430 * 0.85 <= s["femur_length_mm"] <= 480 * 1.15
            assert 0.75 < s["tibia_length_mm"] / s["femur_length_mm"] < 0.9
            hip, knee, ankle = (
                np.array(s[k])
                for k in ("femoral_head_centre_mm", "knee_centre_mm", "ankle_centre_mm")
            )
            # Varus (positive) means the knee lies lateral of the hip-ankle line (coronal plane).
            t = (knee[2] - hip[2]) / (ankle[2] - hip[2])
            lateral = sign * (knee[0] - (hip[0] + t * (ankle[0] - hip[0])))
            if abs(s["hka_deg"]) > 0.5:
                assert np.sign(lateral) == np.sign(s["hka_deg"])
            assert coronal_hka(hip, knee, ankle, sign) == pytest.approx(s["hka_deg"])


def test_metal_is_bright_and_unlabelled() -> None:
    region_of = {"hip_prosthesis": "hip", "knee_prosthesis": "knee", "tibial_plate": "ankle"}
    found = 0
    for seed in range(300):
        implant = build_anatomy(np.random.default_rng([seed, 0])).geometry["implant"]
        if implant is None:
            continue
        p = generate_phantom(seed, "small", region=region_of[implant["type"]])
        metal = p.image.array > 2500
        if metal.sum() > 50:
            assert np.all(p.labels.array[ndimage.binary_erosion(metal)] == 0)
            found += 1
        if found == 2:
            break
    assert found == 2


def test_write_phantom_nifti_round_trips(small: dict[str, Phantom], tmp_path: Path) -> None:
    p = small["ankle"]
    paths = write_phantom_nifti(p, tmp_path)
    assert {path.name for path in paths.values()} == {
        "image.nii.gz",
        "labels.nii.gz",
        "geometry.json",
    }
    image, labels = read_volume(paths["image"]), read_volume(paths["labels"])
    assert np.array_equal(image.array, p.image.array)
    assert np.array_equal(labels.array, p.labels.array)
    assert np.allclose(image.spacing, p.image.spacing) and np.allclose(image.origin, p.image.origin)
    assert json.loads(paths["geometry"].read_text()) == p.geometry


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        generate_phantom(0, "medium")
    with pytest.raises(ValueError):
        generate_phantom(0, "small", region="torso")


@pytest.mark.parametrize(
    ("region", "bones"),
    [
        ("torso", {Bone.FEMUR, Bone.HIP_BONE}),
        ("lower_legs", {Bone.TIBIA, Bone.FIBULA, Bone.TALUS, Bone.CALCANEUS}),
        ("whole_legs", set(Bone)),
    ],
)
def test_full_regions_hold_their_bones_for_every_patient(region: str, bones: set[Bone]) -> None:
    """Each full region's z extent comes from the patient's own landmarks (seed 5 once built
    its torso scan from a foot bone's height and had a negative number of slices)."""
    for seed in (5, 7):
        phantom = generate_phantom(
            seed, "full", spacing=(3.0, 3.0, 3.0), region=region, shape_xy=(96, 96)
        )
        present = set(np.unique(phantom.labels.array)) - {0}
        assert bones <= present, (seed, region, present)
