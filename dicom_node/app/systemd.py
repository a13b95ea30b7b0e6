"""The daemon's messages to systemd (`Type=notify`, `WatchdogSec=`; sd_notify(3)'s protocol).

systemd passes a unix datagram socket in `NOTIFY_SOCKET` (a path, or an abstract name written
with a leading "@"); each message is one datagram of `KEY=value` lines. The daemon sends
`READY=1` once the DICOM port listens, `WATCHDOG=1` from its scheduler every half of
`WATCHDOG_USEC` (systemd restarts a unit whose pings stop: a hung scheduler, a wedged
process) and `STOPPING=1` when it begins to stop. Without `NOTIFY_SOCKET` (not started by
systemd) every message is skipped. Sending never fails the daemon: a lost message is logged.

A cluster's worker (`dicom_node.cluster.worker`) has no scheduler: its `HealthWatchdog`
pings from a thread of its own, and only while the worker's health checks pass, so that a
worker that is up but cannot take a job (its inference process dead, its broker connection
gone) is restarted by systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

from dicom_node.web.health import ReadinessCheck, readiness

log = logging.getLogger(__name__)

# How long `HealthWatchdog.stop` waits for a round of checks under way (a database that does
# not answer can hold one longer; the thread is a daemon and goes with the process).
_STOP_WAIT_S = 5.0


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

    def ready(self, status: str = "listening") -> bool:
        return self.notify(f"READY=1\nSTATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")


class HealthWatchdog:
    """`WATCHDOG=1` every half of `WATCHDOG_USEC`, from a thread, each time every one of
    `checks` passes (`dicom_node.web.health`'s, as `/readyz` runs them): pings that stop
    because a check failed, or because a check hangs, get the process restarted. Nothing
    runs without a watchdog interval. Which checks fail, and when they pass again, is logged:
    the reason systemd's "watchdog timeout" leaves out."""

    def __init__(self, notifier: SystemdNotifier, checks: Mapping[str, ReadinessCheck]) -> None:
        self.notifier = notifier
        self.checks = checks
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: dict[str, str] = {}

    def start(self) -> None:
        if self.notifier.watchdog_s is None or self._thread is not None:
            return
        interval_s = self.notifier.watchdog_s / 2
        # A daemon thread: a check that hangs must not hold the process at its exit.
        self._thread = threading.Thread(
            target=self._run, args=(interval_s,), name="systemd-watchdog", daemon=True
        )
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while True:
            self.ping()
            if self._stopped.wait(interval_s):
                return

    def ping(self) -> bool:
        """Run the checks; `WATCHDOG=1` if all passed. True if it was sent."""
        healthy, results = readiness(self.checks)
        failing = {name: r["reason"] for name, r in results.items() if not r["ok"]}
        if failing and failing.keys() != self._failing.keys():
            reasons = "; ".join(f"{name}: {reason}" for name, reason in failing.items())
            log.warning("not pinging systemd's watchdog: %s", reasons)
        elif not failing and self._failing:
            log.info("healthy again: pinging systemd's watchdog")
        self._failing = failing
        return healthy and self.notifier.watchdog()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(_STOP_WAIT_S)
