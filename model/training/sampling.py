"""Multi-scale patch sampling for training the cascade (pure numpy, no I/O).

A training sample is one patch per stage: the finest patch is centred on a joint (a bone voxel
next to another bone: femoral head in the acetabulum, knee, ankle, subtalar joint), on a bone
voxel (bone is oversampled, each bone equally often, so the small talus counts as much as the
femur), on a distractor (dense tissue that is none of the six bones: sacrum, vertebrae, patella,
foot bones, metal), on a metal implant or on a random voxel; every coarser patch contains the
finer one at a random offset aligned to its own voxel grid. Offsets are random rather than
centred because inference also places fine patches anywhere inside the coarse ones (the paper's
"all smaller patches" inference, and the fast fully-convolutional strategy). Some samples see a
truncated field of view (`field_of_view`), past which its last plane repeats. Each patch is
downsampled to the smallest patch size by block averaging; its target is the block-averaged
one-hot labels (soft targets at coarse stages).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from model.engine.network import CascadeConfig
from model.training.synthesis import synthesise


@dataclass
class TrainingCase:
    """One training volume at the model's spacing: HU (int16) and labels (uint8), (z, y, x)."""

    name: str
    hu: np.ndarray
    labels: np.ndarray
    bone_voxels: dict[int, np.ndarray]  # label -> (N, 3) sample of its voxel indices
    distractor_voxels: np.ndarray  # (N, 3) sample of dense voxels away from the six bones
    joint_voxels: np.ndarray  # (N, 3) sample of bone voxels next to another bone
    metal_voxels: np.ndarray  # (N, 3) sample of unlabelled voxels at metal density
    # Subject phantoms: the tissue map (`model.training.synthesis.Tissue`) each sample's CT is drawn
    # from afresh; `hu` is then the tissues at nominal HU, used to choose sample centres only.
    tissues: np.ndarray | None = None

    @classmethod
    def from_arrays(
        cls,
        name: str,
        hu: np.ndarray,
        labels: np.ndarray,
        rng: np.random.Generator,
        max_per_label: int = 50_000,
        tissues: np.ndarray | None = None,
    ) -> TrainingCase:
        if hu.shape != labels.shape:
            raise ValueError(f"{name}: image shape {hu.shape} differs from labels {labels.shape}")
        bone_voxels = {
            int(label): sample_voxels(labels == label, rng, max_per_label)
            for label in np.unique(labels)
            if label != 0
        }
        return cls(
            name,
            hu.astype(np.int16, copy=False),
            labels.astype(np.uint8),
            bone_voxels,
            sample_voxels(dense_background(hu, labels), rng, max_per_label),
            sample_voxels(joint_surfaces(labels), rng, max_per_label),
            sample_voxels((hu >= METAL_SAMPLE_HU) & (labels == 0), rng, max_per_label),
            None if tissues is None else tissues.astype(np.uint8, copy=False),
        )


def sample_voxels(mask: np.ndarray, rng: np.random.Generator, most: int) -> np.ndarray:
    """(N, 3) int32 indices of the True voxels of `mask`, at most `most` of them drawn at random."""
    idx = np.argwhere(mask)
    if len(idx) > most:
        idx = idx[rng.choice(len(idx), most, replace=False)]
    return idx.astype(np.int32).reshape(-1, 3)


# Distractors: unlabelled voxels at least this dense, and at least DISTRACTOR_GAP voxels from
# any labelled bone. Cancellous bone is 150-380 HU; a blurred bone surface spills dense voxels
# into the background next to it, which bone-centred samples already show.
DISTRACTOR_HU = 200
DISTRACTOR_GAP = 3


