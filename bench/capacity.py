"""Capacity model: scans per hour per worker and per reception node, and a simulated day of 100
hospitals on clusters of several sizes, from the service times the other benchmarks measured.

    python -m bench.capacity [--hospitals 100] [--scans-per-hospital 20] [--seed 1]
                             [--out bench/results/capacity.json]

Service times come from `results/inference.json` (segmentation of the full phantom and of its
200-slice slab: a line through both gives seconds per slice), `results/end_to_end.json`
(assembly, SEG encoding and delivery of the full scan, per slice) and
`results/reception.json` (the node's rate on one association). GPU workers have no
measurement here (no GPU on the development machine): their inference is estimated at
`GPU_INFERENCE_SPEEDUP` times the CPU's, the rest of their work as on the CPU, and marked as
an estimate in the output.

The day: each hospital sends `scans_per_hospital` lower-extremity CTs, spread over the hours
by `HOURLY_PROFILE` (Poisson arrivals), of the sizes in `SCAN_MIX`. Each scan is received by
the reception node that is free first (its associations share the node: `load.json` found
eight concurrent senders no faster together than one), waits `complete_after_s`, queues for
the first free worker (FIFO), is segmented and delivered. Latency: from the first instance
sent to the SEG at the PACS. Simulated, not measured: the queueing follows from the measured
service times and the assumed arrivals.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.results_file import write_result

RESULTS_DIR = Path(__file__).resolve().parent / "results"
OUT = RESULTS_DIR / "capacity.json"

MB_PER_SLICE = 0.525  # 512 x 512 x 16 bits and the header: 730 MB for the 1442-slice phantom
COMPLETE_AFTER_S = 20.0  # [series] complete_after_s, the default
GPU_INFERENCE_SPEEDUP = 10.0  # an assumption, not a measurement (bench/gpu.sh measures it)
# Share of the day's scans arriving in each hour (0-23): a working day with a lunch dip, an
# evening tail and a trickle at night (emergencies).
HOURLY_PROFILE = [0.5, 0.3, 0.3, 0.3, 0.3, 0.5, 1, 3, 8, 10, 10, 9, 6, 8, 10, 10, 8, 5, 3, 2]
HOURLY_PROFILE += [1.5, 1, 1, 0.7]


@dataclass(frozen=True)
class Protocol:
    name: str
    share: float  # of the day's scans
    slices: int  # at 0.5-0.8 mm


SCAN_MIX = (
    Protocol("knee", 0.35, 400),
    Protocol("hip", 0.25, 500),
    Protocol("ankle", 0.20, 300),
    Protocol("whole legs (alignment)", 0.20, 1442),
)


@dataclass(frozen=True)
class ServiceTimes:
    """Seconds per scan of `slices`: fixed + per_slice x slices, per stage."""

    segment_fixed_s: float
    segment_per_slice_s: float
    inference_share: float  # of segment time: the network itself (the rest is CPU work)
    other_per_slice_s: float  # assembly, SEG encoding, delivery
    reception_mb_per_s: float

    def cpu_worker_s(self, slices: int) -> float:
        segment = self.segment_fixed_s + self.segment_per_slice_s * slices
        return segment + self.other_per_slice_s * slices

    def gpu_worker_s(self, slices: int) -> float:
        """An estimate: the network's part `GPU_INFERENCE_SPEEDUP` times faster."""
        segment = self.segment_fixed_s + self.segment_per_slice_s * slices
        inference = segment * self.inference_share
        return (
            segment
            - inference
            + inference / GPU_INFERENCE_SPEEDUP
            + (self.other_per_slice_s * slices)
        )

    def reception_s(self, slices: int) -> float:
        return slices * MB_PER_SLICE / self.reception_mb_per_s


