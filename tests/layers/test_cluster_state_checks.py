""" A cluster state from outside (a state dict, a model file) is checked before it is used: map counts,
cluster counts, label values, the channels a layer was built for."""
import pytest
import timm
import torch

from dropcluster_timm import DropCluster2d, dropcluster_layers, update_clusters


def _clustered_state(channels, size=(12, 12), couple=False, seed=0):
    torch.manual_seed(seed)
    src = DropCluster2d(0.1, block_size=3, couple_channels=couple)
    src.update_clusters(torch.randn((2, channels) + size))
    return src.state_dict()


@pytest.mark.parametrize('strict', [True, False])
@pytest.mark.parametrize('training', [True, False])
def test_load_refuses_map_count_that_does_not_fit(strict, training):
    layer = DropCluster2d(0.1, block_size=3, num_channels=8, feat_size=(6, 6)).train(training)
    with pytest.raises(RuntimeError) as err:
        layer.load_state_dict(_clustered_state(5), strict=strict)
    msg = str(err.value)
    assert 'cluster_map: 5 maps of shape (5, 12, 12)' in msg and '1 map or 8' in msg
    assert layer.cluster_map.shape == (1, 6, 6), 'a refused map was installed'
    # Per-channel and grid maps still load, at any resolution (the layer adopts their shapes).
    layer.load_state_dict(_clustered_state(8, size=(12, 12)), strict=strict)
    assert layer.cluster_map.shape == (8, 12, 12)
    layer.load_state_dict(DropCluster2d(0.1, block_size=3, feat_size=(9, 9)).state_dict(), strict=strict)
    assert layer.cluster_map.shape == (1, 9, 9)
    # So does the empty state of a layer never clustered.
    layer.load_state_dict(DropCluster2d(0.1).state_dict(), strict=strict)
    assert layer.cluster_map.numel() == 0


def test_coupled_layer_refuses_per_channel_maps_at_load():
    layer = DropCluster2d(0.1, block_size=3, couple_channels=True)  # channel count unknown
    with pytest.raises(RuntimeError, match=r'cluster_map: 4 maps of shape \(4, 12, 12\) .* one map'):
        layer.load_state_dict(_clustered_state(4))
    layer.load_state_dict(_clustered_state(4, couple=True))
    assert layer.cluster_map.shape == (1, 12, 12)


def test_load_refuses_counts_not_matching_maps():
    state = _clustered_state(4)
    state['cluster_counts'] = state['cluster_counts'][:3]
    with pytest.raises(RuntimeError, match=r'cluster_counts: shape \(3,\) .* 4 maps'):
        DropCluster2d(0.1, block_size=3).load_state_dict(state)


def _tampered(kind):
    state = _clustered_state(4)
    m, c = state['cluster_map'], state['cluster_counts']
    if kind == 'huge label':
        m = m.clone()
        m[1, 0, 0] = 10 ** 6
    elif kind == 'negative label':
        m = m.clone()
        m[2, 3, 3] = -5
    elif kind == 'huge count':
        c = c.clone()
        c[0] = 10 ** 9
    elif kind == 'count above labels':
        c = c + 1
    elif kind == 'bool map':
        m = m > 0
    elif kind == 'uint8 map':
        m = m.to(torch.uint8)
    elif kind == 'float counts':
        c = c.float()
    return dict(state, cluster_map=m, cluster_counts=c)


@pytest.mark.parametrize('kind, words', [
    ('huge label', 'map 1 has labels up to 1000000'), ('negative label', 'labels must be >= 0, got -5'),
    ('huge count', 'cluster_counts: values must be in [0, 144]'), ('count above labels', 'labels must run from 0'),
    ('bool map', 'cluster_map: dtype torch.bool is not a label type'),
    ('uint8 map', 'cluster_map: dtype torch.uint8 is not a label type'),
    ('float counts', 'cluster_counts: dtype torch.float32 is not a label type')])
def test_load_refuses_cluster_values_that_are_not_a_cluster_state(kind, words):
    layer = DropCluster2d(0.1, block_size=3)
    before = layer.state_dict()
    with pytest.raises(RuntimeError) as err:
        layer.load_state_dict(_tampered(kind))
    assert words in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), layer.state_dict().values()))
    layer.load_state_dict(_clustered_state(4))  # the untampered state loads and runs
    layer.train()(torch.randn(2, 4, 12, 12))


