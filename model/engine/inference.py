"""Inference: a HU volume in, a bone label volume on the same grid out.

Two strategies compute the same cascade:

`paper`  as in Kuiper et al. 2022: windows of the largest patch size slide over the volume
         (at most half a window apart by default); in each, the coarse prediction is computed
         once and every smaller patch inside it is predicted with the coarser stage's
         prediction cropped as context, down to the finest patches. The smaller patches
         overlap inside the window as the windows do; where windows or patches overlap, their
         predictions are averaged, weighted towards each one's centre.
`fast`   (default) the first stage runs fully convolutionally over the whole downsampled
         volume; every later stage runs only inside boxes around the band where the previous
         stage's labels change (bone surfaces, joint spaces) or where it is unsure, with a halo
         of context around each box. Everywhere else the previous stage's answer stands: deep
         inside air, soft tissue or a bone the finer stages have nothing to change.

Both work on the model's isotropic 0.8 mm LPS grid; `Segmenter.segment` resamples in and out.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import Tensor, nn

from model.engine.anatomy import AnatomyCheck, check_anatomy, without_misplaced
from model.engine.network import (
    CascadedVNet,
    autocast_dtype,
    pick_device,
    upsample_context,
)
from model.engine.postprocess import (
    counts_summary,
    label_counts,
    remove_detached,
    remove_islands,
    segment_summary,
    split_sides,
)
from model.engine.tiling import (
    Box,
    ScaledInputs,
    as_box,
    ceil_to,
    cover_boxes,
    crop_upsampled,
    fit_multiple,
    inner,
    most_probable,
    patch_box,
    refine_mask,
    split_box,
    upsample_nearest,
    upsample_probs,
    window_starts,
    window_weight,
)
from model.engine.verdict import Assessment, assess, measure_segments
from model.engine.weights import DEFAULT_WEIGHTS, load_weights
from model.labels import N_CLASSES, unsided_labels
from model.resample import image_to_model_grid, labels_to_grid
from model.settings import Device, Precision, Strategy
from model.volume_io import Volume

log = logging.getLogger(__name__)

# paper: patches in one network call, which bounds its memory (a window's 64 finest patches
# were one call while patches tiled).
PAPER_BATCH = 64
Stats = dict[str, dict[str, float]]
# What `Segmenter.segment` tells of its progress: a stage's name and the fraction of it done.
Progress = Callable[[str, float], None]


@dataclass
class InferenceSettings:
    strategy: Strategy = Strategy.FAST
    device: str = Device.AUTO  # a Device or cuda:N
    # float32, mixed (float16 on CUDA, bfloat16 on CPU) or auto: see autocast_dtype
    precision: Precision = Precision.AUTO
    threads: int | None = None
    # fast: context around a box core, in the stage's own voxels. 8, not 16: on the whole-leg
    # phantom 108.5 s against 145.3 s in one run, labels agreeing at Dice >= 0.993 per bone,
    # Dice against the truth within 0.006 (bench/README.md). Each stage was trained on
    # 32-voxel patches, so a voxel at a patch's edge has seen less context than 8 in training.
    halo: int = 8
    band: int = 2  # fast: voxels around a label change (previous stage's grid) refined
    # Below this probability of its class a voxel is unsure: fast refines it, and the summary
    # gives each bone's share of unsure voxels.
    certainty: float = 0.9
    min_island_ml: float = 0.5
    # Leave out the pieces of bone lying where no lower extremity has them (`model.engine.anatomy`),
    # and say when the whole segmentation is implausible. Off only to score the raw output.
    anatomy_check: bool = True
    max_box_voxels: int = 96 * 192 * 192  # fast: bounds one network call's memory (~1.5 GB)
    # paper: how much neighbouring windows of the largest patch size overlap. The paper infers
    # "on all smaller patches, instead of only the center patch" of each window without saying
    # how the windows are laid; tiled without overlap (0) a voxel at a window's edge gets a
    # first stage that saw nothing past it. 0.5 (nnU-Net's default, the paper's benchmark):
    # windows at most half a window apart (`window_starts`), each voxel the Gaussian-weighted
    # mean of the windows over it; 4.6x the tiling's windows on the hip slab (bench/README.md).
    # The finer stages' patches overlap as much inside each window: tiled, the finest patches'
    # edges made `paper` part from `fast` on ankle crop 2003 (fibula 0.971; 0.994 overlapping).
    paper_overlap: float = 0.5

    def __post_init__(self) -> None:
        if self.strategy not in tuple(Strategy):
            choices = tuple(s.value for s in Strategy)
            raise ValueError(f"strategy: expected one of {choices}, got {self.strategy!r}")
        if self.precision not in tuple(Precision):
            choices = tuple(p.value for p in Precision)
            raise ValueError(f"precision: expected one of {choices}, got {self.precision!r}")
        # Given as strings (the command line, benches, tests): the members from here on.
        self.strategy, self.precision = Strategy(self.strategy), Precision(self.precision)
        if not 0 <= self.paper_overlap < 1:
            raise ValueError(f"paper_overlap: expected 0 <= overlap < 1, got {self.paper_overlap}")


@dataclass
class Segmentation:
    """The labels, after post-processing and the anatomy check, on the input grid.

    `anatomy.reason` set: the segmentation as a whole is not of a lower extremity (nothing of it
    should be reported); its misplaced pieces are left out of `labels` and `sided` either way,
    and `summary["dropped_as_misplaced"]` lists them. `assessment`: how far it can be trusted
    (`model.engine.verdict`; implausible whenever the anatomy check says so), also in
    `summary["verdict"]`.
    """

    labels: Volume  # uint8, 0 background, 1..6 model.labels.Bone, on the input grid
    sided: Volume  # uint8, 0 background, 1..6 right, 7..12 left (model.labels.sided_label)
    # uint8 percent: the probability the cascade gave the class it chose for each voxel (before
    # post-processing), from the last stage that looked at the voxel; on the input grid.
    confidence: Volume
    sure_percent: int  # below this confidence a voxel counts as unsure
    anatomy: AnatomyCheck
    assessment: Assessment
    summary: dict[str, object] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm3d into the convolution before it (inference only)."""
    for child_name, child in module.named_children():
        if (
            isinstance(child, nn.Sequential)
            and len(child) >= 2
            and isinstance(child[0], nn.Conv3d)
            and isinstance(child[1], nn.BatchNorm3d)
        ):
            conv, bn = child[0], child[1]
            assert bn.running_mean is not None and bn.running_var is not None, (
                "the cascade's BatchNorm3d layers track running statistics"
            )
            assert bn.bias is not None, "the cascade's BatchNorm3d layers are affine"
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            # torch types Conv3d's kernel_size, stride and padding attributes tuple[int, ...] and
            # its constructor's tuple[int, int, int]: they are the 3-tuples it was built with.
            fused = nn.Conv3d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,  # type: ignore[arg-type]
                conv.stride,  # type: ignore[arg-type]
                conv.padding,  # type: ignore[arg-type]
                bias=True,
            )
            fused.weight.data = conv.weight.data * scale.view(-1, 1, 1, 1, 1)
            bias = conv.bias.data if conv.bias is not None else torch.zeros_like(bn.running_mean)
            assert fused.bias is not None, "built with bias=True"
            fused.bias.data = (bias - bn.running_mean) * scale + bn.bias.data
            setattr(module, child_name, nn.Sequential(fused, *list(child)[2:]))
        else:
            fold_batchnorm(child)
    return module