def measured_service_times() -> tuple[ServiceTimes, dict[str, Any]]:
    """The service-time model and where each figure came from."""
    inference = json.loads((RESULTS_DIR / "inference.json").read_text())
    end_to_end = json.loads((RESULTS_DIR / "end_to_end.json").read_text())
    reception = json.loads((RESULTS_DIR / "reception.json").read_text())
    full, slab = inference["full_fast"], inference["slab"]["fast"]
    full_slices, slab_slices = full["shape_zyx"][0], slab["shape_zyx"][0]
    per_slice = (full["segment_s"] - slab["segment_s"]) / (full_slices - slab_slices)
    fixed = full["segment_s"] - per_slice * full_slices
    timings = full["timings_s"]
    e2e = end_to_end["timings_s"]
    e2e_slices = end_to_end["phantom"]["slices"]
    other = (e2e["assemble_s"] + e2e["seg_encode_s"] + e2e["send_s"]) / e2e_slices
    node_runs = [run for run in reception["runs"] if run["receiver"] == "node"]
    times = ServiceTimes(
        segment_fixed_s=round(fixed, 3),
        segment_per_slice_s=round(per_slice, 5),
        inference_share=round(timings["inference_s"] / timings["total_s"], 3),
        other_per_slice_s=round(other, 5),
        reception_mb_per_s=node_runs[0]["mb_per_s"],
    )
    sources = {
        "segment": f"inference.json full_fast ({full_slices} slices, {full['segment_s']} s) "
        f"and slab ({slab_slices} slices, {slab['segment_s']} s), {full['device']}, "
        f"{full.get('torch_threads')} threads",
        "other": f"end_to_end.json assemble_s + seg_encode_s + send_s of {e2e_slices} slices",
        "reception": f"reception.json, the node on one association ({reception['date']})",
        "gpu": f"estimate: inference {GPU_INFERENCE_SPEEDUP:g}x the CPU's, the rest as on the CPU",
    }
    return times, sources


@dataclass(frozen=True)
class Scan:
    arrival_s: float
    protocol: Protocol


def day_of_scans(hospitals: int, per_hospital: int, rng: random.Random) -> list[Scan]:
    total_weight = sum(HOURLY_PROFILE)
    scans = []
    for hour, weight in enumerate(HOURLY_PROFILE):
        expected = hospitals * per_hospital * weight / total_weight
        count = _poisson(expected, rng)
        for _ in range(count):
            protocol = rng.choices(SCAN_MIX, [p.share for p in SCAN_MIX])[0]
            scans.append(Scan(hour * 3600 + rng.uniform(0, 3600), protocol))
    return sorted(scans, key=lambda scan: scan.arrival_s)


def _poisson(mean: float, rng: random.Random) -> int:
    """Knuth's method, by parts so that large means do not underflow."""
    count, remaining = 0, mean
    while remaining > 0:
        step = min(remaining, 30.0)
        remaining -= step
        limit, product = pow(2.718281828459045, -step), rng.random()
        while product > limit:
            count += 1
            product *= rng.random()
    return count


