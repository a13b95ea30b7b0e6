"""The spool: received instances on disk, durably, under names the node chooses.

A sender deletes or forgets what it was told is stored, so a write must survive a crash or a
power cut before reception answers success: the bytes go to a temporary name, are fsynced,
renamed to their final name, and the directory is fsynced so the rename itself is on disk.
Names are random (`<uuid>.dcm`), never taken from the dataset: UIDs are not paths, and a
hostile or sloppy value must not be able to choose where the node writes.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SUFFIX = ".dcm"
_PARTIAL = ".part"


@dataclass(frozen=True)
class SpooledFile:
    name: str
    size_bytes: int


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, parts: Sequence[bytes | memoryview]) -> int:
    """Write `parts` to `path` so that it survives a crash or power cut, or not at all:
    a temporary name, fsync, rename, fsync of the folder. Returns the size; OSError on
    failure (nothing left behind)."""
    partial = path.with_name(path.name + _PARTIAL)
    try:
        with open(partial, "xb") as file:
            file.writelines(parts)
            file.flush()
            os.fsync(file.fileno())
        os.rename(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return sum(len(part) for part in parts)


class Spool:
    """A flat folder of received DICOM files; the state database maps names to instances."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / name

    def write(self, parts: Sequence[bytes | memoryview]) -> SpooledFile:
        """Write a DICOM file (given in parts) durably under a new name; OSError on failure."""
        name = uuid.uuid4().hex + _SUFFIX
        return SpooledFile(name, write_durably(self.directory / name, parts))

    def discard(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def names(self) -> set[str]:
        """The complete files in the spool."""
        return {path.name for path in self.directory.glob("*" + _SUFFIX)}

    def remove_partial(self) -> int:
        """Remove writes a crash interrupted: never acknowledged, the sender still has them."""
        partial = list(self.directory.glob("*" + _PARTIAL))
        for path in partial:
            path.unlink()
        if partial:
            log.info("spool: removed %d partial write(s) left by a crash", len(partial))
        return len(partial)
