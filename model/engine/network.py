"""The light V-net and its cascade (Kuiper et al. 2022, sections 2.2 and 2.3).

A light V-net has four resolution levels with a single 3x3x3 conv + BatchNorm + ReLU block per
level, channels doubling per level (strided 2x2x2 convs down, transposed convs up, as in the
V-net), and a final 1x1x1 conv; softmax is applied by the caller.

The cascade takes one CT patch per stage, largest field of view first, each already downsampled
to the smallest patch size. A stage's softmax output is cropped to the next stage's field of view,
upsampled to the common size and concatenated to that stage's CT patch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.labels import N_CLASSES
from model.settings import Device, Precision

LEVELS = 4


def pick_device(name: str) -> torch.device:
    """The torch device for `name`: cpu, cuda, cuda:N, or auto (CUDA when there is one)."""
    if name == Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The dtype convolutions run in under autocast for `precision` on `device`; None: float32.

    "mixed" is float16 on CUDA and bfloat16 on CPU. "auto" is mixed on CUDA and on CPUs with
    AMX bfloat16 tiles, where the whole-leg phantom's inference took 29 s against 43 s in
    float32 with the same labels (bench/README.md), and float32 elsewhere. A CPU without
    bfloat16 units emulates it: a stage-3 box took 130x as long as in float32 on AVX2 alone and
    1.8x on AVX-512 without BF16 (oneDNN restricted to each), so "mixed" is refused there
    rather than left to crawl.
    """
    if precision == Precision.FLOAT32:
        return None
    if device.type == "cuda":
        return torch.float16
    units = torch.cpu.get_capabilities()
    if units.get("amx_bf16"):
        return torch.bfloat16
    if precision == Precision.AUTO:
        return None
    if units.get("avx512_bf16"):
        return torch.bfloat16
    raise ValueError(
        "precision 'mixed': this CPU has no bfloat16 units (AMX or AVX512-BF16) and would run "
        "the cascade many times slower than in float32; use 'auto' or 'float32'"
    )


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3x3 convolution, batch normalisation, ReLU: the network's only building block."""
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


