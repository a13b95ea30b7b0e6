"""Inference benchmark: a full-size phantom with `fast`, and `fast` against `paper` on a slab
(and `paper` with its windows and patches tiled without overlap, to show what their edges cost),
and `dicom-node segment` on the whole-leg phantom at its native slices as a user runs it.

    python -m bench.inference [--device cpu|cuda] [--out bench/results/inference.json]
                              [--halo N] [--weights W] [--precision float32|mixed]
                              (the full scan again, with another halo, other weights or
                               another precision, in the same run)
                              [--cli-only] (only the `dicom-node segment` entry, written into
                               the results already in --out)

Each segmentation runs in its own process (bench/segment_worker.py, or the command itself) so
that peak RSS is that of one segmentation, not of the phantom generator. Timings are wall-clock
on this machine; the machine is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.results_file import machine, write_result
from model.engine.segment_files import output_paths
from model.labels import BONE_NAMES
from model.metrics import dice, evaluate_labels
from model.phantom import generate_phantom
from model.volume_io import Volume, read_volume, write_volume

FULL_SEED = 4242
SLAB_SLICES = 200
SPACING = (0.8, 0.8, 0.8)  # mm: the model's own grid


def run_worker(
    image: Path, workdir: Path, strategy: str, device: str, **options: object
) -> tuple[dict, np.ndarray]:
    """Segment `image` in a worker process; `options` are segment_worker's (halo=8 is --halo 8)."""
    name = "-".join([image.stem, strategy, *options])  # option names: values may be paths
    labels, report = workdir / f"{name}-labels.mha", workdir / f"{name}.json"
    flags = [arg for k, v in options.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.segment_worker",
            str(image),
            str(labels),
            str(report),
            "--strategy",
            strategy,
            "--device",
            device,
            *flags,
        ],
        check=True,
    )
    return json.loads(report.read_text()), read_volume(labels).array


