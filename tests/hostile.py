"""Hostile DICOM input, and a sender that puts it on the wire exactly as built.

Shared by tests/test_hostile.py (a few hundred cases in `make test`) and bench/fuzz.py
(thousands in `make bench`). Hypothesis draws a `Spec` (which mutation, where, with what);
`build` turns it into a `Case`: the encoded dataset of one hostile instance, the claims of
its C-STORE request (SOP class, SOP instance UID, transfer syntax) and, for some cases, the
valid slices of the series it hides in, so that it also reaches selection and the worker.

`HostileSender` writes each instance behind its own file meta and lets pynetdicom stream the
bytes unparsed (`STORE_SEND_CHUNKED_DATASET`), with pynetdicom's UID checks off while it
sends: what reaches the node is the hostile bytes, not what pydicom would have re-encoded.

Hostile UIDs carry the marker `fuzzcanary`, so a test can look for any file or folder a
path-like UID (`../`, `/`, NUL) might have made the node create.
"""

from __future__ import annotations

import contextlib
import copy
import re
import sqlite3
import struct
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association

from dicom_node.net.receive import UID_PATTERN
from dicom_node.net.send import prepare_requestor
from dicom_node.net.statuses import CANNOT_UNDERSTAND, SUCCESS
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from model.volume_io import Volume

CANARY = "fuzzcanary"
PATIENT = PatientInfo(name="HOSTILE^FUZZPATIENT", patient_id="PID-HOSTILE-0815")
# A companion series: the node under test runs with [series] min_slices = SLICES, so a series
# of this many slices qualifies and goes to the worker (a 20-slice series would cost 20
# fsynced C-STOREs per case).
SLICES = 4
SIZE = 16  # rows and columns of every generated slice: small, the worker is quick on them
SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
SOP_CLASSES = (
    CTImageStorage,
    SecondaryCaptureImageStorage,
    BasicTextSRStorage,
    RTStructureSetStorage,
)
# UIDs no node should take as a path, a log line or a database key without thinking.
HOSTILE_UIDS = (
    f"../../../{CANARY}",
    f"/tmp/{CANARY}",
    f"1.2.3/../../{CANARY}",
    f"1.2.3\x00{CANARY}",
    f"1.2.3\n2024-01-01 00:00:00 ERROR forged log line {CANARY}",
    f"C:\\{CANARY}\\x",
    "1." * 40,  # 80 characters
    "1" * 65,
    "9" * 64,  # exactly 64: legal length, illegal component
    "..",
    "",
    " ",
    "1.2.ä.3",
    f"%s%n{CANARY}",
)
# A request UID pynetdicom cannot decode (empty, over 64 characters) makes it drop the command
# unanswered; the sender then waits out its DIMSE time-out. Drawn at random only from the
# others; `UNDECODABLE_REQUEST_UIDS` are sent as explicit cases.
UNDECODABLE_REQUEST_UIDS = tuple(u for u in HOSTILE_UIDS if not 0 < len(u.strip(" \0")) <= 64)
DECODABLE_REQUEST_UIDS = tuple(u for u in HOSTILE_UIDS if u not in UNDECODABLE_REQUEST_UIDS)
# Values for absurd image attributes (keyword, value).
ABSURD = (
    ("Rows", 0),
    ("Rows", 1),
    ("Rows", 65535),
    ("Columns", 0),
    ("Columns", 65535),
    ("NumberOfFrames", "0"),
    ("NumberOfFrames", "-1"),
    ("NumberOfFrames", "2147483647"),
    ("NumberOfFrames", "99999"),
    ("BitsAllocated", 0),
    ("BitsAllocated", 1),
    ("BitsAllocated", 7),
    ("BitsAllocated", 64),
    ("BitsStored", 0),
    ("BitsStored", 40),
    ("SamplesPerPixel", 0),
    ("SamplesPerPixel", 3),
    ("PixelRepresentation", 7),
    ("PhotometricInterpretation", "PALETTE COLOR"),
)
# Geometry that assembles to something absurd (keyword, value); slice index chosen too.
GEOMETRY = (
    ("ImagePositionPatient", ["nan", "0", "0"]),
    ("ImagePositionPatient", ["0", "0", "inf"]),
    ("ImagePositionPatient", ["0", "0", "1e300"]),
    ("ImagePositionPatient", ["0", "0", "0"]),  # on top of the first slice
    ("PixelSpacing", ["0", "0"]),
    ("PixelSpacing", ["-1", "1"]),
    ("PixelSpacing", ["1e6", "1e6"]),
    ("ImageOrientationPatient", ["0", "0", "0", "0", "0", "0"]),
    ("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"]),  # parallel
    ("SliceThickness", "-5"),
    ("SliceThickness", "0"),
    ("RescaleSlope", "0"),
    ("RescaleSlope", "nan"),
    ("RescaleIntercept", "1e308"),
)
MISSING = (
    "SOPInstanceUID",
    "SOPClassUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "PixelData",
    "Rows",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "FrameOfReferenceUID",
)
VRS = (b"SQ", b"UN", b"OB", b"OW", b"UT", b"XX", b"\x00\x00", b"FD", b"US", b"AT", b"UI", b"DS")
LENGTHS = (0xFFFF, 0xFFFE, 0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, 0x10000, 1, 3)


