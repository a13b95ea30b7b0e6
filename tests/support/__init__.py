"""What the tests share beyond `conftest.py`'s fixtures: skipping a test whose tool or data is
not on this machine (`require`, `require_data`, `require_dcmjs`), and the hostile-input
machinery (`hostile`). The peers themselves (Orthanc, storage SCPs, the node as a process,
PostgreSQL) are in `dicom_node.testbed`, which the demo and the benchmarks use too."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.testbed.peers import PeerNotInstalledError, find_binary

ROOT = Path(__file__).resolve().parents[2]  # the checkout
DATA = ROOT.parent / "shared" / "data" / "dicom"
VIEWER = ROOT / "tests" / "viewer"  # dcmjs, the OHIF viewer's DICOM reader, and scripts on it
# conftest's `phantom_series` fixture: seed -> write_phantom's paths ("ct", "labels", ...).
PhantomSeries = Callable[[int], dict[str, Path]]


def require(binary: str) -> str:
    """The peer's path, or skip: CI installs the peers (Makefile system-deps)."""
    try:
        return find_binary(binary)
    except PeerNotInstalledError as missing:
        pytest.skip(str(missing))


def require_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real DICOM test data not found at {DATA} (shared/ beside the checkout)")
    return DATA


def require_dcmjs() -> str:
    """The node binary; skips when node or tests/viewer's dcmjs is not installed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js not installed (it comes with the machine; see the Makefile)")
    if not (VIEWER / "node_modules" / "dcmjs").is_dir():
        pytest.skip("dcmjs not installed (make install runs npm ci --prefix tests/viewer)")
    return node


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's errors on `path` (skip the test when dciodvfy is not installed)."""
    result = subprocess.run(
        [require("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith(("Error", "Abort"))]
    assert bool(errors) == (result.returncode != 0), result.stderr
    return errors
