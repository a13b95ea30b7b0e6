"""Segmentation metrics of the paper (Kuiper et al. 2022, section 2.5.1): DSC, MASD, HD, HD95.

Conventions, fixed here so that every number the project reports means the same thing:

* Arrays are numpy (z, y, x); `spacing` is SimpleITK (x, y, z) in millimetres, as in
  `model.volume_io.Volume`. Distances honour anisotropic spacing.
* A mask's *surface* is its set of voxels with at least one face neighbour (6-connectivity)
  outside the mask (`sitk.LabelContour`, fullyConnected=False). Voxels beyond the array edge
  count as outside, so an object cut by the scan's field of view has a surface there too.
* Surface distances are Euclidean distances between surface voxel centres, from each surface
  voxel of one mask to the nearest surface voxel of the other (`sitk.SignedMaurerDistanceMap`
  on the contour image). Both directions are pooled into one set of |S_A| + |S_B| distances:
  - MASD, the symmetric mean absolute surface distance, is the mean of the pooled set,
    (sum_{a in S_A} d(a, S_B) + sum_{b in S_B} d(b, S_A)) / (|S_A| + |S_B|). This weights
    each surface voxel equally; it is not the mean of the two directed means, which differs
    from it when the surfaces have different sizes.
  - HD, the Hausdorff distance, is the maximum of the pooled set.
  - HD95 is the 95th percentile of the pooled set (numpy's default linear interpolation). It
    is the paper's robust variant: a few spurious voxels far away move HD but hardly HD95.
* Edge cases: both masks empty agree perfectly (Dice 1, distances 0); exactly one empty has
  Dice 0 and infinite distances (there is no surface to measure to). Callers that write JSON
  must map non-finite values to null (`model.evaluation.compare` does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from model.labels import BONE_NAMES

Spacing = tuple[float, float, float]

# Per-bone metric keys, in the paper's table order; shared with model.evaluation.
METRIC_KEYS = ("dice", "masd_mm", "hd95_mm", "hd_mm")


@dataclass(frozen=True)
class SurfaceMetrics:
    """Symmetric surface distances in millimetres (see the module docstring)."""

    masd_mm: float
    hd95_mm: float
    hd_mm: float


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice similarity coefficient 2|A∩B| / (|A|+|B|) of two boolean masks of equal shape.

    Two empty masks return 1.0: both agree that the structure is absent, and returning NaN
    would poison means over bones that some scans do not contain.
    """
    a, b = _as_masks(a, b)
    total = np.count_nonzero(a) + np.count_nonzero(b)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(a & b) / total


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Spacing
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (from each surface voxel of a to b's surface, b to a).

    Both masks must be non-empty. The work is done on the bounding box of a ∪ b padded with
    one voxel of background, which is exact (the distance transform is computed in physical
    space and only surface voxels, all inside the box, are sampled) and keeps whole-body label
    maps fast: a bone's box is a small part of a 512x512x1400 scan.
    """
    a, b = _as_masks(a, b)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    box = bounding_box(a | b)
    assert box is not None  # both masks are non-empty
    surface_a = _surface(a[box], spacing)
    surface_b = _surface(b[box], spacing)
    a_to_b = _distance_to(surface_b)[sitk.GetArrayViewFromImage(surface_a).astype(bool)]
    b_to_a = _distance_to(surface_a)[sitk.GetArrayViewFromImage(surface_b).astype(bool)]
    return a_to_b, b_to_a


def surface_metrics(a: np.ndarray, b: np.ndarray, spacing: Spacing) -> SurfaceMetrics:
    """MASD, HD95 and HD in mm of two boolean masks, with the module's edge-case rules."""
    a, b = _as_masks(a, b)
    a_any, b_any = bool(a.any()), bool(b.any())
    if not a_any and not b_any:
        return SurfaceMetrics(0.0, 0.0, 0.0)
    if a_any != b_any:
        return SurfaceMetrics(math.inf, math.inf, math.inf)
    pooled = np.concatenate(surface_distances(a, b, spacing))
    return SurfaceMetrics(
        masd_mm=float(pooled.mean()),
        hd95_mm=float(np.percentile(pooled, 95)),
        hd_mm=float(pooled.max()),
    )


def evaluate_labels(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Spacing,
    labels: Mapping[int, str] = BONE_NAMES,
) -> dict:
    """Per-label metrics of two integer label maps on the same grid, and their mean.

    Returns {"bones": {name: {"label", "dice", "masd_mm", "hd95_mm", "hd_mm", "truth_voxels",
    "pred_voxels"}}, "mean": {metric: value, "n_bones": n}}. The mean is over the labels
    present in the truth, as in the paper: a bone outside a scan's field of view is no error,
    but a present bone the prediction misses has infinite distances and so an infinite mean.
    Labels predicted where the truth has none show in their own row (Dice 0, distances inf)
    and do not enter the mean. The mean is NaN when the truth holds none of the labels.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} vs {truth.shape}")
    for name, array in (("pred", pred), ("truth", truth)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} is not an integer label map (dtype {array.dtype})")
    if any(int(value) <= 0 for value in labels):
        raise ValueError(f"label values must be positive (0 is background): {list(labels)}")
    pred_boxes = _label_boxes(pred, labels)
    truth_boxes = _label_boxes(truth, labels)

    bones: dict[str, dict] = {}
    for value, name in labels.items():
        box = _union_box(pred_boxes[value], truth_boxes[value])
        if box is None:  # absent from both: compare two empty masks
            p = t = np.zeros((1, 1, 1), dtype=bool)
        else:
            p, t = pred[box] == value, truth[box] == value
        bones[name] = {
            "label": int(value),
            "dice": dice(p, t),
            **asdict(surface_metrics(p, t, spacing)),
            "truth_voxels": int(np.count_nonzero(t)),
            "pred_voxels": int(np.count_nonzero(p)),
        }

    present = [row for row in bones.values() if row["truth_voxels"] > 0]
    mean: dict[str, float | int] = {
        key: float(np.mean([row[key] for row in present])) if present else math.nan
        for key in METRIC_KEYS
    }
    mean["n_bones"] = len(present)
    return {"bones": bones, "mean": mean}


def bounding_box(
    mask: np.ndarray, within: tuple[slice, ...] | None = None
) -> tuple[slice, ...] | None:
    """Smallest box (one slice per axis) holding every non-zero voxel of `mask`, or of
    `mask[within]` (slices with explicit starts; the box is in `mask`'s own indices); None
    when there is none."""
    within = within or tuple(slice(0, n) for n in mask.shape)
    inside = mask[within]
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(i for i in range(mask.ndim) if i != axis)
        hits = np.flatnonzero(inside.any(axis=other_axes))
        if hits.size == 0:
            return None
        start = within[axis].start
        box.append(slice(start + int(hits[0]), start + int(hits[-1]) + 1))
    return tuple(box)


def _as_masks(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    return a, b


def _surface(mask: np.ndarray, spacing: Spacing) -> sitk.Image:
    """Surface voxels of a mask as a binary image; one voxel of padding makes the array edge
    count as outside (LabelContour ignores neighbours beyond the image)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    image = sitk.GetImageFromArray(padded)
    image.SetSpacing([float(s) for s in spacing])
    return sitk.LabelContour(image, fullyConnected=False, backgroundValue=0)


def _distance_to(surface: sitk.Image) -> np.ndarray:
    """Distance in mm from every voxel to the nearest voxel of a surface image."""
    distance = sitk.SignedMaurerDistanceMap(
        surface, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    distance = np.abs(sitk.GetArrayFromImage(distance))
    # The surface itself is at distance 0; the float32 transform leaves ~1e-7 mm there with
    # anisotropic spacing, which would make identical masks look (very slightly) different.
    distance[sitk.GetArrayViewFromImage(surface).astype(bool)] = 0.0
    return distance


def _label_boxes(
    label_map: np.ndarray, labels: Mapping[int, str]
) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box of every label in one pass over the volume (scipy's find_objects)."""
    boxes = ndi.find_objects(label_map, max_label=max(labels, default=0))
    return {value: boxes[int(value) - 1] for value in labels}


def _union_box(
    a: tuple[slice, ...] | None, b: tuple[slice, ...] | None
) -> tuple[slice, ...] | None:
    if a is None or b is None:
        return a if b is None else b
    return tuple(
        slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True)
    )
