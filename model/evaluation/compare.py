"""Comparing predicted label files with ground truth: pairing, grid checks, aggregation, output.

The metrics themselves live in `model.metrics`; this module turns files into per-case results
(`evaluate_files`), summarises cases as mean ± SD per bone like the paper's tables, and
renders them as a rich table or JSON. Raw results keep inf/NaN (a missed bone has an infinite
surface distance); `json_safe` maps those to null because JSON has no such literals.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from rich.table import Table

from model.labels import BONE_NAMES
from model.metrics import METRIC_KEYS, evaluate_labels
from model.volume_io import Volume, is_volume_file, read_volume

# Largest difference in spacing or origin (mm), or in direction cosines, that still counts as
# the same grid: float rounding in file headers, far below any voxel.
GRID_TOLERANCE = 1e-3

# Table columns: (metric key, header, decimals), in the paper's order.
_COLUMNS = (
    ("dice", "Dice", 3),
    ("masd_mm", "MASD (mm)", 2),
    ("hd95_mm", "HD95 (mm)", 2),
    ("hd_mm", "HD (mm)", 2),
)


class EvaluationError(ValueError):
    """Bad input to an evaluation (missing file, mismatched grids, not a label map).

    Its message is one line naming the offending file, fit to show a user as is.
    """


def pair_label_files(pred: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    """(case name, prediction, truth) triples, sorted by case name.

    Two files make one case. For two folders, every volume file anywhere under `pred` pairs
    with the file at the same relative path under `truth` (which names the case), and a
    missing counterpart is an error; files only under `truth` are ignored, so a phantom or
    dataset folder holding `<case>/ct.nii.gz` next to `<case>/labels.nii.gz` can serve as truth
    for a folder of predicted `<case>/labels.nii.gz`.
    """
    for path in (pred, truth):
        if not path.exists():
            raise EvaluationError(f"no such file or folder: {path}")
    if pred.is_file() and truth.is_file():
        return [(pred.name, pred, truth)]
    if not (pred.is_dir() and truth.is_dir()):
        raise EvaluationError(f"{pred} and {truth} must both be label files or both folders")
    preds, truths = _volume_files(pred), _volume_files(truth)
    if not preds:
        raise EvaluationError(f"{pred}: no label files (NIfTI, NRRD or MHA) in this folder")
    missing = sorted(set(preds) - set(truths))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EvaluationError(
            f"{truth}: no ground truth {missing[0]} for {pred / missing[0]}{more}"
        )
    return [(case, preds[case], truths[case]) for case in sorted(preds)]


def evaluate_files(
    pred_paths: Sequence[Path],
    truth_paths: Sequence[Path],
    case_names: Sequence[str] | None = None,
    labels: Mapping[int, str] = BONE_NAMES,
) -> dict:
    """Metrics of each (prediction, truth) pair and their aggregate over cases.

    Returns {"cases": [{"case", "pred", "truth", "bones", "mean"}], "aggregate": ...}, where
    "bones" and "mean" are as in `model.metrics.evaluate_labels` and "aggregate" as in
    `aggregate_cases`. Pairs are read one at a time so that only two scans are ever in memory.
    """
    if len(pred_paths) != len(truth_paths):
        raise ValueError(f"{len(pred_paths)} predictions but {len(truth_paths)} truths")
    names = case_names if case_names is not None else [Path(p).name for p in pred_paths]
    cases = []
    for name, pred_path, truth_path in zip(names, pred_paths, truth_paths, strict=True):
        pred, truth = _read_label_map(Path(pred_path)), _read_label_map(Path(truth_path))
        _check_same_grid(pred, truth, Path(pred_path), Path(truth_path))
        metrics = evaluate_labels(pred.array, truth.array, truth.spacing, labels)
        cases.append({"case": name, "pred": str(pred_path), "truth": str(truth_path), **metrics})
    return {"cases": cases, "aggregate": aggregate_cases(cases, labels)}


def evaluate_paths(pred: Path, truth: Path, labels: Mapping[int, str] = BONE_NAMES) -> dict:
    """`evaluate_files` on two label files or two folders paired by `pair_label_files`."""
    pairs = pair_label_files(pred, truth)
    names, preds, truths = zip(*pairs, strict=True)
    return evaluate_files(preds, truths, names, labels)


def aggregate_cases(cases: Sequence[Mapping], labels: Mapping[int, str] = BONE_NAMES) -> dict:
    """Mean and sample SD over cases, per bone and of the per-case means.

    A bone's statistics use the cases whose truth contains it ("n_cases"); "n_spurious" counts
    the cases where it was predicted but is absent from the truth, which no mean shows. A mean
    is inf when any case is (a missed bone); an SD is NaN for fewer than two finite cases.
    """
    bones = {}
    for name in labels.values():
        rows = [case["bones"][name] for case in cases]
        present = [row for row in rows if row["truth_voxels"] > 0]
        bones[name] = {
            "n_cases": len(present),
            "n_spurious": sum(1 for row in rows if row["truth_voxels"] == 0 < row["pred_voxels"]),
            **{key: _mean_sd([row[key] for row in present]) for key in METRIC_KEYS},
        }
    means = [case["mean"] for case in cases if case["mean"]["n_bones"] > 0]
    return {
        "n_cases": len(cases),
        "bones": bones,
        "mean": {
            "n_cases": len(means),
            **{key: _mean_sd([m[key] for m in means]) for key in METRIC_KEYS},
        },
    }


def format_table(result: Mapping) -> Table:
    """Rich table of the aggregate, per bone and a mean row (over the bones in each truth):
    mean ± SD over cases when there are several, plain values for one; "—" for no data."""
    aggregate = result["aggregate"]
    several = aggregate["n_cases"] > 1
    if several:
        title = f"{aggregate['n_cases']} cases, mean ± SD; n: cases whose truth has the bone"
    else:
        title = result["cases"][0]["case"] if result["cases"] else "no cases"
    table = Table(title=f"Segmentation metrics: {title}")
    table.add_column("Bone")
    if several:
        table.add_column("n", justify="right")
    for _, header, _ in _COLUMNS:
        table.add_column(header, justify="right")

    rows = [*aggregate["bones"].items(), ("mean", aggregate["mean"])]
    for index, (name, stats) in enumerate(rows):
        cells = [name] + ([str(stats["n_cases"])] if several else [])
        cells += [_format_stat(stats[key], digits, several) for key, _, digits in _COLUMNS]
        is_mean = index == len(rows) - 1
        table.add_row(*cells, end_section=index == len(rows) - 2, style="bold" if is_mean else None)

    notes = [
        f"{name}: predicted in {stats['n_spurious']} case(s) whose truth has none"
        for name, stats in aggregate["bones"].items()
        if stats["n_spurious"]
    ]
    if notes:
        table.caption = "; ".join(notes)
    return table


def json_safe(value: object) -> object:
    """A copy of nested dicts/lists/tuples with numpy scalars made plain and inf/NaN as None."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(result: Mapping, path: Path) -> None:
    """Write a result as strict JSON (no NaN/Infinity literals; they become null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")


def _volume_files(folder: Path) -> dict[str, Path]:
    """Volume files under a folder, keyed by their relative POSIX path."""
    return {
        path.relative_to(folder).as_posix(): path
        for path in folder.rglob("*")
        if path.is_file() and is_volume_file(path)
    }


def _read_label_map(path: Path) -> Volume:
    """Read a label file as an integer label map; float files holding whole numbers pass."""
    try:
        volume = read_volume(path)
    except (OSError, RuntimeError, ValueError) as error:  # SimpleITK raises RuntimeError
        raise EvaluationError(
            f"{path}: cannot read: {str(error).strip().splitlines()[0]}"
        ) from error
    array = volume.array
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(array == np.round(array)):
            raise EvaluationError(f"{path}: not a label map (non-integer {array.dtype} values)")
        volume = volume.with_array(array.astype(np.int32))
    return volume


def _check_same_grid(pred: Volume, truth: Volume, pred_path: Path, truth_path: Path) -> None:
    """Refuse to compare label maps on different grids: voxelwise metrics would be meaningless."""
    if pred.array.shape != truth.array.shape:
        raise EvaluationError(
            f"{pred_path}: shape {pred.array.shape} (z, y, x) differs from "
            f"{truth.array.shape} of {truth_path}"
        )
    for name in ("spacing", "origin", "direction"):
        mine, theirs = getattr(pred, name), getattr(truth, name)
        if not np.allclose(mine, theirs, rtol=0.0, atol=GRID_TOLERANCE):
            raise EvaluationError(
                f"{pred_path}: {name} {_fmt_vector(mine)} differs from "
                f"{_fmt_vector(theirs)} of {truth_path}"
            )


def _fmt_vector(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return {"mean": math.nan, "sd": math.nan}
    finite = np.isfinite(array).all()
    sd = float(array.std(ddof=1)) if array.size > 1 and finite else math.nan
    return {"mean": float(array.mean()), "sd": sd}


def _format_stat(stat: Mapping[str, float], digits: int, with_sd: bool) -> str:
    text = _format_number(stat["mean"], digits)
    if with_sd and math.isfinite(stat["sd"]):
        text += f" ± {stat['sd']:.{digits}f}"
    return text


def _format_number(value: float, digits: int) -> str:
    if math.isnan(value):
        return "—"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"