def dense_background(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Voxels that look like bone but are none of the labelled ones (bool, like `hu`).

    The whole-leg model called the sacrum and the lowest lumbar vertebra "hip bone" (0.45 M
    voxels) when training centred samples only on the six bones or anywhere: the sacrum filled
    too few samples for the model to learn it is background.
    """
    near_bone = ndimage.maximum_filter(labels > 0, size=2 * DISTRACTOR_GAP + 1)
    return (hu >= DISTRACTOR_HU) & ~near_bone


# Metal: unlabelled voxels denser than any bone (cortical bone is at most ~1900 HU in the
# phantoms, their implants 3000 HU). An implant is a few hundredths of a scan's dense tissue, so
# distractor samples seldom land on one: the session-9 weights (v8) called a hip prosthesis
# bone and missed the femur around its stem (model card).
METAL_SAMPLE_HU = 2500


# Joints: bone voxels with another bone within this many voxels (4 mm at 0.8 mm), which takes
# in the phantoms' hip, knee, ankle and subtalar joint spaces.
JOINT_GAP = 5


def joint_surfaces(labels: np.ndarray) -> np.ndarray:
    """Bone voxels with a voxel of another bone within JOINT_GAP voxels (a cube; bool).

    Where two bones nearly touch is where the labels are hardest to get right, and a bone's
    joint surface is a small share of its voxels: the session-6 run with distractor samples lost
    the femoral head's inside on hip crops (model card), the acetabulum's neighbour.
    """
    size = 2 * JOINT_GAP + 1
    nearby_max = ndimage.maximum_filter(labels, size=size)
    # Background counts as the largest label for the minimum, so it never marks a neighbour.
    nearby_min = ndimage.minimum_filter(np.where(labels > 0, labels, 255).astype(np.uint8), size)
    return (labels > 0) & ((nearby_max > labels) | (nearby_min < labels))


@dataclass
class Sample:
    images: np.ndarray  # (n_stages, S, S, S) float32, normalised HU
    targets: np.ndarray  # (n_stages, n_classes, S, S, S) float32 soft targets
    offsets: np.ndarray  # (n_stages - 1, 3) int, patch i + 1 start inside patch i (0.8 mm voxels)


def normalise_hu(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip HU to the window and scale it to about [-1, 1] (float32)."""
    lo, hi = window
    out = np.clip(hu.astype(np.float32), lo, hi)
    out -= (lo + hi) / 2
    out /= (hi - lo) / 2
    return out


# Truncated fields of view: a side of the box is cut at this many 0.8 mm voxels from the
# sample's centre (10-130 mm). The minimum exceeds the centre's jitter (8), so the bone voxel a
# sample is centred on stays in view.
FOV_CUT_VOXELS = (12, 160)


def field_of_view(
    shape: tuple[int, ...], centre: np.ndarray, rng: np.random.Generator, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds (lo, hi) of the part of the volume a sample may see.

    The whole volume, or with probability `fraction` a box whose sides are each cut, with
    probability 1/2, somewhere around the centre. Scans end anywhere: a scan of the hips cuts
    the sacrum and the iliac wings. Trained only on whole phantoms, the model had always seen
    each bone with all of its neighbours, and on a hip crop it called half a sacrum "femur".
    """
    lo, hi = np.zeros(3, dtype=np.int64), np.array(shape, dtype=np.int64)
    if rng.random() < fraction:
        cut = rng.random((2, 3)) < 0.5
        near = rng.integers(*FOV_CUT_VOXELS, size=(2, 3))
        lo = np.where(cut[0], np.maximum(lo, centre - near[0]), lo)
        hi = np.where(cut[1], np.minimum(hi, centre + near[1]), hi)
    return lo, hi


def extract(
    array: np.ndarray,
    start: Sequence[int] | np.ndarray,
    size: int | Sequence[int],
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """array[start : start + size] in 3-D (`size` one int for a cube). Outside the volume, or
    outside `bounds` (lo, hi) within it, the nearest voxel inside repeats: the last plane of a
    field of view. Training sees truncated fields of view this way, and inference pads a scan
    past its end this way (`model.engine.inference.ScaledInputs.region`)."""
    start = np.asarray(start)
    shape = np.broadcast_to(size, start.shape)
    lo, hi = bounds if bounds is not None else (0, array.shape)
    lo, hi = np.maximum(lo, 0), np.minimum(hi, array.shape)
    # The part inside (at least one plane, the nearest, for a box wholly outside), then the
    # planes it repeats before and after it.
    first = np.clip(start, lo, hi - 1)
    stop = np.clip(start + shape, first + 1, hi)
    before = np.clip(first - start, 0, shape - (stop - first))
    after = shape - before - (stop - first)
    inside = array[tuple(slice(a, b) for a, b in zip(first, stop, strict=True))]
    return np.pad(inside, list(zip(before, after, strict=True)), mode="edge")


def block_mean(x: np.ndarray, factor: int) -> np.ndarray:
    """Average over factor^3 blocks of the last three axes."""
    if factor == 1:
        return x
    *lead, d, h, w = x.shape
    blocks = x.reshape(*lead, d // factor, factor, h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(-5, -3, -1))


def soft_targets(labels: np.ndarray, n_classes: int, factor: int) -> np.ndarray:
    """Fraction of each class in every factor^3 block: (n_classes, D/f, H/f, W/f).

    Counts per block on a (D/f, H/f, W/f, f^3) view: ten times faster than averaging a float
    one-hot volume, which matters because sampling runs on the training thread.
    """
    d, h, w = (n // factor for n in labels.shape)
    blocks = labels.reshape(d, factor, h, factor, w, factor).transpose(0, 2, 4, 1, 3, 5)
    blocks = blocks.reshape(d, h, w, factor**3)
    counts = np.stack([(blocks == c).sum(-1, dtype=np.int32) for c in range(n_classes)])
    return counts.astype(np.float32) / np.float32(factor**3)


def sample_patch_starts(
    config: CascadeConfig, centre: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Start (z, y, x) of every stage's patch, coarsest first, around the finest patch's centre."""
    sizes, factors = config.patch_sizes, config.factors
    starts = [centre - sizes[-1] // 2]
    for i in reversed(range(len(sizes) - 1)):
        # Offset of patch i + 1 inside patch i: a multiple of stage i's factor.
        room = (sizes[i] - sizes[i + 1]) // factors[i]
        offset = rng.integers(0, room + 1, size=3) * factors[i]
        starts.insert(0, starts[0] - offset)
    return starts


# Subject phantoms' samples are turned, half of them, by up to 45 degrees about a random axis
# through the sample's centre: real legs lie oblique to the scanner (a flexed or abducted hip,
# a leg on a cushion, a tilted table). Real crop STS_001's femur crosses its 3.27 mm slices at
# about 45 degrees, steeper than any posed phantom's, and was called hip bone.
ROTATION_FRACTION = 0.5
MAX_ROTATION_DEG = 45.0


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix about a uniformly random axis by up to MAX_ROTATION_DEG."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(0.0, MAX_ROTATION_DEG))
    return Rotation.from_rotvec(axis * angle).as_matrix()


def rotated_regions(
    arrays: Sequence[np.ndarray],
    start: Sequence[int] | np.ndarray,
    size: int,
    centre: np.ndarray,
    rotation: np.ndarray,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """The cube ``array[start : start + size]`` of each of ``arrays`` (one shape) turned by
    ``rotation`` about ``centre`` (voxel indices, (z, y, x)): each voxel takes its nearest
    source voxel at R (p - centre) + centre, read through `extract` (so past `bounds` the last
    plane in view repeats)."""
    c = np.asarray(centre, dtype=np.float64)
    rel = [np.arange(s, s + size, dtype=np.float64) - ci for s, ci in zip(start, c, strict=True)]
    corners = np.array(np.meshgrid(*[[r[0], r[-1]] for r in rel], indexing="ij")).reshape(3, -1)
    reach = rotation @ corners
    lo = np.floor(reach.min(axis=1) + c).astype(np.int64)
    hi = np.ceil(reach.max(axis=1) + c).astype(np.int64) + 1
    # Source index along each box axis, as a sum of three broadcast 1-D terms (a full (N, 3)
    # coordinate array and its matrix product took 1 s a 128^3 patch).
    flat = np.zeros((size, size, size), np.int64)
    for a_ in range(3):
        term = (
            (rotation[a_, 0] * rel[0])[:, None, None]
            + (rotation[a_, 1] * rel[1])[None, :, None]
            + (rotation[a_, 2] * rel[2])[None, None, :]
            + (c[a_] - lo[a_])
        )
        index = np.clip(np.rint(term), 0, hi[a_] - lo[a_] - 1).astype(np.int64)
        flat *= hi[a_] - lo[a_]
        flat += index
    return [extract(array, lo, hi - lo, bounds).ravel()[flat] for array in arrays]


def draw_sample(
    case: TrainingCase,
    config: CascadeConfig,
    rng: np.random.Generator,
    bone_fraction: float = 0.67,
    truncated_fraction: float = 0.0,
    distractor_fraction: float = 0.0,
    joint_fraction: float = 0.0,
    metal_fraction: float = 0.0,
) -> Sample:
    """One multi-scale training sample from `case` (see the module docstring).

    The shares are taken in the order joint, bone, distractor, metal; a case without joints,
    dense tissue or metal gives that share to the next kind, the rest is random voxels.
    """
    draw = rng.random()
    to_distractor = joint_fraction + bone_fraction + distractor_fraction
    if len(case.joint_voxels) and draw < joint_fraction:
        centre = case.joint_voxels[rng.integers(len(case.joint_voxels))].astype(np.int64)
    elif case.bone_voxels and draw < joint_fraction + bone_fraction:
        label = rng.choice(sorted(case.bone_voxels))
        voxels = case.bone_voxels[int(label)]
        centre = voxels[rng.integers(len(voxels))].astype(np.int64)
    elif len(case.distractor_voxels) and draw < to_distractor:
        centre = case.distractor_voxels[rng.integers(len(case.distractor_voxels))].astype(np.int64)
    elif len(case.metal_voxels) and draw < to_distractor + metal_fraction:
        centre = case.metal_voxels[rng.integers(len(case.metal_voxels))].astype(np.int64)
    else:
        centre = np.array([rng.integers(0, n) for n in case.hu.shape], dtype=np.int64)
    centre = centre + rng.integers(-8, 9, size=3)
    starts = sample_patch_starts(config, centre, rng)
    bounds = field_of_view(case.hu.shape, centre, rng, truncated_fraction)
    images, targets = [], []
    # Every finer patch lies inside the coarsest: a subject phantom's CT is drawn once over
    # the coarsest patch (from its tissues) and the finer ones are windows of it.
    coarse_hu = coarse_labels = None
    if case.tissues is not None:
        size = config.patch_sizes[0]
        if rng.random() < ROTATION_FRACTION:
            rotation = random_rotation(rng)
            tissues, coarse_labels = rotated_regions(
                (case.tissues, case.labels), starts[0], size, centre, rotation, bounds
            )
        else:
            tissues = extract(case.tissues, starts[0], size, bounds)
            coarse_labels = extract(case.labels, starts[0], size, bounds)
        coarse_hu = synthesise(tissues, rng)
    for start, size, factor in zip(starts, config.patch_sizes, config.factors, strict=True):
        # Past the field of view the last plane repeats, labels with it, as inference pads
        # past a scan's end; the loss there teaches nothing wrong, and inference drops it.
        if coarse_hu is None or coarse_labels is None:
            hu = extract(case.hu, start, size, bounds)
            labels = extract(case.labels, start, size, bounds)
        else:
            hu = extract(coarse_hu, start - starts[0], size)
            labels = extract(coarse_labels, start - starts[0], size)
        images.append(block_mean(normalise_hu(hu, config.hu_window), factor))
        targets.append(soft_targets(labels, config.n_classes, factor))
    offsets = np.array([b - a for a, b in itertools.pairwise(starts)], dtype=np.int64)
    return Sample(np.stack(images), np.stack(targets), offsets.reshape(-1, 3))


def augment(sample: Sample, config: CascadeConfig, rng: np.random.Generator) -> Sample:
    """Left-right flip, intensity scale/shift and noise: what phantom variation does not cover.

    Labels are not sided, so a left-right flip is label-preserving; it mirrors every stage, and
    patch i + 1 at x-offset o inside patch i moves to s_i - s_{i+1} - o.
    """
    images, targets, offsets = sample.images, sample.targets, sample.offsets.copy()
    if rng.random() < 0.5:
        images = images[..., ::-1]
        targets = targets[..., ::-1]
        sizes = config.patch_sizes
        for i in range(len(offsets)):
            offsets[i, 2] = sizes[i] - sizes[i + 1] - offsets[i, 2]
    if rng.random() < 0.3:
        # Thick reconstructed slices resampled to 0.8 mm look blurred along z; the phantoms for
        # training are generated at 0.8 mm, so simulate it (sigma in 0.8 mm voxels).
        sigma = rng.uniform(0.5, 1.5)
        images = np.stack(
            [
                ndimage.gaussian_filter1d(img, sigma / f, axis=0) if sigma / f > 0.2 else img
                for img, f in zip(images, config.factors, strict=True)
            ]
        )
    images = images * np.float32(rng.uniform(0.9, 1.1)) + np.float32(rng.uniform(-0.03, 0.03))
    noise = rng.uniform(0.0, 0.03)
    images = images + rng.normal(0.0, noise, size=images.shape).astype(np.float32)
    return Sample(images.astype(np.float32), np.ascontiguousarray(targets), offsets)
