"""Label clean-up after inference: spurious islands, and the left/right split."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from model.labels import BONE_NAMES, Side, sided_label
from model.metrics import bounding_box
from model.volume_io import Volume

BODY_HU = -400  # above: body or table, below: air
FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def _touches_edge(region: tuple[slice, ...], shape: tuple[int, ...]) -> bool:
    return any(r.start == 0 or r.stop == n for r, n in zip(region, shape, strict=True))


def _neighbour_label(labels: np.ndarray, region: tuple[slice, ...], island: np.ndarray) -> int:
    """Most common other bone label on the one-voxel ring around `island`, else background."""
    grown = tuple(
        slice(max(0, r.start - 1), min(n, r.stop + 1))
        for r, n in zip(region, labels.shape, strict=True)
    )
    frame = np.zeros([g.stop - g.start for g in grown], dtype=bool)
    frame[
        tuple(
            slice(r.start - g.start, r.stop - g.start) for r, g in zip(region, grown, strict=True)
        )
    ] = island
    ring = ndimage.binary_dilation(frame, FULL_CONNECTIVITY) & ~frame
    values = labels[grown][ring]
    own = labels[region][island][0]
    values = values[(values != 0) & (values != own)]
    return int(np.bincount(values).argmax()) if values.size else 0


def slice_label_counts(labels: np.ndarray, n: int) -> np.ndarray:
    """(slices, n): voxels of each label value 1..n-1 in each slice (column 0, background, is
    not counted). One bincount a slice, within the bounding box of the labels only: bone is a
    few per cent of a CT, and no full-volume mask per label is made."""
    counts = np.zeros((len(labels), n), dtype=np.int64)
    box = bounding_box(labels)
    if box is not None:
        for z, plane in enumerate(labels[box], start=box[0].start):
            counts[z] = np.bincount(plane.ravel(), minlength=n)[:n]
        counts[:, 0] = 0
    return counts


def label_counts(labels: np.ndarray, slab: int = 16) -> np.ndarray:
    """Voxels of each value 1..255 of a uint8 volume (index 0 is not counted).

    Slab by slab, and only the non-zero voxels: bincount widens to int64, and bone is a few
    per cent of a CT, so this is ~10x faster than counting every voxel (0.1 s for 1400 slices).
    """
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, len(labels), slab):
        block = labels[start : start + slab]
        counts += np.bincount(block[block != 0], minlength=256)
    return counts


def segment_summary(sided: Volume, unsure: np.ndarray | None = None) -> list[dict[str, object]]:
    """Each sided bone present in a sided label volume (model.labels.sided_label): its bone,
    side, voxels and millilitres on the volume's grid; with `unsure` (a mask on that grid:
    voxels the model was unsure of), the percentage of its voxels in it."""
    counts = label_counts(sided.array)
    unsure_counts = None if unsure is None else np.bincount(sided.array[unsure], minlength=256)
    return counts_summary(counts, sided.spacing, unsure_counts)


def counts_summary(
    counts: np.ndarray,
    spacing: tuple[float, float, float],
    unsure_counts: np.ndarray | None = None,
) -> list[dict[str, object]]:
    """`segment_summary` from voxel counts per sided label (`label_counts`) on a grid of
    `spacing`: the difference of two volumes' counts summarises what one lost, with no copy of
    either."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    summary: list[dict[str, object]] = []
    for bone, name in BONE_NAMES.items():
        for side in Side:
            label = sided_label(bone, side)
            if not counts[label]:
                continue
            entry: dict[str, object] = {
                "label": int(bone),
                "sided_label": label,
                "bone": name,
                "side": side.name.lower(),
                "voxels": int(counts[label]),
                "volume_ml": round(float(counts[label]) * voxel_ml, 2),
            }
            if unsure_counts is not None:
                entry["unsure_percent"] = round(100.0 * unsure_counts[label] / counts[label], 1)
            summary.append(entry)
    return summary


