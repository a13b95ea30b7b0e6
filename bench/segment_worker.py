"""One segmentation in its own process, so that its peak RSS is its own.

python -m bench.segment_worker IN.mha OUT_LABELS.mha OUT.json --strategy fast
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from bench.results_file import write_result
from model.engine.inference import InferenceSettings, Segmenter
from model.engine.weights import DEFAULT_WEIGHTS
from model.volume_io import read_volume, write_volume


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("input", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("--strategy", default="fast")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default=InferenceSettings.precision)
    parser.add_argument("--halo", type=int, default=InferenceSettings.halo)
    parser.add_argument("--paper-overlap", type=float, default=InferenceSettings.paper_overlap)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    args = parser.parse_args()
    started = time.perf_counter()
    settings = InferenceSettings(
        strategy=args.strategy,
        device=args.device,
        precision=args.precision,
        halo=args.halo,
        paper_overlap=args.paper_overlap,
    )
    segmenter = Segmenter(args.weights, settings)
    load_s = time.perf_counter() - started
    volume = read_volume(args.input)
    if segmenter.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = segmenter.segment(volume)
    segment_s = time.perf_counter() - t
    write_volume(result.labels, args.labels)
    report = {
        "strategy": args.strategy,
        "halo": args.halo,
        **({"paper_overlap": args.paper_overlap} if args.strategy == "paper" else {}),
        "weights_sha256": segmenter.metadata["weights_sha256"],
        "device": str(segmenter.device),
        "precision": result.summary["precision"],
        "shape_zyx": list(volume.array.shape),
        "spacing_xyz": list(volume.spacing),
        "model_load_s": round(load_s, 2),
        "segment_s": round(segment_s, 2),
        "timings_s": result.timings,
        # fast only: the share of each stage's grid that needed refining, and that it computed
        **{k: v for k, v in result.summary.items() if k.endswith("_fraction")},
        # Left out by the anatomy check, as in the node's SEG (not scored against the truth).
        "dropped_as_misplaced_voxels": sum(
            segment["voxels"] for segment in result.summary["dropped_as_misplaced"]
        ),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "torch_threads": torch.get_num_threads(),
    }
    if segmenter.device.type == "cuda":
        report["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
    write_result(args.report, report)


if __name__ == "__main__":
    main()
