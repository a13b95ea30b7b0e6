"""The admin's dashboard, on the HTTP endpoint (`[http] dashboard`): Jinja2 pages over the
same functions `dicom-node status`, `jobs` and `job` print (`dicom_node.app.status`).

- `GET /`: the recent jobs (series) with state, reason, calling AE, instances and timings,
  and the count per state (`?state=failed`: those only);
- `GET /jobs/ID`: one job: timeline, segments and volumes, measurements, timings,
  deliveries, the SEG's preview (`GET /jobs/ID/preview.png`, drawn from the SEG file) and
  the measurements' key image (`GET /jobs/ID/key.png`, the PNG the worker drew beside it);
- `POST /jobs/ID/retry`: the one action, `dicom-node retry ID` for a failed job.

Pages refresh their live part every few seconds (`static/refresh.js`, plain fetch).

Who may look: with `[http] token` or `username`/`password` set, every dashboard request
needs them (HTTP basic auth; or `Authorization: Bearer TOKEN`); the configuration refuses a
dashboard bound beyond loopback without. Without credentials (loopback only), a request
must name this machine in its Host header, so that a web page whose name an attacker points
at 127.0.0.1 (DNS rebinding) cannot read it. Either way a retry is a POST that carries the
form's anti-forgery token and, where the browser says where it comes from (Origin,
Sec-Fetch-Site), comes from the dashboard itself: another site's page cannot make the
admin's browser retry a job.

Patient name, ID and birth date appear only with `[http] show_patient_identifiers`.
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from functools import lru_cache
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.app.config import HttpConfig
from dicom_node.app.config.network import is_loopback
from dicom_node.app.status import job_report, list_jobs, measurement_rows
from dicom_node.imaging.seg_preview import coronal_preview_png
from dicom_node.pipeline.inference import key_image_path_beside
from dicom_node.pipeline.spool import Spool
from dicom_node.pipeline.state import IllegalTransitionError, NodeState, SeriesState

log = logging.getLogger(__name__)

RECENT_JOBS = 50
REFRESH_S = 5
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
_JOB_PATH = re.compile(r"/jobs/(\d+)(/preview\.png|/key\.png|/retry)?")
# Nothing from elsewhere: no framing, no third-party scripts or styles; no referrer elsewhere.
_SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),  # no-referrer would make the form's Origin "null"
)
_PATIENT_KEYWORDS = ["PatientName", "PatientID", "PatientBirthDate"]


@dataclass(frozen=True)
class Reply:
    """An HTTP response for the server to send."""

    status: HTTPStatus
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


class Dashboard:
    """The pages, the retry and who may use them, over the daemon's state database."""

    def __init__(
        self, config: HttpConfig, state: NodeState, spool: Spool, results_dir: Path
    ) -> None:
        self.config = config
        self.state = state
        self.spool = spool
        self.results_dir = results_dir
        # The anti-forgery token in every retry form: random per process, so a page from
        # before a restart needs reloading before its retry works.
        self.form_token = secrets.token_urlsafe(32)
        self._templates = Environment(
            loader=PackageLoader("dicom_node.web"),
            autoescape=select_autoescape(default=True),
            undefined=StrictUndefined,
        )
        self._templates.filters["utc"] = _utc
        self._templates.globals["span"] = _span

    @staticmethod
    def serves(path: str) -> bool:
        return path == "/" or path.startswith(("/jobs/", "/static/"))

    # Requests --------------------------------------------------------------------------

    def get(self, target: str, headers: Message) -> Reply:
        refusal = self._refusal(headers)
        if refusal is not None:
            return refusal
        url = urlsplit(target)
        if url.path == "/":
            return self._jobs_page(parse_qs(url.query).get("state", [""])[0])
        if url.path.startswith("/static/"):
            return _static(url.path.removeprefix("/static/"))
        match = _JOB_PATH.fullmatch(url.path)
        if match is None or match[2] == "/retry":
            return self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")
        job_id = int(match[1])
        if match[2] == "/preview.png":
            return self._job_png(job_id, self._seg_path, "SEG", _preview)
        if match[2] == "/key.png":
            return self._job_png(job_id, self._key_image_path, "key image")
        return self._job_page(job_id)

    def post(self, target: str, headers: Message, body: bytes) -> Reply:
        refusal = self._refusal(headers)
        if refusal is not None:
            return refusal
        match = _JOB_PATH.fullmatch(urlsplit(target).path)
        if match is None or match[2] != "/retry":
            return self._error(HTTPStatus.NOT_FOUND, "the dashboard's one action is a retry")
        forged = self._forgery(headers, body)
        if forged is not None:
            return self._error(HTTPStatus.FORBIDDEN, f"retry refused: {forged}")
        job_id = int(match[1])
        try:
            moved_to = self.state.retry(job_id)
        except (IllegalTransitionError, LookupError) as error:
            return self._error(HTTPStatus.CONFLICT, str(error))
        log.info("job %d: retried from the dashboard, now %s", job_id, moved_to)
        # See other: the browser shows the job, and a reload does not post again.
        return Reply(HTTPStatus.SEE_OTHER, b"", headers=(("Location", f"/jobs/{job_id}"),))

    # Who may ---------------------------------------------------------------------------

    def _refusal(self, headers: Message) -> Reply | None:
        """401 without the configured credentials; without any configured, 403 for a Host
        header that does not name this machine."""
        if self.config.authenticated:
            if self._authenticated(headers.get("Authorization", "")):
                return None
            reply = self._error(HTTPStatus.UNAUTHORIZED, "credentials needed")
            challenge = ("WWW-Authenticate", 'Basic realm="dicom-node", charset="UTF-8"')
            return Reply(reply.status, reply.body, headers=(*reply.headers, challenge))
        host = _host_name(headers.get("Host", ""))
        if host == self.config.bind or is_loopback(host):
            return None
        return self._error(HTTPStatus.FORBIDDEN, "the dashboard answers to this machine's name")

    def _authenticated(self, authorization: str) -> bool:
        scheme, _, credentials = authorization.partition(" ")
        token, user, password = self.config.token, self.config.username, self.config.password
        if scheme.lower() == "bearer":
            return bool(token) and _equal(credentials.strip(), token)
        if scheme.lower() != "basic":
            return False
        try:
            given_user, _, given_password = (
                base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            )
        except (ValueError, UnicodeDecodeError):
            return False
        if token and _equal(given_password, token):  # a browser's way to give the token
            return True
        # `&`, not `and`: the password is compared even when the user name is wrong.
        return bool(user) and _equal(given_user, user) & _equal(given_password, password)

    def _forgery(self, headers: Message, body: bytes) -> str | None:
        """Why the retry does not come from the dashboard's own form, or None."""
        form = parse_qs(body.decode("ascii", "replace"))
        if not _equal(form.get("form_token", [""])[0], self.form_token):
            return "the form's token is missing or stale (reload the page)"
        if headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return "the request comes from another site"
        origin = headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != headers.get("Host", ""):
            return "the request comes from another site"
        return None

    # Pages -----------------------------------------------------------------------------

    def _jobs_page(self, state_name: str) -> Reply:
        try:
            state = SeriesState(state_name) if state_name else None
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, f"no state {state_name!r}")
        counts = self.state.counts()
        return self._page(
            "jobs.html",
            jobs=list_jobs(self.state, RECENT_JOBS, state),
            counts={s.value: counts.get(s.value, 0) for s in SeriesState},
            state=state_name,
        )

    def _job_page(self, job_id: int) -> Reply:
        try:
            job = job_report(self.state, job_id)
        except LookupError:
            return self._error(HTTPStatus.NOT_FOUND, f"no job {job_id}")
        result = job["result"] or {}
        measurements = result.get("measurements") or {}
        return self._page(
            "job.html",
            job=job,
            result=result,
            timings={k: v for k, v in result.get("timings_s", {}).items() if k.endswith("_s")},
            measurement_error=measurements.get("error"),
            measurements=[] if "error" in measurements else measurement_rows(measurements),
            has_preview=self._seg_path(job) is not None,
            has_key_image=self._key_image_path(job) is not None,
            retryable=job["state"] == SeriesState.FAILED and job["purged_at"] is None,
            patient=self._patient(job) if self.config.show_patient_identifiers else None,
            form_token=self.form_token,
        )

    def _job_png(
        self,
        job_id: int,
        path_of: Callable[[dict[str, Any]], Path | None],
        what: str,
        draw: Callable[[Path], bytes] = Path.read_bytes,
    ) -> Reply:
        """A job's picture of a file on disk (`path_of` finds it), or 404 naming the file."""
        try:
            path = path_of(job_report(self.state, job_id))
        except LookupError:
            path = None
        if path is None:
            return self._error(HTTPStatus.NOT_FOUND, f"job {job_id} has no {what} on disk")
        return Reply(HTTPStatus.OK, draw(path), "image/png")

    def _key_image_path(self, job: dict[str, Any]) -> Path | None:
        """The measurements' key image the worker drew beside the SEG, if there is one."""
        seg_path = self._seg_path(job)
        if seg_path is None:
            return None
        path = key_image_path_beside(seg_path)
        return path if path.is_file() else None

    def _seg_path(self, job: dict[str, Any]) -> Path | None:
        if not job["seg_file"] or job["purged_at"]:
            return None
        path = self.results_dir / job["seg_file"]
        return path if path.is_file() else None

    def _patient(self, job: dict[str, Any]) -> dict[str, str]:
        """Name, ID and birth date from the SEG (which copies them) or a spooled instance."""
        candidates = [self._seg_path(job)]
        spooled = self.state.any_file_name(job["id"])
        if spooled is not None:
            candidates.append(self.spool.path(spooled))
        for path in candidates:
            if path is None:
                continue
            try:
                header = dcmread(path, stop_before_pixels=True, specific_tags=_PATIENT_KEYWORDS)
            except (OSError, InvalidDicomError):
                continue
            return {k: str(header.get(k, "")) for k in _PATIENT_KEYWORDS}
        return {}

    def _page(self, template: str, **values: Any) -> Reply:
        html = self._templates.get_template(template).render(
            refresh_s=REFRESH_S, now=datetime.now(UTC), **values
        )
        return Reply(HTTPStatus.OK, html.encode(), headers=_SECURITY_HEADERS)

    def _error(self, status: HTTPStatus, message: str) -> Reply:
        html = self._templates.get_template("error.html").render(
            status=status, message=message, refresh_s=0
        )
        return Reply(status, html.encode(), headers=_SECURITY_HEADERS)


