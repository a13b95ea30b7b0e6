"""Delivery by DICOM: C-STORE the node's results to a destination, and C-ECHO it.

One delivery is one association to one destination carrying every file of one result (a SEG,
sometimes more): the peer files them together and a failure is retried as a whole. Network
trouble (refused, rejected, aborted, timed out, a failure status) is a result, never an
exception: the delivery loop records `reason`, one line an operator can act on, and tries
again later. Only the caller's mistakes raise: a file that cannot be read (named in the
message), nothing to send, more kinds of file than one association can carry.

Delivered means the peer kept every instance: it answered success (0x0000) or a warning
(0xB000 coercion of data elements, 0xB006 elements discarded, 0xB007 data set does not match
the SOP class), and warnings are reported. Logs carry AE titles, addresses, UIDs and
statuses, never a patient's name or ID.

A destination with `tls = true` is reached over DICOM TLS (dicom_node/tls.py): its
certificate must verify, or nothing is sent and the reason says why.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicom_node.app.config import Destination
from dicom_node.net.statuses import SUCCESS
from dicom_node.net.tls import client_context

log = logging.getLogger(__name__)

# PS3.8 9.3.2.2: presentation context IDs are the odd numbers 1..255.
MAX_CONTEXTS = 128
# A wait that took this share of its time-out is taken for the time-out having expired.
_TIMED_OUT = 0.9


class UnreadableFileError(ValueError):
    """A file to send is missing or not DICOM (its path is in the message): a caller's bug,
    not a network problem, so it raises instead of becoming a failed delivery."""


@dataclass(frozen=True)
class FileOutcome:
    """What became of one file: the peer's C-STORE status, or why it was never answered."""

    path: Path
    sop_instance_uid: str
    status: int | None  # the peer's C-STORE status; None: not sent or no response
    stored: bool  # success or warning: the peer kept the instance
    detail: str = ""  # "" for plain success, else the warning, failure or why not sent


@dataclass(frozen=True)
class SendResult:
    """One delivery attempt to one destination."""

    peer: str  # "AE@host:port"
    delivered: bool  # every file stored (success or warning)
    reason: str  # one line: why not delivered, or the warnings; "" for a clean success
    files: tuple[FileOutcome, ...] = ()
    seconds: float = 0.0  # connect to release

    @property
    def stored(self) -> int:
        return sum(f.stored for f in self.files)

    @property
    def warnings(self) -> tuple[FileOutcome, ...]:
        return tuple(f for f in self.files if f.stored and f.status != SUCCESS)


@dataclass(frozen=True)
class EchoResult:
    """One C-ECHO: is the destination there and does it talk DICOM with us."""

    ok: bool
    reason: str  # "" when ok
    round_trip_ms: float | None = None  # C-ECHO request to response; None without a response
    elapsed_ms: float = 0.0  # connect, associate, echo, release


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID


@dataclass
class _Watch:
    """What pynetdicom saw but does not keep: whether TCP connected, and a peer's A-ABORT."""

    connected: bool = False
    abort: str = ""
    handlers: list[EventHandlerType] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handlers = [(evt.EVT_CONN_OPEN, self._open), (evt.EVT_PDU_RECV, self._pdu)]

    def _open(self, event: Event) -> None:
        self.connected = True

    def _pdu(self, event: Event) -> None:
        pdu = event.pdu
        if isinstance(pdu, A_ABORT_RQ):  # source 0: the peer's application; 2: its DICOM layer
            self.abort = "A-ABORT" if pdu.source != 2 else f"A-ABORT: {_sentence(pdu.reason_str)}"


def _sentence(text: str) -> str:
    """pynetdicom's 'Called AE title not recognised' as 'called AE title not recognised'."""
    return text[:1].lower() + text[1:]


def peer_name(destination: Destination) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def describe_status(status: int) -> str:
    """'0xA700 refused: out of resources', from PS3.4 Annex B's table (pynetdicom's copy)."""
    text = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", code_to_category(status)))[1]
    return f"0x{status:04X} {text.lower()}".rstrip()


