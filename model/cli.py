"""`dicom-node-model` (also `python -m model`): the model's commands, without DICOM.

`phantom` generates a synthetic CT with its truth, `train` trains the cascade, `segment`
segments a volume file, `segment-phantom` scores the model on phantoms and `evaluate` compares
label maps. Each command is a pair: `add_<name>(sub, ...)` declares its arguments and a handler
runs it, importing torch only then, so that `--help` stays fast.

`dicom-node` offers the same commands as its own sub-commands by calling the `add_*` functions
with what only it has: a `SegmenterSource` that reads its config file's [inference] section,
and a `PhantomFormat` that writes a DICOM series. This module never imports `dicom_node`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from model.settings import Device, Precision, Strategy

if TYPE_CHECKING:  # torch loads only when a command needs it
    from model.engine.inference import Progress, Segmenter
    from model.phantom import Phantom

SubParsers = argparse._SubParsersAction
Handler = Callable[[argparse.Namespace], int]
# What a command does with bad input (a missing file, a bad config, a wrong grid): one line on
# stderr and exit status 2, not a traceback.
BAD_INPUT_ERRORS = (OSError, ValueError, RuntimeError, LookupError)


@dataclass(frozen=True)
class SegmenterSource:
    """Where a command's segmenter comes from: the options that choose it and the function
    that builds it from the parsed options."""

    add_options: Callable[[argparse.ArgumentParser], None]
    build: Callable[[argparse.Namespace], Segmenter]


@dataclass(frozen=True)
class PhantomFormat:
    """One way `phantom` writes a phantom: `--format NAME` writes `writes` (for --help) by
    calling `write(phantom, out_dir)`, which imports what it needs only when called."""

    name: str
    writes: str
    write: Callable[[Phantom, Path], dict[str, Path]]


def add_inference_options(parser: argparse.ArgumentParser, defaults: str = "") -> None:
    """The options that choose how the segmenter runs; `defaults` names what they override
    (for --help), e.g. "the config"."""

    def default(value: str) -> str:
        return f"overrides {defaults}" if defaults else f"default: {value}"

    # Choices as plain strings: argparse names them by repr in its error message.
    strategies, precisions = [s.value for s in Strategy], [p.value for p in Precision]
    parser.add_argument("--strategy", choices=strategies, help=default(Strategy.FAST))
    parser.add_argument("--device", help=f"cpu, cuda, cuda:N or auto; {default(Device.AUTO)}")
    parser.add_argument("--precision", choices=precisions, help=default(Precision.AUTO))
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--weights", type=Path, help="safetensors weights (default: shipped)")
    parser.add_argument(
        "--no-anatomy-check",
        action="store_true",
        help="keep bone pieces where no lower extremity has them (model/engine/anatomy.py), "
        "e.g. to score the model's raw output",
    )


def segmenter_from_options(args: argparse.Namespace) -> Segmenter:
    """A Segmenter from the inference options alone; what they leave out is the default."""
    from model.engine.inference import InferenceSettings, Segmenter
    from model.engine.weights import DEFAULT_WEIGHTS

    chosen = {"strategy": args.strategy, "device": args.device, "precision": args.precision}
    settings = InferenceSettings(
        **{name: value for name, value in chosen.items() if value},
        threads=args.threads or None,
        anatomy_check=not args.no_anatomy_check,
    )
    return Segmenter(args.weights or DEFAULT_WEIGHTS, settings)


OPTIONS_ONLY = SegmenterSource(add_inference_options, segmenter_from_options)


def _write_nifti(phantom: Phantom, out_dir: Path) -> dict[str, Path]:
    from model.phantom import write_phantom_nifti

    return write_phantom_nifti(phantom, out_dir)


NIFTI_PHANTOM = PhantomFormat(
    "nifti", "OUT/image.nii.gz, OUT/labels.nii.gz and OUT/geometry.json", _write_nifti
)


def _parse_seeds(text: str) -> list[int]:
    """'1-4,9' -> [1, 2, 3, 4, 9]."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


def add_phantom(sub: SubParsers, formats: Sequence[PhantomFormat] = (NIFTI_PHANTOM,)) -> None:
    """`phantom`, writing each of `formats` (the first is the default)."""
    writes = "; ".join(f"--format {f.name} writes {f.writes}" for f in formats)
    parser = sub.add_parser(
        "phantom",
        help="generate a synthetic lower-extremity CT with its ground truth",
        description=f"Generate the phantom of SEED. {writes}. Prints one line per output.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--size", choices=["small", "full"], default="full")
    by_name = {f.name: f for f in formats}
    parser.add_argument("--format", choices=list(by_name), default=formats[0].name)
    parser.add_argument(
        "--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="mm (default: drawn)"
    )
    parser.add_argument(
        "--region",
        help="full: whole_legs, torso, lower_legs; small: hip, knee, ankle (default: drawn)",
    )
    parser.set_defaults(handler=partial(_phantom, by_name))


