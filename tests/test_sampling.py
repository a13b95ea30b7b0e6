"""Multi-scale patch sampling: alignment, soft targets and the consistency of the stages."""

from __future__ import annotations

import numpy as np
import pytest

from model.engine.network import CascadeConfig
from model.training.sampling import (
    Sample,
    TrainingCase,
    augment,
    block_mean,
    draw_sample,
    extract,
    field_of_view,
    joint_surfaces,
    sample_patch_starts,
    soft_targets,
)


def make_case(seed: int = 0) -> TrainingCase:
    rng = np.random.default_rng(seed)
    labels = np.zeros((80, 90, 100), dtype=np.uint8)
    labels[10:40, 20:50, 30:60] = 1
    labels[45:70, 20:60, 10:25] = 5
    hu = np.where(labels > 0, 1000, -1000).astype(np.int16)
    return TrainingCase.from_arrays("box", hu, labels, rng)


def test_soft_targets_are_block_fractions() -> None:
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[:4, :4, :2] = 3  # a quarter of the first 4x4x4 block
    t = soft_targets(labels, 7, 4)
    assert t.shape == (7, 2, 2, 2)
    np.testing.assert_allclose(t.sum(axis=0), 1.0)
    assert t[3, 0, 0, 0] == pytest.approx(0.5)
    assert t[0, 0, 0, 0] == pytest.approx(0.5)
    assert t[3, 1, 1, 1] == 0.0


def test_extract_repeats_the_nearest_voxel_outside_the_volume() -> None:
    a = np.arange(27, dtype=np.int16).reshape(3, 3, 3)
    out = extract(a, np.array([-1, 0, 2]), 3)
    np.testing.assert_array_equal(out[0], out[1])  # before the first plane: the first plane
    np.testing.assert_array_equal(out[1:, :, 0], a[:2, :, 2])
    assert (out[:, :, 1:] == out[:, :, :1]).all()  # past the last column: the last column
    # A patch wholly past the end is the last plane throughout.
    assert (extract(a, np.array([5, 0, 0]), 3) == a[2]).all()


def test_extract_repeats_the_last_plane_in_view_outside_the_bounds() -> None:
    a = np.arange(1, 1001, dtype=np.int16).reshape(10, 10, 10)
    bounds = (np.array([2, 0, 0]), np.array([10, 10, 6]))
    out = extract(a, np.array([0, 0, 0]), 8, bounds=bounds)
    np.testing.assert_array_equal(out[2:, :, :6], a[2:8, :8, :6])
    np.testing.assert_array_equal(out[:2], np.broadcast_to(out[2], (2, 8, 8)))
    np.testing.assert_array_equal(out[:, :, 6:], np.repeat(out[:, :, 5:6], 2, axis=2))
    assert out.max() <= a[:, :, :6].max()  # nothing from beyond the bounds


def test_field_of_view_cuts_around_the_centre_only_as_often_as_asked() -> None:
    rng = np.random.default_rng(1)
    shape, centre = (300, 300, 300), np.array([150, 140, 160])
    whole = [field_of_view(shape, centre, rng, 0.0) for _ in range(50)]
    assert all((lo == 0).all() and (hi == shape).all() for lo, hi in whole)
    cut = [field_of_view(shape, centre, rng, 1.0) for _ in range(200)]
    for lo, hi in cut:
        # The centre, and the bone voxel within the jitter of 8 it came from, stay in view.
        assert (lo <= centre - 9).all() and (hi >= centre + 9).all()
    n_cut = sum(((lo > 0).any() or (hi < shape).any()) for lo, hi in cut)
    assert 180 <= n_cut < 200  # all six sides are kept in 1/64 of the boxes