def send_files(
    destination: Destination, paths: Sequence[Path], calling_ae: str, timeout_s: float
) -> SendResult:
    """C-STORE `paths` to `destination` over one association; never raises for the network.

    Each file goes in its own SOP class and transfer syntax; uncompressed little-endian files
    also offer Implicit VR Little Endian (every SCP must accept it), which pynetdicom
    re-encodes to if the peer picks it. `timeout_s` bounds each wait: the TCP connect, the
    association answer, each C-STORE response, and network idle time.
    """
    files = [_read_meta(Path(p)) for p in paths]
    if not files:
        raise ValueError("send_files: no files to send")
    contexts = _contexts(files)
    peer = peer_name(destination)
    start = time.monotonic()
    assoc, watch, reason = _associate(destination, calling_ae, timeout_s, contexts)
    if assoc is None:
        log.warning("C-STORE to %s: not delivered: %s", peer, reason)
        outcomes = tuple(_unsent(f, reason) for f in files)
        return SendResult(peer, False, reason, outcomes, time.monotonic() - start)
    try:
        outcomes = tuple(_store_all(assoc, watch, files, peer, timeout_s))
    except BaseException:
        assoc.abort()  # an unreadable file mid-way: the peer must not wait for more
        raise
    if assoc.is_established:
        assoc.release()
    result = _result(peer, outcomes, time.monotonic() - start)
    if not result.delivered:
        log.warning("C-STORE to %s: not delivered: %s", peer, result.reason)
    else:
        log.info(
            "C-STORE to %s: %d file(s) in %.2f s%s",
            peer,
            len(outcomes),
            result.seconds,
            f" ({result.reason})" if result.reason else "",
        )
    return result


def echo(destination: Destination, calling_ae: str, timeout_s: float) -> EchoResult:
    """C-ECHO `destination`: the same checks a delivery meets first (reachable, our calling
    AE and its called AE accepted), without sending anything."""
    start = time.monotonic()
    assoc, watch, reason = _associate(
        destination, calling_ae, timeout_s, [build_context(Verification)]
    )
    if assoc is None:
        return EchoResult(False, reason, None, (time.monotonic() - start) * 1000)
    sent = time.monotonic()
    response = assoc.send_c_echo()
    round_trip_ms = (time.monotonic() - sent) * 1000
    if assoc.is_established:
        assoc.release()
    elapsed_ms = (time.monotonic() - start) * 1000
    peer = peer_name(destination)
    if "Status" not in response:
        reason = _why_lost(watch, peer, "C-ECHO", round_trip_ms / 1000, timeout_s)
        return EchoResult(False, reason, None, elapsed_ms)
    status = int(response.Status)
    if status != SUCCESS:
        return EchoResult(False, f"C-ECHO failed: 0x{status:04X}", round_trip_ms, elapsed_ms)
    return EchoResult(True, "", round_trip_ms, elapsed_ms)


