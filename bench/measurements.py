"""Issue 19, check 1: the HKA, femoral inclination and femoral version measured on the truth
label maps of phantoms of unseen shape subjects against the phantom's own geometry
(model.phantom.subjects.truth.true_hka, true_femoral_angles).

Each phantom is a skeleton of a held-out LLP26 subject (HELD_OUT_SUBJECTS, 21-25) in poses,
feet and scale drawn from its seed; each leg's bones are voxelised whole (hip to talus: no
phantom region holds a whole leg) on an anisotropic grid and measured by
model.measure.measure_leg_alignment and measure_femoral_angles. Per phantom a line goes to
the ``.jsonl`` beside the results (a rerun skips the phantoms already there) and the summary
(mean absolute difference, MAD, over the legs) is rewritten; progress goes to stdout.

    nice -n 10 .venv/bin/python -m bench.measurements --phantoms 40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from model.labels import Side
from model.measure import measure_femoral_angles, measure_leg_alignment
from model.phantom.subjects.shapes import HELD_OUT_SUBJECTS
from model.phantom.subjects.skeleton import SIDES, build_skeleton
from model.phantom.subjects.truth import leg_label_map, true_femoral_angles, true_hka

RESULTS = Path(__file__).parent / "results" / "measurements.json"
SPACING = (1.0, 1.0, 2.0)  # x, y, z mm: thin CT slices are rarely isotropic in practice
TARGET_MAD_DEG = 0.5
TARGET_FEMORAL_MAD_DEG = 1.5  # inclination, version


def measure_phantom(index: int) -> dict:
    """One phantom: subject and seed from ``index``; both legs' true and measured HKA."""
    subject = HELD_OUT_SUBJECTS[index % len(HELD_OUT_SUBJECTS)]
    seed = 1900 + index
    skeleton = build_skeleton(np.random.default_rng([seed, 18]), subject=subject)
    geometry = {"landmarks": skeleton.landmarks}
    legs = {}
    for side in SIDES:
        start = time.perf_counter()
        volume = leg_label_map(skeleton, side, spacing=SPACING)
        sided = Side.LEFT if side == "left" else Side.RIGHT
        legs_measured = measure_leg_alignment(volume)
        leg = legs_measured[sided]
        femur = measure_femoral_angles(volume, legs_measured)[sided]
        truth_3d, truth_coronal = true_hka(geometry, side)
        _, true_inclination, true_version = true_femoral_angles(skeleton, side)
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
    return {"index": index, "subject": subject, "seed": seed, "legs": legs}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def summarise(records: list[dict]) -> dict:
    coronal, angle_3d, unmeasured = [], [], 0
    femoral: dict[str, list[float]] = {"inclination": [], "version": []}
    for record in records:
        for leg in record["legs"].values():
            for name, values in femoral.items():
                measured, true = leg.get(f"{name}_deg"), leg.get(f"true_{name}_deg")
                if measured is not None and true is not None:
                    values.append(measured - true)
            if leg["hka_coronal_deg"] is None:
                unmeasured += 1
                continue
            coronal.append(leg["hka_coronal_deg"] - leg["true_hka_coronal_deg"])
            # The 3-D angle's sign is the coronal one's: near 0 it may differ; compare sizes.
            angle_3d.append(abs(leg["hka_3d_deg"]) - abs(leg["true_hka_3d_deg"]))

    def stats(values: list[float]) -> dict:
        a = np.abs(values)
        return {
            "mad_deg": round(float(a.mean()), 3) if len(a) else None,
            "sd_deg": round(float(a.std()), 3) if len(a) else None,
            "max_deg": round(float(a.max()), 3) if len(a) else None,
            "mean_signed_deg": round(float(np.mean(values)), 3) if len(a) else None,
        }

    return {
        "check": "issue 19 check 1: HKA, femoral inclination and version on truth label maps "
        "vs the phantom's geometry",
        "data": "subject-phantom skeletons of held-out LLP26 subjects 21-25, whole legs "
        f"voxelised at {SPACING} mm (x, y, z)",
        "phantoms": len(records),
        "legs_measured": len(coronal),
        "legs_not_measurable": unmeasured,
        "target_mad_deg": TARGET_MAD_DEG,
        "hka_coronal": stats(coronal),
        "hka_3d_magnitude": stats(angle_3d),
        "target_femoral_mad_deg": TARGET_FEMORAL_MAD_DEG,
        "legs_femoral_measured": {name: len(v) for name, v in femoral.items()},
        "femoral_inclination": stats(femoral["inclination"]),
        "femoral_version": stats(femoral["version"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
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
            f"{summary['femoral_version']['mad_deg']} deg ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
