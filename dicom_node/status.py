"""`dicom-node status`: what the node is doing, from its pid file and its state database.

Works whether or not the daemon runs: everything comes from data_dir, not from the process.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from dicom_node.config import Config
from dicom_node.daemon import running_daemon
from dicom_node.state import NodeState, SeriesState

RECENT_SERIES = 20


def _directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def node_status(config: Config, limit: int = RECENT_SERIES) -> dict[str, Any]:
    """The node's status as one JSON-ready object."""
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
    counts: dict[str, int] = {}
    series: list[dict[str, Any]] = []
    # A node that never ran has no database yet; status must not create one.
    if node.database or (data_dir / "node.db").exists():
        state = NodeState(node.database_url)
        try:
            counts = state.counts()
            series = [
                {
                    "series_instance_uid": s.series_instance_uid,
                    "study_instance_uid": s.study_instance_uid,
                    "modality": s.modality,
                    "calling_ae": s.calling_ae,
                    "instances": s.instance_count,
                    "state": s.state,
                    "reason": s.reason,
                    "generation": s.generation,
                    "first_received_at": s.first_received_at.isoformat(),
                    "last_received_at": s.last_received_at.isoformat(),
                    "state_changed_at": s.state_changed_at.isoformat(),
                }
                for s in state.recent_series(limit)
            ]
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
    lines = [head, Text(f"data: {status['data_dir']}")]
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
    table.add_column("series", overflow="fold")  # a UID is only useful whole
    for column in ("modality", "from", "instances", "state", "reason"):
        table.add_column(column)
    table.add_column("received over", justify="right")
    table.add_column("last received (UTC)")
    now = datetime.now(UTC).isoformat()
    for s in status["series"]:
        table.add_row(
            s["series_instance_uid"],
            s["modality"],
            s["calling_ae"],
            str(s["instances"]),
            f"{s['state']} ({_seconds(now, s['state_changed_at'])})",
            s["reason"] or "",
            _seconds(s["last_received_at"], s["first_received_at"]),
            s["last_received_at"][:19],
        )
    return Group(*lines, table)
