"""systemd's end of `Type=notify` for the tests: the unix datagram socket a service is given
as `NOTIFY_SOCKET`, recording what the service sends (sd_notify(3))."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path


class NotifySocket:
    """Each message with the time it came and, for READY=1, what `on_ready` (a look at the
    service: does it listen, does it answer ready) said at that moment."""

    def __init__(self, path: Path, on_ready: Callable[[], bool]) -> None:
        self.path = path
        self.on_ready = on_ready
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.settimeout(0.2)
        self.messages: list[tuple[float, str, bool]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing:
            try:
                message = self.socket.recv(4096).decode()
            except TimeoutError:
                continue
            seen = "READY=1" in message.splitlines() and self.on_ready()
            self.messages.append((time.monotonic(), message, seen))

    def received(self, text: str, after: float = -math.inf) -> list[tuple[float, str, bool]]:
        """The messages with line `text` that came after `after` (a `time.monotonic()`)."""
        return [m for m in self.messages if m[0] > after and text in m[1].splitlines()]

    def wait_for(
        self, text: str, count: int = 1, timeout: float = 30, after: float = -math.inf
    ) -> list[tuple[float, str, bool]]:
        """`received(text, after)` once it holds `count` messages."""
        deadline = time.monotonic() + timeout
        while len(found := self.received(text, after)) < count:
            assert time.monotonic() < deadline, f"{count} x {text} not sent: {self.messages}"
            time.sleep(0.05)
        return found

    def close(self) -> None:
        self._closing = True
        self._thread.join()
        self.socket.close()
