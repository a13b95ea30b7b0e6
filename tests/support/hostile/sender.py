"""Sending hostile cases: `HostileSender` writes each instance behind its own file meta and
lets pynetdicom stream the bytes unparsed (`STORE_SEND_CHUNKED_DATASET`), with pynetdicom's
UID checks off while it sends, so that what reaches the node is the hostile bytes, not what
pydicom would have re-encoded; and the answers the node may give to each kind of case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.association import Association

from dicom_node.net.receive import UID_PATTERN
from dicom_node.net.send import prepare_requestor
from dicom_node.net.statuses import CANNOT_UNDERSTAND, SUCCESS
from tests.support.hostile.cases import SOP_CLASSES, SYNTAXES, Case, Encoded, Spec, no_validation

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
            with no_validation():
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
