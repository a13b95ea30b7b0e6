"""`make demo`: the node's main job, end to end, on one machine.

A phantom lower-extremity CT series goes to a freshly started node over C-STORE, as a scanner
would send it; the node segments it and sends the SEG to a local PACS (Orthanc when it is
installed, else a small pynetdicom storage SCP); the demo fetches the SEG from the PACS,
checks it against the phantom's ground truth and writes a report and a PNG preview.

Everything runs on free loopback ports in one work folder; nothing outside it is touched.
The figures are on a synthetic phantom: they show that the pipeline works, not clinical
accuracy.

The terminal shows a progress bar per stage, read from the node's own job state, and the
report; the full log (the demo's C-STOREs and the node's, per instance) goes to `demo.log` in
the work folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import dcmread
from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dicom_node.app.config import Destination, load_config
from dicom_node.app.status import job_report
from dicom_node.imaging.codes import SEGMENTS
from dicom_node.imaging.volume.assemble import assemble_volume
from dicom_node.logs import LogFormat, formatter
from dicom_node.net.send import SendResult, send_files
from dicom_node.pipeline.state import NodeState
from dicom_node.testbed.node_process import AE_TITLE as NODE_AE
from dicom_node.testbed.node_process import NodeProcess, destination_toml
from dicom_node.testbed.peers import OrthancProcess, PynetdicomSCP
from dicom_node.testbed.phantom_series import write_phantom
from model.labels import BONE_NAMES, unsided_labels
from model.metrics import dice
from model.volume_io import read_volume

log = logging.getLogger(__name__)

PACS_AE = "DEMOPACS"
SCANNER_AE = "DEMO_CT"
PACS_NAMES = {"orthanc": "Orthanc", "scp": "pynetdicom storage SCP"}
LOG_NAME = "demo.log"  # in the work folder: the demo's log and the node's

# The demo's stages, and the node job states during which each is under way (the first three
# are the demo's own: its C-STORE of the series counts the instances the node has recorded; the
# last ends when the SEG is at the PACS).
STAGES = (
    "generating the phantom",
    "starting the PACS and the node",
    "sending to the node",
    "waiting for the series to complete",
    "segmenting",
    "sending the SEG to the PACS",
)
_STAGE_OF_STATE = {
    "receiving": 3,
    "complete": 3,
    "queued": 4,
    "segmenting": 4,
    "sending": 5,
    "done": 6,
}


class DemoProgress:
    """A progress bar per stage on stderr (rich): stdout stays the report's alone."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<36}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.tasks = [self.progress.add_task(name, start=False, total=None) for name in STAGES]
        self.stage = -1

    def __enter__(self) -> DemoProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def reach(self, stage: int) -> None:
        """Stages before `stage` are done, `stage` is under way (len(STAGES): all done)."""
        for done in range(max(self.stage, 0), min(stage, len(STAGES))):
            task = self.tasks[done]
            total = next(t.total for t in self.progress.tasks if t.id == task) or 1
            self.progress.start_task(task)
            self.progress.update(task, total=total, completed=total)
        if self.stage < stage < len(STAGES):
            self.progress.start_task(self.tasks[stage])
        self.stage = max(self.stage, stage)

    def state(self, node_state: str | None) -> None:
        """The node's job is in `node_state`."""
        if node_state in _STAGE_OF_STATE:
            self.reach(_STAGE_OF_STATE[node_state])

    def sent(self, instances: int, total: int) -> None:
        self.progress.update(self.tasks[2], completed=instances, total=total)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """The root logger writes to `path` alone while the demo runs (pynetdicom's per-instance
    lines among them), in the node's text format; its handlers are back afterwards."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    handler = logging.FileHandler(path)
    handler.setFormatter(formatter(LogFormat.TEXT, "demo"))
    for old in handlers:
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for old in handlers:
            root.addHandler(old)


def start_pacs(kind: str, directory: Path) -> OrthancProcess | PynetdicomSCP:
    """The receiving PACS: Orthanc ("orthanc") or an in-process storage SCP ("scp") that
    keeps what it receives in `directory`."""
    if kind == "orthanc":
        orthanc = OrthancProcess(directory, ae_title=PACS_AE, config={"Name": "DICOM-NODE-DEMO"})
        return orthanc.start()
    return PynetdicomSCP(PACS_AE, directory=directory).start()


def seg_files(pacs: OrthancProcess | PynetdicomSCP, study_uid: str, out_dir: Path) -> list[Path]:
    """The SEG instances in `study_uid` the PACS holds, as files (Orthanc's downloaded into
    `out_dir`)."""
    if isinstance(pacs, OrthancProcess):
        paths = []
        for instance_id in pacs.find_instances(Modality="SEG", StudyInstanceUID=study_uid):
            path = out_dir / f"seg-{instance_id}.dcm"
            path.write_bytes(pacs.download(instance_id))
            paths.append(path)
        return paths
    headers = [(path, dcmread(path, stop_before_pixels=True)) for path in pacs.files()]
    return [p for p, ds in headers if ds.StudyInstanceUID == study_uid and ds.Modality == "SEG"]


class NodeJobs:
    """The node's jobs, read from its state database as `dicom-node job` reads them."""

    def __init__(self, node: NodeProcess) -> None:
        self.state = NodeState(load_config(node.config).node.database_url)

    def job(self, series_uid: str) -> dict[str, Any] | None:
        """The node's job for `series_uid`, from its state database (as `dicom-node job`)."""
        match = [s.id for s in self.state.jobs(limit=100) if s.series_instance_uid == series_uid]
        return job_report(self.state, match[0]) if match else None

    def close(self) -> None:
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