def test_truncated_samples_repeat_the_last_plane_in_view_with_its_labels() -> None:
    """HU rise 5 a plane along z, so every plane differs from the next; bone lies in planes
    150-249. Past a cut the last plane in view repeats, labels with it: not air."""
    config = CascadeConfig()
    z = np.arange(400)
    hu = np.broadcast_to((-1000 + 5 * z)[:, None, None], (400, 64, 64)).astype(np.int16)
    labels = np.zeros(hu.shape, np.uint8)
    labels[150:250] = 3
    case = TrainingCase.from_arrays("ramp", hu, labels, np.random.default_rng(0))

    def repeated_planes(sample: Sample) -> int:
        return int((np.diff(sample.images[0][:, 0, 0]) == 0).sum())

    rng = np.random.default_rng(2)
    whole = [draw_sample(case, config, rng, bone_fraction=1.0) for _ in range(10)]
    assert all(repeated_planes(sample) == 0 for sample in whole)
    cut = [
        draw_sample(case, config, rng, bone_fraction=1.0, truncated_fraction=1.0) for _ in range(20)
    ]
    assert sum(repeated_planes(sample) > 0 for sample in cut) >= 3
    for sample in cut:
        assert_stages_consistent(sample, config)
        # The coarse patch lies in planes 30-369 (HU -850 and up): air would be -1.
        assert sample.images.min() > -0.95
        # Finest stage: each plane's label is the label of the plane its HU come from.
        plane = np.rint((sample.images[-1][:, 0, 0] * 1500 + 500 + 1000) / 5)
        np.testing.assert_array_equal(
            sample.targets[-1][3][:, 0, 0], ((plane >= 150) & (plane < 250)).astype(np.float32)
        )


@pytest.mark.parametrize("sizes", [(128, 64, 32), (256, 128, 64, 32), (128, 32)])
def test_patch_starts_nest_on_each_stage_grid(sizes: tuple[int, ...]) -> None:
    config = CascadeConfig(patch_sizes=sizes)
    rng = np.random.default_rng(3)
    for _ in range(50):
        starts = sample_patch_starts(config, np.array([100, 100, 100]), rng)
        for i in range(len(sizes) - 1):
            offset = starts[i + 1] - starts[i]
            assert (offset % config.factors[i] == 0).all()
            assert (offset >= 0).all() and (offset + sizes[i + 1] <= sizes[i]).all()


def assert_stages_consistent(sample, config: CascadeConfig) -> None:
    """The finer stage's targets, block-averaged to the coarser grid, equal the coarser targets
    at the finer patch's offset: sampling and flipping keep the stages aligned."""
    s = config.input_size
    for i in range(len(config.patch_sizes) - 1):
        r = config.factors[i] // config.factors[i + 1]
        lo = sample.offsets[i] // config.factors[i]
        n = s // r
        coarse = sample.targets[i][:, lo[0] : lo[0] + n, lo[1] : lo[1] + n, lo[2] : lo[2] + n]
        np.testing.assert_allclose(block_mean(sample.targets[i + 1], r), coarse, atol=1e-6)


def test_draw_sample_oversamples_bone_and_keeps_stages_aligned() -> None:
    config = CascadeConfig()
    case = make_case()
    rng = np.random.default_rng(0)
    for _ in range(20):
        sample = draw_sample(case, config, rng, bone_fraction=1.0)
        assert sample.images.shape == (3, 32, 32, 32)
        assert sample.targets.shape == (3, 7, 32, 32, 32)
        assert_stages_consistent(sample, config)
        # The finest patch is centred within 8 voxels of a bone voxel, so it holds bone.
        assert sample.targets[-1][1:].sum() > 0


def test_distractor_samples_centre_on_dense_tissue_away_from_the_bones() -> None:
    config = CascadeConfig()
    labels = np.zeros((120, 120, 120), dtype=np.uint8)
    labels[10:40, 20:50, 30:60] = 1
    hu = np.where(labels > 0, 1000, 40).astype(np.int16)
    hu[80:100, 80:100, 70:100] = 600  # unlabelled dense tissue: a sacrum
    hu[10:40, 20:50, 60:62] = 900  # a blurred bone surface spilling into the background
    case = TrainingCase.from_arrays("sacrum", hu, labels, np.random.default_rng(0))
    found = {tuple(v) for v in case.distractor_voxels}
    sacrum = {tuple(v) for v in np.argwhere(hu == 600)}
    assert found == sacrum  # the spill next to the bone is not a distractor
    rng = np.random.default_rng(4)
    dense = (600 - np.mean(config.hu_window)) / (np.diff(config.hu_window)[0] / 2)
    for _ in range(10):
        sample = draw_sample(case, config, rng, bone_fraction=0.0, distractor_fraction=1.0)
        assert_stages_consistent(sample, config)
        assert np.isclose(sample.images[-1], dense).any()
        assert sample.targets[-1][1:].sum() == 0  # no bone in the finest patch


