"""`dicom-node` command line: argument parsing and printing over the library, one subcommand each.

Each subcommand is a pair: `_add_<name>(sub)` declares its arguments and `_<name>(args)` runs
it, importing what it needs lazily so that `dicom-node --help` stays fast. The model's commands
(`phantom`, `train`, `segment` of a volume file, `segment-phantom`, `evaluate`) are declared in
`model.cli` (also `dicom-node-model`); here they get the config file's [inference] section and
the DICOM phantom series. The commands on the node's jobs (`status`, `jobs`, `job`, `retry`,
`release`, `reject`) are in `app.cli_jobs`. Drawing lives with what reports: `app.status` and
`testbed.demo`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.app.cli_jobs import SubParsers, add_job_commands, print_report
from dicom_node.logs import LogFormat, setup_logging
from model.cli import (
    NIFTI_PHANTOM,
    SEGMENT_FILE_DESCRIPTION,
    PhantomFormat,
    SegmenterSource,
    add_evaluate,
    add_inference_options,
    add_phantom,
    add_quiet_option,
    add_segment_phantom,
    add_train,
    run_command,
    segment_volume_file,
)

if TYPE_CHECKING:  # torch loads only when a command needs it: `--help` stays fast
    from model.engine.inference import Segmenter
    from model.phantom import Phantom


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
    add_job_commands(sub)  # status, jobs, job, retry, release, reject
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
    add_quiet_option(parser)
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
        key_image_path_beside,
        key_image_sc_path_beside,
        save_dicom,
        segment_series,
        sr_path_beside,
    )
    from dicom_node.pipeline.spool import write_durably

    config = load_config(args.config) if args.config else Config()
    survey = choose_series(survey_series(read_headers([args.input]), config.series), args.series)
    segmenter = _segmenter(args)
    writer = build_writer(config, segmenter)
    sr_writer = build_sr_writer(config, writer.algorithm)  # [measurements]
    # No review offline: a SEG the node is unsure of is marked unless the policy is `send`.
    mark = config.verdict.policy != UnsurePolicy.SEND
    result = segment_series(
        survey.paths,
        config.series,
        segmenter,
        writer,
        mark_unsure=mark,
        sr_writer=sr_writer,
        key_image_dicom=config.measurements.key_image,
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
    if result.key_image is not None:  # and its key image: OUTPUT_key.png
        write_durably(key_image_path_beside(args.output), [result.key_image])
        print(key_image_path_beside(args.output))
    if result.key_image_sc is not None:  # [measurements] key_image: OUTPUT_key.dcm
        save_dicom(result.key_image_sc, key_image_sc_path_beside(args.output))
        print(key_image_sc_path_beside(args.output))
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
    parser.add_argument(
        "--role",
        choices=("receive", "worker"),
        help="with [cluster] enabled: a reception node (receive, select, hand queued series to "
        "the broker, deliver) or an inference worker (take series from the broker)",
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from dicom_node.app.config import ConfigError, load_config
    from dicom_node.app.daemon import serve

    try:
        config = load_config(args.config)
    except BaseException:
        setup_logging(LogFormat.TEXT, _log_level(args))  # what was held, before the error
        raise
    setup_logging(config.log.format, _log_level(args))  # [log] format; the worker follows it
    # pynetdicom's debug output dumps datasets: never below INFO, so no identifiers in logs.
    logging.getLogger("pynetdicom").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if config.cluster.enabled != (args.role is not None):
        raise ConfigError(
            "serve --role: receive or worker with [cluster] enabled = true, none without"
        )
    if args.role == "worker":
        from dicom_node.cluster.worker import run_worker  # Celery: the `cluster` extra

        run_worker(config)
    else:
        serve(config, args.config)
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
        "Dice against the phantom's truth, and a PNG preview. Progress goes to stderr, the "
        "full log to WORKDIR/demo.log. Phantom figures are not clinical accuracy.",
    )
    parser.add_argument("--workdir", type=Path, help="default: a new folder under /tmp")
    parser.add_argument("--seed", type=int, default=1003, help="phantom seed (1003: a hip)")
    parser.add_argument(
        "--size",
        choices=["small", "full"],
        default="small",
        help="small: one joint (default); full: the whole-leg phantom, hips to feet",
    )
    parser.add_argument(
        "--region", choices=["whole_legs", "lower_legs", "torso"], help="full: default whole_legs"
    )
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
    return print_report(report, args.json, partial(render_report, workdir=workdir))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `serve` logs in its config's [log] format: held until it has read the file.
    setup_logging(None if args.command == "serve" else LogFormat.TEXT, _log_level(args))
    return run_command(args, "dicom-node")


def _log_level(args: argparse.Namespace) -> int:
    return logging.DEBUG if args.verbose else logging.INFO


if __name__ == "__main__":
    sys.exit(main())
