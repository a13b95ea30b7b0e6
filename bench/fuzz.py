"""Fuzzing benchmark: thousands of hostile C-STOREs against a real node.

    python -m bench.fuzz [--cases 5000] [--seed 0] [--out bench/results/fuzz.json]

The cases of tests/test_hostile.py (built by tests/support/hostile/: truncated and overwritten
datasets, wrong VRs, huge declared lengths, pixel data of the wrong size, absurd dimensions
and geometry, path-like and over-long UIDs, missing mandatory attributes, non-images claiming
CT, deep sequences, transfer syntax mismatches), drawn at random by Hypothesis from `--seed`,
plus the request UIDs pynetdicom drops unanswered and a deflate bomb. Each is sent as raw
bytes over a real association to a `dicom-node serve` process (min_slices 4, so that the
cases hidden in 4-slice series reach the worker). After every case a C-ECHO checks the node is
up. At the end: every series settled with a reason, database and spool agree with what was
acknowledged, nothing was written outside data_dir, and the node restarts on what it kept.
Written to `bench/results/fuzz.json`; a crash (node down, an answer no case allows) is
recorded there with the case that caused it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from bench.results_file import machine, write_result
from dicom_node.net.receive import MAX_INFLATED_BYTES
from dicom_node.testbed.node_process import NodeProcess
from tests.support import ROOT, hostile
from tests.support.hostile import NO_ANSWER, UNSENDABLE, Encoded, HostileSender, Spec

RESULTS = Path(__file__).resolve().parent / "results" / "fuzz.json"
RSS_EVERY = 25  # cases between memory samples


def _status_name(status: int) -> str:
    return {NO_ANSWER: "no answer", UNSENDABLE: "unsendable"}.get(status, f"0x{status:04x}")


def _tree_rss(pid: int) -> int:
    """RSS of a process and all its children (the worker), bytes."""
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


def _reason_kind(reason: str) -> str:
    """A skip or failure reason without its UIDs and numbers, to count reasons by kind."""
    reason = re.sub(r"instance \S+?:", "instance <uid>:", reason)
    return re.sub(r"\d+(\.\d+)*", "N", reason)[:120]


class Fuzz:
    """One node, one sender, and what happened."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.node = NodeProcess(work / "node", series={"min_slices": hostile.SLICES})
        self.sender: HostileSender | None = None
        self.serial = 0
        self.statuses: Counter[str] = Counter()
        self.by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        self.unexpected: list[dict[str, str]] = []
        self.acknowledged: set[str] = set()
        self.crash: dict[str, str] | None = None
        self.peak_rss = 0

    def start(self) -> None:
        self.node.start()
        self.sender = HostileSender(self.node.port, self.work / "sender")

    def send(
        self, label: str, kind: str, instances: tuple[Encoded, ...], allowed: set[int]
    ) -> None:
        assert self.sender is not None
        status = NO_ANSWER
        for instance in instances:
            status = self.sender.send(instance)
            if status == 0:
                self.acknowledged.add(hostile.as_received(instance.sop_instance_uid))
        name = _status_name(status)
        self.statuses[name] += 1
        self.by_kind[kind][name] += 1
        if status != UNSENDABLE and status not in allowed:
            self.unexpected.append({"case": label, "answer": name})
        if self.serial % RSS_EVERY == 0:
            self.peak_rss = max(self.peak_rss, _tree_rss(self.node.process.pid))
        if not self.sender.echo():
            alive = self.node.process is not None and self.node.process.poll() is None
            self.crash = {"case": label, "answer": name, "node_process_alive": str(alive)}
            raise RuntimeError(f"node down after {label}")

    def case(self, spec: Spec) -> None:
        self.serial += 1
        case = hostile.build(spec, self.serial)
        self.send(spec.describe(), spec.kind, case.instances, hostile.allowed_answers(spec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
        work = Path(tmp)
        fuzz = Fuzz(work)
        fuzz.start()
        mine = [fuzz.node.data_dir, fuzz.node.log, work / "sender"]
        outside_before = hostile.tree(work, skip=mine)
        started = time.monotonic()

        @hypothesis_seed(args.seed)
        @settings(
            max_examples=args.cases,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(spec=hostile.specs())
        def one_case(spec: Spec) -> None:
            fuzz.case(spec)
            if fuzz.serial % 250 == 0:
                rate = fuzz.serial / (time.monotonic() - started)
                print(f"{fuzz.serial} cases, {rate:.1f}/s: {dict(fuzz.statuses)}", flush=True)

        try:
            for uid in hostile.UNDECODABLE_REQUEST_UIDS:  # explicit: each costs a time-out
                fuzz.case(Spec("bad_request_uid", (("uid", uid),)))
            bomb = hostile.deflate_bomb(MAX_INFLATED_BYTES + (1 << 20))
            fuzz.send("deflate bomb", "deflate_bomb", (bomb,), {0xC000})
            one_case()
        except Exception as error:  # a crash: keep what was learnt, write it down
            print(f"stopped: {error}", file=sys.stderr)
            if fuzz.crash is None:
                fuzz.crash = {"error": f"{type(error).__name__}: {error}"[:500]}
        seconds = time.monotonic() - started
        if fuzz.sender is not None:
            fuzz.sender.close()

        node = fuzz.node
        alive = node.process is not None and node.process.poll() is None
        report = hostile.inspect_node(node.data_dir, node.log, fuzz.acknowledged)
        with sqlite3.connect(node.data_dir / "node.db") as db:
            reasons = Counter(
                _reason_kind(reason)
                for (reason,) in db.execute("SELECT reason FROM series WHERE reason IS NOT NULL")
            )
            instances = db.execute("SELECT count(*) FROM instances").fetchone()[0]
        outside = sorted(hostile.tree(work, skip=mine) ^ outside_before)
        canaries = [str(p) for p in hostile.canaries(work, ROOT)]
        canaries += [str(p) for p in Path("/tmp").iterdir() if hostile.CANARY in p.name]
        # The node restarts on what it kept (resume re-reads state; selection re-reads files).
        restarted = False
        if alive:
            node.stop()
            node.start()
            restarted = HostileSender(node.port, work / "sender").echo()
            node.stop()
        else:
            node.kill()

    result: dict[str, Any] = {
        "benchmark": "fuzz",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": args.seed,
        "cases": fuzz.serial + 1,  # + the deflate bomb
        "seconds": round(seconds, 1),
        "cases_per_s": round((fuzz.serial + 1) / seconds, 1),
        "statuses": dict(fuzz.statuses.most_common()),
        "by_kind": {kind: dict(c.most_common()) for kind, c in sorted(fuzz.by_kind.items())},
        "unexpected_answers": len(fuzz.unexpected),
        "unexpected_examples": fuzz.unexpected[:20],
        "node_alive": alive,
        "crash": fuzz.crash,
        "restarted_after": restarted,
        "instances_stored": instances,
        "series_states": report.states,
        "reasons": dict(reasons.most_common(25)),
        "problems": report.problems(),
        "written_outside_data_dir": outside + canaries,
        "peak_rss_mb": round(fuzz.peak_rss / 2**20),
        "notes": [
            "statuses: the answer to each case's hostile instance (companion slices of the "
            "series cases excluded); 'no answer': pynetdicom dropped the command (a request "
            "UID it cannot decode) and the sender timed out; 'unsendable': the sender's "
            "pynetdicom could not encode the request",
            "problems: everything inspect_node checks (settled series, reasons, crash reasons, "
            "database vs spool vs acknowledged, handler exceptions, PHI in the log); empty "
            "means none",
            "peak_rss_mb: the node and its worker, sampled every 25 cases",
        ],
        "machine": {**machine(), "load_average": os.getloadavg()},
    }
    write_result(args.out, result)
    print(json.dumps({k: result[k] for k in ("cases", "seconds", "statuses", "node_alive")}))
    print(f"problems: {result['problems'] or 'none'}; written to {args.out}")
    if fuzz.crash or fuzz.unexpected or result["problems"] or outside or canaries:
        sys.exit(1)


if __name__ == "__main__":
    main()
