""" convert_drop_blocks: timm's DropBlock2d layers become equivalent DropCluster2d layers in place."""
import pytest
import timm
import torch
from timm.layers import DropBlock2d

from dropcluster_timm import DropCluster2d, convert_drop_blocks, dropcluster_layers


def test_converts_every_drop_block_in_place_with_its_settings():
    model = timm.create_model('resnet50', drop_block_rate=0.1, num_classes=3)
    slots = {n: m for n, m in model.named_modules() if isinstance(m, DropBlock2d)}
    assert len(slots) == 9
    out = convert_drop_blocks(model, img_size=96, cluster_method='kmeans')
    assert out is model and not any(isinstance(m, DropBlock2d) for m in model.modules())
    layers = dict(dropcluster_layers(model))
    assert list(layers) == list(slots)
    seen = {}
    for name, layer in layers.items():
        block = slots[name]
        assert (layer.drop_prob, layer.block_size, layer.gamma_scale) == (block.drop_prob, block.block_size,
                                                                          block.gamma_scale)
        assert layer.cluster_method == 'kmeans' and layer.couple_channels is False  # the reference's per-channel maps
        layer.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, tuple(a[0].shape[1:])) and None)
    model.eval()(torch.randn(1, 3, 96, 96))
    for name, layer in layers.items():  # channels and grid sizes from a shape-only forward on 'meta'
        assert (layer.num_channels,) + tuple(layer.cluster_map.shape[1:]) == seen[name], name
    assert layers['layer3.0.drop_block'].gamma_scale == 0.25  # timm's third-stage scaling is kept


def test_without_img_size_maps_start_empty_and_a_model_without_slots_is_refused():
    model = convert_drop_blocks(timm.create_model('resnet18', drop_block_rate=0.2))
    assert all(layer.cluster_map.numel() == 0 for _, layer in dropcluster_layers(model))
    y = model.train()(torch.randn(2, 3, 64, 64))  # a grid is made on the fly
    assert torch.isfinite(y).all()
    plain = timm.create_model('resnet18')
    with pytest.raises(ValueError, match=r'ResNet has no timm DropBlock2d layers to convert: build it with drop_block_rate > 0'):
        convert_drop_blocks(plain)
    with pytest.raises(ValueError, match='cannot be converted'):
        convert_drop_blocks(timm.create_model('convnext_atto'))
    before = [type(m) for m in plain.modules()]
    assert [type(m) for m in convert_drop_blocks(plain, allow_none=True).modules()] == before


def test_a_drop_block_itself_and_its_keyword_arguments():
    kwargs = dict(drop_prob=0.2, block_size=5, gamma_scale=0.25, with_noise=False, inplace=False,
                  couple_channels=True, scale_by_keep=True, batchwise=True, fast=False)
    DropBlock2d(**kwargs)
    layer = DropCluster2d(**kwargs)  # every DropBlock2d argument is accepted
    assert (layer.drop_prob, layer.block_size, layer.gamma_scale, layer.couple_channels) == (0.2, 5, 0.25, True)
    converted = convert_drop_blocks(DropBlock2d(**kwargs))
    assert isinstance(converted, DropCluster2d) and converted.gamma_scale == 0.25
    with pytest.raises(TypeError):
        DropCluster2d(drop_prob=0.1, not_an_argument=1)
    with pytest.raises(ValueError, match='gamma_scale'):
        DropCluster2d(gamma_scale=0.0)


def test_gamma_scale_scales_the_dropped_fraction_like_drop_block():
    torch.manual_seed(0)
    x = torch.ones(256, 16, 12, 12)
    for gamma in (1.0, 0.25):
        layer = DropCluster2d(0.4, block_size=2, gamma_scale=gamma).train()
        dropped = (layer(x) == 0).float().mean().item()
        assert dropped == pytest.approx(0.4 * gamma, abs=0.01), gamma
