"""The grids of patch-wise inference: boxes and windows over a volume, the stages' inputs made
box by box, and predictions moved between the stages' grids (pure functions on arrays and
tensors, tested on synthetic ones in tests/test_inference.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from model.engine.network import CascadeConfig
from model.metrics import bounding_box
from model.training.sampling import extract, normalise_hu

Box = tuple[slice, slice, slice]


def as_box(slices: Iterable[slice]) -> Box:
    """Three slices, one per axis of a 3-D grid, as a Box."""
    z, y, x = slices
    return z, y, x


def ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ScaledInputs:
    """The network's input for every stage: normalised HU averaged over the stage's voxel size,
    made box by box from the int16 grid when asked for.

    Whole float32 grids would cost 4 bytes a voxel (1.5 GB for a whole-leg scan, twice that
    while normalising) where the fine stages read a few boxes of it.
    """

    def __init__(self, hu: np.ndarray, config: CascadeConfig, padded: tuple[int, ...]):
        if any(p % f for p in padded for f in config.factors):
            raise ValueError(f"padded shape {padded} is not a multiple of {config.factors}")
        self.hu, self.config, self.padded = hu, config, padded

    def shape(self, stage: int) -> tuple[int, ...]:
        return tuple(n // self.config.factors[stage] for n in self.padded)

    def region(self, stage: int, box: Box) -> Tensor:
        """The stage's input over `box` (its own grid). Beyond the scan's end (the padding up to
        whole patches) the scan's last plane repeats, not air: cut through a hip, a wall of air
        at the cut made the hip crops' labels worse (bench/README.md)."""
        f = self.config.factors[stage]
        hu = extract(self.hu, [b.start * f for b in box], [(b.stop - b.start) * f for b in box])
        x = torch.from_numpy(normalise_hu(hu, self.config.hu_window))
        return x if f == 1 else F.avg_pool3d(x[None, None], f)[0, 0]


def most_probable(probs: Tensor) -> tuple[Tensor, Tensor]:
    """The most probable class of each voxel of (C, D, H, W) probabilities and its probability,
    both as uint8 (the probability in percent); the first class on ties, as `torch.argmax`.

    One comparison per class: 4x faster than `argmax` over the class axis on CPU, which walks
    the seven values of each voxel one voxel at a time.
    """
    best = probs[0].clone()
    labels = torch.zeros(probs.shape[1:], dtype=torch.uint8)
    for c in range(1, len(probs)):
        better = probs[c] > best
        labels.masked_fill_(better, c)
        torch.where(better, probs[c], best, out=best)
    return labels, best.mul_(100).round_().to(torch.uint8)


