"""Training the cascade: data discovery, deep-supervised loss, the resumable loop."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import Tensor
from tqdm import tqdm

from model.engine.network import CascadeConfig, CascadedVNet, pick_device
from model.engine.postprocess import BODY_HU
from model.engine.weights import load_checkpoint, load_weights, save_checkpoint, save_weights
from model.resample import image_to_model_grid, labels_to_model_grid
from model.settings import Device
from model.training.sampling import TrainingCase, augment, draw_sample
from model.volume_io import is_volume_file, read_volume

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class TrainingSettings:
    steps: int = 4000
    batch_size: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 100
    bone_fraction: float = 0.67
    # Samples that see a field of view cut around them (`model.training.sampling.field_of_view`).
    truncated_fraction: float = 0.3
    # Samples centred on dense tissue that is none of the six bones (`model.training.sampling`).
    # Off by default: alone (0.15, CHANGELOG.md) it mended the foot and knee but lost the femoral
    # head on hip crops; the phantom-only weights' last run had 0.1 beside joint samples.
    distractor_fraction: float = 0.0
    # Samples centred where two bones nearly touch (`model.training.sampling.joint_surfaces`), to
    # keep the femoral head that distractor samples alone lost; the phantom-only weights' last run
    # had 0.15. Taken before `bone_fraction`: joint + bone + distractor + metal <= 1.
    joint_fraction: float = 0.0
    # Samples centred on metal implants (`model.training.sampling.METAL_SAMPLE_HU`); a case without
    # metal gives its share to random voxels.
    metal_fraction: float = 0.0
    threads: int | None = None
    device: str = Device.CPU  # a Device or cuda:N; CUDA trains in bfloat16 autocast
    # Processes drawing batches while the network trains: sampling (about 45 ms a sample on one
    # core) is what limits a GPU, which needs ~15 workers to stay busy; one suits 2 CPU cores.
    workers: int = 1
    # Weights a new run starts from (fine-tuning, e.g. the shipped weights on a hospital's own
    # annotated scans); ignored when resuming from a checkpoint.
    init_weights: Path | None = None

    def __post_init__(self) -> None:
        shares = {
            "joint_fraction": self.joint_fraction,
            "bone_fraction": self.bone_fraction,
            "distractor_fraction": self.distractor_fraction,
            "metal_fraction": self.metal_fraction,
        }
        for name, share in {**shares, "truncated_fraction": self.truncated_fraction}.items():
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {share}")
        # Shares are taken in this order (`draw_sample`): past 1, the last ones silently shrink.
        if sum(shares.values()) > 1.0 + 1e-9:
            named = " + ".join(f"{name} {share}" for name, share in shares.items())
            raise ValueError(f"sample shares add up to more than 1: {named}")


def find_training_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, labels) file pairs under `folder`.

    Two layouts: one folder per case holding `image.*` and `labels.*` (what `dicom-node phantom
    --format nifti` writes), or sibling folders `images*/` and `labels*/` with equal file names
    (the nnU-Net convention, e.g. imagesTr/ and labelsTr/).
    """
    folder = Path(folder)
    pairs = []
    for image in sorted(folder.rglob("image.*")):
        if not is_volume_file(image):
            continue
        labels = [p for p in image.parent.glob("labels.*") if is_volume_file(p)]
        if labels:
            pairs.append((image, labels[0]))
    for images_dir in sorted(p for p in folder.rglob("images*") if p.is_dir()):
        labels_dir = images_dir.with_name(images_dir.name.replace("images", "labels", 1))
        for image in sorted(images_dir.iterdir()):
            if is_volume_file(image) and (labels_dir / image.name).is_file():
                pairs.append((image, labels_dir / image.name))
    if not pairs:
        raise FileNotFoundError(
            f"{folder}: no training pairs (<case>/image.* + labels.*, or images*/ + labels*/)"
        )
    return pairs


def prepare_case(
    image_path: Path, labels_path: Path, spacing_mm: float, rng: np.random.Generator
) -> TrainingCase:
    """Load one pair and bring both to the model's isotropic grid."""
    image_volume, label_volume = read_volume(image_path), read_volume(labels_path)
    if image_volume.array.shape != label_volume.array.shape:
        raise ValueError(f"{labels_path}: shape differs from {image_path}")
    image = image_to_model_grid(image_volume, spacing_mm)
    labels = labels_to_model_grid(label_volume, spacing_mm)
    return TrainingCase.from_arrays(
        str(image_path.parent),
        sitk.GetArrayViewFromImage(image).astype(np.int16),
        sitk.GetArrayFromImage(labels),
        rng,
    )


