"""Segmenting volume files: a label map on the input grid plus a JSON sidecar naming it."""

from __future__ import annotations

import json
from pathlib import Path

from model.engine.inference import Segmentation, Segmenter
from model.labels import BONE_NAMES, sided_label_names
from model.volume_io import VOLUME_SUFFIXES, read_volume, write_volume


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
    segmentation: Segmentation, output: Path, source: Path | None = None
) -> dict[str, Path]:
    paths = output_paths(output)
    write_volume(segmentation.labels, paths["labels"])
    write_volume(segmentation.sided, paths["sided"])
    write_volume(segmentation.confidence, paths["confidence"])
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
    return paths


def segment_file(
    input_path: Path, output: Path, segmenter: Segmenter
) -> tuple[Segmentation, dict[str, Path]]:
    """Segment one NIfTI/NRRD/MHA volume of HU values; write labels, sided labels, sidecar."""
    segmentation = segmenter.segment(read_volume(input_path))
    return segmentation, save_segmentation(segmentation, output, source=input_path)