class LightVNet(nn.Module):
    """Four-level V-net with one conv block per level (paper Figure 2)."""

    def __init__(self, in_channels: int, n_classes: int = N_CLASSES, base_channels: int = 16):
        super().__init__()
        ch = [base_channels * 2**level for level in range(LEVELS)]
        self.encoders = nn.ModuleList(
            [conv_block(in_channels, ch[0])] + [conv_block(c, c) for c in ch[1:]]
        )
        self.downs = nn.ModuleList(
            nn.Conv3d(ch[i], ch[i + 1], kernel_size=2, stride=2) for i in range(LEVELS - 1)
        )
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(ch[i + 1], ch[i], kernel_size=2, stride=2) for i in range(LEVELS - 1)
        )
        self.decoders = nn.ModuleList(conv_block(2 * ch[i], ch[i]) for i in range(LEVELS - 1))
        self.head = nn.Conv3d(ch[0], n_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for level in range(LEVELS - 1):
            x = self.encoders[level](x)
            skips.append(x)
            x = self.downs[level](x)
        x = self.encoders[-1](x)
        for level in reversed(range(LEVELS - 1)):
            # Popped, so that the skip and the upsampled map are freed once concatenated: a third
            # less peak memory when inference runs a stage over a large box.
            x = self.decoders[level](torch.cat([self.ups[level](x), skips.pop()], dim=1))
        return self.head(x)


@dataclass(frozen=True)
class CascadeConfig:
    """Shape of a cascade: patch sizes in 0.8 mm voxels, largest first (Table 1)."""

    patch_sizes: tuple[int, ...] = (128, 64, 32)
    n_classes: int = N_CLASSES
    base_channels: int = 16
    spacing_mm: float = 0.8
    hu_window: tuple[float, float] = (-1000.0, 2000.0)
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = self.patch_sizes
        if not 1 <= len(sizes) <= 4:
            raise ValueError(f"patch_sizes: 1 to 4 stages, got {len(sizes)}")
        if any(s <= 0 or s % 8 for s in sizes):
            raise ValueError(
                f"patch_sizes: each size must be a positive multiple of 8, got {sizes}"
            )
        if any(a <= b or a % b for a, b in itertools.pairwise(sizes)):
            raise ValueError(
                f"patch_sizes: each stage must be a whole multiple of the next, got {sizes}"
            )

    @property
    def input_size(self) -> int:
        """Every patch is downsampled to the smallest patch size before entering its V-net."""
        return self.patch_sizes[-1]

    @property
    def factors(self) -> tuple[int, ...]:
        """Downsampling factor of each stage (its voxel size in units of 0.8 mm)."""
        return tuple(s // self.input_size for s in self.patch_sizes)

    @property
    def input_voxels(self) -> int:
        """Voxels fed to the network per sample, all stages together (Table 1)."""
        return len(self.patch_sizes) * self.input_size**3

    def to_json(self) -> dict[str, object]:
        return {
            "patch_sizes": list(self.patch_sizes),
            "n_classes": self.n_classes,
            "base_channels": self.base_channels,
            "spacing_mm": self.spacing_mm,
            "hu_window": list(self.hu_window),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CascadeConfig:
        hu_low, hu_high = (float(v) for v in data["hu_window"])
        return cls(
            patch_sizes=tuple(int(s) for s in data["patch_sizes"]),
            n_classes=int(data["n_classes"]),
            base_channels=int(data["base_channels"]),
            spacing_mm=float(data["spacing_mm"]),
            hu_window=(hu_low, hu_high),
            extra=dict(data.get("extra", {})),
        )


def upsample_context(probs: Tensor, start: Sequence[int], size: int, factor: int) -> Tensor:
    """Crop `probs` (B, C, D, H, W) at `start` (voxels of `probs`) to `size // factor` voxels and
    upsample by `factor` to `size` voxels.

    The crop takes one voxel of margin before trilinear upsampling so that the result equals
    upsampling the whole map and then cropping: the paper's patch-wise cascade and the fast
    fully-convolutional inference then see the same context.
    """
    n = size // factor
    lo = [s - 1 for s in start]
    pad = []
    for axis in (2, 1, 0):  # F.pad orders the last axis first
        before = max(0, -lo[axis])
        after = max(0, lo[axis] + n + 2 - probs.shape[2 + axis])
        pad += [before, after]
    src = probs
    if any(pad):
        src = F.pad(probs, pad, mode="replicate")
        lo = [lo[a] + pad[2 * (2 - a)] for a in range(3)]
    crop = src[..., lo[0] : lo[0] + n + 2, lo[1] : lo[1] + n + 2, lo[2] : lo[2] + n + 2]
    up = F.interpolate(crop, scale_factor=factor, mode="trilinear", align_corners=False)
    return up[..., factor : factor + size, factor : factor + size, factor : factor + size]


class CascadedVNet(nn.Module):
    """1 to 4 light V-nets; stage i's prediction is context for stage i + 1."""

    def __init__(self, config: CascadeConfig | None = None):
        super().__init__()
        self.config = config or CascadeConfig()
        c = self.config
        self.stages = nn.ModuleList(
            LightVNet(1 + (c.n_classes if i else 0), c.n_classes, c.base_channels)
            for i in range(len(c.patch_sizes))
        )

    def forward(self, images: Tensor, offsets: Tensor | None = None) -> list[Tensor]:
        """Logits of every stage (deep supervision), coarsest first.

        images: (B, n_stages, S, S, S), stage i's CT patch downsampled to S = input_size.
        offsets: (B, n_stages - 1, 3) integer start of patch i + 1 inside patch i, in 0.8 mm
            voxels and a multiple of stage i's factor; None centres every patch.
        """
        c = self.config
        s = c.input_size
        n = len(c.patch_sizes)
        if images.shape[1] != n or tuple(images.shape[2:]) != (s, s, s):
            raise ValueError(f"images: expected (B, {n}, {s}, {s}, {s}), got {tuple(images.shape)}")
        if offsets is None:
            centre = [(a - b) // 2 for a, b in zip(c.patch_sizes, c.patch_sizes[1:], strict=False)]
            offsets = (
                torch.tensor(centre, dtype=torch.long).view(1, -1, 1).expand(images.shape[0], -1, 3)
            )
        outputs: list[Tensor] = []
        context: Tensor | None = None
        for i, stage in enumerate(self.stages):
            x = images[:, i : i + 1]
            if context is not None:
                x = torch.cat([x, context], dim=1)
            logits = stage(x)
            outputs.append(logits)
            if i + 1 < n:
                probs = torch.softmax(logits, dim=1)
                f = c.factors[i] // c.factors[i + 1]
                context = torch.cat(
                    [
                        upsample_context(
                            probs[b : b + 1],
                            [int(o) // c.factors[i] for o in offsets[b, i]],
                            s,
                            f,
                        )
                        for b in range(images.shape[0])
                    ]
                )
        return outputs


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
