"""Building a hostile `Case` from its `Spec`: a valid CT series (the node's own writer) as the
template, mutated at the dataset level (absurd attributes, bad UIDs, missing tags, things
that are no image) or at the byte level (truncated, overwritten, wrong VRs and lengths,
sequences nested deeper than pydicom reads), and a deflate bomb.
"""

from __future__ import annotations

import copy
import struct
import tempfile
import zlib
from functools import cache
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
)

from dicom_node.testbed.ct_series import write_ct_series
from model.volume_io import Volume
from tests.support.hostile.cases import (
    PATIENT,
    SIZE,
    SLICES,
    Case,
    Encoded,
    Spec,
    no_validation,
)


@cache
def _template() -> tuple[Dataset, ...]:
    """A valid SIZE x SIZE x SLICES CT series (the node's own writer), as datasets to copy."""
    rng = np.random.default_rng(5)
    hu = rng.integers(-1000, 1500, (SLICES, SIZE, SIZE)).astype(np.int16)
    with tempfile.TemporaryDirectory(prefix="hostile-template-") as directory:
        paths = write_ct_series(Volume(hu, (1.0, 1.0, 2.0)), Path(directory), patient=PATIENT)
        return tuple(dcmread(path) for path in sorted(paths))


def _uid(serial: int, part: int) -> str:
    return f"2.25.{serial}{part:03d}"


def encode(ds: Dataset, syntax: str) -> bytes:
    """`ds` encoded in `syntax` (deflated too), without its file meta; validation off, so
    that hostile values are written as given."""
    syntax = UID(syntax)
    fp = DicomBytesIO()
    fp.is_little_endian = syntax.is_little_endian
    fp.is_implicit_VR = syntax.is_implicit_VR
    with no_validation():
        write_dataset(fp, ds)
    data = fp.getvalue()
    if syntax.is_deflated:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


def _element_offsets(data: bytes, syntax: str) -> list[tuple[int, int, bool]]:
    """(start of the element's header, header length, 4-byte length?) of every top-level
    element of an encoded dataset."""
    syntax = UID(syntax)
    offsets = []
    with no_validation():
        for raw in data_element_generator(
            BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, defer_size=0
        ):
            if syntax.is_implicit_VR:
                header, long = 8, True
            else:
                long = raw.VR in (
                    "OB",
                    "OD",
                    "OF",
                    "OL",
                    "OV",
                    "OW",
                    "SQ",
                    "SV",
                    "UC",
                    "UN",
                    "UR",
                    "UT",
                    "UV",
                )
                header = 12 if long else 8
            offsets.append((raw.value_tell - header, header, long))
    return offsets


def _mutate_bytes(spec: Spec, data: bytes, syntax: str) -> bytes:
    """Byte-level mutations of an encoded dataset."""
    if spec.kind == "truncated":
        return data[: int(len(data) * spec.get("keep"))]
    if spec.kind == "overwritten":
        mutable = bytearray(data)
        for where, value in spec.get("writes"):
            start = int(len(mutable) * where)
            mutable[start : start + len(value)] = value
        return bytes(mutable)
    offsets = _element_offsets(data, syntax)
    start, header, long = offsets[spec.get("element") % len(offsets)]
    mutable = bytearray(data)
    big = not UID(syntax).is_little_endian
    if spec.kind == "wrong_vr":
        # Explicit VR: the VR itself. Implicit VR has none on the wire: the two bytes land in
        # the length field, which is what a sender mixing up the two encodings does.
        mutable[start + 4 : start + 6] = spec.get("vr")
        return bytes(mutable)
    length = spec.get("length")
    if long:
        mutable[start + header - 4 : start + header] = struct.pack(">I" if big else "<I", length)
    else:
        mutable[start + 6 : start + 8] = struct.pack(">H" if big else "<H", length & 0xFFFF)
    return bytes(mutable)


def _mutate_dataset(spec: Spec, ds: Dataset) -> str:
    """Dataset-level mutations; returns the request's SOP Instance UID."""
    request_uid = str(ds.SOPInstanceUID)
    if spec.kind == "pixel_length":
        delta = spec.get("delta")
        pixels = bytes(ds.PixelData)
        ds.PixelData = pixels[:delta] if delta < 0 else pixels + b"\x01" * delta
    elif spec.kind in ("absurd_dims", "bad_geometry"):
        pairs = spec.get("set")
        pairs = pairs if spec.kind == "absurd_dims" else (pairs,)
        for keyword, value in pairs:
            if keyword == "NumberOfFrames" or isinstance(value, str | list):
                _set_raw(ds, keyword, value)
            else:
                setattr(ds, keyword, value)
    elif spec.kind == "bad_uid":
        _set_raw(ds, spec.get("keyword"), spec.get("uid"))
    elif spec.kind == "bad_request_uid":
        request_uid = spec.get("uid")
    elif spec.kind == "missing_tag":
        for keyword in spec.get("delete"):
            if keyword in ds:
                delattr(ds, keyword)
    return request_uid


def _set_raw(ds: Dataset, keyword: str, value: Any) -> None:
    """Set an element to exactly these bytes, bypassing pydicom's value checks (NaN in a DS,
    a NUL in a UI, 2147483647 frames): a raw element is written as it is."""
    tag = tag_for_keyword(keyword)
    if isinstance(value, list):
        value = "\\".join(value)
    data = str(value).encode("latin-1", "replace")
    if len(data) % 2:
        data += b"\0" if dictionary_VR(tag) == "UI" else b" "
    ds[tag] = RawDataElement(Tag(tag), dictionary_VR(tag), len(data), data, 0, False, True)


