"""Inference with the shipped weights on small phantoms: accuracy, strategy agreement, grids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from model.engine.anatomy import AnatomyCheck, check_anatomy
from model.engine.inference import InferenceSettings, Segmenter
from model.engine.network import CascadeConfig, autocast_dtype
from model.engine.tiling import (
    ScaledInputs,
    cover_boxes,
    crop_upsampled,
    fit_multiple,
    most_probable,
    refine_mask,
    split_box,
    window_starts,
    window_weight,
)
from model.labels import BONE_NAMES
from model.metrics import dice
from model.phantom import generate_phantom
from model.training.sampling import normalise_hu
from model.volume_io import Volume, read_volume, write_volume

# Small phantoms (one joint region each) from seeds never used in training (model/MODEL_CARD.md).
HELD_OUT = {"hip": 2001, "knee": 2002, "ankle": 2003}
# The bound is the Dice target for these phantoms, per bone scored, in float32 and bfloat16
# alike; bench/README.md and the model card give what the shipped weights reach.
BONE_DICE = 0.95
BONE_MASK_DICE = 0.93  # bone found against background: measured 0.975-0.996


@pytest.fixture(scope="module")
def fast() -> Segmenter:
    return Segmenter(settings=InferenceSettings(strategy="fast"))


@pytest.fixture(scope="module")
def phantoms() -> dict:
    return {
        region: generate_phantom(seed, "small", region=region) for region, seed in HELD_OUT.items()
    }


def mask_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of "any bone" against background."""
    return dice(pred > 0, truth > 0)


def bone_dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {
        name: dice(pred == value, truth == value)
        for value, name in BONE_NAMES.items()
        if (truth == value).sum() > 500  # bones cut to a sliver by the crop are not scored
    }


@pytest.mark.parametrize("region", list(HELD_OUT))
def test_shipped_model_segments_held_out_phantoms(
    fast: Segmenter, phantoms: dict, region: str
) -> None:
    phantom = phantoms[region]
    result = fast.segment(phantom.image)
    assert result.labels.array.shape == phantom.labels.array.shape
    scored = bone_dice(result.labels.array, phantom.labels.array)
    assert scored, "no scorable bone"
    assert min(scored.values()) >= BONE_DICE, scored
    assert mask_dice(result.labels.array, phantom.labels.array) >= BONE_MASK_DICE
    # Every voxel called bone in the sided map is bone in the plain map, and vice versa.
    assert np.array_equal(result.sided.array > 0, result.labels.array > 0)


# Bones `fast` finds on each crop (more than 500 voxels), whose labels `paper` must agree with.
AGREEMENT_BONES = {
    "knee": {"femur", "tibia", "fibula"},
    "ankle": {"tibia", "fibula", "talus", "calcaneus"},
}


# The knee and the ankle: between them five of the six bones, and the two crops where a
# tiling fault showed (the hip bone's agreement: `python -m bench.inference`, on a slab of a
# whole leg through the hip).
@pytest.mark.parametrize("region", ["knee", "ankle"])
def test_fast_agrees_with_paper(fast: Segmenter, phantoms: dict, region: str) -> None:
    """`fast` must agree with `paper` at 0.99 per bone. With the finer stages' patches tiling
    each window (no overlap) an ankle crop's fibula agreed at only 0.971; with windows and
    patches tiled (`paper_overlap = 0`), a knee's femur at 0.76."""
    phantom = phantoms[region]
    paper = Segmenter(settings=InferenceSettings(strategy="paper"))
    a = fast.segment(phantom.image).labels.array
    b = paper.segment(phantom.image).labels.array
    agreement = {
        name: dice(a == value, b == value)
        for value, name in BONE_NAMES.items()
        if (a == value).sum() > 500
    }
    assert set(agreement) == AGREEMENT_BONES[region]
    assert min(agreement.values()) >= 0.99, agreement


