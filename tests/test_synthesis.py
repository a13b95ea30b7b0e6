"""The CT synthesis chain (model.training.synthesis): each named transform on arrays with known
answers."""

from __future__ import annotations

import numpy as np
import pytest

from model.training.synthesis import (
    DEFAULT_CHAIN,
    HU_RANGE,
    CtNoise,
    Quantise,
    ThickSlices,
    Tissue,
    TissueIntensities,
    TrabecularTexture,
    random_field,
    synthesise,
)


def _two_tissues(shape: tuple[int, int, int] = (48, 48, 48)) -> np.ndarray:
    tissues = np.full(shape, Tissue.MUSCLE, np.uint8)
    tissues[:, :, shape[2] // 2 :] = Tissue.FAT
    return tissues


def test_tissue_intensities_lie_in_each_tissues_range() -> None:
    tissues = np.arange(len(Tissue), dtype=np.uint8).reshape(1, 1, -1)
    for seed in range(20):
        hu = TissueIntensities()(
            np.zeros(tissues.shape, np.float32), tissues, np.random.default_rng(seed)
        )
        for tissue in Tissue:
            lo, hi = HU_RANGE[tissue]
            value = float(hu[0, 0, tissue])
            if tissue is Tissue.CORTEX:  # osteoporotic draws scale the cortex down
                assert 0.6 * lo - 1e-3 <= value <= hi + 1e-3
            elif tissue is not Tissue.CANCELLOUS:
                assert lo - 1e-3 <= value <= hi + 1e-3, (tissue, value)


def test_thick_slices_spread_an_edge_along_z_only() -> None:
    hu = np.zeros((64, 8, 8), np.float32)
    hu[32:] = 1000.0
    rng = np.random.default_rng(3)
    out = ThickSlices(thickness_mm=(4.0, 4.0), noise=None)(hu, np.zeros(hu.shape, np.uint8), rng)
    profile = out[:, 4, 4]
    ramp = np.nonzero((profile > 50) & (profile < 950))[0]
    # A 4 mm slice profile sampled every 2-4 mm and interpolated back: the edge spreads over
    # 3-10 voxels of 0.8 mm, never beyond, and every row of a slice stays equal.
    assert 3 <= len(ramp) <= 10
    assert np.allclose(out, out[:, :1, :1])
    assert profile[:20].max() < 1e-3 and profile[-20:].min() > 1000 - 1e-3


def test_thick_slices_are_as_noisy_as_the_scanner_makes_each_slice() -> None:
    """The noise is drawn on the reconstructed slices, so averaging over a slice's thickness
    does not quieten it: only the interpolation back to 0.8 mm does, by at most a factor of
    sqrt(1/2) between two slices (noise drawn before the averaging over 4 voxels: 0.5x)."""
    hu = np.zeros((96, 48, 48), np.float32)
    tissues = np.zeros(hu.shape, np.uint8)
    noise = CtNoise(sigma_hu=(20.0, 20.0))
    sds = []
    for seed in range(6):
        thick = ThickSlices(thickness_mm=(3.2, 3.2), noise=noise)
        sds.append(float(thick(hu, tissues, np.random.default_rng(seed)).std()))
    assert min(sds) >= 0.7 * 20.0 and max(sds) <= 1.05 * 20.0


def test_synthesis_draws_noise_in_the_slices_not_before_them() -> None:
    assert not any(isinstance(t, CtNoise) for t in DEFAULT_CHAIN)
    thick = [t for t in DEFAULT_CHAIN if isinstance(t, ThickSlices)]
    assert len(thick) == 1 and isinstance(thick[0].noise, CtNoise)


def test_ct_noise_has_the_sigma_it_draws_within_its_range() -> None:
    hu = np.zeros((64, 64, 64), np.float32)
    sds = [
        float(CtNoise()(hu, hu.astype(np.uint8), np.random.default_rng(seed)).std())
        for seed in range(12)
    ]
    assert min(sds) >= 5.0 * 0.8 and max(sds) <= 60.0 * 1.2
    assert max(sds) / min(sds) > 2.0  # it varies


def test_trabecular_texture_touches_only_spongy_bone() -> None:
    tissues = _two_tissues()
    tissues[10:20, 10:20, 10:20] = Tissue.CANCELLOUS
    hu = np.zeros(tissues.shape, np.float32)
    out = TrabecularTexture()(hu, tissues, np.random.default_rng(0))
    assert np.all(out[tissues != Tissue.CANCELLOUS] == 0)
    assert out[tissues == Tissue.CANCELLOUS].std() > 20.0


def test_random_fields_have_unit_variance_and_differ_per_draw() -> None:
    rng = np.random.default_rng(1)
    a = random_field((64, 64, 64), "smooth", 10.0, rng)
    b = random_field((64, 64, 64), "smooth", 10.0, rng)
    assert 0.5 < float(a.std()) < 1.5
    assert not np.array_equal(a, b)
    big = random_field((200, 40, 40), "grain", 0.8, rng)  # larger than the bank: made afresh
    assert big.shape == (200, 40, 40)


def test_synthesis_is_repeatable_and_quantised() -> None:
    tissues = _two_tissues()
    a = synthesise(tissues, np.random.default_rng(7))
    b = synthesise(tissues, np.random.default_rng(7))
    c = synthesise(tissues, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(a == np.rint(a)) and a.min() >= -1024 and a.max() <= 3071
    # Fat reads darker than muscle whatever is drawn.
    for seed in range(5):
        hu = synthesise(tissues, np.random.default_rng(seed))
        assert hu[:, :, 30:].mean() < hu[:, :, :18].mean() - 60


@pytest.mark.parametrize("floor", [-1000.0, -1024.0])
def test_quantise_clips_to_the_scanner_range(floor: float) -> None:
    hu = np.array([[[-5000.0, 12.4, 9000.0]]], np.float32)
    seed = next(
        s for s in range(50) if (np.random.default_rng(s).random() < 0.3) == (floor == -1000.0)
    )
    out = Quantise()(hu, hu.astype(np.uint8), np.random.default_rng(seed))
    assert out.tolist() == [[[floor, 12.0, 3071.0]]]


def test_tissue_statistics_read_back_a_known_image() -> None:
    from model.training.ct_statistics import tissue_statistics

    rng = np.random.default_rng(0)
    hu = np.full((6, 80, 80), -90.0, np.float32)
    hu[:, 10:70, 10:70] = 45.0
    yy, xx = np.mgrid[:80, :80]
    ring = (np.hypot(yy - 40, xx - 40) < 12) & (np.hypot(yy - 40, xx - 40) >= 8)
    hu[:, ring] = 1300.0
    hu[:, np.hypot(yy - 40, xx - 40) < 7] = -40.0  # a fatty canal
    hu += rng.normal(0, 10, hu.shape).astype(np.float32)
    stats = tissue_statistics(hu)
    assert abs(stats["fat_hu"] - -90) < 6 and abs(stats["muscle_hu"] - 45) < 6
    assert 1290 < stats["bone_p90_hu"] < 1330 and abs(stats["canal_hu"] - -40) < 5
    assert 6 < stats["noise_hu"] < 14


def test_synthesis_is_the_same_in_every_process() -> None:
    """The noise banks are seeded stably: two interpreters with different string hashing draw
    the same image from the same generator (a DataLoader worker, a resumed run, a bench)."""
    import os
    import subprocess
    import sys

    code = (
        "import hashlib, numpy as np; from model.training.synthesis import synthesise; "
        "t = np.zeros((40, 40, 40), np.uint8); t[:, :, 20:] = 14; "
        "print(hashlib.sha256(synthesise(t, np.random.default_rng(3)).tobytes()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1
