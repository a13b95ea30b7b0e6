"""The whole file: `Config` (every section) and `load_config`, which reads config.toml and
checks each key's type against its section's dataclass; `load_inference_config` and
`load_assembly_policy` for the commands that take one section with command-line overrides."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicom_node.app.config.checks import ConfigError
from dicom_node.app.config.cluster import ClusterConfig
from dicom_node.app.config.network import (
    DESTINATION_TLS_FILES,
    NODE_TLS_FILES,
    Destination,
    HttpConfig,
    NodeConfig,
)
from dicom_node.app.config.pipeline import (
    DeliveryConfig,
    InferenceConfig,
    MeasurementsConfig,
    RetentionConfig,
    SegConfig,
    SeriesConfig,
    VerdictConfig,
    WorkerConfig,
)
from dicom_node.imaging.volume.policy import AssemblyPolicy
from dicom_node.logs import LogConfig  # [log], beside the formats it picks


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
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    destinations: tuple[Destination, ...] = ()

    def __post_init__(self) -> None:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ConfigError(f"destinations.name: names must be unique, got {names}")
        if self.http.enabled and self.http.port == self.node.port:
            raise ConfigError(
                f"http.port: must differ from node.port (the DICOM port), got {self.http.port}"
            )
        if self.cluster.enabled and not self.node.database.startswith("postgresql"):
            raise ConfigError(
                "node.database: a cluster shares its state in PostgreSQL; set a postgresql:// URL"
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
    cluster = config.cluster
    if cluster.shared_dir:  # likewise
        shared_dir = str((path.parent / cluster.shared_dir).resolve())
        cluster = dataclasses.replace(cluster, shared_dir=shared_dir)
    node = _with_files(node, "node", NODE_TLS_FILES, path.parent)
    destinations = tuple(
        _with_files(d, f"destinations[{d.name}]", DESTINATION_TLS_FILES, path.parent)
        for d in config.destinations
    )
    return dataclasses.replace(config, node=node, destinations=destinations, cluster=cluster)


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