def simulate(
    scans: list[Scan], times: ServiceTimes, reception_nodes: int, cpu: int, gpu: int
) -> dict[str, Any]:
    """Reception (first free node), the completion wait, then the first free worker (FIFO)."""
    nodes = [0.0] * reception_nodes
    workers = [(0.0, "cpu", i) for i in range(cpu)] + [(0.0, "gpu", i) for i in range(gpu)]
    heapq.heapify(workers)
    node_busy = worker_busy = 0.0
    # Work offered in each hour of arrival, per server: the busiest hour's share of 3600 s is
    # the stage's peak utilisation (over 1: the queue grows through that hour).
    node_load, worker_load = [0.0] * 24, [0.0] * 24
    ready: list[tuple[float, Scan]] = []  # (queued at, scan)
    latencies, waits, reception_waits = [], [], []
    for scan in scans:
        node = min(range(reception_nodes), key=nodes.__getitem__)
        start = max(scan.arrival_s, nodes[node])
        reception_waits.append(start - scan.arrival_s)
        received = start + times.reception_s(scan.protocol.slices)
        node_busy += received - start
        node_load[int(scan.arrival_s // 3600)] += (received - start) / reception_nodes
        nodes[node] = received
        ready.append((received + COMPLETE_AFTER_S, scan))
    ready.sort(key=lambda item: item[0])
    queue_events: list[tuple[float, int]] = []  # (time, +1 queued / -1 started)
    for queued_at, scan in ready:
        free_at, kind, index = heapq.heappop(workers)
        start = max(queued_at, free_at)
        slices = scan.protocol.slices
        service = times.cpu_worker_s(slices) if kind == "cpu" else times.gpu_worker_s(slices)
        worker_busy += service
        worker_load[int(scan.arrival_s // 3600)] += service / (cpu + gpu)
        heapq.heappush(workers, (start + service, kind, index))
        latencies.append(start + service - scan.arrival_s)
        waits.append(start - queued_at)
        queue_events += [(queued_at, 1), (start, -1)]
    queue_events.sort()
    waiting = max_waiting = 0
    hourly = [0.0] * 24  # time-averaged queue length per hour
    last = 0.0
    for at, change in queue_events:
        _accumulate(hourly, last, at, waiting)
        waiting += change
        max_waiting = max(max_waiting, waiting)
        last = at
    day = 24 * 3600.0
    node_use = node_busy / (reception_nodes * day)
    worker_use = worker_busy / ((cpu + gpu) * day)
    peak = {"reception": max(node_load) / 3600, "workers": max(worker_load) / 3600}
    return {
        "reception_nodes": reception_nodes,
        "cpu_workers": cpu,
        "gpu_workers_estimated": gpu,
        "latency_s": _percentiles(latencies),
        "reception_wait_s": _percentiles(reception_waits),
        "worker_queue_wait_s": _percentiles(waits),
        "worker_queue_max": max_waiting,
        "worker_queue_mean_by_hour": [round(q, 2) for q in hourly],
        "utilisation_day": {"reception": round(node_use, 3), "workers": round(worker_use, 3)},
        "utilisation_peak_hour": {stage: round(use, 3) for stage, use in peak.items()},
        "first_bottleneck": max(peak, key=peak.__getitem__),
    }


def _accumulate(hourly: list[float], start: float, end: float, level: int) -> None:
    """Add `level` x the time between start and end to each hour's average."""
    while start < end and level:
        hour = int(start // 3600)
        if hour >= 24:
            return
        step = min(end, (hour + 1) * 3600) - start
        hourly[hour] += level * step / 3600
        start += step


def _per_hour(scans: list[Scan]) -> list[int]:
    counts = [0] * 24
    for scan in scans:
        counts[int(scan.arrival_s // 3600)] += 1
    return counts


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 1)}


def simulate_day(
    hospitals: int,
    per_hospital: int,
    seed: int,
    times: ServiceTimes,
    clusters: list[tuple[int, int, int]],
) -> dict[str, Any]:
    scans = day_of_scans(hospitals, per_hospital, random.Random(seed))
    return {
        "hospitals": hospitals,
        "scans_per_hospital": per_hospital,
        "scans": len(scans),
        "gb": round(sum(s.protocol.slices for s in scans) * MB_PER_SLICE / 1000, 1),
        "arrivals_by_hour": _per_hour(scans),
        "seed": seed,
        "clusters": [simulate(scans, times, *cluster) for cluster in clusters],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hospitals", type=int, default=100)
    parser.add_argument(
        "--scans-per-hospital",
        type=int,
        nargs="+",
        default=[20, 60],
        help="a day; one simulated day per value (default: a plausible day and three times it)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    times, sources = measured_service_times()
    per_protocol = {
        p.name: {
            "slices": p.slices,
            "mb": round(p.slices * MB_PER_SLICE),
            "share": p.share,
            "cpu_worker_s": round(times.cpu_worker_s(p.slices), 1),
            "gpu_worker_s_estimated": round(times.gpu_worker_s(p.slices), 1),
            "reception_s": round(times.reception_s(p.slices), 1),
        }
        for p in SCAN_MIX
    }
    mean = {
        key: sum(p.share * per_protocol[p.name][key] for p in SCAN_MIX)
        for key in ("cpu_worker_s", "gpu_worker_s_estimated", "reception_s")
    }
    # (reception nodes, CPU workers, GPU workers)
    clusters = [
        (1, 1, 0),
        (1, 2, 0),
        (1, 3, 0),
        (2, 3, 0),
        (2, 4, 0),
        (1, 0, 1),
        (2, 0, 1),
        (2, 0, 2),
    ]
    result = {
        "benchmark": "capacity",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "simulated": "queueing from measured service times and assumed arrivals",
        "sources": sources,
        "service_times": asdict(times),
        "protocols": per_protocol,
        "scans_per_hour_per_unit": {
            "cpu_worker": round(3600 / mean["cpu_worker_s"], 1),
            "gpu_worker_estimated": round(3600 / mean["gpu_worker_s_estimated"], 1),
            "reception_node": round(3600 / mean["reception_s"], 1),
        },
        "days": [
            simulate_day(args.hospitals, per_hospital, args.seed, times, clusters)
            for per_hospital in args.scans_per_hospital
        ],
    }
    write_result(args.out, result)
    print(json.dumps(result["scans_per_hour_per_unit"]))
    for day in result["days"]:
        print(f"{day['scans']} scans, {day['gb']} GB, by hour {day['arrivals_by_hour']}")
        for run in day["clusters"]:
            print(
                f"  {run['reception_nodes']} nodes {run['cpu_workers']} cpu "
                f"{run['gpu_workers_estimated']} gpu: latency {run['latency_s']}, queue max "
                f"{run['worker_queue_max']}, peak use {run['utilisation_peak_hour']}, "
                f"bottleneck {run['first_bottleneck']}"
            )


if __name__ == "__main__":
    main()
