"""Reception benchmark: the node against DCMTK storescp, same series, same sender, same disk.

    python -m bench.reception [--slices 1000] [--size 512] [--out bench/results/reception.json]

One CT series (random int16 HU, written by `dicom_node.ct_series.write_ct_series`) is sent by
DCMTK storescu over loopback in one association to each receiver in turn, both writing every
instance to disk; the figure is series bytes / storescu wall time. Not the same work: the node
fsyncs every file and its directory before it answers (durability the sender relies on) and
records every instance in SQLite right behind the answer, storescp only writes. The maximum
PDU size each receiver announces is varied as well, because it sets how the sender fragments
every instance.
One run each, on a shared machine: read the figures as indicative, not as a distribution.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pynetdicom import evt

from bench.results_file import machine, write_result
from dicom_node.app.config import NodeConfig
from dicom_node.net.receive import build_ae
from dicom_node.pipeline.spool import Spool
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.peers import PEER_ENV, free_port
from model.volume_io import Volume

RESULTS = Path(__file__).resolve().parent / "results" / "reception.json"
ENV = PEER_ENV  # Debian's DCMTK leaves Nagle on otherwise
STORESCU_MAX_PDU = 131072  # the largest PDU DCMTK sends or receives


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"receiver on port {port} did not start") from None
            time.sleep(0.05)


def send(series: Path, port: int, called_ae: str) -> float:
    """storescu wall time for the whole folder, one association."""
    start = time.perf_counter()
    subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", called_ae, "+sd", "127.0.0.1", str(port), series],
        check=True,
        env=ENV,
        capture_output=True,
    )
    return time.perf_counter() - start


def run_storescp(series: Path, work: Path, max_pdu: int) -> float:
    out = work / f"storescp-{max_pdu}"
    out.mkdir()
    port = free_port()
    command = ["storescp", "-aet", "PACS", "-od", out, "-fe", ".dcm", "-pdu", str(max_pdu)]
    process = subprocess.Popen([*command, str(port)], env=ENV)
    try:
        wait_listening(port, process)
        seconds = send(series, port, "PACS")
    finally:
        process.terminate()
        process.wait(timeout=30)
    received = len(list(out.iterdir()))
    expected = len(list(series.iterdir()))
    if received != expected:
        raise RuntimeError(f"storescp stored {received} of {expected} files")
    return seconds


def run_node(series: Path, work: Path, max_pdu: int) -> float:
    directory = work / f"node-{max_pdu}"
    directory.mkdir()
    port = free_port()
    config = directory / "config.toml"
    config.write_text(
        f'[node]\nport = {port}\ndata_dir = "data"\nmax_pdu_size = {max_pdu}\n'
        "[series]\ncomplete_after_s = 600\n"  # no selection during the transfer
    )
    command = [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process)
        seconds = send(series, port, "BONESEG")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    with sqlite3.connect(directory / "data" / "node.db") as db:
        (received,) = db.execute("SELECT count(*) FROM instances").fetchone()
    expected = len(list(series.iterdir()))
    if received != expected:
        raise RuntimeError(f"the node recorded {received} of {expected} instances")
    return seconds


def run_pynetdicom_discarding(series: Path, work: Path, max_pdu: int) -> float:
    """pynetdicom answering success without storing: the network layer's own ceiling."""
    ae = build_ae(NodeConfig(ae_title="NULL", max_pdu_size=max_pdu))  # the node's contexts
    port = free_port()
    handlers = [(evt.EVT_C_STORE, lambda event: 0x0000)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        return send(series, port, "NULL")
    finally:
        server.shutdown()


def spool_seconds_per_instance(series: Path, work: Path) -> float:
    """The node's durable write alone (temp file, fsync, rename, directory fsync), no network."""
    spool = Spool(work / "spool-floor")
    files = sorted(series.iterdir())
    start = time.perf_counter()
    for path in files:
        spool.write([path.read_bytes()])
    return (time.perf_counter() - start) / len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-reception-") as tmp:
        work = Path(tmp)
        rng = np.random.default_rng(0)
        hu = rng.integers(-1024, 3072, (args.slices, args.size, args.size), dtype=np.int16)
        series = work / "series"
        write_ct_series(
            Volume(hu, (0.8, 0.8, 1.0)), series, patient=PatientInfo("BENCH^SERIES", "BENCH")
        )
        megabytes = sum(p.stat().st_size for p in series.iterdir()) / 1e6
        # (receiver, PDU size it announces): DCMTK's largest, then both libraries' defaults.
        plan = [
            ("storescp", STORESCU_MAX_PDU, run_storescp),
            ("node", 0, run_node),  # 0: no limit, so storescu sends its largest (128 KiB)
            ("storescp", 16384, run_storescp),  # storescp's default
            ("node", 16382, run_node),  # pynetdicom's default
            ("pynetdicom, not storing", 0, run_pynetdicom_discarding),
        ]
        runs = []
        for receiver, max_pdu, run in plan:
            seconds = run(series, work, max_pdu)
            runs.append(
                {
                    "receiver": receiver,
                    "max_pdu_size": max_pdu,
                    "seconds": round(seconds, 2),
                    "mb_per_s": round(megabytes / seconds, 1),
                }
            )
            rate = megabytes / seconds
            print(f"{receiver:24s} max PDU {max_pdu:6d}: {seconds:6.2f} s, {rate:.1f} MB/s")
        spool_ms = spool_seconds_per_instance(series, work) * 1000
        print(f"node's durable write alone: {spool_ms:.1f} ms per instance")

    ratio = runs[1]["mb_per_s"] / runs[0]["mb_per_s"]
    result = {
        "benchmark": "reception",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "series": {
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "mb": round(megabytes, 1),
        },
        "sender": "DCMTK storescu, one association, loopback, TCP_NODELAY=1",
        "runs": runs,
        "node_vs_storescp": round(ratio, 2),
        "spool_write_ms_per_instance": round(spool_ms, 2),
        "target": 0.5,
        "notes": [
            "node: temp file + fsync + rename + directory fsync per instance before success, "
            "its SQLite record committed by one thread behind the answer (all of an "
            "association's before its release is answered); storescp: plain write, no fsync",
            "node_vs_storescp compares the first two runs (both with 128 KiB PDUs on the wire)",
            "'pynetdicom, not storing' answers success without writing: the ceiling of the "
            "network library the node is built on",
            "spool_write_ms_per_instance: the node's temp-write + fsync + rename + directory "
            "fsync of one instance, without network or database",
            "one run each on a shared machine",
        ],
        "machine": {**machine(), "load_average": os.getloadavg()},
    }
    write_result(args.out, result)
    print(f"node / storescp = {ratio:.2f} (target >= 0.5); written to {args.out}")


if __name__ == "__main__":
    main()