def crop_to_body(
    hu: np.ndarray, labels: np.ndarray, margin: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Drop the air around the body: it costs memory and teaches nothing a margin does not."""
    body = np.argwhere(hu[::4, ::4, ::4] > BODY_HU) * 4
    if body.size == 0:
        return hu, labels
    lo = np.maximum(body.min(axis=0) - margin, 0)
    hi = np.minimum(body.max(axis=0) + margin + 4, hu.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return np.ascontiguousarray(hu[box]), np.ascontiguousarray(labels[box])


def phantom_case(seed: int, size: str, spacing_mm: float) -> TrainingCase:
    """Phantom `seed` at the model's spacing, cropped to the body, as a training case."""
    from model.phantom import generate_phantom

    phantom = generate_phantom(seed, size, spacing=(spacing_mm,) * 3)
    hu, labels = crop_to_body(phantom.image.array, phantom.labels.array)
    return TrainingCase.from_arrays(f"phantom-{seed}", hu, labels, np.random.default_rng(seed))


def subject_phantom_case(seed: int) -> TrainingCase:
    """Subject phantom `seed` (`model.phantom.subjects`, at the model's 0.8 mm) as a training
    case: its tissue map, from which every sample's CT is drawn afresh."""
    from model.phantom.subjects import generate_subject_phantom

    phantom = generate_subject_phantom(seed)
    return TrainingCase.from_arrays(
        f"subject-phantom-{seed}",
        phantom.nominal_image(),
        phantom.labels.array,
        np.random.default_rng(seed),
        tissues=phantom.tissues.array,
    )


# Part of every cached case's folder name: raise it when `TrainingCase.from_arrays` changes
# what it keeps (the voxels it samples for joints, distractors, metal), so that no run trains
# on cases prepared by the old rules.
CASE_FORMAT = 1


def save_case(case: TrainingCase, folder: Path) -> None:
    """Write `case` as .npy files under `folder`, whole or not at all (a folder renamed into
    place), so that a run killed while writing leaves no half case to be read later. A run
    that shares the cache and saved the same case first wins."""
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    np.save(partial / "hu.npy", case.hu)
    np.save(partial / "labels.npy", case.labels)
    if case.tissues is not None:
        np.save(partial / "tissues.npy", case.tissues)
    np.savez(
        partial / "voxels.npz",
        distractor=case.distractor_voxels,
        joint=case.joint_voxels,
        metal=case.metal_voxels,
        # numpy's stubs match a ** mapping against savez's allow_pickle: bool; these are arrays.
        **{f"bone_{label}": voxels for label, voxels in case.bone_voxels.items()},  # type: ignore[arg-type]
    )
    (partial / "name.txt").write_text(case.name)
    try:
        partial.rename(folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(partial)


def open_case(folder: Path) -> TrainingCase:
    """A case `save_case` wrote, its image and labels memory-mapped: the pages stay on disk
    until a sample reads them, and the kernel may drop them again under memory pressure."""
    with np.load(folder / "voxels.npz") as voxels:
        return TrainingCase(
            (folder / "name.txt").read_text(),
            np.load(folder / "hu.npy", mmap_mode="r"),
            np.load(folder / "labels.npy", mmap_mode="r"),
            {int(key[5:]): voxels[key] for key in voxels.files if key.startswith("bone_")},
            voxels["distractor"],
            voxels["joint"],
            voxels["metal"],
            np.load(tissues, mmap_mode="r")
            if (tissues := folder / "tissues.npy").is_file()
            else None,
        )


def cached(folder: Path, make: Callable[[], TrainingCase]) -> Path:
    """`folder`, holding the case `make` builds unless an earlier run saved it there."""
    if not folder.is_dir():
        save_case(make(), folder)
    return folder


def cache_phantom(seed: int, size: str, spacing_mm: float, cache_dir: Path) -> Path:
    from model.phantom import PHANTOM_VERSION

    name = f"phantom-{seed}-{size}-{spacing_mm}mm-v{PHANTOM_VERSION}-case{CASE_FORMAT}"
    folder = cache_dir / name
    return cached(folder, lambda: phantom_case(seed, size, spacing_mm))


def cache_subject_phantom(seed: int, cache_dir: Path) -> Path:
    from model.phantom.subjects import SUBJECT_PHANTOM_VERSION

    folder = cache_dir / f"subject-{seed}-v{SUBJECT_PHANTOM_VERSION}-case{CASE_FORMAT}"
    return cached(folder, lambda: subject_phantom_case(seed))


def cache_file_case(image: Path, labels: Path, spacing_mm: float, cache_dir: Path) -> Path:
    """A file pair's case in the cache, keyed by both files' paths, sizes and times: a file
    changed since is read again."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in (image, labels)]
    key = hashlib.sha256(json.dumps([stats, spacing_mm]).encode()).hexdigest()[:16]
    rng = np.random.default_rng(int(key, 16))
    folder = cache_dir / f"file-{key}-case{CASE_FORMAT}"
    return cached(folder, lambda: prepare_case(image, labels, spacing_mm, rng))


def load_cases(
    folders: Sequence[Path],
    phantom_seeds: Sequence[int],
    phantom_size: str,
    config: CascadeConfig,
    cache_dir: Path,
    workers: int = 1,
    subject_seeds: Sequence[int] = (),
) -> tuple[list[TrainingCase], dict[str, object]]:
    """Training cases from files and generated phantoms, plus what the model card records.

    Each case is prepared once into `cache_dir` and trained on memory-mapped from there: held
    in memory, 20 whole-leg phantoms (about 0.75 GB each) were as many as 24 GB took beside
    anything else, and a run restarted after a crash regenerated every phantom (16 minutes on
    2 cores). `workers` processes generate phantoms side by side (a whole-leg phantom takes
    about a minute and 2.5 GB).
    """
    from model.phantom import PHANTOM_VERSION

    spacing = config.spacing_mm
    folders_of_cases = [
        cache_file_case(image, labels, spacing, cache_dir)
        for folder in folders
        for image, labels in find_training_pairs(folder)
    ]
    metadata: dict[str, object] = {"data": [str(f) for f in folders]}
    if phantom_seeds:
        folders_of_cases += _generated(
            partial(cache_phantom, size=phantom_size, spacing_mm=spacing, cache_dir=cache_dir),
            phantom_seeds,
            workers,
            "phantoms",
        )
        metadata["phantom"] = {
            "version": PHANTOM_VERSION,
            "seeds": list(phantom_seeds),
            "size": phantom_size,
        }
    if subject_seeds:
        from model.phantom.subjects import SUBJECT_PHANTOM_VERSION

        folders_of_cases += _generated(
            partial(cache_subject_phantom, cache_dir=cache_dir),
            subject_seeds,
            workers,
            "subject phantoms",
        )
        metadata["subject_phantom"] = {
            "version": SUBJECT_PHANTOM_VERSION,
            "seeds": list(subject_seeds),
        }
    return [open_case(folder) for folder in folders_of_cases], metadata


def _generated(
    make: Callable[[int], Path], seeds: Sequence[int], workers: int, what: str
) -> list[Path]:
    """`make(seed)` for every seed, `workers` forked processes side by side (a case takes
    seconds to minutes and GBs of memory to generate), in the seeds' order."""
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max(1, workers), mp_context=context) as pool:
        return list(tqdm(pool.map(make, seeds), desc=what, total=len(seeds)))


def stage_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Cross-entropy on soft targets plus soft Dice over the bone classes.

    Dice keeps the thin bones (fibula, talus) from drowning in background voxels; cross-entropy
    keeps the gradients well behaved early on.
    """
    ce = torch.nn.functional.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    truth = target[:, 1:]
    dims = (0, 2, 3, 4)
    inter = (probs * truth).sum(dims)
    dice = (2 * inter + eps) / (probs.sum(dims) + truth.sum(dims) + eps)
    return ce + (1 - dice.mean())


def cascade_loss(outputs: Sequence[Tensor], targets: Tensor) -> Tensor:
    """Deep supervision: every stage is supervised, all with the same weight.

    The coarse stage is what tells a tibia from a femur (a 32^3 patch at 0.8 mm cannot), and
    with the weight halved per stage it had learned almost nothing after 2400 steps (bone-voxel
    accuracy 7 % against 64 % at the finest stage), so no stage is discounted.
    """
    losses = [stage_loss(out, targets[:, i]) for i, out in enumerate(outputs)]
    return sum(losses[1:], start=losses[0]) / len(outputs)


def learning_rate(step: int, settings: TrainingSettings) -> float:
    """Linear warm-up, then cosine decay to 2 % of the peak."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.learning_rate * (
        0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    )


