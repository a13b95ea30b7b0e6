"""Issue 19, checks 1-3. Check 1: the HKA, femoral inclination and version, acetabular
version, lateral centre-edge (LCE) angle, acetabular coverage and alpha angle measured on the
truth label maps of phantoms of unseen shape subjects against the phantom's own geometry
(model.phantom.subjects.truth.true_hka, true_femoral_angles, true_hip_parameters).

Each phantom is a skeleton of a held-out LLP26 subject (HELD_OUT_SUBJECTS, 21-25) in poses,
feet and scale drawn from its seed; each leg's bones are voxelised whole (hip to talus: no
phantom region holds a whole leg) on an anisotropic grid and measured by
model.measure.measure_leg_alignment and measure_femoral_angles; the pelvis (both hip bones
and the femurs' tops) on the same grid by measure_hip_parameters. Per phantom a line goes to
the ``.jsonl`` beside the results (a rerun skips the phantoms already there) and the summary
(mean absolute difference, MAD, over the legs) is rewritten, with a Bland-Altman plot per
measurement (``docs/figures/bland_altman_<measurement>.png``); progress goes to stdout.

Check 3 (``--invariance N``): the same phantoms' truth label maps scanned otherwise (stored
feet first or prone, the patient turned on the table, 3 mm slices, both hips rotated and
abducted, the field of view cut; `VARIANTS`), each variant's measurements against the
reference scan's. Check 2 (``--predicted N``): `PREDICTED_REGION` subject phantoms of the
held-out subjects at 0.8 mm segmented by the shipped model (`model.engine.inference.Segmenter`,
default settings), the measurements on the prediction against those on the truth labels, with
a Bland-Altman plot per measurement (``bland_altman_predicted_<measurement>.png``). Each keeps
its cases in its own ``.jsonl`` (resumed) and its summary under its own key of the results;
a measurement not measurable on one side of a comparison is counted with its reason, never
as a difference of 0.

    nice -n 10 .venv/bin/python -m bench.measurements --phantoms 40
    nice -n 10 .venv/bin/python -m bench.measurements --invariance 12
    nice -n 10 .venv/bin/python -m bench.measurements --invariance 20 --indices 7,11
    nice -n 10 .venv/bin/python -m bench.measurements --predicted 10
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.results_file import write_result
from model.labels import Bone, Side
from model.measure import (
    Measurement,
    measure_femoral_angles,
    measure_hip_parameters,
    measure_leg_alignment,
)
from model.phantom.subjects import generate_subject_phantom
from model.phantom.subjects.shapes import HELD_OUT_SUBJECTS
from model.phantom.subjects.skeleton import SIDES, BonePart, LegPose, Skeleton, build_skeleton
from model.phantom.subjects.truth import (
    leg_label_map,
    pelvis_label_map,
    sided_phantom_labels,
    true_femoral_angles,
    true_hip_parameters,
    true_hka,
)
from model.volume_io import Volume

RESULTS = Path(__file__).parent / "results" / "measurements.json"
FIGURES = Path(__file__).parent.parent / "docs" / "figures"
SPACING = (1.0, 1.0, 2.0)  # x, y, z mm: thin CT slices are rarely isotropic in practice
TARGET_MAD_DEG = 0.5
TARGET_FEMORAL_MAD_DEG = 1.5  # inclination, version
# The hip parameters: the record's key, the HipMeasures attribute, unit and the target.
HIP_MEASUREMENTS = {
    "acetabular_version": ("version", "deg", 2.0),
    "lateral_centre_edge": ("lce", "deg", 2.0),
    "coverage": ("coverage", "%", 3.0),
    "alpha": ("alpha", "deg", 5.0),
}


def measure_phantom(index: int) -> dict:
    """One phantom: subject and seed from ``index``; both legs' true and measured HKA."""
    subject = HELD_OUT_SUBJECTS[index % len(HELD_OUT_SUBJECTS)]
    seed = 1900 + index
    skeleton = build_skeleton(np.random.default_rng([seed, 18]), subject=subject)
    geometry = {"landmarks": skeleton.landmarks}
    start = time.perf_counter()
    pelvis = pelvis_label_map(skeleton, spacing=SPACING)
    pelvis_legs = measure_leg_alignment(pelvis)
    hips = measure_hip_parameters(pelvis, pelvis_legs)
    hip_seconds = time.perf_counter() - start
    legs = {}
    necks = {}
    for side in SIDES:
        start = time.perf_counter()
        volume = leg_label_map(skeleton, side, spacing=SPACING)
        sided = Side.LEFT if side == "left" else Side.RIGHT
        legs_measured = measure_leg_alignment(volume)
        leg = legs_measured[sided]
        femur = measure_femoral_angles(volume, legs_measured)[sided]
        truth_3d, truth_coronal = true_hka(geometry, side)
        necks[side], true_inclination, true_version = true_femoral_angles(skeleton, side)
        legs[side] = {
            "true_hka_coronal_deg": round(truth_coronal, 3),
            "true_hka_3d_deg": round(truth_3d, 3),
            "hka_coronal_deg": leg.hka_coronal.value,
            "hka_3d_deg": leg.hka_3d.value,
            "not_measurable": leg.hka_coronal.reason,
            "true_inclination_deg": _round(true_inclination),
            "true_version_deg": _round(true_version),
            "inclination_deg": femur.inclination.value,
            "version_deg": femur.version.value,
            "femur_not_measurable": femur.inclination.reason or femur.version.reason,
            "seconds": round(time.perf_counter() - start, 2),
            "pose": skeleton.geometry["poses"][side],
        }
    true_hips, _ = true_hip_parameters(skeleton, necks)
    for side in SIDES:
        hip = hips[Side.LEFT if side == "left" else Side.RIGHT]
        truth = true_hips[side]
        for name, (attribute, _, _) in HIP_MEASUREMENTS.items():
            legs[side][f"true_{name}"] = _round(getattr(truth, attribute))
            legs[side][name] = getattr(hip, name).value
        legs[side]["hip_not_measurable"] = (
            "; ".join(
                f"{getattr(hip, name)}"
                for name in HIP_MEASUREMENTS
                if not getattr(hip, name).measurable
            )
            or None
        )
        legs[side]["alpha_clock"] = hip.alpha_clock
        legs[side]["true_alpha_clock"] = truth.alpha_clock
        legs[side]["pelvic_frame"] = hip.pelvic_frame
        legs[side]["hip_seconds"] = round(hip_seconds / 2, 2)
    return {"index": index, "subject": subject, "seed": seed, "legs": legs}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def differences(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Per measurement, the (truth, measured) pairs of the legs where both exist (the 3-D HKA
    by size: its sign is the coronal one's, which near 0 may differ)."""
    pairs: dict[str, list[tuple[float, float]]] = {
        "hka_coronal": [],
        "hka_3d_magnitude": [],
        "inclination": [],
        "version": [],
        **{name: [] for name in HIP_MEASUREMENTS},
    }
    for record in records:
        for leg in record["legs"].values():
            if leg["hka_coronal_deg"] is not None:
                pairs["hka_coronal"].append((leg["true_hka_coronal_deg"], leg["hka_coronal_deg"]))
                pairs["hka_3d_magnitude"].append(
                    (abs(leg["true_hka_3d_deg"]), abs(leg["hka_3d_deg"]))
                )
            for name in ("inclination", "version"):
                measured, true = leg.get(f"{name}_deg"), leg.get(f"true_{name}_deg")
                if measured is not None and true is not None:
                    pairs[name].append((true, measured))
            for name in HIP_MEASUREMENTS:
                measured, true = leg.get(name), leg.get(f"true_{name}")
                if measured is not None and true is not None:
                    pairs[name].append((true, measured))
    return pairs


def stats(pairs: list[tuple[float, float]], unit: str = "deg") -> dict:
    """Mean absolute difference (measured - truth), its SD, the largest and the mean signed
    difference, keyed with the unit ("mad_deg", ...)."""
    values = [measured - true for true, measured in pairs]
    a = np.abs(values)
    key = "pct" if unit == "%" else unit
    return {
        f"mad_{key}": round(float(a.mean()), 3) if len(a) else None,
        f"sd_{key}": round(float(a.std()), 3) if len(a) else None,
        f"max_{key}": round(float(a.max()), 3) if len(a) else None,
        f"mean_signed_{key}": round(float(np.mean(values)), 3) if len(a) else None,
    }


def summarise(records: list[dict]) -> dict:
    pairs = differences(records)
    legs = sum(len(record["legs"]) for record in records)
    hip_records = [leg for record in records for leg in record["legs"].values() if "alpha" in leg]
    return {
        "check": "issue 19 check 1: HKA, femoral inclination and version, acetabular version, "
        "LCE, coverage and alpha on truth label maps vs the phantom's geometry",
        "data": "subject-phantom skeletons of held-out LLP26 subjects 21-25, whole legs and "
        f"the pelvis voxelised at {SPACING} mm (x, y, z)",
        "phantoms": len(records),
        "legs_measured": len(pairs["hka_coronal"]),
        "legs_not_measurable": legs - len(pairs["hka_coronal"]),
        "target_mad_deg": TARGET_MAD_DEG,
        "hka_coronal": stats(pairs["hka_coronal"]),
        "hka_3d_magnitude": stats(pairs["hka_3d_magnitude"]),
        "target_femoral_mad_deg": TARGET_FEMORAL_MAD_DEG,
        "legs_femoral_measured": {name: len(pairs[name]) for name in ("inclination", "version")},
        "femoral_inclination": stats(pairs["inclination"]),
        "femoral_version": stats(pairs["version"]),
        "hips": len(hip_records),
        "hips_measured": {name: len(pairs[name]) for name in HIP_MEASUREMENTS},
        **{
            name: {**stats(pairs[name], unit), "target_mad": target}
            for name, (_, unit, target) in HIP_MEASUREMENTS.items()
        },
    }


PLOTTED = {
    "hka_coronal": ("HKA, coronal", "deg"),
    "inclination": ("femoral inclination", "deg"),
    "version": ("femoral version", "deg"),
    "acetabular_version": ("acetabular version", "deg"),
    "lateral_centre_edge": ("lateral centre-edge angle", "deg"),
    "coverage": ("acetabular coverage", "%"),
    "alpha": ("alpha angle", "deg"),
}


def bland_altman(
    differences_by_name: dict[str, list[tuple[float, float]]],
    folder: Path = FIGURES,
    prefix: str = "",
    measured_name: str = "label map",
    reference_name: str = "phantom",
) -> list[Path]:
    """A Bland-Altman plot per measurement of (reference, measured) pairs (measured minus
    reference, against their mean; the mean difference and its 95 % limits of agreement) in
    ``folder``, ``bland_altman_<prefix>_<measurement>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pairs in differences_by_name.items():
        if name not in PLOTTED or len(pairs) < 2:
            continue
        title, unit = PLOTTED[name]
        true, measured = np.array(pairs).T
        mean, difference = (true + measured) / 2, measured - true
        bias, spread = float(difference.mean()), 1.96 * float(difference.std(ddof=1))
        figure, axes = plt.subplots(figsize=(5.0, 3.6), dpi=110)
        axes.scatter(mean, difference, s=12, alpha=0.7)
        for level, style in ((bias, "-"), (bias - spread, "--"), (bias + spread, "--")):
            axes.axhline(level, color="grey", linestyle=style, linewidth=1)
        axes.set_xlabel(f"mean of {measured_name} and {reference_name} ({unit})")
        axes.set_ylabel(f"{measured_name} - {reference_name} ({unit})")
        cases = "legs" if name in LEG_NAMES else "hips"
        axes.set_title(
            f"{title}: {len(pairs)} {cases}, bias {bias:+.2f}, 95 % limits +-{spread:.2f} {unit}",
            fontsize=9,
        )
        figure.tight_layout()
        path = folder / f"bland_altman_{prefix + '_' if prefix else ''}{name}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


# -- checks 2 and 3: one measurement against another of the same bones -----------------------

# Each measurement compared in checks 2 and 3, and its unit.
COMPARED = {
    "hka_coronal": "deg",
    "hka_3d": "deg",
    "inclination": "deg",
    "version": "deg",
    "acetabular_version": "deg",
    "lateral_centre_edge": "deg",
    "coverage": "%",
    "alpha": "deg",
}
LEG_NAMES = ("hka_coronal", "hka_3d", "inclination", "version")
# The targets for check 2 (segmentation), as mean absolute differences.
TARGETS_PREDICTED = {
    "hka_coronal": 0.3,
    "hka_3d": 0.3,
    "inclination": 1.0,
    "version": 1.0,
    "acetabular_version": 1.5,
    "lateral_centre_edge": 1.5,
    "coverage": 1.5,
    "alpha": 3.0,
}
Found = dict[str, dict[str, list]]  # side -> measurement -> [value or None, reason or None]


def measure_map(volume: Volume, names: tuple[str, ...] = tuple(COMPARED)) -> Found:
    """The measurements of ``names`` on a sided label map, per side found ("left", "right"):
    [value, None] or [None, the reason it is not measurable]."""
    legs = measure_leg_alignment(volume)
    femoral = measure_femoral_angles(volume, legs)
    wanted_hips = any(name in HIP_MEASUREMENTS for name in names)
    hips = measure_hip_parameters(volume, legs, femoral) if wanted_hips else {}
    out: Found = {}
    for side, leg in legs.items():
        found: dict[str, Measurement] = {
            "hka_coronal": leg.hka_coronal,
            "hka_3d": leg.hka_3d,
            "inclination": femoral[side].inclination,
            "version": femoral[side].version,
        }
        if side in hips:
            found.update({name: getattr(hips[side], name) for name in HIP_MEASUREMENTS})
        out[side.name.lower()] = {
            name: [_round(found[name].value), found[name].reason] for name in names if name in found
        }
    return out


def compare(pairs: list[tuple[list | None, list | None]], name: str) -> dict:
    """Over (reference, other) pairs of one measurement: the mean absolute difference (other
    minus reference; the 3-D HKA by size) where both are measured, and how often either is not
    measurable, with the reasons: a measurement that is lost counts apart, never as 0."""
    differences = []
    lost: dict[str, int] = {}
    reference_lost: dict[str, int] = {}
    for reference, other in pairs:
        if reference is None or reference[0] is None:
            why = "not measured" if reference is None else reference[1]
            reference_lost[why] = reference_lost.get(why, 0) + 1
        elif other is None or other[0] is None:
            why = "not measured" if other is None else other[1]
            lost[why] = lost.get(why, 0) + 1
        elif name == "hka_3d":
            differences.append(abs(other[0]) - abs(reference[0]))
        else:
            differences.append(other[0] - reference[0])
    a = np.abs(differences)
    return {
        "compared": len(differences),
        "mad": round(float(a.mean()), 3) if len(a) else None,
        "median": round(float(np.median(a)), 3) if len(a) else None,
        "max": round(float(a.max()), 3) if len(a) else None,
        "mean_signed": round(float(np.mean(differences)), 3) if len(a) else None,
        "not_measurable": sum(lost.values()),
        "not_measurable_reasons": lost,
        "reference_not_measurable": sum(reference_lost.values()),
        "reference_not_measurable_reasons": reference_lost,
    }


# Check 3: the reference scan (head first supine, SPACING, the whole leg or pelvis) and the
# same bones scanned otherwise.
VARIANTS = {
    "feet_first": "the reference's voxels stored as a feet-first scan's (x and z reversed)",
    "prone": "the reference's voxels stored as a prone scan's (x and y reversed)",
    "turned": "the patient turned on the table (10 deg about the long axis, 8 deg about the "
    "antero-posterior, 5 deg head down), voxelised anew",
    "slices_3mm": "1 x 1 x 3 mm voxels, voxelised anew",
    "hip_pose": "both hips rotated 15 deg further about the vertical and abducted 6 deg "
    "further (each bone's own frame unchanged), voxelised anew",
    "cut": "the field of view cut: each leg from 3 mm below the talus to 10 mm above the "
    "femoral head (the iliac wing and the calcaneus cut), the pelvis from 60 mm below the "
    "lower femoral head's centre to 15 mm below the iliac crests",
}
TURN_DEG = (10.0, 8.0, 5.0)  # about the z (long), y (antero-posterior) and x axes
HIP_ROTATION_CHANGE_DEG, HIP_ABDUCTION_CHANGE_DEG = 15.0, 6.0


def posed_skeleton(seed: int, subject: int, hip_pose_changed: bool = False) -> Skeleton:
    """Check 1's skeleton of ``seed`` (the feet and poses drawn as `build_skeleton` draws
    them), or the same bones with both hips rotated and abducted further."""
    rng = np.random.default_rng([seed, 18])
    feet = (str(rng.choice(["VHM", "VHF"])), str(rng.choice(["VHM", "VHF"])))
    poses = (LegPose.draw(rng), LegPose.draw(rng))
    if hip_pose_changed:
        left, right = (
            replace(
                pose,
                hip_rotation_deg=pose.hip_rotation_deg + HIP_ROTATION_CHANGE_DEG,
                hip_abduction_deg=pose.hip_abduction_deg + HIP_ABDUCTION_CHANGE_DEG,
            )
            for pose in poses
        )
        poses = (left, right)
    return build_skeleton(rng, subject=subject, feet=feet, poses=poses)


def turned(skeleton: Skeleton, degrees: tuple[float, float, float] = TURN_DEG) -> Skeleton:
    """The skeleton turned about the middle of its hip bones: a patient lying turned."""
    from scipy.spatial.transform import Rotation

    rotation = Rotation.from_euler("zyx", degrees, degrees=True).as_matrix()
    hips = [p.mesh.vertices for p in skeleton.parts if p.label == Bone.HIP_BONE]
    centre = np.vstack(hips).mean(axis=0)
    parts = [
        BonePart(p.name, p.mesh.transformed(rotation, centre, np.zeros(3)), p.label, p.kind)
        for p in skeleton.parts
    ]
    landmarks = {
        name: point if "radius" in name else (point - centre) @ rotation.T + centre
        for name, point in skeleton.landmarks.items()
    }
    return Skeleton(parts, landmarks, skeleton.geometry)


def flipped(volume: Volume, axes: tuple[int, ...]) -> Volume:
    """The same voxels stored with the grid's ``axes`` (0 x, 1 y, 2 z) reversed: the origin
    moves to the other end and the axis' direction turns."""
    array = volume.array
    direction = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3).copy()
    origin = np.asarray(volume.origin, dtype=np.float64)
    for axis in axes:
        count = array.shape[2 - axis]
        origin = origin + direction[:, axis] * volume.spacing[axis] * (count - 1)
        direction[:, axis] *= -1
        array = np.flip(array, axis=2 - axis)
    ox, oy, oz = (float(v) for v in origin)
    return Volume(
        np.ascontiguousarray(array), volume.spacing, (ox, oy, oz), tuple(direction.ravel())
    )