def test_paper_windows_overlap_by_half_and_tile_without_overlap(phantoms: dict) -> None:
    """Tiled (`paper_overlap = 0`: windows and their patches), a block's labels depend on that
    block of the scan alone; overlapping by half, the windows across its edge change labels
    inside it."""
    hu = phantoms["hip"].image.array[:128, :128, :]
    assert hu.shape[2] > 128
    tiled, halves = (
        Segmenter(settings=InferenceSettings(strategy="paper", paper_overlap=overlap))
        for overlap in (0, 0.5)
    )
    assert halves.paper_stride == 64 and tiled.paper_stride == 128
    assert halves.patch_stride == 16 and tiled.patch_stride == 32  # on the stages' own grids
    first_block = hu[:, :, :128]
    alone = tiled.predict_labels(first_block)[0]
    assert np.array_equal(tiled.predict_labels(hu)[0][:, :, :128], alone)
    assert (halves.predict_labels(hu)[0][:, :, :128] != alone).sum() > 1000
    with pytest.raises(ValueError, match="paper_overlap"):
        InferenceSettings(paper_overlap=1.0)
    with pytest.raises(ValueError, match="paper_overlap"):
        Segmenter(settings=InferenceSettings(paper_overlap=0.49))  # windows 65 voxels apart


def test_window_starts_cover_the_axis_with_the_last_window_flush_with_its_end() -> None:
    assert window_starts(200, 128, 64, 4) == [0, 36, 72]  # the hip slab's 200 slices
    assert window_starts(512, 128, 64, 4) == list(range(0, 385, 64))
    assert window_starts(100, 128, 64, 4) == window_starts(128, 128, 64, 4) == [0]
    assert window_starts(257, 128, 128, 4) == [0, 128, 256]  # tiling: the last reaches past
    for n in range(129, 700, 7):
        starts = window_starts(n, 128, 64, 4)
        assert starts[0] == 0 and all(a % 4 == 0 for a in starts)
        assert 0 <= starts[-1] + 128 - n < 4  # flush with the end, but for the rounding
        gaps = np.diff(starts)
        assert gaps.min() > 0 and gaps.max() <= 64 + 4  # neighbours overlap by about half


def test_window_weight_peaks_at_the_centre_and_is_flat_where_windows_tile() -> None:
    assert torch.equal(window_weight(16, overlapping=False), torch.ones(16, 16, 16))
    w = window_weight(128, overlapping=True)
    assert w.shape == (128, 128, 128)
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.permute(2, 0, 1))
    assert w.max() == 1 and w[63, 63, 63] == w[64, 64, 64] == w.max()
    assert 0 < w[0, 0, 0] < 1e-9  # a corner counts, but next to nothing
    # Separable: the weight of (z, y, x) is the product of three 1-D weights.
    assert torch.allclose(w[10, 40, 70], w[10, 63, 63] * w[63, 40, 63] * w[63, 63, 70])


