"""What a hostile case is: the `Spec` Hypothesis draws, the `Case` built from it (the
`Encoded` instances a C-STORE carries), and what every part shares: the canary marker, the
patient whose name must never reach a log, the companion series' size, the transfer
syntaxes and SOP classes the sender offers, and pydicom with its value checks off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import config as pydicom_config
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
)

from dicom_node.testbed.ct_series import PatientInfo

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


@contextlib.contextmanager
def no_validation() -> Iterator[None]:
    """pydicom writes and reads values as they are, however invalid (hostile values are)."""
    settings = pydicom_config.settings
    saved = settings.writing_validation_mode, settings.reading_validation_mode
    settings.writing_validation_mode = pydicom_config.IGNORE
    settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        settings.writing_validation_mode, settings.reading_validation_mode = saved
