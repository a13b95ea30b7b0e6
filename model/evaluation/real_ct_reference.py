"""A bone reference derived from real CT by a stated threshold method, and scores of a label map
against it (`bench/real_ct.py`, `tests/test_real_ct.py`).

Real scans here carry no bone labels (`../shared/data/real_ct/README.md`), so the reference is
*derived*: what a threshold calls bone, not what a radiologist would draw. `METHOD` states it in
words; the JSON and `bench/README.md` carry that text next to the scores. It is bone against
background only: which bone a voxel belongs to is not derived, but read off the images by eye
for each crop (`bench/real_ct.py`, `EXPECTED`).

Arrays are numpy (z, y, x) with z the axial slice; `spacing` is SimpleITK (x, y, z) in mm, as in
`model.volume_io.Volume`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from model.labels import BONE_NAMES
from model.metrics import dice

Spacing = tuple[float, float, float]

BONE_HU = 200  # cortical and most cancellous bone; marrow fat and muscle stay below
MIN_COMPONENT_ML = 2.0  # as the crops' own bounding box was made (real_ct/README.md)
# A hole of a bone's cross-section up to this area is marrow or cancellous bone below BONE_HU
# and is filled: the largest seen in the crops is 26 cm² (distal femur at the knee). A larger
# enclosed region would be a body cavity closed by a ring of bone (the pelvis), not bone.
MAX_HOLE_CM2 = 30.0
# Truncation artefact: where the body reaches past the reconstructed field of view, HU climb
# towards its edge (STS_005: from soft tissue to 1900 HU over the last 9 mm, 3071 at the edge)
# and streaks above BONE_HU reach 20-25 mm in. Bone within this distance of the field's edge is
# not believed, in the reference or in the model's labels: both are left out of every score.
FOV_MARGIN_MM = 20.0
SATURATED_HU = 3071  # the scanner's ceiling (12-bit): metal or the truncation rim, never bone
# The body: tissue above BODY_HU, opened in-plane by BODY_OPENING_MM so that the thin sheets of
# the table and of positioning aids come apart from it; its largest 3-D piece is the body.
BODY_HU = -400
BODY_OPENING_MM = 3.0
# A bone component with less than half its voxels in the body is the table or a positioning aid.
MIN_SHARE_IN_BODY = 0.5
# A crop is a *shaft crop* when its reference is one component that reaches through at least
# SHAFT_MIN_SLICE_SHARE of the crop's slices and is one piece (8-connected, holes filled) in at
# least SHAFT_MIN_ONE_PIECE_SHARE of the slices it is in: one tube, not two bones side by side
# (tibia and fibula) or a joint (femoral head in the acetabulum).
SHAFT_MIN_SLICE_SHARE = 0.8
SHAFT_MIN_ONE_PIECE_SHARE = 0.9
# Model bone this close to the reference is not counted as false: the threshold's edge and the
# model's both sit in partial volume, one slice (3.27 mm) thick along z.
FALSE_BONE_MARGIN_VOXELS = (1, 2, 2)  # (z, y, x)
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

METHOD = (
    f"Bone reference (derived, not manual): CT >= {BONE_HU} HU without smoothing; "
    f"6-connected components of >= {MIN_COMPONENT_ML:g} ml; components with under "
    f"{MIN_SHARE_IN_BODY:.0%} of their voxels inside the body are dropped as table or positioning "
    f"aids (body: the largest 3-D piece of CT > {BODY_HU} HU after an in-plane opening of "
    f"{BODY_OPENING_MM:g} mm, holes filled per slice); each component's holes are filled per "
    f"axial slice (2-D, holes up to {MAX_HOLE_CM2:g} cm²: marrow and cancellous bone; a bone "
    f"cut by the scan's edge is closed along the edge between the points where it meets it). "
    f"Left out of the reference and of every score: voxels within {FOV_MARGIN_MM:g} mm in-plane "
    f"of the reconstructed field of view's edge (columns holding the scan's minimum value in "
    f"every slice; the truncation rim) and voxels at {SATURATED_HU} HU or more. Shaft crop: one "
    f"reference component spanning >= {SHAFT_MIN_SLICE_SHARE:.0%} of the slices and one "
    f"8-connected piece in >= {SHAFT_MIN_ONE_PIECE_SHARE:.0%} of its slices; scored by any-bone "
    f"Dice and by the model's majority label inside it. Other crops: bone recall (share of "
    f"reference voxels the model labels as any bone) and false-bone share (share of the model's "
    f"bone voxels outside the reference dilated by {FALSE_BONE_MARGIN_VOXELS[0]} slice and "
    f"{FALSE_BONE_MARGIN_VOXELS[1]} voxels in-plane)."
)


@dataclass(frozen=True)
class BoneReference:
    """The derived reference of one scan (see `METHOD`)."""

    components: np.ndarray  # int32: 0 none, 1..n the components, largest first (holes filled)
    component_ml: tuple[float, ...]  # volume of component 1..n
    ignored: np.ndarray  # bool: left out of the reference and of every score
    dropped_outside_body_ml: float  # bone-threshold components dropped as table or aids
    is_shaft: bool  # one long tube (SHAFT_MIN_*), scored by Dice and naming

    @property
    def bone(self) -> np.ndarray:
        return self.components > 0


def voxel_ml(spacing: Spacing) -> float:
    return float(np.prod(spacing)) / 1000.0


def outside_field_of_view(hu: np.ndarray) -> np.ndarray:
    """(y, x) columns outside the reconstructed field of view: the scan's minimum value (at most
    -1000 HU, padding or the scanner's floor) in every slice. Air inside the field is noisy, so a
    column of it is not exactly the floor in every one of tens of slices; one is, outside it."""
    floor = hu.min()
    if floor > -1000 or len(hu) < 8:  # too few slices to tell noise-free from noisy air
        return np.zeros(hu.shape[1:], dtype=bool)
    return (hu == floor).all(axis=0)


def truncation_rim(
    hu: np.ndarray, spacing: Spacing, margin_mm: float = FOV_MARGIN_MM
) -> np.ndarray:
    """(y, x) columns inside the field of view within `margin_mm` of its edge."""
    outside = outside_field_of_view(hu)
    if not outside.any():
        return outside
    distance = ndi.distance_transform_edt(~outside, sampling=(spacing[1], spacing[0]))
    return ~outside & (distance <= margin_mm)


def ignored_voxels(hu: np.ndarray, spacing: Spacing) -> np.ndarray:
    """Voxels no score counts: the truncation rim and saturated voxels."""
    return truncation_rim(hu, spacing)[None] | (hu >= SATURATED_HU)


def in_plane_disk(radius: int) -> np.ndarray:
    """A (1, 2r+1, 2r+1) structuring element: a disk in the axial plane."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (y * y + x * x <= radius * radius)[None]


