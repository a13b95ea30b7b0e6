"""`dicom-node status`: what the node is doing, from its pid file and its state database.

Works whether or not the daemon runs: everything comes from data_dir, not from the process.
"""

from __future__ import annotations

import json
import shutil
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from dicom_node.app.config import Config
from dicom_node.pipeline.state import NodeState, SeriesRecord, SeriesState
from model.engine.verdict import Verdict

RECENT_SERIES = 20


def _directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _has_database(config: Config) -> bool:
    """A node that never ran has no database yet; reporting must not create one."""
    return bool(config.node.database) or (config.node.data_path / "node.db").exists()


def _verdict(s: SeriesRecord) -> dict[str, Any]:
    """The series' verdict and its reasons (`model.engine.verdict`), once it was segmented."""
    verdict = (json.loads(s.result) if s.result else {}).get("verdict") or {}
    return {"verdict": verdict.get("verdict"), "verdict_reasons": verdict.get("reasons", [])}


def _series_summary(s: SeriesRecord) -> dict[str, Any]:
    """A series (a job) as `status`, `jobs` and `job` report it."""
    return {
        "id": s.id,
        "series_instance_uid": s.series_instance_uid,
        "study_instance_uid": s.study_instance_uid,
        "modality": s.modality,
        "calling_ae": s.calling_ae,
        "instances": s.instance_count,
        "state": s.state.value,
        "reason": s.reason,
        "generation": s.generation,
        "first_received_at": s.first_received_at.isoformat(),
        "last_received_at": s.last_received_at.isoformat(),
        "state_changed_at": s.state_changed_at.isoformat(),
        "seg_series_instance_uid": s.seg_series_instance_uid,
        "seg_sop_instance_uid": s.seg_sop_instance_uid,
        "delivered_to": list(s.delivered_to),
        **_verdict(s),
    }


def recent_jobs(
    config: Config, limit: int = RECENT_SERIES, state: SeriesState | None = None
) -> list[dict[str, Any]]:
    """The most recent jobs, newest first, only those in `state` if given: the database only
    (no pid file, no disk walk), which also does the filtering and the limit."""
    if not _has_database(config):
        return []
    with closing(NodeState(config.node.database_url)) as store:
        return list_jobs(store, limit, state)


def list_jobs(
    store: NodeState, limit: int | None = RECENT_SERIES, state: SeriesState | None = None
) -> list[dict[str, Any]]:
    """The most recent jobs of an open state database, newest first (`recent_jobs`, and the
    dashboard, which holds the daemon's)."""
    return [_series_summary(s) for s in store.jobs(state, limit)]


def node_status(config: Config, limit: int = RECENT_SERIES) -> dict[str, Any]:
    """The node's status as one JSON-ready object."""
    # Here, not at the top: the daemon imports this module (its dashboard draws with it).
    from dicom_node.app.daemon import running_daemon

    node = config.node
    data_dir = node.data_path
    daemon = running_daemon(data_dir)
    status: dict[str, Any] = {"running": daemon is not None, "data_dir": str(data_dir)}
    if daemon is not None:
        started = datetime.fromisoformat(daemon.started_at)
        status |= {
            "pid": daemon.pid,
            "ae_title": daemon.ae_title,
            "address": f"{daemon.bind}:{daemon.port}",
            "started_at": daemon.started_at,
            "uptime_s": round((datetime.now(UTC) - started).total_seconds(), 1),
        }
        if daemon.receivers:  # [node] receive_processes > 1
            status["receiver_pids"] = daemon.receivers
    counts: dict[str, int] = {}
    series: list[dict[str, Any]] = []
    if _has_database(config):
        state = NodeState(node.database_url)
        try:
            counts = state.counts()
            series = [_series_summary(s) for s in state.jobs(limit=limit)]
        finally:
            state.close()
    status["counts"] = {s.value: counts.get(s.value, 0) for s in SeriesState}
    status["series"] = series
    if data_dir.is_dir():
        status["disk_bytes"] = _directory_bytes(data_dir)
        status["disk_free_bytes"] = shutil.disk_usage(data_dir).free
    return status


