"""The verdict (model/engine/verdict.py): signals measured on label maps with known geometry, the
findings and verdicts they give, and the verdict on phantoms whose input was damaged."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from model.engine.inference import InferenceSettings, Segmenter
from model.engine.verdict import (
    MAX_UNSURE_PERCENT,
    SegmentSignals,
    Verdict,
    assess,
    measure_segments,
)
from model.labels import Bone, Side, sided_label
from model.metrics import dice
from model.phantom import generate_phantom
from model.volume_io import Volume

SPACING = (1.0, 1.0, 2.0)  # x, y, z mm
SLICES, ROWS = 60, 160  # 120 mm of scan, 160 mm across
RIGHT_FEMUR = sided_label(Bone.FEMUR, Side.RIGHT)
LEFT_FEMUR = sided_label(Bone.FEMUR, Side.LEFT)
SURE = 90


def _labels() -> np.ndarray:
    return np.zeros((SLICES, ROWS, ROWS), np.uint8)


def _disc(centre_x: float, radius: float, inner: float = 0.0) -> np.ndarray:
    """An axial disc (or ring, `inner` > 0) of `radius` mm at x = `centre_x` mm, y centred."""
    y, x = np.mgrid[:ROWS, :ROWS].astype(float)
    distance = np.hypot(x - centre_x, y - ROWS / 2)
    return (distance <= radius) & (distance >= inner)


def _measure(labels: np.ndarray, confidence: np.ndarray | None = None) -> dict[int, SegmentSignals]:
    if confidence is None:
        confidence = np.full(labels.shape, 100, np.uint8)
    signals = measure_segments(Volume(labels, SPACING), confidence, SURE)
    return {s.sided_label: s for s in signals}


def _assess(labels: np.ndarray, confidence: np.ndarray | None = None, anatomy: str | None = None):
    signals = list(_measure(labels, confidence).values())
    return assess(signals, SPACING[2], anatomy)


def test_a_shaft_through_the_scan_measures_its_volume_length_and_cross_section() -> None:
    labels = _labels()
    labels[:, _disc(80, 14)] = RIGHT_FEMUR  # a femoral shaft 28 mm across, cut by both ends
    femur = _measure(labels)[RIGHT_FEMUR]
    area_cm2 = _disc(80, 14).sum() / 100.0  # 1 mm2 pixels
    assert femur.volume_ml == pytest.approx(area_cm2 * 12.0, abs=0.01)
    assert femur.z_extent_mm == 120.0
    assert femur.length_mm == pytest.approx(120.0, abs=2.0)
    low, high = femur.cross_section_cm2
    assert low == pytest.approx(area_cm2, rel=0.02) and high == pytest.approx(area_cm2, rel=1e-6)
    assert area_cm2 == pytest.approx(math.pi * 14**2 / 100, rel=0.02)
    assert femur.solidity is not None and 0.9 <= femur.solidity <= 1.1
    assert femur.cut_at_ends and not femur.cut_at_sides
    assert femur.unsure_percent == 0.0
    assert _assess(labels).verdict is Verdict.CONFIDENT


def test_a_femur_thinner_than_any_adult_one_is_implausible_unless_the_sides_cut_it() -> None:
    labels = _labels()
    labels[:, _disc(80, 4)] = RIGHT_FEMUR  # 0.5 cm2: a femoral shaft is 4-8.5 cm2
    assessment = _assess(labels)
    assert assessment.verdict is Verdict.IMPLAUSIBLE
    (finding,) = [f for f in assessment.findings if f.sided_label == RIGHT_FEMUR]
    assert finding.signal == "cross-section" and finding.implausible
    assert "right femur" in finding.text and "0.5-0.5 cm2" in finding.text
    # At the field of view's side the same voxels may be the edge of a whole shaft.
    cut = _labels()
    cut[:, _disc(0, 8)] = RIGHT_FEMUR  # half a disc of 8 mm at the image's first column
    assert _measure(cut)[RIGHT_FEMUR].cut_at_sides
    assert _assess(cut).verdict is Verdict.CONFIDENT


def test_a_bone_wholly_in_view_must_be_as_long_as_an_adults() -> None:
    labels = _labels()
    labels[20:40, _disc(80, 14)] = RIGHT_FEMUR  # 40 mm of "femur", clear of every edge
    femur = _measure(labels)[RIGHT_FEMUR]
    assert not (femur.cut_at_ends or femur.cut_at_sides)
    assessment = _assess(labels)
    assert assessment.verdict is Verdict.IMPLAUSIBLE
    assert [f.signal for f in assessment.findings if f.sided_label] == ["length"]
    assert "wholly in view" in assessment.reasons[-1]
    # The same stretch reaching the scan's end may be the end of a whole femur.
    labels[:20, _disc(80, 14)] = RIGHT_FEMUR
    assert _assess(labels).verdict is Verdict.CONFIDENT


@pytest.mark.parametrize(
    ("unsure_share", "verdict"),
    [(0.1, Verdict.CONFIDENT), (0.3, Verdict.UNSURE), (0.5, Verdict.IMPLAUSIBLE)],
)
def test_unsure_voxels_make_a_segment_unsure_and_a_third_of_all_bone_implausible(
    unsure_share: float, verdict: Verdict
) -> None:
    labels = _labels()
    labels[:, _disc(80, 14)] = RIGHT_FEMUR
    confidence = np.full(labels.shape, 99, np.uint8)
    confidence[: round(SLICES * unsure_share)] = 60  # the model's answer at 60 % there
    femur = _measure(labels, confidence)[RIGHT_FEMUR]
    assert femur.unsure_percent == pytest.approx(100 * unsure_share)
    assessment = _assess(labels, confidence)
    assert assessment.verdict is verdict
    if 100 * unsure_share > MAX_UNSURE_PERCENT:
        assert f"right femur: the model was unsure of {100 * unsure_share:.0f} %" in " ".join(
            assessment.reasons
        )


def test_left_and_right_must_be_comparable() -> None:
    labels = _labels()
    labels[:, _disc(40, 14)] = RIGHT_FEMUR
    labels[:, _disc(120, 14)] = LEFT_FEMUR
    assert _assess(labels).verdict is Verdict.CONFIDENT
    labels[labels == LEFT_FEMUR] = 0
    labels[:, _disc(120, 9)] = LEFT_FEMUR  # (14/9)^2 = 2.4x less volume over the same stretch
    assessment = _assess(labels)
    assert assessment.verdict is Verdict.UNSURE
    (finding,) = assessment.findings
    assert finding.signal == "left/right" and finding.sided_label == LEFT_FEMUR
    assert "2.4x apart" in finding.text


def test_a_thin_shell_is_no_bone() -> None:
    labels = _labels()
    labels[:, _disc(80, 31, inner=29)] = RIGHT_FEMUR  # a tube wall: 3.8 cm2, hollow inside
    femur = _measure(labels)[RIGHT_FEMUR]
    assert femur.solidity == pytest.approx((31**2 - 29**2) / 31**2, abs=0.03)
    assessment = _assess(labels)
    assert [f.signal for f in assessment.findings if f.sided_label] == ["shape"]
    assert assessment.verdict is Verdict.IMPLAUSIBLE


def test_the_anatomy_checks_reason_makes_the_series_implausible_and_leads() -> None:
    labels = _labels()
    labels[:, _disc(80, 14)] = RIGHT_FEMUR
    reason = "anatomically implausible: hip bone and tibia found 40 mm apart along the body"
    assessment = _assess(labels, anatomy=reason)
    assert assessment.verdict is Verdict.IMPLAUSIBLE and assessment.reasons == [reason]
    assert assessment.headline() == f"implausible: {reason}"


def test_segment_notes_say_why_in_a_few_words() -> None:
    labels = _labels()
    labels[:, _disc(40, 14)] = RIGHT_FEMUR
    labels[:, _disc(120, 9)] = LEFT_FEMUR
    confidence = np.full(labels.shape, 99, np.uint8)
    confidence[:18][:, _disc(40, 14)] = 50  # 30 % of the right femur
    assessment = _assess(labels, confidence)
    notes = assessment.segment_notes()
    assert notes[RIGHT_FEMUR] == "30 % of voxels unsure"
    assert notes[LEFT_FEMUR].endswith("x the other side's volume")
    summary = json.loads(json.dumps(assessment.as_dict()))  # as the node's database keeps it
    assert summary["verdict"] == "unsure" and len(summary["reasons"]) == 2
    assert {s["segment"] for s in summary["signals"]} == {"right femur", "left femur"}


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter(settings=InferenceSettings(strategy="fast", threads=2))


def test_damaged_phantoms_are_never_confident_and_wrong(segmenter: Segmenter) -> None:
    """A hip phantom as it is is confident. Its intensities scaled down (a wrong rescale
    slope) or drowned in noise: whatever the model is confident of it segments right (Dice >=
    0.9 per bone against the truth); at x 0.53 it is unsure (measured with the shipped
    weights: x 0.6 confident and right, x 0.5 implausible), in 600 HU of noise not confident."""
    phantom = generate_phantom(2003, "small")
    image, truth = phantom.image, phantom.labels.array
    hu = image.array.astype(np.float32)
    rng = np.random.default_rng(1)
    damaged = {
        "as it is": hu,
        "HU x 0.6": hu * 0.6,
        "HU x 0.53": hu * 0.53,
        "noise of 600 HU": hu + rng.normal(0, 600, hu.shape),
    }
    verdicts = {}
    for name, array in damaged.items():
        volume = image.with_array(np.clip(array, -1024, 3071).astype(np.int16))
        segmentation = segmenter.segment(volume)
        verdict = segmentation.assessment.verdict
        assert segmentation.summary["verdict"]["verdict"] == verdict
        verdicts[name] = verdict
        if verdict is Verdict.CONFIDENT:
            labels = segmentation.labels.array
            for value in np.unique(truth[truth > 0]):
                if (truth == value).sum() > 500:
                    assert dice(labels == value, truth == value) >= 0.9, (name, value)
    assert verdicts["as it is"] is Verdict.CONFIDENT
    assert verdicts["HU x 0.53"] is Verdict.UNSURE
    assert verdicts["noise of 600 HU"] is not Verdict.CONFIDENT