def test_model_file_with_tampered_labels_is_refused_naming_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file
    from dropcluster_timm import save_pretrained
    model = timm.create_model('resnet18_dropcluster', num_classes=3, img_size=64)
    update_clusters(model, torch.randn(2, 3, 64, 64))
    folder = save_pretrained(model, tmp_path / 'm')
    state = load_file(str(folder / 'model.safetensors'))
    state['layer4.1.drop_block.cluster_map'][0, 0, 0] = 10 ** 6
    save_file(state, str(folder / 'model.safetensors'))
    with pytest.raises(RuntimeError, match=r'layer4\.1\.drop_block\.cluster_map: map 0 has labels up to 1000000'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_channel_count_checked_and_recorded():
    with pytest.raises(ValueError, match='num_channels'):
        DropCluster2d(0.1, num_channels=0)
    layer = DropCluster2d(0.1, block_size=3, num_channels=8)
    assert 'num_channels=8' in repr(layer)
    for mode in (True, False):
        with pytest.raises(ValueError, match='expects 8 input channels'):
            layer.train(mode)(torch.randn(2, 4, 6, 6))
    with pytest.raises(ValueError, match='expects 8 input channels'):
        layer.update_clusters(torch.randn(2, 4, 6, 6))
    with pytest.raises(ValueError, match='5 maps'):
        layer.set_cluster_map(torch.zeros(5, 6, 6, dtype=torch.int32))
    # Unknown until the first clustering, which records it: later loads are checked.
    lazy = DropCluster2d(0.1, block_size=3)
    lazy.load_state_dict(_clustered_state(5))
    assert lazy.num_channels is None
    lazy.update_clusters(torch.randn(2, 8, 12, 12))
    assert lazy.num_channels == 8
    with pytest.raises(RuntimeError, match='5 maps'):
        lazy.load_state_dict(_clustered_state(5))


@pytest.mark.parametrize('variant', ['resnet18_dropcluster', 'resnet50_dropcluster'])
def test_model_layers_know_their_input_channels(variant):
    model = timm.create_model(variant, dc_stem=True, dc_stages=(1, 2, 3, 4), img_size=64, drop_cluster_rate=0.1)
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = args[0].shape[1]
        return hook

    layers = list(dropcluster_layers(model))
    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers]
    model.train()(torch.randn(2, 3, 64, 64))
    for h in handles:
        h.remove()
    assert len(seen) == (9 if variant == 'resnet18_dropcluster' else 17)
    assert seen == {name: layer.num_channels for name, layer in layers}
    stage_channels = model.feature_info[3]['num_chs']
    # Bottleneck: the 3x3 conv's width, a quarter of the stage's output channels.
    assert seen['layer3.0.drop_block'] == (stage_channels // 4 if variant == 'resnet50_dropcluster' else stage_channels)


@pytest.mark.parametrize('variant', ['resnet18_dropcluster', 'resnet50_dropcluster'])
def test_model_load_refuses_map_count_that_does_not_fit(variant):
    torch.manual_seed(0)
    model = timm.create_model(variant, img_size=64).eval()
    # Learned per-channel maps at another resolution, and grid maps, load.
    other = timm.create_model(variant, img_size=96)
    update_clusters(other, torch.randn(2, 3, 96, 96))
    channels = other.layer3[0].drop_block.cluster_map.shape[0]  # one map per channel of the layer's input
    model.load_state_dict(other.state_dict())
    assert model.layer3[0].drop_block.cluster_map.shape == (channels, 6, 6)
    model.load_state_dict(timm.create_model(variant, img_size=64).state_dict())
    assert model.layer3[0].drop_block.cluster_map.shape == (1, 4, 4)
    state = model.state_dict()
    state['layer3.0.drop_block.cluster_map'] = torch.zeros(7, 4, 4, dtype=torch.int32)
    state['layer3.0.drop_block.cluster_counts'] = torch.ones(7, dtype=torch.int32)
    for strict in (True, False):
        with pytest.raises(RuntimeError) as err:
            model.load_state_dict(state, strict=strict)
        assert (f'layer3.0.drop_block.cluster_map: 7 maps of shape (7, 4, 4) do not fit this layer, which takes '
                f'1 map or {channels} (one per channel of its {channels}-channel input)') in str(err.value)
