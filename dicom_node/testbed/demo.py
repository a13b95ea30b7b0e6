"""`make demo`: the node's main job, end to end, on one machine.

A phantom lower-extremity CT series goes to a freshly started node over C-STORE, as a scanner
would send it; the node segments it and sends the SEG to a local PACS (Orthanc when it is
installed, else a small pynetdicom storage SCP); the demo fetches the SEG from the PACS,
checks it against the phantom's ground truth and writes a report and a PNG preview.

Everything runs on free loopback ports in one work folder; nothing outside it is touched.
The figures are on a synthetic phantom: they show that the pipeline works, not clinical
accuracy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from rich.console import Group
from rich.table import Table

from dicom_node.app.config import Destination, load_config
from dicom_node.app.status import job_report
from dicom_node.imaging.codes import SEGMENTS
from dicom_node.imaging.volume.assemble import assemble_volume
from dicom_node.net.send import send_files
from dicom_node.pipeline.state import NodeState
from dicom_node.testbed.phantom_series import write_phantom
from model.labels import BONE_NAMES, unsided_labels
from model.metrics import dice
from model.volume_io import read_volume

log = logging.getLogger(__name__)

NODE_AE = "BONESEG"
PACS_AE = "DEMOPACS"
SCANNER_AE = "DEMO_CT"
# DCMTK and Orthanc from Debian leave Nagle on: every round trip waits ~40 ms without this.
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def orthanc_config(directory: Path, dicom_port: int, http_port: int, ae_title: str) -> dict:
    """An Orthanc 1.10 configuration for a throw-away local PACS in `directory`.

    Orthanc 1.10 cannot bind to loopback only; RemoteAccessAllowed false keeps its REST API
    to local clients, and C-STORE is accepted from anyone (it is a demo/test PACS)."""
    return {
        "Name": "DICOM-NODE-DEMO",
        "StorageDirectory": str(directory / "db"),
        "IndexDirectory": str(directory / "db"),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {},
        "SaveJobs": False,
        "DicomAssociationCloseDelay": 0,
    }


class OrthancPacs:
    """Orthanc as the receiving PACS; SEGs are found through its REST API."""

    name = "Orthanc"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port, self.http_port = free_port(), free_port()
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "orthanc.json"
        config.write_text(json.dumps(orthanc_config(directory, self.port, self.http_port, PACS_AE)))
        with (directory / "orthanc.log").open("ab") as log_file:
            self.process = subprocess.Popen(
                [str(shutil.which("Orthanc")), "--no-jobs", str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=PEER_ENV,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                self._rest("GET", "/system")
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start; see {directory}") from None
                time.sleep(0.1)
        _wait_for_port(self.port)

    @property
    def destination(self) -> Destination:
        return Destination("pacs", PACS_AE, "127.0.0.1", self.port)

    def _rest(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            content = response.read()
            if response.headers.get("Content-Type", "").startswith("application/json"):
                return json.loads(content)
            return content

    def seg_files(self, study_uid: str, out_dir: Path) -> list[Path]:
        """The SEG instances in `study_uid`, downloaded into `out_dir`."""
        query = {"Modality": "SEG", "StudyInstanceUID": study_uid}
        found = self._rest("POST", "/tools/find", {"Level": "Instance", "Query": query})
        paths = []
        for instance_id in found:
            path = out_dir / f"seg-{instance_id}.dcm"
            path.write_bytes(self._rest("GET", f"/instances/{instance_id}/file"))
            paths.append(path)
        return paths

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)  # SIGTERM takes Orthanc seconds
            self.process.wait(10)


class ScpPacs:
    """A minimal storage SCP (pynetdicom) as the PACS when Orthanc is not installed."""

    name = "pynetdicom storage SCP"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._lock = threading.Lock()
        self._received: list[tuple[str, Path]] = []  # (study UID, file)
        ae = AE(ae_title=PACS_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    @property
    def destination(self) -> Destination:
        return Destination("pacs", PACS_AE, "127.0.0.1", self.port)

    def _store(self, event: Event) -> int:
        dataset: Dataset = event.dataset
        dataset.file_meta = event.file_meta
        path = self.directory / f"{len(self._received):06d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        with self._lock:
            self._received.append((str(dataset.get("StudyInstanceUID", "")), path))
        return 0x0000

    def seg_files(self, study_uid: str, out_dir: Path) -> list[Path]:
        with self._lock:
            paths = [p for uid, p in self._received if uid == study_uid]
        return [p for p in paths if dcmread(p, stop_before_pixels=True).Modality == "SEG"]

    def stop(self) -> None:
        self.server.shutdown()


def _wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


@dataclass
class NodeUnderDemo:
    """`dicom-node serve` as a process with its own config and data folder."""

    directory: Path
    pacs: Destination
    threads: int

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = self.directory / "config.toml"
        self.config.write_text(
            f'[node]\nae_title = "{NODE_AE}"\nport = {self.port}\ndata_dir = "data"\n'
            f"[series]\ncomplete_after_s = 2\n"
            f"[inference]\nthreads = {self.threads}\n"
            f'[[destinations]]\nname = "{self.pacs.name}"\nae_title = "{self.pacs.ae_title}"\n'
            f'host = "{self.pacs.host}"\nport = {self.pacs.port}\n'
        )
        with (self.directory / "node.log").open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "serve", "--config", str(self.config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        pid_file = self.directory / "data" / "node.pid"
        deadline = time.monotonic() + 120
        while not pid_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the node did not start; see {self.directory / 'node.log'}")
            time.sleep(0.1)

        self.state = NodeState(load_config(self.config).node.database_url)

    def job(self, series_uid: str) -> dict[str, Any] | None:
        """The node's job for `series_uid`, from its state database (as `dicom-node job`)."""
        match = [s.id for s in self.state.jobs(limit=100) if s.series_instance_uid == series_uid]
        return job_report(self.state, match[0]) if match else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if hasattr(self, "state"):  # not when the node failed to start
            self.state.close()


