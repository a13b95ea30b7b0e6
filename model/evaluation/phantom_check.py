"""Segment a generated phantom and score it against the phantom's own truth.

This is the quickstart's proof of life and the model card's held-out evaluation. The numbers
are phantom numbers: they say the engine works, not how it does on patients.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from model.engine.inference import Segmenter
from model.evaluation.compare import aggregate_cases
from model.metrics import evaluate_labels
from model.phantom import generate_phantom
from model.training.synthesis import CtNoise
from model.volume_io import Volume


def segment_phantoms(
    seeds: Iterable[int],
    size: str,
    segmenter: Segmenter,
    spacing: tuple[float, float, float] | None = None,
) -> dict:
    """Metrics per phantom seed and over all of them (the `evaluate_files` result shape)."""
    cases = []
    for seed in seeds:
        phantom = generate_phantom(seed, size, spacing=spacing)
        segmentation = segmenter.segment(phantom.image)
        metrics = evaluate_labels(
            segmentation.labels.array, phantom.labels.array, phantom.image.spacing
        )
        cases.append(
            {
                "case": f"phantom seed {seed} ({size}, {phantom.geometry.get('region')})",
                "shape": list(phantom.image.array.shape),
                "spacing": list(phantom.image.spacing),
                "segments": segmentation.summary["segments"],
                "dropped_as_misplaced": segmentation.summary["dropped_as_misplaced"],
                "implausible": segmentation.summary["implausible"],
                "timings_s": segmentation.timings,
                **metrics,
            }
        )
    return {
        "anatomy_check": segmenter.settings.anatomy_check,
        "cases": cases,
        "aggregate": aggregate_cases(cases),
    }


# Subject phantoms of held-out shapes (`model.phantom.subjects`), scanned at these slice
# thicknesses: issue 18's check that the weights segment bones they never saw at the slice
# thicknesses hospitals use.
SLICE_THICKNESSES_MM = (0.8, 1.5, 3.0, 5.0)
SUBJECT_REGIONS = ("hip", "knee", "ankle")


def scan_with_slices(
    image: Volume,
    labels: Volume,
    thickness_mm: float,
    noise: CtNoise | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[Volume, Volume]:
    """The 0.8 mm phantom as a scanner would reconstruct it with slices ``thickness_mm`` thick
    and as far apart: each slice the mean over its thickness plus, given ``noise``, the
    scanner's noise drawn on the slices themselves (`model.training.synthesis.ThickSlices` says
    why); the labels those of the voxel at its centre."""
    step = max(1, round(thickness_mm / image.spacing[2]))
    hu = image.array.astype(np.float32)
    if step > 1:
        hu = ndimage.uniform_filter1d(hu, step, axis=0, mode="nearest")
    first = step // 2
    spacing = (image.spacing[0], image.spacing[1], image.spacing[2] * step)
    origin = (image.origin[0], image.origin[1], image.origin[2] + first * image.spacing[2])
    slices = slice(first, None, step)
    hu = hu[slices]
    if noise is not None:
        hu = hu + noise.field(hu.shape, rng or np.random.default_rng(0))
    hu = np.clip(np.rint(hu), -1024, 3071)
    return (
        Volume(hu.astype(np.int16), spacing, origin, image.direction),
        Volume(np.ascontiguousarray(labels.array[slices]), spacing, origin, labels.direction),
    )


def segment_subject_phantoms(
    subjects: Iterable[int],
    segmenter: Segmenter,
    regions: Iterable[str] = SUBJECT_REGIONS,
    thicknesses_mm: Iterable[float] = SLICE_THICKNESSES_MM,
    seed: int = 0,
) -> dict:
    """Metrics per (subject, region, slice thickness) and aggregated per thickness."""
    from model.phantom.subjects import generate_subject_phantom
    from model.training.synthesis import DEFAULT_CHAIN, InPlaneResolution, ThickSlices, synthesise

    # The scan's own slices, with their noise, are made by `scan_with_slices`; the chain draws
    # the rest.
    chain = [t for t in DEFAULT_CHAIN if not isinstance(t, ThickSlices | InPlaneResolution)]
    thicknesses = list(thicknesses_mm)
    cases: list[dict] = []
    for subject in subjects:
        for index, region in enumerate(regions):
            case_seed = 100_000 + 100 * subject + index + 1000 * seed
            phantom = generate_subject_phantom(case_seed, region=region, subject=subject)
            rng = np.random.default_rng(case_seed)
            hu = synthesise(phantom.tissues.array, rng, chain).astype(np.int16)
            image = phantom.tissues.with_array(hu)
            for thickness in thicknesses:
                scan, truth = scan_with_slices(image, phantom.labels, thickness, CtNoise(), rng)
                segmentation = segmenter.segment(scan)
                metrics = evaluate_labels(segmentation.labels.array, truth.array, scan.spacing)
                cases.append(
                    {
                        "case": f"subject {subject} {region} at {thickness} mm",
                        "subject": subject,
                        "region": region,
                        "slice_mm": thickness,
                        "shape": list(scan.array.shape),
                        "segments": segmentation.summary["segments"],
                        "timings_s": segmentation.timings,
                        **metrics,
                    }
                )
    return {
        "cases": cases,
        "by_slice_mm": {
            str(t): aggregate_cases([c for c in cases if c["slice_mm"] == t]) for t in thicknesses
        },
    }