def make_batch(
    cases: Sequence[TrainingCase],
    config: CascadeConfig,
    settings: TrainingSettings,
    rng: np.random.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    samples = [
        augment(
            draw_sample(
                cases[int(rng.integers(len(cases)))],
                config,
                rng,
                settings.bone_fraction,
                settings.truncated_fraction,
                settings.distractor_fraction,
                settings.joint_fraction,
                settings.metal_fraction,
            ),
            config,
            rng,
        )
        for _ in range(settings.batch_size)
    ]
    images = torch.from_numpy(np.stack([s.images for s in samples]))
    targets = torch.from_numpy(np.stack([s.targets for s in samples]))
    offsets = torch.from_numpy(np.stack([s.offsets for s in samples]))
    return images, targets, offsets


class BatchStream(torch.utils.data.Dataset):
    """Batch number `step` of a run, drawn from a generator seeded by (seed, step).

    Seeding per step makes the batches independent of how many worker processes draw them and
    lets a resumed run draw exactly the batches the uninterrupted run would have.
    """

    def __init__(
        self, cases: Sequence[TrainingCase], config: CascadeConfig, settings: TrainingSettings
    ) -> None:
        self.cases, self.config, self.settings = cases, config, settings

    def __len__(self) -> int:
        return self.settings.steps

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        rng = np.random.default_rng((self.settings.seed, step))
        return make_batch(self.cases, self.config, self.settings, rng)


def batches_from(
    step: int, cases: Sequence[TrainingCase], config: CascadeConfig, settings: TrainingSettings
) -> torch.utils.data.DataLoader:
    """Batches `step` .. `settings.steps - 1`, in order, drawn ahead by `settings.workers`.

    Workers are forked, so they share the (large) case volumes with this process.
    """
    return torch.utils.data.DataLoader(
        BatchStream(cases, config, settings),
        batch_size=None,
        sampler=range(step, settings.steps),
        num_workers=settings.workers,
        multiprocessing_context="fork" if settings.workers else None,
        prefetch_factor=4 if settings.workers else None,
        pin_memory=settings.device != Device.CPU and torch.cuda.is_available(),
    )


def train(
    cases: Sequence[TrainingCase],
    out_dir: Path,
    config: CascadeConfig | None = None,
    settings: TrainingSettings | None = None,
    metadata: dict[str, object] | None = None,
    progress: bool = True,
) -> Path:
    """Train (or resume from `out_dir/checkpoint.safetensors`); returns the weights file."""
    config = config or CascadeConfig()
    settings = settings or TrainingSettings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device(settings.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    # channels-last 3-D convolutions train about a quarter faster on CPU (measured on 2 cores).
    # Module.to takes memory_format (torch documents it); its type stubs leave it out.
    model = CascadedVNet(config).to(  # type: ignore[call-overload]
        device, memory_format=torch.channels_last_3d
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    step, history = 0, []
    initialised_from: dict[str, object] | None = None
    checkpoint = out_dir / CHECKPOINT_NAME
    if checkpoint.is_file():
        state = load_checkpoint(checkpoint, model, optimizer)
        step, history = int(state["step"]), list(state["history"])
        # The run's origin survives a resume, so the weights it ends in still name their parent.
        initialised_from = state.get("init_weights")
        log.info("resumed from %s at step %d", checkpoint, step)
    elif settings.init_weights is not None:
        initial, meta = load_weights(settings.init_weights)
        if initial.config != config:
            raise ValueError(
                f"{settings.init_weights}: config {meta['config']} differs from the run's "
                f"{config.to_json()}"
            )
        model.load_state_dict(initial.state_dict())
        initialised_from = {"path": str(settings.init_weights), "sha256": meta["weights_sha256"]}
        log.info("starting from %s (sha256 %s)", settings.init_weights, meta["weights_sha256"])
    model.train()
    started = time.monotonic()
    bar = tqdm(total=settings.steps, initial=step, disable=not progress, desc="train", unit="step")
    running = None
    for images, targets, offsets in batches_from(step, cases, config, settings):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = model(images, offsets)
        # The loss in float32: soft Dice sums over millions of voxels.
        loss = cascade_loss([out.float() for out in outputs], targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            history.append(
                {
                    "step": step,
                    "loss": round(running, 5),
                    "seconds": round(time.monotonic() - started, 1),
                }
            )
            save_checkpoint(
                checkpoint,
                model,
                optimizer,
                {"step": step, "history": history, "init_weights": initialised_from},
            )
            log.info("step %d loss %.4f", step, running)
    bar.close()
    weights = out_dir / f"cascade_{'-'.join(map(str, config.patch_sizes))}.safetensors"
    save_weights(
        model.eval(),
        weights,
        {
            "training": {
                **asdict(settings),
                "init_weights": initialised_from,
                "cases": [c.name for c in cases],
                "history": history,
            },
            **(metadata or {}),
        },
    )
    (out_dir / "training.json").write_text(json.dumps({"history": history}, indent=2) + "\n")
    return weights
