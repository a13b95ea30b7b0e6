"""Reception: the DICOM network layer (C-ECHO, C-STORE) and what a C-STORE does.

The pynetdicom handler is deliberately thin: it persists the instance (spool, then state) and
answers a status, nothing more; everything slower (completion, selection, segmentation)
happens later, off the association. Success (0x0000) is answered only once the instance is
durably on disk and committed in the state database; a failure to do either answers a DICOM
failure status so the sender keeps the instance and retries, never a false success.

A PACS pushes whole studies (scouts, dose reports, secondary captures beside the CT), so
every storage SOP class in every transfer syntax is accepted and kept; selection decides
later what gets segmented. The encoded dataset is written as received (no decode and
re-encode), behind the file meta information pynetdicom builds for it plus the sender's AE
title.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import NodeConfig
from dicom_node.spool import Spool, SpooledFile
from dicom_node.state import NodeState, ReceivedInstance, Recorded

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 Table B.2-1).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # could not store: disk, database
CANNOT_UNDERSTAND = 0xC000  # could not make sense of the dataset
_UID_MAX = 64


class UnusableInstanceError(ValueError):
    """The dataset lacks what the node needs to file it (its series and study UIDs)."""


@dataclass(frozen=True)
class Reception:
    """What a C-STORE needs: where to write, where to record, whom to tell."""

    spool: Spool
    state: NodeState
    on_recorded: Callable[[Recorded], None]  # e.g. restart the series' idle timer

    def store(self, received: ReceivedInstance, parts: Sequence[bytes | memoryview]) -> bool:
        """Spool and record one instance; False if it was a duplicate (nothing changed).

        Raises OSError or SQLAlchemyError if the instance could not be made durable. A
        duplicate is written before the database says so: resends are rare, and asking first
        would cost every instance a query.
        """
        spooled = self.spool.write(parts)
        try:
            recorded = self.state.record_instance(received, spooled)
        except BaseException:
            self.spool.discard(spooled.name)  # never acknowledged: the sender still has it
            raise
        return self._recorded(recorded, spooled.name)

    def _recorded(self, recorded: Recorded, name: str) -> bool:
        if recorded.duplicate:  # the instance was there already, in another file
            self.spool.discard(name)
            return False
        self.on_recorded(recorded)
        return True

    def recover(self) -> int:
        """At start: record the spooled files the database lacks; returns how many.

        The spool is the durable record (fsynced before success); the database commits
        without waiting for the disk (SQLite synchronous=NORMAL), so a power cut can lose its
        last commits but not the files. A file left by a crash between its rename and its
        commit was never acknowledged: recording it is harmless, the resend is a duplicate.
        """
        self.spool.remove_partial()
        recovered = 0
        for name in sorted(self.spool.names() - self.state.file_names()):
            path = self.spool.path(name)
            try:
                dataset = dcmread(path, stop_before_pixels=True)
                received = _instance(dataset.file_meta, dataset)
            except (InvalidDicomError, ValueError, AttributeError) as error:
                log.warning("spool: discarding unreadable %s: %s", name, error)
                self.spool.discard(name)
                continue
            spooled = SpooledFile(name, path.stat().st_size)
            recovered += self._recorded(self.state.record_instance(received, spooled), name)
        if recovered:
            log.info("spool: recorded %d file(s) the database had lost", recovered)
        return recovered


def _instance(
    file_meta: FileMetaDataset, dataset: Dataset, calling_host: str = ""
) -> ReceivedInstance:
    """The few values an instance is filed by (UIDs, modality, sender: no identifiers).

    The dataset decodes lazily: only these elements are parsed."""
    received = ReceivedInstance(
        sop_instance_uid=str(file_meta.get("MediaStorageSOPInstanceUID", "")),
        sop_class_uid=str(file_meta.get("MediaStorageSOPClassUID", "")),
        transfer_syntax_uid=str(file_meta.TransferSyntaxUID),
        series_instance_uid=str(dataset.get("SeriesInstanceUID", "")),
        study_instance_uid=str(dataset.get("StudyInstanceUID", "")),
        modality=str(dataset.get("Modality", ""))[:16],
        calling_ae=str(file_meta.get("SourceApplicationEntityTitle", "")),
        calling_host=calling_host,
    )
    for key in ("sop_instance_uid", "series_instance_uid", "study_instance_uid"):
        if not 0 < len(getattr(received, key)) <= _UID_MAX:
            raise UnusableInstanceError(f"{key} missing or longer than {_UID_MAX} characters")
    return received


def handle_store(event: Event, reception: Reception) -> int:
    """EVT_C_STORE: persist the instance and answer a status."""
    file_meta = event.file_meta  # from the request: SOP class and instance, transfer syntax
    # Who sent it, kept in the file (PS3.10 Source AE Title) so a recovery can restore it.
    file_meta.SourceApplicationEntityTitle = event.assoc.requestor.ae_title
    try:
        received = _instance(file_meta, event.dataset, event.assoc.requestor.address)
    except (InvalidDicomError, ValueError, KeyError) as error:  # UnusableInstanceError too
        log.warning("C-STORE of %s refused: %s", file_meta.MediaStorageSOPClassUID, error)
        return CANNOT_UNDERSTAND
    # The file as received: preamble, file meta, then the encoded dataset without a copy.
    head = b"\0" * 128 + b"DICM" + encode_file_meta(file_meta)
    try:
        with event.request.DataSet.getbuffer() as dataset:
            new = reception.store(received, (head, dataset))
    except (OSError, SQLAlchemyError) as error:
        log.error("C-STORE: could not store %s: %s", received.sop_instance_uid, error)
        return OUT_OF_RESOURCES
    log.debug("C-STORE %s%s", received.sop_instance_uid, "" if new else " (again)")
    return SUCCESS


def build_ae(node: NodeConfig) -> AE:
    """The node's application entity: verification and every storage SOP class, every
    transfer syntax (pynetdicom's list: uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000,
    RLE, ...), the calling-AE allow-list and the association limit from the config."""
    ae = AE(ae_title=node.ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.require_calling_aet = list(node.allowed_calling_aets)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_size
    return ae


def event_handlers(reception: Reception) -> list[tuple[evt.EventType, Callable, list]]:
    # C-ECHO needs no handler: pynetdicom answers success by default.
    return [(evt.EVT_C_STORE, handle_store, [reception])]
