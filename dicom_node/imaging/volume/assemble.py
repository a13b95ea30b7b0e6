"""Series -> volume, the public stage: the functions the node, the CLI and the benches call.

`group_series`, `survey_series` and `choose_series` find the series among received files and
the one to assemble; `select_series` decides from headers alone whether a series qualifies
(a skip reason or None); `assemble_volume` builds the `AssembledVolume`: HU from each frame's
own rescale, on the grid `planning` chose, with the source frames and their geometry for the
SEG. The rules are in the package doc.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from dicom_node.imaging.volume.geometry import SourceGeometry, orientation_axes, resample_stack
from dicom_node.imaging.volume.headers import Frame, FrameRef, read_headers
from dicom_node.imaging.volume.planning import plan_series, quantity
from dicom_node.imaging.volume.policy import AssemblyError, AssemblyPolicy
from model.resample import AIR_HU
from model.volume_io import Volume

log = logging.getLogger(__name__)

_INT16 = np.iinfo(np.int16)


@dataclass
class AssembledVolume:
    """A series as a volume, with the way back to its frames.

    `volume.array` holds HU as int16 when every frame's rescale gives whole HU that fit (the
    usual CT: slope 1, integer intercept) and nothing was resampled, else float32. Its grid is
    regular and orthogonal: direction (row, column, row x column) of ImageOrientationPatient,
    slices in increasing order along that normal (inferior to superior for a standard axial
    IOP), origin the first slice's first pixel; for a tilted stack, the corner of the in-plane
    box that holds every slice (outside the slices: -1024 HU). `frames` and
    `source_geometry` are the source frames in stack order, before any resampling.
    """

    volume: Volume
    frames: list[FrameRef]
    source_geometry: SourceGeometry
    notes: list[str]
    series_instance_uid: str
    resampled: bool = False
    # The headers assembly read (no pixel data), by file: the SEG writer references them
    # instead of reading every source file again.
    headers: dict[Path, Dataset] = field(default_factory=dict)


@dataclass(frozen=True)
class SeriesSurvey:
    """One series found among headers: its files and whether it qualifies."""

    series_instance_uid: str
    paths: list[Path]
    slices: int  # slices in the stack that would be assembled; 0 when it does not qualify
    reason: str | None  # None: qualifies


def group_series(headers: Iterable[tuple[Path, Dataset]]) -> dict[str, list[tuple[Path, Dataset]]]:
    """Headers by SeriesInstanceUID ('' for instances without one or with an undecodable
    one, which the rules then name), in order of appearance."""
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path, ds in headers:
        try:
            uid = str(ds.get("SeriesInstanceUID", ""))
        except Exception:
            uid = ""
        groups[uid].append((path, ds))
    return dict(groups)


def select_series(
    headers: Sequence[tuple[Path, Dataset]], policy: AssemblyPolicy | None = None
) -> str | None:
    """None if the series (headers of one series) qualifies, else the reason to skip it.

    Decided from headers alone by the same rules `assemble_volume` applies, so a series that
    passes here fails there only on its pixel data (e.g. an undecodable transfer syntax).
    """
    try:
        plan_series(headers, policy or AssemblyPolicy())
    except AssemblyError as error:
        return str(error)
    return None


def survey_series(
    headers: Iterable[tuple[Path, Dataset]], policy: AssemblyPolicy | None = None
) -> list[SeriesSurvey]:
    """Every series among `headers` with its skip reason, qualifying and largest first."""
    surveys = []
    for uid, members in group_series(headers).items():
        paths = [path for path, _ in members]
        try:
            plan = plan_series(members, policy or AssemblyPolicy())
        except AssemblyError as error:
            surveys.append(SeriesSurvey(uid, paths, 0, str(error)))
        else:
            surveys.append(SeriesSurvey(uid, paths, len(plan.frames), None))
    return sorted(surveys, key=lambda s: (s.reason is not None, -s.slices))


def choose_series(surveys: Sequence[SeriesSurvey], uid: str | None = None) -> SeriesSurvey:
    """The series `uid`, or the qualifying one with most slices; else every series' reason."""
    if not surveys:
        raise AssemblyError("no DICOM instances")
    if uid is not None:
        for survey in surveys:
            if survey.series_instance_uid == uid:
                if survey.reason is not None:
                    raise AssemblyError(f"series {uid}: {survey.reason}")
                return survey
        raise AssemblyError(f"no series {uid}")
    qualifying = [s for s in surveys if s.reason is None]
    if not qualifying:
        listed = "; ".join(
            f"{s.series_instance_uid or '(no UID)'} ({quantity(len(s.paths), 'file')}): {s.reason}"
            for s in surveys
        )
        raise AssemblyError(f"no qualifying series: {listed}")
    return max(qualifying, key=lambda s: s.slices)


