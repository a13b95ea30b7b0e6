"""Voxelising an :class:`~.anatomy.Anatomy` into HU and labels, slab by slab.

Each z-slab (plus a margin for the blur) is painted back to front: air, table, skin, fat, muscle,
bladder and gas, distractor bones, labelled bones, metal. Every layer is blended with its
anti-aliased coverage ``clip(0.5 - d / h)`` (partial volume), labels use the crisp voxel-centre
test ``d < 0``. Then white noise is added and the slab is blurred with the PSF, which both blurs
edges and gives the noise a CT-like correlation; the white noise is pre-scaled so that the noise
left after the blur has the requested sigma. Slabs are independent, so they run on a small thread
pool (numpy and scipy release the GIL) and stay bit-identical: each slab has its own random stream.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.phantom.anatomy import Anatomy, Part
from model.phantom.sdf import ArrayF, Block, Sdf

HU_MIN, HU_MAX = -1024, 3071
METAL_HU = 3000.0
SLAB = 40
"""Slices rendered at once: bounds the working memory (a few float32 copies of one slab)."""


@dataclass(frozen=True)
class Grid:
    """Voxel grid: numpy shape (z, y, x); spacing and origin in SimpleITK (x, y, z) order."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def coords(self, axis: int) -> np.ndarray:
        """Voxel-centre coordinates (mm) along x (0), y (1) or z (2)."""
        n = self.shape[2 - axis]
        return (self.origin[axis] + self.spacing[axis] * np.arange(n)).astype(np.float32)

    def block(self, z0: int, z1: int) -> Block:
        return Block(self.coords(0), self.coords(1), self.coords(2)[z0:z1])


@dataclass(frozen=True)
class Appearance:
    """Tissue HU, texture and scanner properties of one phantom."""

    skin: float
    fat: float
    muscle: float
    bladder: float
    cortex: float
    cancellous: float
    marrow: float
    texture_hu: float
    texture_waves: np.ndarray  # (n, 4): wave vector (rad/mm, xyz) and phase
    septa_waves: np.ndarray  # (n, 3): in-plane wave vector (rad/mm, xy) and phase
    septa_strength: float
    table_curve: float
    noise_sigma: float
    low_dose: bool
    blur_mm: float
    slice_thickness_mm: float
    streak_angles: tuple[float, ...]
    seed: int

    def blur_sigma_mm(self) -> tuple[float, float, float]:
        """PSF sigma (x, y, z): in-plane blur, and along z the slice profile (FWHM = thickness)."""
        sz = float(np.hypot(self.blur_mm, self.slice_thickness_mm / 2.355))
        return (self.blur_mm, self.blur_mm, sz)


