"""The names inference is run with: strategy, precision and device.

Defined once here, without torch, so that the node's config and command line can check a value
without loading the model (`dicom_node.app.config` imports this module, not
`model.engine.inference`).
The members are strings: a member equals its value, and TOML, JSON and argparse see the value.
"""

from __future__ import annotations

from enum import StrEnum


class Strategy(StrEnum):
    """How the cascade covers a volume (model/engine/inference.py's module docstring)."""

    FAST = "fast"  # the first stage everywhere, the finer ones only around label changes
    PAPER = "paper"  # overlapping windows of every patch size, as in Kuiper et al. 2022


class Precision(StrEnum):
    """The dtype the convolutions run in (`model.engine.network.autocast_dtype`)."""

    AUTO = "auto"  # mixed on CUDA and on CPUs with bfloat16 units, float32 elsewhere
    FLOAT32 = "float32"
    MIXED = "mixed"  # float16 on CUDA, bfloat16 on CPU


class Device(StrEnum):
    """Where the cascade runs; a device setting may also name one GPU: cuda:N."""

    AUTO = "auto"  # CUDA when there is one, else the CPU
    CPU = "cpu"
    CUDA = "cuda"


def is_device(name: str) -> bool:
    """Whether `name` is a device setting: a `Device` or cuda:N."""
    return name in tuple(Device) or name.startswith(f"{Device.CUDA}:")
