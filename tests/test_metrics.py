"""Known-answer tests of the paper's metrics (model.metrics)."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
from scipy import ndimage as ndi

from model.metrics import dice, evaluate_labels, surface_distances, surface_metrics

ANISOTROPIC = (0.7, 0.9, 2.5)  # x, y, z in mm, as SimpleITK orders spacing


def ball(shape: tuple[int, int, int], centre_xyz: tuple[float, ...], radius_mm: float, spacing):
    """Boolean ball of a radius in mm on an (anisotropic) grid; arrays are (z, y, x)."""
    z, y, x = np.indices(shape)
    cx, cy, cz = centre_xyz
    sx, sy, sz = spacing
    return ((x - cx) * sx) ** 2 + ((y - cy) * sy) ** 2 + ((z - cz) * sz) ** 2 <= radius_mm**2


def box_mask(shape, z: slice, y: slice, x: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[z, y, x] = True
    return mask


def test_identical_masks_are_perfect():
    mask = ball((20, 30, 30), (15, 15, 10), 6.0, ANISOTROPIC)
    assert dice(mask, mask) == 1.0
    metrics = surface_metrics(mask, mask, ANISOTROPIC)
    assert (metrics.masd_mm, metrics.hd95_mm, metrics.hd_mm) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cubes_offset_along_one_axis(axis: int):
    n, k = 10, 3
    shape = (20, 20, 20)
    start = [2, 3, 4]
    a = box_mask(shape, *(slice(s, s + n) for s in start))
    start[axis] += k
    b = box_mask(shape, *(slice(s, s + n) for s in start))
    assert dice(a, b) == pytest.approx((n - k) / n)
    # Array axis 0 is z, the last spacing entry.
    step_mm = ANISOTROPIC[2 - axis]
    metrics = surface_metrics(a, b, ANISOTROPIC)
    assert metrics.hd_mm == pytest.approx(k * step_mm, rel=1e-6)
    assert metrics.hd95_mm <= metrics.hd_mm + 1e-6
    assert 0 < metrics.masd_mm < metrics.hd_mm


def test_directed_distances_of_a_shifted_cube():
    """Every surface voxel is at most k voxels from the other surface, and both directions
    are symmetric for a pure shift."""
    a = box_mask((16, 16, 16), slice(2, 10), slice(2, 10), slice(2, 10))
    b = box_mask((16, 16, 16), slice(4, 12), slice(2, 10), slice(2, 10))
    a_to_b, b_to_a = surface_distances(a, b, (1.0, 1.0, 1.0))
    assert a_to_b.size == b_to_a.size == 8**3 - 6**3
    assert a_to_b.max() == pytest.approx(2.0)
    assert sorted(a_to_b) == pytest.approx(sorted(b_to_a))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 1.6)])
def test_ball_versus_ball_one_voxel_larger(spacing):
    """Radii 10 and 11 in-plane voxels: true distance 1 voxel, up to discretisation of the
    surfaces (a diagonal step, √2 voxels, on the isotropic grid; one slice, 2 voxels, where
    slices are twice as thick)."""
    voxel, coarsest = spacing[0], max(spacing)
    a = ball((40, 60, 60), (30, 30, 20), 10 * voxel, spacing)
    b = ball((40, 60, 60), (30, 30, 20), 11 * voxel, spacing)
    metrics = surface_metrics(a, b, spacing)
    assert metrics.masd_mm == pytest.approx(voxel, abs=0.15 * coarsest)
    assert voxel * 0.99 <= metrics.hd95_mm <= max(1.5 * voxel, coarsest) * 1.0001
    assert asdict(surface_metrics(b, a, spacing)) == pytest.approx(asdict(metrics))  # symmetric


def test_far_spurious_voxel_moves_hd_but_not_hd95():
    """The paper's reason for HD95: one outlier voxel dominates HD only."""
    spacing = (1.0, 1.0, 1.0)
    truth = ball((40, 60, 60), (30, 30, 25), 10.0, spacing)
    pred = ball((40, 60, 60), (30, 30, 25), 11.0, spacing)
    clean = surface_metrics(pred, truth, spacing)
    pred[2, 2, 2] = True  # about 40 voxels from the ball
    noisy = surface_metrics(pred, truth, spacing)
    assert clean.hd_mm < 2.0 and noisy.hd_mm > 30.0
    assert noisy.hd95_mm == pytest.approx(clean.hd95_mm, abs=0.05)
    assert noisy.masd_mm == pytest.approx(clean.masd_mm, abs=0.1)


def test_object_touching_the_array_edge_has_a_surface_there():
    """The field-of-view boundary counts as surface: a bone cut by the scan is compared there."""
    a = box_mask((10, 10, 10), slice(0, 10), slice(0, 10), slice(0, 5))
    b = box_mask((10, 10, 10), slice(0, 10), slice(0, 10), slice(0, 7))
    assert surface_metrics(a, b, (1.0, 1.0, 1.0)).hd_mm == pytest.approx(2.0)


