"""What the node does with a series, stage by stage: [series] (when it is whole, which series
qualify and how their geometry is handled), [inference], [worker], [seg], [measurements],
[verdict], [delivery] and [retention]."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from dicom_node.app.config.checks import ConfigError, alternatives
from dicom_node.imaging.volume.policy import AssemblyPolicy
from model.settings import Device, Precision, Strategy, is_device


@dataclass(frozen=True)
class SeriesConfig(AssemblyPolicy):
    """[series]: when a series counts as received in full, and (the `AssemblyPolicy` fields,
    see dicom_node/volume.py) which series qualify for segmentation and how their geometry
    is handled. One section because both describe what the node does with a series."""

    complete_after_s: float = 20.0  # idle time after the series' last instance

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.complete_after_s < 0:
            raise ConfigError(f"series.complete_after_s: must be >= 0, got {self.complete_after_s}")


@dataclass(frozen=True)
class InferenceConfig:
    strategy: Strategy = Strategy.FAST
    device: str = Device.AUTO  # a Device or cuda:N
    precision: Precision = Precision.AUTO  # model.engine.network.autocast_dtype
    threads: int = 0  # 0: torch's default (all cores)
    weights: str = ""  # "": the weights shipped in the package

    def __post_init__(self) -> None:
        if self.strategy not in tuple(Strategy):
            expected = alternatives([repr(s.value) for s in Strategy])
            raise ConfigError(f"inference.strategy: expected {expected}, got {self.strategy!r}")
        if not is_device(self.device):
            expected = alternatives([*Device, f"{Device.CUDA}:N"])
            raise ConfigError(f"inference.device: expected {expected}, got {self.device!r}")
        if self.precision not in tuple(Precision):
            expected = alternatives(list(Precision))
            raise ConfigError(f"inference.precision: expected {expected}, got {self.precision!r}")
        # The file and the command line give strings: the members from here on (frozen, so
        # through object.__setattr__, as dataclasses' own __init__ does).
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        object.__setattr__(self, "precision", Precision(self.precision))
        if self.threads < 0:
            raise ConfigError(f"inference.threads: must be >= 0, got {self.threads}")


@dataclass(frozen=True)
class DeliveryConfig:
    """[delivery]: how hard the node tries to hand a SEG over before calling it failed."""

    max_attempts: int = 8  # per destination; then the series is `failed` (dicom-node retry)
    backoff_initial_s: float = 30.0  # wait after the first failure; doubles per attempt
    backoff_max_s: float = 3600.0
    jitter: float = 0.2  # each wait is stretched by up to this fraction, at random
    timeout_s: float = 60.0  # association, DIMSE and network time-outs of one attempt

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"delivery.max_attempts: must be >= 1, got {self.max_attempts}")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ConfigError(
                "delivery.backoff_initial_s: must be > 0 and <= delivery.backoff_max_s, got "
                f"{self.backoff_initial_s} and {self.backoff_max_s}"
            )
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"delivery.jitter: must be 0..1, got {self.jitter}")
        if self.timeout_s <= 0:
            raise ConfigError(f"delivery.timeout_s: must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class WorkerConfig:
    """[worker]: the inference process (assemble, segment, write the SEG)."""

    timeout_s: float = 1800.0  # one series; longer counts as a hang: the worker is restarted
    retries: int = 1  # a series whose worker crashed or hung is tried this many more times
    # The worker's address space (MiB, RLIMIT_AS; 0: no limit): past it an allocation in the
    # worker fails and the series fails with the reason, instead of the kernel's OOM killer
    # choosing a process. The daemon itself is not limited.
    memory_max_mb: int = 0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"worker.timeout_s: must be > 0, got {self.timeout_s}")
        if self.retries < 0:
            raise ConfigError(f"worker.retries: must be >= 0, got {self.retries}")
        if self.memory_max_mb < 0:
            raise ConfigError(
                f"worker.memory_max_mb: must be >= 0 (0: no limit), got {self.memory_max_mb}"
            )


@dataclass(frozen=True)
class SegConfig:
    """[seg]: how the result series looks in the viewer."""

    series_number: int = 901
    series_description: str = "Bone segmentation (dicom-node)"

    def __post_init__(self) -> None:
        if not 0 <= self.series_number <= 2**31 - 1:
            raise ConfigError(f"seg.series_number: must be 0..2147483647, got {self.series_number}")
        if not 1 <= len(self.series_description) <= 64 or "\\" in self.series_description:
            raise ConfigError(
                "seg.series_description: 1 to 64 characters without backslash (a DICOM LO), "
                f"got {self.series_description!r}"
            )


# The measurements `[measurements] which` can pick (model/measure, docs/measurements.md).
# hka: mechanical axes, hip-knee-ankle angle, femoral head; femoral_angles: femoral
# inclination and version (on the landmarks the leg alignment found); hip: acetabular version,
# lateral centre-edge angle, acetabular coverage and alpha angle in the anterior pelvic plane.
MEASUREMENT_NAMES = ("hka", "femoral_angles", "hip")


@dataclass(frozen=True)
class MeasurementsConfig:
    """[measurements]: the measurement report (DICOM SR) sent beside the SEG, and its key
    image (a PNG in the results folder; with `key_image`, also a DICOM Secondary Capture sent
    with them)."""

    enabled: bool = True
    which: tuple[str, ...] = MEASUREMENT_NAMES
    key_image: bool = False

    def __post_init__(self) -> None:
        for name in self.which:
            if name not in MEASUREMENT_NAMES:
                known = alternatives([repr(n) for n in MEASUREMENT_NAMES])
                raise ConfigError(f"measurements.which: unknown {name!r} (expected {known})")


class UnsurePolicy(StrEnum):
    """What the node does with a segmentation whose verdict is unsure (model/engine/verdict.py)."""

    SEND = "send"  # as a confident one
    UNVERIFIED = "unverified"  # sent, its Series and segment descriptions saying UNVERIFIED
    HOLD = "hold"  # kept in `review` until `dicom-node release` or `dicom-node reject`


@dataclass(frozen=True)
class VerdictConfig:
    """[verdict]: what becomes of a segmentation the node is unsure of. A confident one is
    always sent; an implausible one never is (no findings), whatever the policy."""

    policy: str = UnsurePolicy.UNVERIFIED.value

    def __post_init__(self) -> None:
        if self.policy not in tuple(UnsurePolicy):
            raise ConfigError(
                "verdict.policy: expected "
                + ", ".join(repr(p.value) for p in UnsurePolicy)
                + f", got {self.policy!r}"
            )


@dataclass(frozen=True)
class RetentionConfig:
    """[retention]: when received instances and results are deleted."""

    # Hours after a series reached done, no_findings, rejected or skipped; 0 keeps everything.
    delete_after_h: float = 168.0
    failed_after_h: float = 720.0  # after it failed: time to retry it; 0 keeps failed ones
    check_every_s: float = 600.0

    def __post_init__(self) -> None:
        for key in ("delete_after_h", "failed_after_h"):
            if getattr(self, key) < 0:
                raise ConfigError(f"retention.{key}: must be >= 0, got {getattr(self, key)}")
        if self.check_every_s <= 0:
            raise ConfigError(f"retention.check_every_s: must be > 0, got {self.check_every_s}")