def cropped(volume: Volume, z_lo: float, z_hi: float) -> Volume:
    """An axis-aligned volume's slices in patient z [z_lo, z_hi]: the bones meet the grid's
    edges there, as in a scan cut short."""
    z = volume.origin[2] + volume.spacing[2] * np.arange(volume.array.shape[0])
    keep = np.nonzero((z >= z_lo) & (z <= z_hi))[0]
    origin = (volume.origin[0], volume.origin[1], float(z[keep[0]]))
    return Volume(volume.array[keep[0] : keep[-1] + 1].copy(), volume.spacing, origin)


def _scans(
    skeleton: Skeleton, spacing: tuple[float, float, float] = SPACING
) -> tuple[dict[str, Volume], Volume]:
    legs = {side: leg_label_map(skeleton, side, spacing=spacing) for side in SIDES}
    return legs, pelvis_label_map(skeleton, spacing=spacing)


def measure_scan(legs: dict[str, Volume], pelvis: Volume) -> Found:
    """Per side the leg's measurements on its whole-leg map and the hip's on the pelvis."""
    found = measure_map(pelvis, tuple(HIP_MEASUREMENTS))
    for side, volume in legs.items():
        found.setdefault(side, {}).update(measure_map(volume, LEG_NAMES).get(side, {}))
    return found


