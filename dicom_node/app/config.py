"""The node's configuration (config.toml): typed sections, validated at start.

Unknown sections or keys and values of the wrong type are rejected with a message naming the
key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicom_node.imaging.volume.policy import AssemblyPolicy
from dicom_node.logs import LogConfig as LogConfig  # [log], beside the formats it picks
from model.settings import Device, Precision, Strategy, is_device


class ConfigError(ValueError):
    """A configuration problem, with the offending key in its message."""


def _alternatives(choices: list[str]) -> str:
    """'a, b or c'."""
    *rest, last = choices
    return f"{', '.join(rest)} or {last}" if rest else last


@dataclass(frozen=True)
class InferenceConfig:
    strategy: Strategy = Strategy.FAST
    device: str = Device.AUTO  # a Device or cuda:N
    precision: Precision = Precision.AUTO  # model.network.autocast_dtype
    threads: int = 0  # 0: torch's default (all cores)
    weights: str = ""  # "": the weights shipped in the package

    def __post_init__(self) -> None:
        if self.strategy not in tuple(Strategy):
            expected = _alternatives([repr(s.value) for s in Strategy])
            raise ConfigError(f"inference.strategy: expected {expected}, got {self.strategy!r}")
        if not is_device(self.device):
            expected = _alternatives([*Device, f"{Device.CUDA}:N"])
            raise ConfigError(f"inference.device: expected {expected}, got {self.device!r}")
        if self.precision not in tuple(Precision):
            expected = _alternatives(list(Precision))
            raise ConfigError(f"inference.precision: expected {expected}, got {self.precision!r}")
        # The file and the command line give strings: the members from here on (frozen, so
        # through object.__setattr__, as dataclasses' own __init__ does).
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        object.__setattr__(self, "precision", Precision(self.precision))
        if self.threads < 0:
            raise ConfigError(f"inference.threads: must be >= 0, got {self.threads}")


# PS3.5 6.2: an AE title is at most 16 characters of the default repertoire, no backslash and
# no control characters, and not only spaces.
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
_DATABASE_SCHEMES = ("sqlite://", "postgresql://", "postgresql+")


def _check_ae_title(key: str, title: str) -> None:
    if not _AE_TITLE.fullmatch(title) or not title.strip():
        raise ConfigError(
            f"{key}: an AE title is 1 to 16 printable characters without backslash, got {title!r}"
        )


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _check_network(key: str, entry: str) -> None:
    """An IP address or a CIDR network without host bits ('10.1.0.0/16', not '10.1.2.3/16':
    that typo would silently allow a different range than meant)."""
    try:
        ipaddress.ip_network(entry)
    except ValueError as error:
        raise ConfigError(
            f"{key}: expected an IP address or a CIDR network such as '10.1.0.0/16', got "
            f"{entry!r} ({error})"
        ) from None


def _check_timeout(key: str, seconds: float) -> None:
    # TOML has inf and nan: "never" is exactly what a time-out must not be.
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{key}: must be a number of seconds > 0, got {seconds}")


def _check_key_pair(prefix: str, certificate: str, private_key: str) -> None:
    if bool(certificate) != bool(private_key):
        missing = "tls_private_key" if certificate else "tls_certificate"
        raise ConfigError(f"{prefix}.{missing}: tls_certificate and tls_private_key go together")


@dataclass(frozen=True)
class NodeConfig:
    """The DICOM daemon: who it is on the network and where it keeps everything it writes."""

    ae_title: str = "BONESEG"
    bind: str = "127.0.0.1"
    port: int = 11112
    # Everything the node writes lives under here; a relative path is relative to the config
    # file's folder (load_config makes it absolute).
    data_dir: str = "var"
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE
    max_associations: int = 10
    # Largest P-DATA PDU the node accepts (0: no limit). The sender splits each instance into
    # PDUs of at most this size, so small values cost throughput (pynetdicom's default 16382).
    max_pdu_size: int = 0
    # Largest instance (MiB of encoded dataset) the node takes. pynetdicom gathers a C-STORE's
    # dataset in memory before the handler sees it, so without a cap one sender declaring an
    # endless dataset takes all memory; past it the association is aborted. A whole-leg
    # Enhanced CT (1400 frames of 512 x 512 x 16 bits) is 734 MiB.
    max_instance_mb: int = 1024
    database: str = ""  # "": SQLite under data_dir; or a postgresql:// URL
    # Free space (MiB) every received instance must leave on the spool's file system; below it
    # a C-STORE is answered out-of-resources before anything is written (dicom_node/spool.py),
    # so a full disk never breaks the database or the results beside the spool. 0: off.
    min_free_mb: int = 1024
    # Peers by network address: IP addresses or CIDR networks (IPv4 or IPv6); empty: any. An
    # association from elsewhere is rejected before anything is stored (dicom_node/access.py).
    allowed_peer_addresses: tuple[str, ...] = ()
    # Time-outs (seconds) so that a stalled or hostile peer cannot hold a thread forever.
    network_timeout_s: float = 60.0  # peer silent mid-PDU, mid-handshake or between messages
    acse_timeout_s: float = 30.0  # connection open without an A-ASSOCIATE-RQ; release
    dimse_timeout_s: float = 30.0  # a DIMSE message the node waits for
    # DICOM TLS (PS3.15 B.1) on the node's port: certificate and key both (then the port speaks
    # TLS only) or neither. PEM files, relative to the config file like data_dir.
    tls_certificate: str = ""
    tls_private_key: str = ""
    tls_ca_certificates: str = ""  # verifies client certificates that peers present
    tls_require_client_certificate: bool = False  # True: no verified certificate, no entry

    def __post_init__(self) -> None:
        _check_ae_title("node.ae_title", self.ae_title)
        if self.min_free_mb < 0:
            raise ConfigError(f"node.min_free_mb: must be >= 0 (0: off), got {self.min_free_mb}")
        for title in self.allowed_calling_aets:
            _check_ae_title("node.allowed_calling_aets", title)
        if not self.bind:
            raise ConfigError("node.bind: must be an address, e.g. '127.0.0.1' or '0.0.0.0'")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"node.port: must be 1..65535, got {self.port}")
        if not self.data_dir:
            raise ConfigError("node.data_dir: must not be empty")
        if self.max_associations < 1:
            raise ConfigError(f"node.max_associations: must be >= 1, got {self.max_associations}")
        if self.max_instance_mb < 1:
            raise ConfigError(f"node.max_instance_mb: must be >= 1, got {self.max_instance_mb}")
        if self.max_pdu_size != 0 and not 4096 <= self.max_pdu_size <= 2**32 - 1:
            raise ConfigError(
                f"node.max_pdu_size: 0 (no limit) or 4096..4294967295, got {self.max_pdu_size}"
            )
        if self.database and not self.database.startswith(_DATABASE_SCHEMES):
            raise ConfigError(
                f"node.database: expected '' (SQLite under data_dir), a sqlite:// or a "
                f"postgresql:// URL, got {self.database.split(':', 1)[0]!r}..."
            )
        for entry in self.allowed_peer_addresses:
            _check_network("node.allowed_peer_addresses", entry)
        for key in ("network_timeout_s", "acse_timeout_s", "dimse_timeout_s"):
            _check_timeout(f"node.{key}", getattr(self, key))
        _check_key_pair("node", self.tls_certificate, self.tls_private_key)
        if not self.tls_certificate and self.tls_ca_certificates:
            raise ConfigError(
                "node.tls_ca_certificates: client certificates are verified only over TLS; "
                "set node.tls_certificate and node.tls_private_key too"
            )
        if self.tls_require_client_certificate and not self.tls_ca_certificates:
            raise ConfigError(
                "node.tls_require_client_certificate: needs node.tls_ca_certificates "
                "(the CA that signs the clients' certificates)"
            )

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def tls(self) -> bool:
        return bool(self.tls_certificate)

    @property
    def allowed_peer_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(entry) for entry in self.allowed_peer_addresses)

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data_path / 'node.db'}"


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


_NODE_TLS_FILES = ("tls_certificate", "tls_private_key", "tls_ca_certificates")
_DESTINATION_TLS_FILES = ("tls_ca_certificates", "tls_certificate", "tls_private_key")


@dataclass(frozen=True)
class Destination:
    """[[destinations]]: a peer every SEG is sent to by C-STORE.

    With `reply_to_caller`, the SEG goes back to whoever sent the series: the calling AE title
    and the address of its association replace `ae_title` and `host`; `port` stays (DICOM does
    not tell us the sender's listening port).
    """

    name: str
    ae_title: str
    host: str
    port: int
    reply_to_caller: bool = False
    # DICOM TLS to this peer. Its certificate must verify against tls_ca_certificates (PEM;
    # "": the system's CAs) and name `host` (DNS name or IP address in subjectAltName).
    tls: bool = False
    tls_ca_certificates: str = ""
    tls_certificate: str = ""  # the node's client certificate, for a peer that asks for one
    tls_private_key: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", self.name):
            raise ConfigError(
                f"destinations.name: 1 to 32 letters, digits, '_', '.', '-', got {self.name!r}"
            )
        _check_ae_title(f"destinations[{self.name}].ae_title", self.ae_title)
        if not self.host:
            raise ConfigError(f"destinations[{self.name}].host: must not be empty")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"destinations[{self.name}].port: must be 1..65535, got {self.port}")
        prefix = f"destinations[{self.name}]"
        _check_key_pair(prefix, self.tls_certificate, self.tls_private_key)
        for key in _DESTINATION_TLS_FILES:
            if getattr(self, key) and not self.tls:
                raise ConfigError(f"{prefix}.{key}: set, but {prefix}.tls is false")


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

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"worker.timeout_s: must be > 0, got {self.timeout_s}")
        if self.retries < 0:
            raise ConfigError(f"worker.retries: must be >= 0, got {self.retries}")


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
MEASUREMENT_NAMES = ("hka",)  # hka: mechanical axes, hip-knee-ankle angle, femoral head


@dataclass(frozen=True)
class MeasurementsConfig:
    """[measurements]: the measurement report (DICOM SR) sent beside the SEG."""

    enabled: bool = True
    which: tuple[str, ...] = MEASUREMENT_NAMES

    def __post_init__(self) -> None:
        for name in self.which:
            if name not in MEASUREMENT_NAMES:
                known = _alternatives([repr(n) for n in MEASUREMENT_NAMES])
                raise ConfigError(f"measurements.which: unknown {name!r} (expected {known})")


class UnsurePolicy(StrEnum):
    """What the node does with a segmentation whose verdict is unsure (model/verdict.py)."""

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


@dataclass(frozen=True)
class HttpConfig:
    """[http]: metrics (Prometheus) and health checks over HTTP, on a port of their own.

    Off by default; bound to the loopback interface by default, because the endpoints have no
    authentication: bind it elsewhere only where the network is trusted (the scraper's)."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 9104  # not 8042 (Orthanc's HTTP) nor the DICOM port

    def __post_init__(self) -> None:
        if not self.bind:
            raise ConfigError("http.bind: must be an address, e.g. '127.0.0.1' or '0.0.0.0'")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"http.port: must be 1..65535, got {self.port}")


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    measurements: MeasurementsConfig = field(default_factory=MeasurementsConfig)
    verdict: VerdictConfig = field(default_factory=VerdictConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    destinations: tuple[Destination, ...] = ()

    def __post_init__(self) -> None:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ConfigError(f"destinations.name: names must be unique, got {names}")
        if self.http.enabled and self.http.port == self.node.port:
            raise ConfigError(
                f"http.port: must differ from node.port (the DICOM port), got {self.http.port}"
            )

    def destination(self, name: str) -> Destination:
        for destination in self.destinations:
            if destination.name == name:
                return destination
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"no destination {name!r} (known: {known})")


