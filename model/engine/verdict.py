"""How far a segmentation can be trusted: signals per segment, and a verdict per series.

A model trained on phantoms labels whatever it is shown. Shown a head, the shipped weights
found left and right "hip bones" of 42-81 ml and "femurs" of 1-7 ml, and nothing in their
order along the body was wrong enough for the anatomy check (`model.engine.anatomy`). What gave them
away was everything else about them: the model was unsure of 29-100 % of their voxels, and a
"femur" 0.3 cm2 thick is no femur. Four signals, measured per segment (one bone, one side):

- confidence: the share of the segment's voxels whose class the model gave under 90 %
  (`InferenceSettings.certainty`, the `unsure_percent` of the segmentation summary);
- volume for its visible length: the mean cross-section the volume implies over the length
  in view, against what that bone has in adults (`BONES`);
- left/right agreement: the same bone on both sides, in the same stretch of the body, holds
  comparable volume; both wholly in view, comparable lengths;
- shape: solidity, the volume over that of its convex hull. A bone is a solid body (a tube,
  a block, the hip bone a curved plate); a thin shell or a scatter of specks is not.

Each signal outside its bounds is a `Finding`. The bounds are of two kinds. Outside what the
model shows on bones it knows (confidence, left/right), the segment is *unsure*. Outside what
any adult bone can be (cross-section, length, shape), it is *implausible*. The series' verdict:

- `implausible` when the segmentation as a whole cannot be the bones it names: the model was
  unsure of a third of all the bone it found, or implausible segments hold half of it, or the
  anatomy check found bones in an order no lower extremity has. The node sends no SEG.
- `unsure` when any segment has a finding: `[verdict] policy` decides (send, mark, hold).
- `confident` otherwise.

Every bound is generous: real bones, cut anywhere by the field of view, must pass. A bone cut
lengthwise by the field of view's sides shows less than its cross-section, so the lower
cross-section bound applies only to segments clear of the sides; a bone clear of every edge
is whole, and must be as long as an adult's. Children's bones are smaller than these adult
bounds. A bone cut by a circular reconstruction field of view inside the image is taken for
whole (lower extremities lie well inside it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from model.labels import BONE_NAMES, Bone, Side, sided_label

if TYPE_CHECKING:  # `dicom-node status` reads verdicts without loading SimpleITK
    from model.volume_io import Volume


class Verdict(StrEnum):
    CONFIDENT = "confident"
    UNSURE = "unsure"
    IMPLAUSIBLE = "implausible"


@dataclass(frozen=True)
class BoneBounds:
    """What an adult bone can show, generously: its length (mm, its longest dimension), its
    mean cross-section (cm2) over any stretch of it, and its least solidity."""

    length_mm: tuple[float, float]
    cross_section_cm2: tuple[float, float]
    min_solidity: float


# Lengths: femur and tibia from stature (femur ~27 %, tibia ~22 % of a 145-200 cm adult; the
# Trotter-Gleser regressions), 380-540 and 320-440 mm; the fibula a centimetre shorter than the
# tibia; the hip bone 180-240 mm from iliac crest to ischial tuberosity; talus 50-65 mm and
# calcaneus 70-90 mm long (Gray's Anatomy). The bounds widen each range by a fifth or more; the
# phantom's calcaneus is 92-108 mm along its principal axis, hence 130.
# Cross-sections (axial, the whole bone, marrow included): femoral shaft 23-33 mm across
# (4-8.5 cm2), condyles ~80 x 60 mm (~40 cm2); tibial shaft 3-6 cm2, plateau ~75 x 50 mm
# (~30 cm2); fibular shaft 0.6-1.5 cm2, head and malleolus under 5 cm2; the hip bone from a
# pubic ramus or a stretch of iliac crest (~2 cm2) to the acetabulum with both columns (~30
# cm2); talus and calcaneus 5-25 cm2. Lower bounds about half the thinnest part, upper bounds
# about 1.5x the widest: the mean over a stretch lies between, whatever stretch is in view.
# The phantom's bones measure 1.5-30 cm2. Solidity: shafts and the foot bones are solid
# (phantom 0.6-0.98; real femurs segmented as a hollow cortex 0.4-0.8); the hip bone, a
# twisted plate, 0.24-0.4 on the phantom, hence its low bound.
BONES: dict[Bone, BoneBounds] = {
    Bone.FEMUR: BoneBounds((300.0, 600.0), (2.0, 60.0), 0.2),
    Bone.HIP_BONE: BoneBounds((150.0, 300.0), (1.0, 60.0), 0.08),
    Bone.TIBIA: BoneBounds((250.0, 500.0), (1.5, 50.0), 0.2),
    Bone.FIBULA: BoneBounds((250.0, 500.0), (0.25, 12.0), 0.15),
    Bone.TALUS: BoneBounds((35.0, 90.0), (2.0, 40.0), 0.4),
    Bone.CALCANEUS: BoneBounds((55.0, 130.0), (3.0, 45.0), 0.4),
}

# A segment's unsure share above this is more than the model shows on bone it knows: 1-7 % on
# held-out phantom crops (15 % beside a metal implant), 5-10 % on real femurs it named right;
# 18-38 % on real thigh crops it got wrong, 29-100 % on the head.
MAX_UNSURE_PERCENT = 20.0
# Over all the bone found: beyond this the segmentation as a whole is implausible (real crops
# it got wrong: 23-41 %; the head: 44-48 %).
MAX_SERIES_UNSURE_PERCENT = 100.0 / 3.0
# Implausible segments holding more than this share of the bone make the series implausible.
MAX_IMPLAUSIBLE_SHARE = 0.5
# The mean cross-section's lower bound needs this much of the bone in view: a few millimetres
# at the edge of the field of view may be the tip of a condyle or of the femoral head.
MIN_LENGTH_FOR_CROSS_SECTION_MM = 10.0
# Shape says nothing about a speck of a few voxels.
MIN_SHAPE_ML = 1.0
# Left and right: volumes over the stretch of the body both span, and lengths when both are
# wholly in view. Legs posed differently (a knee bent, a hip turned) show different parts of
# a bone at one height, hence the wide volume ratio; real left and right bones differ by a few
# per cent in length.
MAX_SIDE_VOLUME_RATIO = 2.0
MAX_SIDE_LENGTH_RATIO = 1.25
MIN_COMMON_SPAN_MM = 20.0
# Quantiles of a segment's voxels that bound its extents, so that a stray voxel does not
# stretch them.
EXTENT_QUANTILES = (0.005, 0.995)
PRINCIPAL_POINTS = 200_000


@dataclass(frozen=True)
class SegmentSignals:
    """What one segment (a sided label) shows, measured on its voxels."""

    sided_label: int
    volume_ml: float
    unsure_percent: float
    length_mm: float  # visible length: its extent along its principal axis
    z_extent_mm: float  # its extent across the slices
    first_slice: int  # the slices its z extent spans (array index, inclusive)
    last_slice: int
    solidity: float | None  # volume over its convex hull's; None: flat or a speck
    cut_at_sides: bool  # touches the field of view's sides (the image's rows or columns)
    cut_at_ends: bool  # touches the first or the last slice
    # ml in each slice from `first_slice` to `last_slice`: left and right are compared on it
    slice_ml: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0))

    @property
    def bone(self) -> Bone:
        return Bone((self.sided_label - 1) % len(Bone) + 1)

    @property
    def side(self) -> Side:
        return Side.LEFT if self.sided_label > len(Bone) else Side.RIGHT

    @property
    def name(self) -> str:
        return f"{self.side.name.lower()} {BONE_NAMES[self.bone]}"

    @property
    def cross_section_cm2(self) -> tuple[float, float]:
        """The mean cross-section, as a range: volume over the visible length (the bone's
        longest extent, so at most its true mean) and over its extent across the slices (a
        bone tilted from the slices' normal spans less of them than its length, so at least
        it). One voxel's length at the least, so that a speck is not infinitely wide."""
        mm3 = 1000.0 * self.volume_ml
        return (mm3 / max(self.length_mm, 1.0) / 100.0, mm3 / max(self.z_extent_mm, 1.0) / 100.0)


