"""Training the cascade: data discovery, deep-supervised loss, the resumable loop."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import Tensor
from tqdm import tqdm

from model.network import CascadeConfig, CascadedVNet
from model.postprocess import BODY_HU
from model.resample import image_to_model_grid, labels_to_model_grid
from model.sampling import TrainingCase, augment, draw_sample
from model.volume_io import is_volume_file, read_volume
from model.weights import load_checkpoint, save_checkpoint, save_weights

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
    threads: int | None = None


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


def load_cases(
    folders: Sequence[Path], phantom_seeds: Sequence[int], phantom_size: str, config: CascadeConfig
) -> tuple[list[TrainingCase], dict[str, object]]:
    """Training cases from files and generated phantoms, plus what the model card records."""
    from model.phantom import PHANTOM_VERSION, generate_phantom

    rng = np.random.default_rng(0)
    spacing = config.spacing_mm
    cases = [
        prepare_case(image, labels, spacing, rng)
        for folder in folders
        for image, labels in find_training_pairs(folder)
    ]
    for seed in tqdm(phantom_seeds, desc="phantoms", disable=not phantom_seeds):
        phantom = generate_phantom(seed, phantom_size, spacing=(spacing,) * 3)
        hu, labels = crop_to_body(phantom.image.array, phantom.labels.array)
        del phantom
        cases.append(TrainingCase.from_arrays(f"phantom-{seed}", hu, labels, rng))
    metadata: dict[str, object] = {"data": [str(f) for f in folders]}
    if phantom_seeds:
        metadata["phantom"] = {
            "version": PHANTOM_VERSION,
            "seeds": list(phantom_seeds),
            "size": phantom_size,
        }
    return cases, metadata


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
    total = sum(stage_loss(out, targets[:, i]) for i, out in enumerate(outputs))
    return total / len(outputs)


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
            draw_sample(cases[rng.integers(len(cases))], config, rng, settings.bone_fraction),
            config,
            rng,
        )
        for _ in range(settings.batch_size)
    ]
    images = torch.from_numpy(np.stack([s.images for s in samples]))
    targets = torch.from_numpy(np.stack([s.targets for s in samples]))
    offsets = torch.from_numpy(np.stack([s.offsets for s in samples]))
    return images, targets, offsets


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
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    # channels-last 3-D convolutions train about a quarter faster on CPU (measured on 2 cores).
    model = CascadedVNet(config).to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    rng = np.random.default_rng(settings.seed)
    step, history = 0, []
    checkpoint = out_dir / CHECKPOINT_NAME
    if checkpoint.is_file():
        state = load_checkpoint(checkpoint, model, optimizer)
        step, history = int(state["step"]), list(state["history"])
        rng.bit_generator.state = state["rng"]
        log.info("resumed from %s at step %d", checkpoint, step)
    model.train()
    started = time.monotonic()
    bar = tqdm(total=settings.steps, initial=step, disable=not progress, desc="train", unit="step")
    running = None
    # The next batch is sampled on a thread while the current one trains (numpy frees the GIL).
    with ThreadPoolExecutor(max_workers=1) as pool:
        # A checkpoint stores the generator's state from before the pending batch was drawn,
        # so that a resumed run draws exactly the batches the uninterrupted run would have.
        rng_state = rng.bit_generator.state
        pending = pool.submit(make_batch, cases, config, settings, rng)
        while step < settings.steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings)
            images, targets, offsets = pending.result()
            rng_state = rng.bit_generator.state
            if step + 1 < settings.steps:
                pending = pool.submit(make_batch, cases, config, settings, rng)
            loss = cascade_loss(model(images, offsets), targets)
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
                    {"step": step, "history": history, "rng": rng_state},
                )
                log.info("step %d loss %.4f", step, running)
    bar.close()
    weights = out_dir / f"cascade_{'-'.join(map(str, config.patch_sizes))}.safetensors"
    save_weights(
        model.eval(),
        weights,
        {
            "training": {**asdict(settings), "cases": [c.name for c in cases], "history": history},
            **(metadata or {}),
        },
    )
    (out_dir / "training.json").write_text(json.dumps({"history": history}, indent=2) + "\n")
    return weights
