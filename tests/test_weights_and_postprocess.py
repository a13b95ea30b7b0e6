"""Weights and checkpoints without pickle; island removal and the left/right split."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dicom_node.app.cli import main
from model.engine.network import CascadeConfig, CascadedVNet
from model.engine.postprocess import (
    bone_pieces,
    remove_detached,
    remove_islands,
    segment_summary,
    slice_label_counts,
    split_sides,
)
from model.engine.weights import file_sha256, load_checkpoint, load_weights, save_weights
from model.labels import Bone, Side, sided_label, unsided_labels
from model.training.loop import BatchStream, TrainingSettings, batches_from, open_case, train
from model.training.sampling import TrainingCase
from model.volume_io import Volume, write_volume


def test_weights_round_trip_and_tamper_check(tmp_path: Path) -> None:
    model = CascadedVNet(CascadeConfig(patch_sizes=(64, 32))).eval()
    path = tmp_path / "w.safetensors"
    save_weights(model, path, {"note": "test"})
    loaded, meta = load_weights(path)
    assert meta["note"] == "test" and meta["config"]["patch_sizes"] == [64, 32]
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x), strict=True):
            assert torch.equal(a, b)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_weights(path)


def test_weights_contain_no_pickle(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(CascadedVNet(CascadeConfig(patch_sizes=(32,))), path, {})
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert all(v["dtype"] in ("F32", "I64") for k, v in header.items() if k != "__metadata__")


def tiny_case() -> TrainingCase:
    labels = np.zeros((48, 48, 48), dtype=np.uint8)
    labels[10:30, 10:30, 10:30] = Bone.TIBIA
    hu = np.where(labels > 0, 1200, 0).astype(np.int16)
    return TrainingCase.from_arrays("tiny", hu, labels, np.random.default_rng(0))


def test_training_resumes_where_it_stopped(tmp_path: Path) -> None:
    """Four steps straight equal two steps, a stop, and two more from the checkpoint."""
    config = CascadeConfig(patch_sizes=(64, 32))
    settings = dict(batch_size=2, checkpoint_every=2, warmup_steps=1, seed=4)
    straight = train(
        [tiny_case()], tmp_path / "a", config, TrainingSettings(steps=4, **settings), progress=False
    )
    train(
        [tiny_case()], tmp_path / "b", config, TrainingSettings(steps=2, **settings), progress=False
    )
    resumed = train(
        [tiny_case()], tmp_path / "b", config, TrainingSettings(steps=4, **settings), progress=False
    )
    a, _ = load_weights(straight)
    b, _ = load_weights(resumed)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name
    model = CascadedVNet(config)
    state = load_checkpoint(
        tmp_path / "b" / "checkpoint.safetensors", model, torch.optim.Adam(model.parameters())
    )
    assert state["step"] == 4 and len(state["history"]) == 2


def test_batches_do_not_depend_on_the_worker_count() -> None:
    """Batch n is seeded by (seed, n): drawn inline or by forked workers, it is the same."""
    config = CascadeConfig(patch_sizes=(64, 32))
    settings = TrainingSettings(steps=5, batch_size=2, seed=7, workers=2)
    stream = BatchStream([tiny_case()], config, settings)
    drawn = list(batches_from(2, [tiny_case()], config, settings))
    assert len(drawn) == 3
    for step, batch in zip(range(2, 5), drawn, strict=True):
        for a, b in zip(batch, stream[step], strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(stream[2][0], stream[3][0])


def test_training_settings_refuse_sample_shares_past_one() -> None:
    # Shares are taken in order (joint, bone, distractor, metal), so past 1 the last ones would
    # silently shrink: 0.15 + 0.67 + 0.2 left distractors 0.18 and no room for metal.
    with pytest.raises(ValueError, match=r"bone_fraction 0\.67 .* metal_fraction 0\.1$"):
        TrainingSettings(joint_fraction=0.15, distractor_fraction=0.1, metal_fraction=0.1)
    with pytest.raises(ValueError, match="truncated_fraction must be within"):
        TrainingSettings(truncated_fraction=1.5)
    settings = TrainingSettings(bone_fraction=0.57, joint_fraction=0.15, distractor_fraction=0.18)
    assert dataclasses.replace(settings, metal_fraction=0.1).metal_fraction == 0.1


def test_train_cli_prepares_each_case_once_and_trains_on_it_memory_mapped(tmp_path: Path) -> None:
    """`dicom-node train` on files: every case is prepared into OUT/cases, read back
    memory-mapped, found again by a resumed run and prepared anew when its file changes."""
    case = tiny_case()
    data = tmp_path / "data" / "case1"
    write_volume(Volume(case.hu, (0.8,) * 3, (0.0,) * 3), data / "image.nii.gz")
    write_volume(Volume(case.labels, (0.8,) * 3, (0.0,) * 3), data / "labels.nii.gz")
    out = tmp_path / "run"
    args = ["train", str(tmp_path / "data"), "--out", str(out), "--patch-sizes", "64", "32"]
    args += ["--batch-size", "2", "--no-progress"]
    assert main([*args, "--steps", "2"]) == 0
    (cached,) = (out / "cases").iterdir()
    opened = open_case(cached)
    assert isinstance(opened.hu, np.memmap) and isinstance(opened.labels, np.memmap)
    np.testing.assert_array_equal(opened.labels, case.labels)
    np.testing.assert_array_equal(opened.hu, case.hu)
    assert sorted(opened.bone_voxels) == [int(Bone.TIBIA)]
    written = (cached / "hu.npy").stat().st_mtime_ns

    assert main([*args, "--steps", "3"]) == 0  # resumed: the case is read, not prepared again
    assert [p.name for p in (out / "cases").iterdir()] == [cached.name]
    assert (cached / "hu.npy").stat().st_mtime_ns == written
    assert json.loads((out / "training.json").read_text())["history"][-1]["step"] == 3

    labels = case.labels.copy()
    labels[40:44, 40:44, 40:44] = Bone.TALUS
    write_volume(Volume(labels, (0.8,) * 3, (0.0,) * 3), data / "labels.nii.gz")
    assert main([*args, "--steps", "4"]) == 0
    assert len(list((out / "cases").iterdir())) == 2


def test_a_new_run_can_start_from_weights(tmp_path: Path) -> None:
    config = CascadeConfig(patch_sizes=(64, 32))
    start = tmp_path / "start.safetensors"
    save_weights(CascadedVNet(config), start, {})
    run = TrainingSettings(steps=0, init_weights=start, seed=1)
    weights = train([tiny_case()], tmp_path / "run", config, run, progress=False)
    a, _ = load_weights(start)
    b, meta = load_weights(weights)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert meta["training"]["init_weights"]["sha256"] == file_sha256(start)
    # Stopped after a checkpoint and resumed, the run's weights still name where it started.
    steps = dict(batch_size=2, checkpoint_every=1, warmup_steps=1, init_weights=start, seed=1)
    train([tiny_case()], tmp_path / "resumed", config, TrainingSettings(steps=1, **steps))
    resumed = train([tiny_case()], tmp_path / "resumed", config, TrainingSettings(steps=2, **steps))
    assert load_weights(resumed)[1]["training"]["init_weights"]["sha256"] == file_sha256(start)
    with pytest.raises(ValueError, match="differs from the run's"):
        train([tiny_case()], tmp_path / "other", CascadeConfig(patch_sizes=(32,)), run)


def test_bone_pieces_are_26_connected_per_bone_in_bone_order() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[1, 1, 1] = labels[2, 2, 2] = 3  # corner to corner: one piece
    labels[5:7, 5:7, 5:7] = 1
    labels[7, 5:7, 5:7] = 2  # touches the femur, but is another bone
    labels[0, 9, 9] = 1  # first in scan order
    pieces = list(bone_pieces(labels))
    assert [(bone, int(mask.sum())) for bone, _, mask in pieces] == [(1, 1), (1, 8), (2, 4), (3, 2)]
    for bone, box, mask in pieces:
        assert (labels[box][mask] == bone).all()
    rebuilt = np.zeros_like(labels)
    for bone, box, mask in pieces:
        rebuilt[box][mask] = bone
    np.testing.assert_array_equal(rebuilt, labels)


def test_unsided_labels_fold_left_onto_right_in_a_new_array() -> None:
    sided = np.array([[[0, 1, 6, 7, 12, 9]]], dtype=np.uint8)
    bones = unsided_labels(sided)
    np.testing.assert_array_equal(bones, [[[0, 1, 6, 1, 6, 3]]])
    assert bones.dtype == np.uint8 and sided[0, 0, 3] == 7  # the input is left as it was


def test_slice_label_counts_count_each_bone_in_each_slice() -> None:
    labels = np.zeros((12, 9, 9), dtype=np.uint8)
    labels[3:6, 2:4, 5:8] = 2
    labels[5, 8, 0] = 7
    labels[9, 1, 1] = 1
    counts = slice_label_counts(labels, 8)
    expected = np.array([[int((plane == v).sum()) for v in range(8)] for plane in labels])
    expected[:, 0] = 0  # background is not counted
    np.testing.assert_array_equal(counts, expected)
    assert not slice_label_counts(np.zeros((3, 4, 4), np.uint8), 8).any()


def test_islands_are_removed_or_relabelled() -> None:
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[5:30, 5:30, 5:30] = Bone.TIBIA
    labels[10:12, 10:12, 29:31] = Bone.FEMUR  # touches the tibia: a mislabelled fragment
    labels[20:22, 35:37, 20:22] = Bone.FEMUR  # alone in soft tissue: spurious
    labels[0:2, 0:2, 0:2] = Bone.TALUS  # at the edge of the field of view: kept
    out = remove_islands(labels, min_voxels=50)
    assert (out[10:12, 10:12, 29:30] == Bone.TIBIA).all()
    assert (out[20:22, 35:37, 20:22] == 0).all()
    assert (out[0:2, 0:2, 0:2] == Bone.TALUS).all()
    assert (out[5:30, 5:29, 5:29] == Bone.TIBIA).all()


def test_islands_keep_large_components() -> None:
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    labels[5:15, 5:15, 5:12] = Bone.FEMUR
    labels[5:15, 5:15, 18:25] = Bone.FEMUR  # the other femur
    assert np.array_equal(remove_islands(labels, min_voxels=50), labels)


def test_detached_pieces_far_from_their_bone_and_small_beside_it_are_dropped() -> None:
    right, left = sided_label(Bone.FEMUR, Side.RIGHT), sided_label(Bone.FEMUR, Side.LEFT)
    sided = np.zeros((100, 100, 100), dtype=np.uint8)
    sided[10:50, 10:50, 10:40] = right  # the femur, 48 k voxels
    sided[0:10, 85:95, 85:95] = right  # 1 k voxels, 35 mm and more away: something else
    sided[10:20, 10:20, 55:65] = right  # 1 k voxels, 16 mm away: kept
    sided[85:100, 0:40, 60:100] = right  # 35 mm away but half the femur's size: kept
    sided[90:95, 90:95, 0:5] = left  # the other femur's only piece: kept
    before = sided.copy()
    # Half the spacing, every piece is half as far: nothing is beyond 30 mm.
    assert not remove_detached(sided, spacing_mm=0.5).any()
    np.testing.assert_array_equal(sided, before)
    removed = remove_detached(sided, spacing_mm=1.0)
    assert removed[right] == 1000 and removed.sum() == 1000
    before[0:10, 85:95, 85:95] = 0
    np.testing.assert_array_equal(sided, before)


def test_sides_follow_patient_coordinates() -> None:
    """+x is the patient's left in LPS; a flipped x axis (direction -1) swaps the result."""
    hu = np.full((10, 20, 40), -1000, dtype=np.int16)
    hu[:, 5:15, 5:35] = 40  # body, centred on column 20
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[:, 8:12, 8:12] = Bone.FEMUR  # low column index
    labels[:, 8:12, 28:32] = Bone.FEMUR
    grid = sitk.GetImageFromArray(hu)
    grid.SetSpacing((10.0, 1.0, 1.0))  # 400 mm across: both legs in view
    grid.SetOrigin((-123.0, 0.0, 0.0))  # off-centre on the table: the body's centre decides
    sided = split_sides(labels, hu, grid)
    assert (sided[:, 8:12, 8:12] == sided_label(Bone.FEMUR, Side.RIGHT)).all()
    assert (sided[:, 8:12, 28:32] == sided_label(Bone.FEMUR, Side.LEFT)).all()
    grid.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    flipped = split_sides(labels, hu, grid)
    assert (flipped[:, 8:12, 8:12] == sided_label(Bone.FEMUR, Side.LEFT)).all()