@dataclass(frozen=True)
class Spec:
    """What to do to an instance: a kind and its parameters (drawn by Hypothesis)."""

    kind: str
    params: tuple[tuple[str, Any], ...] = ()
    in_series: bool = False  # hidden among valid slices of one series (reaches the worker)

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v!r}"[:80] for k, v in self.params)
        return f"{self.kind}({shown}){' in a series' if self.in_series else ''}"


@dataclass(frozen=True)
class Encoded:
    """One instance as a C-STORE carries it."""

    sop_class_uid: str
    sop_instance_uid: str  # the request's Affected SOP Instance UID
    transfer_syntax_uid: str
    dataset: bytes  # the encoded dataset, after the file meta


@dataclass(frozen=True)
class Case:
    spec: Spec
    hostile: Encoded
    companions: tuple[Encoded, ...] = ()  # valid slices of the same series, sent first
    series_instance_uid: str = ""  # the series it claims, if it could be set

    @property
    def instances(self) -> tuple[Encoded, ...]:
        return (*self.companions, self.hostile)


# -- strategies ---------------------------------------------------------------------------------


@st.composite
def specs(draw: st.DrawFn, kind: str | None = None) -> Spec:
    """Hostile input of `kind` (any of KINDS if None), with its parameters."""
    kind = kind or draw(st.sampled_from(KINDS))
    params: dict[str, Any] = {}
    if kind in ("truncated", "overwritten", "wrong_vr", "huge_length", "syntax_mismatch"):
        params["syntax"] = draw(st.sampled_from(SYNTAXES[:2]))
    if kind == "truncated":
        params["keep"] = draw(st.floats(0.0, 0.999))
    elif kind == "overwritten":
        params["writes"] = tuple(
            draw(
                st.lists(
                    st.tuples(st.floats(0.0, 0.999), st.binary(min_size=1, max_size=8)),
                    min_size=1,
                    max_size=6,
                )
            )
        )
    elif kind in ("wrong_vr", "huge_length"):
        params["element"] = draw(st.integers(0, 80))
        if kind == "wrong_vr":
            params["vr"] = draw(st.sampled_from(VRS))
        else:
            params["length"] = draw(st.sampled_from(LENGTHS))
    elif kind == "pixel_length":
        params["delta"] = draw(
            st.one_of(st.integers(-2 * SIZE * SIZE, -1), st.integers(1, 4 * SIZE * SIZE))
        )
    elif kind == "absurd_dims":
        params["set"] = draw(st.lists(st.sampled_from(ABSURD), min_size=1, max_size=3, unique=True))
        params["set"] = tuple(params["set"])
    elif kind in ("bad_uid", "bad_request_uid"):
        uids = HOSTILE_UIDS if kind == "bad_uid" else DECODABLE_REQUEST_UIDS
        longest = 90 if kind == "bad_uid" else 64
        params["uid"] = draw(st.one_of(st.sampled_from(uids), _random_uids(longest)))
        if kind == "bad_uid":
            params["keyword"] = draw(
                st.sampled_from(("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"))
            )
    elif kind == "missing_tag":
        params["delete"] = tuple(
            draw(st.lists(st.sampled_from(MISSING), min_size=1, max_size=4, unique=True))
        )
    elif kind == "not_an_image":
        params["what"] = draw(st.sampled_from(NOT_IMAGES))
    elif kind == "bad_geometry":
        params["set"] = draw(st.sampled_from(GEOMETRY))
        params["slices"] = draw(st.sampled_from(("one", "all")))
    elif kind == "deep_sequence":
        params["depth"] = draw(st.sampled_from((2, 50, 200, 1000, 3000)))
    elif kind == "syntax_mismatch":
        params["sent_as"] = draw(st.sampled_from(SYNTAXES))
    elif kind == "sop_class":
        params["sop_class"] = draw(st.sampled_from(SOP_CLASSES[1:]))
    in_series = kind in SERIES_KINDS and draw(st.booleans())
    return Spec(kind, tuple(params.items()), in_series or kind == "bad_geometry")


