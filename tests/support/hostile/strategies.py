"""Hypothesis strategies for hostile input: `specs` draws a `Spec` (which mutation, where,
with what) from the tables of hostile values below.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tests.support.hostile.cases import CANARY, SIZE, SOP_CLASSES, SYNTAXES, Spec

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