def _preview(seg_path: Path) -> bytes:
    return _cached_preview(seg_path, seg_path.stat().st_mtime_ns)


@lru_cache(maxsize=16)
def _cached_preview(seg_path: Path, mtime_ns: int) -> bytes:
    """A SEG's preview, drawn once per file version (a reopened series writes a new one)."""
    return coronal_preview_png(seg_path)


def _static(name: str) -> Reply:
    suffix = Path(name).suffix
    files = resources.files("dicom_node.web") / "static"
    if "/" in name or suffix not in _STATIC_TYPES or not (files / name).is_file():
        return Reply(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
    return Reply(HTTPStatus.OK, (files / name).read_bytes(), _STATIC_TYPES[suffix])


def _equal(given: str, expected: str) -> bool:
    """Compared in constant time: how long it takes tells nothing about the secret."""
    return hmac.compare_digest(given.encode(), expected.encode())


def _host_name(host: str) -> str:
    """The name in a Host header, without its port or an IPv6 address' brackets."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if ":" in host else host


def _span(start: str, end: str | None = None) -> str:
    """From one ISO time to another (None: now), for people: 12 s, 3 min 20 s, 2 h 5 min."""
    until = datetime.fromisoformat(end) if end else datetime.now(UTC)
    seconds = max(0, round((until - datetime.fromisoformat(start)).total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _utc(moment: str | datetime) -> str:
    """An ISO time (or datetime) as 'YYYY-MM-DD HH:MM:SS' UTC."""
    value = datetime.fromisoformat(moment) if isinstance(moment, str) else moment
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
