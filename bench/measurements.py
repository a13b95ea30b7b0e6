"""Issue 19, check 1: the HKA, femoral inclination and version, acetabular version, lateral
centre-edge (LCE) angle, acetabular coverage and alpha angle measured on the truth label maps
of phantoms of unseen shape subjects against the phantom's own geometry
(model.phantom.subjects.truth.true_hka, true_femoral_angles, true_hip_parameters).

Each phantom is a skeleton of a held-out LLP26 subject (HELD_OUT_SUBJECTS, 21-25) in poses,
feet and scale drawn from its seed; each leg's bones are voxelised whole (hip to talus: no
phantom region holds a whole leg) on an anisotropic grid and measured by
model.measure.measure_leg_alignment and measure_femoral_angles; the pelvis (both hip bones
and the femurs' tops) on the same grid by measure_hip_parameters. Per phantom a line goes to
the ``.jsonl`` beside the results (a rerun skips the phantoms already there) and the summary
(mean absolute difference, MAD, over the legs) is rewritten, with a Bland-Altman plot per
measurement (``docs/figures/bland_altman_<measurement>.png``); progress goes to stdout.

    nice -n 10 .venv/bin/python -m bench.measurements --phantoms 40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from model.labels import Side
from model.measure import measure_femoral_angles, measure_hip_parameters, measure_leg_alignment
from model.phantom.subjects.shapes import HELD_OUT_SUBJECTS
from model.phantom.subjects.skeleton import SIDES, build_skeleton
from model.phantom.subjects.truth import (
    leg_label_map,
    pelvis_label_map,
    true_femoral_angles,
    true_hip_parameters,
    true_hka,
)

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


def bland_altman(records: list[dict], folder: Path = FIGURES) -> list[Path]:
    """A Bland-Altman plot per measurement (the label map's minus the phantom's, against
    their mean; the mean difference and its 95 % limits of agreement) in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pairs in differences(records).items():
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
        axes.set_xlabel(f"mean of label map and phantom ({unit})")
        axes.set_ylabel(f"label map - phantom ({unit})")
        axes.set_title(
            f"{title}: {len(pairs)} legs, bias {bias:+.2f}, 95 % limits +-{spread:.2f} {unit}",
            fontsize=9,
        )
        figure.tight_layout()
        path = folder / f"bland_altman_{name}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=FIGURES)
    args = parser.parse_args(argv)
    cases = args.out.with_suffix(".jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = (
        [json.loads(line) for line in cases.read_text().splitlines() if line.strip()]
        if cases.exists()
        else []
    )
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
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
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
    bland_altman(records, args.figures)


if __name__ == "__main__":
    main()
