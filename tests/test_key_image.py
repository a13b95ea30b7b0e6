"""The key image: a PNG of the measurements drawn on a coronal view of the CT, beside the SR.

Drawn directly from the synthetic pelvis' measurements (`tests.test_hip_measure`), whose hip
views must appear only when hips are measured. End to end (a phantom series through the
running node, its SEG, SR and key image into Orthanc's study) in `tests/test_sr.py`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dicom_node.imaging.key_image import COLOURS, key_image_png
from model.measure import measure_femoral_angles, measure_hip_parameters, measure_leg_alignment
from tests.test_hip_measure import synthetic_pelvis


def pixels_of(png: bytes, colour: str) -> int:
    """How many pixels of the PNG are (nearly) ``colour`` ("#rrggbb")."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    wanted = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - wanted).max(axis=2) <= 12).sum())


def test_the_hip_views_show_the_rim_and_the_lce_lines_when_hips_are_measured() -> None:
    labels = synthetic_pelvis()
    ct = labels.with_array(np.where(labels.array > 0, 700, -50).astype(np.int16))
    legs = measure_leg_alignment(labels)
    femoral = measure_femoral_angles(labels, legs)
    hips = measure_hip_parameters(labels, legs, femoral)
    assert all(hip.lateral_centre_edge.value is not None and hip.rim_mm for hip in hips.values())

    with_hips = key_image_png(ct, legs, femoral, hips)
    without = key_image_png(ct, legs, femoral)
    for png in (with_hips, without):
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert pixels_of(png, COLOURS["neck"]) > 50  # the neck axes, in the coronal view
    assert Image.open(io.BytesIO(with_hips)).width > Image.open(io.BytesIO(without)).width
    for drawn in ("rim", "lce"):
        assert pixels_of(with_hips, COLOURS[drawn]) > 50
        assert pixels_of(without, COLOURS[drawn]) == 0
