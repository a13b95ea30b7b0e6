"""The model's own entry point (`python -m model`, `dicom-node-model`) and `dicom-node`
exposing the same commands, each run as a user runs it: a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MODEL_COMMANDS = ("phantom", "train", "segment", "segment-phantom", "evaluate")


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_python_m_model_lists_the_model_commands() -> None:
    done = run(sys.executable, "-m", "model", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: dicom-node-model" in done.stdout
    assert all(command in done.stdout for command in MODEL_COMMANDS)


def test_model_commands_are_dicom_node_commands_too() -> None:
    train = run(sys.executable, "-m", "dicom_node", "train", "--help")
    assert train.returncode == 0, train.stderr
    assert "usage: dicom-node train" in train.stdout and "--phantom-seeds" in train.stdout
    # Only dicom-node reads a config file and writes a DICOM phantom series.
    phantom = run(sys.executable, "-m", "dicom_node", "phantom", "--help")
    assert "{dicom,nifti}" in phantom.stdout
    model_phantom = run(sys.executable, "-m", "model", "phantom", "--help")
    assert "--format {nifti}" in model_phantom.stdout and "ct/" not in model_phantom.stdout
    model_segment = run(sys.executable, "-m", "model", "segment", "--help")
    assert "--strategy" in model_segment.stdout and "--config" not in model_segment.stdout


def test_installed_model_command_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("dicom-node-model")
    missing = tmp_path / "nowhere.nii.gz"
    done = run(script, "evaluate", "--pred", missing, "--truth", missing)
    assert done.returncode == 2
    assert done.stderr.startswith("dicom-node-model evaluate: error:")
    assert len(done.stderr.strip().splitlines()) == 1