def seg_sided_labels(seg_path: Path, source_uids: list[str]) -> np.ndarray:
    """A SEG read back as a sided label map (0, 1..12) on the given source slices, in order:
    what a viewer overlays on each source image."""
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(source_uids, combine_segments=True)
    by_label = {d.label.lower(): value for value, d in SEGMENTS.items()}
    labels = np.zeros(pixels.shape, np.uint8)
    for number in seg.segment_numbers:
        label = seg.get_segment_description(number).segment_label.lower()
        labels[pixels == number] = by_label[label]
    return labels


def write_preview(
    hu: np.ndarray, sided: np.ndarray, spacing: tuple[float, ...], path: Path
) -> None:
    """Coronal and sagittal views through the segmented bone, the SEG in its colours.

    hu and sided are (z, y, x) with z increasing towards the head; spacing is (x, y, z) mm.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = sided > 0
    centre = (
        np.argwhere(mask).mean(axis=0).round().astype(int)
        if mask.any()
        else np.array(hu.shape) // 2
    )
    colours = np.zeros((2 * len(BONE_NAMES) + 1, 4))
    for value, definition in SEGMENTS.items():
        colours[value] = (*(c / 255 for c in definition.rgb), 0.55)
    sx, sy, sz = spacing
    views = {
        "coronal": (hu[:, centre[1], :], sided[:, centre[1], :], sz / sx),
        "sagittal": (hu[:, :, centre[2]], sided[:, :, centre[2]], sz / sy),
    }
    figure, axes = plt.subplots(1, 2, figsize=(10, 6), facecolor="black")
    for axis, (title, (image, labels, aspect)) in zip(axes, views.items(), strict=True):
        axis.imshow(image, cmap="gray", vmin=-200, vmax=1500, origin="lower", aspect=aspect)
        axis.imshow(colours[labels], origin="lower", aspect=aspect, interpolation="nearest")
        axis.set_title(title, color="white")
        axis.axis("off")
    present = [SEGMENTS[v] for v in np.unique(sided) if v]
    handles = [plt.Rectangle((0, 0), 1, 1, color=tuple(c / 255 for c in d.rgb)) for d in present]
    figure.legend(handles, [d.label for d in present], loc="lower center", ncol=4)
    figure.suptitle("dicom-node SEG on a synthetic phantom (not clinical data)", color="white")
    figure.savefig(path, dpi=100, facecolor="black")
    plt.close(figure)


def _stage_timings(job: dict[str, Any], sent_s: float, arrived_at: float, sent_at: float) -> dict:
    """Seconds per stage, from the demo's clock and the node's own job timeline."""

    def at(state: str) -> datetime:
        return datetime.fromisoformat(next(t["at"] for t in job["timeline"] if t["to"] == state))

    result_timings = job["result"]["timings_s"]
    return {
        "receive_s": round(sent_s, 2),
        "complete_wait_s": round((at("complete") - at("receiving")).total_seconds() - sent_s, 2),
        "queue_s": round((at("segmenting") - at("queued")).total_seconds(), 2),
        "assemble_s": result_timings["assemble_s"],
        "segment_s": result_timings["segment_s"],
        "seg_encode_s": result_timings["seg_encode_s"],
        "send_s": round((at("done") - at("sending")).total_seconds(), 2),
        "total_s": round(arrived_at - sent_at, 2),
    }


def run_demo(
    workdir: Path,
    seed: int = 1003,
    size: str = "small",
    region: str | None = None,
    threads: int = 0,
    pacs_kind: str = "auto",
    spacing: tuple[float, float, float] | None = None,
) -> dict[str, Any]:
    """Run the demo in `workdir` and return its report (also written as report.json).

    `pacs_kind`: "orthanc", "scp" (the built-in storage SCP) or "auto" (Orthanc if installed).
    `spacing`: the phantom's (x, y, z) voxel size in mm; None draws it from the seed.
    """
    if pacs_kind not in ("auto", "orthanc", "scp"):
        raise ValueError(f"pacs_kind: expected auto, orthanc or scp, got {pacs_kind!r}")
    if pacs_kind == "auto":
        pacs_kind = "orthanc" if shutil.which("Orthanc") else "scp"
    if pacs_kind == "orthanc" and not shutil.which("Orthanc"):
        raise RuntimeError("Orthanc is not installed (apt install orthanc, or make system-deps)")
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    phantom = write_phantom(
        workdir / "phantom", seed=seed, size=size, spacing=spacing, region=region
    )
    generate_s = time.perf_counter() - t0
    ct_files = sorted(phantom["ct"].iterdir())
    first = dcmread(ct_files[0], stop_before_pixels=True)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)

    pacs: OrthancPacs | ScpPacs = (
        OrthancPacs(workdir / "pacs") if pacs_kind == "orthanc" else ScpPacs(workdir / "pacs")
    )
    node = None
    try:
        node = NodeUnderDemo(workdir / "node", pacs.destination, threads)
        target = Destination("node", NODE_AE, "127.0.0.1", node.port)
        sent_at = time.perf_counter()
        sent = send_files(target, ct_files, SCANNER_AE, timeout_s=60)
        sent_s = time.perf_counter() - sent_at
        if not sent.delivered:
            raise RuntimeError(f"sending the series to the node failed: {sent.reason}")
        deadline = time.monotonic() + 3600
        while not (segs := pacs.seg_files(study_uid, workdir)):
            job = node.job(series_uid)
            if job is not None and job["state"] in ("failed", "no_findings", "skipped"):
                raise RuntimeError(f"the node ended the series as {job['state']}: {job['reason']}")
            if time.monotonic() > deadline or node.process.poll() is not None:
                raise RuntimeError(f"no SEG at the PACS; see {node.directory / 'node.log'}")
            time.sleep(0.2)
        arrived_at = time.perf_counter()
        job = node.job(series_uid)
        assert job is not None
        while job["state"] != "done":  # the PACS answered; the node records it a moment later
            time.sleep(0.1)
            job = node.job(series_uid) or job
    finally:
        if node is not None:
            node.stop()
        pacs.stop()

    (seg_path,) = segs
    seg_copy = workdir / "seg.dcm"
    shutil.copyfile(seg_path, seg_copy)
    assembled = assemble_volume([phantom["ct"]])
    source_uids = [f.sop_instance_uid for f in assembled.frames]
    sided = seg_sided_labels(seg_copy, source_uids)
    truth = read_volume(phantom["labels"]).array  # on the series grid, slices in z order
    seg = dcmread(seg_copy, stop_before_pixels=True)
    voxel_ml = float(np.prod(assembled.volume.spacing)) / 1000
    bones = unsided_labels(sided)
    report = {
        "phantom": {"seed": seed, "size": size, "region": region, "slices": len(ct_files)},
        "pacs": pacs.name,
        "seg": {
            "file": str(seg_copy),
            "sop_instance_uid": str(seg.SOPInstanceUID),
            "same_study": str(seg.StudyInstanceUID) == study_uid,
            "same_patient": str(seg.PatientID) == str(first.PatientID),
            "algorithm": f"{seg.SegmentSequence[0].SegmentAlgorithmName}",
        },
        "segments": [
            {"segment": SEGMENTS[int(v)].label, "volume_ml": round(float(n) * voxel_ml, 1)}
            for v, n in zip(*np.unique(sided[sided > 0], return_counts=True), strict=True)
        ],
        "dice_vs_phantom_truth": {
            name: round(dice(bones == bone, truth == bone), 3)
            for bone, name in BONE_NAMES.items()
            if (truth == bone).any() or (bones == bone).any()
        },
        "any_bone_dice": round(dice(bones > 0, truth > 0), 3),
        "timings_s": {"generate_phantom_s": round(generate_s, 2)}
        | _stage_timings(job, sent_s, arrived_at, sent_at),
        "preview": str(workdir / "preview.png"),
    }
    write_preview(assembled.volume.array, sided, assembled.volume.spacing, workdir / "preview.png")
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def render_report(report: dict[str, Any], workdir: Path) -> Group:
    """The demo's report for people: the SEG at the PACS, its segments with volume and Dice,
    timings per stage, and where the preview and report.json are."""
    seg = report["seg"]
    table = Table(title="segments (Dice vs the phantom's truth, per bone)", title_justify="left")
    for column in ("segment", "volume (ml)", "Dice"):
        table.add_column(column)
    dices = report["dice_vs_phantom_truth"]
    for s in report["segments"]:
        bone = s["segment"].split(" ", 1)[1]
        table.add_row(s["segment"], f"{s['volume_ml']:.1f}", f"{dices.get(bone, 0):.3f}")
    timings = ", ".join(f"{k[:-2]} {v}" for k, v in report["timings_s"].items())
    return Group(
        f"SEG {seg['sop_instance_uid']} arrived at the PACS ({report['pacs']}): same study "
        f"{seg['same_study']}, same patient {seg['same_patient']}",
        table,
        f"any bone vs background: Dice {report['any_bone_dice']:.3f}",
        f"timings (s): {timings}",
        f"preview: {report['preview']}\nreport: {workdir / 'report.json'}",
        "Synthetic phantom: these figures show the pipeline works, not clinical accuracy.",
    )
