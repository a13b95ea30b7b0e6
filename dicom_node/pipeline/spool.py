"""The spool: received instances on disk, durably, under names the node chooses.

A sender deletes or forgets what it was told is stored, so a write must survive a crash or a
power cut before reception answers success: the bytes go to a temporary name, are fsynced,
renamed to their final name, and the directory is fsynced so the rename itself is on disk.
Names are random (`<uuid>.dcm`), never taken from the dataset: UIDs are not paths, and a
hostile or sloppy value must not be able to choose where the node writes.

A full disk must not take the node down with it (the database and the results live on the
same file system), so the spool keeps a free-space watermark (`[node] min_free_mb`): a write
that would leave less free is refused before a byte is written, as `LowDiskSpaceError`, and
reception answers out-of-resources; the sender keeps the instance and retries later. A write
the disk fails midway (ENOSPC when the watermark is off or another process filled the disk)
leaves nothing behind: only the temporary name existed, and it is removed.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SUFFIX = ".dcm"
PARTIAL_SUFFIX = ".part"


class LowDiskSpaceError(OSError):
    """The write would leave less free space than the watermark: nothing was written."""


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
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    renamed = False
    try:
        with open(partial, "xb") as file:
            file.writelines(parts)
            file.flush()
            os.fsync(file.fileno())
        os.rename(partial, path)
        renamed = True
        _fsync_directory(path.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        if renamed:  # the rename may not be durable: not a file anyone was told of
            path.unlink(missing_ok=True)
        raise
    return sum(len(part) for part in parts)


class Spool:
    """A flat folder of received DICOM files; the state database maps names to instances.

    `min_free_bytes` (0: no watermark) is the free space every write must leave on the
    spool's file system."""

    def __init__(self, directory: Path, min_free_bytes: int = 0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()  # associations write concurrently
        self._refused = 0  # writes refused since the free space fell below the watermark

    def path(self, name: str) -> Path:
        return self.directory / name

    def free_bytes(self) -> int:
        """Free space on the spool's file system, as an unprivileged process may use it."""
        stats = os.statvfs(self.directory)
        return stats.f_bavail * stats.f_frsize

    def write(self, parts: Sequence[bytes | memoryview]) -> SpooledFile:
        """Write a DICOM file (given in parts) durably under a new name; LowDiskSpaceError
        (before writing) below the watermark, OSError on any other failure."""
        self._check_space(sum(len(part) for part in parts))
        name = uuid.uuid4().hex + _SUFFIX
        return SpooledFile(name, write_durably(self.directory / name, parts))

    def _check_space(self, size: int) -> None:
        """Refuse a write that would leave less than `min_free_bytes` free. One warning when
        refusals start and one line when they end, not one per instance: a scanner pushing
        a study at a full node would otherwise write a log line per slice. Associations check
        concurrently, so the margin may be undershot by the few instances in flight at once:
        it is a margin (1 GiB by default), not an exact quota."""
        if not self.min_free_bytes:
            return
        free = self.free_bytes()
        low = free - size < self.min_free_bytes
        with self._lock:
            refused, self._refused = self._refused, self._refused + 1 if low else 0
        mb = 1 << 20
        if low:
            if not refused:
                log.warning(
                    "spool: %d MiB free, below the node.min_free_mb watermark (%d MiB): "
                    "refusing C-STOREs (out of resources) until space is freed",
                    free // mb,
                    self.min_free_bytes // mb,
                )
            raise LowDiskSpaceError(
                errno.ENOSPC,
                f"{free // mb} MiB free, below node.min_free_mb ({self.min_free_bytes // mb} MiB)",
            )
        if refused:
            log.info(
                "spool: %d MiB free again, accepting C-STOREs (%d refused meanwhile)",
                free // mb,
                refused,
            )

    def discard(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def names(self) -> set[str]:
        """The complete files in the spool."""
        return {path.name for path in self.directory.glob("*" + _SUFFIX)}

    def remove_partial(self) -> int:
        """Remove writes a crash interrupted: never acknowledged, the sender still has them."""
        partial = list(self.directory.glob("*" + PARTIAL_SUFFIX))
        for path in partial:
            path.unlink()
        if partial:
            log.info("spool: removed %d partial write(s) left by a crash", len(partial))
        return len(partial)