def _with_deep_sequence(data: bytes, syntax: str, depth: int) -> bytes:
    """`data` with a Referenced Image Sequence nested `depth` deep, undefined lengths, as
    bytes: pydicom itself cannot write (or read) that deep a dataset."""
    syntax = UID(syntax)
    order = ">" if not syntax.is_little_endian else "<"

    def tag(group: int, element: int) -> bytes:
        return struct.pack(f"{order}HH", group, element)

    undefined = struct.pack(f"{order}I", 0xFFFFFFFF)
    sequence = tag(0x0008, 0x1140) + (undefined if syntax.is_implicit_VR else b"SQ\0\0" + undefined)
    item = tag(0xFFFE, 0xE000) + undefined
    end = tag(0xFFFE, 0xE00D) + bytes(4) + tag(0xFFFE, 0xE0DD) + bytes(4)
    nested = (sequence + item) * depth + end * depth
    at = next(
        (
            start
            for start, _, _ in _element_offsets(data, syntax)
            if struct.unpack(f"{order}HH", data[start : start + 4]) > (0x0008, 0x1140)
        ),
        len(data),
    )
    return data[:at] + nested + data[at:]


def _not_an_image(what: str, template: Dataset, serial: int) -> tuple[Dataset | bytes, str]:
    """A dataset that is no CT image, to be sent as CT Image Storage."""
    ds = Dataset()
    uid = _uid(serial, 900)
    if what == "empty":
        return b"", uid
    if what == "encapsulated_as_native":  # JPEG-like fragments in a native context
        data = bytearray(encode(template, ExplicitVRLittleEndian))
        marker = b"\xe0\x7f\x10\x00OW"  # (7FE0,0010) OW
        at = data.find(marker)
        data[at + 8 : at + 12] = b"\xff\xff\xff\xff"  # undefined length: encapsulated
        data[at + 12 :] = b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0\x04\x00\x00\x00ABCD"
        return bytes(data), uid
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = _uid(serial, 901)
    ds.SeriesInstanceUID = _uid(serial, 902)
    ds.Modality = "CT"
    if what == "sr_document":
        ds.ValueType = "CONTAINER"
        ds.ContentSequence = DicomSequence([Dataset()])
        ds.ContentSequence[0].ValueType = "TEXT"
        ds.ContentSequence[0].TextValue = "not an image"
    elif what == "rt_structure_set":
        ds.StructureSetLabel = "CT"
        ds.ROIContourSequence = DicomSequence([Dataset()])
    return ds, uid


def build(spec: Spec, serial: int) -> Case:
    """The case `spec` describes, with UIDs unique to `serial` (a run-wide counter), so that
    cases never collide by accident."""
    template = _template()
    series_uid, study_uid = _uid(serial, 1), _uid(serial, 2)
    whole_series = spec.in_series or spec.get("slices") == "all"
    hostile_index = SLICES // 2
    slices: dict[int, Dataset] = {}
    for index in range(SLICES) if whole_series else [hostile_index]:
        ds = copy.deepcopy(template[index])
        ds.SOPInstanceUID = _uid(serial, 100 + index)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        slices[index] = ds
    ds = slices[hostile_index]
    syntax = spec.get("syntax") or ExplicitVRLittleEndian
    sop_class = CTImageStorage
    if spec.kind == "not_an_image":
        built, request_uid = _not_an_image(spec.get("what"), ds, serial)
        data = built if isinstance(built, bytes) else encode(built, syntax)
    else:
        request_uid = str(ds.SOPInstanceUID)
        for target in slices.values() if spec.get("slices") == "all" else [ds]:
            uid = _mutate_dataset(spec, target)
            if target is ds:
                request_uid = uid
        if spec.kind == "sop_class":
            sop_class = spec.get("sop_class")
        data = encode(ds, syntax)
        if spec.kind == "syntax_mismatch":
            syntax = spec.get("sent_as")  # encoded one way, sent as another
        elif spec.kind in ("truncated", "overwritten", "wrong_vr", "huge_length"):
            data = _mutate_bytes(spec, data, syntax)
        elif spec.kind == "deep_sequence":
            data = _with_deep_sequence(data, syntax, spec.get("depth"))
    hostile = Encoded(sop_class, request_uid, syntax, data)
    companions = tuple(
        Encoded(
            CTImageStorage,
            str(s.SOPInstanceUID),
            ExplicitVRLittleEndian,
            encode(s, ExplicitVRLittleEndian),
        )
        for index, s in sorted(slices.items())
        if index != hostile_index and spec.in_series
    )
    return Case(spec, hostile, companions, series_uid)


@cache
def deflate_bomb(inflated_bytes: int) -> Encoded:
    """A deflated dataset that inflates to `inflated_bytes`: a valid header, then one huge
    private element of zeros (deflate compresses zeros ~1000:1)."""
    header = Dataset()
    header.SOPClassUID = CTImageStorage
    header.SOPInstanceUID = f"2.25.{inflated_bytes}999"
    header.StudyInstanceUID = f"2.25.{inflated_bytes}998"
    header.SeriesInstanceUID = f"2.25.{inflated_bytes}997"
    header.Modality = "CT"
    head = encode(header, ExplicitVRLittleEndian)
    length = inflated_bytes - len(head) - 12
    element = struct.pack("<HH2sHI", 0x0029, 0x1010, b"OB", 0, length)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(head + element)]
    zeros = bytes(1 << 20)
    remaining = length
    while remaining > 0:
        parts.append(compressor.compress(zeros[: min(remaining, len(zeros))]))
        remaining -= len(zeros)
    parts.append(compressor.flush())
    return Encoded(
        CTImageStorage, str(header.SOPInstanceUID), DeflatedExplicitVRLittleEndian, b"".join(parts)
    )
