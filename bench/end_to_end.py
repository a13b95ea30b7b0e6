"""End-to-end latency: a full-size phantom CT series through the node to the SEG in Orthanc.

    python -m bench.end_to_end [--seed 4242] [--out bench/results/end_to_end.json]

Runs `make demo`'s pipeline (`dicom_node.testbed.demo.run_demo`: real node process, real Orthanc,
C-STORE both ways) on the inference benchmark's phantom (whole legs at 0.8 mm, 512 x 512 x
1442) and splits the time from the first instance sent to the SEG stored at the PACS by
stage, from the node's own job timeline. The target: everything except the
completion wait and inference under 20 s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.inference import FULL_SEED
from bench.results_file import machine, write_result
from dicom_node.testbed.demo import run_demo

RESULTS = Path(__file__).resolve().parent / "results" / "end_to_end.json"
# Stages that count against the 20 s target: all but the completion wait and inference.
OVERHEAD_STAGES = ("queue_s", "assemble_s", "seg_encode_s", "send_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=FULL_SEED)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as workdir:
        report = run_demo(
            Path(workdir), args.seed, "full", "whole_legs", args.threads, "auto", (0.8, 0.8, 0.8)
        )
    timings = report["timings_s"]
    overhead = sum(timings[stage] for stage in OVERHEAD_STAGES)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "phantom": report["phantom"],
        "pacs": report["pacs"],
        "timings_s": timings,
        "overhead_stages": list(OVERHEAD_STAGES),
        "overhead_s": round(overhead, 2),
        "overhead_target_s": 20.0,
        "segments": report["segments"],
        "any_bone_dice": report["any_bone_dice"],
        "note": "synthetic phantom; receive_s is the sender's C-STORE of the whole series",
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