def _random_uids(longest: int) -> st.SearchStrategy[str]:
    alphabet = st.characters(min_codepoint=0, max_codepoint=0xFF)  # bytes on the wire
    most = longest - len(CANARY)
    return st.text(alphabet, min_size=0, max_size=most).map(lambda text: text + CANARY)


KINDS = (
    "valid",
    "truncated",
    "overwritten",
    "wrong_vr",
    "huge_length",
    "pixel_length",
    "absurd_dims",
    "bad_uid",
    "bad_request_uid",
    "missing_tag",
    "not_an_image",
    "bad_geometry",
    "deep_sequence",
    "syntax_mismatch",
    "sop_class",
)
# Kinds whose instance may still be read as a CT slice: worth hiding in a valid series.
SERIES_KINDS = frozenset(
    {"valid", "pixel_length", "absurd_dims", "missing_tag", "wrong_vr", "huge_length"}
)
NOT_IMAGES = ("empty", "uids_only", "sr_document", "rt_structure_set", "encapsulated_as_native")


# -- building -----------------------------------------------------------------------------------


@cache
def _template() -> tuple[Dataset, ...]:
    """A valid 16 x 16 x 20 CT series (the node's own writer), as datasets to copy."""
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
    with _no_validation():
        write_dataset(fp, ds)
    data = fp.getvalue()
    if syntax.is_deflated:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


@contextlib.contextmanager
def _no_validation() -> Iterator[None]:
    settings = pydicom_config.settings
    saved = settings.writing_validation_mode, settings.reading_validation_mode
    settings.writing_validation_mode = pydicom_config.IGNORE
    settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        settings.writing_validation_mode, settings.reading_validation_mode = saved


def _element_offsets(data: bytes, syntax: str) -> list[tuple[int, int, bool]]:
    """(start of the element's header, header length, 4-byte length?) of every top-level
    element of an encoded dataset."""
    syntax = UID(syntax)
    offsets = []
    with _no_validation():
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


# -- sending ------------------------------------------------------------------------------------

NO_ANSWER = -1  # the association ended (aborted, released by the node) before an answer
UNSENDABLE = -2  # pynetdicom could not put this request on the wire at all