@dataclass(frozen=True)
class Finding:
    """A signal out of bounds: for a segment (its sided label) or the series (None)."""

    sided_label: int | None
    signal: str  # "confidence", "cross-section", "length", "left/right", "shape", "anatomy"
    brief: str  # the value in a few words, for a SEG's segment description
    text: str  # the whole reason, naming segment, value and bound
    implausible: bool  # outside what any adult bone can be, not only outside the usual


@dataclass(frozen=True)
class Assessment:
    """The series' verdict, the findings that made it, and every segment's signals."""

    verdict: Verdict
    findings: tuple[Finding, ...] = ()
    signals: tuple[SegmentSignals, ...] = ()

    @property
    def reasons(self) -> list[str]:
        return [finding.text for finding in self.findings]

    def headline(self) -> str:
        """One line: the verdict and its first reason (the state's reason column)."""
        if not self.findings:
            return str(self.verdict)
        more = len(self.findings) - 1
        return f"{self.verdict}: {self.findings[0].text}" + (f" (+{more} more)" if more else "")

    def segment_notes(self) -> dict[int, str]:
        """Per sided label, its findings in a few words (the series' findings for a segment
        without its own): what a SEG marked unverified says in each segment's description."""
        series = "; ".join(f.brief for f in self.findings if f.sided_label is None)
        notes = {}
        for signals in self.signals:
            own = [f.brief for f in self.findings if f.sided_label == signals.sided_label]
            notes[signals.sided_label] = "; ".join(own) or series or "other segments unsure"
        return notes

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": str(self.verdict),
            "headline": self.headline(),
            "reasons": self.reasons,
            "signals": [
                {
                    "segment": s.name,
                    **{f.name: getattr(s, f.name) for f in fields(s) if f.name != "slice_ml"},
                    "cross_section_cm2": [round(value, 2) for value in s.cross_section_cm2],
                }
                for s in self.signals
            ],
        }


