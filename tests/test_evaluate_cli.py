"""`dicom-node evaluate`: files and folders in, table and strict JSON out, exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_node.app.cli import main
from model.labels import Bone
from model.volume_io import Volume, write_volume

SPACING = (0.8, 0.8, 2.0)  # x, y, z in mm
ORIGIN = (-10.0, 20.0, 5.0)
N, SHIFT = 10, 2  # femur cube length and its shift in the prediction, in voxels along x


def label_volume(femur_x0: int, spacing=SPACING, origin=ORIGIN) -> Volume:
    """Femur cube starting at x = femur_x0, and a tibia that the prediction gets right."""
    labels = np.zeros((16, 20, 24), dtype=np.uint8)
    labels[2:12, 2:12, femur_x0 : femur_x0 + N] = Bone.FEMUR
    labels[13:15, 14:18, 2:8] = Bone.TIBIA
    return Volume(labels, spacing, origin)


def write_case(folder: Path, name: str, femur_x0: int, **grid) -> Path:
    path = folder / name
    write_volume(label_volume(femur_x0, **grid), path)
    return path


def run_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out" / "metrics.json"
    assert main(["evaluate", *args, "--json", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    return json.loads(text)


def test_two_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    pred = write_case(tmp_path / "pred", "case1.nii.gz", 2 + SHIFT)
    truth = write_case(tmp_path / "truth", "case1.nii.gz", 2)
    result = run_json(tmp_path, "--pred", str(pred), "--truth", str(truth))

    (case,) = result["cases"]
    femur, tibia = case["bones"]["femur"], case["bones"]["tibia"]
    assert femur["dice"] == pytest.approx((N - SHIFT) / N)
    assert femur["hd_mm"] == pytest.approx(SHIFT * SPACING[0], rel=1e-6)
    assert tibia["dice"] == 1.0 and tibia["hd_mm"] == 0.0
    assert case["bones"]["talus"]["truth_voxels"] == 0
    assert case["mean"]["n_bones"] == 2
    assert case["mean"]["dice"] == pytest.approx((0.8 + 1.0) / 2)
    aggregate = result["aggregate"]
    assert aggregate["n_cases"] == 1
    assert aggregate["bones"]["femur"]["dice"] == {"mean": pytest.approx(0.8), "sd": None}
    assert aggregate["bones"]["talus"]["dice"] == {"mean": None, "sd": None}
    table = capsys.readouterr().out
    assert "femur" in table and "0.800" in table and "HD95" in table


def test_folders_of_case_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Phantom layout: <case>/labels.nii.gz, the truth folder also holding CT images."""
    for case, shift in (("a", SHIFT), ("b", 0)):
        write_case(tmp_path / "pred" / case, "labels.nii.gz", 2 + shift)
        write_case(tmp_path / "truth" / case, "labels.nii.gz", 2)
        write_case(tmp_path / "truth" / case, "ct.nii.gz", 0)  # ignored: no prediction
    result = run_json(
        tmp_path, "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")
    )

    assert [case["case"] for case in result["cases"]] == ["a/labels.nii.gz", "b/labels.nii.gz"]
    femur = result["aggregate"]["bones"]["femur"]
    assert femur["n_cases"] == 2
    assert femur["dice"]["mean"] == pytest.approx((0.8 + 1.0) / 2)
    assert femur["dice"]["sd"] == pytest.approx(np.std([0.8, 1.0], ddof=1))
    assert "±" in capsys.readouterr().out


def test_missed_bone_is_json_null(tmp_path: Path):
    truth = write_case(tmp_path, "truth.nrrd", 2)
    empty = Volume(np.zeros((16, 20, 24), np.uint8), SPACING, ORIGIN)
    write_volume(empty, tmp_path / "pred.nrrd")
    result = run_json(tmp_path, "--pred", str(tmp_path / "pred.nrrd"), "--truth", str(truth))
    femur = result["cases"][0]["bones"]["femur"]
    assert femur["dice"] == 0.0 and femur["hd_mm"] is None and femur["masd_mm"] is None


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"spacing": (0.8, 0.8, 2.5)}, "spacing"),
        ({"origin": (-10.0, 20.0, 5.01)}, "origin"),
    ],
)
def test_mismatched_grid_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], grid: dict, message: str
):
    pred = write_case(tmp_path / "pred", "case1.mha", 2, **grid)
    truth = write_case(tmp_path / "truth", "case1.mha", 2)
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(pred) in err


def test_shape_mismatch_and_missing_truth_exit_2(tmp_path: Path, capsys):
    write_case(tmp_path / "pred", "case1.nii.gz", 2)
    write_volume(Volume(np.zeros((4, 4, 4), np.uint8), SPACING), tmp_path / "truth/case1.nii.gz")
    write_case(tmp_path / "pred", "case2.nii.gz", 2)
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]
    assert main(args) == 2
    assert "no ground truth case2.nii.gz" in capsys.readouterr().err
    (tmp_path / "pred" / "case2.nii.gz").unlink()
    assert main(args) == 2
    assert "shape" in capsys.readouterr().err


def test_installed_command(tmp_path: Path):
    """The console script the package installs, in a fresh process: exit codes and JSON."""
    script = Path(sys.executable).with_name("dicom-node")
    pred = write_case(tmp_path, "pred.nii.gz", 2 + SHIFT)
    truth = write_case(tmp_path, "truth.nii.gz", 2)
    out = tmp_path / "metrics.json"
    done = subprocess.run(
        [script, "evaluate", "--pred", pred, "--truth", truth, "--json", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    femur = json.loads(out.read_text())["cases"][0]["bones"]["femur"]
    assert femur["dice"] == pytest.approx((N - SHIFT) / N)

    bad = subprocess.run(
        [script, "evaluate", "--pred", pred, "--truth", tmp_path / "nowhere.nii.gz"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "nowhere.nii.gz" in bad.stderr
