"""Reading a series' headers and the frames they describe, without pixel data.

`read_headers` reads every DICOM instance among files or folders; `frames_of` gives the frames
of one instance (Enhanced CT one per frame, per-frame functional groups over shared ones);
`check_decodes` makes a header pydicom cannot decode a reason, not an exception later. Rules 1
and 2 of the package doc (which instances are CT images, which frames they hold) are decided
from what this module reads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MediaStorageDirectoryStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from dicom_node.imaging.volume.policy import AssemblyError

log = logging.getLogger(__name__)

CT_SOP_CLASSES = frozenset(
    {CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)
SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {
        SecondaryCaptureImageStorage,
        MultiFrameSingleBitSecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)
# Patient coordinates beyond a kilometre are corrupt headers, and they would overflow the
# arithmetic along the stack into inf and NaN.
_MAX_COORDINATE_MM = 1e6
_SPECIFIC_CHARACTER_SET = 0x00080005
# Attributes that an Enhanced CT keeps in functional group macros (PS3.3 C.7.6.16).
_FUNCTIONAL_GROUP_OF = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "FrameType": "CTImageFrameTypeSequence",
    "FrameAcquisitionNumber": "FrameContentSequence",
}


@dataclass(frozen=True)
class FrameRef:
    """One source frame: what a SEG's Referenced Image / Source Image items point at."""

    sop_instance_uid: str
    frame_number: int | None  # 1-based for multi-frame instances, None for single-frame ones
    path: Path


class Headers(list[tuple[Path, Dataset]]):
    """`read_headers`' (path, header) pairs, and how many files were not DICOM instances."""

    skipped: int = 0


@dataclass(frozen=True)
class Frame:
    """What the stage needs of one source frame, from the headers only."""

    ref: FrameRef
    position: tuple[float, ...]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, ...]
    rows: int
    columns: int
    thickness: float | None
    slope: float
    intercept: float
    acquisition: str
    localizer: bool
    stored_range: tuple[int, int]
    padding: tuple[int, int] | None  # stored values that are not image (outside the FOV)
    frame_of_reference_uid: str


def _file_meta(ds: Dataset) -> Dataset:
    return getattr(ds, "file_meta", None) or Dataset()


def _sop_class(ds: Dataset) -> str:
    return str(ds.get("SOPClassUID") or _file_meta(ds).get("MediaStorageSOPClassUID") or "")