@dataclass
class HostileSender:
    """One SCU association at a time to the node, re-opened when the node ends it."""

    port: int
    workdir: Path
    called_ae: str = "BONESEG"
    calling_ae: str = "FUZZER"
    _assoc: Association | None = None
    _ae: AE = field(init=False)
    _file: Path = field(init=False)

    def __post_init__(self) -> None:
        self._ae = AE(ae_title=self.calling_ae)
        # A node that ignores a command (pynetdicom does, for one it cannot decode) costs the
        # DIMSE time-out; 10 s is still 100x what an answer takes.
        self._ae.acse_timeout = self._ae.network_timeout = 30
        self._ae.dimse_timeout = 10
        for sop_class in SOP_CLASSES:
            for syntax in SYNTAXES:  # one context per syntax: the node must accept each
                self._ae.add_requested_context(sop_class, syntax)
        self._ae.add_requested_context("1.2.840.10008.1.1")  # Verification
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._file = self.workdir / "sending.dcm"

    def _association(self) -> Association:
        if self._assoc is None or not self._assoc.is_established:
            self._assoc = self._ae.associate("127.0.0.1", self.port, ae_title=self.called_ae)
            if not self._assoc.is_established:
                self._assoc = None
                raise ConnectionError("the node did not accept an association")
            prepare_requestor(self._assoc)  # as the node's own deliveries
        return self._assoc

    def send(self, instance: Encoded) -> int:
        """The C-STORE status the node answered, or NO_ANSWER."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = instance.sop_class_uid
        meta.MediaStorageSOPInstanceUID = instance.sop_instance_uid
        meta.TransferSyntaxUID = instance.transfer_syntax_uid
        buffer = DicomBytesIO()
        buffer.write(b"\0" * 128 + b"DICM")
        try:
            with _no_validation():
                write_file_meta_info(buffer, meta, enforce_standard=False)
        except Exception:  # a request UID pydicom cannot encode
            return UNSENDABLE
        self._file.write_bytes(buffer.getvalue() + instance.dataset)
        assoc = self._association()
        with _raw_sending():
            try:
                status = assoc.send_c_store(self._file)
            except Exception:  # e.g. a UID the DIMSE encoder cannot write: nothing was sent
                return UNSENDABLE
        if "Status" not in status:
            self.close()
            return NO_ANSWER
        return int(status.Status)

    def send_case(self, case: Case) -> list[int]:
        return [self.send(instance) for instance in case.instances]

    def echo(self) -> bool:
        """C-ECHO on the open association, or on a new one if the node ended it."""
        for _ in range(2):
            try:
                status = self._association().send_c_echo()
            except ConnectionError:
                return False
            if "Status" in status and status.Status == 0:
                return True
            self.close()
        return False

    def close(self) -> None:
        if self._assoc is not None:
            if self._assoc.is_established:
                self._assoc.release()
            self._assoc = None


@contextlib.contextmanager
def _raw_sending() -> Iterator[None]:
    """pynetdicom streams the file's bytes as they are and lets any UID through."""
    saved = _config.STORE_SEND_CHUNKED_DATASET, _config.VALIDATORS["UI"]
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET, _config.VALIDATORS["UI"] = saved


def as_received(uid: str) -> str:
    """A UID as the node's pydicom decodes it from the request: trailing NULs and spaces
    dropped (UI padding), then str.strip (pydicom.uid.UID), \x1c-\x1f included."""
    return uid.rstrip("\0 ").strip()


def allowed_answers(spec: Spec) -> set[int]:
    """The answers the node may give to the hostile instance of `spec`."""
    if spec.kind in ("valid", "pixel_length", "absurd_dims", "bad_geometry", "sop_class"):
        return {SUCCESS}  # the header reception reads is intact: stored, skipped later
    if spec.kind == "bad_request_uid":
        if UID_PATTERN.fullmatch(as_received(spec.get("uid"))):
            return {SUCCESS}
        # pynetdicom itself drops a command whose UID it cannot take (empty, > 64 characters)
        # and ends the association, before the node sees it.
        return {CANNOT_UNDERSTAND, NO_ANSWER}
    if spec.kind == "bad_uid" and spec.get("keyword") != "SOPInstanceUID":
        stored_as = as_received(spec.get("uid"))
        return {SUCCESS} if UID_PATTERN.fullmatch(stored_as) else {CANNOT_UNDERSTAND}
    if spec.kind == "missing_tag" and {"SeriesInstanceUID", "StudyInstanceUID"} & set(
        spec.get("delete")
    ):
        return {CANNOT_UNDERSTAND}
    if spec.kind == "not_an_image" and spec.get("what") == "empty":
        return {CANNOT_UNDERSTAND}
    return {SUCCESS, CANNOT_UNDERSTAND}


