"""Multi-scale patch sampling: alignment, soft targets and the consistency of the stages."""

from __future__ import annotations

import numpy as np
import pytest

from model.network import CascadeConfig
from model.sampling import (
    TrainingCase,
    augment,
    block_mean,
    draw_sample,
    extract,
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


def test_extract_pads_outside_the_volume() -> None:
    a = np.arange(27, dtype=np.int16).reshape(3, 3, 3)
    out = extract(a, np.array([-1, 0, 2]), 3, fill=-7)
    assert out[0].min() == -7 and out[1, 0, 0] == a[0, 0, 2]
    assert (out[:, :, 1:] == -7).all()


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
