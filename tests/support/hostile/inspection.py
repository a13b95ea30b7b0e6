"""The node's side after hostile input: what it holds (database, spool, log) against what it
acknowledged, and whether anything appeared outside its folders (a path-like UID's canary).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.net.receive import UID_PATTERN
from tests.support.hostile.cases import CANARY, PATIENT


def tree(root: Path, skip: Sequence[Path] = ()) -> set[str]:
    """Every path under `root` (relative), except under `skip`."""
    found = set()
    for path in root.rglob("*"):
        if any(path == s or s in path.parents for s in skip):
            continue
        found.add(str(path.relative_to(root)))
    return found


def canaries(*roots: Path) -> list[Path]:
    """Files or folders whose name carries the hostile UIDs' marker."""
    found = []
    for root in roots:
        found.extend(p for p in root.rglob(f"*{CANARY}*"))
    return found


FINAL_STATES = frozenset({"skipped", "failed", "done", "no_findings"})
# Reasons that mean something broke rather than the data being unusable.
CRASH_REASONS = ("internal error", "worker died", "selection failed", "timed out")


@dataclass
class NodeReport:
    """What a node holds after hostile input; every list empty means all is well."""

    states: dict[str, int]
    unsettled: list[str]  # series not in a final state
    crashed: list[str]  # "uid: reason" of series that failed because something broke
    without_reason: list[str]  # skipped or failed series with no reason
    bad_uids: list[str]  # recorded UIDs the node should have refused
    recorded_not_acknowledged: list[str]
    acknowledged_not_recorded: list[str]
    spool_not_recorded: list[str]  # files in the spool the database does not name
    recorded_not_in_spool: list[str]
    foreign_names: list[str]  # spool files not named <32 hex>.dcm (a .part left behind, ...)
    handler_exceptions: int  # pynetdicom's "Exception in handler" (a 0xC211 answer)
    phi_in_log: bool

    def problems(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "states" and value}


def inspect_node(
    data_dir: Path, log: Path, acknowledged: set[str], settle_s: float = 120
) -> NodeReport:
    """Wait up to `settle_s` for every series to reach a final state, then compare the
    database, the spool and the log with what the node acknowledged."""
    database = data_dir / "node.db"
    deadline = time.monotonic() + settle_s
    while True:
        with contextlib.closing(sqlite3.connect(database)) as db:
            series = list(db.execute("SELECT series_instance_uid, state, reason FROM series"))
            instances = dict(db.execute("SELECT sop_instance_uid, file_name FROM instances"))
        if all(state in FINAL_STATES for _, state, _ in series) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    spool = {p.name for p in (data_dir / "spool").iterdir()}
    text = log.read_text(errors="replace")
    uids = [uid for uid, _, _ in series] + list(instances)
    return NodeReport(
        states=dict(Counter(state for _, state, _ in series)),
        unsettled=[f"{uid}: {state}" for uid, state, _ in series if state not in FINAL_STATES],
        crashed=[
            f"{uid}: {reason}"
            for uid, _, reason in series
            if reason and reason.startswith(CRASH_REASONS)
        ],
        without_reason=[
            uid for uid, state, reason in series if state in ("skipped", "failed") and not reason
        ],
        bad_uids=[repr(uid) for uid in uids if not UID_PATTERN.fullmatch(uid)],
        recorded_not_acknowledged=sorted(set(instances) - acknowledged),
        acknowledged_not_recorded=sorted(acknowledged - set(instances)),
        spool_not_recorded=sorted(spool - set(instances.values())),
        recorded_not_in_spool=sorted(set(instances.values()) - spool),
        foreign_names=sorted(n for n in spool if not re.fullmatch(r"[0-9a-f]{32}\.dcm", n)),
        handler_exceptions=text.count("Exception in handler"),
        phi_in_log=PATIENT.name in text or PATIENT.patient_id in text,
    )
