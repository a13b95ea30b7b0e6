"""Real-CT checks: the model on every real scan in ../shared/data.

    python -m bench.real_ct [--weights PATH] [--out bench/results/real_ct.json]
                            [--cases STS_001,STS_009,...] [--strategy fast|paper]
                            [--device auto|cpu|cuda] [--montages DIR | --no-montages]

Scans: the 21 extremity crops in real_ct/sts_extremity/ (int16 HU NIfTI, 0.98 x 0.98 x 3.27
mm); the two extremity CT series among the DICOM data (ibsi_sts STS_001 and STS_025: the same
patients and voxels as two of the crops, here through the node's series assembly); and two real
series with none of the six bones (the Philips head phantom, assembled as if its Body Part
Examined were missing, and TotalSegmentator's example CT), where the right answer is no bone of
ours. There are no manual labels: each scan is scored against a bone reference derived by
`model.evaluation.real_ct_reference.METHOD`, and which bone the largest reference component is
was read off the montages by eye (`EXPECTED`). The JSON holds per scan the scores, the bones found
with their volumes and unsure shares, what the anatomy check dropped, and the time; the montages
(one PNG per scan) show the labels over the CT with the reference's outline.

Phantoms made from shape subjects the weights never saw (`--phantom-subjects`, default the
five held out of training, `model.phantom.subjects.shapes.HELD_OUT_SUBJECTS`): one hip, knee and
ankle subject phantom each, scanned at 0.8, 1.5, 3 and 5 mm slices
(`model.evaluation.phantom_check.segment_subject_phantoms`), scored per bone against their own
truth; under "phantoms" in the JSON, aggregated per slice thickness.

One script past 500 lines: the cases, the references, the montages and the report are one
benchmark's parts, read in that order and used nowhere else.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from PIL import Image

from bench.results_file import machine, write_result
from model.engine.inference import InferenceSettings, Segmentation, Segmenter
from model.engine.verdict import Verdict
from model.engine.weights import DEFAULT_WEIGHTS
from model.evaluation.phantom_check import SLICE_THICKNESSES_MM, segment_subject_phantoms
from model.evaluation.real_ct_reference import (
    METHOD,
    BoneReference,
    any_bone_dice,
    bone_recall,
    bone_reference,
    false_bone_share,
    label_volumes_ml,
    majority_label,
)
from model.labels import BONE_NAMES
from model.phantom.subjects.shapes import HELD_OUT_SUBJECTS
from model.volume_io import Volume, read_volume

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CROPS = DATA / "real_ct" / "sts_extremity"
DICOM = DATA / "dicom"
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Anatomy:
    """Where a crop lies and which of our bones are in it, read off its montage by eye."""

    site: str
    largest: str | None  # the bone the largest reference component is; None: not one of ours,
    # or several bones merged into it with none the bulk of it
    ours: tuple[str, ...]  # the six bones' names in view


# The crops' anatomy is undocumented (real_ct/README.md). Read off the montages
# (bench/results/real_ct/*.png, and axial, coronal and sagittal views of the CT alone) by eye,
# from the shapes: one tube with a linea aspera and no second tube beside it is a femur; a
# triangular tube in front of a thin one is tibia and fibula; two small bones side by side at
# the front of the pelvis are the pubic symphysis; a column of small ovals along the chest wall
# is ribs; several thin tubes radiating from a cluster of small bones is a hand. Index z grows
# towards the head (LPS), so a shaft widening at its lower end runs towards the knee. The
# scans' table positions agree, within each of their two conventions: the pubis lies near
# z = -700 mm in the crops whose z is negative and near 900-990 mm in those whose z is
# positive, the knee near 530-600 mm. `largest` is the bone that makes most of the largest
# reference component; None where it is none of the six, or bones joined through a joint with
# none clearly the bulk of it.
EXPECTED: dict[str, Anatomy] = {
    "STS_001": Anatomy(
        "proximal thigh up to the ischium and the pubic symphysis", "femur", ("femur", "hip bone")
    ),
    "STS_003": Anatomy(
        "buttock and perineum below the pelvis: ischium and pubic ramus, coccyx behind the rectum",
        "hip bone",
        ("hip bone",),
    ),
    "STS_005": Anatomy(
        "upper arm and shoulder beside the chest wall: humerus, scapula, clavicle, ribs; "
        "truncation rim at the field's edge",
        None,
        (),
    ),
    "STS_007": Anatomy(
        "hemipelvis from the iliac crest to the ischium, joined to the sacrum and the last "
        "lumbar vertebra",
        None,
        ("hip bone",),
    ),
    "STS_009": Anatomy(
        "distal thigh: femoral shaft to the metaphysis above the knee", "femur", ("femur",)
    ),
    "STS_011": Anatomy(
        "thigh up to the hip: femoral shaft (oblique) to the trochanters, ischium at the top",
        "femur",
        ("femur", "hip bone"),
    ),
    "STS_013": Anatomy(
        "distal thigh and knee: femoral shaft to the condyles, patella; the other knee at the edge",
        "femur",
        ("femur",),
    ),
    "STS_015": Anatomy(
        "hip: proximal femur (shaft, trochanters, neck) and the acetabulum, one component",
        None,
        ("femur", "hip bone"),
    ),
    "STS_017": Anatomy(
        "distal thigh and knee: femoral shaft to the condyles, patella", "femur", ("femur",)
    ),
    "STS_019": Anatomy(
        "forearm, wrist and hand (arm raised): radius and ulna, carpus, metacarpals; the other "
        "hand at the edge",
        None,
        (),
    ),
    "STS_021": Anatomy(
        "thigh up to the hip: femoral shaft, head and acetabulum, pubis",
        "femur",
        ("femur", "hip bone"),
    ),
    "STS_023": Anatomy(
        "proximal femoral shaft to the lesser trochanter; ischial tuberosity at the top",
        "femur",
        ("femur", "hip bone"),
    ),
    "STS_025": Anatomy("middle of the lower leg: tibia and fibula", "tibia", ("tibia", "fibula")),
    "STS_027": Anatomy("femoral shaft, most of the thigh", "femur", ("femur",)),
    "STS_029": Anatomy(
        "proximal thigh up to the ischium and the pubic symphysis", "femur", ("femur", "hip bone")
    ),
    "STS_031": Anatomy(
        "hip: femoral shaft (oblique) to the trochanters and the head in the acetabulum",
        "femur",
        ("femur", "hip bone"),
    ),
    "STS_033": Anatomy(
        "femoral shaft running obliquely (about 30 degrees), cut by the scan's edge",
        "femur",
        ("femur",),
    ),
    "STS_035": Anatomy(
        "proximal lower leg: tibia up to the plateau, fibula with its head",
        "tibia",
        ("tibia", "fibula"),
    ),
    "STS_037": Anatomy(
        "upper back and chest wall: thoracic vertebrae, ribs, scapula; humerus or clavicle at "
        "the edge",
        None,
        (),
    ),
    "STS_041": Anatomy(
        "a sliver of femoral shaft at the field of view's edge (real_ct/README.md)",
        "femur",
        ("femur",),
    ),
    "STS_043": Anatomy("femoral shaft with its linea aspera", "femur", ("femur",)),
    "head_phantom_philips": Anatomy("plastic head phantom: skull and facial bones", None, ()),
    "totalseg_example": Anatomy(
        "upper abdomen and lower chest: spine, ribs; the arms at the sides", None, ()
    ),
}


@dataclass(frozen=True)
class Case:
    case_id: str
    kind: str  # "crop", "dicom_extremity" or "non_extremity"
    source: Path
    same_as: str | None = None  # the crop holding the same patient's CT
    note: str | None = None


def crop_cases() -> list[Case]:
    return [
        Case(path.name.removesuffix("_ct.nii.gz"), "crop", path)
        for path in sorted(CROPS.glob("STS_*_ct.nii.gz"))
    ]


def dicom_cases() -> list[Case]:
    return [
        Case("STS_001_dicom", "dicom_extremity", DICOM / "ibsi_sts" / "STS_001", "STS_001"),
        Case("STS_025_dicom", "dicom_extremity", DICOM / "ibsi_sts" / "STS_025", "STS_025"),
        Case(
            "head_phantom_philips",
            "non_extremity",
            DICOM / "dcm_qa_ct" / "Philips" / "S21570" / "S2010",
            note="Body Part Examined BRAIN, which the node skips; assembled without that rule, "
            "as when a scanner leaves the attribute empty (issue 18, section 5)",
        ),
        Case("totalseg_example", "non_extremity", DICOM / "totalseg_example_ct_dicom"),
    ]


def load_volume(case: Case) -> Volume:
    """The case's CT in HU: a NIfTI read as is, a DICOM folder's CT series assembled as the node
    would, with no Body Part Examined rule (the issue's head phantom has it removed)."""
    if case.source.is_file():
        return read_volume(case.source)
    from dicom_node.imaging.volume.assemble import assemble_volume, choose_series, survey_series
    from dicom_node.imaging.volume.headers import read_headers
    from dicom_node.imaging.volume.policy import AssemblyPolicy

    policy = AssemblyPolicy(skip_body_parts=())
    with warnings.catch_warnings():  # the IBSI Study IDs are longer than SH allows: known
        warnings.filterwarnings("ignore", message="The value length", category=UserWarning)
        survey = choose_series(survey_series(read_headers([case.source]), policy))
        return assemble_volume(survey.paths, policy).volume


def node_outcome(segmentation: Segmentation) -> str:
    """What the node would do with the series under the default `[verdict] policy`
    (unverified): report no findings and why, send a SEG marked UNVERIFIED, or send it."""
    assessment = segmentation.assessment
    if assessment.verdict == Verdict.IMPLAUSIBLE:
        return f"no findings: {assessment.headline()}"
    if not segmentation.summary["segments"]:
        return "no findings: none of the six bones found"
    n = len(segmentation.summary["segments"])
    if assessment.verdict == Verdict.UNSURE:
        return f"SEG with {n} segments marked UNVERIFIED: {assessment.headline()}"
    return f"SEG with {n} segments, confident"


def score(
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    reference: BoneReference,
    expected: Anatomy | None,
    extremity: bool = True,
) -> dict:
    """The scores of `labels` (0..6) against the reference
    (model.evaluation.real_ct_reference.METHOD) and the anatomy read off the images. Scans with
    none of the six bones (`extremity` False) get only what was found where nothing of ours is."""
    found = label_volumes_ml(labels, spacing)
    scores: dict[str, object] = {}
    if expected is not None:  # bones the model found that are not in view
        scores["unexpected_ml"] = {k: v for k, v in found.items() if k not in expected.ours}
    if not extremity:
        return scores
    scores["class"] = "shaft" if reference.is_shaft else "other"
    if reference.is_shaft:
        scores["any_bone_dice"] = round(any_bone_dice(labels, reference), 4)
    recall, false = bone_recall(labels, reference), false_bone_share(labels, reference)
    scores["bone_recall"] = None if recall is None else round(recall, 4)
    scores["false_bone_share"] = None if false is None else round(false, 4)
    if reference.component_ml:
        bone, share = majority_label(labels, reference.components == 1)
        scores["largest_named"] = BONE_NAMES.get(bone, "background")
        scores["largest_named_share"] = round(share, 3)
        if expected is not None and expected.largest is not None:
            scores["largest_expected"] = expected.largest
            scores["named_right"] = scores["largest_named"] == expected.largest
    return scores


def run_case(case: Case, segmenter: Segmenter, montages: Path | None) -> dict:
    t = time.perf_counter()
    volume = load_volume(case)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    segmentation = segmenter.segment(volume)
    segment_s = time.perf_counter() - t
    hu, labels = volume.array, segmentation.labels.array
    reference = bone_reference(hu, volume.spacing)
    expected = EXPECTED.get(case.same_as or case.case_id)
    summary = segmentation.summary
    record: dict[str, object] = {
        "case": case.case_id,
        "kind": case.kind,
        "source": str(case.source.relative_to(ROOT.parent)),
        "shape_xyz": list(hu.shape[::-1]),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "expected": asdict(expected) if expected else None,
        "reference": {
            "bone_ml": round(sum(reference.component_ml), 2),
            "components_ml": list(reference.component_ml),
            "dropped_outside_body_ml": reference.dropped_outside_body_ml,
            "ignored_voxels": int(np.count_nonzero(reference.ignored)),
        },
        "scores": score(labels, volume.spacing, reference, expected, case.kind != "non_extremity"),
        "found_ml": label_volumes_ml(labels, volume.spacing),
        "segments": [
            {k: s[k] for k in ("bone", "side", "volume_ml", "unsure_percent")}
            for s in summary["segments"]
        ],
        "dropped_as_misplaced": summary["dropped_as_misplaced"],
        "dropped_as_detached": summary["dropped_as_detached"],
        "implausible": summary["implausible"],
        "node_outcome": node_outcome(segmentation),
        "timings_s": {
            "load": round(load_s, 3),
            "segment": round(segment_s, 3),
            **segmentation.timings,
        },
    }
    if case.note:
        record["note"] = case.note
    if case.same_as:
        crop = read_volume(CROPS / f"{case.same_as}_ct.nii.gz").array
        record["same_voxels_as_crop"] = bool(crop.shape == hu.shape and np.array_equal(crop, hu))
        if record["same_voxels_as_crop"]:
            montages = None  # the crop's montage shows it
    if montages is not None:
        path = montages / f"{case.case_id}.png"
        write_montage(path, volume, labels, reference, montage_title(record))
        record["montage"] = display_path(path)
    return record


# -- montages ------------------------------------------------------------------------------------

BONE_COLOURS = {  # distinct on a grey CT, and from the yellow reference outline
    "femur": "#e6194b",
    "hip bone": "#f58231",
    "tibia": "#4363d8",
    "fibula": "#3cb44b",
    "talus": "#911eb4",
    "calcaneus": "#42d4f4",
}
REFERENCE_COLOUR = "#ffe119"
IGNORED_COLOUR = "#ffffff"
BONE_WINDOW = (-450.0, 1350.0)  # HU: level 450, width 1800
PANEL_INCHES = 3.6  # height of the tallest panel
MONTAGE_DPI = 100


def montage_title(record: dict) -> str:
    """Two lines: the scan and where it is; the scores, what was found and what the node does."""
    scores, expected = record["scores"], record["expected"]
    first = f"{record['case']}: {expected['site']}" if expected else record["case"]
    parts = []
    if "any_bone_dice" in scores:
        parts.append(f"any-bone Dice {scores['any_bone_dice']:.3f}")
    if scores.get("bone_recall") is not None:
        parts.append(f"recall {scores['bone_recall']:.2f}")
    if scores.get("false_bone_share") is not None:
        parts.append(f"false bone {scores['false_bone_share']:.2f}")
    if "largest_named" in scores:
        right = {True: " (right)", False: " (WRONG)"}.get(scores.get("named_right"), "")
        parts.append(
            f"largest named {scores['largest_named']} {scores['largest_named_share']:.0%}{right}"
        )
    found = ", ".join(f"{name} {ml:g}" for name, ml in record["found_ml"].items())
    parts.append(f"found (ml): {found or 'nothing'}")
    parts.append(f"node: {record['node_outcome']}")
    return first + "\n" + " | ".join(parts)


def montage_planes(labels: np.ndarray, reference: BoneReference) -> tuple[int, int, int, int]:
    """(middle axial slice, the axial slice where model and reference disagree most, coronal
    row, sagittal column): each reformat through the plane holding most of the largest
    reference component (of the model's bone when there is no reference), so that a bone
    running obliquely shows as much of its length as one plane can."""
    bone = reference.components == 1 if reference.component_ml else labels > 0
    if bone.any():
        row = int(np.argmax(bone.sum(axis=(0, 2))))
        column = int(np.argmax(bone.sum(axis=(0, 1))))
    else:
        row, column = labels.shape[1] // 2, labels.shape[2] // 2
    disagreement = ((labels > 0) != reference.bone) & ~reference.ignored
    worst = int(np.argmax(disagreement.sum(axis=(1, 2))))
    return labels.shape[0] // 2, worst, row, column


def write_montage(
    path: Path, volume: Volume, labels: np.ndarray, reference: BoneReference, title: str
) -> None:
    """Axial slices (middle; most disagreement), coronal and sagittal reformats at the true
    aspect ratio: the CT in a bone window, the labels in colour, the reference outlined."""
    hu = volume.array
    sx, sy, sz = volume.spacing
    middle, worst, row, column = montage_planes(labels, reference)
    views = [  # (title, CT, labels, reference, ignored, aspect, lower origin)
        (f"axial {middle}/{len(hu)} (middle)", np.s_[middle], sy / sx, False),
        (f"axial {worst}/{len(hu)} (most disagreement)", np.s_[worst], sy / sx, False),
        (f"coronal row {row}", np.s_[:, row, :], sz / sx, True),
        (f"sagittal column {column}", np.s_[:, :, column], sz / sy, True),
    ]
    widths = [hu.shape[2] * sx, hu.shape[2] * sx, hu.shape[2] * sx, hu.shape[1] * sy]
    heights = [hu.shape[1] * sy] * 2 + [hu.shape[0] * sz] * 2
    scale = PANEL_INCHES / max(heights)  # inches per mm: the tallest panel this high
    fig, axes = plt.subplots(
        1,
        4,
        figsize=(max(8.0, sum(widths) * scale + 1.2), PANEL_INCHES + 1.1),
        gridspec_kw={"width_ratios": widths},
    )
    palette = ListedColormap(["none", *(BONE_COLOURS[name] for name in BONE_NAMES.values())])
    for ax, (name, where, aspect, lower) in zip(axes, views, strict=True):
        origin = "lower" if lower else "upper"
        ax.imshow(hu[where], cmap="gray", vmin=BONE_WINDOW[0], vmax=BONE_WINDOW[1],
                  aspect=aspect, origin=origin, interpolation="nearest")  # fmt: skip
        shown = np.ma.masked_equal(labels[where], 0)
        ax.imshow(shown, cmap=palette, vmin=0, vmax=len(BONE_NAMES), alpha=0.45,
                  aspect=aspect, origin=origin, interpolation="nearest")  # fmt: skip
        for mask, colour, style in (
            (reference.bone[where], REFERENCE_COLOUR, "solid"),
            (reference.ignored[where], IGNORED_COLOUR, "dashed"),
        ):
            if mask.any() and not mask.all():
                # No origin: contour puts row i at y = i, as imshow does with either origin.
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.7, linestyles=style)
        ax.set_title(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    present = [v for v in BONE_NAMES if (labels == v).any()]
    handles = [Patch(color=BONE_COLOURS[BONE_NAMES[v]], label=BONE_NAMES[v]) for v in present]
    handles.append(Patch(facecolor="none", edgecolor=REFERENCE_COLOUR, label="reference"))
    if reference.ignored.any():
        handles.append(
            Patch(facecolor="none", edgecolor="grey", ls="--", label="ignored (FOV rim)")
        )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=7.5)
    fig.tight_layout(rect=(0, 0.07, 1, 0.92))
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=MONTAGE_DPI)
    plt.close(fig)
    # 256 colours are plenty for a grey CT with six label colours, at a third of the bytes.
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