def _hu_dtype(frames: list[Frame], resampling: bool) -> np.dtype:
    """int16 when every frame's rescale maps its stored range to whole HU in int16."""
    if resampling:
        return np.dtype(np.float32)
    for frame in frames:
        if not (frame.slope.is_integer() and frame.intercept.is_integer()):
            return np.dtype(np.float32)
        ends = [v * frame.slope + frame.intercept for v in frame.stored_range]
        if min(ends) < _INT16.min or max(ends) > _INT16.max:
            return np.dtype(np.float32)
    return np.dtype(np.int16)


def _read_hu(frames: list[Frame], dtype: np.dtype) -> np.ndarray:
    """HU of every frame, in order: stored x slope + intercept of that frame; padding -> air.

    Pixel data is decoded by pydicom (pylibjpeg for JPEG, JPEG-LS and JPEG 2000). Stored
    values marked as Pixel Padding (outside the reconstructed circle, e.g. -1500 on GE) are
    not image: they become air (-1024 HU), as the resampling fills outside the slices.
    """
    first = frames[0]
    hu = np.empty((len(frames), first.rows, first.columns), dtype=dtype)
    by_path: dict[Path, list[int]] = defaultdict(list)
    for index, frame in enumerate(frames):
        by_path[frame.ref.path].append(index)
    for path, indices in by_path.items():
        where = frames[indices[0]].ref.sop_instance_uid or path.name
        try:
            stored = pixel_array(path)
        except Exception as error:  # decoders raise many kinds on bad or unsupported data
            raise AssemblyError(f"cannot decode pixel data of instance {where}: {error}") from error
        if stored.size % (first.rows * first.columns):
            raise AssemblyError(f"instance {where}: pixel data does not match Rows x Columns")
        stored = stored.reshape(-1, first.rows, first.columns)
        for index in indices:
            frame = frames[index]
            number = (frame.ref.frame_number or 1) - 1
            if number >= len(stored):
                raise AssemblyError(f"instance {where}: frame {number + 1} missing")
            if hu.dtype == np.int16:  # whole slope and intercept (_hu_dtype): exact in int32
                values = stored[number].astype(np.int32)
                if frame.slope != 1:
                    values *= int(frame.slope)
                values += int(frame.intercept)
            else:
                values = np.multiply(stored[number], frame.slope, dtype=np.float64)
                values += frame.intercept
            if frame.padding is not None:
                low, high = frame.padding
                values[(stored[number] >= low) & (stored[number] <= high)] = AIR_HU
            if hu.dtype == np.int16 and (values.min() < _INT16.min or values.max() > _INT16.max):
                hu = hu.astype(np.float32)  # stored values beyond BitsStored: keep them exact
            hu[index] = values
    return hu


def assemble_volume(
    paths: Iterable[str | Path], policy: AssemblyPolicy | None = None
) -> AssembledVolume:
    """The volume of one series' files (or folders), or AssemblyError with the reason."""
    policy = policy or AssemblyPolicy()
    headers = read_headers(paths)
    by_path = dict(headers)
    plan = plan_series(headers, policy)
    frames, first = plan.frames, plan.frames[0]
    row, column, normal = orientation_axes(first.orientation)
    row_spacing, column_spacing = first.pixel_spacing
    hu = _read_hu(frames, _hu_dtype(frames, plan.output_depths is not None))
    origin = np.asarray(first.position, dtype=np.float64)
    if plan.output_depths is not None:
        hu = resample_stack(
            hu,
            plan.depths,
            plan.offsets,
            (column_spacing, row_spacing),
            plan.output_depths,
            plan.plane_low,
            plan.plane_size,
        )
        origin = origin + plan.plane_low[0] * row + plan.plane_low[1] * column
    if any(f.padding is not None for f in frames):
        plan.notes.append("pixel padding (outside the reconstructed field) set to -1024 HU")
    volume = Volume(
        hu,
        spacing=(column_spacing, row_spacing, plan.spacing),
        origin=tuple(origin.tolist()),
        direction=tuple(np.column_stack([row, column, normal]).ravel().tolist()),
    )
    geometry = SourceGeometry(
        positions=np.array([f.position for f in frames]),
        orientation=first.orientation,
        pixel_spacing=(row_spacing, column_spacing),
        rows=first.rows,
        columns=first.columns,
        slice_thickness_mm=first.thickness,
        frame_of_reference_uid=first.frame_of_reference_uid,
    )
    log.info(
        "assembled series %s: %d frames -> %s voxels (%s)",
        plan.series_instance_uid,
        len(frames),
        "x".join(map(str, hu.shape[::-1])),
        "; ".join(plan.notes) or "as stacked",
    )
    return AssembledVolume(
        volume=volume,
        frames=[f.ref for f in frames],
        source_geometry=geometry,
        notes=plan.notes,
        series_instance_uid=plan.series_instance_uid,
        resampled=plan.output_depths is not None,
        headers={f.ref.path: by_path[f.ref.path] for f in frames},
    )