def _phantom(formats: dict[str, PhantomFormat], args: argparse.Namespace) -> int:
    from model.phantom import generate_phantom

    spacing = tuple(args.spacing) if args.spacing else None
    phantom = generate_phantom(args.seed, args.size, spacing=spacing, region=args.region)
    paths = formats[args.format].write(phantom, args.out)
    print(*paths.values(), sep="\n")
    return 0


def add_train(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "train",
        help="train the cascade on image/label volumes or generated phantoms",
        description="Train the cascaded V-net. DATA folders hold <case>/image.* + labels.* "
        "(NIfTI, NRRD or MHA; what `phantom --format nifti` writes) or images*/ + labels*/ "
        "with equal file names. --phantom-seeds generates phantoms instead of (or besides) "
        "reading files. Every case is prepared once into OUT/cases (--case-cache) and trained "
        "on from there, memory-mapped; a resumed run finds them there. Resumes from "
        "OUT/checkpoint.safetensors if present.",
    )
    parser.add_argument("data", nargs="*", type=Path, metavar="DATA")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, weights)")
    parser.add_argument("--phantom-seeds", type=_parse_seeds, default=[], help="e.g. 100-115")
    parser.add_argument("--phantom-size", choices=["small", "full"], default="full")
    parser.add_argument(
        "--subject-seeds",
        type=_parse_seeds,
        default=[],
        help="subject phantoms (real bone shapes; CT drawn afresh each step), e.g. 1-40",
    )
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[128, 64, 32])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bone-fraction",
        type=float,
        default=0.67,
        help="share of samples centred on a bone voxel, each bone equally often",
    )
    parser.add_argument(
        "--distractor-fraction",
        type=float,
        default=0.0,
        help="share of samples centred on dense tissue that is none of the six bones",
    )
    parser.add_argument(
        "--joint-fraction",
        type=float,
        default=0.0,
        help="share of samples centred where two bones nearly touch (hip, knee, ankle joints)",
    )
    parser.add_argument(
        "--metal-fraction",
        type=float,
        default=0.0,
        help="share of samples centred on metal implants (in cases that have one)",
    )
    parser.add_argument("--threads", type=int, help="torch threads for the network")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes generating phantoms and drawing batches (a GPU wants ~15)",
    )
    parser.add_argument(
        "--init", type=Path, metavar="WEIGHTS", help="start a new run from these weights"
    )
    parser.add_argument(
        "--case-cache",
        type=Path,
        metavar="DIR",
        help="where prepared cases are kept and found again (default: OUT/cases; about 0.75 GB "
        "a whole-leg phantom)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from model.engine.network import CascadeConfig
    from model.training.loop import TrainingSettings, load_cases, train

    if not args.data and not args.phantom_seeds and not args.subject_seeds:
        raise ValueError("give DATA folders, --phantom-seeds or --subject-seeds")
    config = CascadeConfig(patch_sizes=tuple(args.patch_sizes))
    cases, metadata = load_cases(
        args.data,
        args.phantom_seeds,
        args.phantom_size,
        config,
        cache_dir=args.case_cache or args.out / "cases",
        workers=args.workers,
        subject_seeds=args.subject_seeds,
    )
    settings = TrainingSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        bone_fraction=args.bone_fraction,
        distractor_fraction=args.distractor_fraction,
        joint_fraction=args.joint_fraction,
        metal_fraction=args.metal_fraction,
        threads=args.threads,
        device=args.device,
        workers=args.workers,
        init_weights=args.init,
    )
    weights = train(cases, args.out, config, settings, metadata, progress=not args.no_progress)
    print(weights)
    return 0


SEGMENT_FILE_DESCRIPTION = (
    "INPUT a volume file of HU (NIfTI, NRRD, MHA): OUTPUT is a label map on the input's grid: "
    "0 background, 1 femur, 2 hip bone, 3 tibia, 4 fibula, 5 talus, 6 calcaneus; beside it "
    "<stem>_sided.<ext> (1..6 right, 7..12 left) and <stem>.json naming the labels."
)


