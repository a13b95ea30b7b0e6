"""Segmenting volume files: a label map on the input grid plus a JSON sidecar naming it."""

from __future__ import annotations

import json
from pathlib import Path

from model.engine.inference import Progress, Segmentation, Segmenter, no_progress
from model.labels import BONE_NAMES, sided_label_names
from model.volume_io import VOLUME_SUFFIXES, Volume, read_volume, write_volume


def output_paths(output: Path) -> dict[str, Path]:
    """`seg.nii.gz` -> itself, `seg_sided.nii.gz`, `seg_confidence.nii.gz` and `seg.json`
    beside it."""
    name = output.name
    suffix = next((s for s in VOLUME_SUFFIXES if name.lower().endswith(s)), None)
    if suffix is None:
        raise ValueError(f"{output}: output must end in one of {', '.join(VOLUME_SUFFIXES)}")
    stem = name[: -len(suffix)]
    return {
        "labels": output,
        "sided": output.with_name(f"{stem}_sided{suffix}"),
        "confidence": output.with_name(f"{stem}_confidence{suffix}"),
        "sidecar": output.with_name(f"{stem}.json"),
    }


def save_segmentation(
    segmentation: Segmentation,
    output: Path,
    source: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """The three label maps (`output_paths`) and the sidecar; `progress` hears of the "write"
    stage."""
    report = progress or no_progress
    paths = output_paths(output)
    maps = {
        "labels": segmentation.labels,
        "sided": segmentation.sided,
        "confidence": segmentation.confidence,
    }
    report("write", 0.0)
    for written, (name, volume) in enumerate(maps.items(), start=1):
        write_volume(volume, paths[name])
        report("write", written / (len(maps) + 1))
    sidecar = {
        "source": str(source) if source else None,
        "labels": {str(k): v for k, v in BONE_NAMES.items()},
        "background": 0,
        "sided_labels_file": paths["sided"].name,
        "sided_labels": {str(k): v for k, v in sided_label_names().items()},
        "side_rule": "each bone voxel by its side of the body's midline in patient coordinates "
        "(LPS: +x is the patient's left); right keeps 1..6, left is 7..12",
        "confidence_file": paths["confidence"].name,
        "confidence": "percent: the probability the model gave the class it chose for each "
        "voxel, before post-processing; a segment's unsure_percent counts its voxels under "
        f"{segmentation.sure_percent}",
        **segmentation.summary,
        "timings_s": segmentation.timings,
    }
    paths["sidecar"].write_text(json.dumps(sidecar, indent=2) + "\n")
    report("write", 1.0)
    return paths


def segment_file(
    input_path: Path, output: Path, segmenter: Segmenter, progress: Progress | None = None
) -> tuple[Segmentation, dict[str, Path]]:
    """Segment one NIfTI/NRRD/MHA volume of HU values; write labels, sided labels, confidence
    and sidecar. `progress` hears of each stage: "read", then `Segmenter.segment`'s, "write".
    """
    # The scan is read in the call: nothing here holds it once segment is done with it.
    segmentation = segmenter.segment(_read(input_path, progress or no_progress), progress)
    return segmentation, save_segmentation(segmentation, output, input_path, progress)


def _read(input_path: Path, report: Progress) -> Volume:
    report("read", 0.0)
    volume = read_volume(input_path)
    report("read", 1.0)
    return volume
