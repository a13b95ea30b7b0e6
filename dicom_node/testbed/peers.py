"""Real DICOM peers on loopback: Orthanc (a PACS), DCMTK storescp, and a small in-process
pynetdicom SCP whose answers a caller chooses. The demo, the tests and the benchmarks start
their peers from here.

Each runs on free ports in a folder of its own and is stopped by its own handle (PID or
server object). Recipes and quirks: shared/docs/dicom-peers.md. A peer that is not installed
raises `PeerNotInstalledError` (the tests turn it into a skip; `make system-deps` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

from dicom_node.app.config import Destination

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
# DCMTK and Orthanc from Debian leave Nagle on: every round trip waits ~40 ms without this.
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


class PeerNotInstalledError(RuntimeError):
    """A peer's program (Orthanc, a DCMTK tool, PostgreSQL) is not on this machine."""


class PeerDidNotStartError(RuntimeError):
    """A peer (or the node) exited or did not listen in time; the message ends with its log."""


def find_binary(binary: str) -> str:
    """The path of a peer's program; PeerNotInstalledError if it is not on PATH."""
    path = shutil.which(binary)
    if path is None:
        raise PeerNotInstalledError(
            f"{binary} not installed (make system-deps installs dcmtk and orthanc)"
        )
    return path


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    """Whether something listens on TCP `port` (any address), without connecting to it: a
    bare connect would show up in the peer's log as a failed association."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 20
    while not _listening(port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise PeerDidNotStartError(f"{what} did not start on port {port}:\n{_tail(log)}")
        time.sleep(0.02)


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)


class OrthancError(RuntimeError):
    """A REST call answered an HTTP error; `status` and `body` say which."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class OrthancProcess:
    """Orthanc in the foreground on free DICOM and HTTP ports, its database in `directory`.

    Use as a context manager (or start()/stop() from a fixture). Stopped by SIGKILL: SIGTERM
    takes Orthanc ~3.5 s and a test's database is thrown away anyway. `config` entries
    override the defaults (e.g. {"UnknownSopClassAccepted": True}).
    """

    def __init__(
        self,
        directory: Path,
        *,
        ae_title: str = "ORTHANC",
        check_called_aet: bool = False,
        modalities: dict[str, dict[str, Any]] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = self.directory / "orthanc.log"
        self.config_path = self.directory / "orthanc.json"
        settings: dict[str, Any] = {
            "Name": "TEST-PACS",
            "StorageDirectory": str(self.directory / "db"),
            "IndexDirectory": str(self.directory / "db"),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # Orthanc 1.10 cannot bind to loopback only
            "AuthenticationEnabled": False,
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": check_called_aet,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": modalities or {},
            "SaveJobs": False,
            "DicomAssociationCloseDelay": 0,
        }
        if DICOMWEB_PLUGIN.exists():
            settings["Plugins"] = [str(DICOMWEB_PLUGIN)]
            settings["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        self.settings = {**settings, **(config or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def has_dicomweb(self) -> bool:
        return "DicomWeb" in self.settings

    def destination(self, name: str = "pacs", ae_title: str | None = None) -> Destination:
        """This Orthanc as a node destination (another `ae_title` to test a wrong one)."""
        return Destination(name, ae_title or self.ae_title, "127.0.0.1", self.dicom_port)

    def start(self) -> OrthancProcess:
        binary = find_binary("Orthanc")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.settings, indent=2))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "--no-jobs", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=PEER_ENV,
                cwd=self.directory,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                break
            except (OSError, OrthancError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise PeerDidNotStartError(
                        f"Orthanc did not start:\n{_tail(self.log)}"
                    ) from None
                time.sleep(0.05)
        _wait_listening(self.dicom_port, self.process, self.log, "Orthanc's DICOM server")
        return self

    def stop(self) -> None:
        _kill(self.process)
        self.process = None

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # REST, with urllib only.

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = ""
    ) -> Any:
        """The decoded JSON answer (bytes if not JSON); OrthancError on an HTTP error."""
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                data = response.read()
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            raise OrthancError(method, path, error.code, text) from None
        return json.loads(data) if kind.startswith("application/json") else data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, value: Any) -> Any:
        return self.request("POST", path, json.dumps(value).encode(), "application/json")

    def put(self, path: str, value: Any) -> Any:
        return self.request("PUT", path, json.dumps(value).encode(), "application/json")

    def patients(self) -> list[str]:
        return self.get("/patients")

    def studies(self) -> list[str]:
        return self.get("/studies")

    def find_series(self, modality: str | None = "SEG", **query: str) -> list[dict[str, Any]]:
        """Series matching DICOM keywords (e.g. SeriesInstanceUID=...), expanded: each has
        "ID", "MainDicomTags", "Instances", "ParentStudy"."""
        if modality is not None:
            query = {"Modality": modality, **query}
        return self.post("/tools/find", {"Level": "Series", "Query": query, "Expand": True})

    def find_instances(self, **query: str) -> list[str]:
        """Orthanc ids of the instances matching DICOM keywords (e.g. Modality="SEG")."""
        return self.post("/tools/find", {"Level": "Instance", "Query": query})

    def wait_for_series(
        self, modality: str | None = "SEG", timeout_s: float = 30, count: int = 1, **query: str
    ) -> list[dict[str, Any]]:
        """find_series until at least `count` match; AssertionError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            series = self.find_series(modality, **query)
            if len(series) >= count:
                return series
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Orthanc has {len(series)} series {modality or ''} {query} after "
                    f"{timeout_s} s, expected {count}"
                )
            time.sleep(0.1)

    def instances_of_series(self, series_id: str) -> list[dict[str, Any]]:
        return self.get(f"/series/{series_id}/instances")

    def tags(self, instance_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def download(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")

    def upload(self, path: Path) -> dict[str, Any]:
        """POST one DICOM file; the answer has "ID" (the instance's Orthanc id) and "Status"."""
        return self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")

    def add_modality(self, name: str, ae_title: str, host: str, port: int) -> None:
        """Declare a peer at run time (ports are random), e.g. the node to route studies to."""
        self.put(f"/modalities/{name}", {"AET": ae_title, "Host": host, "Port": port})

    def store_to(self, modality: str, resource_ids: list[str]) -> dict[str, Any]:
        """Make Orthanc C-STORE resources (any level) to `modality`, synchronously. The answer
        has InstancesCount and FailedInstancesCount; OrthancError (500) if the peer refuses or
        is down."""
        return self.post(
            f"/modalities/{modality}/store", {"Resources": resource_ids, "Synchronous": True}
        )


class StoreSCP:
    """DCMTK storescp (a PACS stand-in) on a free port, writing into `directory`/received.

    storescp accepts any called AE title; for a PACS that refuses, use PynetdicomSCP, and for
    a PACS that is down, a port nobody listens on (free_port()). `options` go on its command
    line, e.g. ("+tls", KEY, CERT, "+cf", CA) for DICOM TLS.
    """

    def __init__(
        self, directory: Path, ae_title: str = "PACS", options: Sequence[str] = ()
    ) -> None:
        self.directory = Path(directory)
        self.ae_title = ae_title
        self.options = list(options)
        self.port = free_port()
        self.out = self.directory / "received"
        self.log = self.directory / "storescp.log"
        self.process: subprocess.Popen[bytes] | None = None

    def destination(self, name: str = "storescp") -> Destination:
        return Destination(name, self.ae_title, "127.0.0.1", self.port)

    def start(self) -> StoreSCP:
        binary = find_binary("storescp")
        self.out.mkdir(parents=True, exist_ok=True)
        command = [binary, "-v", "-aet", self.ae_title, "-od", str(self.out), "+xa"]
        command += ["-fe", ".dcm", *self.options, str(self.port)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV
            )
        _wait_listening(self.port, self.process, self.log, "storescp")
        return self

    def files(self) -> list[Path]:
        """Received files: CT.<uid>.dcm, SG.<uid>.dcm (storescp writes before it answers)."""
        return sorted(self.out.rglob("*.dcm"))

    def stop(self) -> None:
        _kill(self.process)
        self.process = None

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PynetdicomSCP:
    """An in-process storage SCP whose behaviour a caller sets: the C-STORE status it answers
    (e.g. 0xA700), a delay before answering, an abort instead of an answer, a rejection of any
    called AE title but its own, or fewer SOP classes and transfer syntaxes than every one.
    With a `directory` it also keeps what it receives there, as sent (the demo's PACS when
    Orthanc is not installed). Listens on a port the OS picks (no race)."""

    def __init__(
        self,
        ae_title: str = "PACS",
        *,
        status: int = 0x0000,
        delay_s: float = 0.0,
        abort: bool = False,
        require_called_aet: bool = False,
        sop_classes: Sequence[str] | None = None,
        transfer_syntaxes: Sequence[str] = ALL_TRANSFER_SYNTAXES,
        directory: Path | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.directory = directory
        self._files: list[Path] = []
        self.status = status
        self.delay_s = delay_s
        self.abort = abort
        self.require_called_aet = require_called_aet
        self.sop_classes = (
            [cx.abstract_syntax for cx in AllStoragePresentationContexts if cx.abstract_syntax]
            if sop_classes is None
            else list(sop_classes)
        )
        self.transfer_syntaxes = list(transfer_syntaxes)
        self.received: list[str] = []  # SOP instance UIDs, in order
        self.received_syntaxes: list[str] = []  # the transfer syntax each came in
        self._lock = threading.Lock()
        self._server: Any = None
        self.port = 0

    def destination(self, name: str = "scp", ae_title: str | None = None) -> Destination:
        return Destination(name, ae_title or self.ae_title, "127.0.0.1", self.port)

    def _on_store(self, event: Event) -> int | Dataset:
        with self._lock:
            # pynetdicom types the request as any DIMSE primitive; EVT_C_STORE's is a C-STORE.
            request = cast(C_STORE, event.request)
            self.received.append(str(request.AffectedSOPInstanceUID))
            self.received_syntaxes.append(str(event.context.transfer_syntax))
            if self.directory is not None:
                path = self.directory / f"{len(self._files):06d}.dcm"
                path.write_bytes(event.encoded_dataset(include_meta=True))
                self._files.append(path)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.abort:
            event.assoc.abort()
        return self.status

    def files(self) -> list[Path]:
        """The files received so far, in order (only with a `directory`)."""
        with self._lock:
            return list(self._files)

    def start(self) -> PynetdicomSCP:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class, self.transfer_syntaxes)
        ae.require_called_aet = self.require_called_aet
        self._server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> PynetdicomSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
