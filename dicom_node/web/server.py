"""The node's HTTP server: a thread of the daemon (the standard library's threading server),
on `[http] bind:port`, serving

- `GET /metrics`: the node's registry (`dicom_node.web.metrics`) in Prometheus' text format
  (OpenMetrics when the scraper asks for it);
- `GET /healthz`: liveness, 200 and JSON whenever the process answers;
- `GET /readyz`: readiness (`dicom_node.web.health`), JSON with each check and its reason;
  200 when all pass, 503 otherwise (also while the node is still starting);
- the dashboard (`dicom_node.web.dashboard`, `[http] dashboard`): `GET /`, `/jobs/...`,
  `/static/...` and its one action, `POST /jobs/ID/retry`, with the credentials it asks for.

The three above are read-only and unauthenticated: they change nothing and name no patient;
the endpoint binds to 127.0.0.1 by default.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from dicom_node.app.config import HttpConfig
from dicom_node.logs import escape
from dicom_node.web.dashboard import Dashboard, Reply
from dicom_node.web.health import ReadinessCheck, readiness

log = logging.getLogger(__name__)

# A client that sends nothing for this long is dropped (each request holds a thread).
REQUEST_TIMEOUT_S = 10.0
# The largest request body read (the retry's form is one token).
MAX_BODY_BYTES = 4096


class HttpEndpoint:
    """The server, its thread, and what it serves."""

    def __init__(
        self, config: HttpConfig, registry: CollectorRegistry, dashboard: Dashboard | None = None
    ) -> None:
        self.config = config
        self.registry = registry
        self.dashboard = dashboard
        # The daemon sets these once the node listens; until then /readyz says "starting".
        self.checks: Mapping[str, ReadinessCheck] = {}
        self.started_at = time.monotonic()
        self._server: _Server | None = None

    def start(self) -> None:
        """Bind and serve in a thread; RuntimeError naming http.bind/http.port if the
        address is taken or not this machine's (a start-up error, not a silent absence)."""
        address = (self.config.bind, self.config.port)
        try:
            self._server = _Server(address, self)
        except OSError as error:
            raise RuntimeError(
                f"http.port: cannot listen on {self.config.bind}:{self.config.port} "
                f"(http.bind, http.port): {error.strerror or error}"
            ) from error
        threading.Thread(
            target=self._server.serve_forever, name="dicom-node-http", daemon=True
        ).start()
        served = "metrics, health and the dashboard" if self.dashboard else "metrics and health"
        log.info("%s on http://%s:%d", served, self.config.bind, self.config.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def health(self) -> dict[str, Any]:
        return {
            "status": "alive",
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        if not self.checks:
            return False, {"ready": False, "reason": "starting", "checks": {}}
        ready, results = readiness(self.checks)
        failing = [name for name, result in results.items() if not result["ok"]]
        reason = "ready" if ready else "not ready: " + ", ".join(failing)
        return ready, {"ready": ready, "reason": reason, "checks": results}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request in flight does not hold up the daemon's exit

    def __init__(self, address: tuple[str, int], endpoint: HttpEndpoint) -> None:
        if ":" in address[0]:  # an IPv6 address
            self.address_family = socket.AF_INET6
        self.endpoint = endpoint
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S
    server_version = "dicom-node"

    def do_GET(self) -> None:
        endpoint = self.server.endpoint
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(HTTPStatus.OK, encoder(endpoint.registry), content_type)
        elif path == "/healthz":
            self._send_json(HTTPStatus.OK, endpoint.health())
        elif path == "/readyz":
            ready, report = endpoint.readiness()
            self._send_json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, report)
        elif (dashboard := endpoint.dashboard) is not None and dashboard.serves(path):
            self._send_reply(lambda: dashboard.get(self.path, self.headers))
        else:
            self._not_found()

    def do_POST(self) -> None:
        dashboard = self.server.endpoint.dashboard
        if dashboard is None or not dashboard.serves(self.path.split("?", 1)[0]):
            self._not_found()
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return
        body = self.rfile.read(length)
        self._send_reply(lambda: dashboard.post(self.path, self.headers, body))

    def _not_found(self) -> None:
        paths = ["/metrics", "/healthz", "/readyz"]
        if self.server.endpoint.dashboard is not None:
            paths.insert(0, "/")
        self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found", "paths": paths})

    def _send_reply(self, answer: Callable[[], Reply]) -> None:
        """The dashboard's reply, or 500 if drawing it failed (the error is logged)."""
        try:
            reply = answer()
        except Exception as error:  # a page that cannot be drawn: the admin sees it failed
            log.exception("dashboard: %s %s failed", self.command, escape(self.path, limit=200))
            body = f"the dashboard failed: {type(error).__name__} (node log)\n".encode()
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, body, "text/plain; charset=utf-8")
            return
        self._send(reply.status, reply.body, reply.content_type, reply.headers)

    def _send_json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body, indent=2).encode() + b"\n"
        self._send(status, data, "application/json")

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # A scraper calls every few seconds: a line each would drown the node's log.
        # The request line is the client's: escaped, so it cannot forge a log line.
        log.debug("%s %s", self.address_string(), escape(format % args, limit=300))
