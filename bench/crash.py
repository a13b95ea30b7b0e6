"""Crash benchmark: the daemon SIGKILLed at random moments over many rounds.

    python -m bench.crash [--rounds 20] [--series 2] [--seed N] [--receive-processes 1]
                          [--out bench/results/crash.json]

After one uninterrupted round (which times a round), each round sends `--series` different
small phantom series (two hips, a knee and an ankle in turn, about 150 slices each; the same
phantoms under new study, series and instance UIDs every round) from as many concurrent DCMTK
storescu processes into one `dicom-node serve` that delivers its SEGs to a real Orthanc. At a
random moment, drawn from the whole time a round takes (transfer, completion wait, inference,
SEG writing, delivery), the daemon is SIGKILLed (its worker dies with it) and started again;
the senders resend what they were not told was stored, as a scanner does. With
`--receive-processes N` the node receives in N processes sharing its port (`[node]
receive_processes`): they die with the daemon, and its restart records what they had spooled.

Checked after every restart: every instance a sender was told is stored (storescu -v prints
one "Received Store Response (Success)" per acknowledged instance, in the order sent) is in
the database and its file is in the spool. After every round: every series `done`. At the
end: the PACS holds exactly one SEG instance per series, in one SEG series each, and the
database, the spool and the instances sent agree one to one. Any violation is counted and
described in the results; the run exits non-zero if there is one.

The test suite kills once per stage (tests/test_faults.py); this runs the many rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from bench.results_file import machine, write_result
from dicom_node.testbed.node_process import (
    NodeProcess,
    destination_toml,
    start_storescu,
    storescu,
)
from dicom_node.testbed.peers import OrthancProcess
from dicom_node.testbed.phantom_series import write_phantom

RESULTS = Path(__file__).resolve().parent / "results" / "crash.json"
# Two hips, a knee and an ankle (small phantoms): the shipped weights segment each plausibly,
# so every series should end `done` with a SEG at the PACS.
PHANTOM_SEEDS = (1003, 1004, 2010, 1001)
FINAL = {"done", "no_findings", "failed", "skipped"}
DELIVERY = {"backoff_initial_s": 0.5, "backoff_max_s": 2, "max_attempts": 1000}
ROUND_TIMEOUT_S = 900


def relabel(source: list[Path], out_dir: Path, tag: str) -> list[Path]:
    """The series in `source` as a new study, series and instances (UIDs derived from `tag`)."""
    out_dir.mkdir(parents=True)
    study = generate_uid(entropy_srcs=[tag, "study"])
    series = generate_uid(entropy_srcs=[tag, "series"])
    paths = []
    for index, path in enumerate(source):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(out_dir / path.name)
        ds.save_as(paths[-1])
    return paths


class Sender:
    """One storescu process and the instances it was told are stored."""

    def __init__(self, port: int, files: list[Path]) -> None:
        self.files = files
        self.acknowledged = 0
        self.process = start_storescu(port, *files)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if "Received Store Response" in line and "Success" in line:
                self.acknowledged += 1

    def finish(self) -> bool:
        """Wait for the sender (it ends when the node dies); True if it sent everything."""
        self.process.wait(timeout=120)
        self._reader.join(timeout=10)
        return self.process.returncode == 0 and self.acknowledged == len(self.files)

    def told_stored(self) -> set[str]:
        return {
            str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in self.files[: self.acknowledged]  # storescu sends in the order given
        }


def states(node: NodeProcess, uids: list[str]) -> dict[str, str | None]:
    return {uid: node.db_state(uid) for uid in uids}


def phase_of(senders: list[Sender], current: dict[str, str | None]) -> str:
    """The stage the round was in when the node was killed: the furthest behind."""
    if any(s.process.poll() is None for s in senders) or "receiving" in current.values():
        return "transfer"
    for state, phase in (
        ("complete", "selection"),
        ("queued", "queue"),
        ("segmenting", "inference"),
        ("sending", "delivery"),
    ):
        if state in current.values():
            return phase
    return "finished"


def run(
    workdir: Path, rounds: int, series_per_round: int, seed: int, receive_processes: int = 1
) -> dict:
    rng = random.Random(seed)
    phantoms = [
        sorted(write_phantom(workdir / f"phantom-{s}", seed=s, size="small")["ct"].iterdir())
        for s in PHANTOM_SEEDS
    ]
    pacs = OrthancProcess(workdir / "orthanc").start()
    destination = pacs.destination()
    node = NodeProcess(
        workdir / "node",
        extra_config=destination_toml(destination, **DELIVERY),
        receive_processes=receive_processes,
    )
    violations: list[str] = []
    phases: Counter[str] = Counter()
    sent: dict[str, int] = {}  # series UID -> instances
    checked_acknowledged = 0
    started = time.monotonic()
    round_seconds = 0.0  # how long an uninterrupted round takes: round 0, never killed
    try:
        node.start()
        for round_index in range(rounds + 1):
            round_started = time.monotonic()
            batch = []
            for k in range(series_per_round):
                source = phantoms[(round_index + k) % len(phantoms)]
                batch.append(
                    relabel(
                        source,
                        workdir / f"round-{round_index}" / f"s{k}",
                        f"{seed}-{round_index}-{k}",
                    )
                )
            uids = [
                str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID) for files in batch
            ]
            sent.update({uid: len(files) for uid, files in zip(uids, batch, strict=True)})
            senders = [Sender(node.port, files) for files in batch]
            kill_at = round_started + rng.uniform(0.0, round_seconds or ROUND_TIMEOUT_S)
            while time.monotonic() < kill_at and not all(
                state in FINAL for state in states(node, uids).values()
            ):
                time.sleep(0.05)
            current = states(node, uids)
            phase = phase_of(senders, current)
            phases[phase] += 1
            if phase != "finished":
                node.crash()
            incomplete = [s for s in senders if not s.finish()]
            if phase != "finished":
                node.start()
            recorded = node.db_instances()
            spool = node.spool_files()
            for sender in senders:
                told = sender.told_stored()
                checked_acknowledged += len(told)
                lost = [uid for uid in told if uid not in recorded or recorded[uid] not in spool]
                if lost:
                    violations.append(
                        f"round {round_index}: {len(lost)} acknowledged instances lost"
                    )
            for sender in incomplete:  # the scanner resends what it was not told is stored
                if storescu(node.port, *sender.files).returncode != 0:
                    violations.append(f"round {round_index}: resend failed")
            deadline = time.monotonic() + ROUND_TIMEOUT_S
            while not all(state in FINAL for state in states(node, uids).values()):
                if time.monotonic() > deadline:
                    violations.append(f"round {round_index}: not final: {states(node, uids)}")
                    break
                time.sleep(0.2)
            final = states(node, uids)
            if set(final.values()) != {"done"}:
                violations.append(f"round {round_index}: {final}")
            if round_index == 0:
                round_seconds = time.monotonic() - round_started
            print(f"round {round_index}: killed during {phase}; {final}", flush=True)

        # One SEG per series at the PACS; database, spool and what was sent agree.
        listed = node.cli("status", "--json", "--limit", str(len(sent)))
        jobs = {s["series_instance_uid"]: s for s in json.loads(listed.stdout)["series"]}
        for uid, instances in sent.items():
            job = jobs[uid]
            if job["instances"] != instances:
                violations.append(f"{uid}: {job['instances']} instances recorded, {instances} sent")
            if not job["seg_series_instance_uid"]:
                violations.append(f"{uid}: no SEG ({job['state']}: {job['reason']})")
                continue
            segs = pacs.find_series("SEG", SeriesInstanceUID=job["seg_series_instance_uid"])
            if len(segs) != 1 or len(segs[0]["Instances"]) != 1:
                violations.append(
                    f"{uid}: {sum(len(s['Instances']) for s in segs)} SEGs at the PACS"
                )
        all_segs = pacs.find_series("SEG")
        if len(all_segs) != len(sent):
            violations.append(f"{len(all_segs)} SEG series at the PACS for {len(sent)} series")
        counts = (len(node.db_instances()), sum(sent.values()), len(node.spool_files()))
        if len(set(counts)) != 1:
            violations.append("database {}, sent {}, spool {} instances".format(*counts))
    finally:
        node.kill()
        pacs.stop()
    return {
        "rounds": rounds,
        "uninterrupted_round_s": round(round_seconds, 1),
        "series_per_round": series_per_round,
        "kills_by_stage": dict(phases),
        "series": len(sent),
        "instances_sent": sum(sent.values()),
        "acknowledged_instances_checked": checked_acknowledged,
        "violations": violations,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--series", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--receive-processes", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-crash-") as workdir:
        result = run(Path(workdir), args.rounds, args.series, args.seed, args.receive_processes)
    result = {
        "benchmark": "crash",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "receive_processes": args.receive_processes,
        **result,
        "machine": machine(),
        "note": "small phantom series (synthetic); real node, real Orthanc, DCMTK storescu",
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))
    if result["violations"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
