"""CT images synthesised from tissue maps, with wide random variation (after SynthSeg).

Billot et al. (Medical Image Analysis 2023) train on images drawn afresh from label maps at
every step, with intensities, resolution, noise and artefacts random, so that real scans are
just more samples. Here the label map is a phantom's tissue map (:class:`Tissue`, one uint8
per voxel at the model's 0.8 mm) and the intensities are Hounsfield units drawn around each
tissue's real value. Each step of the chain is a named transform, a callable
``(hu, tissues, rng) -> hu`` on float32 arrays (z, y, x), composed by :func:`synthesise`:

    TissueIntensities -> TissueTexture -> TrabecularTexture -> MetalStreaks -> BiasField
    -> InPlaneResolution -> PointSpread -> ThickSlices (with CtNoise in each slice) -> Quantise

Pure numpy/scipy, no I/O; each transform is tested on its own (tests/test_synthesis.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cache

import numpy as np
import torch
from scipy import ndimage

from model.metrics import bounding_box

VOXEL_MM = 0.8


class Tissue(IntEnum):
    AIR = 0
    FAT = 1
    MUSCLE = 2
    SKIN = 3
    BLOOD = 4
    CONTRAST = 5  # contrast-filled artery
    CALCIFICATION = 6
    FLUID = 7  # bladder, cysts
    GAS = 8
    BOWEL = 9  # bowel content, stool
    ORGAN = 10  # prostate, uterus, bowel wall
    MASS = 11  # soft-tissue tumour
    NECROSIS = 12
    CORTEX = 13
    CANCELLOUS = 14
    MARROW = 15  # fatty marrow of the shafts
    GROWTH_PLATE = 16
    METAL = 17
    TABLE = 18  # carbon-fibre shell of the table
    FOAM = 19  # table core, cushions
    BLANKET = 20
    CARTILAGE = 21  # joint spaces


N_TISSUES = len(Tissue)

# HU ranges each tissue's mean is drawn from. On the 21 real extremity crops in
# ../shared/data/real_ct (GE, SOFT kernel, 140 kVp, 3.27 mm; `python -m bench.phantom_vs_real`)
# the histogram peaks of fat lie at -115..-51 HU (median -83), of muscle at 27..61 (45); the
# 90th percentile of bone (>= 200 HU) at 561..1420 (partial volume of thin cortices at 3.27 mm
# lowers it, which the PSF and slice profile model); the filled medullary canal at -77..117
# (fatty to red marrow and cancellous bone). The ranges cover these, widened for other
# scanners, kernels, ages and osteoporosis.
HU_RANGE: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1024.0, -990.0),
    Tissue.FAT: (-130.0, -50.0),
    Tissue.MUSCLE: (25.0, 75.0),
    Tissue.SKIN: (10.0, 70.0),
    Tissue.BLOOD: (25.0, 60.0),
    Tissue.CONTRAST: (120.0, 450.0),
    Tissue.CALCIFICATION: (300.0, 1200.0),
    Tissue.FLUID: (-5.0, 25.0),
    Tissue.GAS: (-1000.0, -850.0),
    Tissue.BOWEL: (-60.0, 80.0),
    Tissue.ORGAN: (25.0, 60.0),
    Tissue.MASS: (10.0, 70.0),
    Tissue.NECROSIS: (-10.0, 25.0),
    Tissue.CORTEX: (800.0, 1900.0),
    Tissue.CANCELLOUS: (60.0, 400.0),
    Tissue.MARROW: (-120.0, 120.0),
    Tissue.GROWTH_PLATE: (60.0, 140.0),
    Tissue.METAL: (2500.0, 3071.0),
    Tissue.TABLE: (-300.0, 400.0),
    Tissue.FOAM: (-980.0, -700.0),
    Tissue.BLANKET: (-500.0, 0.0),
    Tissue.CARTILAGE: (20.0, 110.0),
}

# Within-tissue variation (HU) of the smooth texture field: fat and muscle vary a little across
# a scan; bone and bowel content a lot.
TEXTURE_HU: dict[Tissue, float] = {
    Tissue.FAT: 8.0,
    Tissue.MUSCLE: 8.0,
    Tissue.BOWEL: 60.0,
    Tissue.CANCELLOUS: 40.0,
    Tissue.MARROW: 30.0,
    Tissue.CORTEX: 120.0,
    Tissue.MASS: 15.0,
    Tissue.FLUID: 4.0,
}


def nominal_lut() -> np.ndarray:
    """HU of each tissue at the middle of its range (for the cached cases' reference image)."""
    lut = np.zeros(N_TISSUES, np.float32)
    for tissue, (lo, hi) in HU_RANGE.items():
        lut[tissue] = (lo + hi) / 2
    return lut


Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]

