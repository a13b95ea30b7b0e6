"""Load benchmark: concurrent senders into one node, with and without a segmentation running;
stored once, grouped, processed, memory.

    python -m bench.load [--senders 8] [--slices 300] [--size 256] [--receive-processes 1 2]
                         [--out bench/results/load.json]

Every sender is a DCMTK storescu process (one association, TCP_NODELAY=1) sending its own
300-slice series. Two nodes, one after the other:

1. Reception alone (`complete_after_s` 600: nothing is selected or segmented meanwhile): one
   sender on its own, then eight (`--senders`) started at the same moment. Their ratio is
   what concurrent associations add on this machine.
2. The whole pipeline (`complete_after_s` 5, two inference threads): a first series is sent
   and segmented; once it is segmenting, the eight senders start together with a ninth that
   sends its own series and then sends it again. Reception, grouping by series, completion,
   selection, segmentation, SEG written (no destination configured).

Both run once for each `--receive-processes` value (`[node] receive_processes`: the daemon
alone, or with receiving processes sharing its port), on the same series.

The series are synthetic legs (two soft-tissue cylinders with a cortical ring and marrow,
noise, drifting along z), 256 x 256 pixels of 0.5 mm and 0.5 mm slices: a 128 mm field of
view, so that the worker segments each in seconds on CPU (the model resamples everything to
0.8 mm; a 512 x 512 series of a whole leg takes minutes per series there, bench/README.md).

Checked: every storescu succeeded; database instances == unique SOP Instance UIDs sent ==
spool files; each series holds exactly its slices; every series reached a final state.
Measured: reception throughput (bytes sent over the senders' wall time), time until every
series was complete and final, peak RSS of the daemon, of its receiving processes and of its
other children (the worker), sampled every 0.2 s with psutil, and the daemon's peak thread
count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from pydicom import dcmread

from bench.results_file import machine, write_result
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.node_process import NodeProcess
from dicom_node.testbed.peers import PEER_ENV
from model.volume_io import Volume

RESULTS = Path(__file__).resolve().parent / "results" / "load.json"
FINAL = {"skipped", "failed", "done", "no_findings"}
SPACING_MM = 0.5
SAMPLE_S = 0.2


def legs(seed: int, slices: int, size: int) -> np.ndarray:
    """A synthetic pair of legs in HU, different for every seed (position, drift, noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float32)
    hu = np.empty((slices, size, size), np.int16)
    phase = rng.uniform(0, 2 * np.pi)
    for k in range(slices):
        image = np.full((size, size), -1000.0, np.float32)
        for cx in (size * 0.3, size * 0.7):
            cy = size / 2 + size / 25 * np.sin(k / 60 + phase)
            r = np.hypot(x - cx, y - cy) * 256 / size
            image[r < 55] = 40
            image[r < 22] = 1200
            image[r < 15] = 100
        hu[k] = np.clip(image + rng.normal(0, 15, image.shape), -1024, 3071).astype(np.int16)
    return hu


@dataclass
class Sampler:
    """Peak RSS of a process, of its receiving processes (`receivers`' pids) and of its other
    children, and its peak thread count, in a thread."""

    pid: int
    receivers: frozenset[int] = frozenset()
    peak_daemon: int = 0
    peak_receivers: int = 0
    peak_children: int = 0
    peak_total: int = 0
    peak_threads: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        process = psutil.Process(self.pid)
        while not self._stop.wait(SAMPLE_S):
            try:
                daemon = process.memory_info().rss
                threads = process.num_threads()
                receivers = children = 0
                for child in process.children(recursive=True):
                    with contextlib.suppress(psutil.Error):  # a child that just ended
                        if child.pid in self.receivers:
                            receivers += child.memory_info().rss
                        else:
                            children += child.memory_info().rss
            except psutil.Error:
                return
            self.peak_daemon = max(self.peak_daemon, daemon)
            self.peak_receivers = max(self.peak_receivers, receivers)
            self.peak_children = max(self.peak_children, children)
            self.peak_total = max(self.peak_total, daemon + receivers + children)
            self.peak_threads = max(self.peak_threads, threads)
            self.samples += 1


def storescu(port: int, aet: str, folder: Path) -> list[str]:
    return ["storescu", "-aet", aet, "-aec", "BONESEG", "+sd", "127.0.0.1", str(port), str(folder)]


def run_sender(command: list[str], repeat: int, log: Path) -> tuple[int, float, float]:
    """storescu `repeat` times in a row; (worst exit status, seconds, perf_counter at end)."""
    start = time.perf_counter()
    worst = 0
    with log.open("ab") as out:
        for _ in range(repeat):
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=PEER_ENV)
            worst = max(worst, code.returncode)
    end = time.perf_counter()
    return worst, end - start, end


