"""`make demo` (the README's first command) as a user runs it: the CLI, real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.testbed.node_process import AE_TITLE as NODE_AE
from tests.support import ROOT

BONE_MASK_DICE = 0.85  # what the shipped weights reach on any bone (see test_inference.py)
SHORT = 60  # lines on the terminal: progress bars and the report, not the per-instance log


@pytest.mark.parametrize(
    ("kind", "pacs", "as_json"),
    [("orthanc", "Orthanc", False), ("scp", "pynetdicom storage SCP", True)],
)
def test_demo_gets_the_seg_back_from_the_pacs_and_reports(
    tmp_path: Path, kind: str, pacs: str, as_json: bool
) -> None:
    if kind == "orthanc" and shutil.which("Orthanc") is None:
        pytest.skip("Orthanc not installed (make system-deps)")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "demo",
            "--workdir",
            str(tmp_path),
            "--threads",
            "2",
            "--pacs",
            kind,
            *(["--json"] if as_json else []),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    if as_json:  # stdout is the report alone; progress and the log's name go to stderr
        assert json.loads(result.stdout) == report
    assert report["pacs"] == pacs
    assert report["seg"]["same_study"] and report["seg"]["same_patient"]
    assert report["any_bone_dice"] >= BONE_MASK_DICE
    assert report["segments"] and all(s["volume_ml"] > 0 for s in report["segments"])
    stages = report["timings_s"]
    assert {"receive_s", "complete_wait_s", "assemble_s", "segment_s", "seg_encode_s"} <= set(
        stages
    )
    assert Path(report["preview"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The measurements' key image, where the node wrote it: in its data directory.
    key_image = Path(report["key_image"])
    assert key_image.is_relative_to(tmp_path / "node" / "data" / "results")
    assert key_image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The terminal shows progress and the report; the per-instance log goes to a file it names.
    terminal = result.stdout + result.stderr
    log_file = tmp_path / "demo.log"
    assert len(terminal.splitlines()) < SHORT, terminal
    assert str(log_file) in result.stderr
    assert "Sending Store Request" not in terminal
    assert "segmenting" in result.stderr and "sending the SEG to the PACS" in result.stderr
    log = log_file.read_text()
    assert log.count("pynetdicom._handlers: Sending Store Request") == report["phantom"]["slices"]
    assert f"dicom_node.app.daemon: {NODE_AE} listening on" in log  # the node's lines
    assert "receiving -> complete" in log and "segmenting -> sending" in log


def test_demo_size_full_is_the_whole_leg_phantom() -> None:
    """Wired, not run: the full demo segments a 1 GB scan, minutes on two cores."""
    from dicom_node.app.cli import build_parser
    from dicom_node.testbed.demo import phantom_region

    args = build_parser().parse_args(["demo", "--size", "full"])
    assert phantom_region(args.size, args.region) == "whole_legs"
    args = build_parser().parse_args(["demo", "--size", "full", "--region", "torso"])
    assert phantom_region(args.size, args.region) == "torso"
    assert phantom_region("small", None) is None  # a joint drawn from the seed