# Random fields are cut from a bank of precomputed ones, at a random offset and with random axis
# flips, when the image is no larger than the bank: filtering fresh noise for every training
# sample took two thirds of the sampling time (0.2 s a 128^3 patch).
BANK_SIZE = 160


@cache
def _bank(kind: str, parameter: float) -> np.ndarray:
    # A stable seed per bank (str hash() differs between processes): the same draws give the
    # same image in every process.
    rng = np.random.default_rng([zlib.crc32(kind.encode()), round(parameter * 1000)])
    shape = (BANK_SIZE,) * 3
    if kind == "smooth":
        return smooth_field(shape, parameter, rng)
    noise = rng.standard_normal(shape).astype(np.float32)
    if kind == "band":
        field = ndimage.gaussian_filter(noise, parameter, mode="wrap") - ndimage.gaussian_filter(
            noise, 2.5 * parameter, mode="wrap"
        )
    else:  # "grain": noise correlated in-plane by a reconstruction kernel
        field = ndimage.gaussian_filter(noise, (0.3 * parameter, parameter, parameter), mode="wrap")
    return field / np.float32(field.std())


def random_field(
    shape: Sequence[int], kind: str, parameter: float, rng: np.random.Generator
) -> np.ndarray:
    """A unit-variance random field of ``kind`` ("smooth": correlation length ``parameter``
    voxels; "band": band-pass noise of scale ``parameter``; "grain": kernel-correlated noise),
    cut from the bank with a random offset and flips when it fits, else made afresh."""
    if any(n > BANK_SIZE for n in shape):
        if kind == "smooth":
            return smooth_field(shape, parameter, rng)
        field = _bank(kind, parameter)
        reps = [int(np.ceil(n / BANK_SIZE)) for n in shape]
        return np.tile(field, reps)[: shape[0], : shape[1], : shape[2]]
    bank = _bank(kind, parameter)
    start = [int(rng.integers(0, BANK_SIZE - n + 1)) for n in shape]
    view = bank[tuple(slice(a, a + n) for a, n in zip(start, shape, strict=True))]
    flips = tuple(i for i in range(3) if rng.random() < 0.5)
    return np.flip(view, flips) if flips else view