def sample_appearance(rng: np.random.Generator, seed: int, slice_thickness_mm: float) -> Appearance:
    low_dose = bool(rng.random() < 0.1)
    noise = float(np.exp(rng.uniform(np.log(5.0), np.log(40.0)))) * (1.5 if low_dose else 1.0)
    n_waves = 3
    directions = rng.normal(size=(n_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    k = directions * (2 * np.pi / rng.uniform(2.5, 5.0, size=(n_waves, 1)))
    waves = np.concatenate([k, rng.uniform(0, 2 * np.pi, size=(n_waves, 1))], axis=1)
    return Appearance(
        skin=float(rng.uniform(20, 40)),
        fat=float(rng.uniform(-120, -80)),
        muscle=float(rng.uniform(40, 60)),
        bladder=float(rng.uniform(0, 20)),
        cortex=float(rng.uniform(1100, 1800)),
        cancellous=float(rng.uniform(150, 380)),
        marrow=float(rng.uniform(-50, 50)),
        texture_hu=float(rng.uniform(30, 90)),
        texture_waves=waves,
        septa_waves=np.concatenate(
            [
                directions[:, :2]
                / np.linalg.norm(directions[:, :2], axis=1, keepdims=True)
                * (2 * np.pi / rng.uniform(45.0, 90.0, size=(n_waves, 1))),
                rng.uniform(0, 2 * np.pi, size=(n_waves, 1)),
            ],
            axis=1,
        ),
        septa_strength=float(rng.uniform(0.3, 0.9)),
        table_curve=float(rng.uniform(0.0, 3e-4)),
        noise_sigma=noise,
        low_dose=low_dose,
        blur_mm=float(rng.uniform(0.3, 1.0)),
        slice_thickness_mm=slice_thickness_mm,
        streak_angles=tuple(float(a) for a in rng.uniform(0, np.pi, size=int(rng.integers(4, 9)))),
        seed=seed,
    )


def _coverage(d: ArrayF, h: float) -> ArrayF:
    """Anti-aliased inside fraction of a voxel of size ``h`` whose centre is at distance ``d``."""
    return np.clip(np.float32(0.5) - d * np.float32(1.0 / h), 0.0, 1.0)


def _blend(hu: ArrayF, value: ArrayF | float, alpha: ArrayF) -> None:
    """In place: hu = hu + alpha * (value - hu)."""
    hu += alpha * (value - hu)


class Renderer:
    """Paints an anatomy on a grid with an appearance; ``run`` returns (int16 HU, uint8 labels)."""

    def __init__(self, anatomy: Anatomy, grid: Grid, app: Appearance) -> None:
        self.anatomy, self.grid, self.app = anatomy, grid, app
        self.h = float(np.prod(grid.spacing) ** (1 / 3))
        sigma_mm = app.blur_sigma_mm()
        self.sigma_vox = tuple(sigma_mm[i] / grid.spacing[i] for i in (2, 1, 0))  # (z, y, x)
        self.margin = int(np.ceil(3.0 * self.sigma_vox[0])) + 1
        norm = float(np.prod([_kernel_norm(s) for s in self.sigma_vox]))
        self.white_sigma = app.noise_sigma / norm
        self.table = self._table()
        self.septa = self._septa()

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        nz = self.grid.shape[0]
        hu = np.empty(self.grid.shape, np.int16)
        labels = np.empty(self.grid.shape, np.uint8)
        starts = range(0, nz, SLAB)
        workers = max(1, min(2, os.cpu_count() or 1, len(starts)))
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(lambda z0: self._slab(z0, hu, labels), starts):
                pass
        return hu, labels

    def _slab(self, z0: int, hu_out: np.ndarray, labels_out: np.ndarray) -> None:
        nz = self.grid.shape[0]
        z1 = min(z0 + SLAB, nz)
        a, b = max(0, z0 - self.margin), min(nz, z1 + self.margin)
        block = self.grid.block(a, b)
        hu = np.full(block.shape, -1000.0, np.float32)
        labels = np.zeros(block.shape, np.uint8)
        hu[:] = self.table
        self._soft_tissue(block, hu)
        metal = np.zeros(block.shape, np.float32)
        for part in self.anatomy.parts:
            self._part(part, block, hu, labels, metal)
        self._streaks(block, hu, metal)
        rng = np.random.default_rng([self.app.seed, 101, z0])
        hu += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(self.white_sigma)
        hu = ndimage.gaussian_filter(hu, self.sigma_vox, mode="nearest", truncate=3.0)
        keep = slice(z0 - a, z1 - a)
        np.clip(np.rint(hu[keep]), HU_MIN, HU_MAX, out=hu[keep])
        hu_out[z0:z1] = hu[keep]
        labels_out[z0:z1] = labels[keep]

    def _table(self) -> ArrayF:
        """Axial image of the curved carbon-fibre table (thin shells around foam), y-x plane."""
        x = self.grid.coords(0)[None, :]
        y = self.grid.coords(1)[:, None]
        d = y - (self.anatomy.soft.table_y - self.app.table_curve * x * x)
        h = self.h
        inside_x = np.clip(0.5 + (230.0 - np.abs(x)) / h, 0, 1)
        hu = np.full(d.shape, -1000.0, np.float32)
        for top, bottom, value in ((0.0, 40.0, -900.0), (0.0, 1.5, 300.0), (38.5, 40.0, 300.0)):
            alpha = np.clip(0.5 + (d - top) / h, 0, 1) * np.clip(0.5 + (bottom - d) / h, 0, 1)
            _blend(hu, value, (alpha * inside_x).astype(np.float32))
        return hu

    def _septa(self) -> ArrayF:
        """Fat fraction of thin intermuscular fat planes (y-x image, constant along the legs).

        The planes are level sets of a sum of long in-plane waves: sheets running along z, as
        the fat between long muscles does; without them muscle would be a flat, bone-free grey.
        """
        x = self.grid.coords(0)[None, :]
        y = self.grid.coords(1)[:, None]
        f = np.zeros((len(self.grid.coords(1)), len(self.grid.coords(0))), np.float32)
        for kx, ky, phase in self.app.septa_waves.astype(np.float32):
            f += np.cos(x * kx + y * ky + phase)
        width = np.float32(0.12)
        return (np.clip(1.0 - np.abs(f) / width, 0.0, 1.0) ** 2 * self.app.septa_strength).astype(
            np.float32
        )

    def _soft_tissue(self, block: Block, hu: ArrayF) -> None:
        soft = self.anatomy.soft
        app = self.app
        d = soft.body.eval(block)
        _blend(hu, app.skin, _coverage(d, self.h))
        d += np.float32(1.5)
        _blend(hu, app.fat, _coverage(d, self.h))
        fat = np.interp(block.z, soft.fat_z, soft.fat_mm).astype(np.float32)
        d += fat[:, None, None]
        muscle = _coverage(d, self.h)
        _blend(hu, app.muscle, muscle)
        _blend(hu, app.fat, muscle * self.septa)
        if soft.bladder is not None:
            self._inside(soft.bladder, block, hu, app.bladder, muscle)
        for gas in soft.gas:
            self._inside(gas, block, hu, -950.0, muscle)

    def _inside(self, shape: Sdf, block: Block, hu: ArrayF, value: float, within: ArrayF) -> None:
        cropped = block.crop(shape.lo - 2 * self.h, shape.hi + 2 * self.h)
        if cropped is None:
            return
        sub, sl = cropped
        _blend(hu[sl], value, _coverage(shape.eval(sub), self.h) * within[sl])

    def _part(
        self, part: Part, block: Block, hu: ArrayF, labels: np.ndarray, metal: ArrayF
    ) -> None:
        cropped = block.crop(part.sdf.lo - 2 * self.h, part.sdf.hi + 2 * self.h)
        if cropped is None:
            return
        sub, sl = cropped
        d = part.sdf.eval(sub)
        inside = d < 0
        alpha = _coverage(d, self.h)
        view = hu[sl]
        if part.metal:
            _blend(view, METAL_HU, alpha)
            metal[sl] = np.maximum(metal[sl], alpha)
            labels[sl][inside] = 0
            return
        app = self.app
        _blend(view, app.cortex, alpha)
        thickness: ArrayF | float = part.cortex_mm
        interior: ArrayF | float = app.cancellous + self._texture(sub)
        if part.shaft is not None:
            w = part.shaft.weight(sub)
            thickness = part.cortex_mm + w * np.float32(part.shaft.cortex_mm - part.cortex_mm)
            interior = interior + w * (app.marrow - interior)
        _blend(view, interior, _coverage(d + thickness, self.h))
        if part.label:
            labels[sl][inside] = part.label

    def _texture(self, b: Block) -> ArrayF:
        """Trabecular-looking texture: a sum of a few random plane waves (cheap, no big noise)."""
        X, Y, Z = b.axes()
        out = np.zeros(b.shape, np.float32)
        for kx, ky, kz, phase in self.app.texture_waves.astype(np.float32):
            out += np.cos(X * kx + Y * ky + Z * kz + phase)
        return out * np.float32(self.app.texture_hu / len(self.app.texture_waves))

    def _streaks(self, block: Block, hu: ArrayF, metal: ArrayF) -> None:
        """Dark and bright streaks through the metal in each axial slice (beam hardening look)."""
        area = metal.sum(axis=(1, 2)) * np.float32(self.grid.spacing[0] * self.grid.spacing[1])
        if not np.any(area > 5.0):
            return
        x = block.x[None, :]
        y = block.y[:, None]
        for k in np.nonzero(area > 5.0)[0]:
            w = metal[k]
            total = float(w.sum())
            cx = float((w.sum(axis=0) * block.x).sum() / total)
            cy = float((w.sum(axis=1) * block.y).sum() / total)
            amp = np.float32(min(600.0, 40.0 * np.sqrt(area[k])))
            r = np.hypot(x - cx, y - cy)
            decay = amp / (1.0 + r / 40.0)
            for i, angle in enumerate(self.app.streak_angles):
                perp = (x - cx) * np.float32(np.sin(angle)) - (y - cy) * np.float32(np.cos(angle))
                sign = 1.0 if i % 2 else -1.0
                hu[k] += np.float32(sign) * decay * np.exp(-((perp / 2.0) ** 2))


def _kernel_norm(sigma: float) -> float:
    """L2 norm of the discrete 1-D Gaussian kernel (how much it shrinks white noise)."""
    delta = np.zeros(64)
    delta[32] = 1.0
    return float(np.linalg.norm(ndimage.gaussian_filter1d(delta, sigma, truncate=3.0)))
