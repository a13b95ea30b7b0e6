"""`dicom-node` commands on the node's jobs: `status`, `jobs`, `job`, and `retry`, `release`,
`reject` that move one (or every failed one) on.

Declared by `add_job_commands` into the parser of `dicom_node.app.cli`, in the same pattern:
`_add_<name>(sub)` declares a command's arguments and `_<name>(args)` runs it, importing what
it needs lazily. They work on the state database named by the config's [node] section, so the
daemon need not run; what they draw is in `app.status`. `print_report` serves `demo` too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SubParsers = argparse._SubParsersAction
Handler = Callable[[argparse.Namespace], int]


def add_job_commands(sub: SubParsers) -> None:
    """`status`, `jobs`, `job`, `retry`, `release` and `reject`, in that order."""
    _add_status(sub)
    _add_jobs(sub)
    _add_job(sub)
    _add_retry(sub)
    _add_job_command(
        sub,
        "release",
        "send the SEG of a job held in review",
        "A job in review (the node was unsure of its SEG, and [verdict] policy is hold) moves "
        "on to sending: its SEG goes to every destination as it is. The running daemon "
        "delivers it within seconds.",
        _release,
    )
    _add_job_command(
        sub,
        "reject",
        "end a job held in review without sending its SEG",
        "A job in review ends rejected: its SEG is never sent (retention deletes it with the "
        "series' files).",
        _reject,
    )


def print_report(value: Any, as_json: bool, render: Callable[[Any], Any]) -> int:
    """Print a report as JSON (for scripts) or rendered with rich (for people)."""
    import json

    from rich.console import Console

    if as_json:
        print(json.dumps(value, indent=2))
    else:
        Console().print(render(value))
    return 0


def _add_status(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "status",
        help="whether the node runs, and the state of the series it received",
        description="Read the node's pid file and state database (the daemon need not run): "
        "running or not, uptime, series per state, the recent series with their sender, "
        "instance count, state, reason and timings, and disk use of data_dir.",
    )
    parser.add_argument("--config", type=Path, default=Path("config.toml"))
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--limit", type=int, default=20, help="recent series to list")
    parser.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    from dicom_node.app.config import load_config
    from dicom_node.app.status import node_status, render

    return print_report(node_status(load_config(args.config), args.limit), args.json, render)


def _add_jobs(sub: SubParsers) -> None:
    from dicom_node.pipeline.state import SeriesState  # without SQLAlchemy: --help stays fast

    parser = sub.add_parser(
        "jobs",
        help="the node's jobs (one per received series) with state, SEG and delivery",
    )
    parser.add_argument("--config", type=Path, default=Path("config.toml"))
    states = [state.value for state in SeriesState]
    parser.add_argument("--state", choices=states, help="only jobs in this state")
    parser.add_argument("--limit", type=int, default=50, help="the newest first")
    parser.add_argument("--json", action="store_true", help="a JSON list on stdout")
    parser.set_defaults(handler=_jobs)


def _jobs(args: argparse.Namespace) -> int:
    from dicom_node.app.config import load_config
    from dicom_node.app.status import recent_jobs, render_jobs
    from dicom_node.pipeline.state import SeriesState

    state = SeriesState(args.state) if args.state else None
    jobs = recent_jobs(load_config(args.config), args.limit, state)
    return print_report(jobs, args.json, render_jobs)


def _add_job(sub: SubParsers) -> None:
    parser = sub.add_parser("job", help="one job: its timeline, segments, deliveries and errors")
    parser.add_argument("id", type=int, metavar="ID")
    parser.add_argument("--config", type=Path, default=Path("config.toml"))
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.set_defaults(handler=_job)


def _job(args: argparse.Namespace) -> int:
    from dicom_node.app.config import load_config
    from dicom_node.app.status import job_report, render_job
    from dicom_node.pipeline.state import NodeState

    with closing(NodeState(load_config(args.config).node.database_url)) as state:
        report = job_report(state, args.id)
    return print_report(report, args.json, render_job)


def _add_job_command(
    sub: SubParsers, name: str, summary: str, description: str, handler: Handler
) -> None:
    """A command on one job: `dicom-node NAME ID [--config FILE]`."""
    parser = sub.add_parser(name, help=summary, description=description)
    parser.add_argument("id", type=int, metavar="ID")
    parser.add_argument("--config", type=Path, default=Path("config.toml"))
    parser.set_defaults(handler=handler)


def _add_retry(sub: SubParsers) -> None:
    from dicom_node.pipeline.state import SeriesState  # without SQLAlchemy: --help stays fast

    parser = sub.add_parser(
        "retry",
        help="retry failed jobs: deliver the SEG again, or segment the series again",
        description="A failed job whose SEG is on disk and only delivery failed is delivered "
        "again (attempts reset); otherwise the series is queued for segmentation again. One "
        "job (ID) or all failed ones (--state failed), those that failed at or after --since "
        "only if given. Prints each job with its series and the state it moved to. The "
        "running daemon picks them up within seconds.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?", metavar="ID", help="the job")
    # Failed is the one state jobs are retried from.
    which.add_argument("--state", choices=[SeriesState.FAILED.value], help="every failed job")
    parser.add_argument(
        "--since",
        type=_iso_datetime,
        metavar="ISO-DATE",
        help="with --state: jobs that failed at or after this time, e.g. 2026-12-01 or "
        "2026-12-01T08:00+01:00 (UTC without an offset)",
    )
    parser.add_argument("--config", type=Path, default=Path("config.toml"))
    parser.set_defaults(handler=_retry)


def _iso_datetime(text: str) -> datetime:
    """An ISO 8601 date or date and time; without an offset, UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 date or time such as 2026-12-01T08:00, got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _retry(args: argparse.Namespace) -> int:
    """One job (its errors are the command's), or every failed one: each printed with its
    outcome; exit status 1 if any could not be retried (another command moved it first),
    but not for those whose files retention purged (they can only be sent again)."""
    from dicom_node.app.config import load_config
    from dicom_node.pipeline.state import IllegalTransitionError, NodeState, SeriesState

    if args.since is not None and args.state is None:
        raise ValueError("retry: --since goes with --state failed, not with a job ID")
    with closing(NodeState(load_config(args.config).node.database_url)) as state:
        if args.id is not None:
            print(f"job {args.id}: {state.retry(args.id)}")
            return 0
        jobs = state.jobs(SeriesState(args.state), limit=None, since=args.since)
        retried = purged = 0
        for job in reversed(jobs):  # oldest first
            try:
                outcome = str(state.retry(job.id))
                retried += 1
            except (IllegalTransitionError, LookupError) as error:
                outcome = f"not retried: {error}"
                purged += job.purged_at is not None  # retention's doing, not a failure
            print(f"job {job.id} (series {job.series_instance_uid}): {outcome}")
    since = f" since {args.since.isoformat()}" if args.since else ""
    gone = f" ({purged} purged: send them again)" if purged else ""
    print(f"retried {retried} of {len(jobs)} {args.state} job(s){since}{gone}")
    return 0 if retried + purged == len(jobs) else 1


def _release(args: argparse.Namespace) -> int:
    from dicom_node.app.config import load_config
    from dicom_node.pipeline.segment import resolve_targets
    from dicom_node.pipeline.state import NodeState

    config = load_config(args.config)
    with closing(NodeState(config.node.database_url)) as state:
        targets = resolve_targets(config, *state.calling_peer(args.id))
        print(f"job {args.id}: {state.release(args.id, targets)}")
    return 0


def _reject(args: argparse.Namespace) -> int:
    from dicom_node.app.config import load_config
    from dicom_node.pipeline.state import NodeState

    with closing(NodeState(load_config(args.config).node.database_url)) as state:
        print(f"job {args.id}: {state.reject(args.id)}")
    return 0
