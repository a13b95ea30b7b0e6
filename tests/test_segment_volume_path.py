"""The volume path of `segment`: labels back onto the input's grid as SimpleITK would put them,
volumes whose voxels stay in SimpleITK's buffer, and the progress bars of `dicom-node segment`."""

from __future__ import annotations

import os
import pickle
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from model.phantom import generate_phantom
from model.resample import image_to_model_grid, labels_to_grid
from model.volume_io import Volume, read_volume, write_volume

DIRECTIONS = {
    "LPS": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "RAS": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "coronal": (1, 0, 0, 0, 0, -1, 0, 1, 0),
    "axes permuted": (0, 1, 0, 0, 0, 1, 1, 0, 0),
}
# Spacings where no input voxel lies exactly half-way between two of the model's 0.8 mm voxels
# (an even multiple of 0.8 puts them there, and then rounding noise picks one of the two).
SPACINGS: list[tuple[float, float, float]] = [
    (0.7, 0.7, 2.5),
    (0.9765625, 0.9765625, 1.25),
    (0.5, 0.45, 0.625),
    (0.8, 0.8, 0.8),
]


def ct_on(
    direction: tuple[float, ...], spacing: tuple[float, float, float], rng: np.random.Generator
) -> Volume:
    array = rng.integers(-1000, 1500, (29, 41, 37)).astype(np.int16)
    return Volume(array, spacing, (-100.3, 20.1, 7.7), tuple(float(d) for d in direction))


@pytest.mark.parametrize("orientation", DIRECTIONS)
def test_labels_go_back_to_the_input_grid_as_simpleitk_puts_them(orientation: str) -> None:
    rng = np.random.default_rng(7)
    for spacing in SPACINGS:
        ct = ct_on(DIRECTIONS[orientation], spacing, rng)
        grid = image_to_model_grid(ct, 0.8)  # LPS, 0.8 mm: the model's grid
        labels = rng.integers(0, 13, grid.GetSize()[::-1]).astype(np.uint8)
        on_grid = Volume(labels, grid.GetSpacing(), grid.GetOrigin(), grid.GetDirection())
        expected = sitk.Resample(
            on_grid.to_sitk(), ct.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor
        )
        back = labels_to_grid(on_grid, ct)
        assert back.shape == ct.array.shape
        assert np.array_equal(back, sitk.GetArrayFromImage(expected)), (orientation, spacing)


def test_labels_on_an_oblique_grid_go_through_simpleitk() -> None:
    rng = np.random.default_rng(8)
    angle = np.deg2rad(20)
    tilted = (1, 0, 0, 0, np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle))
    ct = ct_on(DIRECTIONS["LPS"], (0.7, 0.7, 1.25), rng)
    labels = Volume(
        rng.integers(0, 13, (30, 30, 30)).astype(np.uint8), (0.8,) * 3, ct.origin, tilted
    )
    expected = sitk.Resample(
        labels.to_sitk(), ct.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor
    )
    assert np.array_equal(labels_to_grid(labels, ct), sitk.GetArrayFromImage(expected))


def test_a_volume_read_keeps_its_voxels_in_the_image_it_was_read_into(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    ct = ct_on(DIRECTIONS["RAS"], (0.7, 0.7, 1.25), rng)
    write_volume(ct, tmp_path / "ct.nii.gz")
    read = read_volume(tmp_path / "ct.nii.gz")
    assert np.array_equal(read.array, ct.array) and read.array.flags.writeable
    image = read.to_sitk()  # the image read, not a copy
    read.array[3, 4, 5] = 1234
    assert image.GetPixel(5, 4, 3) == 1234
    del image
    # The array keeps the image alive, and is an ordinary array elsewhere.
    copied = pickle.loads(pickle.dumps(read.array))
    assert copied[3, 4, 5] == 1234 and np.array_equal(copied, read.array)
    # Another grid over the same voxels gets an image of its own.
    moved = Volume(read.array, read.spacing, (0.0, 0.0, 0.0), read.direction)
    assert moved.to_sitk().GetOrigin() == (0.0, 0.0, 0.0)
    assert read.to_sitk().GetOrigin() == pytest.approx(read.origin)
    blank = read.blank()
    assert blank.array.dtype == np.uint8 and not blank.array.any()
    assert blank.to_sitk().GetDirection() == pytest.approx(read.direction)


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ankle phantom at 1.6 mm, as a NIfTI file: quick to segment."""
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    write_volume(generate_phantom(2003, "small", region="ankle", spacing=(1.6,) * 3).image, path)
    return path


def segment_on_a_terminal(ct: Path, out: Path, *flags: str) -> tuple[int, str]:
    """`dicom-node segment` with stderr on a pseudo-terminal: its exit status and stderr."""
    controller, terminal = pty.openpty()
    command = [sys.executable, "-m", "dicom_node", "segment", str(ct), "-o", str(out), *flags]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=terminal, stdin=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal's other end closed: the command has ended
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return run.wait(timeout=120), shown.decode(errors="replace")


STAGES = ("read", "resample", "inference", "post-processing", "write")
BAR = "━"  # what rich draws a bar with


def test_segment_shows_a_bar_per_stage_on_a_terminal(small_ct: Path, tmp_path: Path) -> None:
    status, shown = segment_on_a_terminal(small_ct, tmp_path / "seg.nii.gz")
    assert status == 0, shown
    for stage in STAGES:
        assert stage in shown
    assert BAR in shown and "100 %" in shown
    assert (tmp_path / "seg_sided.nii.gz").is_file()


def test_segment_is_quiet_when_asked_or_not_on_a_terminal(small_ct: Path, tmp_path: Path) -> None:
    status, shown = segment_on_a_terminal(small_ct, tmp_path / "a.nii.gz", "--quiet")
    assert status == 0, shown
    assert BAR not in shown and "inference" not in shown
    piped = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "segment",
            str(small_ct),
            "-o",
            str(tmp_path / "b.nii.gz"),
        ],
        capture_output=True,
        text=True,
    )
    assert piped.returncode == 0, piped.stderr
    assert BAR not in piped.stderr and "inference" not in piped.stderr
