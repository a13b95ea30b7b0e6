"""The plain data the store takes and hands out: frozen dataclasses, never ORM objects.

What reception, the pipeline stages and the reports get from `NodeState` is a copy made inside
its transaction; changing a record changes nothing in the database, and a record stays valid
after its session is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from dicom_node.pipeline.state.machine import DeliveryState, SeriesState


@dataclass(frozen=True)
class ReceivedInstance:
    """What reception files an instance by: UIDs, modality and sender, no identifiers."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    calling_ae: str
    calling_host: str = ""  # unknown for files recovered from the spool


@dataclass(frozen=True)
class Recorded:
    """The outcome of recording an instance, for the series' idle timer."""

    series_id: int
    duplicate: bool  # the SOP Instance UID was already recorded: nothing changed
    last_received_at: datetime


@dataclass(frozen=True)
class SeriesFiles:
    """A complete series ready for selection: its generation and spooled file names."""

    series_id: int
    generation: int
    file_names: list[str]
    receiving_s: float = 0.0  # from its first instance to its last


@dataclass(frozen=True)
class ClaimedSeries:
    """A queued series claimed for the worker (now `segmenting`): what it segments."""

    series_id: int
    generation: int
    attempt: int  # 1 for the first run of this generation
    series_instance_uid: str
    file_names: list[str]


@dataclass(frozen=True)
class ClaimAnswer:
    """What `NodeState.claim_series` made of a request to segment one series: the claim, or
    None with, while another owner's lease on it runs, the seconds until it expires."""

    claim: ClaimedSeries | None
    held_for_s: float | None = None


@dataclass(frozen=True)
class ResultsInUse:
    """What of a series' files under results/ may still be needed: the SEG file it records
    (to send, hold for review, show), and the attempt that runs now, which may be writing
    its SEG. Any other attempt's files are orphans (`pipeline.results`)."""

    seg_file: str | None
    running: tuple[int, int] | None  # (generation, attempt) while `segmenting`


@dataclass(frozen=True)
class Target:
    """Where a SEG goes: a configured destination, resolved for this series."""

    name: str
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class DueDelivery:
    """A pending delivery whose time came, claimed (in flight) until its outcome is recorded."""

    delivery_id: int
    series_id: int
    generation: int
    attempt: int
    target: Target
    seg_file: str


@dataclass(frozen=True)
class Resumed:
    """What a restart found: idle timers to restart and selections to redo."""

    receiving: list[int]
    complete: list[int]
    requeued: list[int]


@dataclass(frozen=True)
class SeriesRecord:
    """A series as the reports show it (a job, to the admin): the current generation."""

    id: int
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    calling_ae: str
    calling_host: str
    instance_count: int
    state: SeriesState
    reason: str | None  # why skipped, failed, held, ...
    generation: int
    first_received_at: datetime
    last_received_at: datetime
    state_changed_at: datetime
    attempts: int  # worker runs started on this generation
    seg_file: str | None  # under data_dir/results
    seg_series_instance_uid: str | None
    seg_sop_instance_uid: str | None
    result: str | None  # JSON: segments, volumes, timings, verdict
    purged_at: datetime | None  # files deleted by retention
    delivered_to: tuple[str, ...]  # destinations that hold this generation's SEG


@dataclass(frozen=True)
class TransitionRecord:
    """One move of a series, with its time: a line of its timeline."""

    at: datetime
    generation: int
    from_state: SeriesState | None  # None: the series was new
    to_state: SeriesState
    reason: str | None


@dataclass(frozen=True)
class DeliveryRecord:
    """One SEG to one destination, as far as it got."""

    destination: str  # its name in config.toml
    ae_title: str
    host: str
    port: int
    generation: int
    state: DeliveryState
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None  # None while an attempt is in flight, or settled
    delivered_at: datetime | None


@dataclass(frozen=True)
class JobRecord:
    """A series with its whole timeline and every delivery (all generations): `dicom-node job`."""

    series: SeriesRecord
    transitions: tuple[TransitionRecord, ...]
    deliveries: tuple[DeliveryRecord, ...]