def _cuts(skeleton: Skeleton) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """The z ranges of the `cut` variant: per leg, and the pelvis'."""
    meshes = {p.name: p.mesh for p in skeleton.parts}
    lm = skeleton.landmarks
    legs = {}
    for side in SIDES:
        head = float(lm[f"femoral_head_centre_{side}"][2])
        radius = float(lm[f"femoral_head_radius_{side}"][0])
        legs[side] = (float(meshes[f"talus_{side}"].lo[2]) - 3.0, head + radius + 10.0)
    heads = min(float(lm[f"femoral_head_centre_{side}"][2]) for side in SIDES)
    crests = min(float(meshes[f"hip_bone_{side}"].hi[2]) for side in SIDES)
    return legs, (heads - 60.0, crests - 15.0)


def invariance_phantom(index: int) -> dict:
    """Check 3 on one phantom (check 1's subject and seed of ``index``): its measurements on
    the reference scan and on each variant's."""
    subject = HELD_OUT_SUBJECTS[index % len(HELD_OUT_SUBJECTS)]
    seed = 1900 + index
    start = time.perf_counter()
    skeleton = posed_skeleton(seed, subject)
    legs, pelvis = _scans(skeleton)
    variants = {}
    reference = measure_scan(legs, pelvis)
    variants["feet_first"] = measure_scan(
        {side: flipped(volume, (0, 2)) for side, volume in legs.items()}, flipped(pelvis, (0, 2))
    )
    variants["prone"] = measure_scan(
        {side: flipped(volume, (0, 1)) for side, volume in legs.items()}, flipped(pelvis, (0, 1))
    )
    leg_cuts, pelvis_cut = _cuts(skeleton)
    variants["cut"] = measure_scan(
        {side: cropped(volume, *leg_cuts[side]) for side, volume in legs.items()},
        cropped(pelvis, *pelvis_cut),
    )
    del legs, pelvis
    variants["slices_3mm"] = measure_scan(*_scans(skeleton, (1.0, 1.0, 3.0)))
    variants["turned"] = measure_scan(*_scans(turned(skeleton)))
    moved = posed_skeleton(seed, subject, True)
    variants["hip_pose"] = measure_scan(*_scans(moved))
    # The generator turns each leg about its `hip` landmark, a little off the head's sphere:
    # how far the head's true centre moved in its cup.
    head_shift = {
        side: round(
            float(
                np.linalg.norm(
                    moved.landmarks[f"femoral_head_centre_{side}"]
                    - skeleton.landmarks[f"femoral_head_centre_{side}"]
                )
            ),
            2,
        )
        for side in SIDES
    }
    return {
        "index": index,
        "subject": subject,
        "seed": seed,
        "reference": reference,
        "variants": variants,
        "hip_pose_head_shift_mm": head_shift,
        "seconds": round(time.perf_counter() - start, 1),
    }