# -- the run ---------------------------------------------------------------------------------


def aggregate(records: Iterable[dict]) -> dict:
    records = list(records)
    crops = [r for r in records if r["kind"] == "crop"]
    shafts = [r for r in crops if r["scores"]["class"] == "shaft"]
    others = [r for r in crops if r["scores"]["class"] == "other"]
    named = [r for r in crops if "named_right" in r["scores"]]
    dice_values = [r["scores"]["any_bone_dice"] for r in shafts]

    def mean_of(key: str, rows: list[dict]) -> float | None:
        values = [r["scores"][key] for r in rows if r["scores"].get(key) is not None]
        return round(float(np.mean(values)), 4) if values else None

    return {
        "shaft_crops": [r["case"] for r in shafts],
        "shaft_mean_any_bone_dice": round(float(np.mean(dice_values)), 4) if shafts else None,
        "shaft_min_any_bone_dice": round(float(min(dice_values)), 4) if shafts else None,
        "shaft_named_right": sum(bool(r["scores"].get("named_right")) for r in shafts),
        "shaft_named_of": sum("named_right" in r["scores"] for r in shafts),
        "largest_named_right": sum(bool(r["scores"]["named_right"]) for r in named),
        "largest_named_of": len(named),
        "largest_named_wrong": [
            f"{r['case']}: {r['scores']['largest_expected']} named {r['scores']['largest_named']}"
            for r in named
            if not r["scores"]["named_right"]
        ],
        "crops_without_findings": {
            r["case"]: r["node_outcome"] for r in crops if r["node_outcome"].startswith("no ")
        },
        "other_crops_mean_bone_recall": mean_of("bone_recall", others),
        "other_crops_mean_false_bone_share": mean_of("false_bone_share", others),
        "non_extremity": {
            r["case"]: {"found_ml": r["found_ml"], "node_outcome": r["node_outcome"]}
            for r in records
            if r["kind"] == "non_extremity"
        },
    }