def surface_vs_truth(pred: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    """MASD and HD95 (mm) per bone in the truth: the issue's HD95 target on a held-out scan."""
    bones = evaluate_labels(pred, truth, SPACING)["bones"]
    return {
        name: {key: round(metrics[key], 2) for key in ("masd_mm", "hd95_mm")}
        for name, metrics in bones.items()
        if metrics["truth_voxels"]
    }


def per_bone_dice(pred: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Dice per bone found in either volume."""
    return {
        name: round(dice(pred == value, reference == value), 4)
        for value, name in BONE_NAMES.items()
        if (reference == value).any() or (pred == value).any()
    }


def hip_slab_start(phantom_image: Volume, geometry: dict) -> int:
    """First of 200 slices centred on the femoral heads: pelvis, hips and femora, the busiest
    region."""
    z_mm = np.mean([geometry["sides"][s]["femoral_head_centre_mm"][2] for s in ("left", "right")])
    centre = round((z_mm - phantom_image.origin[2]) / phantom_image.spacing[2])
    return max(0, min(centre - SLAB_SLICES // 2, phantom_image.array.shape[0] - SLAB_SLICES))


def slab_of(phantom_image: Volume, lo: int) -> Volume:
    """The SLAB_SLICES slices from slice `lo`, with their geometry."""
    origin = (
        phantom_image.origin[0],
        phantom_image.origin[1],
        phantom_image.origin[2] + lo * phantom_image.spacing[2],
    )
    return Volume(
        np.ascontiguousarray(phantom_image.array[lo : lo + SLAB_SLICES]),
        phantom_image.spacing,
        origin,
        phantom_image.direction,
    )


def cli_whole_leg(workdir: Path, device: str) -> dict:
    """`dicom-node segment` of the whole-leg phantom at the spacing its seed draws (0.9 mm
    pixels, 0.57 mm slices), a compressed NIfTI as `dicom-node phantom --format nifti` writes
    it, in a subprocess: its wall time and peak RSS, reading and writing the files, loading
    torch and the model included. The command starts no processes of its own, so the peak RSS
    `wait4` reports for it is the process tree's."""
    t = time.perf_counter()
    phantom = generate_phantom(FULL_SEED, "full", region="whole_legs")
    generate_s = time.perf_counter() - t
    image = workdir / "whole-leg.nii.gz"
    write_volume(phantom.image, image)
    shape, spacing = list(phantom.image.array.shape), list(phantom.image.spacing)
    del phantom
    output = workdir / "cli" / "seg.nii.gz"
    command = ["-m", "dicom_node", "segment", str(image), "-o", str(output), "--quiet"]
    t = time.perf_counter()
    process = subprocess.Popen([sys.executable, *command, "--device", device])
    _, status, usage = os.wait4(process.pid, 0)
    wall_s = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"dicom-node segment failed: exit {os.waitstatus_to_exitcode(status)}")
    sidecar = json.loads(output_paths(output)["sidecar"].read_text())
    return {
        "command": f"dicom-node segment IN.nii.gz -o OUT.nii.gz --quiet --device {device}",
        "shape_zyx": shape,
        "spacing_xyz": [round(s, 3) for s in spacing],
        "input_mb": round(image.stat().st_size / 1e6, 1),
        "generate_s": round(generate_s, 1),
        "wall_s": round(wall_s, 2),
        "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        # The segmentation's own stages (the sidecar's); the rest of wall_s is starting
        # Python and torch, loading the model, reading the input and writing the outputs.
        "timings_s": sidecar["timings_s"],
        "written_mb": {
            path.name: round(path.stat().st_size / 1e6, 1)
            for path in output.parent.iterdir()
            if path.name.endswith(".nii.gz")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/inference.json"))
    parser.add_argument(
        "--halo",
        type=int,
        help="also segment the full scan with this halo (fast), against the default's labels",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        help="also segment the full scan with these weights (fast), against the default's",
    )
    parser.add_argument(
        "--precision",
        choices=["float32", "mixed"],
        help="also segment the full scan in this precision (fast), against the default's",
    )
    parser.add_argument(
        "--cli-only",
        action="store_true",
        help="run only `dicom-node segment` on the whole-leg phantom at its native slices, "
        "and write it into the results already in --out",
    )
    args = parser.parse_args()
    if args.cli_only:
        result = json.loads(args.out.read_text()) if args.out.is_file() else {}
        with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
            result["cli_whole_leg"] = cli_whole_leg(Path(tmp), args.device)
        result["cli_whole_leg"]["machine"] = machine()
        write_result(args.out, result)
        print(json.dumps(result["cli_whole_leg"], indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        workdir = Path(tmp)
        t = time.perf_counter()
        phantom = generate_phantom(FULL_SEED, "full", spacing=SPACING, region="whole_legs")
        generate_s = time.perf_counter() - t
        full, slab = workdir / "full.mha", workdir / "slab.mha"
        lo = hip_slab_start(phantom.image, phantom.geometry)
        write_volume(phantom.image, full)
        write_volume(slab_of(phantom.image, lo), slab)
        truth = phantom.labels.array
        del phantom

        full_report, full_labels = run_worker(full, workdir, "fast", args.device)
        full_report["dice_vs_truth"] = per_bone_dice(full_labels, truth)
        full_report["surface_vs_truth"] = surface_vs_truth(full_labels, truth)
        other = None
        options = {
            k: v for k in ("halo", "weights", "precision") if (v := getattr(args, k)) is not None
        }
        if options:
            other, other_labels = run_worker(full, workdir, "fast", args.device, **options)
            other["dice_vs_truth"] = per_bone_dice(other_labels, truth)
            other["agreement_dice_per_bone"] = per_bone_dice(other_labels, full_labels)
            del other_labels
        del full_labels
        slab_truth = truth[lo : lo + SLAB_SLICES]
        fast_report, fast_labels = run_worker(slab, workdir, "fast", args.device)
        paper_report, paper_labels = run_worker(slab, workdir, "paper", args.device)
        # The paper's windows and patches tiled without overlap: what their edges cost.
        tiled_report, tiled_labels = run_worker(
            slab, workdir, "paper", args.device, paper_overlap=0.0
        )
        cli = cli_whole_leg(workdir, args.device)
    fast_report["dice_vs_truth"] = per_bone_dice(fast_labels, slab_truth)
    paper_report["dice_vs_truth"] = per_bone_dice(paper_labels, slab_truth)
    tiled_report["dice_vs_truth"] = per_bone_dice(tiled_labels, slab_truth)
    tiled_report["paper_over_fast_time"] = round(
        tiled_report["segment_s"] / fast_report["segment_s"], 1
    )
    tiled_report["agreement_with_fast"] = per_bone_dice(fast_labels, tiled_labels)
    result = {
        "machine": machine(),
        "device": args.device,
        "phantom": {
            "seed": FULL_SEED,
            "shape_zyx": list(truth.shape),
            "spacing_mm": SPACING[0],
            "generate_s": round(generate_s, 1),
        },
        "full_fast": full_report,
        "cli_whole_leg": cli,
        **({"full_fast_other": other} if other else {}),
        "slab": {
            "slices": SLAB_SLICES,
            "fast": fast_report,
            "paper": paper_report,
            "paper_over_fast_time": round(paper_report["segment_s"] / fast_report["segment_s"], 1),
            "agreement_dice_per_bone": per_bone_dice(fast_labels, paper_labels),
            "paper_tiled": tiled_report,
        },
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
