"""`dicom-node` command line: argument parsing and printing over the library, one subcommand each.

Each subcommand is a pair: `_add_<name>(sub)` declares its arguments and `_<name>(args)` runs
it, importing what it needs lazily so that `dicom-node --help` stays fast. The model's commands
(`phantom`, `train`, `segment` of a volume file, `segment-phantom`, `evaluate`) are declared in
`model.cli` (also `dicom-node-model`); here they get the config file's [inference] section and
the DICOM phantom series. Drawing lives with what reports: `app.status` and `testbed.demo`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.logs import LogFormat, setup_logging
from model.cli import (
    NIFTI_PHANTOM,
    SEGMENT_FILE_DESCRIPTION,
    PhantomFormat,
    SegmenterSource,
    add_evaluate,
    add_inference_options,
    add_phantom,
    add_segment_phantom,
    add_train,
    run_command,
    segment_volume_file,
)

if TYPE_CHECKING:  # torch loads only when a command needs it: `--help` stays fast
    from model.inference import Segmenter
    from model.phantom import Phantom

SubParsers = argparse._SubParsersAction
Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node", description="DICOM bone segmentation node for lower-extremity CT."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Subcommands (keep this list in pipeline order).
    add_phantom(sub, formats=(_DICOM_PHANTOM, NIFTI_PHANTOM))
    add_train(sub)
    _add_segment(sub)
    add_segment_phantom(sub, _INFERENCE)
    add_evaluate(sub)
    _add_assemble(sub)
    _add_serve(sub)
    _add_status(sub)
    _add_jobs(sub)
    _add_job(sub)
    _add_job_commands(sub)
    _add_echo(sub)
    _add_demo(sub)
    return parser


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="config.toml ([inference] section)")
    add_inference_options(parser, defaults="the config")


def _segmenter(args: argparse.Namespace) -> Segmenter:
    """A Segmenter from the config's [inference] section, with command-line overrides."""
    from dicom_node.app.config import load_inference_config
    from dicom_node.pipeline.inference import build_segmenter

    config = load_inference_config(
        args.config,
        strategy=args.strategy,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        weights=args.weights and str(args.weights),
    )
    return build_segmenter(config, anatomy_check=not args.no_anatomy_check)


_INFERENCE = SegmenterSource(_add_inference_options, _segmenter)


def _write_phantom_series(phantom: Phantom, out_dir: Path) -> dict[str, Path]:
    from dicom_node.testbed.phantom_series import write_phantom_series

    return write_phantom_series(phantom, out_dir)


_DICOM_PHANTOM = PhantomFormat(
    "dicom",
    "OUT/ct/ (a CT series with a synthetic patient; the same phantom is always the same "
    "study), OUT/labels.nii.gz and OUT/geometry.json",
    _write_phantom_series,
)


def _add_segment(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "segment",
        help="segment a DICOM CT series folder into a DICOM SEG, or a volume file into labels",
        description="INPUT a folder of DICOM files: its qualifying CT series (the largest, or "
        "--series) is assembled as the node would ([series] of --config) and OUTPUT is a DICOM "
        "SEG (one segment per bone and side found; none found: no file, exit 0). "
        + SEGMENT_FILE_DESCRIPTION,
    )
    parser.add_argument("input", type=Path, metavar="INPUT")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT")
    parser.add_argument("--series", metavar="UID", help="DICOM input: segment this series")
    _add_inference_options(parser)
    parser.set_defaults(handler=_segment)


def _segment(args: argparse.Namespace) -> int:
    if args.input.is_dir():
        return _segment_dicom(args)
    return segment_volume_file(_segmenter, args)