def send_together(
    port: int, jobs: list[tuple[str, Path, int]], work: Path
) -> tuple[dict[str, tuple[int, float, float]], float, list[threading.Thread]]:
    """Start one storescu thread per (AE title, folder, times to send it), all at once;
    returns their results (filled as they end), the start time and the threads."""
    results: dict[str, tuple[int, float, float]] = {}
    threads = [
        threading.Thread(
            target=lambda a=aet, f=folder, r=repeat: results.__setitem__(
                a, run_sender(storescu(port, a, f), r, work / f"{a}.log")
            )
        )
        for aet, folder, repeat in jobs
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    return results, started, threads


def receiver_pids(node: NodeProcess) -> frozenset[int]:
    return frozenset(json.loads((node.data_dir / "node.pid").read_text())["receivers"])


def reception_alone(folders: list[Path], work: Path, processes: int) -> dict[str, Any]:
    """Phase 1: the last folder sent alone, then the others together, into a node that
    segments nothing meanwhile; MB/s of each, and every instance recorded once."""
    node = NodeProcess(
        work / f"node-receive-{processes}", complete_after_s=600, receive_processes=processes
    ).start()
    assert node.process is not None
    sampler = Sampler(node.process.pid, receiver_pids(node)).start()
    rates: dict[str, Any] = {}
    try:
        for name, batch in (("one_sender", folders[-1:]), ("senders_together", folders[:-1])):
            jobs = [(f"{name[:5].upper()}{i}", folder, 1) for i, folder in enumerate(batch)]
            results, started, threads = send_together(node.port, jobs, work)
            for thread in threads:
                thread.join()
            seconds = max(end for _, _, end in results.values()) - started
            megabytes = sum(p.stat().st_size for f in batch for p in f.iterdir()) / 1e6
            assert all(code == 0 for code, _, _ in results.values()), results
            rates[name] = {"senders": len(batch), "seconds": round(seconds, 2)}
            rates[name]["mb_per_s"] = round(megabytes / seconds, 1)
            print(
                f"receive_processes {processes}, reception alone, {name}: "
                f"{megabytes / seconds:.1f} MB/s",
                flush=True,
            )
        recorded = len(node.db_instances())
        files = len(node.spool_files())
    finally:
        sampler.stop()
        node.stop()
    sent = sum(len(list(f.iterdir())) for f in folders)
    rates["together_vs_one"] = round(
        rates["senders_together"]["mb_per_s"] / rates["one_sender"]["mb_per_s"], 2
    )
    rates["peak_rss_mb"] = peak_rss(sampler)
    rates["every_instance_recorded_once"] = recorded == files == sent
    return rates


def peak_rss(sampler: Sampler) -> dict[str, int]:
    mib = 2**20
    return {
        "daemon": round(sampler.peak_daemon / mib),
        "receiving_processes": round(sampler.peak_receivers / mib),
        "worker": round(sampler.peak_children / mib),
        "total": round(sampler.peak_total / mib),
    }


def series_rows(database: Path) -> list[tuple[str, str, int, str | None]]:
    with sqlite3.connect(database) as db:
        return list(
            db.execute("SELECT series_instance_uid, state, instance_count, reason FROM series")
        )


def whole_pipeline(
    folders: list[Path], first: Path, work: Path, args: argparse.Namespace, processes: int
) -> dict[str, Any]:
    """Phase 2: the senders together while a first series segments, into a node that runs
    everything; what it took, what it checked, memory and threads."""
    sent_uids = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for folder in [*folders, first]
        for p in folder.iterdir()
    }
    megabytes = sum(p.stat().st_size for f in folders for p in f.iterdir()) / 1e6
    node = NodeProcess(
        work / f"node-{processes}", complete_after_s=5, receive_processes=processes
    ).start()
    assert node.process is not None
    sampler = Sampler(node.process.pid, receiver_pids(node)).start()
    try:
        first_uid = node.send_series(first)
        node.wait_for_db_state(first_uid, {"segmenting"}, args.timeout)
        jobs = [
            (f"SENDER{i}", folder, 2 if i == args.senders else 1)  # the re-sender: twice
            for i, folder in enumerate(folders)
        ]
        threads_at_start = psutil.Process(node.process.pid).num_threads()
        results, started, threads = send_together(node.port, jobs, work)
        segmenting_at_start = node.db_state(first_uid) == "segmenting"
        # Polled while the senders send: a series completes 5 s after its last new
        # instance, whatever the others do (the re-sent duplicates do not count).
        reception_s = complete_s = final_s = None
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            now = time.perf_counter() - started
            if reception_s is None and not any(t.is_alive() for t in threads):
                reception_s = now  # to within a poll; exact below
                print(f"received in {reception_s:.1f} s", flush=True)
            rows = series_rows(node.data_dir / "node.db")
            states = [state for _, state, _, _ in rows]
            grouped = len(rows) == len(folders) + 1
            if complete_s is None and grouped and "receiving" not in states:
                complete_s = now
            if reception_s is not None and grouped and all(s in FINAL for s in states):
                final_s = now
                break
            time.sleep(0.5)
        for thread in threads:
            thread.join()
        reception_s = max(end for _, _, end in results.values()) - started  # exact
        rows = series_rows(node.data_dir / "node.db")
        with sqlite3.connect(node.data_dir / "node.db") as db:
            recorded = {uid for (uid,) in db.execute("SELECT sop_instance_uid FROM instances")}
        spool_files = len(node.spool_files())
        threads_at_end = psutil.Process(node.process.pid).num_threads()
    finally:
        sampler.stop()
        node.stop()

    failed_senders = {i: code for i, (code, _, _) in results.items() if code != 0}
    checks = {
        "every_sender_succeeded": not failed_senders,
        "database_equals_unique_sent": recorded == sent_uids,
        "spool_files_equal_unique_sent": spool_files == len(sent_uids),
        "each_series_holds_its_slices": all(count == args.slices for _, _, count, _ in rows),
        "every_series_grouped": len(rows) == len(folders) + 1,
        "every_series_final": final_s is not None,
        "a_segmentation_ran_as_the_senders_started": segmenting_at_start,
    }
    mb_per_s = (megabytes + megabytes / len(folders)) / reception_s
    return {
        "reception_s": round(reception_s, 1),
        "mb_per_s": round(mb_per_s, 1),
        "instances_per_s": round((len(sent_uids) + args.slices) / reception_s, 1),
        "sender_seconds": {aet: round(s, 1) for aet, (_, s, _) in sorted(results.items())},
        "all_complete_s": None if complete_s is None else round(complete_s, 1),
        "all_final_s": None if final_s is None else round(final_s, 1),
        "series_states": {uid[-12:]: [state, reason] for uid, state, _, reason in rows},
        "database_instances": len(recorded),
        "spool_files": spool_files,
        "checks": checks,
        "failed_senders": failed_senders,
        "peak_rss_mb": peak_rss(sampler),
        "daemon_threads": {
            "before": threads_at_start,
            "peak": sampler.peak_threads,
            "at_end": threads_at_end,
        },
        "rss_samples": sampler.samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--receive-processes",
        type=int,
        nargs="+",
        default=[1],
        help="[node] receive_processes: the benchmark runs once for each value",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="for everything to settle")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        sys.exit("storescu not found: make system-deps installs DCMTK")

    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        folders = []
        t = time.perf_counter()
        for index in range(args.senders + 2):  # the re-sender's, then the first segmented
            hu = legs(index, args.slices, args.size)
            folder = work / f"series{index}"
            write_ct_series(
                Volume(hu, (SPACING_MM,) * 3),
                folder,
                patient=PatientInfo(f"LOAD^SERIES{index}", f"LOAD{index}"),
                uid_seed=f"bench-load-{index}",
            )
            folders.append(folder)
        print(f"wrote {len(folders)} series in {time.perf_counter() - t:.0f} s", flush=True)
        *folders, first = folders
        megabytes = sum(p.stat().st_size for f in folders for p in f.iterdir()) / 1e6
        for processes in args.receive_processes:
            alone = reception_alone(folders, work, processes)
            run = whole_pipeline(folders, first, work, args, processes)
            run["checks"]["reception_alone_recorded_once"] = alone.pop(
                "every_instance_recorded_once"
            )
            one_sender = alone["one_sender"]["mb_per_s"]
            runs[str(processes)] = {
                "reception_alone": alone,
                **run,
                "mb_per_s_vs_one_sender_alone": round(run["mb_per_s"] / one_sender, 2),
            }

    result: dict[str, Any] = {
        "benchmark": "load",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "series": {
            "concurrent_senders": args.senders + 1,
            "distinct_series": len(folders) + 1,
            "resent_series": 1,
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "spacing_mm": SPACING_MM,
            "mb_distinct": round(megabytes, 1),
            "instances_sent": (len(folders) + 2) * args.slices,
            "unique_instances": (len(folders) + 1) * args.slices,
        },
        "sender": "DCMTK storescu, one association each, all started together, TCP_NODELAY=1",
        "receive_processes": runs,
        "notes": [
            "receive_processes: [node] receive_processes, one run of everything per value on "
            "the same series (1: the daemon alone; N: the daemon and N - 1 processes sharing "
            "its port, SO_REUSEPORT)",
            "reception_alone: a node that segments nothing meanwhile; one sender on its own, "
            "then the eight together, each its own series",
            "the rest: a node running the whole pipeline; the nine senders start once a first "
            "series is segmenting (the worker a batch job for the scheduler, SCHED_BATCH)",
            "mb_per_s and instances_per_s count every instance the nine sent (the re-send "
            "included) over the wall time from the first sender's start to the last one's end",
            "all_complete_s: from the start until every series had completed (none "
            "receiving; complete_after_s is 5 s); all_final_s: until every series was done, "
            "no_findings, skipped or failed",
            "peak_rss_mb: sampled every 0.2 s; worker: the daemon's other children (the "
            "inference worker, multiprocessing's resource tracker)",
            "one run, on a machine shared with other work",
        ],
        "machine": {**machine(), "load_average": os.getloadavg()},
    }
    write_result(args.out, result)
    for processes, run in runs.items():
        keys = ("reception_alone", "mb_per_s", "mb_per_s_vs_one_sender_alone", "all_final_s")
        print(f"receive_processes {processes}: {json.dumps({k: run[k] for k in keys})}")
        print(f"checks: {run['checks']}; peak RSS {run['peak_rss_mb']}")
    print(f"written to {args.out}")
    if not all(all(run["checks"].values()) for run in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
