"""The CUDA path: segmentation and a training step on a GPU agree with the CPU. Skipped where
there is no GPU (CI); bench/gpu.sh runs it on a lent GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.engine.inference import InferenceSettings, Segmenter
from model.metrics import dice
from model.phantom import generate_phantom

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_segmentation_agrees_with_the_cpu() -> None:
    phantom = generate_phantom(2001, "small")
    cpu = Segmenter(settings=InferenceSettings(device="cpu", precision="float32"))
    gpu = Segmenter(settings=InferenceSettings(device="cuda"))
    a = cpu.segment(phantom.image).labels.array
    b = gpu.segment(phantom.image).labels.array
    for label in np.unique(a[a > 0]):
        assert dice(a == label, b == label) >= 0.99


def test_a_cuda_training_step_lowers_nothing_to_nan() -> None:
    from model.engine.network import CascadeConfig, CascadedVNet
    from model.training.loop import cascade_loss

    config = CascadeConfig()
    model = CascadedVNet(config).cuda()
    s = config.input_size
    images = torch.randn(2, len(config.patch_sizes), s, s, s, device="cuda")
    targets = torch.softmax(
        torch.randn(2, len(config.patch_sizes), config.n_classes, s, s, s, device="cuda"), 2
    )
    offsets = torch.zeros(2, len(config.patch_sizes) - 1, 3, dtype=torch.long, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = model(images, offsets)
    loss = cascade_loss([o.float() for o in outputs], targets)
    loss.backward()
    assert torch.isfinite(loss)