def _seconds(text: str, since: str) -> str:
    delta = datetime.fromisoformat(text) - datetime.fromisoformat(since)
    return f"{delta.total_seconds():.0f} s"


def _megabytes(value: int) -> str:
    return f"{value / 1e6:,.1f} MB"


def render(status: dict[str, Any]) -> Group:
    """The status for a terminal: a header line, counts per state, the recent series."""
    if status["running"]:
        head = Text(
            f"running: {status['ae_title']} on {status['address']}, pid {status['pid']}, "
            f"up {status['uptime_s']:.0f} s",
            style="green",
        )
    else:
        head = Text("not running", style="yellow")
    lines = [head]
    if "receiver_pids" in status:
        pids = ", ".join(str(pid) for pid in status["receiver_pids"])
        lines.append(Text(f"receiving processes beside it: pids {pids}"))
    lines.append(Text(f"data: {status['data_dir']}"))
    if "disk_bytes" in status:
        lines.append(
            Text(
                f"disk: {_megabytes(status['disk_bytes'])} used, "
                f"{_megabytes(status['disk_free_bytes'])} free"
            )
        )
    counts = ", ".join(f"{state} {n}" for state, n in status["counts"].items() if n)
    lines.append(Text(f"series: {counts or 'none'}"))

    table = Table(title="recent series", title_justify="left")
    table.add_column("job", justify="right")
    table.add_column("series", overflow="fold")  # a UID is only useful whole
    for column in ("modality", "from", "instances", "state", "reason", "verdict", "delivered to"):
        table.add_column(column)
    table.add_column("received over", justify="right")
    table.add_column("last received (UTC)")
    now = datetime.now(UTC).isoformat()
    for s in status["series"]:
        table.add_row(
            str(s["id"]),
            s["series_instance_uid"],
            s["modality"],
            s["calling_ae"],
            str(s["instances"]),
            f"{s['state']} ({_seconds(now, s['state_changed_at'])})",
            s["reason"] or "",
            s["verdict"] or "",
            ", ".join(s["delivered_to"]),
            _seconds(s["last_received_at"], s["first_received_at"]),
            s["last_received_at"][:19],
        )
    return Group(*lines, table)


def job_report(state: NodeState, job_id: int) -> dict[str, Any]:
    """One job (a series) as a JSON-ready object: its state, result, timeline, deliveries."""
    job = state.job(job_id)
    series, summary = job.series, _series_summary(job.series)
    return {
        **summary,
        "attempts": series.attempts,
        "seg_file": series.seg_file,
        "purged_at": series.purged_at.isoformat() if series.purged_at else None,
        "result": json.loads(series.result) if series.result else None,
        "timeline": [
            {
                "at": t.at.isoformat(),
                "generation": t.generation,
                "from": t.from_state.value if t.from_state else None,
                "to": t.to_state.value,
                "reason": t.reason,
            }
            for t in job.transitions
        ],
        "deliveries": [
            {
                "destination": d.destination,
                "peer": f"{d.ae_title}@{d.host}:{d.port}",
                "generation": d.generation,
                "state": d.state.value,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "next_attempt_at": d.next_attempt_at.isoformat() if d.next_attempt_at else None,
                "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
            }
            for d in job.deliveries
        ],
    }


