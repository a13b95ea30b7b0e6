"""The subject phantoms' CT beside the real extremity CT: tissue HU and noise measured the
same way on both (`model.training.ct_statistics`), and a figure of both side by side.

    python -m bench.phantom_vs_real [--out bench/results/phantom_vs_real.json]
                                    [--figure docs/phantom_vs_real.png] [--phantoms 6]

Real: the 21 crops in ../shared/data/real_ct/sts_extremity (GE, 3.27 mm slices). Phantom:
subject phantoms of held-out shape subjects around the thigh, knee and leg, drawn by the
synthesis chain and reconstructed with 3.2 mm slices as those scans were.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bench.real_ct import CROPS
from bench.results_file import machine, write_result
from model.evaluation.phantom_check import scan_with_slices
from model.phantom.subjects import generate_subject_phantom
from model.phantom.subjects.shapes import HELD_OUT_SUBJECTS
from model.training.ct_statistics import tissue_statistics
from model.training.synthesis import (
    DEFAULT_CHAIN,
    CtNoise,
    InPlaneResolution,
    ThickSlices,
    synthesise,
)
from model.volume_io import Volume, read_volume

SHOWN_REAL = ("STS_001", "STS_013", "STS_029")
REGIONS = ("thigh", "knee", "leg")
SLICE_MM = 3.2


def real_scans() -> dict[str, Volume]:
    return {p.name[:7]: read_volume(p) for p in sorted(CROPS.glob("STS_*_ct.nii.gz"))}


def phantom_scans(n: int) -> dict[str, Volume]:
    chain = [t for t in DEFAULT_CHAIN if not isinstance(t, ThickSlices | InPlaneResolution)]
    out = {}
    for i in range(n):
        subject = HELD_OUT_SUBJECTS[i % len(HELD_OUT_SUBJECTS)]
        region = REGIONS[i % len(REGIONS)]
        phantom = generate_subject_phantom(50_000 + i, region=region, subject=subject)
        rng = np.random.default_rng(i)
        hu = synthesise(phantom.tissues.array, rng, chain)
        image = phantom.tissues.with_array(hu)
        scan, _ = scan_with_slices(image, phantom.labels, SLICE_MM, CtNoise(), rng)
        out[f"subject {subject} {region}"] = scan
    return out


def summary(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = next(iter(rows.values())).keys()
    values = {k: np.array([r[k] for r in rows.values()], float) for k in keys}
    return {
        k: {
            "median": round(float(np.nanmedian(v)), 1),
            "min": round(float(np.nanmin(v)), 1),
            "max": round(float(np.nanmax(v)), 1),
        }
        for k, v in values.items()
    }


def _views(volume: Volume) -> tuple[np.ndarray, np.ndarray, float]:
    """A middle axial slice and the sagittal plane through the bone, and the sagittal aspect."""
    a = volume.array
    bone = a >= 200
    x = int(np.median(np.nonzero(bone)[2])) if bone.any() else a.shape[2] // 2
    return a[a.shape[0] // 2], a[::-1, :, x], volume.spacing[2] / volume.spacing[1]


def figure(real: dict[str, Volume], phantoms: dict[str, Volume], path: Path) -> None:
    shown = [(f"real {k}", real[k]) for k in SHOWN_REAL if k in real]
    shown += [(f"phantom, {k}", v) for k, v in list(phantoms.items())[:3]]
    fig, axes = plt.subplots(2, len(shown), figsize=(3.2 * len(shown), 6.4))
    for column, (title, volume) in enumerate(shown):
        axial, sagittal, aspect = _views(volume)
        for row, (image, a) in enumerate(((axial, 1.0), (sagittal, aspect))):
            ax = axes[row, column]
            ax.imshow(image, cmap="gray", vmin=-250, vmax=1250, aspect=a, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, column].set_title(title, fontsize=9)
    axes[0, 0].set_ylabel("axial")
    axes[1, 0].set_ylabel("sagittal (3.2-3.27 mm slices)")
    fig.suptitle("Real extremity CT (left) and subject phantoms (right), window -250..1250 HU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/phantom_vs_real.json"))
    parser.add_argument("--figure", type=Path, default=Path("docs/phantom_vs_real.png"))
    parser.add_argument("--phantoms", type=int, default=6)
    args = parser.parse_args()
    if not CROPS.is_dir():
        raise SystemExit(f"{CROPS}: not found (../shared/data beside the repository)")
    real = real_scans()
    phantoms = phantom_scans(args.phantoms)
    real_rows = {k: tissue_statistics(v.array) for k, v in real.items()}
    phantom_rows = {k: tissue_statistics(v.array) for k, v in phantoms.items()}
    figure(real, phantoms, args.figure)
    result = {
        "method": "model.training.ct_statistics.tissue_statistics on each whole volume",
        "machine": machine(),
        "real": {"summary": summary(real_rows), "cases": real_rows},
        "phantom": {"slice_mm": SLICE_MM, "summary": summary(phantom_rows), "cases": phantom_rows},
    }
    write_result(args.out, result)
    for kind in ("real", "phantom"):
        print(kind, json.dumps(result[kind]["summary"]))


if __name__ == "__main__":
    main()