def test_joint_surfaces_are_bone_next_to_another_bone() -> None:
    labels = np.zeros((40, 40, 60), dtype=np.uint8)
    labels[10:30, 10:30, 5:25] = 1  # a femoral head ...
    labels[10:30, 10:30, 28:50] = 2  # ... 3 voxels from an acetabulum
    labels[10:30, 10:30, 52:58] = 2  # the same bone's other piece: not a joint
    joint = joint_surfaces(labels)
    x = np.argwhere(joint)[:, 2]
    # Within JOINT_GAP (5) voxels of the other bone (x 24 and 28 are 4 apart), on both sides of
    # the joint space.
    assert set(x) == {23, 24, 28, 29}
    assert joint[10:30, 10:30, 23:25].all() and not joint[labels == 0].any()


def test_joint_samples_centre_where_two_bones_meet() -> None:
    config = CascadeConfig()
    labels = np.zeros((120, 120, 120), dtype=np.uint8)
    labels[10:40, 20:50, 30:60] = 1
    labels[10:40, 20:50, 62:70] = 2
    labels[80:110, 80:110, 80:110] = 3  # far from any other bone
    hu = np.where(labels > 0, 1000, 40).astype(np.int16)
    case = TrainingCase.from_arrays("joint", hu, labels, np.random.default_rng(0))
    rng = np.random.default_rng(6)
    for _ in range(10):
        sample = draw_sample(case, config, rng, bone_fraction=0.0, joint_fraction=1.0)
        assert_stages_consistent(sample, config)
        fine = sample.targets[-1]
        assert fine[1].sum() > 0 and fine[2].sum() > 0 and fine[3].sum() == 0


def test_metal_samples_centre_on_the_implant_and_fall_through_without_one() -> None:
    config = CascadeConfig()
    labels = np.zeros((120, 120, 120), dtype=np.uint8)
    labels[10:110, 40:70, 40:70] = 1  # a femoral shaft ...
    hu = np.where(labels > 0, 1500, 40).astype(np.int16)
    hu[20:60, 50:60, 50:60] = 3000  # ... holding a prosthesis stem, labelled background
    labels[20:60, 50:60, 50:60] = 0
    hu[100:110, 100:110, 100:110] = 600  # a sacrum
    case = TrainingCase.from_arrays("stem", hu, labels, np.random.default_rng(0))
    assert {tuple(v) for v in case.metal_voxels} == {tuple(v) for v in np.argwhere(hu == 3000)}
    rng = np.random.default_rng(7)
    metal = (3000 - np.mean(config.hu_window)) / (np.diff(config.hu_window)[0] / 2)
    for _ in range(10):
        sample = draw_sample(case, config, rng, bone_fraction=0.0, metal_fraction=1.0)
        assert_stages_consistent(sample, config)
        assert np.isclose(sample.images[-1], min(metal, 1.0)).any()
    # Without metal, the share goes to random voxels (drawing from no voxels would raise).
    hu[hu == 3000] = 40
    no_metal = TrainingCase.from_arrays("no stem", hu, labels, np.random.default_rng(0))
    assert len(no_metal.metal_voxels) == 0
    sample = draw_sample(no_metal, config, rng, bone_fraction=0.0, metal_fraction=1.0)
    assert sample.images.shape == (3, 32, 32, 32)


def test_augment_flip_keeps_stages_aligned() -> None:
    config = CascadeConfig()
    case = make_case()
    rng = np.random.default_rng(5)
    flipped = 0
    for _ in range(20):
        sample = draw_sample(case, config, rng)
        out = augment(sample, config, rng)
        assert_stages_consistent(out, config)
        flipped += not np.array_equal(out.targets, sample.targets)
    assert flipped > 0


def test_rotated_regions_turn_the_cube_about_the_centre() -> None:
    from scipy.spatial.transform import Rotation

    from model.training.sampling import rotated_regions

    volume = np.random.default_rng(0).integers(0, 20, (90, 90, 90)).astype(np.uint8)
    cube = volume[13:77, 13:77, 13:77]
    same = rotated_regions([volume], [13, 13, 13], 64, np.array([44.5] * 3), np.eye(3))[0]
    assert np.array_equal(same, cube)
    quarter = Rotation.from_rotvec([np.pi / 2, 0, 0]).as_matrix()  # about the z (slice) axis
    turned, again = rotated_regions(
        [volume, volume], [13, 13, 13], 64, np.array([44.5] * 3), quarter
    )
    assert np.array_equal(turned, again)
    assert np.array_equal(turned, np.rot90(cube, 3, axes=(1, 2)))
    # Past the volume the last plane repeats, as `extract` pads.
    edge = rotated_regions([volume], [60, 60, 60], 64, np.array([70.0] * 3), quarter)[0]
    assert edge.shape == (64, 64, 64) and set(np.unique(edge)) <= set(np.unique(volume))
