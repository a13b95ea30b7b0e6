"""`make demo` (the README's first command) as a user runs it: the CLI, real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

BONE_MASK_DICE = 0.85  # what the shipped weights reach on any bone (see test_inference.py)


@pytest.mark.parametrize(
    ("kind", "pacs"), [("orthanc", "Orthanc"), ("scp", "pynetdicom storage SCP")]
)
def test_demo_gets_the_seg_back_from_the_pacs_and_reports(
    tmp_path: Path, kind: str, pacs: str
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
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["pacs"] == pacs
    assert report["seg"]["same_study"] and report["seg"]["same_patient"]
    assert report["any_bone_dice"] >= BONE_MASK_DICE
    assert report["segments"] and all(s["volume_ml"] > 0 for s in report["segments"])
    stages = report["timings_s"]
    assert {"receive_s", "complete_wait_s", "assemble_s", "segment_s", "seg_encode_s"} <= set(
        stages
    )
    assert Path(report["preview"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text()) == report