def _check_type(key: str, value: Any, expected: Any) -> Any:
    """`value` as the field's type wants it (TOML arrays become tuples), or ConfigError."""
    if typing.get_origin(expected) is tuple:
        item_type = typing.get_args(expected)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_check_type(key, item, item_type) for item in value)
    if expected is float and type(value) is int:
        return float(value)
    if isinstance(expected, type) and issubclass(expected, StrEnum) and type(value) is str:
        return value  # the section's __post_init__ checks it is one, naming the choices
    if type(value) is expected:
        return value
    raise ConfigError(f"{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}")


def _section(cls: type, name: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = [f.name for f in fields(cls)]
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(known)})")
    for f in fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in values:
            raise ConfigError(f"{name}.{f.name}: required")
    checked = {key: _check_type(f"{name}.{key}", v, hints[key]) for key, v in values.items()}
    try:
        return cls(**checked)
    except ValueError as error:  # validation in __post_init__, which names the key
        raise ConfigError(str(error)) from error


def load_config(path: Path) -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    sections = {f.name: f for f in fields(Config)}
    for name in data:
        if name not in sections:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(sections)})")
    sections_in = {
        name: _section(type(getattr(Config(), name)), name, values)
        for name, values in data.items()
        if name != "destinations"
    }
    destinations = data.get("destinations", [])
    if not isinstance(destinations, list):
        raise ConfigError("destinations: expected [[destinations]] tables")
    config = Config(
        **sections_in,
        destinations=tuple(_section(Destination, "destinations", d) for d in destinations),
    )
    # data_dir is relative to the config file, not to wherever the daemon happens to start.
    data_dir = (path.parent / config.node.data_dir).resolve()
    node = dataclasses.replace(config.node, data_dir=str(data_dir))
    node = _with_files(node, "node", _NODE_TLS_FILES, path.parent)
    destinations = tuple(
        _with_files(d, f"destinations[{d.name}]", _DESTINATION_TLS_FILES, path.parent)
        for d in config.destinations
    )
    return dataclasses.replace(config, node=node, destinations=destinations)