def _grid(hu: np.ndarray, spacing_x: float, origin_x: float) -> sitk.Image:
    grid = sitk.GetImageFromArray(hu)
    grid.SetSpacing((spacing_x, 1.0, 1.0))
    grid.SetOrigin((origin_x, 0.0, 0.0))
    return grid


def test_a_bone_across_the_midline_stays_whole_and_touching_hip_bones_split() -> None:
    hu = np.full((10, 20, 40), -1000, dtype=np.int16)
    hu[:, 5:15, 0:40] = 40  # body centred on column 20
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[:, 8:12, 2:6] = Bone.TIBIA  # keeps the spread bilateral
    labels[:, 8:12, 8:20] = Bone.FEMUR  # one column beyond the centre (column 18)
    labels[:, 8:12, 30:34] = Bone.FEMUR
    labels[:, 14:16, 14:22] = Bone.HIP_BONE  # both hip bones, touching at the symphysis
    sided = split_sides(labels, hu, _grid(hu, 10.0, -200.0))
    assert (sided[:, 8:12, 8:20] == sided_label(Bone.FEMUR, Side.RIGHT)).all()
    assert (sided[:, 8:12, 30:34] == sided_label(Bone.FEMUR, Side.LEFT)).all()
    assert (sided[:, 14:16, 14:19] == sided_label(Bone.HIP_BONE, Side.RIGHT)).all()
    assert (sided[:, 14:16, 19:22] == sided_label(Bone.HIP_BONE, Side.LEFT)).all()