def add_segment(sub: SubParsers, source: SegmenterSource = OPTIONS_ONLY) -> None:
    parser = sub.add_parser(
        "segment",
        help="segment a volume file into labels",
        description=SEGMENT_FILE_DESCRIPTION,
    )
    parser.add_argument("input", type=Path, metavar="INPUT")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT")
    add_quiet_option(parser)
    source.add_options(parser)
    parser.set_defaults(handler=partial(segment_volume_file, source.build))


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars (none unless on a terminal)"
    )


@contextmanager
def stage_progress(quiet: bool) -> Iterator[Progress | None]:
    """A progress bar on stderr for each stage a segmentation reports (read, resample,
    inference, post-processing, write), when stderr is a terminal and not `quiet`; else None.
    The bars name stages only, nothing of the scan."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description:<15}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f} %"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bars:
        stages: dict[str, TaskID] = {}

        def show(stage: str, done: float) -> None:
            if stage not in stages:
                stages[stage] = bars.add_task(stage, total=1.0)
            bars.update(stages[stage], completed=done)

        yield show


def segment_volume_file(
    build_segmenter: Callable[[argparse.Namespace], Segmenter], args: argparse.Namespace
) -> int:
    """`segment INPUT -o OUTPUT` of a volume file: prints the files written, and warns on
    stderr when the verdict is not plausible."""
    from model.engine.segment_files import segment_file
    from model.engine.verdict import Verdict

    segmenter = build_segmenter(args)
    with stage_progress(args.quiet) as progress:
        segmentation, paths = segment_file(args.input, args.output, segmenter, progress)
    print(*paths.values(), sep="\n")
    assessment = segmentation.assessment
    if assessment.verdict is Verdict.IMPLAUSIBLE:
        # Written so it can be looked at; the node would send no SEG for it.
        print(
            f"warning: {'; '.join(assessment.reasons)}: not the bones of a lower extremity as "
            "segmented (the sidecar's 'verdict'); the node reports no findings for such a scan",
            file=sys.stderr,
        )
    elif assessment.verdict is Verdict.UNSURE:
        print(f"warning: {assessment.headline()} (the sidecar's 'verdict')", file=sys.stderr)
    return 0


def add_segment_phantom(sub: SubParsers, source: SegmenterSource = OPTIONS_ONLY) -> None:
    parser = sub.add_parser(
        "segment-phantom",
        help="generate phantom CTs, segment them, print Dice/MASD/HD95 against their truth",
    )
    parser.add_argument("--seeds", type=_parse_seeds, default=[1001], help="e.g. 1001-1003")
    parser.add_argument("--size", choices=["small", "full"], default="small")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the metrics as JSON")
    source.add_options(parser)
    parser.set_defaults(handler=partial(_segment_phantom, source.build))


def _segment_phantom(
    build_segmenter: Callable[[argparse.Namespace], Segmenter], args: argparse.Namespace
) -> int:
    from rich.console import Console

    from model.evaluation.compare import format_table, write_json
    from model.evaluation.phantom_check import segment_phantoms

    result = segment_phantoms(args.seeds, args.size, build_segmenter(args))
    console = Console()
    console.print(format_table(result))
    for case in result["cases"]:
        console.print(f"{case['case']}: {case['shape']} voxels, {case['timings_s']}")
    console.print(
        "Scored "
        + ("without" if args.no_anatomy_check else "after")
        + " the anatomy check (misplaced pieces left out, as in the node's SEG)."
    )
    console.print("Phantom data: these figures show the engine works, not clinical accuracy.")
    if args.json is not None:
        write_json(result, args.json)
    return 0


def add_evaluate(sub: SubParsers) -> None:
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

    from model.evaluation.compare import evaluate_paths, format_table, write_json

    result = evaluate_paths(args.pred, args.truth)
    Console().print(format_table(result))
    if args.json is not None:
        write_json(result, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node-model",
        description="The bone segmentation model: phantoms, training, segmenting volume files, "
        "scoring.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_phantom(sub)
    add_train(sub)
    add_segment(sub)
    add_segment_phantom(sub)
    add_evaluate(sub)
    return parser


def run_command(args: argparse.Namespace, prog: str) -> int:
    """Run the parsed command's handler; bad input is one line on stderr and exit status 2
    (--verbose raises it, to show where it came from)."""
    try:
        return int(args.handler(args))
    except BAD_INPUT_ERRORS as error:
        if args.verbose:
            raise
        print(f"{prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_command(args, "dicom-node-model")


if __name__ == "__main__":
    sys.exit(main())
