"""Planning a volume from headers alone: which frames, in which order, on which grid.

`plan_series` applies the rules of the package doc (`dicom_node.imaging.volume`, numbered
1-7 there and here) to the headers of one series and returns the `Plan`, or raises
AssemblyError with the reason, before any pixel data is decoded or any memory allocated for
it: `select_series` and `assemble_volume` both plan with it, so they decide alike.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.imaging.volume.geometry import (
    analyse_spacing,
    orientation_axes,
    stack_coordinates,
    tilt_degrees,
)
from dicom_node.imaging.volume.headers import (
    Frame,
    check_decodes,
    declared_frames,
    frames_of,
    is_ct_image,
    kind_of_non_ct,
)
from dicom_node.imaging.volume.policy import MODEL_SPACING_MM, AssemblyError, AssemblyPolicy

# Positions closer than this along the normal are the same slice (DICOM writes positions to
# ~1e-5 mm; no scanner reconstructs slices 0.01 mm apart).
_DUPLICATE_MM = 0.01
# In-plane shifts along the stack below this fraction of a pixel are rounding, not tilt.
_SHEAR_TOLERANCE_PX = 0.1
# Orientation cosines and pixel spacings are compared at this many decimals (rounding noise in
# the headers is ~1e-7; a real difference is larger than 1e-3).
_GEOMETRY_DECIMALS = 3
_ORTHONORMAL_TOLERANCE = 1e-3
# Orientation cosines are unit vectors; DICOM writes them to a few decimals, so allow that much.
_UNIT_TOLERANCE = 1e-2


@dataclass
class Plan:
    """Everything decided from the headers: which frames, in which order, on which grid."""

    series_instance_uid: str
    frames: list[Frame]
    offsets: np.ndarray  # (frames, 2) in-plane shift from the first frame, mm (0 if not tilted)
    depths: np.ndarray  # distance from the first frame along the normal, mm
    spacing: float  # output slice spacing, mm
    output_depths: np.ndarray | None  # output slice depths when resampling, else None
    notes: list[str]
    plane_low: tuple[float, float] = (0.0, 0.0)  # output grid's in-plane origin (tilt), mm
    plane_size: tuple[int, int] = (0, 0)  # output grid's (columns, rows)


def quantity(number: int, singular: str, plural: str | None = None) -> str:
    """`number` with its noun for the notes and reasons: "1 file", "3 files"."""
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(v, _GEOMETRY_DECIMALS) + 0.0 for v in values)


def _format(values: Sequence[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


def _check_consistent(frames: list[Frame]) -> None:
    """Rule 3: every frame shares rows/columns, pixel spacing, orientation and frame of
    reference, and the orientation is two orthogonal unit vectors."""
    attributes = (
        ("rows/columns", lambda f: f"{f.rows}x{f.columns}"),
        ("pixel spacing", lambda f: _format(_rounded(f.pixel_spacing)) + " mm"),
        ("image orientation", lambda f: _format(_rounded(f.orientation))),
        ("frame of reference", lambda f: f.frame_of_reference_uid or "none"),
    )
    for label, key in attributes:
        counts = Counter(key(f) for f in frames)
        if len(counts) > 1:
            found = ", ".join(f"{k}: {n} frames" for k, n in counts.most_common())
            raise AssemblyError(f"inconsistent {label} ({found})")
    orientation = np.asarray(frames[0].orientation, dtype=np.float64)
    norms = np.linalg.norm(orientation[:3]), np.linalg.norm(orientation[3:])
    if any(abs(norm - 1.0) > _UNIT_TOLERANCE for norm in norms):
        raise AssemblyError("image orientation: direction cosines are not unit vectors")
    row, column, _ = orientation_axes(frames[0].orientation)
    if abs(float(row @ column)) > _ORTHONORMAL_TOLERANCE:
        raise AssemblyError("image orientation: row and column directions are not orthogonal")


def _unique_frames(frames: list[Frame], notes: list[str]) -> list[Frame]:
    """Copies of one instance (a re-send) count once."""
    seen: set[tuple[str, int | None]] = set()
    unique = []
    for frame in frames:
        key = (frame.ref.sop_instance_uid, frame.ref.frame_number)
        if frame.ref.sop_instance_uid and key in seen:
            continue
        seen.add(key)
        unique.append(frame)
    if len(unique) < len(frames):
        duplicates = quantity(len(frames) - len(unique), "duplicate instance")
        notes.append(f"ignored {duplicates} (same SOP Instance UID)")
    return unique


def _choose_stack(frames: list[Frame], notes: list[str]) -> list[Frame]:
    """The frames of the stack to assemble, sorted along the normal (rule 4)."""
    normal = orientation_axes(frames[0].orientation)[2]

    def depth(frame: Frame) -> float:
        return float(np.dot(frame.position, normal))

    by_acquisition: dict[str, list[Frame]] = defaultdict(list)
    for frame in frames:
        by_acquisition[frame.acquisition].append(frame)
    ranges = sorted((min(map(depth, fs)), max(map(depth, fs))) for fs in by_acquisition.values())
    reach = ranges[0][1]
    overlap = False
    for low, high in ranges[1:]:
        overlap = overlap or low < reach - _DUPLICATE_MM
        reach = max(reach, high)
    if overlap:
        stacks = sorted(by_acquisition.items(), key=lambda item: (-len(item[1]), item[0]))
        (chosen, stack), (runner_up, other) = stacks[0], stacks[1]
        if len(stack) == len(other):
            raise AssemblyError(
                f"ambiguous: overlapping acquisitions {chosen or '?'} and {runner_up or '?'} "
                f"have {len(stack)} slices each"
            )
        for name, left_out in stacks[1:]:
            notes.append(
                f"left out acquisition {name or '?'} ({len(left_out)} slices), which overlaps "
                f"the assembled acquisition {chosen or '?'} ({len(stack)} slices)"
            )
        frames = stack
    frames = sorted(frames, key=depth)
    duplicates = int(np.sum(np.diff([depth(f) for f in frames]) < _DUPLICATE_MM))
    if duplicates:
        raise AssemblyError(
            f"duplicate slice positions ({duplicates} frames at the position of another, "
            "not told apart by acquisition number)"
        )
    return frames


def _check_selection(frames: list[Frame], policy: AssemblyPolicy) -> None:
    normal = orientation_axes(frames[0].orientation)[2]
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if angle > policy.axial_tolerance_deg:
        raise AssemblyError(
            f"not axial (slice normal {angle:.1f} deg from the patient z axis "
            f"> {policy.axial_tolerance_deg:g})"
        )
    if len(frames) < policy.min_slices:
        raise AssemblyError(f"too few slices ({len(frames)} < {policy.min_slices})")
    thicknesses = [f.thickness for f in frames if f.thickness]
    if thicknesses and max(thicknesses) > policy.max_slice_thickness_mm + 1e-6:
        thickest = max(thicknesses)
        count = sum(t > policy.max_slice_thickness_mm + 1e-6 for t in thicknesses)
        raise AssemblyError(
            f"slice thickness {thickest:g} mm > {policy.max_slice_thickness_mm:g} mm "
            f"({count} of {len(frames)} slices)"
        )


def _check_body_part(headers: Sequence[tuple[Path, Dataset]], policy: AssemblyPolicy) -> None:
    skipped = {part.replace(" ", "").upper() for part in policy.skip_body_parts}
    for _, ds in headers:
        part = str(ds.get("BodyPartExamined") or "")
        if part.replace(" ", "").upper() in skipped:
            raise AssemblyError(f"body part examined {part} (series.skip_body_parts)")


def plan_series(headers: Sequence[tuple[Path, Dataset]], policy: AssemblyPolicy) -> Plan:
    """Rules 1-7 of the package doc on headers alone; raises AssemblyError with the reason."""
    notes: list[str] = []
    skipped = getattr(headers, "skipped", 0)
    if skipped:
        notes.append(f"ignored {quantity(skipped, 'non-DICOM file')}")
    if not headers:
        raise AssemblyError("no DICOM instances")
    decoded: set[tuple[Any, ...]] = set()
    for path, ds in headers:
        check_decodes(path, ds, decoded)
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise AssemblyError(f"{len(series)} series in one input; assemble one at a time")
    ct = [(path, ds) for path, ds in headers if is_ct_image(ds)]
    if not ct:
        raise AssemblyError(Counter(kind_of_non_ct(ds) for _, ds in headers).most_common(1)[0][0])
    if len(ct) < len(headers):
        notes.append(f"left out {quantity(len(headers) - len(ct), 'non-CT instance')}")
    declared = sum(declared_frames(path, ds) for path, ds in ct)
    if declared > policy.max_slices:  # before expanding frames: NumberOfFrames may be 2^31
        raise AssemblyError(f"too many slices ({declared} > {policy.max_slices})")
    no_class = sum(not ds.get("SOPClassUID") for _, ds in ct)
    if no_class:
        notes.append(f"empty SOP Class UID in {quantity(no_class, 'instance')}: taken as CT")
    frames = _unique_frames([f for path, ds in ct for f in frames_of(path, ds)], notes)
    images = [f for f in frames if not f.localizer]
    if not images:
        raise AssemblyError("localizer")
    _check_body_part(ct, policy)
    if len(images) < len(frames):
        notes.append(f"left out {quantity(len(frames) - len(images), 'localizer frame')}")
    _check_consistent(images)
    stack = _choose_stack(images, notes)
    _check_selection(stack, policy)
    return _plan_grid(stack, policy, notes, series.pop())


def _plan_grid(
    stack: list[Frame], policy: AssemblyPolicy, notes: list[str], series_uid: str
) -> Plan:
    """Rule 7: the output grid, resampling the tilted or irregular stack or rejecting it."""
    orientation = stack[0].orientation
    depths, offsets = stack_coordinates(np.array([f.position for f in stack]), orientation)
    analysis = analyse_spacing(depths, policy.spacing_tolerance)
    shear = float(np.abs(offsets).max(initial=0.0))
    tilted = shear > _SHEAR_TOLERANCE_PX * min(stack[0].pixel_spacing)
    tilt = tilt_degrees(depths, offsets)
    if tilted and policy.gantry_tilt == "reject":
        raise AssemblyError(f"gantry tilt {tilt:.1f} deg (policy: reject)")
    if not analysis.regular:
        if policy.irregular_spacing == "reject":
            raise AssemblyError(f"{analysis.describe()} (policy: reject)")
        if analysis.max_gap > policy.max_gap_factor * analysis.spacing:
            raise AssemblyError(
                f"gap of {analysis.max_gap:.2f} mm between slices is "
                f"{analysis.max_gap / analysis.spacing:.1f}x the {analysis.spacing:.2f} mm "
                f"spacing (max_gap_factor {policy.max_gap_factor:g})"
            )
    if not tilted:
        offsets = np.zeros_like(offsets)
    first = stack[0]
    if analysis.regular and not tilted:
        spacing = analysis.spacing or first.thickness or 1.0
        size = (first.columns, first.rows)
        _check_size(len(stack), size, first.pixel_spacing, spacing, policy)
        return Plan(series_uid, stack, offsets, depths, spacing, None, notes, (0.0, 0.0), size)
    # Whole steps from the first slice to the last, as close to the target as can be: the
    # volume then covers every source slice, and the SEG can be sampled back on each of them.
    steps = max(1, round(float(depths[-1]) / (policy.resample_spacing_mm or analysis.spacing)))
    spacing, count = float(depths[-1]) / steps, steps + 1
    # The in-plane box that holds every shifted slice (a tilted stack is wider than a slice).
    low = offsets.min(axis=0)
    extent = offsets.max(axis=0) - low
    row_spacing, column_spacing = first.pixel_spacing
    size = (
        first.columns + math.ceil(extent[0] / column_spacing - 1e-6),
        first.rows + math.ceil(extent[1] / row_spacing - 1e-6),
    )
    _check_size(count, size, first.pixel_spacing, spacing, policy)  # before arange(count)
    if tilted:
        notes.append(
            f"gantry tilt {tilt:.1f} deg corrected: slices moved onto an orthogonal grid "
            f"(in-plane shifts up to {shear:.1f} mm)"
        )
    if not analysis.regular:
        notes.append(
            f"resampled {analysis.describe()} to {spacing:.2f} mm "
            f"({count} slices from {len(stack)})"
        )
    elif policy.resample_spacing_mm:
        notes.append(f"resampled to {spacing:.2f} mm ({count} slices from {len(stack)})")
    output_depths = np.arange(count) * spacing
    plane_low = (float(low[0]), float(low[1]))
    return Plan(series_uid, stack, offsets, depths, spacing, output_depths, notes, plane_low, size)


def _check_size(
    slices: int,
    plane_size: tuple[int, int],
    pixel_spacing: tuple[float, ...],
    slice_spacing: float,
    policy: AssemblyPolicy,
) -> None:
    """Rule 6: the volume, on its own grid and on the model's 0.8 mm grid, fits `max_voxels`.

    Python integers and floats, not numpy's: 65535 x 65535 x 5000 must not wrap around."""
    columns, rows = plane_size
    voxels = slices * rows * columns
    row_spacing, column_spacing = pixel_spacing
    extent_mm = (columns * column_spacing, rows * row_spacing, slices * slice_spacing)
    model_voxels = math.prod(max(1.0, mm / MODEL_SPACING_MM) for mm in extent_mm)
    largest = max(voxels, model_voxels)
    if largest > policy.max_voxels:
        where = "" if voxels >= model_voxels else f" at the model's {MODEL_SPACING_MM} mm"
        raise AssemblyError(
            f"volume too large: {_voxels(largest)}{where} > max_voxels "
            f"{_voxels(policy.max_voxels).removesuffix(' voxels')} ({columns}x{rows}x{slices} "
            f"at {column_spacing:g} x {row_spacing:g} x {slice_spacing:.3g} mm)"
        )


def _voxels(count: float) -> str:
    return f"{count / 1e6:,.0f} M voxels" if count >= 1e6 else f"{count:,.0f} voxels"