def _quantile_span(counts: np.ndarray) -> tuple[int, int]:
    """First and last index between `EXTENT_QUANTILES` of a histogram."""
    cumulative = np.cumsum(counts) / counts.sum()
    first, last = (int(np.searchsorted(cumulative, q)) for q in EXTENT_QUANTILES)
    return first, last


def _principal_extent(points_mm: np.ndarray) -> float:
    """Extent (mm) of points along their first principal axis, between `EXTENT_QUANTILES`.
    Of an evenly spread subset of at most `PRINCIPAL_POINTS`: a whole-leg femur has millions
    of voxels, and a subset gives the same axis and quantiles to well under a millimetre."""
    if len(points_mm) < 2:
        return 0.0
    points_mm = points_mm[:: -(-len(points_mm) // PRINCIPAL_POINTS)]
    centred = points_mm - points_mm.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov(centred.T))
    projected = centred @ vectors[:, -1]  # eigh sorts ascending: the last is the longest
    low, high = np.quantile(projected, EXTENT_QUANTILES)
    return float(high - low)


def _solidity(mask: np.ndarray, spacing_zyx: np.ndarray, volume_mm3: float) -> float | None:
    """Volume over the convex hull's. The hull of a voxel set is that of each image row's first
    and last voxel, so only those are handed to qhull. Voxel centres: the hull is a
    half-voxel shell short, which errs towards solid."""
    rows = mask.any(axis=2)
    z, y = np.nonzero(rows)
    first = mask.argmax(axis=2)[z, y]
    last = mask.shape[2] - 1 - mask[:, :, ::-1].argmax(axis=2)[z, y]
    points = (
        np.concatenate([np.stack([z, y, first], axis=1), np.stack([z, y, last], axis=1)])
        * spacing_zyx
    )
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):  # flat (one slice, one row) or too few points
        return None
    return volume_mm3 / hull.volume if hull.volume > 0 else None