def invariance_summary(records: list[dict]) -> dict:
    return {
        "check": "issue 19 check 3: the same bones scanned in another orientation, pose, "
        "slice thickness or field of view; each variant's measurement minus the reference "
        "scan's, on truth label maps",
        "data": "subject-phantom skeletons of held-out LLP26 subjects 21-25 (check 1's "
        f"phantoms, seeds 1900+), the reference scan head first supine at {SPACING} mm "
        "(x, y, z), whole legs and the pelvis",
        "phantoms": len(records),
        "variants": {
            variant: {
                "what": what,
                **{
                    name: compare(
                        [
                            (
                                r["reference"].get(side, {}).get(name),
                                r["variants"][variant].get(side, {}).get(name),
                            )
                            for r in records
                            for side in SIDES
                        ],
                        name,
                    )
                    for name in COMPARED
                },
            }
            for variant, what in VARIANTS.items()
        },
    }


# Check 2: the shipped model's segmentation of a phantom CT against the phantom's truth labels.
PREDICTED_REGION = "hip"


def predicted_phantom(index: int, segmenter) -> dict:
    """Check 2 on one phantom: a `PREDICTED_REGION` subject phantom of a held-out subject
    (0.8 mm), its CT segmented by ``segmenter``; the measurements on the prediction and on the
    phantom's truth labels (split into sides as the model's are)."""
    subject = HELD_OUT_SUBJECTS[index % len(HELD_OUT_SUBJECTS)]
    seed = 1950 + index
    start = time.perf_counter()
    phantom = generate_subject_phantom(seed, PREDICTED_REGION, subject=subject)
    image = phantom.image(np.random.default_rng([seed, 19]))
    generated = time.perf_counter() - start
    segmentation = segmenter.segment(image)
    segmented = time.perf_counter() - start - generated
    truth = measure_map(sided_phantom_labels(phantom))
    predicted = measure_map(segmentation.sided)
    return {
        "index": index,
        "subject": subject,
        "seed": seed,
        "region": PREDICTED_REGION,
        "side": phantom.geometry["side"],
        "implant": phantom.geometry["implant"],
        "verdict": segmentation.assessment.verdict.value,
        "truth": truth,
        "predicted": predicted,
        "seconds": {
            "phantom": round(generated, 1),
            "segment": round(segmented, 1),
            "total": round(time.perf_counter() - start, 1),
        },
    }