def test_one_leg_in_view_is_sided_by_the_isocentre_not_by_its_own_centre() -> None:
    hu = np.full((10, 20, 40), -1000, dtype=np.int16)
    hu[:, 2:18, 4:36] = 40  # one thigh fills the view
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[:, 8:12, 14:26] = Bone.FEMUR  # 36 mm wide femur across the view's centre
    left_leg = split_sides(labels, hu, _grid(hu, 3.0, 30.0))  # x from +30 to +147 mm
    assert (left_leg[labels > 0] == sided_label(Bone.FEMUR, Side.LEFT)).all()
    right_leg = split_sides(labels, hu, _grid(hu, 3.0, -147.0))
    assert (right_leg[labels > 0] == sided_label(Bone.FEMUR, Side.RIGHT)).all()


def test_segment_summary_counts_each_sided_bone_on_its_grid() -> None:
    sided = np.zeros((4, 10, 10), dtype=np.uint8)
    sided[0, :5, :4] = sided_label(Bone.FEMUR, Side.LEFT)  # 20 voxels
    sided[2:4, 0, 0] = sided_label(Bone.TALUS, Side.RIGHT)  # 2 voxels
    summary = segment_summary(Volume(sided, (0.5, 0.5, 2.0)))  # 0.5 ul a voxel
    assert summary == [
        {
            "label": int(Bone.FEMUR),
            "sided_label": sided_label(Bone.FEMUR, Side.LEFT),
            "bone": "femur",
            "side": "left",
            "voxels": 20,
            "volume_ml": 0.01,
        },
        {
            "label": int(Bone.TALUS),
            "sided_label": sided_label(Bone.TALUS, Side.RIGHT),
            "bone": "talus",
            "side": "right",
            "voxels": 2,
            "volume_ml": 0.0,
        },
    ]
    unsure = np.zeros(sided.shape, dtype=bool)
    unsure[0, :5, 0] = True  # 5 of the femur's 20 voxels
    unsure[3] = True  # 1 of the talus's 2, and background
    with_unsure = segment_summary(Volume(sided, (0.5, 0.5, 2.0)), unsure)
    assert [s["unsure_percent"] for s in with_unsure] == [25.0, 50.0]


def test_pieces_without_bone_density_are_not_bone() -> None:
    """Soft tissue the model called bone goes, cut by the scan's edge or not; bone stays."""
    hu = np.full((30, 30, 30), 40, dtype=np.int16)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[0:10, 5:15, 5:15] = Bone.FEMUR  # soft tissue at the edge, large
    labels[15:25, 5:15, 5:15] = Bone.TIBIA  # real bone: cancellous inside a cortex
    hu[15:25, 5:15, 5:15] = 250
    hu[15:25, 5, 5:15] = 1200
    out = remove_islands(labels, min_voxels=50, hu=hu)
    assert not (out == Bone.FEMUR).any()
    assert np.array_equal(out == Bone.TIBIA, labels == Bone.TIBIA)
    assert np.array_equal(remove_islands(labels, min_voxels=50), labels)