def body_mask(hu: np.ndarray, spacing: Spacing) -> np.ndarray:
    """The body (see BODY_HU): the largest 3-D piece of opened tissue, holes filled per slice."""
    radius = max(1, round(BODY_OPENING_MM / spacing[0]))
    tissue = ndi.binary_opening(hu > BODY_HU, in_plane_disk(radius))
    pieces, n = ndi.label(tissue)
    if n == 0:
        return tissue
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return fill_holes_per_slice(pieces == sizes.argmax())


def fill_holes_per_slice(mask: np.ndarray, max_hole_voxels: int | None = None) -> np.ndarray:
    """`mask` with the holes of each axial slice filled (2-D: a shaft is a tube along z, whose
    marrow is a hole in every slice but open at the crop's ends in 3-D); with
    `max_hole_voxels`, only holes up to that many voxels. A bone cut by the slice's edge (the
    scan's field cut through it) is closed along the edge between the points where it meets
    it, so that its marrow, open to the edge, counts as enclosed."""
    filled = mask.copy()
    for z in np.nonzero(mask.any(axis=(1, 2)))[0]:
        section = mask[z]
        holes = ndi.binary_fill_holes(closed_along_edges(section))[1:-1, 1:-1] & ~section
        if max_hole_voxels is not None and holes.any():
            pieces, _ = ndi.label(holes)
            sizes = np.bincount(pieces.ravel())
            small = sizes <= max_hole_voxels
            small[0] = False
            holes = small[pieces]
        filled[z] |= holes
    return filled


def closed_along_edges(section: np.ndarray) -> np.ndarray:
    """A 2-D mask padded by one pixel, the padding set where it lies between the first and the
    last pixel at which one 8-connected piece of the mask meets that edge."""
    closed = np.pad(section, 1)
    pieces, _ = ndi.label(section, EIGHT_CONNECTED)
    edges = (
        (pieces[0], np.s_[0, 1:-1]),
        (pieces[-1], np.s_[-1, 1:-1]),
        (pieces[:, 0], np.s_[1:-1, 0]),
        (pieces[:, -1], np.s_[1:-1, -1]),
    )
    for line, padding in edges:
        for piece in np.unique(line[line > 0]):
            touching = np.nonzero(line == piece)[0]
            segment = closed[padding]  # a view into the padding along this edge
            segment[touching[0] : touching[-1] + 1] = True
    return closed


def one_piece_share(component: np.ndarray) -> float:
    """Share of the slices a (holes filled) mask is in where it is one 8-connected piece."""
    slices = np.nonzero(component.any(axis=(1, 2)))[0]
    if len(slices) == 0:
        return 0.0
    return float(np.mean([ndi.label(component[z], EIGHT_CONNECTED)[1] == 1 for z in slices]))