class Segmenter:
    """Loads the cascade once and segments volumes with it (the worker keeps one warm)."""

    def __init__(
        self,
        weights: Path = DEFAULT_WEIGHTS,
        settings: InferenceSettings | None = None,
        model: CascadedVNet | None = None,
    ):
        self.settings = settings or InferenceSettings()
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        if model is None:
            model, self.metadata = load_weights(weights)  # checks the sidecar's sha256
        else:
            self.metadata = {"name": "in-memory", "config": model.config.to_json()}
        self.config = model.config
        self.device = pick_device(self.settings.device)
        self.autocast = autocast_dtype(self.settings.precision, self.device)
        # Folding rewrites modules in place: fold a copy, the caller's model stays trainable.
        # Channels-last 3-D convolutions run 1.6x faster on CPU (oneDNN; measured on a stage-3
        # box, 2 cores). On CUDA the layout stays as it is: not measured there yet.
        self.memory_format = (
            torch.channels_last_3d if self.device.type == "cpu" else torch.contiguous_format
        )
        # Module.to takes memory_format (torch documents it); its type stubs leave it out.
        self.model = fold_batchnorm(copy.deepcopy(model).eval()).to(  # type: ignore[call-overload]
            self.device, memory_format=self.memory_format
        )
        self.stages = list(self.model.stages)
        size, factor = self.config.patch_sizes[0], self.config.factors[0]
        self.paper_stride = size - round(size * self.settings.paper_overlap)
        if self.paper_stride % factor:
            raise ValueError(
                f"paper_overlap: {self.settings.paper_overlap} puts windows of {size} voxels "
                f"{self.paper_stride} apart, not a multiple of the first stage's voxel ({factor})"
            )
        # The finer stages' patches overlap as the windows do, on their own grids; each starts
        # on a voxel of the coarser grid, whose prediction it is fed.
        s = self.config.input_size
        self.patch_stride = s - round(s * self.settings.paper_overlap)
        ratios = [a // b for a, b in itertools.pairwise(self.config.factors)]
        if any(self.patch_stride % ratio for ratio in ratios):
            raise ValueError(
                f"paper_overlap: {self.settings.paper_overlap} puts patches of {s} voxels "
                f"{self.patch_stride} apart, not a multiple of the stages' ratios {ratios}"
            )
        # The same for every window: each finer stage's patch starts inside a window (its own
        # grid), and their weight.
        self.patch_offsets = {
            stage: list(
                itertools.product(
                    window_starts(size // factor, s, self.patch_stride, ratio), repeat=3
                )
            )
            for stage, (factor, ratio) in enumerate(
                zip(self.config.factors[1:], ratios, strict=True), start=1
            )
        }
        self.patch_weight = window_weight(s, overlapping=self.patch_stride < s)

    # -- the one public call -------------------------------------------------------------
    def segment(self, volume: Volume, progress: Progress | None = None) -> Segmentation:
        """Bone labels for a HU volume, on the volume's own grid. `progress` hears of each
        stage as it starts (0.0), goes and ends (1.0): "resample" (onto the model's grid),
        "inference", "post-processing" (islands, sides, back onto the volume's grid, the
        anatomy check, the verdict)."""
        report = progress or no_progress
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        report("resample", 0.0)
        grid = image_to_model_grid(volume, self.config.spacing_mm)
        hu = sitk.GetArrayViewFromImage(grid)
        # Only the input's grid is needed from here on, not its voxels: a caller that hands
        # over the volume it read (`segment_file`) lets them go, 1 GB of a whole-leg scan.
        volume = volume.with_array(np.broadcast_to(volume.array.dtype.type(0), volume.array.shape))
        timings["resample_in_s"] = time.perf_counter() - t0
        report("resample", 1.0)

        t = time.perf_counter()
        report("inference", 0.0)
        labels, confidence, stats = self.predict_labels(hu, lambda done: report("inference", done))
        timings["inference_s"] = time.perf_counter() - t
        report("inference", 1.0)

        t = time.perf_counter()
        report("post-processing", 0.0)
        voxel_ml = self.config.spacing_mm**3 / 1000.0
        labels = remove_islands(labels, int(self.settings.min_island_ml / voxel_ml), hu)
        sided = split_sides(labels, hu, grid)
        model_grid = (grid.GetSpacing(), grid.GetOrigin(), grid.GetDirection())
        # The scan on the model's grid is not needed past here: 1 GB for a whole-leg scan.
        del labels, hu, grid
        detached = counts_summary(
            remove_detached(sided, self.config.spacing_mm), (self.config.spacing_mm,) * 3
        )
        timings["postprocess_s"] = time.perf_counter() - t
        report("post-processing", 0.4)

        t = time.perf_counter()
        sided_array = labels_to_grid(Volume(sided, *model_grid), volume)
        del sided
        confidence = labels_to_grid(Volume(confidence, *model_grid), volume)
        timings["resample_out_s"] = time.perf_counter() - t
        report("post-processing", 0.5)

        # On the input grid, so that what is dropped is counted in the voxels reported.
        t = time.perf_counter()
        sided_volume = volume.with_array(sided_array)
        anatomy = check_anatomy(sided_volume) if self.settings.anatomy_check else AnatomyCheck()
        dropped = []
        if anatomy.dropped:
            # From counts: a volume of what was left out would cost two more of the scan's size.
            lost = label_counts(sided_array)
            kept = without_misplaced(sided_volume, anatomy).array
            lost -= label_counts(kept)
            dropped = counts_summary(lost, volume.spacing)
            # Back into the array labels_to_grid made: its voxels are written with no copy.
            np.copyto(sided_array, kept)
            del kept
        timings["anatomy_s"] = time.perf_counter() - t
        report("post-processing", 0.6)

        t = time.perf_counter()
        sure_percent = round(100 * self.settings.certainty)
        signals = measure_segments(sided_volume, confidence, sure_percent)
        assessment = assess(signals, volume.spacing[2], anatomy.reason)
        timings["verdict_s"] = time.perf_counter() - t

        summary = {
            "strategy": self.settings.strategy.value,
            "device": str(self.device),
            "precision": str(self.autocast or torch.float32).removeprefix("torch."),
            "model": self.metadata.get("name"),
            "weights_sha256": self.metadata.get("weights_sha256"),
            "segments": segment_summary(sided_volume, confidence < sure_percent),
            # Pieces found where no lower extremity has them (model/engine/anatomy.py): left out.
            "dropped_as_misplaced": dropped,
            # Pieces far from the rest of their bone (`remove_detached`), on the model's grid.
            "dropped_as_detached": detached,
            "implausible": anatomy.reason,
            # How far to trust it (model/engine/verdict.py): the verdict, its reasons, the signals.
            "verdict": assessment.as_dict(),
            **stats,
        }
        # Last: the summary's mask of unsure voxels is gone by now (a gigabyte each).
        bones = volume.with_array(unsided_labels(sided_array))
        timings["total_s"] = time.perf_counter() - t0
        report("post-processing", 1.0)
        return Segmentation(
            bones,
            sided_volume,
            volume.with_array(confidence),
            sure_percent,
            anatomy,
            assessment,
            summary,
            {k: round(v, 3) for k, v in timings.items()},
        )

    # -- cascade on the model grid -------------------------------------------------------
    def predict_labels(
        self, hu: np.ndarray, progress: Callable[[float], None] = lambda done: None
    ) -> tuple[np.ndarray, np.ndarray, Stats]:
        """Labels and their confidence (uint8, percent) for HU on the model grid; for the fast
        strategy, the fraction of each stage's grid that needed refining and the fraction it
        computed (the boxes around it, with their halos). `progress` hears the fraction done
        after each network call (`paper`: each row of windows)."""
        shape = hu.shape
        stats: Stats
        with torch.inference_mode():
            if self.settings.strategy == Strategy.PAPER:
                labels, confidence, stats = *self._paper(np.asarray(hu), progress), {}
            else:
                labels, confidence, stats = self._fast(np.asarray(hu), progress)
        inside = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
        return labels[inside].numpy(), confidence[inside].numpy(), stats

    def _run(self, stage: int, x: Tensor) -> Tensor:
        """Softmax of one stage on a (B, C, D, H, W) CPU tensor, computed on the device."""
        x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
        with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
            out = self.stages[stage](x)
        return torch.softmax(out.float(), dim=1).cpu()

    # -- paper ------------------------------------------------------------------------------
    def _paper(self, hu: np.ndarray, progress: Callable[[float], None]) -> tuple[Tensor, Tensor]:
        """Windows of the largest patch size at `window_starts` (per axis), z-row by z-row; each
        window's finest-stage probabilities are weighted by `window_weight` and summed into a
        band of the window's depth, whose slices before the next row's start are final once
        the row is done."""
        size, stride = self.config.patch_sizes[0], self.paper_stride
        # No margin before the scan: with air there, as `fast` had after it, the hip crop
        # 2001's labels agreed with `fast`'s at 0.979 (femur) and 0.973 (hip bone) against
        # 0.985 and 0.981 without.
        starts = [window_starts(n, size, stride, self.config.factors[0]) for n in hu.shape]
        inputs = ScaledInputs(hu, self.config, tuple(axis[-1] + size for axis in starts))
        shape = inputs.shape(-1)
        labels = torch.zeros(shape, dtype=torch.uint8)
        confidence = torch.zeros_like(labels)
        weight = window_weight(size, overlapping=stride < size)
        band = torch.zeros((N_CLASSES, size, *shape[1:]))
        band_weight = torch.zeros((size, *shape[1:]))
        rows, columns = starts[0], starts[1:]
        for row, z in enumerate(rows):
            for y, x in itertools.product(*columns):
                window = (slice(0, size), slice(y, y + size), slice(x, x + size))
                band[(slice(None), *window)] += self._window(inputs, (z, y, x)) * weight
                band_weight[window] += weight
            final = rows[row + 1] - z if row + 1 < len(rows) else size
            labels[z : z + final], confidence[z : z + final] = most_probable(
                band[:, :final] / band_weight[:final]
            )
            band = torch.cat([band[:, final:], torch.zeros_like(band[:, :final])], dim=1)
            band_weight = torch.cat([band_weight[final:], torch.zeros_like(band_weight[:final])])
            progress((row + 1) / len(rows))
        return labels, confidence

    def _window(self, inputs: ScaledInputs, start: tuple[int, ...]) -> Tensor:
        """Finest-stage probabilities (C, S, S, S) over one window of the largest patch size S:
        the first stage predicts the window, then each finer stage its patches inside it."""
        factors, s = self.config.factors, self.config.input_size
        origin = tuple(a // factors[0] for a in start)
        probs = self._run(0, inputs.region(0, patch_box(origin, s))[None, None])[0]
        for stage in range(1, len(factors)):
            ratio = factors[stage - 1] // factors[stage]
            origin = tuple(a * ratio for a in origin)
            probs = self._patches(inputs, stage, origin, probs)
        return probs

    def _patches(
        self, inputs: ScaledInputs, stage: int, origin: tuple[int, ...], coarse: Tensor
    ) -> Tensor:
        """The stage's probabilities over the window at `origin` (the stage's grid): every patch
        inside it (`patch_offsets`) fed the coarser stage's prediction over the window
        (`coarse`) cropped, and where patches overlap their mean weighted by `patch_weight`.
        The window's CT and context are made once; each patch is a view of them."""
        s = self.config.input_size
        ratio = self.config.factors[stage - 1] // self.config.factors[stage]
        n = coarse.shape[1] * ratio
        window = torch.cat(
            [
                inputs.region(stage, patch_box(origin, n))[None],
                upsample_context(coarse[None], (0, 0, 0), n, ratio)[0],
            ]
        )
        total = torch.zeros((N_CLASSES, n, n, n))
        total_weight = torch.zeros((n, n, n))
        offsets = self.patch_offsets[stage]
        for first in range(0, len(offsets), PAPER_BATCH):
            batch = [patch_box(off, s) for off in offsets[first : first + PAPER_BATCH]]
            x = torch.stack([window[(slice(None), *patch)] for patch in batch])
            for patch, p in zip(batch, self._run(stage, x), strict=True):
                total[(slice(None), *patch)] += p * self.patch_weight
                total_weight[patch] += self.patch_weight
        return total / total_weight

    # -- fast -------------------------------------------------------------------------------
    def _fast(
        self, hu: np.ndarray, progress: Callable[[float], None]
    ) -> tuple[Tensor, Tensor, Stats]:
        block = self.config.factors[0] * 8  # the first stage's grid a multiple of 8
        inputs = ScaledInputs(hu, self.config, tuple(ceil_to(n, block) for n in hu.shape))
        n = len(self.config.factors)
        probs = self._dense(inputs, lambda done: progress(done / n))
        stats: Stats = {"refined_fraction": {}, "computed_fraction": {}}
        for i in range(1, n):
            ratio = self.config.factors[i - 1] // self.config.factors[i]
            coarse_labels, coarse_confidence = most_probable(probs)
            refine = refine_mask(coarse_labels, probs, self.settings.band, self.settings.certainty)
            stats["refined_fraction"][f"stage{i + 1}"] = round(float(refine.float().mean()), 4)
            fine_shape = inputs.shape(i)
            computed = 0
            last = i == n - 1
            if last:
                result = upsample_nearest(coarse_labels, ratio)
                confidence = upsample_nearest(coarse_confidence, ratio)
            else:
                result = upsample_probs(probs, ratio)
            boxes = list(self._boxes(refine, ratio, fine_shape))
            for done, (core, region) in enumerate(boxes, start=1):
                x = torch.cat(
                    [
                        inputs.region(i, region)[None],
                        crop_upsampled(probs, region, ratio),
                    ]
                )[None]
                p = self._run(i, x)[0]
                computed += x[0, 0].numel()
                kept = (slice(None), *inner(core, region))
                if last:
                    result[core], confidence[core] = most_probable(p[kept])
                else:
                    result[(slice(None), *core)] = p[kept].to(result.dtype)
                progress((i + done / len(boxes)) / n)
            stats["computed_fraction"][f"stage{i + 1}"] = round(computed / np.prod(fine_shape), 4)
            if last:
                return result, confidence, stats
            probs = result
        return *most_probable(probs), stats

    def _dense(self, inputs: ScaledInputs, progress: Callable[[float], None]) -> Tensor:
        """The first stage over its whole grid, box by box with a halo (bounded memory)."""
        shape = inputs.shape(0)
        out = torch.empty((N_CLASSES, *shape), dtype=torch.float16)
        whole = as_box(slice(0, n) for n in shape)
        boxes = list(self._with_halo(split_box(whole, self.settings.max_box_voxels), shape))
        for done, (core, region) in enumerate(boxes, start=1):
            p = self._run(0, inputs.region(0, region)[None, None])[0]
            out[(slice(None), *core)] = p[(slice(None), *inner(core, region))].to(out.dtype)
            progress(done / len(boxes))
        return out

    def _with_halo(self, cores: list[Box], shape: tuple[int, ...]) -> Iterator[tuple[Box, Box]]:
        """(core, input region): the core grown by the halo, to a multiple of 8, inside `shape`."""
        halo = self.settings.halo
        for core in cores:
            region = as_box(
                slice(*fit_multiple(max(0, c.start - halo), min(n, c.stop + halo), n, 8))
                for c, n in zip(core, shape, strict=True)
            )
            yield core, region

    def _boxes(
        self, refine: Tensor, ratio: int, fine_shape: tuple[int, ...]
    ) -> Iterator[tuple[Box, Box]]:
        """(core, input region) boxes on the finer grid covering `refine` (coarser grid)."""
        halo = self.settings.halo

        def region_voxels(box: Box) -> int:
            return int(np.prod([ceil_to((b.stop - b.start) * ratio + 2 * halo, 8) for b in box]))

        for box in cover_boxes(refine.numpy(), region_voxels):
            core = as_box(slice(b.start * ratio, b.stop * ratio) for b in box)
            yield from self._with_halo(split_box(core, self.settings.max_box_voxels), fine_shape)


def no_progress(stage: str, done: float) -> None:
    """Progress nobody is shown."""
