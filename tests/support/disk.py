"""Filling the node's small test disk (the `small_disk` fixture's tmpfs) to a chosen level."""

from __future__ import annotations

import os
from pathlib import Path

MIB = 1 << 20


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def write_ballast(data_dir: Path, size: int) -> Path:
    """A file that takes `size` bytes of the small disk (written, so tmpfs really holds it)."""
    path = data_dir / "ballast"
    with path.open("wb") as file:
        for _ in range(size // MIB):
            file.write(b"\xff" * MIB)
        file.write(b"\xff" * (size % MIB))
    return path


def fill_to(data_dir: Path, free: int) -> Path:
    """A ballast file that leaves `free` bytes free on the small disk."""
    return write_ballast(data_dir, free_bytes(data_dir) - free)