def _sop_instance(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID") or _file_meta(ds).get("MediaStorageSOPInstanceUID") or "")


def is_ct_image(ds: Dataset) -> bool:
    sop_class = _sop_class(ds)
    if sop_class:
        return sop_class in CT_SOP_CLASSES
    return ds.get("Modality") == "CT" and "ImagePositionPatient" in ds


def kind_of_non_ct(ds: Dataset) -> str:
    sop_class = _sop_class(ds)
    if sop_class in SECONDARY_CAPTURE_SOP_CLASSES:
        return "secondary capture"
    return f"not a CT image ({UID(sop_class).name if sop_class else 'no SOP class'})"


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def read_headers(paths: Iterable[str | Path]) -> Headers:
    """Headers (no pixel data) of every DICOM instance among `paths` (files or folders).

    Files that are not DICOM instances (junk, a Philips DIRFILE or DICOMDIR, i.e. a Media
    Storage Directory) are skipped; their number is `.skipped` on the result.
    """
    headers = Headers()
    for path in _expand(paths):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception as error:  # pydicom raises many kinds on junk; junk is skipped
            log.debug("not DICOM: %s (%s)", path.name, type(error).__name__)
            headers.skipped += 1
            continue
        try:
            directory = _sop_class(ds) == MediaStorageDirectoryStorage
        except Exception:  # an undecodable SOP Class UID: the rules give the reason
            directory = False
        if directory:
            headers.skipped += 1
            continue
        headers.append((path, ds))
    if headers.skipped:
        log.info("skipped %d files that are not DICOM instances", headers.skipped)
    return headers


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return [value]


def _frame_value(ds: Dataset, index: int, keyword: str) -> Any:
    """An attribute of frame `index`: per-frame functional group, shared group, top level."""
    group = _FUNCTIONAL_GROUP_OF.get(keyword)
    if group is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        shared = ds.get("SharedFunctionalGroupsSequence") or []
        for item in [*per_frame[index : index + 1], *shared[:1]]:
            for macro in item.get(group) or []:
                if keyword in macro:
                    return macro[keyword].value
    return ds.get(keyword)


def _floats(value: Any, count: int, keyword: str, where: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in _values(value))
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise AssemblyError(f"instance {where}: {keyword} missing or malformed")
    return numbers


def _optional_float(value: Any, default: float | None) -> float | None:
    try:
        number = float(_values(value)[0])
    except (IndexError, TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if ds.get("PixelRepresentation") == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _padding(ds: Dataset) -> tuple[int, int] | None:
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit", value)
    try:
        return min(int(value), int(limit)), max(int(value), int(limit))
    except (TypeError, ValueError):  # an unresolved US/SS value: no padding is the safe reading
        return None


def _is_localizer(ds: Dataset, index: int) -> bool:
    image_types = (_values(ds.get("ImageType")), _values(_frame_value(ds, index, "FrameType")))
    return any(len(t) > 2 and str(t[2]).upper() == "LOCALIZER" for t in image_types)


def _malformed(
    path: Path, ds: Dataset, error: BaseException, element: BaseTag | None = None
) -> AssemblyError:
    """The reason for a header pydicom cannot decode: the error's type and, when known, the
    element, not the message (library messages quote values, which may identify the
    patient)."""
    try:
        where = _sop_instance(ds) or path.name
    except Exception:  # the SOP Instance UID itself is what is broken
        where = path.name
    at = f" in {element}" if element is not None else ""
    return AssemblyError(f"instance {where}: malformed header ({type(error).__name__}{at})")


def check_decodes(path: Path, ds: Dataset, decoded: set[tuple[Any, ...]]) -> None:
    """Every standard element of the header, in sequences too, decodes (private elements are
    the vendor's business). pydicom decodes on access, so without this a broken value (a US
    of 3 bytes, an unknown VR) raises in whatever reads it first, the SEG writer copying the
    patient module included; here it is the reason the series is skipped.

    `decoded` holds the raw elements (with the character set they were decoded in) already
    found good in this series: the slices of a series repeat most of their header, and
    decoding all of every one took longer than reading them."""
    charset = ds.get_item(_SPECIFIC_CHARACTER_SET)
    charset_bytes = charset.value if charset is not None else None
    trail: list[BaseTag] = []  # the element being decoded, innermost last

    def check(dataset: Dataset) -> None:
        for tag in list(dataset.keys()):
            if tag.is_private:
                continue
            raw = dataset.get_item(tag)
            key = None
            if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
                key = (
                    tag,
                    raw.VR,
                    raw.is_implicit_VR,
                    raw.is_little_endian,
                    raw.value,
                    charset_bytes,
                )
                if key in decoded:
                    continue
            trail.append(tag)
            element = dataset[tag]  # converts the raw element
            if element.VR == "SQ":
                for item in element.value:
                    check(item)
            trail.pop()
            if key is not None:
                decoded.add(key)

    try:
        check(ds)
    except Exception as error:  # any kind: ValueError, NotImplementedError, RecursionError...
        raise _malformed(path, ds, error, trail[-1] if trail else None) from error


def declared_frames(path: Path, ds: Dataset) -> int:
    """NumberOfFrames (1 when absent), read before any frame is expanded."""
    try:
        count = int(ds.get("NumberOfFrames") or 1)
    except Exception as error:  # an IS that is not a number, a wrong VR, ...
        raise _malformed(path, ds, error) from error
    if count < 1:
        raise AssemblyError(f"instance {_sop_instance(ds) or path.name}: NumberOfFrames {count}")
    return count


def frames_of(path: Path, ds: Dataset) -> list[Frame]:
    """The frames of one instance: one for single-frame CT, NumberOfFrames for Enhanced CT."""
    try:
        return _parse_frames(path, ds)
    except AssemblyError:
        raise
    except Exception as error:  # pydicom converts elements lazily: malformed ones raise here
        raise _malformed(path, ds, error) from error


def _parse_frames(path: Path, ds: Dataset) -> list[Frame]:
    uid = _sop_instance(ds)
    where = uid or path.name
    count = declared_frames(path, ds)
    multiframe = "PerFrameFunctionalGroupsSequence" in ds or count > 1
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or columns <= 0:
        raise AssemblyError(f"instance {where}: Rows/Columns missing")
    frames = []
    for index in range(count):

        def value(keyword: str, index: int = index) -> Any:
            return _frame_value(ds, index, keyword)

        pixel_spacing = _floats(value("PixelSpacing"), 2, "PixelSpacing", where)
        if min(pixel_spacing) <= 0:
            raise AssemblyError(f"instance {where}: PixelSpacing must be positive")
        acquisition = value("FrameAcquisitionNumber")
        if acquisition is None:
            acquisition = ds.get("AcquisitionNumber")
        slope = _optional_float(value("RescaleSlope"), 1.0)
        if not slope:
            raise AssemblyError(f"instance {where}: RescaleSlope is 0")
        position = _floats(value("ImagePositionPatient"), 3, "ImagePositionPatient", where)
        if max(map(abs, position)) > _MAX_COORDINATE_MM:
            raise AssemblyError(f"instance {where}: ImagePositionPatient out of range")
        # 0 or negative: written by some scanners for "unknown"; never a geometry to use.
        thickness = _optional_float(value("SliceThickness"), None)
        frames.append(
            Frame(
                ref=FrameRef(uid, index + 1 if multiframe else None, path),
                position=position,
                orientation=_floats(
                    value("ImageOrientationPatient"), 6, "ImageOrientationPatient", where
                ),
                pixel_spacing=pixel_spacing,
                rows=rows,
                columns=columns,
                thickness=thickness if thickness is not None and thickness > 0 else None,
                slope=slope,
                intercept=_optional_float(value("RescaleIntercept"), 0.0) or 0.0,
                acquisition="" if acquisition is None else str(acquisition),
                localizer=_is_localizer(ds, index),
                stored_range=_stored_range(ds),
                padding=_padding(ds),
                frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
            )
        )
    return frames