def render_job(job: dict[str, Any]) -> Group:
    """A job for a terminal: what it is, its outcome, segments, timeline and deliveries."""
    lines: list[Text | Table] = [
        Text(f"job {job['id']}: series {job['series_instance_uid']}", style="bold"),
        Text(
            f"state: {job['state']}" + (f" ({job['reason']})" if job["reason"] else ""),
            style="red" if job["state"] == SeriesState.FAILED else "",
        ),
        Text(
            f"from {job['calling_ae']}, {job['instances']} instances, generation "
            f"{job['generation']}, attempts {job['attempts']}"
        ),
    ]
    if job["seg_sop_instance_uid"]:
        delivered = ", ".join(job["delivered_to"]) or "nowhere yet"
        lines.append(Text(f"SEG {job['seg_sop_instance_uid']}, delivered to {delivered}"))
    if job["verdict"]:
        confident = job["verdict"] == Verdict.CONFIDENT
        lines.append(Text(f"verdict: {job['verdict']}", style="" if confident else "yellow"))
        lines += [Text(f"  - {reason}") for reason in job["verdict_reasons"]]
    result = job["result"] or {}
    if result.get("source_repairs"):  # the source's invalid attributes, as the SEG has them
        lines.append(Text("source header repaired in the SEG:", style="yellow"))
        lines += [Text(f"  - {repair}") for repair in result["source_repairs"]]
    if result.get("segments"):
        segments = Table(title="segments", title_justify="left")
        for column in ("segment", "volume (ml)", "unsure (%)"):
            segments.add_column(column)
        for s in result["segments"]:
            unsure = s.get("unsure_percent")  # jobs from before it was recorded have none
            segments.add_row(
                f"{s['side']} {s['bone']}",
                f"{s['volume_ml']:.1f}",
                "" if unsure is None else f"{unsure:.1f}",
            )
        lines.append(segments)
    if result.get("measurements"):
        lines.append(_measurements_table(result["measurements"]))
    if result.get("key_image"):
        lines.append(Text(f"key image: {result['key_image']}"))
    timeline = Table(title="timeline", title_justify="left")
    for column in ("at (UTC)", "gen", "state", "reason"):
        timeline.add_column(column)
    for t in job["timeline"]:
        timeline.add_row(t["at"][:23], str(t["generation"]), t["to"], t["reason"] or "")
    lines.append(timeline)
    if job["deliveries"]:
        table = Table(title="deliveries", title_justify="left")
        for column in ("destination", "peer", "state", "attempts", "last error", "next attempt"):
            table.add_column(column)
        for d in job["deliveries"]:
            table.add_row(
                d["destination"],
                d["peer"],
                d["state"],
                str(d["attempts"]),
                d["last_error"] or "",
                (d["next_attempt_at"] or "")[:19],
            )
        lines.append(table)
    return Group(*lines)


def _measurements_table(measurements: dict[str, Any]) -> Table | Text:
    """The job's measurements (`dicom_node.imaging.sr.measurements_summary`): per leg, each
    value with its unit, or not measurable and why."""
    if "error" in measurements:
        return Text(f"measurements failed: {measurements['error']}", style="yellow")
    table = Table(title="measurements (varus negative, anteversion positive)", title_justify="left")
    for column in ("leg", "measurement", "value"):
        table.add_column(column)
    for row in measurement_rows(measurements):
        table.add_row(*row)
    return table


def measurement_rows(measurements: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(leg, measurement, value with its unit or 'not measurable: why') per measured value of
    a job's measurements that did not fail as a whole."""
    rows = []
    for leg, values in measurements.items():
        for name, m in values.items():
            if isinstance(m, dict) and "unit" in m:
                shown = f"{m['value']:.1f} {m['unit']}" if m["value"] is not None else ""
                rows.append((leg, name, shown or f"not measurable: {m['reason']}"))
    return rows


def render_jobs(jobs: list[dict[str, Any]]) -> Table:
    """Jobs as a table: what `dicom-node jobs` prints."""
    table = Table(title="jobs", title_justify="left")
    table.add_column("job", justify="right")
    table.add_column("series", overflow="fold")
    columns = ("from", "instances", "state", "reason", "verdict", "delivered to", "changed (UTC)")
    for column in columns:
        table.add_column(column)
    for job in jobs:
        table.add_row(
            str(job["id"]),
            job["series_instance_uid"],
            job["calling_ae"],
            str(job["instances"]),
            job["state"],
            job["reason"] or "",
            job["verdict"] or "",
            ", ".join(job["delivered_to"]),
            job["state_changed_at"][:19],
        )
    return table