def is_shaft(components: np.ndarray) -> bool:
    """One component, long along z and one piece per slice (SHAFT_MIN_*)."""
    if components.max() != 1:
        return False
    mask = components == 1
    slice_share = np.count_nonzero(mask.any(axis=(1, 2))) / len(mask)
    return bool(
        slice_share >= SHAFT_MIN_SLICE_SHARE and one_piece_share(mask) >= SHAFT_MIN_ONE_PIECE_SHARE
    )


def bone_reference(hu: np.ndarray, spacing: Spacing) -> BoneReference:
    """The derived bone reference of a CT in HU (`METHOD`)."""
    ml = voxel_ml(spacing)
    ignored = ignored_voxels(hu, spacing)
    six = ndi.generate_binary_structure(3, 1)
    found, _ = ndi.label((hu >= BONE_HU) & ~ignored, six)
    sizes = np.bincount(found.ravel())
    sizes[0] = 0
    large = np.nonzero(sizes * ml >= MIN_COMPONENT_ML)[0]
    body = body_mask(hu, spacing) if len(large) else np.zeros(hu.shape, dtype=bool)
    max_hole = round(MAX_HOLE_CM2 * 100 / (spacing[0] * spacing[1]))
    components = np.zeros(hu.shape, dtype=np.int32)
    kept_ml: list[float] = []
    dropped_ml = 0.0
    for index in sorted(large, key=lambda k: -sizes[k]):  # largest first: it fills first
        mask = found == index
        if np.count_nonzero(mask & body) < MIN_SHARE_IN_BODY * sizes[index]:
            dropped_ml += float(sizes[index]) * ml
            continue
        filled = fill_holes_per_slice(mask, max_hole) & (components == 0) & ~ignored
        components[filled] = len(kept_ml) + 1
        kept_ml.append(round(float(np.count_nonzero(filled)) * ml, 2))
    return BoneReference(
        components=components,
        component_ml=tuple(kept_ml),
        ignored=ignored,
        dropped_outside_body_ml=round(dropped_ml, 2),
        is_shaft=is_shaft(components),
    )


# -- scores of a label map (0 background, 1..6 model.labels.Bone) against the reference ----------


def any_bone_dice(labels: np.ndarray, reference: BoneReference) -> float:
    """Dice of the model's any-bone mask against the reference, ignored voxels left out."""
    counted = ~reference.ignored
    return float(dice((labels > 0) & counted, reference.bone & counted))


def bone_recall(labels: np.ndarray, reference: BoneReference) -> float | None:
    """Share of the reference's voxels the model labels as any bone (None: no reference)."""
    bone = reference.bone
    total = np.count_nonzero(bone)
    return float(np.count_nonzero(bone & (labels > 0)) / total) if total else None


def false_bone_share(labels: np.ndarray, reference: BoneReference) -> float | None:
    """Share of the model's bone voxels (ignored ones left out) farther from the reference than
    FALSE_BONE_MARGIN_VOXELS (None: the model found no bone)."""
    model_bone = (labels > 0) & ~reference.ignored
    total = np.count_nonzero(model_bone)
    if not total:
        return None
    near = ndi.binary_dilation(reference.bone, ellipsoid(FALSE_BONE_MARGIN_VOXELS))
    return float(np.count_nonzero(model_bone & ~near) / total)


def ellipsoid(radii: tuple[int, int, int]) -> np.ndarray:
    """A boolean ellipsoid structuring element with these radii in voxels (z, y, x)."""
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    distance = sum(
        ((g / max(r, 1)) ** 2 for g, r in zip(grids, radii, strict=True)), start=np.zeros(())
    )
    return distance <= 1.0


def majority_label(labels: np.ndarray, region: np.ndarray) -> tuple[int, float]:
    """The bone label (1..6) the model gave most voxels of `region`, and the share of the
    region's voxels it gave it; (0, 0.0) when it labelled none of them as bone."""
    counts = np.bincount(labels[region].ravel(), minlength=len(BONE_NAMES) + 1)
    total = int(counts.sum())
    bone = int(np.argmax(counts[1:])) + 1
    if total == 0 or counts[bone] == 0:
        return 0, 0.0
    return bone, float(counts[bone]) / total


def label_volumes_ml(labels: np.ndarray, spacing: Spacing) -> dict[str, float]:
    """Millilitres of each bone the label map holds, by name."""
    counts = np.bincount(labels.ravel(), minlength=len(BONE_NAMES) + 1)
    ml = voxel_ml(spacing)
    return {name: round(float(counts[v]) * ml, 2) for v, name in BONE_NAMES.items() if counts[v]}