def display_path(path: Path) -> str:
    """Relative to the repository when inside it: the JSON does not depend on the checkout."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def select(cases: list[Case], wanted: str | None) -> list[Case]:
    if not wanted:
        return cases
    ids = {name.strip() for name in wanted.split(",") if name.strip()}
    unknown = ids - {case.case_id for case in cases}
    if unknown:
        raise SystemExit(f"unknown cases: {', '.join(sorted(unknown))}")
    return [case for case in cases if case.case_id in ids]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--out", type=Path, default=RESULTS / "real_ct.json")
    parser.add_argument("--cases", help="comma-separated case ids (default: all)")
    parser.add_argument("--strategy", choices=["fast", "paper"], default="fast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["auto", "float32", "mixed"], default="auto")
    parser.add_argument("--montages", type=Path, default=RESULTS / "real_ct")
    parser.add_argument("--no-montages", action="store_true")
    parser.add_argument(
        "--phantom-subjects",
        default=",".join(map(str, HELD_OUT_SUBJECTS)),
        help="held-out LLP26 subjects for the phantom check (empty: none)",
    )
    parser.add_argument(
        "--phantom-slices",
        default=",".join(map(str, SLICE_THICKNESSES_MM)),
        help="slice thicknesses (mm) each phantom is scanned at",
    )
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"real data not found at {DATA} (shared/ beside the checkout)")
    cases = select(crop_cases() + dicom_cases(), args.cases)
    settings = InferenceSettings(
        strategy=args.strategy, device=args.device, precision=args.precision
    )
    segmenter = Segmenter(args.weights, settings)
    montages = None if args.no_montages else args.montages
    started = time.perf_counter()
    records = []
    for case in cases:
        record = run_case(case, segmenter, montages)
        scores = record["scores"]
        print(
            f"{case.case_id:22s} {scores.get('class', '-'):6s} "
            f"dice {scores.get('any_bone_dice', '-')!s:7s} "
            f"recall {scores.get('bone_recall')!s:7s} false {scores.get('false_bone_share')!s:7s} "
            f"largest {scores.get('largest_named', '-')} ({scores.get('named_right', '-')}) "
            f"found {record['found_ml']} {record['timings_s']['segment']:.1f} s",
            flush=True,
        )
        records.append(record)
    phantoms = None
    if args.phantom_subjects:
        subjects = [int(s) for s in args.phantom_subjects.split(",")]
        slices = [float(t) for t in args.phantom_slices.split(",")]
        phantoms = segment_subject_phantoms(subjects, segmenter, thicknesses_mm=slices)
        for case in phantoms["cases"]:
            dice = {k: round(v["dice"], 3) for k, v in case["bones"].items() if v["truth_voxels"]}
            print(f"{case['case']:28s} {dice}", flush=True)
    result = {
        "benchmark": "real_ct",
        "command": "python -m bench.real_ct",
        "weights": display_path(args.weights),
        "weights_sha256": segmenter.metadata.get("weights_sha256"),
        "strategy": args.strategy,
        "device": str(segmenter.device),
        "precision": str(segmenter.autocast or "torch.float32").removeprefix("torch."),
        "method": METHOD,
        "anatomy_method": "EXPECTED in bench/real_ct.py: each crop's site and the bone its "
        "largest reference component is, read off the montages by eye",
        "phantoms": phantoms,
        "machine": machine(),
        "wall_s": round(time.perf_counter() - started, 1),
        "aggregate": aggregate(records),
        "cases": records,
    }
    write_result(args.out, result)
    print(json.dumps(result["aggregate"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