def window_starts(n: int, size: int, stride: int, multiple: int) -> list[int]:
    """Starts of the windows of `size` voxels over an axis of `n`, each a multiple of `multiple`.

    Tiling (`stride == size`): from 0, `size` apart, the last reaching past the end. Overlapping:
    as few windows as keep neighbours at most about `stride` apart, spread evenly from 0 to the
    last, flush with the axis' end (rounded up to `multiple`), so that windows see as little
    padding past the scan as the grid allows, as `fast`'s first stage does.
    """
    if stride == size or n <= size:
        return list(range(0, n, size)) or [0]
    last = ceil_to(n - size, multiple)
    gaps = -(-(n - size) // stride)
    return [round(i * last / gaps / multiple) * multiple for i in range(gaps + 1)]


def patch_box(start: tuple[int, ...], size: int) -> Box:
    """The cube of `size` voxels from `start`."""
    return tuple(slice(int(a), int(a) + size) for a in start)  # type: ignore[return-value]


def window_weight(size: int, overlapping: bool) -> Tensor:
    """(S, S, S) weight of a window's (or patch's) voxels where they overlap: a Gaussian around
    its centre with sigma S/8 (nnU-Net's), largest 1, since a window's centre has seen the most
    context; ones where they only tile."""
    if not overlapping:
        return torch.ones((size,) * 3)
    axis = torch.exp(-0.5 * ((torch.arange(size) - (size - 1) / 2) / (size / 8)) ** 2)
    axis /= axis.max()
    return axis[:, None, None] * axis[None, :, None] * axis[None, None, :]


def refine_mask(labels: Tensor, probs: Tensor, band: int, certainty: float) -> Tensor:
    """Where the next stage must look: within `band` voxels (a cube) of a label change, or where
    no class reaches `certainty`. `labels` (D, H, W) uint8 and `probs` (C, D, H, W) on one grid.
    """
    # Max and min filters on uint8 are separable in scipy: 5x faster than max-pooling a
    # float copy of the grid (17 s on a whole-leg scan's stage-2 grid, 2 cores).
    k = 2 * band + 1
    grid = labels.numpy()
    changes = ndimage.maximum_filter(grid, k, mode="nearest") != ndimage.minimum_filter(
        grid, k, mode="nearest"
    )
    sure = (probs >= certainty).any(0)
    return torch.from_numpy(changes) | ~sure


def cover_boxes(mask: np.ndarray, cost: Callable[[Box], int]) -> list[Box]:
    """Disjoint boxes holding every True voxel of `mask`, at a low total `cost`.

    A box is cut across its longest side at a quarter, the middle or three quarters, whichever
    leaves the cheapest two parts, each shrunk to the True voxels in it; the parts are covered
    the same way, and the cut stands if they cost less than the box. The refine band of a bone
    is a thin shell: a box around it is mostly the bone's inside, yet every part cut off costs
    its own halo. On a hip slab this covers the finest stage's band with 30 % fewer voxels than
    boxes around each slab's connected band.
    """
    whole = bounding_box(mask)
    return [] if whole is None else _cover(mask, as_box(whole), cost)


def _cover(mask: np.ndarray, box: Box, cost: Callable[[Box], int]) -> list[Box]:
    lengths = [b.stop - b.start for b in box]
    axis = int(np.argmax(lengths))
    # Short or mostly-True boxes gain nothing from cuts that each add a halo.
    if lengths[axis] < 8 or mask[box].mean() > 0.5:
        return [box]
    best: tuple[int, list[Box]] | None = None
    for fraction in (0.25, 0.5, 0.75):
        cut = box[axis].start + round(lengths[axis] * fraction)
        parts = [
            as_box(part)
            for side in (slice(box[axis].start, cut), slice(cut, box[axis].stop))
            if (part := bounding_box(mask, (*box[:axis], side, *box[axis + 1 :]))) is not None
        ]
        total = sum(cost(p) for p in parts)
        if best is None or total < best[0]:
            best = (total, parts)
    assert best is not None
    boxes = [b for part in best[1] for b in _cover(mask, part, cost)]
    return boxes if sum(cost(b) for b in boxes) < cost(box) else [box]


def inner(core: Box, region: Box) -> Box:
    """The core's position inside its input region."""
    return as_box(
        slice(c.start - r.start, c.stop - r.start) for c, r in zip(core, region, strict=True)
    )


def split_box(box: Box, max_voxels: int) -> list[Box]:
    """Halve a box along its longest axis until each part has at most `max_voxels` voxels,
    which bounds the memory one network call takes."""
    lengths = [b.stop - b.start for b in box]
    if int(np.prod(lengths)) <= max_voxels or max(lengths) < 2:
        return [box]
    axis = int(np.argmax(lengths))
    middle = box[axis].start + lengths[axis] // 2
    halves = []
    for part in (slice(box[axis].start, middle), slice(middle, box[axis].stop)):
        halves += split_box(as_box(part if a == axis else b for a, b in enumerate(box)), max_voxels)
    return halves


def fit_multiple(lo: int, hi: int, limit: int, multiple: int) -> tuple[int, int]:
    """Grow [lo, hi) to a length that is a multiple of `multiple`, staying inside [0, limit).

    The grids inference runs on are padded to multiples of 32, so the length always fits."""
    length = ceil_to(hi - lo, multiple)
    hi = min(limit, lo + length)
    return max(0, hi - length), hi


def upsample_nearest(labels: Tensor, ratio: int) -> Tensor:
    if ratio == 1:
        return labels.clone()
    return (
        labels.repeat_interleave(ratio, 0).repeat_interleave(ratio, 1).repeat_interleave(ratio, 2)
    )


def upsample_probs(probs: Tensor, ratio: int, slab: int = 16) -> Tensor:
    """Trilinear upsampling of a (C, D, H, W) probability grid, slab by slab (bounded memory)."""
    c, d, h, w = probs.shape
    out = torch.empty((c, d * ratio, h * ratio, w * ratio), dtype=probs.dtype)
    for z0 in range(0, d, slab):
        z1 = min(d, z0 + slab)
        lo, hi = max(0, z0 - 1), min(d, z1 + 1)
        up = F.interpolate(
            probs[None, :, lo:hi].float(), scale_factor=ratio, mode="trilinear", align_corners=False
        )[0]
        # Slab borders: the extra context slice on each side makes the slab seamless.
        out[:, z0 * ratio : z1 * ratio] = up[:, (z0 - lo) * ratio : (z1 - lo) * ratio].to(out.dtype)
    return out


def crop_upsampled(probs: Tensor, region: Box, ratio: int) -> Tensor:
    """Trilinear upsampling of `probs` (coarser grid) evaluated on a finer-grid region."""
    starts = [r.start for r in region]
    size = [r.stop - r.start for r in region]
    lo = [a // ratio - 1 for a in starts]
    hi = [-(-r.stop // ratio) + 1 for r in region]
    # Crop (clamped to the grid) first, then replicate-pad just the crop: converting or padding
    # the whole grid per box would cost more than the network.
    inside = tuple(
        slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, probs.shape[1:], strict=True)
    )
    pad = []
    for axis in (2, 1, 0):  # F.pad orders the last axis first
        pad += [inside[axis].start - lo[axis], hi[axis] - inside[axis].stop]
    crop = F.pad(probs[(slice(None), *inside)][None].float(), pad, mode="replicate")
    up = F.interpolate(crop, scale_factor=ratio, mode="trilinear", align_corners=False)[0]
    off = [a - (b * ratio) for a, b in zip(starts, lo, strict=True)]
    return up[:, off[0] : off[0] + size[0], off[1] : off[1] + size[1], off[2] : off[2] + size[2]]
