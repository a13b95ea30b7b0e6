"""Reception: the DICOM network layer (C-ECHO, C-STORE) and what a C-STORE does.

The pynetdicom handler is deliberately thin: it persists the instance and answers a status,
nothing more; everything slower (completion, selection, segmentation) happens later, off the
association. Success (0x0000) is answered only once the instance is durably on disk (the
spool's fsyncs); a failure answers a DICOM failure status so the sender keeps the instance
and retries, never a false success. Its record in the state database is committed by one
background thread (`InstanceRecords`), in the order received, while the sender sends the
next instance: the spool is the durable record, and `Reception.recover` records at the next
start what a crash left unrecorded. Before an association's release is answered, every
instance it stored is recorded, so a sender that has finished sees its instances in the
database (and `dicom-node status`).

A PACS pushes whole studies (scouts, dose reports, secondary captures beside the CT), so
every storage SOP class in every transfer syntax is accepted and kept; selection decides
later what gets segmented. The encoded dataset is written as received (no decode and
re-encode), behind the file meta information pynetdicom builds for it plus the sender's AE
title.

Whatever the bytes hold, the answer is a status, never an exception (which pynetdicom would
turn into 0xC211 and a traceback): reception parses only the leading elements it files an
instance by, inflates a deflated dataset with a cap, and refuses UIDs that could pass for a
path or break a log line. What it stores but cannot use is skipped or failed later, with the
reason, by selection and the worker.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta, split_dataset
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from sqlalchemy.exc import OperationalError

from dicom_node.app.config import NodeConfig
from dicom_node.logs import escape
from dicom_node.net.statuses import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from dicom_node.pipeline.observer import UNOBSERVED, PipelineObserver
from dicom_node.pipeline.spool import LowDiskSpaceError, Spool, SpooledFile
from dicom_node.pipeline.state import NodeState, ReceivedInstance, Recorded

log = logging.getLogger(__name__)

# A UID as reception takes it: 1 to 64 printable ASCII characters other than space, '/' and
# '\'. Looser than PS3.5 9.1 (digits and dots), because archives hold a few non-conformant
# UIDs that are still unique; strict where it matters: no NUL, newline, escape sequence or
# non-ASCII character reaches the database, the logs or a file name.
UID_PATTERN = re.compile(r"[\x21-\x2e\x30-\x5b\x5d-\x7e]{1,64}")
_UID_RULE = "1 to 64 printable ASCII characters without space, '/' or '\\'"
# Elements come in tag order, and everything reception files an instance by lies at or before
# (0020,000E) Series Instance UID: nothing after it (pixel data, a sequence nested a thousand
# deep) is parsed while the sender waits.
_LAST_TAG_READ = 0x0020000E
# A deflated dataset is inflated with a cap: deflate packs zeros ~1000:1, so a few MB on the
# wire would otherwise become gigabytes in memory, here and wherever the file is read later.
# Deflate is meant for non-image objects (PS3.5 A.5); none comes near 256 MiB inflated.
MAX_INFLATED_BYTES = 256 << 20
_INFLATED_HEAD_BYTES = 16 << 20  # of the inflated data, kept to parse the leading elements
_INFLATE_CHUNK = 1 << 20
# Instances answered but not yet recorded: past this many, an association waits for the
# database before it answers (memory stays bounded, ~1 KiB an instance).
RECORDS_QUEUED_MAX = 256
RECORD_RETRY_S = 1.0  # while the database cannot be written (full disk, server down)


class UnusableInstanceError(ValueError):
    """The dataset lacks what the node needs to file it (its series and study UIDs), or it
    is too big to inflate."""


class InstanceRecords:
    """Records of spooled instances, committed by one thread in the order they were queued.

    `record` is called there for each (received, spooled, dataset bytes); the thread starts
    with the first instance, so a `Reception` built only to `recover` starts none. While the
    database cannot be written (OperationalError: a full disk, a server down) the record is
    retried every RECORD_RETRY_S, the queue fills and associations wait, as they waited for
    the database before; any other failure, or one at stop, leaves the record to the next
    start's `recover` (the file is durable)."""

    def __init__(self, record: Callable[[ReceivedInstance, SpooledFile, int], None]) -> None:
        self._record = record
        self._queue: queue.Queue[tuple[ReceivedInstance, SpooledFile, int] | None]
        self._queue = queue.Queue(RECORDS_QUEUED_MAX)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def put(self, received: ReceivedInstance, spooled: SpooledFile, size: int) -> None:
        """Queue a record; waits while RECORDS_QUEUED_MAX are queued."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="records", daemon=True)
                self._thread.start()
        self._queue.put((received, spooled, size))

    def drain(self) -> None:
        """Wait until every record queued so far is committed (or has failed)."""
        self._queue.join()

    def close(self) -> None:
        """Commit what is queued and end the thread."""
        self._closing.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._commit(*item)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _commit(self, received: ReceivedInstance, spooled: SpooledFile, size: int) -> None:
        failing = False
        while True:
            try:
                self._record(received, spooled, size)
            except OperationalError as error:
                if not self._closing.is_set():
                    if not failing:
                        log.error(
                            "could not record instances, retrying every %g s: %s",
                            RECORD_RETRY_S,
                            _describe(error),
                        )
                        failing = True
                    self._closing.wait(RECORD_RETRY_S)
                    continue
                self._leave(received, error)
            except Exception as error:  # the file is durable: the next start records it
                self._leave(received, error)
            else:
                if failing:
                    log.info("recording instances again")
            return

    @staticmethod
    def _leave(received: ReceivedInstance, error: Exception) -> None:
        log.error(
            "could not record %s (recorded at the next start): %s",
            received.sop_instance_uid,
            _describe(error),
        )


@dataclass(frozen=True)
class Reception:
    """What a C-STORE needs: where to write, where to record, whom to tell."""

    spool: Spool
    state: NodeState
    on_recorded: Callable[[Recorded], None]  # e.g. restart the series' idle timer
    observer: PipelineObserver = UNOBSERVED  # counts each answer (the node's metrics)
    records: InstanceRecords = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", InstanceRecords(self._record))

    def store(self, received: ReceivedInstance, head: bytes, dataset: memoryview) -> None:
        """Spool one instance durably and queue its record; once this returns, success may
        be answered.

        The file is `head` (preamble and file meta), then the encoded `dataset`. Raises
        OSError if the instance could not be made durable (its subclass
        LowDiskSpaceError, before anything is written, below the free-space watermark).
        A duplicate is written before the database says so, and discarded when recorded:
        resends are rare, and asking first would cost every instance a query.
        """
        spooled = self.spool.write((head, dataset))
        self.records.put(received, spooled, dataset.nbytes)

    def _record(self, received: ReceivedInstance, spooled: SpooledFile, size: int) -> None:
        """In the records' thread: commit the record, tell the pipeline, count the answer
        (with the dataset's bytes if it was new)."""
        new = self._recorded(self.state.record_instance(received, spooled), spooled.name)
        log.debug("C-STORE %s%s", received.sop_instance_uid, "" if new else " (again)")
        self.observer.instance_answered(SUCCESS, size if new else 0)

    def _recorded(self, recorded: Recorded, name: str) -> bool:
        if recorded.duplicate:  # the instance was there already, in another file
            self.spool.discard(name)
            return False
        self.on_recorded(recorded)
        return True

    def on_acse_received(self, event: Event) -> None:
        """EVT_ACSE_RECV: before a peer's release request is answered, its instances are
        recorded (the association thread waits here)."""
        primitive = event.primitive  # type: ignore[attr-defined]  # EVT_ACSE_RECV's
        if isinstance(primitive, A_RELEASE) and primitive.result is None:
            self.records.drain()

    def recover(self) -> int:
        """At start: record the spooled files the database lacks; returns how many.

        The spool is the durable record (fsynced before success); the database commits
        without waiting for the disk (SQLite synchronous=NORMAL), so a power cut can lose its
        last commits but not the files. A file left by a crash between its rename and its
        commit was never acknowledged: recording it is harmless, the resend is a duplicate.
        Files are read as reception read them (file meta, then the leading elements only): an
        instance acknowledged with a malformed tail must not be discarded here.
        """
        self.spool.remove_partial()
        recovered = 0
        for name in sorted(self.spool.names() - self.state.file_names()):
            path = self.spool.path(name)
            try:
                file_meta, offset = split_dataset(path)
                with path.open("rb") as file:
                    file.seek(offset)
                    encoded = BytesIO(file.read())
                header = _leading_elements(encoded, UID(file_meta.TransferSyntaxUID))
                received = _instance(file_meta, header)
            except Exception as error:  # a crash must not leave a file that stops the start
                log.warning("spool: discarding unreadable %s: %s", name, _describe(error))
                self.spool.discard(name)
                continue
            spooled = SpooledFile(name, path.stat().st_size)
            recovered += self._recorded(self.state.record_instance(received, spooled), name)
        if recovered:
            log.info("spool: recorded %d file(s) the database had lost", recovered)
        return recovered


def _instance(file_meta: Dataset, dataset: Dataset, calling_host: str = "") -> ReceivedInstance:
    """The few values an instance is filed by (UIDs, modality, sender: no identifiers).

    The dataset decodes lazily: only these elements are parsed. The SOP Instance UID is the
    request's (pynetdicom puts it in the file meta); the dataset's own, when present, must be
    a UID too, because selection and the worker name instances by it in their reasons."""
    received = ReceivedInstance(
        sop_instance_uid=str(file_meta.get("MediaStorageSOPInstanceUID", "")),
        sop_class_uid=str(file_meta.get("MediaStorageSOPClassUID", "")),
        transfer_syntax_uid=str(file_meta.TransferSyntaxUID),
        series_instance_uid=str(dataset.get("SeriesInstanceUID", "")),
        study_instance_uid=str(dataset.get("StudyInstanceUID", "")),
        # A CS of 16 characters at most; kept printable, it is shown by `status`.
        modality="".join(c for c in str(dataset.get("Modality", "")) if " " <= c <= "~")[:16],
        calling_ae=str(file_meta.get("SourceApplicationEntityTitle", "")),
        calling_host=calling_host,
    )
    for key in ("sop_instance_uid", "series_instance_uid", "study_instance_uid"):
        if not UID_PATTERN.fullmatch(getattr(received, key)):
            raise UnusableInstanceError(f"{key}: missing or not a UID ({_UID_RULE})")
    own = dataset.get("SOPInstanceUID")
    if own is not None and str(own) and not UID_PATTERN.fullmatch(str(own)):
        raise UnusableInstanceError(f"SOP Instance UID in the dataset: not a UID ({_UID_RULE})")
    return received


def _past_leading_elements(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _LAST_TAG_READ


def _leading_elements(encoded: BytesIO, syntax: UID) -> Dataset:
    """The dataset's elements up to the Series Instance UID, parsed (values are converted
    when read); the rest of the stream is not looked at."""
    encoded.seek(0)
    stream = encoded
    if syntax.is_deflated:
        with encoded.getbuffer() as data:
            stream = _inflate_head(data)
    return read_dataset(
        stream, syntax.is_implicit_VR, syntax.is_little_endian, stop_when=_past_leading_elements
    )


def _inflate_head(data: memoryview) -> BytesIO:
    """The first `_INFLATED_HEAD_BYTES` of a deflated dataset (PS3.5 A.5: raw deflate),
    after checking that all of it inflates to at most MAX_INFLATED_BYTES. The rest is
    inflated in chunks and counted, never held: memory stays bounded whatever the ratio."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = bytearray()
    total = 0
    pending: bytes | memoryview = data
    while True:
        chunk = inflater.decompress(pending, _INFLATE_CHUNK)
        total += len(chunk)
        if total > MAX_INFLATED_BYTES:
            raise UnusableInstanceError(
                f"deflated dataset inflates to more than {MAX_INFLATED_BYTES >> 20} MiB"
            )
        if len(head) < _INFLATED_HEAD_BYTES:
            head += chunk[: _INFLATED_HEAD_BYTES - len(head)]
        pending = inflater.unconsumed_tail
        if not pending and len(chunk) < _INFLATE_CHUNK:
            return BytesIO(bytes(head))


def _describe(error: BaseException) -> str:
    """An exception for a log line: its type and message, control characters escaped and
    cut short (messages about hostile data quote it)."""
    return escape(f"{type(error).__name__}: {error}", limit=300)


def handle_store(event: Event, reception: Reception) -> int:
    """EVT_C_STORE: persist the instance and answer a status (see the module doc). A refusal
    is counted here, a success once recorded (a counter incremented: nothing that could slow
    the sender down)."""
    status = _persist(event, reception)
    if status != SUCCESS:
        reception.observer.instance_answered(status, 0)
    return status


def _persist(event: Event, reception: Reception) -> int:
    """The status to answer."""
    if event.assoc.is_aborted:  # e.g. by InstanceSizeCap: the dataset arrived, but too big
        return OUT_OF_RESOURCES
    try:
        file_meta = event.file_meta  # from the request: SOP class and instance, syntax
        # Who sent it, kept in the file (PS3.10 Source AE Title) so a recovery can restore it.
        file_meta.SourceApplicationEntityTitle = event.assoc.requestor.ae_title
        # pynetdicom types an event's request as any DIMSE primitive; EVT_C_STORE's is a C-STORE
        # (pynetdicom casts it the same way).
        stream = cast(C_STORE, event.request).DataSet
        assert stream is not None, "pynetdicom triggers EVT_C_STORE once the dataset is in"
        header = _leading_elements(stream, event.context.transfer_syntax)
        received = _instance(file_meta, header, event.assoc.requestor.address)
        # The file as received: preamble, file meta, then the encoded dataset without a copy.
        head = b"\0" * 128 + b"DICM" + encode_file_meta(file_meta)
    except Exception as error:  # malformed data makes pydicom and zlib raise many kinds
        sop_class = event.request.AffectedSOPClassUID
        log.warning("C-STORE of %s refused: %s", sop_class, _describe(error))
        return CANNOT_UNDERSTAND
    try:
        with stream.getbuffer() as dataset:
            reception.store(received, head, dataset)
    except LowDiskSpaceError as error:  # the spool logs when refusals start and end
        log.debug("C-STORE of %s refused: %s", received.sop_instance_uid, error)
        return OUT_OF_RESOURCES
    except OSError as error:
        log.error("C-STORE: could not store %s: %s", received.sop_instance_uid, _describe(error))
        return OUT_OF_RESOURCES
    return SUCCESS


class InstanceSizeCap:
    """EVT_PDU_RECV: aborts an association whose dataset in transfer passes `max_bytes`.

    pynetdicom gathers a C-STORE's dataset in memory and calls the handler only once it is
    whole, so the size must be counted as the P-DATA PDUs arrive. Each association has its
    own DUL thread, which runs this handler: the count is thread-local.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._local = threading.local()

    def on_pdu(self, event: Event) -> None:
        if not isinstance(event.pdu, P_DATA_TF):
            return
        received = getattr(self._local, "received", 0)
        for item in event.pdu.presentation_data_value_items:
            value = item.presentation_data_value
            assert value is not None, "a P-DATA item read off the wire carries its value"
            header = value[0]  # PS3.8 E.2: bit 0 command (else dataset), bit 1 last fragment
            if header & 0x01:
                continue
            received += len(value) - 1
            if received > self.max_bytes:
                if not event.assoc.is_aborted:
                    log.warning(
                        "association from %s aborted: an instance of more than %d MiB "
                        "(node.max_instance_mb)",
                        event.assoc.requestor.ae_title,
                        self.max_bytes >> 20,
                    )
                    # Queued for the DUL thread, which sends the A-ABORT before it reads
                    # another PDU; abort() would wait here for this very thread to end.
                    event.assoc.acse.send_abort(0x02)
                return
            if header & 0x02:
                received = 0
        self._local.received = received


def build_ae(node: NodeConfig) -> AE:
    """The node's application entity: verification and every storage SOP class, every
    transfer syntax (pynetdicom's list: uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000,
    RLE, ...), the calling-AE allow-list, the association limit and the time-outs from the
    config. The called AE title must be the node's: a peer that means another AE is
    misconfigured, and storing its instances here would misfile them. The peer address
    allow-list, TLS and the connection cap come with the server (dicom_node/access.py)."""
    ae = AE(ae_title=node.ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None, "pynetdicom's storage contexts each have one"
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.require_calling_aet = list(node.allowed_calling_aets)
    ae.require_called_aet = True
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_size
    ae.network_timeout = node.network_timeout_s
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    return ae


def event_handlers(
    reception: Reception, node: NodeConfig
) -> list[tuple[evt.EventType, Callable, list]]:
    # C-ECHO needs no handler: pynetdicom answers success by default.
    cap = InstanceSizeCap(node.max_instance_mb << 20)
    return [
        (evt.EVT_C_STORE, handle_store, [reception]),
        (evt.EVT_PDU_RECV, cap.on_pdu, []),
        (evt.EVT_ACSE_RECV, reception.on_acse_received, []),
    ]
