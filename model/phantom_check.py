"""Segment a generated phantom and score it against the phantom's own truth.

This is the quickstart's proof of life and the model card's held-out evaluation. The numbers
are phantom numbers: they say the engine works, not how it does on patients.
"""

from __future__ import annotations

from collections.abc import Iterable

from model.evaluation import aggregate_cases
from model.inference import Segmenter
from model.metrics import evaluate_labels
from model.phantom import generate_phantom


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