NO_SEG = "no SEG: the segmentation's verdict is implausible"


def predicted_pairs(
    records: list[dict], name: str, as_the_node: bool = True
) -> list[tuple[list | None, list | None]]:
    """(truth, predicted) of one measurement per leg of the truth (a leg the prediction alone
    has is counted apart: `predicted_summary`'s "legs_only_predicted"). ``as_the_node``: a
    segmentation whose verdict is implausible has no measurements, as the node makes no SEG
    of it; otherwise it is measured all the same."""
    return [
        (
            truth.get(name),
            [None, NO_SEG]
            if as_the_node and record["verdict"] == "implausible"
            else record["predicted"].get(side, {}).get(name),
        )
        for record in records
        for side, truth in sorted(record["truth"].items())
    ]


def predicted_summary(records: list[dict], model: str | None) -> dict:
    return {
        "check": "issue 19 check 2: measurements on the shipped model's segmentation minus "
        "those on the phantom's truth labels",
        "data": f"'{PREDICTED_REGION}' subject phantoms 1.2 of held-out LLP26 subjects 21-25 "
        "(seeds 1950+, 0.8 mm, one CT image each), segmented by model.engine.inference."
        "Segmenter with the default InferenceSettings",
        "model": model,
        "phantoms": len(records),
        "target_phantoms": 30,
        "legs": sum(len(record["truth"]) for record in records),
        # Legs of the prediction the truth does not have (a piece of bone given the other side).
        "legs_only_predicted": sum(
            len(set(record["predicted"]) - set(record["truth"])) for record in records
        ),
        "verdicts": {
            verdict: sum(record["verdict"] == verdict for record in records)
            for verdict in sorted({record["verdict"] for record in records})
        },
        # As the node reports them: none of a segmentation whose verdict is implausible.
        "measurements": {
            name: {
                **compare(predicted_pairs(records, name), name),
                "unit": unit,
                "target_mad": TARGETS_PREDICTED[name],
            }
            for name, unit in COMPARED.items()
        },
        # Every segmentation measured, the implausible ones too.
        "measurements_every_segmentation": {
            name: compare(predicted_pairs(records, name, as_the_node=False), name)
            for name in COMPARED
        },
    }


