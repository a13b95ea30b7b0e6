"""The source's Patient and Study attributes made valid for the SEG that copies them.

Real headers break the standard (a GE scanner writes a 17-character Study ID where SH allows
16; dates as "2021.03.04"); highdicom copies the Patient and Study modules' attributes as they
are, and the SEG would carry the source's fault. `repair_copied_attributes` fixes, in the
in-memory header only, each root attribute that highdicom copies, by its VR (PS3.5 6.2):

- text (SH, LO, UC, PN, ST, LT, UT): characters it may not hold become spaces, and a value
  too long is cut to the VR's length;
- formatted (AS, CS, DA, DS, DT, IS, TM, UI): a value in a known other form is rewritten
  ("2021-03-04" -> "20210304", "12:30:45" -> "123045", "m" -> "M", a DS too long re-rounded);
  one that cannot be read is emptied (Type 2) or dropped (Type 3);
- never the attributes that identify the patient, the order or the study (`_IDENTIFYING`):
  a changed Patient ID or Accession Number could file the SEG with someone else's images, so
  they are kept as they are, invalid or not, and said so.

Each change is one line naming the attribute, its VR, the fault and what was done, never the
value (it may identify the patient): the job lists them (`summary["source_repairs"]`).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from functools import cache

from highdicom._standard_utils import (  # what highdicom copies: its own tables
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import CTImageStorage
from pydicom.valuerep import format_number_as_ds

_COPIED_ENTITIES = ("Patient", "Study")  # highdicom's copy_patient_and_study_information
_IDENTIFYING = frozenset(
    {"PatientID", "IssuerOfPatientID", "PatientName", "AccessionNumber", "StudyInstanceUID"}
)
# Longest value per VR (characters of the default repertoire); PN: per component group.
_MAX_LENGTH = {"SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240, "AE": 16}
_MULTILINE = frozenset({"ST", "LT", "UT"})  # may hold CR, LF, FF and TAB
_TEXT = frozenset({"SH", "LO", "UC", "PN", *_MULTILINE})
_ESC = "\x1b"  # character set switching (ISO 2022) is allowed in text
_FORMAT = {
    "AS": re.compile(r"\d{3}[DWMY]"),
    "CS": re.compile(r"[A-Z0-9 _]{0,16}"),
    "DS": re.compile(r" *[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)? *"),
    "DT": re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?"),
    "IS": re.compile(r" *[+-]?\d{1,12} *"),
    "TM": re.compile(r"([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?"),
    "UI": re.compile(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*"),
}
_SEX = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}


@cache
def _copied(sop_class_uid: str) -> dict[str, str]:
    """Keyword -> Type of the root attributes highdicom copies from a source of this class."""
    iods = get_sop_class_iod_map()
    modules = get_iod_module_map()[iods.get(sop_class_uid, iods[CTImageStorage])]
    attributes = get_module_attribute_map()
    return {
        str(item["keyword"]): str(item["type"])
        for module in modules
        if module["ie"] in _COPIED_ENTITIES
        for item in attributes[module["key"]]
        if not item["path"]
    }


def _date(text: str) -> str | None:
    """DA as YYYYMMDD, from itself or from "YYYY-MM-DD" / "YYYY.MM.DD"; None if no date."""
    digits = re.fullmatch(r"(\d{4})[-./]?(\d{2})[-./]?(\d{2})", text.strip())
    if digits is None:
        return None
    try:
        return datetime.date(*map(int, digits.groups())).strftime("%Y%m%d")
    except ValueError:
        return None


def _time(text: str) -> str | None:
    """TM as HHMMSS.FFFFFF, from itself or from "HH:MM:SS"; None if no time."""
    candidate = text.strip().replace(":", "")
    return candidate if _FORMAT["TM"].fullmatch(candidate) and len(candidate) <= 14 else None


def _formatted(vr: str, keyword: str) -> Callable[[str], str | None]:
    """The value as `vr` allows it (rewritten if it can be), or None if it cannot be read."""
    if vr == "DA":
        return _date
    if vr == "TM":
        return _time
    if keyword == "PatientSex":
        return lambda text: _SEX.get(text.strip().upper())
    if vr == "CS":
        return lambda text: text.upper() if _FORMAT["CS"].fullmatch(text.upper()) else None
    if vr == "DS":

        def ds(text: str) -> str | None:
            if not _FORMAT["DS"].fullmatch(text):
                return None
            return text if len(text) <= 16 else format_number_as_ds(float(text))

        return ds
    pattern = _FORMAT.get(vr)
    return (lambda text: text if pattern.fullmatch(text) else None) if pattern else lambda t: t


def _text(vr: str, text: str) -> tuple[str, list[str]]:
    """A text value with the characters its VR may not hold made spaces, cut to its length;
    and what was wrong ("fault|: what was done")."""
    allowed = {_ESC, "\r", "\n", "\f", "\t"} if vr in _MULTILINE else {_ESC}
    faults = []
    cleaned = "".join(" " if ord(c) < 32 and c not in allowed else c for c in text)
    if cleaned != text:
        faults.append("control characters|: made spaces")
    limit = _MAX_LENGTH.get(vr)
    if vr == "PN" and limit is not None:
        groups = cleaned.split("=")
        if any(len(group) > limit for group in groups):
            faults.append(f"a name group over {limit} characters|: cut")
            cleaned = "=".join(group[:limit].rstrip() for group in groups)
    elif limit is not None and len(cleaned) > limit:
        faults.append(f"{len(cleaned)} characters (at most {limit})|: cut to {limit}")
        cleaned = cleaned[:limit].rstrip()
    return cleaned, faults


def repair_copied_attributes(ds: Dataset) -> list[str]:
    """Make the Patient and Study attributes of `ds` that highdicom copies valid (in place);
    returns what was changed or kept invalid, one line each, without values."""
    repairs: list[str] = []
    for keyword, attribute_type in _copied(str(ds.get("SOPClassUID", ""))).items():
        element = ds.data_element(keyword) if keyword in ds else None
        if element is None or element.VR == "SQ" or element.value in (None, ""):
            continue
        vr = str(element.VR)
        values = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
        if not all(isinstance(v, str) for v in values):
            values = [str(v) for v in values]  # PersonName, DSfloat, IS: as written
        fixed: list[str | None] = []
        faults: list[str] = []
        for value in values:
            if vr in _TEXT:
                text, found = _text(vr, value)
                fixed.append(text)
                faults += found
            else:
                form = _formatted(vr, keyword)(value)
                fixed.append(form)
                if form is None:
                    faults.append(f"not a valid {vr}")
                elif form != value:
                    faults.append(f"not in {vr} form|: rewritten")
        if not faults:
            continue
        where = f"{keyword} ({vr})"
        fault = "; ".join(dict.fromkeys(f.replace("|", "") for f in faults))
        if keyword in _IDENTIFYING:  # the fault without what would have been done
            fault = "; ".join(dict.fromkeys(f.split("|")[0] for f in faults))
            repairs.append(f"{where}: {fault}: kept as it is (it identifies the patient or study)")
            continue
        if any(v is None for v in fixed):
            if attribute_type.startswith("1"):
                repairs.append(f"{where}: {fault}: kept as it is (required)")
                continue
            if attribute_type.startswith("2"):
                ds[keyword].value = ""
                repairs.append(f"{where}: {fault}: emptied")
            else:
                del ds[keyword]
                repairs.append(f"{where}: {fault}: dropped")
            continue
        ds[keyword].value = fixed if len(fixed) > 1 else fixed[0]
        repairs.append(f"{where}: {fault}")
    return repairs
