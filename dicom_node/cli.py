"""`dicom-node` command line: a thin layer over the library functions, one subcommand each.

Each subcommand is a pair: `_add_<name>(sub)` declares its arguments and `_<name>(args)` runs
it, importing what it needs lazily so that `dicom-node --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

SubParsers = argparse._SubParsersAction


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node", description="DICOM bone segmentation node for lower-extremity CT."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Subcommands (keep this list in pipeline order).
    _add_evaluate(sub)
    return parser


def _add_evaluate(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="compare predicted label maps with ground truth (Dice, MASD, HD95, HD)",
        description=(
            "Compare predicted bone label maps with ground truth using the paper's metrics: "
            "Dice, symmetric mean absolute surface distance (MASD), 95th-percentile and "
            "maximum Hausdorff distance (HD95, HD), in mm. PRED and TRUTH are two label "
            "files (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd) or two folders. For folders, "
            "every label file under PRED is paired with the file at the same relative path "
            "under TRUTH (e.g. PRED/case1/labels.nii.gz with TRUTH/case1/labels.nii.gz); a "
            "missing counterpart is an error, files only under TRUTH (such as CT images) are "
            "ignored. Paired files must share one grid (shape, and spacing, origin and "
            "direction within 1e-3). Exit status 2 on bad input."
        ),
    )
    parser.add_argument("--pred", type=Path, required=True, metavar="PRED", help="predictions")
    parser.add_argument("--truth", type=Path, required=True, metavar="TRUTH", help="ground truth")
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="write per-case and aggregate metrics as JSON"
    )
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from model.evaluation import EvaluationError, evaluate_paths, format_table, write_json

    try:
        result = evaluate_paths(args.pred, args.truth)
        Console().print(format_table(result))
        if args.json is not None:
            write_json(result, args.json)
    except (EvaluationError, OSError) as error:
        print(f"dicom-node evaluate: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
