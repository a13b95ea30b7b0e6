"""What every process the daemon starts does first: die with the daemon."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when the daemon dies.

    Otherwise a daemon killed mid-work leaves its children running: an inference worker
    competes with the restarted node's for the CPU and may write the SEG file the new one is
    writing; a receiving process keeps the DICOM port open for a node that is gone.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        log.warning("cannot ask to die with the daemon on this platform")
    if os.getppid() == 1:  # the daemon died before prctl took effect
        os._exit(1)