def measure_segments(
    sided: Volume, confidence: np.ndarray, sure_percent: int
) -> list[SegmentSignals]:
    """The signals of every segment of `sided` (0 background, 1..12 `model.labels.sided_label`),
    with `confidence` (uint8 percent, the same grid) and the confidence below which a voxel is
    unsure. Within each segment's bounding box only: no mask of the whole scan is made."""
    array = sided.array
    spacing_zyx = np.asarray(sided.spacing, dtype=np.float64)[::-1]
    voxel_mm3 = float(np.prod(spacing_zyx))
    found = []
    for label, box in enumerate(ndimage.find_objects(array, max_label=2 * len(Bone)), start=1):
        if box is None:
            continue
        mask = array[box] == label
        voxels = int(mask.sum())
        unsure = int((confidence[box][mask] < sure_percent).sum())
        per_slice = mask.sum(axis=(1, 2))
        first, last = _quantile_span(per_slice)
        volume_mm3 = voxels * voxel_mm3
        points = (np.argwhere(mask) * spacing_zyx).astype(np.float32)
        found.append(
            SegmentSignals(
                sided_label=label,
                volume_ml=round(volume_mm3 / 1000.0, 2),
                unsure_percent=round(100.0 * unsure / voxels, 1),
                length_mm=round(_principal_extent(points) + float(spacing_zyx.min()), 1),
                z_extent_mm=round((last - first + 1) * float(spacing_zyx[0]), 1),
                first_slice=box[0].start + first,
                last_slice=box[0].start + last,
                solidity=(
                    None
                    if volume_mm3 < MIN_SHAPE_ML * 1000.0
                    else _rounded(_solidity(mask, spacing_zyx, volume_mm3))
                ),
                cut_at_sides=any(
                    b.start == 0 or b.stop == n
                    for b, n in zip(box[1:], array.shape[1:], strict=True)
                ),
                cut_at_ends=box[0].start == 0 or box[0].stop == array.shape[0],
                slice_ml=per_slice[first : last + 1] * (voxel_mm3 / 1000.0),
            )
        )
    return found


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _segment_findings(s: SegmentSignals) -> list[Finding]:
    """The findings of one segment on its own."""
    bounds = BONES[s.bone]
    bone = BONE_NAMES[s.bone]
    found = []
    if s.unsure_percent > MAX_UNSURE_PERCENT:
        found.append(
            Finding(
                s.sided_label,
                "confidence",
                f"{s.unsure_percent:.0f} % of voxels unsure",
                f"{s.name}: the model was unsure of {s.unsure_percent:.0f} % of its voxels "
                f"(over {MAX_UNSURE_PERCENT:.0f} %: more than on bone it knows)",
                implausible=False,
            )
        )
    low, high = s.cross_section_cm2
    least, most = bounds.cross_section_cm2
    thin = high < least and not s.cut_at_sides and s.z_extent_mm >= MIN_LENGTH_FOR_CROSS_SECTION_MM
    if thin or low > most:
        found.append(
            Finding(
                s.sided_label,
                "cross-section",
                f"{s.volume_ml:.1f} ml over {s.length_mm:.0f} mm",
                f"{s.name}: {s.volume_ml:.1f} ml over {s.z_extent_mm:.0f}-{s.length_mm:.0f} mm "
                f"in view, a mean cross-section of {low:.1f}-{high:.1f} cm2 (an adult {bone}: "
                f"{least:g}-{most:g} cm2)",
                implausible=True,
            )
        )
    shortest, longest = bounds.length_mm
    whole = not (s.cut_at_sides or s.cut_at_ends)
    if s.length_mm > longest or (whole and s.length_mm < shortest):
        found.append(
            Finding(
                s.sided_label,
                "length",
                f"{s.length_mm:.0f} mm long",
                f"{s.name}: {s.length_mm:.0f} mm long"
                + (" and wholly in view" if whole else "")
                + f" (an adult {bone}: {shortest:g}-{longest:g} mm)",
                implausible=True,
            )
        )
    if s.solidity is not None and s.solidity < bounds.min_solidity:
        found.append(
            Finding(
                s.sided_label,
                "shape",
                f"solidity {s.solidity:.2f}",
                f"{s.name}: solidity {s.solidity:.2f}, its volume over its convex hull's (an "
                f"adult {bone}: at least {bounds.min_solidity:g}): not a solid body",
                implausible=True,
            )
        )
    return found


