"""Inference benchmark: a full-size phantom with `fast`, and `fast` against `paper` on a slab
(and `paper` with its windows and patches tiled without overlap, to show what their edges cost).

    python -m bench.inference [--device cpu|cuda] [--out bench/results/inference.json]
                              [--halo N] [--weights W] [--precision float32|mixed]
                              (the full scan again, with another halo, other weights or
                               another precision, in the same run)

Each segmentation runs in its own process (bench/segment_worker.py) so that peak RSS is that of
one segmentation, not of the phantom generator. Timings are wall-clock on this machine; the
machine is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["memory_gb"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1
        )
    except (OSError, ValueError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


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
    args = parser.parse_args()
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