def _read_meta(path: Path) -> _File:
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError) as error:
        raise UnreadableFileError(f"{path}: cannot read its DICOM file meta: {error}") from error
    keys = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    missing = [key for key in keys if not meta.get(key)]
    if missing:
        raise UnreadableFileError(f"{path}: file meta lacks {', '.join(missing)}")
    return _File(
        path,
        UID(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        UID(meta.TransferSyntaxUID),
    )


def _convertible(syntax: UID) -> bool:
    """pynetdicom re-encodes between uncompressed little-endian syntaxes, nothing else."""
    return not syntax.is_compressed and syntax.is_little_endian


def _contexts(files: Sequence[_File]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) sent, plus Implicit VR LE as fallback."""
    wanted: dict[tuple[UID, UID], list[str | UID]] = {}
    for f in files:
        syntaxes: list[str | UID] = [f.transfer_syntax_uid]
        if _convertible(f.transfer_syntax_uid) and f.transfer_syntax_uid != ImplicitVRLittleEndian:
            syntaxes.append(ImplicitVRLittleEndian)
        wanted.setdefault((f.sop_class_uid, f.transfer_syntax_uid), syntaxes)
    if len(wanted) > MAX_CONTEXTS:
        raise ValueError(
            f"send_files: {len(wanted)} SOP class/transfer syntax pairs, at most "
            f"{MAX_CONTEXTS} fit one association"
        )
    return [build_context(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]


def _associate(
    destination: Destination,
    calling_ae: str,
    timeout_s: float,
    contexts: list[PresentationContext],
) -> tuple[Association | None, _Watch, str]:
    """An established association, or None and why not (one line)."""
    tls = client_context(destination)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    watch = _Watch()
    start = time.monotonic()
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts,
            ae_title=destination.ae_title,
            evt_handlers=watch.handlers,
            tls_args=(tls, destination.host) if tls is not None else None,
        )
    except OSError as error:  # the host name does not resolve (socket.gaierror)
        return None, watch, f"cannot resolve host {destination.host!r}: {error}"
    if assoc.is_established:
        prepare_requestor(assoc)
        return assoc, watch, ""
    waited = time.monotonic() - start
    why = _why_no_association(assoc, watch, destination, waited, timeout_s, tls)
    return None, watch, why


def prepare_requestor(assoc: Association) -> None:
    """Fit an established association for one request after another: TCP_NODELAY on its
    socket, and the peer's answers kept for the request that waits for them.

    Without TCP_NODELAY every C-STORE request waits for the peer's delayed ACK (~40 ms per
    instance); pynetdicom does not set it.

    pynetdicom (3.0) pauses the association's reactor thread before each request by clearing a
    checkpoint and waiting for a flag that the reactor sets just *before* it waits on that
    checkpoint. A reactor already past the checkpoint (descheduled there, on a busy machine)
    takes the peer's answer off the queue itself, logs "Received unexpected C-STORE service
    message" and drops it; the request then waits out the DIMSE time-out and aborts the
    association, though the peer answered in milliseconds (pydicom/pynetdicom#875). Here an
    answer the reactor takes while a request waits (the checkpoint is clear only then) goes
    back on the queue, to the request.
    """
    connection = assoc.dul.socket.socket if assoc.dul.socket else None
    if connection is not None:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    serve_request = assoc._serve_request
    checkpoint = assoc._reactor_checkpoint
    queue = assoc.dimse.msg_queue

    def serve_or_return(message: Any, context_id: int) -> None:
        if not message.is_valid_request and not checkpoint.is_set():
            queue.put((context_id, message))
            return
        serve_request(message, context_id)

    assoc._serve_request = serve_or_return  # type: ignore[method-assign, assignment]


def _why_no_association(
    assoc: Association,
    watch: _Watch,
    destination: Destination,
    waited: float,
    timeout_s: float,
    tls: ssl.SSLContext | None,
) -> str:
    peer = peer_name(destination)
    if not watch.connected:
        if waited >= _TIMED_OUT * timeout_s:
            address = f"{destination.host}:{destination.port}"
            return f"connection to {address} timed out after {timeout_s:g} s"
        return _connect_error(destination, timeout_s, tls)
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        kind = {1: "permanent", 2: "transient"}.get(answer.result or 0, "")
        return f"association rejected by {peer}: {_sentence(answer.reason_str)} ({kind})"
    if answer is not None and answer.result == 0:  # accepted, but none of our contexts
        offered = ", ".join(
            sorted(
                {
                    cx.abstract_syntax.name
                    for cx in assoc.rejected_contexts
                    if cx.abstract_syntax is not None  # every context offered names one
                }
            )
        )
        return f"{peer} accepted no presentation context (offered: {offered})"
    if watch.abort:
        return f"association aborted by {peer} ({watch.abort})"
    if waited >= _TIMED_OUT * timeout_s:
        return f"no answer to the association request from {peer} within {timeout_s:g} s"
    closed = f"{peer} closed the connection during association negotiation"
    if tls is None:
        return f"{closed} (does it expect TLS?)"
    if not destination.tls_certificate:
        return f"{closed} (does it want a client certificate? tls_certificate is not set)"
    return f"{closed} (did it refuse our client certificate?)"


def _connect_error(destination: Destination, timeout_s: float, tls: ssl.SSLContext | None) -> str:
    """Why TCP (or the TLS handshake) failed. pynetdicom only logs its connect error, so one
    more connect finds it out (refusals, unreachable hosts and bad certificates answer at
    once)."""
    address = f"{destination.host}:{destination.port}"
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout_s) as s:
            if tls is not None:
                tls.wrap_socket(s, server_hostname=destination.host).close()
    except ssl.SSLCertVerificationError as error:
        return f"TLS: the certificate of {address} does not verify: {error.verify_message}"
    except ssl.SSLError as error:
        return f"TLS handshake with {address} failed: {_ssl_reason(error)}"
    except ConnectionRefusedError:
        return f"connection refused by {address} (nothing listening)"
    except TimeoutError:
        return f"connection to {address} timed out after {timeout_s:g} s"
    except OSError as error:
        return f"cannot connect to {address}: {(error.strerror or str(error)).lower()}"
    return f"cannot connect to {address} (it accepts connections again now)"


def _ssl_reason(error: ssl.SSLError) -> str:
    return (error.reason or str(error)).lower().replace("_", " ")


def _why_lost(watch: _Watch, peer: str, what: str, waited: float, timeout_s: float) -> str:
    """Why a request got no response: the peer aborted, it timed out, or the line dropped."""
    if watch.abort:
        return f"association aborted by {peer} during {what} ({watch.abort})"
    if waited >= _TIMED_OUT * timeout_s:
        return f"no {what} response from {peer} within {timeout_s:g} s"
    return f"{peer} closed the connection during {what}"


def _unsent(f: _File, why: str) -> FileOutcome:
    return FileOutcome(f.path, f.sop_instance_uid, None, False, f"not sent: {why}")


def _has_context(assoc: Association, f: _File) -> bool:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax != f.sop_class_uid or not cx.as_scu:
            continue
        accepted = UID(cx.transfer_syntax[0])
        if accepted == f.transfer_syntax_uid or (
            _convertible(accepted) and _convertible(f.transfer_syntax_uid)
        ):
            return True
    return False


def _read_dataset(f: _File) -> Dataset:
    """The whole file, read as late as possible: one instance in memory at a time."""
    try:
        dataset = dcmread(f.path)
    except (OSError, InvalidDicomError, ValueError) as error:
        raise UnreadableFileError(f"{f.path}: cannot read: {error}") from error
    if "SOPClassUID" not in dataset or "SOPInstanceUID" not in dataset:  # e.g. truncated
        raise UnreadableFileError(f"{f.path}: no SOP Class or SOP Instance UID in the dataset")
    return dataset


def _store_all(
    assoc: Association, watch: _Watch, files: Sequence[_File], peer: str, timeout_s: float
) -> list[FileOutcome]:
    outcomes: list[FileOutcome] = []
    lost = ""  # set once the association is gone: the rest cannot be sent
    for f in files:
        if lost:
            outcomes.append(_unsent(f, lost))
            continue
        if not _has_context(assoc, f):
            why = (
                f"{peer} accepted no presentation context for {f.sop_class_uid.name} "
                f"in {f.transfer_syntax_uid.name}"
            )
            outcomes.append(_unsent(f, why))
            continue
        dataset = _read_dataset(f)
        sent = time.monotonic()
        try:
            response = assoc.send_c_store(dataset)
        except RuntimeError:  # the peer released or dropped the association after a response
            response = Dataset()
        except ValueError as error:  # pynetdicom could not encode it
            raise UnreadableFileError(f"{f.path}: cannot encode: {error}") from error
        if "Status" not in response:  # no response: aborted, closed or timed out
            lost = _why_lost(watch, peer, "C-STORE", time.monotonic() - sent, timeout_s)
            outcomes.append(FileOutcome(f.path, f.sop_instance_uid, None, False, lost))
            continue
        status = int(response.Status)
        category = code_to_category(status)
        detail = "" if status == SUCCESS else describe_status(status)
        comment = str(response.get("ErrorComment", "")).strip()
        if comment:
            detail += f" ({comment})"
        stored = category in ("Success", "Warning")
        outcomes.append(FileOutcome(f.path, f.sop_instance_uid, status, stored, detail))
        log.debug("C-STORE %s to %s: 0x%04X", f.sop_instance_uid, peer, status)
    return outcomes


def _result(peer: str, outcomes: tuple[FileOutcome, ...], seconds: float) -> SendResult:
    failed = [o for o in outcomes if not o.stored]
    total = len(outcomes)
    if failed:
        first = failed[0].detail
        if failed[0].status is not None:
            first = f"C-STORE failed: {first}"
        elif first.startswith("not sent: "):
            first = first.removeprefix("not sent: ")
        reason = f"{first} ({len(failed)} of {total} file(s) not stored)"
        return SendResult(peer, False, reason, outcomes, seconds)
    warned = [o for o in outcomes if o.status != SUCCESS]
    reason = ""
    if warned:
        reason = f"stored with warnings, {len(warned)} of {total} file(s): {warned[0].detail}"
    return SendResult(peer, True, reason, outcomes, seconds)