def test_empty_masks():
    empty = np.zeros((5, 5, 5), dtype=bool)
    full = box_mask((5, 5, 5), slice(1, 3), slice(1, 3), slice(1, 3))
    assert dice(empty, empty) == 1.0
    assert surface_metrics(empty, empty, (1, 1, 1)).hd_mm == 0.0
    assert dice(empty, full) == 0.0
    for a, b in ((empty, full), (full, empty)):
        metrics = surface_metrics(a, b, (1, 1, 1))
        assert math.isinf(metrics.masd_mm) and math.isinf(metrics.hd95_mm)
        assert math.isinf(metrics.hd_mm)
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(empty, full, (1, 1, 1))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))


def test_evaluate_labels_on_a_multi_label_map():
    spacing = (0.8, 0.8, 2.0)
    shape = (20, 24, 40)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[2:12, 2:12, 2:12] = 1  # femur
    truth[2:12, 2:12, 20:30] = 3  # tibia
    truth[15:18, 15:18, 15:18] = 5  # talus
    pred = np.zeros_like(truth)
    pred[2:12, 2:12, 2:12] = 1  # femur: perfect
    pred[2:12, 2:12, 22:32] = 3  # tibia: shifted 2 voxels along x
    pred[0:2, 20:22, 35:37] = 6  # calcaneus: spurious, absent from truth; talus: missed
    names = {1: "femur", 3: "tibia", 5: "talus", 6: "calcaneus"}

    result = evaluate_labels(pred, truth, spacing, names)
    bones = result["bones"]
    assert bones["femur"] == {
        "label": 1,
        "dice": 1.0,
        "masd_mm": 0.0,
        "hd95_mm": 0.0,
        "hd_mm": 0.0,
        "truth_voxels": 1000,
        "pred_voxels": 1000,
    }
    assert bones["tibia"]["dice"] == pytest.approx(0.8)
    assert bones["tibia"]["hd_mm"] == pytest.approx(2 * 0.8, rel=1e-6)
    assert bones["talus"]["dice"] == 0.0 and math.isinf(bones["talus"]["hd_mm"])
    assert bones["talus"]["pred_voxels"] == 0 and bones["talus"]["truth_voxels"] == 27
    assert bones["calcaneus"]["truth_voxels"] == 0 and bones["calcaneus"]["pred_voxels"] == 8

    mean = result["mean"]
    assert mean["n_bones"] == 3  # femur, tibia, talus: the bones in the truth
    assert mean["dice"] == pytest.approx((1.0 + 0.8 + 0.0) / 3)
    assert math.isinf(mean["hd_mm"])  # the missed talus


def reference_surface_metrics(a: np.ndarray, b: np.ndarray, spacing) -> tuple[float, ...]:
    """Brute-force MASD, HD95, HD on the whole volume with scipy, independent of SimpleITK."""
    sampling = spacing[::-1]  # numpy axis order

    def surface(mask: np.ndarray) -> np.ndarray:
        return mask & ~ndi.binary_erosion(mask, border_value=0)  # face-connected surface

    sa, sb = surface(a), surface(b)
    pooled = np.concatenate(
        [
            ndi.distance_transform_edt(~sb, sampling=sampling)[sa],
            ndi.distance_transform_edt(~sa, sampling=sampling)[sb],
        ]
    )
    return pooled.mean(), np.percentile(pooled, 95), pooled.max()


def test_evaluate_labels_matches_a_brute_force_reference():
    """Cropping to a label's box and SimpleITK's distances give the textbook answer."""
    rng = np.random.default_rng(0)
    spacing = (0.5, 0.7, 1.3)
    truth = np.zeros((30, 30, 30), dtype=np.int16)
    truth[5:20, 6:25, 4:18] = 2
    truth[22:26, 2:5, 20:29] = 2
    pred = truth.copy()
    pred[rng.random(truth.shape) < 0.002] = 2
    pred[10:12, 10:20, 4:10] = 0
    result = evaluate_labels(pred, truth, spacing, {2: "hip bone"})["bones"]["hip bone"]
    masd, hd95, hd = reference_surface_metrics(pred == 2, truth == 2, spacing)
    assert result["masd_mm"] == pytest.approx(masd, rel=1e-5)
    assert result["hd95_mm"] == pytest.approx(hd95, rel=1e-5)
    assert result["hd_mm"] == pytest.approx(hd, rel=1e-5)
    assert result["dice"] == pytest.approx(dice(pred == 2, truth == 2))


def test_evaluate_labels_refuses_non_integer_maps():
    with pytest.raises(ValueError, match="integer"):
        evaluate_labels(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), np.uint8), (1, 1, 1))