# -- the node's side ----------------------------------------------------------------------------


def tree(root: Path, skip: Sequence[Path] = ()) -> set[str]:
    """Every path under `root` (relative), except under `skip`."""
    found = set()
    for path in root.rglob("*"):
        if any(path == s or s in path.parents for s in skip):
            continue
        found.add(str(path.relative_to(root)))
    return found


def canaries(*roots: Path) -> list[Path]:
    """Files or folders whose name carries the hostile UIDs' marker."""
    found = []
    for root in roots:
        found.extend(p for p in root.rglob(f"*{CANARY}*"))
    return found


FINAL_STATES = frozenset({"skipped", "failed", "done", "no_findings"})
# Reasons that mean something broke rather than the data being unusable.
CRASH_REASONS = ("internal error", "worker died", "selection failed", "timed out")


@dataclass
class NodeReport:
    """What a node holds after hostile input; every list empty means all is well."""

    states: dict[str, int]
    unsettled: list[str]  # series not in a final state
    crashed: list[str]  # "uid: reason" of series that failed because something broke
    without_reason: list[str]  # skipped or failed series with no reason
    bad_uids: list[str]  # recorded UIDs the node should have refused
    recorded_not_acknowledged: list[str]
    acknowledged_not_recorded: list[str]
    spool_not_recorded: list[str]  # files in the spool the database does not name
    recorded_not_in_spool: list[str]
    foreign_names: list[str]  # spool files not named <32 hex>.dcm (a .part left behind, ...)
    handler_exceptions: int  # pynetdicom's "Exception in handler" (a 0xC211 answer)
    phi_in_log: bool

    def problems(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "states" and value}


def inspect_node(
    data_dir: Path, log: Path, acknowledged: set[str], settle_s: float = 120
) -> NodeReport:
    """Wait up to `settle_s` for every series to reach a final state, then compare the
    database, the spool and the log with what the node acknowledged."""
    database = data_dir / "node.db"
    deadline = time.monotonic() + settle_s
    while True:
        with contextlib.closing(sqlite3.connect(database)) as db:
            series = list(db.execute("SELECT series_instance_uid, state, reason FROM series"))
            instances = dict(db.execute("SELECT sop_instance_uid, file_name FROM instances"))
        if all(state in FINAL_STATES for _, state, _ in series) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    spool = {p.name for p in (data_dir / "spool").iterdir()}
    text = log.read_text(errors="replace")
    uids = [uid for uid, _, _ in series] + list(instances)
    return NodeReport(
        states=dict(Counter(state for _, state, _ in series)),
        unsettled=[f"{uid}: {state}" for uid, state, _ in series if state not in FINAL_STATES],
        crashed=[
            f"{uid}: {reason}"
            for uid, _, reason in series
            if reason and reason.startswith(CRASH_REASONS)
        ],
        without_reason=[
            uid for uid, state, reason in series if state in ("skipped", "failed") and not reason
        ],
        bad_uids=[repr(uid) for uid in uids if not UID_PATTERN.fullmatch(uid)],
        recorded_not_acknowledged=sorted(set(instances) - acknowledged),
        acknowledged_not_recorded=sorted(acknowledged - set(instances)),
        spool_not_recorded=sorted(spool - set(instances.values())),
        recorded_not_in_spool=sorted(set(instances.values()) - spool),
        foreign_names=sorted(n for n in spool if not re.fullmatch(r"[0-9a-f]{32}\.dcm", n)),
        handler_exceptions=text.count("Exception in handler"),
        phi_in_log=PATIENT.name in text or PATIENT.patient_id in text,
    )
