"""The node's configuration (config.toml): typed sections, validated at start.

Unknown sections or keys and values of the wrong type are rejected with a message naming the
key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, with the offending key in its message."""


@dataclass(frozen=True)
class InferenceConfig:
    strategy: str = "fast"  # "fast" or "paper"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    threads: int = 0  # 0: torch's default (all cores)
    weights: str = ""  # "": the weights shipped in the package

    def __post_init__(self) -> None:
        if self.strategy not in ("fast", "paper"):
            raise ConfigError(
                f"inference.strategy: expected 'fast' or 'paper', got {self.strategy!r}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(
                f"inference.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
        if self.threads < 0:
            raise ConfigError(f"inference.threads: must be >= 0, got {self.threads}")


@dataclass(frozen=True)
class Config:
    inference: InferenceConfig = field(default_factory=InferenceConfig)


def _section(cls: type, name: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(known)})")
        expected = type(getattr(cls(), key))
        if type(value) is not expected and not (expected is float and type(value) is int):
            raise ConfigError(
                f"{name}.{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}"
            )
    return cls(**values)


def load_config(path: Path) -> Config:
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    sections = {f.name: f for f in fields(Config)}
    for name in data:
        if name not in sections:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(sections)})")
    return Config(
        **{name: _section(type(getattr(Config(), name)), name, data[name]) for name in data}
    )