def phantom_region(size: str, region: str | None) -> str | None:
    """The region of the demo's phantom: `size` "full" is the whole-leg phantom (hips to
    feet, 512x512 pixels a slice) unless another region is asked for; a small one's joint is
    drawn from the seed unless asked for."""
    return region or ("whole_legs" if size == "full" else None)


def run_demo(
    workdir: Path,
    seed: int = 1003,
    size: str = "small",
    region: str | None = None,
    threads: int = 0,
    pacs_kind: str = "auto",
    spacing: tuple[float, float, float] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo in `workdir` and return its report (also written as report.json).

    `pacs_kind`: "orthanc", "scp" (the built-in storage SCP) or "auto" (Orthanc if installed).
    `spacing`: the phantom's (x, y, z) voxel size in mm; None draws it from the seed.
    `console`: where the progress bars go (default stderr); the log goes to workdir/demo.log.
    """
    if pacs_kind not in ("auto", "orthanc", "scp"):
        raise ValueError(f"pacs_kind: expected auto, orthanc or scp, got {pacs_kind!r}")
    region = phantom_region(size, region)
    if pacs_kind == "auto":
        pacs_kind = "orthanc" if shutil.which("Orthanc") else "scp"
    if pacs_kind == "orthanc" and not shutil.which("Orthanc"):
        raise RuntimeError("Orthanc is not installed (apt install orthanc, or make system-deps)")
    workdir.mkdir(parents=True, exist_ok=True)
    console = console or Console(stderr=True)
    console.print(f"dicom-node demo in {workdir}; the full log: {workdir / LOG_NAME}")
    with log_to_file(workdir / LOG_NAME), DemoProgress(console) as progress:
        return _run(workdir, seed, size, region, threads, pacs_kind, spacing, progress)


def _send(target: Destination, files: list[Path]) -> tuple[SendResult, float]:
    """The series to the node as a scanner sends it, on one association; and its seconds."""
    start = time.perf_counter()
    return send_files(target, files, SCANNER_AE, timeout_s=60), time.perf_counter() - start


def _run(
    workdir: Path,
    seed: int,
    size: str,
    region: str | None,
    threads: int,
    pacs_kind: str,
    spacing: tuple[float, float, float] | None,
    progress: DemoProgress,
) -> dict[str, Any]:
    progress.reach(0)
    t0 = time.perf_counter()
    phantom = write_phantom(
        workdir / "phantom", seed=seed, size=size, spacing=spacing, region=region
    )
    generate_s = time.perf_counter() - t0
    ct_files = sorted(phantom["ct"].iterdir())
    first = dcmread(ct_files[0], stop_before_pixels=True)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    progress.reach(1)
    pacs = start_pacs(pacs_kind, workdir / "pacs")
    node = jobs = None
    try:
        node = NodeProcess(
            workdir / "node",
            complete_after_s=2,
            extra_config=destination_toml(pacs.destination("pacs")),
            threads=threads,
        )
        node.log = workdir / LOG_NAME  # beside the demo's own lines
        node.start(timeout_s=120)
        jobs = NodeJobs(node)
        target = Destination("node", NODE_AE, "127.0.0.1", node.port)
        progress.reach(2)
        sent_at = time.perf_counter()
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(_send, target, ct_files)
            while not sending.done():
                job = jobs.job(series_uid)
                progress.sent(job["instances"] if job else 0, len(ct_files))
                time.sleep(0.2)
            sent, sent_s = sending.result()
        if not sent.delivered:
            raise RuntimeError(f"sending the series to the node failed: {sent.reason}")
        progress.sent(len(ct_files), len(ct_files))
        progress.reach(3)
        deadline = time.monotonic() + 3600
        while not (segs := seg_files(pacs, study_uid, workdir)):
            job = jobs.job(series_uid)
            if job is not None and job["state"] in ("failed", "no_findings", "skipped"):
                raise RuntimeError(f"the node ended the series as {job['state']}: {job['reason']}")
            progress.state(job["state"] if job else None)
            exited = node.process is None or node.process.poll() is not None
            if time.monotonic() > deadline or exited:
                raise RuntimeError(f"no SEG at the PACS; see {node.log}")
            time.sleep(0.2)
        arrived_at = time.perf_counter()
        progress.reach(len(STAGES))
        job = jobs.job(series_uid)
        assert job is not None
        while job["state"] != "done":  # the PACS answered; the node records it a moment later
            time.sleep(0.1)
            job = jobs.job(series_uid) or job
    finally:
        if node is not None:
            node.stop()
        if jobs is not None:
            jobs.close()
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
        "pacs": PACS_NAMES[pacs_kind],
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
        # The measurements drawn on the CT, as the node wrote them (in its data directory).
        "key_image": (job["result"] or {}).get("key_image"),
    }
    write_preview(assembled.volume.array, sided, assembled.volume.spacing, workdir / "preview.png")
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def render_report(report: dict[str, Any], workdir: Path) -> Group:
    """The demo's report for people: the SEG at the PACS, its segments with volume and Dice,
    timings per stage, and where the preview, the key image and report.json are."""
    seg = report["seg"]
    table = Table(title="segments (Dice vs the phantom's truth, per bone)", title_justify="left")
    for column in ("segment", "volume (ml)", "Dice"):
        table.add_column(column)
    dices = report["dice_vs_phantom_truth"]
    for s in report["segments"]:
        bone = s["segment"].split(" ", 1)[1]
        table.add_row(s["segment"], f"{s['volume_ml']:.1f}", f"{dices.get(bone, 0):.3f}")
    timings = ", ".join(f"{k[:-2]} {v}" for k, v in report["timings_s"].items())
    key_image = f"key image: {report['key_image']}\n" if report.get("key_image") else ""
    return Group(
        f"SEG {seg['sop_instance_uid']} arrived at the PACS ({report['pacs']}): same study "
        f"{seg['same_study']}, same patient {seg['same_patient']}",
        table,
        f"any bone vs background: Dice {report['any_bone_dice']:.3f}",
        f"timings (s): {timings}",
        f"preview: {report['preview']}\n{key_image}report: {workdir / 'report.json'}\n"
        f"log (the demo's and the node's): {workdir / LOG_NAME}",
        "Synthetic phantom: these figures show the pipeline works, not clinical accuracy.",
    )