def write_results(path: Path, key: str | None, summary: dict) -> None:
    """Check 1's summary at the top of ``path`` (``key`` None) or another check's under
    ``key``, the rest of the file kept."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(summary if key is None else {key: summary})
    write_result(path, results)


def read_cases(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_invariance(count: int, out: Path, indices: list[int] | None = None) -> None:
    """Check 3 on the phantoms of indices below ``count`` (or of ``indices`` alone) not yet in
    its cases."""
    cases = out.with_name("measurements_invariance.jsonl")
    records = read_cases(cases)
    done = {r["index"] for r in records}
    for index in range(count):
        if index in done or (indices is not None and index not in indices):
            continue
        record = invariance_phantom(index)
        with cases.open("a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        summary = invariance_summary(records)
        write_results(out, "check3_invariance", summary)
        worst = {
            variant: max(
                (v["mad"] or 0.0 for k, v in values.items() if isinstance(v, dict)), default=0.0
            )
            for variant, values in summary["variants"].items()
        }
        hip_pose = {
            side: {
                name: None
                if record["reference"].get(side, {}).get(name, [None])[0] is None
                or record["variants"]["hip_pose"].get(side, {}).get(name, [None])[0] is None
                else round(
                    record["variants"]["hip_pose"][side][name][0]
                    - record["reference"][side][name][0],
                    2,
                )
                for name in ("inclination", "version", "coverage", "lateral_centre_edge")
            }
            for side in SIDES
        }
        print(
            f"invariance {index + 1}/{count} subject {record['subject']} "
            f"({record['seconds']:.0f} s): hip_pose minus reference {hip_pose}; "
            f"largest MAD per variant so far {worst}",
            flush=True,
        )
    write_results(out, "check3_invariance", invariance_summary(records))


def run_predicted(count: int, out: Path, figures: Path) -> None:
    """Check 2 on the phantoms of indices below ``count`` not yet in its cases; the summary
    and the plots after each, and at the end (a rerun with nothing new rewrites them)."""
    from model.engine.inference import InferenceSettings, Segmenter

    segmenter = Segmenter(settings=InferenceSettings())
    model = segmenter.metadata.get("name")
    cases = out.with_name("measurements_predicted.jsonl")
    records = read_cases(cases)
    done = {r["index"] for r in records}
    for index in range(count):
        if index in done:
            continue
        record = predicted_phantom(index, segmenter)
        with cases.open("a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        summary = write_predicted(records, model, out, figures)
        mads = {name: m["mad"] for name, m in summary["measurements"].items()}
        print(
            f"predicted {index + 1}/{count} subject {record['subject']} {record['seconds']}: "
            f"MAD so far {mads}",
            flush=True,
        )
    write_predicted(records, model, out, figures)


def write_predicted(records: list[dict], model: str | None, out: Path, figures: Path) -> dict:
    """Check 2's summary into the results and its Bland-Altman plots into ``figures``."""
    summary = predicted_summary(records, model)
    write_results(out, "check2_predicted", summary)
    pairs = {
        name: [
            (truth[0], predicted[0])
            for truth, predicted in predicted_pairs(records, name)
            if truth and predicted and truth[0] is not None and predicted[0] is not None
        ]
        for name in PLOTTED
    }
    bland_altman(pairs, figures, "predicted", "prediction", "truth labels")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=30, help="check 1 on this many")
    parser.add_argument(
        "--invariance", type=int, metavar="N", help="check 3 on N phantoms instead of check 1"
    )
    parser.add_argument(
        "--predicted", type=int, metavar="N", help="check 2 on N phantoms instead of check 1"
    )
    parser.add_argument(
        "--indices",
        type=lambda text: [int(i) for i in text.split(",")],
        metavar="I,J,...",
        help="with --invariance: only these phantoms (e.g. those a change is about)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=FIGURES)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.invariance:
        run_invariance(args.invariance, args.out, args.indices)
        return
    if args.predicted:
        run_predicted(args.predicted, args.out, args.figures)
        return
    cases = args.out.with_suffix(".jsonl")
    records = read_cases(cases)
    done = {r["index"] for r in records}
    for index in range(args.phantoms):
        if index in done:
            continue
        start = time.perf_counter()
        record = measure_phantom(index)
        with cases.open("a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        summary = summarise(records)
        write_results(args.out, None, summary)
        diffs = [
            None
            if leg["hka_coronal_deg"] is None
            else round(leg["hka_coronal_deg"] - leg["true_hka_coronal_deg"], 2)
            for leg in record["legs"].values()
        ]
        print(
            f"phantom {index + 1}/{args.phantoms} subject {record['subject']}: coronal HKA "
            f"differences {diffs} deg; MAD so far {summary['hka_coronal']['mad_deg']} deg "
            f"over {summary['legs_measured']} legs; inclination MAD "
            f"{summary['femoral_inclination']['mad_deg']}, version MAD "
            f"{summary['femoral_version']['mad_deg']} deg; acetabular version MAD "
            f"{summary['acetabular_version']['mad_deg']}, LCE "
            f"{summary['lateral_centre_edge']['mad_deg']} deg, coverage "
            f"{summary['coverage']['mad_pct']} %, alpha {summary['alpha']['mad_deg']} deg "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    bland_altman(differences(records), args.figures)


if __name__ == "__main__":
    main()