def test_labels_come_back_on_the_input_grid(fast: Segmenter, phantoms: dict) -> None:
    """A RAS-stored, anisotropic input: reoriented and resampled inside, returned on its grid."""
    phantom = phantoms["knee"]
    image = phantom.image.to_sitk()
    flipped = sitk.Flip(image, [True, True, False])  # RAS-like storage of the same anatomy
    coarse = sitk.Resample(
        flipped,
        [s // 2 for s in flipped.GetSize()[:2]] + [flipped.GetSize()[2]],
        sitk.Transform(),
        sitk.sitkLinear,
        flipped.GetOrigin(),
        [flipped.GetSpacing()[0] * 2, flipped.GetSpacing()[1] * 2, flipped.GetSpacing()[2]],
        flipped.GetDirection(),
        -1024,
        sitk.sitkInt16,
    )
    volume = Volume.from_sitk(coarse)
    result = fast.segment(volume)
    assert result.labels.array.shape == volume.array.shape
    assert result.labels.spacing == volume.spacing and result.labels.direction == volume.direction
    truth = sitk.Resample(
        phantom.labels.to_sitk(), coarse, sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    assert mask_dice(result.labels.array, sitk.GetArrayFromImage(truth)) >= BONE_MASK_DICE - 0.05


def test_segment_command_writes_labels_sided_map_and_sidecar(
    tmp_path: Path, phantoms: dict
) -> None:
    phantom = phantoms["ankle"]
    write_volume(phantom.image, tmp_path / "ct.nii.gz")
    out = tmp_path / "out" / "seg.nii.gz"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "segment",
            str(tmp_path / "ct.nii.gz"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    labels = read_volume(out)
    sided = read_volume(tmp_path / "out" / "seg_sided.nii.gz")
    sidecar = json.loads((tmp_path / "out" / "seg.json").read_text())
    assert labels.array.shape == phantom.image.array.shape
    assert np.allclose(labels.spacing, phantom.image.spacing)
    assert sidecar["labels"]["5"] == "talus" and sidecar["sided_labels"]["11"] == "left talus"
    assert set(np.unique(labels.array)) <= set(range(7))
    assert set(np.unique(sided.array)) <= set(range(13))
    confidence = read_volume(tmp_path / "out" / sidecar["confidence_file"])
    assert confidence.array.shape == labels.array.shape and confidence.array.max() <= 100
    for segment in sidecar["segments"]:
        voxels = sided.array == segment["sided_label"]
        assert voxels.sum() == segment["voxels"]
        unsure = (confidence.array[voxels] < 90).mean()
        assert segment["unsure_percent"] == pytest.approx(100 * unsure, abs=0.05)
    # The model is sure of most bone it finds, and unsure of some: its surfaces.
    assert 0 < (confidence.array[labels.array > 0] < 90).mean() < 0.5


def test_segment_command_flags_bones_no_leg_can_have(tmp_path: Path, phantoms: dict) -> None:
    """A hip set straight on top of an ankle: a hip bone 15 cm above a calcaneus is no lower
    extremity. The file output leaves the misplaced bones out, as the node's SEG would, and
    says so (sidecar and stderr) instead of handing back a label map nobody should trust."""
    ankle, hip = phantoms["ankle"].image, phantoms["hip"].image
    n = min(ankle.array.shape[1], hip.array.shape[1])
    stacked = np.concatenate([ankle.array[:, :n, :n], hip.array[:, :n, :n]])  # hip on top
    write_volume(Volume(stacked, ankle.spacing, ankle.origin), tmp_path / "ct.nii.gz")
    ct, out = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    run = subprocess.run(
        [sys.executable, "-m", "dicom_node", "segment", str(ct), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["implausible"].startswith("anatomically implausible: hip bone and")
    assert "warning: anatomically implausible" in run.stderr
    # The hip bone, the larger, stays; the foot bones, each in conflict with it, go.
    dropped = {segment["bone"] for segment in sidecar["dropped_as_misplaced"]}
    assert {"talus", "calcaneus"} <= dropped and "hip bone" not in dropped
    labels, sided = read_volume(out), read_volume(tmp_path / "seg_sided.nii.gz")
    kept = {BONE_NAMES[v] for v in np.unique(labels.array) if v}
    assert "hip bone" in kept and not {"talus", "calcaneus"} & kept
    # What stays is plausible, and the summary counts the labels written.
    assert check_anatomy(sided) == AnatomyCheck()
    for segment in sidecar["segments"]:
        assert (sided.array == segment["sided_label"]).sum() == segment["voxels"]


def test_segment_phantom_scores_what_the_node_would_send(tmp_path: Path) -> None:
    """`segment-phantom` scores the labels after the anatomy check; `--no-anatomy-check` the
    raw output. The two differ by exactly the pieces listed as dropped."""
    from dicom_node.app.cli import main

    runs = {}
    for flag in ([], ["--no-anatomy-check"]):
        out = tmp_path / f"scores{len(flag)}.json"
        args = ["segment-phantom", "--seeds", "1002", "--size", "small", "--json", str(out)]
        assert main(args + flag) == 0
        runs[bool(flag)] = json.loads(out.read_text())
    checked, raw = runs[False], runs[True]
    assert checked["anatomy_check"] is True and raw["anatomy_check"] is False
    assert raw["cases"][0]["dropped_as_misplaced"] == []
    case = checked["cases"][0]
    assert set(case["bones"]) and set(case["bones"]) <= set(BONE_NAMES.values())

    def voxels(segments: list[dict]) -> int:
        return sum(segment["voxels"] for segment in segments)

    dropped = voxels(case["dropped_as_misplaced"])
    assert voxels(case["segments"]) + dropped == voxels(raw["cases"][0]["segments"])


def test_segment_command_rejects_a_missing_file(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "segment",
            str(tmp_path / "no.nii.gz"),
            "-o",
            str(tmp_path / "o.nii.gz"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "no such volume file" in run.stderr


@pytest.mark.parametrize(
    ("lo", "hi", "limit"), [(0, 5, 100), (90, 100, 100), (3, 20, 21), (0, 7, 7)]
)
def test_fit_multiple_stays_inside(lo: int, hi: int, limit: int) -> None:
    a, b = fit_multiple(lo, hi, limit, 8)
    assert (b - a) % 8 == 0 or b - a == limit
    assert 0 <= a <= lo and hi <= b <= max(limit, b)


def test_split_box_bounds_voxels_and_covers_the_box() -> None:
    box = (slice(0, 64), slice(10, 310), slice(5, 205))
    parts = split_box(box, 500_000)
    assert all(np.prod([s.stop - s.start for s in p]) <= 500_000 for p in parts)
    covered = np.zeros((64, 310, 205), dtype=int)
    for p in parts:
        covered[p] += 1
    assert (covered[box] == 1).all() and covered.sum() == 64 * 300 * 200


def region_cost(box: tuple[slice, ...]) -> int:
    """What the fast strategy pays for a box: its voxels with a halo of 4 on each side."""
    return int(np.prod([s.stop - s.start + 8 for s in box]))


def tube_wall(shape: tuple[int, int, int], radius: float) -> np.ndarray:
    """The wall of a tube along the volume's diagonal: a femoral shaft's surface, tilted."""
    points = np.stack(np.indices(shape), axis=-1).astype(float)
    axis = np.array(shape, dtype=float) - 1
    along = np.clip(points @ axis / (axis @ axis), 0, 1)
    distance = np.linalg.norm(points - along[..., None] * axis, axis=-1)
    return np.abs(distance - radius) < 1.5


@pytest.mark.parametrize("case", ["tube", "two blobs", "empty"])
def test_cover_boxes_hold_every_voxel_once_for_less_than_the_bounding_box(case: str) -> None:
    """A bone's refine band is a thin wall; the boxes covering it must skip what is not."""
    shape = (60, 70, 80)
    mask = np.zeros(shape, dtype=bool)
    if case == "tube":
        mask = tube_wall(shape, 8)
    elif case == "two blobs":
        mask[2:10, 3:12, 4:9] = True
        mask[40:55, 50:66, 60:78] = True
    boxes = cover_boxes(mask, region_cost)
    covered = np.zeros(shape, dtype=int)
    for box in boxes:
        covered[box] += 1
    assert covered.max() <= 1  # disjoint: no voxel is computed twice
    assert covered[mask].min(initial=1) == 1  # every True voxel is in a box
    if case == "empty":
        assert boxes == []
        return
    whole = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(mask))
    total = sum(region_cost(b) for b in boxes)
    if case == "two blobs":  # exactly the blobs' own boxes
        assert sorted(boxes) == sorted(
            [
                (slice(2, 10), slice(3, 12), slice(4, 9)),
                (slice(40, 55), slice(50, 66), slice(60, 78)),
            ]
        )
    assert total < 0.7 * region_cost(whole)


@pytest.mark.parametrize(
    "region",
    [
        (slice(0, 16), slice(0, 24), slice(0, 8)),
        (slice(5, 29), slice(3, 11), slice(17, 40)),
        (slice(24, 40), slice(32, 48), slice(0, 40)),
    ],
)
def test_crop_upsampled_equals_upsampling_the_whole_grid(region: tuple[slice, ...]) -> None:
    """The fast strategy's context for a box equals the whole grid upsampled, then cropped."""
    torch.manual_seed(0)
    probs = torch.rand(3, 20, 24, 20)
    whole = F.interpolate(probs[None], scale_factor=2, mode="trilinear", align_corners=False)[0]
    assert torch.allclose(
        crop_upsampled(probs, region, 2), whole[(slice(None), *region)], atol=1e-6
    )


def test_refine_mask_marks_label_changes_within_the_band_and_unsure_voxels() -> None:
    rng = np.random.default_rng(3)
    labels = np.zeros((12, 14, 10), dtype=np.uint8)
    labels[3:8, 4:9, 2:6] = 2
    labels[8:11, 4:9, 2:6] = 5
    probs = rng.dirichlet(np.full(7, 0.2), size=labels.shape).transpose(3, 0, 1, 2)
    band, certainty = 2, 0.9
    expected = ~(probs >= certainty).any(0)
    for z, y, x in np.ndindex(labels.shape):
        cube = labels[
            max(0, z - band) : z + band + 1,
            max(0, y - band) : y + band + 1,
            max(0, x - band) : x + band + 1,
        ]
        expected[z, y, x] |= cube.min() != cube.max()
    got = refine_mask(torch.from_numpy(labels), torch.from_numpy(probs), band, certainty)
    assert 0 < expected.sum() < expected.size
    assert np.array_equal(got.numpy(), expected)


def test_scaled_inputs_equal_the_whole_padded_grid_pooled_then_cropped() -> None:
    """A stage's input over a box equals normalising the padded grid, pooling, cropping; the
    padding beyond the scan's end repeats its last plane."""
    config = CascadeConfig()
    rng = np.random.default_rng(5)
    hu = rng.integers(-1100, 2000, size=(21, 30, 17)).astype(np.int16)
    padded = (32, 32, 32)
    grid = np.pad(hu, [(0, p - n) for p, n in zip(padded, hu.shape, strict=True)], mode="edge")
    whole = torch.from_numpy(normalise_hu(grid, config.hu_window))
    inputs = ScaledInputs(hu, config, padded)
    for stage, factor in enumerate(config.factors):
        pooled = F.avg_pool3d(whole[None, None], factor)[0, 0] if factor > 1 else whole
        assert inputs.shape(stage) == pooled.shape
        for box in (
            (slice(1, 4), slice(0, 8 // factor + 2), slice(2, 32 // factor)),
            (slice(24 // factor, 32 // factor), slice(0, 32 // factor), slice(0, 8 // factor)),
        ):
            assert torch.allclose(inputs.region(stage, box), pooled[box], atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        ScaledInputs(hu, config, (30, 32, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_most_probable_equals_torch_max_ties_included(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    probs = torch.softmax(torch.randn(7, 9, 10, 11), 0).to(dtype)
    probs[:, 0, 0, :3] = torch.tensor([0.0, 0.5, 0.5, 0, 0, 0, 0], dtype=dtype)[:, None]  # a tie
    expected = probs.argmax(0).to(torch.uint8)
    assert expected[0, 0, 0] == 1
    labels, percent = most_probable(probs)
    assert torch.equal(labels, expected)
    assert len(expected.unique()) == 7
    assert percent[0, 0, 0] == 50
    expected_percent = (probs.float().max(0).values * 100).round()
    assert (percent.float() - expected_percent).abs().max() <= 1  # float16 rounding


def cpu_has_bfloat16_units() -> bool:
    """Whether this CPU runs "mixed" (model.engine.network.autocast_dtype refuses it without
    units)."""
    try:
        return autocast_dtype("mixed", torch.device("cpu")) is not None
    except ValueError:
        return False


CPU_BFLOAT16 = cpu_has_bfloat16_units()


@pytest.mark.skipif(not CPU_BFLOAT16, reason="this CPU has no bfloat16 units")
def test_mixed_precision_gives_the_float32_labels(phantoms: dict) -> None:
    """bfloat16 on CPU (what "auto" picks where the CPU has AMX): the same bones as float32."""
    image = phantoms["knee"].image
    full, mixed = (
        Segmenter(settings=InferenceSettings(precision=precision)).segment(image)
        for precision in ("float32", "mixed")
    )
    assert (full.summary["precision"], mixed.summary["precision"]) == ("float32", "bfloat16")
    agreement = bone_dice(mixed.labels.array, full.labels.array)
    assert agreement and min(agreement.values()) >= 0.99, agreement


@pytest.mark.parametrize(
    ("units", "auto", "mixed"),
    [
        ({"amx_bf16": True, "avx512_bf16": True}, torch.bfloat16, torch.bfloat16),
        ({"avx512_bf16": True}, None, torch.bfloat16),
        ({"avx2": True}, None, "refused"),
    ],
)
def test_cpu_precision_follows_the_cpu_bfloat16_units(
    monkeypatch: pytest.MonkeyPatch,
    units: dict,
    auto: torch.dtype | None,
    mixed: torch.dtype | str,
) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: units)
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == auto
    assert autocast_dtype("float32", cpu) is None
    if mixed == "refused":
        with pytest.raises(ValueError, match="no bfloat16 units"):
            autocast_dtype("mixed", cpu)
    else:
        assert autocast_dtype("mixed", cpu) == mixed


@pytest.mark.parametrize("precision", ["float32", "mixed", "auto"])
def test_cuda_runs_float16_unless_float32(precision: str) -> None:
    expected = None if precision == "float32" else torch.float16
    assert autocast_dtype(precision, torch.device("cuda")) == expected


def test_precision_is_one_of_three() -> None:
    with pytest.raises(ValueError, match="precision"):
        InferenceSettings(precision="half")