def _segment_dicom(args: argparse.Namespace) -> int:
    """The daemon's volume -> segment -> SEG path, offline, on one folder."""
    import json

    from dicom_node.app.config import Config, UnsurePolicy, load_config
    from dicom_node.imaging.volume.assemble import choose_series, survey_series
    from dicom_node.imaging.volume.headers import read_headers
    from dicom_node.pipeline.inference import (
        build_sr_writer,
        build_writer,
        save_dicom,
        segment_series,
        sr_path_beside,
    )

    config = load_config(args.config) if args.config else Config()
    survey = choose_series(survey_series(read_headers([args.input]), config.series), args.series)
    segmenter = _segmenter(args)
    writer = build_writer(config, segmenter)
    sr_writer = build_sr_writer(config, writer.algorithm)  # [measurements]
    # No review offline: a SEG the node is unsure of is marked unless the policy is `send`.
    mark = config.verdict.policy != UnsurePolicy.SEND
    result = segment_series(
        survey.paths, config.series, segmenter, writer, mark_unsure=mark, sr_writer=sr_writer
    )
    if result.reason is not None:
        raise ValueError(result.reason)
    if result.dataset is None:
        print(f"{survey.series_instance_uid}: {result.no_findings}; no SEG written")
        return 0
    save_dicom(result.dataset, args.output)
    print(args.output)
    if result.sr is not None:  # the measurement report beside the SEG: OUTPUT_sr.dcm
        save_dicom(result.sr, sr_path_beside(args.output))
        print(sr_path_beside(args.output))
    reported = ("segments", "verdict", "measurements", "timings_s")
    print(json.dumps({k: result.summary[k] for k in reported if k in result.summary}, indent=2))
    return 0


# `assemble` options that override `[series]` keys: (flag, AssemblyPolicy field, type, choices).
_POLICY_OPTIONS = (
    ("--min-slices", "min_slices", int, None),
    ("--max-slice-thickness", "max_slice_thickness_mm", float, None),
    ("--axial-tolerance", "axial_tolerance_deg", float, None),
    ("--irregular-spacing", "irregular_spacing", str, ("resample", "reject")),
    ("--gantry-tilt", "gantry_tilt", str, ("resample", "reject")),
    ("--resample-spacing", "resample_spacing_mm", float, None),
)


def _add_assemble(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "assemble",
        help="assemble a CT series folder into a volume file (HU) for inspection",
        description="Read the DICOM files under SERIES_DIR (other files are ignored) and write "
        "the series as OUTPUT (NIfTI, NRRD or MHA) in Hounsfield units on a regular orthogonal "
        "grid; tilted or irregularly spaced series are resampled or rejected by the [series] "
        "policy. With several series, the qualifying one with most slices is assembled (or "
        "--series UID); with none qualifying, the error lists every series and why. Prints "
        "OUTPUT, then what was done.",
    )
    parser.add_argument("series_dir", type=Path, metavar="SERIES_DIR")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT")
    parser.add_argument("--config", type=Path, help="config.toml ([series] section)")
    parser.add_argument("--series", metavar="UID", help="assemble this SeriesInstanceUID")
    for flag, name, kind, choices in _POLICY_OPTIONS:
        parser.add_argument(flag, dest=name, type=kind, choices=choices, help=f"series.{name}")
    parser.set_defaults(handler=_assemble)


def _assemble(args: argparse.Namespace) -> int:
    from dicom_node.app.config import load_assembly_policy
    from dicom_node.imaging.volume.assemble import assemble_volume, choose_series, survey_series
    from dicom_node.imaging.volume.headers import read_headers
    from model.volume_io import is_volume_file, write_volume

    if not is_volume_file(args.output):
        raise ValueError(f"{args.output}: OUTPUT must end in .nii.gz, .nii, .nrrd or .mha")
    overrides = {name: getattr(args, name) for _, name, _, _ in _POLICY_OPTIONS}
    policy = load_assembly_policy(args.config, **overrides)
    headers = read_headers([args.series_dir])
    surveys = survey_series(headers, policy)
    chosen = choose_series(surveys, args.series)
    assembled = assemble_volume(chosen.paths, policy)
    write_volume(assembled.volume, args.output)
    print(args.output)
    if headers.skipped:
        print(f"ignored non-DICOM files: {headers.skipped}")
    for survey in surveys:
        if survey is not chosen:
            print(
                f"not assembled: series {survey.series_instance_uid or '(no UID)'}: "
                f"{survey.reason or f'fewer slices ({survey.slices})'}"
            )
    for note in assembled.notes:
        print(note)
    return 0


