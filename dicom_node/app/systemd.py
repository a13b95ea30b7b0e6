"""The daemon's messages to systemd (`Type=notify`, `WatchdogSec=`; sd_notify(3)'s protocol).

systemd passes a unix datagram socket in `NOTIFY_SOCKET` (a path, or an abstract name written
with a leading "@"); each message is one datagram of `KEY=value` lines. The daemon sends
`READY=1` once the DICOM port listens, `WATCHDOG=1` from its scheduler every half of
`WATCHDOG_USEC` (systemd restarts a unit whose pings stop: a hung scheduler, a wedged
process) and `STOPPING=1` when it begins to stop. Without `NOTIFY_SOCKET` (not started by
systemd) every message is skipped. Sending never fails the daemon: a lost message is logged.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class SystemdNotifier:
    """The socket named by the environment at start, and the watchdog interval asked for."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket's name starts with a NUL byte, which systemd writes as "@".
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s: float | None = None
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        # WATCHDOG_PID, when set, names the process the watchdog is for (not a child's).
        for_this_process = env.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        if self.address and watchdog_usec.isdigit() and int(watchdog_usec) and for_this_process:
            self.watchdog_s = int(watchdog_usec) / 1e6

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, message: str) -> bool:
        """Send one message; False if there is no socket or it could not be sent."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as error:
            log.warning("systemd notification %r not sent: %s", message, error)
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1\nSTATUS=listening")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")