def bone_pieces(labels: np.ndarray) -> Iterator[tuple[int, tuple[slice, ...], np.ndarray]]:
    """(bone, bounding box, mask in that box) of every 26-connected piece of every bone, bone
    by bone and each bone's pieces in scan order.

    One multi-label connected-components pass (cc3d) finds the pieces of all bones at once.
    Labelling each bone within its bounding box instead cost seconds a bone on a whole-leg
    scan, because scattered specks make every box the whole volume. The pass runs within the
    bounding box of all bone (28 % of the grid on the whole-leg phantom's hip slab): it and
    `find_objects` cost in proportion to the voxels they see (scipy's `find_objects` takes a
    third of the time of `cc3d.statistics` for the boxes).
    """
    bone_box = bounding_box(labels)
    if bone_box is None:
        return
    labels = labels[bone_box]
    components = cc3d.connected_components(labels, connectivity=26)
    boxes = ndimage.find_objects(components)
    pieces = []
    for index, box in enumerate(boxes, start=1):
        # A piece has a voxel in its box's first plane: look for its bone there only.
        plane = (box[0].start, box[1], box[2])
        pieces.append((int(labels[plane][components[plane] == index][0]), index))
    for bone, index in sorted(pieces):
        box = boxes[index - 1]
        whole = tuple(
            slice(b.start + o.start, b.stop + o.start) for b, o in zip(box, bone_box, strict=True)
        )
        yield bone, whole, components[box] == index


# A piece of bone holds bone: cortex (700+ HU) or at least cancellous bone (100-400 HU). A piece
# whose 90th HU percentile is below this is soft tissue the model called bone (the step-8000
# weights labelled a 40 HU cylinder of soft tissue in air).
MIN_BONE_HU = 150.0


def remove_islands(labels: np.ndarray, min_voxels: int, hu: np.ndarray | None = None) -> np.ndarray:
    """Drop connected components of a bone smaller than `min_voxels` (the paper's Figure 9),
    and, given the `hu` on the same grid, components with no bone density (`MIN_BONE_HU`).

    A small island that touches another bone takes that bone's label (a fragment of the
    tibia called femur is tibia); one surrounded by soft tissue becomes background. Components
    touching the edge of the field of view are kept whatever their size: a bone cut by the scan
    is not spurious. A component without bone density becomes background wherever it is.
    """
    out = labels.copy()
    for _, region, island in bone_pieces(labels):
        if hu is not None and np.percentile(hu[region][island], 90) < MIN_BONE_HU:
            out[region][island] = 0
            continue
        if _touches_edge(region, labels.shape) or int(island.sum()) >= min_voxels:
            continue
        out[region][island] = _neighbour_label(out, region, island)
    return out


# A piece of one side's bone lying further than this from that bone's largest piece, and under
# this share of its voxels, is something else the model called that bone. On the 45 phantom
# crops 2001-2045 every piece further than 14 mm from its bone was false, 20-105 mm
# away (a cut sacrum called femur, 2.6 k voxels 74 mm from the femur; metal near a knee); the
# one true piece beyond 5 mm was a hip bone's part cut off by the crop, 13.5 mm away. A bone
# cut in two by the field of view, or a fracture, mostly leaves pieces closer or larger than
# this; a small fragment displaced further would be left out (model/MODEL_CARD.md says so).
DETACHED_MM = 30.0
DETACHED_FRACTION = 0.1