def _add_serve(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the DICOM node: receive CT over C-STORE, complete and select series",
        description="Listen as [node] ae_title on [node] bind:port (C-ECHO, C-STORE of every "
        "storage SOP class), spool what arrives under [node] data_dir and track each series "
        "until it is complete and selected. Stops cleanly on SIGTERM or SIGINT.",
    )
    parser.add_argument("--config", type=Path, default=Path("config.toml"))
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from dicom_node.app.config import load_config
    from dicom_node.app.daemon import serve

    try:
        config = load_config(args.config)
    except BaseException:
        setup_logging(LogFormat.TEXT, _log_level(args))  # what was held, before the error
        raise
    setup_logging(config.log.format, _log_level(args))  # [log] format; the worker follows it
    # pynetdicom's debug output dumps datasets: never below INFO, so no identifiers in logs.
    logging.getLogger("pynetdicom").setLevel(logging.INFO if args.verbose else logging.WARNING)
    serve(config, args.config)
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


def _report(value: Any, as_json: bool, render: Callable[[Any], Any]) -> int:
    """Print a report as JSON (for scripts) or rendered with rich (for people)."""
    import json

    from rich.console import Console

    if as_json:
        print(json.dumps(value, indent=2))
    else:
        Console().print(render(value))
    return 0


def _status(args: argparse.Namespace) -> int:
    from dicom_node.app.config import load_config
    from dicom_node.app.status import node_status, render

    return _report(node_status(load_config(args.config), args.limit), args.json, render)


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
    return _report(jobs, args.json, render_jobs)


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
    return _report(report, args.json, render_job)


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


def _add_job_commands(sub: SubParsers) -> None:
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


def _add_echo(sub: SubParsers) -> None:
    parser = sub.add_parser("echo", help="C-ECHO a configured destination")
    parser.add_argument("destination", metavar="DEST", help="its name in [[destinations]]")
    parser.add_argument("--config", type=Path, default=Path("config.toml"))
    parser.set_defaults(handler=_echo)


def _echo(args: argparse.Namespace) -> int:
    from dicom_node.app.config import load_config
    from dicom_node.net.send import echo

    config = load_config(args.config)
    destination = config.destination(args.destination)
    result = echo(destination, config.node.ae_title, config.delivery.timeout_s)
    peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if not result.ok:
        print(f"{args.destination} ({peer}): {result.reason}", file=sys.stderr)
        return 1
    print(f"{args.destination} ({peer}): ok, {result.round_trip_ms:.1f} ms")
    return 0


def _add_demo(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "demo",
        help="end to end: phantom CT -> node (C-STORE) -> SEG at a local PACS, with a report",
        description="Generate a phantom CT series, start a node and a local PACS (Orthanc if "
        "installed, else a pynetdicom storage SCP) on free loopback ports, send the series, "
        "wait for the SEG at the PACS, and report timings per stage, segments with volumes, "
        "Dice against the phantom's truth, and a PNG preview. Phantom figures are not "
        "clinical accuracy.",
    )
    parser.add_argument("--workdir", type=Path, help="default: a new folder under /tmp")
    parser.add_argument("--seed", type=int, default=1003, help="phantom seed (1003: a hip)")
    parser.add_argument("--size", choices=["small", "full"], default="small")
    parser.add_argument("--region", choices=["whole_legs", "lower_legs", "torso"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument(
        "--pacs",
        choices=["auto", "orthanc", "scp"],
        default="auto",
        help="auto: Orthanc if installed",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    import tempfile
    from functools import partial

    from dicom_node.testbed.demo import render_report, run_demo

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dicom-node-demo-"))
    report = run_demo(workdir, args.seed, args.size, args.region, args.threads, args.pacs)
    return _report(report, args.json, partial(render_report, workdir=workdir))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `serve` logs in its config's [log] format: held until it has read the file.
    setup_logging(None if args.command == "serve" else LogFormat.TEXT, _log_level(args))
    return run_command(args, "dicom-node")


def _log_level(args: argparse.Namespace) -> int:
    return logging.DEBUG if args.verbose else logging.INFO


if __name__ == "__main__":
    sys.exit(main())