def _side_findings(right: SegmentSignals, left: SegmentSignals, slice_mm: float) -> list[Finding]:
    """Left and right of one bone: comparable volume where both are in view, comparable length
    when both are whole. Only for segments clear of the field of view's sides."""
    if right.cut_at_sides or left.cut_at_sides:
        return []
    found = []
    first = max(right.first_slice, left.first_slice)
    last = min(right.last_slice, left.last_slice)
    span = (last - first + 1) * slice_mm
    if span >= MIN_COMMON_SPAN_MM:
        volumes = [
            float(s.slice_ml[first - s.first_slice : last + 1 - s.first_slice].sum())
            for s in (right, left)
        ]
        ratio = max(volumes) / max(min(volumes), 1e-3)
        if ratio > MAX_SIDE_VOLUME_RATIO:
            found.append(
                Finding(
                    min((right, left), key=lambda s: s.volume_ml).sided_label,
                    "left/right",
                    f"{ratio:.1f}x the other side's volume",
                    f"{right.name} {volumes[0]:.1f} ml and {left.name} {volumes[1]:.1f} ml over "
                    f"the {span:.0f} mm both span: {ratio:.1f}x apart (at most "
                    f"{MAX_SIDE_VOLUME_RATIO:g}x)",
                    implausible=False,
                )
            )
    both_whole = not (right.cut_at_ends or left.cut_at_ends)
    lengths = sorted((right.length_mm, left.length_mm))
    if both_whole and lengths[1] > MAX_SIDE_LENGTH_RATIO * lengths[0]:
        found.append(
            Finding(
                min((right, left), key=lambda s: s.length_mm).sided_label,
                "left/right",
                f"{lengths[1] / lengths[0]:.1f}x the other side's length",
                f"{right.name} {right.length_mm:.0f} mm and {left.name} {left.length_mm:.0f} mm "
                f"long, both wholly in view (at most {MAX_SIDE_LENGTH_RATIO:g}x apart)",
                implausible=False,
            )
        )
    return found


def assess(
    signals: list[SegmentSignals], slice_mm: float, anatomy_reason: str | None = None
) -> Assessment:
    """The verdict on a segmentation from its segments' `signals` (`measure_segments`), the
    distance between its slices, and the anatomy check's reason if it found one (see the module
    doc)."""
    findings = [finding for s in signals for finding in _segment_findings(s)]
    by_label = {s.sided_label: s for s in signals}
    for bone in Bone:
        right = by_label.get(sided_label(bone, Side.RIGHT))
        left = by_label.get(sided_label(bone, Side.LEFT))
        if right is not None and left is not None:
            findings += _side_findings(right, left, slice_mm)
    total_ml = sum(s.volume_ml for s in signals)
    series: list[Finding] = []
    if anatomy_reason:
        series.append(Finding(None, "anatomy", "bones out of order", anatomy_reason, True))
    if total_ml > 0:
        unsure = sum(s.volume_ml * s.unsure_percent for s in signals) / total_ml
        if unsure > MAX_SERIES_UNSURE_PERCENT:
            series.append(
                Finding(
                    None,
                    "confidence",
                    f"{unsure:.0f} % of all bone unsure",
                    f"the model was unsure of {unsure:.0f} % of all the bone it found (a "
                    f"plausible segmentation: at most {MAX_SERIES_UNSURE_PERCENT:.0f} %)",
                    implausible=True,
                )
            )
        # Every finding in `findings` is a segment's (series findings go to `series`).
        implausible = {
            f.sided_label for f in findings if f.implausible and f.sided_label is not None
        }
        share = sum(by_label[label].volume_ml for label in implausible) / total_ml
        if share > MAX_IMPLAUSIBLE_SHARE:
            series.append(
                Finding(
                    None,
                    "share",
                    f"{100 * share:.0f} % of bone implausible",
                    f"segments no adult bone could be hold {100 * share:.0f} % of the bone found "
                    f"(at most {100 * MAX_IMPLAUSIBLE_SHARE:.0f} %)",
                    implausible=True,
                )
            )
    if series:
        verdict = Verdict.IMPLAUSIBLE
    elif findings:
        verdict = Verdict.UNSURE
    else:
        verdict = Verdict.CONFIDENT
    return Assessment(verdict, tuple(series + findings), tuple(signals))