def remove_detached(sided: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Set to background, in place, the pieces of each sided bone that lie more than
    `DETACHED_MM` from the bone's largest piece and hold under `DETACHED_FRACTION` of its
    voxels (an isotropic grid of `spacing_mm`). Returns the voxels removed per label value (256,
    as `label_counts`). In place: a copy of a whole-leg scan's labels is 0.4 GB."""
    removed = np.zeros(256, dtype=np.int64)
    # bone_pieces gives each label's pieces together.
    for label, group in itertools.groupby(bone_pieces(sided), key=lambda item: item[0]):
        found = [(region, piece) for _, region, piece in group]
        if len(found) < 2:
            continue
        sizes = [int(piece.sum()) for _, piece in found]
        largest = int(np.argmax(sizes))
        region, piece = found[largest]
        surface = piece & ~ndimage.binary_erosion(piece)
        tree = cKDTree((np.argwhere(surface) + [r.start for r in region]) * spacing_mm)
        for (region, piece), size in zip(found, sizes, strict=True):
            if size >= DETACHED_FRACTION * sizes[largest]:
                continue  # the largest piece too
            points = (np.argwhere(piece) + [r.start for r in region]) * spacing_mm
            nearest, _ = tree.query(points, distance_upper_bound=DETACHED_MM)
            if np.isinf(nearest).all():
                sided[region][piece] = 0
                removed[label] += size
    return removed


def body_midline_x(hu: np.ndarray, grid: sitk.Image, stride: int = 4) -> float:
    """Patient-x (LPS, mm) of the body's centre: the plane that separates left from right.

    The centre of everything denser than air is used rather than x = 0 because patients lie
    off-centre on the table; the table itself is symmetric about the body's centre line well
    enough for this purpose.
    """
    sub = np.asarray(hu)[::stride, ::stride, ::stride]
    idx = np.argwhere(sub > BODY_HU) * stride
    if idx.size == 0:
        idx = np.array([[s // 2 for s in hu.shape]])
    centre = idx.mean(axis=0)[::-1]  # (x, y, z) index order
    return float(grid.TransformContinuousIndexToPhysicalPoint(centre.tolist())[0])


# Bone spread along patient x (1st to 99th percentile) above which a scan shows both legs.
# One leg's bones span at most ~150 mm (a hip bone with its iliac wing); both legs' femoral
# heads alone are ~170 mm apart.
BILATERAL_SPREAD_MM = 160.0
# A bone component with more than this fraction on each side of the midline is two bones
# that touch (the hip bones at the pubic symphysis) and is split at the midline.
STRADDLE_FRACTION = 0.25


def _patient_x(grid: sitk.Image, box: tuple[slice, ...]) -> np.ndarray:
    """Patient x (LPS, mm) of the voxels in `box` (k, j, i slices), broadcastable to it.

    Per box, not per volume: a float64 map of a whole scan at 0.8 mm is gigabytes."""
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    step = direction[0] * np.array(grid.GetSpacing())  # x change per (i, j, k) index step
    k, j, i = np.ogrid[box[0], box[1], box[2]]
    return grid.GetOrigin()[0] + step[0] * i + step[1] * j + step[2] * k


def sides_midline_x(labels: np.ndarray, hu: np.ndarray, grid: sitk.Image) -> float:
    """The patient-x plane between the right and the left side for this scan.

    Both legs in view: the body's centre. One leg only (bone spread under
    `BILATERAL_SPREAD_MM`): the body's centre would run through that leg, so x = 0 is used,
    the scanner's isocentre, near which patients are centred; a single leg scanned at the
    isocentre itself cannot be sided from the image (a DICOM Laterality would be needed).
    """
    stride = 4
    bone = np.argwhere(labels[::stride, ::stride, ::stride] > 0) * stride
    if len(bone):
        direction = np.array(grid.GetDirection()).reshape(3, 3)
        step = direction[0] * np.array(grid.GetSpacing())
        bone_x = bone[:, ::-1] @ step  # (i, j, k) . step; the origin cancels in a spread
        low, high = np.percentile(bone_x, [1, 99])
        if high - low < BILATERAL_SPREAD_MM:
            return 0.0
    return body_midline_x(hu, grid)


def split_sides(labels: np.ndarray, hu: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Sided labels (1..6 right, 7..12 left), one connected bone at a time.

    Each connected component of a bone goes wholly to the side of the midline (see
    `sides_midline_x`) that holds most of it, so that a femur is never half left and half
    right; a component with a large share on both sides (hip bones touching at the
    symphysis) is split at the midline.
    """
    midline = sides_midline_x(labels, hu, grid)
    sided = labels.copy()
    for bone, region, component in bone_pieces(labels):
        is_left = np.broadcast_to(_patient_x(grid, region) > midline, component.shape)[component]
        fraction_left = float(is_left.mean())
        target = sided[region]
        if min(fraction_left, 1 - fraction_left) > STRADDLE_FRACTION:
            target[component] = np.where(is_left, sided_label(bone, Side.LEFT), bone)
        elif fraction_left > 0.5:
            target[component] = sided_label(bone, Side.LEFT)
    return sided
