"""The light V-net and the cascade: Table 1 sizes, shapes, and the context crop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.engine.network import CascadeConfig, CascadedVNet, count_parameters, upsample_context
from model.labels import N_CLASSES

# Table 1 of Kuiper et al. 2022: configuration -> (number of V-nets, input voxels).
TABLE_1 = {
    (32,): (1, 32**3),
    (64,): (1, 64**3),
    (128,): (1, 128**3),
    (64, 32): (2, 2 * 32**3),
    (128, 32): (2, 2 * 32**3),
    (128, 64): (2, 2 * 64**3),
    (128, 64, 32): (3, 3 * 32**3),
    (256, 128, 64, 32): (4, 4 * 32**3),
}
PAPER_PARAMETERS_PER_VNET = 1.2e6


@pytest.mark.parametrize("sizes", list(TABLE_1))
def test_table_1_parameters_and_input_voxels(sizes: tuple[int, ...]) -> None:
    n_vnets, voxels = TABLE_1[sizes]
    model = CascadedVNet(CascadeConfig(patch_sizes=sizes))
    assert len(model.stages) == n_vnets
    assert model.config.input_voxels == voxels
    per_vnet = count_parameters(model) / n_vnets
    assert abs(per_vnet - PAPER_PARAMETERS_PER_VNET) <= 0.25 * PAPER_PARAMETERS_PER_VNET


def test_light_vnet_is_one_conv_block_per_level() -> None:
    stage = CascadedVNet(CascadeConfig(patch_sizes=(32,))).stages[0]
    convs = [
        m for m in stage.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3,) * 3
    ]
    # Four encoder levels + three decoder levels, one 3x3x3 conv each; channels double per level.
    assert len(convs) == 7
    assert [c.out_channels for c in convs[:4]] == [16, 32, 64, 128]
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in stage.modules()) == 7


@pytest.mark.parametrize("sizes", [(64, 32), (128, 32), (128, 64, 32)])
def test_cascade_outputs_every_stage_at_input_size(sizes: tuple[int, ...]) -> None:
    model = CascadedVNet(CascadeConfig(patch_sizes=sizes)).eval()
    s = sizes[-1]
    with torch.no_grad():
        outputs = model(torch.randn(2, len(sizes), s, s, s))
    assert [tuple(o.shape) for o in outputs] == [(2, N_CLASSES, s, s, s)] * len(sizes)


def test_cascade_rejects_wrong_input_shape() -> None:
    with pytest.raises(ValueError, match="images"):
        CascadedVNet()(torch.randn(1, 2, 32, 32, 32))


@pytest.mark.parametrize(
    "sizes", [(), (32, 32), (100, 50), (128, 48), (256, 128, 64, 32, 16), (12,)]
)
def test_config_rejects_bad_patch_sizes(sizes: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="patch_sizes"):
        CascadeConfig(patch_sizes=sizes)


def test_config_json_round_trip() -> None:
    config = CascadeConfig(patch_sizes=(256, 128, 64, 32), extra={"note": "x"})
    assert CascadeConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("start", [(0, 0, 0), (4, 8, 2), (8, 8, 8), (3, 0, 7)])
def test_context_crop_equals_upsampling_the_whole_map(factor: int, start: tuple[int, ...]) -> None:
    """Cropping then upsampling must equal upsampling the whole map then cropping (the fast and
    paper strategies rely on it), including at the map's edges."""
    torch.manual_seed(1)
    probs = torch.rand(1, 3, 24, 24, 24)
    size = 32
    crop = upsample_context(probs, start, size, factor)
    whole = F.interpolate(probs, scale_factor=factor, mode="trilinear", align_corners=False)
    z, y, x = (a * factor for a in start)
    assert torch.allclose(crop, whole[..., z : z + size, y : y + size, x : x + size], atol=1e-6)
