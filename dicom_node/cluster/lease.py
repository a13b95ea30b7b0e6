"""Leases kept alive: the thread that renews this process's claims while it works on them.

A cluster worker holds one series at a time (its segmentation); a reception node holds each
delivery it is sending (up to its delivery pool's size). Every `lease_s / 3` the keeper
renews the lease of each attempt held through the store (`NodeState.renew`), so that another
process takes an attempt over only once its owner stopped renewing it: it died, hangs, or
lost the database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dicom_node.pipeline.state import ClaimedSeries, DueDelivery, NodeState

log = logging.getLogger(__name__)

Held = ClaimedSeries | DueDelivery


class LeaseKeeper:
    """The thread that renews the leases on the attempts being worked on, every lease_s / 3."""

    def __init__(self, state: NodeState, lease_s: float) -> None:
        self.state = state
        self.lease_s = lease_s
        self._held: list[Held] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @contextmanager
    def holding(self, attempt: Held) -> Iterator[None]:
        """Renew the lease on `attempt` meanwhile."""
        with self._lock:
            self._held.append(attempt)
        try:
            yield
        finally:
            with self._lock:
                self._held.remove(attempt)

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            with self._lock:
                held = list(self._held)
            for attempt in held:
                self._renew(attempt)

    def _renew(self, attempt: Held) -> None:
        what = "delivery attempt" if isinstance(attempt, DueDelivery) else "attempt"
        try:
            if not self.state.renew(attempt, self.lease_s):
                log.warning(
                    "series %d: %s %d is no longer this process's (taken over or "
                    "superseded); its result will be discarded",
                    attempt.series_id,
                    what,
                    attempt.attempt,
                )
        except Exception:  # the database away for a moment: the lease has margin
            log.exception(
                "series %d: lease of %s %d not renewed", attempt.series_id, what, attempt.attempt
            )