def load_inference_config(path: Path | None, **overrides: Any) -> InferenceConfig:
    """The [inference] section of the config file at `path` (the defaults without one) with the
    command line's values over it; a value of None, 0 or "" leaves the file's."""
    config = load_config(path).inference if path else InferenceConfig()
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v})


def load_assembly_policy(path: Path | None, **overrides: Any) -> AssemblyPolicy:
    """The series policy of the config file at `path` (the defaults without one) with the
    command line's values over it; a value of None leaves the file's (0 is a value)."""
    policy = AssemblyPolicy.from_section(load_config(path).series) if path else AssemblyPolicy()
    return dataclasses.replace(policy, **{k: v for k, v in overrides.items() if v is not None})


_Section = typing.TypeVar("_Section", NodeConfig, Destination)


def _with_files(section: _Section, prefix: str, keys: tuple[str, ...], base: Path) -> _Section:
    """`keys` (file paths) made absolute against the config file's folder, and checked to
    exist now: a missing certificate fails the start, not the first association."""
    paths: dict[str, Any] = {}  # field name: the resolved path
    for key in keys:
        value = getattr(section, key)
        if value:
            resolved = (base / value).resolve()
            if not resolved.is_file():
                raise ConfigError(f"{prefix}.{key}: no such file: {resolved}")
            paths[key] = str(resolved)
    return dataclasses.replace(section, **paths)