@dataclass(frozen=True)
class TissueIntensities:
    """Every tissue at one HU drawn from its range (cortex above cancellous, always)."""

    def __call__(self, hu: np.ndarray, tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lut = np.array([rng.uniform(*HU_RANGE[t]) for t in Tissue], np.float32)
        # Osteoporotic bone: thin, less dense cortex with faint cancellous bone (a fifth).
        if rng.random() < 0.2:
            lut[Tissue.CORTEX] *= np.float32(rng.uniform(0.6, 0.85))
            lut[Tissue.CANCELLOUS] = np.float32(rng.uniform(40.0, 140.0))
        return lut[tissues]


def smooth_field(
    shape: Sequence[int], scale_vox: float | Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """A smooth random field of unit standard deviation with correlation length ``scale_vox``
    (voxels, one or per axis): smoothed noise on a grid a quarter of that scale, interpolated
    up trilinearly (cheap at any scale)."""
    scale = np.broadcast_to(np.asarray(scale_vox, dtype=np.float64), (3,))
    step = np.maximum(1.0, scale / 4)
    coarse_shape = [int(np.ceil(n / s)) + 2 for n, s in zip(shape, step, strict=True)]
    coarse = ndimage.gaussian_filter(
        rng.standard_normal(coarse_shape).astype(np.float32), scale / step / 2, mode="wrap"
    )
    coarse /= max(float(coarse.std()), 1e-6)
    full = torch.nn.functional.interpolate(
        torch.from_numpy(coarse)[None, None],
        size=[round(c * s) for c, s in zip(coarse_shape, step, strict=True)],
        mode="trilinear",
        align_corners=False,
    )[0, 0].numpy()
    return np.ascontiguousarray(full[: shape[0], : shape[1], : shape[2]])


@dataclass(frozen=True)
class TissueTexture:
    """Slow variation within each tissue (fat, muscle, bowel, bone): one smooth field scaled by
    each tissue's spread."""

    scales_mm: tuple[float, ...] = (5.0, 10.0, 20.0)

    def __call__(self, hu: np.ndarray, tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        amplitude = np.zeros(N_TISSUES, np.float32)
        for tissue, spread in TEXTURE_HU.items():
            amplitude[tissue] = spread * rng.uniform(0.3, 1.5)
        scale = float(rng.choice(self.scales_mm)) / VOXEL_MM
        return hu + random_field(hu.shape, "smooth", scale, rng) * amplitude[tissues]


@dataclass(frozen=True)
class TrabecularTexture:
    """Trabeculae: band-pass noise (structures of 0.8-2.5 mm) inside cancellous bone and, more
    faintly, in marrow; what makes cancellous bone mottled rather than flat."""

    def __call__(self, hu: np.ndarray, tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        spongy = (tissues == Tissue.CANCELLOUS) | (tissues == Tissue.MARROW)
        if not spongy.any():
            return hu
        box = tuple(
            slice(max(0, b.start - 4), min(n, b.stop + 4))
            for b, n in zip(bounding_box(spongy), spongy.shape, strict=True)  # type: ignore[arg-type]
        )
        scale = float(rng.choice([0.5, 0.75, 1.0]))
        band = random_field(tuple(s.stop - s.start for s in box), "band", scale, rng)
        amplitude = np.zeros(N_TISSUES, np.float32)
        amplitude[Tissue.CANCELLOUS] = rng.uniform(30.0, 160.0)
        amplitude[Tissue.MARROW] = rng.uniform(0.0, 40.0)
        out = hu.copy()
        out[box] += band * amplitude[tissues[box]]
        return out


@dataclass(frozen=True)
class MetalStreaks:
    """Beam-hardening streaks: dark and bright lines through each axial slice's metal."""

    def __call__(self, hu: np.ndarray, tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        metal = tissues == Tissue.METAL
        area = metal.sum(axis=(1, 2)) * VOXEL_MM**2
        slices = np.nonzero(area > 5.0)[0]
        if slices.size == 0:
            return hu
        out = hu.copy()
        y = np.arange(hu.shape[1], dtype=np.float32)[:, None] * VOXEL_MM
        x = np.arange(hu.shape[2], dtype=np.float32)[None, :] * VOXEL_MM
        angles = rng.uniform(0, np.pi, size=int(rng.integers(4, 10)))
        strength = rng.uniform(0.5, 1.5)
        for k in slices:
            cy, cx = (np.argwhere(metal[k]).mean(axis=0) * VOXEL_MM).astype(np.float32)
            amp = np.float32(strength * min(700.0, 45.0 * np.sqrt(area[k])))
            decay = amp / (1.0 + np.hypot(x - cx, y - cy) / 40.0)
            for i, angle in enumerate(angles):
                perp = (x - cx) * np.float32(np.sin(angle)) - (y - cy) * np.float32(np.cos(angle))
                out[k] += np.float32(1 if i % 2 else -1) * decay * np.exp(-((perp / 2.0) ** 2))
        return out


@dataclass(frozen=True)
class BiasField:
    """Slow additive drift (cupping, beam hardening): a few tens of HU over a scan."""

    max_hu: float = 30.0

    def __call__(self, hu: np.ndarray, tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        field = random_field(hu.shape, "smooth", 60.0 / VOXEL_MM, rng)
        return hu + field * np.float32(rng.uniform(0.0, self.max_hu))


@dataclass(frozen=True)
class InPlaneResolution:
    """Pixels of 0.5-1.5 mm: the slice averaged onto a coarser in-plane grid and interpolated
    back to 0.8 mm, as inference resamples such a scan (partial volume in-plane)."""

    spacing_mm: tuple[float, float] = (0.5, 1.5)

    def __call__(self, hu: np.ndarray, tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        spacing = rng.uniform(*self.spacing_mm)
        if spacing <= VOXEL_MM * 1.05:
            return hu
        factor = spacing / VOXEL_MM
        out = ndimage.uniform_filter1d(hu, max(1, round(factor)), axis=1)
        out = ndimage.uniform_filter1d(out, max(1, round(factor)), axis=2)
        return _resample_axes(out, factor, axes=(1, 2), rng=rng)


@dataclass(frozen=True)
class PointSpread:
    """The scanner's in-plane blur (reconstruction kernel and focal spot), sigma 0.3-1.1 mm."""

    sigma_mm: tuple[float, float] = (0.3, 1.1)

    def __call__(self, hu: np.ndarray, tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sigma = rng.uniform(*self.sigma_mm) / VOXEL_MM
        return ndimage.gaussian_filter(hu, (0.5 * sigma, sigma, sigma), mode="nearest")


@dataclass(frozen=True)
class CtNoise:
    """Quantum noise with the texture of a reconstruction kernel: smooth kernels correlate it
    (white noise blurred), sharp ones leave it grainy; 5-60 HU after filtering."""

    sigma_hu: tuple[float, float] = (5.0, 60.0)

    def __call__(self, hu: np.ndarray, tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return hu + self.field(hu.shape, rng)

    def field(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """One draw of the noise alone (float32, mean 0)."""
        sigma = float(np.exp(rng.uniform(*np.log(self.sigma_hu))))
        grain = float(rng.choice([0.0, 0.5, 0.8, 1.2]))
        if grain == 0.0:
            noise = rng.standard_normal(shape, dtype=np.float32)
        else:
            noise = random_field(shape, "grain", grain, rng)
        return noise * np.float32(sigma)


@dataclass(frozen=True)
class ThickSlices:
    """Reconstructed slices 0.5-5 mm thick, 0.5-5 mm apart: the volume averaged over each
    slice's profile, sampled at the slice positions and interpolated linearly back to 0.8 mm
    along z, as inference resamples a scan. Thick slices are drawn often (3 mm is common in
    hospitals, and the real extremity scans here are 3.27 mm).

    The scanner's noise (`noise`) is in each reconstructed slice: drawn on the slices after
    their averaging and interpolated back with them, as a real thick-slice scan is noisy at the
    dose and kernel it was made with. Noise drawn on the 0.8 mm voxels before the averaging
    came out two to five times quieter than real 3 mm scans (bench/phantom_vs_real.py)."""

    thickness_mm: tuple[float, float] = (0.5, 5.0)
    noise: CtNoise | None = CtNoise()

    def __call__(self, hu: np.ndarray, tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        thickness = float(rng.uniform(*self.thickness_mm))
        if rng.random() < 0.35:
            thickness = float(rng.uniform(2.5, 3.5))
        spacing = thickness * float(rng.choice([0.5, 0.8, 1.0, 1.0, 1.0]))
        noisy = self._noisy(rng)
        if thickness <= VOXEL_MM * 1.1 and spacing <= VOXEL_MM * 1.1:
            return noisy(hu)
        width = max(1, round(thickness / VOXEL_MM))
        out = ndimage.uniform_filter1d(hu, width, axis=0, mode="nearest") if width > 1 else hu
        factor = max(spacing, VOXEL_MM) / VOXEL_MM
        return _resample_axes(out, factor, axes=(0,), rng=rng, on_samples=noisy)

    def _noisy(self, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
        noise = self.noise
        if noise is None:
            return lambda slices: slices
        return lambda slices: slices + noise.field(slices.shape, rng)


@dataclass(frozen=True)
class Quantise:
    """Integer HU in the scanner's range; some scanners clip air at -1000 HU."""

    def __call__(self, hu: np.ndarray, tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        floor = -1000.0 if rng.random() < 0.3 else -1024.0
        return np.clip(np.rint(hu), floor, 3071.0)


def _resample_axes(
    hu: np.ndarray,
    factor: float,
    axes: tuple[int, ...],
    rng: np.random.Generator,
    on_samples: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Sample ``hu`` every ``factor`` voxels along ``axes`` (random phase), then interpolate
    linearly back onto every voxel. ``on_samples`` is applied to the samples in between (the
    whole volume where there is nothing to sample)."""
    on_samples = on_samples or (lambda samples: samples)
    if factor <= 1.0:
        return on_samples(hu)
    out = hu
    for axis in axes:
        n = hu.shape[axis]
        phase = rng.uniform(0, factor)
        positions = np.arange(phase, n - 1 + 1e-6, factor)
        if len(positions) < 2:
            out = on_samples(out)
            continue
        lo = np.floor(positions).astype(int)
        frac = (positions - lo).astype(np.float32)
        hi = np.minimum(lo + 1, n - 1)
        shape = [1, 1, 1]
        shape[axis] = len(positions)
        f = frac.reshape(shape)
        samples = on_samples(
            np.take(out, lo, axis=axis) * (1 - f) + np.take(out, hi, axis=axis) * f
        )
        # Back onto every voxel: linear between samples, the end samples repeated beyond.
        targets = np.clip(np.arange(n, dtype=np.float64), positions[0], positions[-1])
        index = np.clip(
            np.searchsorted(positions, targets, side="right") - 1, 0, len(positions) - 2
        )
        w = ((targets - positions[index]) / (positions[index + 1] - positions[index])).astype(
            np.float32
        )
        shape_w = [1, 1, 1]
        shape_w[axis] = n
        w = w.reshape(shape_w)
        out = (
            np.take(samples, index, axis=axis) * (1 - w)
            + np.take(samples, index + 1, axis=axis) * w
        )
    return out.astype(np.float32, copy=False)


DEFAULT_CHAIN: tuple[Transform, ...] = (
    TissueIntensities(),
    TissueTexture(),
    TrabecularTexture(),
    MetalStreaks(),
    BiasField(),
    InPlaneResolution(),
    PointSpread(),
    ThickSlices(),
    Quantise(),
)


def synthesise(
    tissues: np.ndarray,
    rng: np.random.Generator,
    chain: Sequence[Transform] = DEFAULT_CHAIN,
) -> np.ndarray:
    """A CT image (float32 HU, integer-valued) of the tissue map, drawn afresh by ``chain``."""
    hu = np.zeros(tissues.shape, np.float32)
    for transform in chain:
        hu = transform(hu, tissues, rng)
    return hu.astype(np.float32, copy=False)
