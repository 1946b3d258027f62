import math

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dropcluster_timm import DropCluster1d, DropCluster2d, DropCluster3d, drop_cluster, dropcluster_layers, \
    resample_cluster_map, update_clusters
from dropcluster_timm.clustering.engine import grid_cluster_map


def _trained_layer(drop_prob=0.2, couple=False, shape=(16, 8, 14, 14), cluster_size=9, seed=0):
    torch.manual_seed(seed)
    layer = DropCluster2d(drop_prob, cluster_size=cluster_size, couple_channels=couple)
    layer.update_clusters(torch.randn(shape))
    return layer.train()


@pytest.mark.parametrize('couple', [False, True])
@pytest.mark.parametrize('drop_prob', [0.1, 0.3])
def test_dropped_fraction_matches_drop_prob(couple, drop_prob):
    layer = _trained_layer(drop_prob, couple, shape=(32, 16, 14, 14))
    torch.manual_seed(1)
    x = torch.ones(64, 16, 14, 14)
    fractions = torch.stack([(layer(x) == 0).float().mean() for _ in range(20)])
    # Independent units per draw: (sample, group, cluster); cluster sizes vary, so bound the
    # standard error by the worst case of one unit holding a whole map.
    units = 64 * (1 if couple else 16)
    std_err = math.sqrt(drop_prob * (1 - drop_prob) / (units * 20))
    assert abs(fractions.mean().item() - drop_prob) < 5 * std_err


def test_whole_clusters_are_dropped_per_channel():
    layer = _trained_layer(0.5)
    x = torch.ones(4, 8, 14, 14)
    y = layer(x)
    labels = layer.cluster_map.long()
    for b in range(4):
        for c in range(8):
            for k in range(int(layer.cluster_counts[c])):
                values = y[b, c][labels[c] == k]
                assert values.unique().numel() == 1, 'a cluster was partly dropped'


def test_coupled_layer_shares_mask_across_channels():
    layer = _trained_layer(0.4, couple=True)
    assert layer.cluster_map.shape[0] == 1
    y = layer(torch.ones(4, 8, 14, 14))
    assert torch.equal(y[:, :1].expand_as(y), y)


def test_scale_by_keep_normalises_batch_sum():
    layer = _trained_layer(0.3)
    x = torch.ones(16, 8, 14, 14)
    y = layer(x)
    kept = (y != 0).sum()
    assert kept < y.numel()
    assert torch.allclose(y.sum(), torch.tensor(float(y.numel())), rtol=1e-4)
    assert torch.allclose(y[y != 0], torch.tensor(y.numel() / kept.item()), rtol=1e-4)
    layer.scale_by_keep = False
    y = layer(x)
    assert set(y.unique().tolist()) == {0.0, 1.0}


def test_identity_in_eval_and_at_zero_rate():
    layer = _trained_layer(0.3)
    x = torch.randn(2, 8, 14, 14)
    assert layer.eval()(x) is x
    layer.train().drop_prob = 0.0
    assert layer(x) is x


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_and_device_kept(dtype):
    layer = _trained_layer(0.3)
    x = torch.randn(2, 8, 14, 14, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.device == x.device and y.shape == x.shape
    assert ((y == 0) | (x == 0)).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_mask_made_on_device():
    layer = _trained_layer(0.3).cuda()
    x = torch.randn(4, 8, 14, 14, device='cuda', dtype=torch.bfloat16)
    y = layer(x)
    assert y.is_cuda and y.dtype == torch.bfloat16


def test_gradients_reach_only_kept_elements_scaled():
    layer = _trained_layer(0.4)
    x = (torch.rand(4, 8, 14, 14) + 0.5).requires_grad_()
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    scale = (y / x).detach()  # 0 where dropped, the keep scale elsewhere
    assert (scale == 0).any() and (scale > 1).any()
    assert torch.allclose(x.grad, g * scale, atol=1e-5)


def test_channels_last_and_inplace_and_noise():
    layer = _trained_layer(0.4)
    x = torch.randn(4, 8, 14, 14).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    y = layer(x)
    layer.inplace = True
    x2 = x.clone()
    torch.manual_seed(3)
    y2 = layer(x2)
    assert y2 is x2 and torch.allclose(y, y2)
    layer.inplace, layer.with_noise = False, True
    y3 = layer(torch.zeros(4, 8, 14, 14))
    assert (y3 != 0).float().mean().item() == pytest.approx(0.4, abs=0.15)


def test_before_clustering_acts_like_non_overlapping_dropblock():
    layer = DropCluster2d(0.5, block_size=7, feat_size=(14, 14)).train()
    assert layer.cluster_map.shape == (1, 14, 14) and int(layer.cluster_counts[0]) == 4
    y = layer(torch.ones(8, 4, 14, 14))
    blocks = y.unfold(2, 7, 7).unfold(3, 7, 7)  # (B, C, 2, 2, 7, 7)
    flat = blocks.reshape(*blocks.shape[:4], -1)
    assert torch.equal(flat.amin(-1), flat.amax(-1))
    lazy = DropCluster2d(0.5, block_size=7).train()
    assert lazy.cluster_map.numel() == 0
    assert (lazy(torch.ones(8, 4, 14, 14)) == 0).any()


def test_resampled_map_for_other_resolution():
    layer = _trained_layer(0.3)
    big = resample_cluster_map(layer.cluster_map, [28, 28])
    assert torch.equal(big[:, ::2, ::2], layer.cluster_map)
    y = layer(torch.ones(2, 8, 28, 28))
    assert y.shape == (2, 8, 28, 28)
    assert layer.cluster_map.shape[1:] == (14, 14)


def test_bad_input_raises_clear_errors():
    layer = DropCluster2d(0.1).train()
    with pytest.raises(ValueError, match='expects input with 4 dims'):
        layer(torch.randn(8, 14, 14))
    with pytest.raises(ValueError, match='floating point'):
        layer(torch.ones(2, 3, 8, 8, dtype=torch.long))
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match='drop_prob'):
            DropCluster2d(p)
        with pytest.raises(ValueError, match='drop_prob'):
            drop_cluster(torch.randn(2, 3, 8, 8), grid_cluster_map([8, 8], 4), p)
    with pytest.raises(ValueError, match='cluster_method'):
        DropCluster2d(0.1, cluster_method='nope')
    with pytest.raises(ValueError, match='maps'):
        drop_cluster(torch.randn(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match='one map'):
        DropCluster2d(0.1, couple_channels=True).set_cluster_map(torch.zeros(3, 8, 8, dtype=torch.long))


def test_state_dict_and_safetensors_round_trip(tmp_path):
    layer = _trained_layer(0.25)
    assert layer.cluster_map.dtype == torch.int32 and layer.cluster_map.shape == (8, 14, 14)
    path = tmp_path / 'layer.safetensors'
    save_file(layer.state_dict(), str(path))
    fresh = DropCluster2d(0.25, cluster_size=9, feat_size=(7, 7))  # other shape: adopts the file's
    fresh.load_state_dict(load_file(str(path)))
    assert torch.equal(fresh.cluster_map, layer.cluster_map)
    assert torch.equal(fresh.cluster_counts, layer.cluster_counts)
    assert fresh.max_clusters == layer.max_clusters
    torch.manual_seed(0)
    a = layer(torch.ones(2, 8, 14, 14))
    torch.manual_seed(0)
    b = fresh.train()(torch.ones(2, 8, 14, 14))
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match='cluster_map'):
        DropCluster2d(0.1).load_state_dict({'cluster_map': torch.zeros(4, 4), 'cluster_counts': torch.ones(1)})


@pytest.mark.parametrize('cls,shape', [(DropCluster1d, (8, 4, 40)), (DropCluster3d, (8, 4, 6, 8, 8))])
def test_1d_and_3d_layers(cls, shape):
    layer = cls(0.3, block_size=3)
    layer.update_clusters(torch.randn(shape))
    assert layer.cluster_map.shape == (4,) + shape[2:]
    y = layer.train()(torch.ones(shape))
    assert (y == 0).any() and (y != 0).any()


def test_torchscript_matches_eager():
    layer = _trained_layer(0.3)
    scripted = torch.jit.script(layer)
    x = torch.randn(4, 8, 14, 14)
    torch.manual_seed(5)
    a = layer(x)
    torch.manual_seed(5)
    b = scripted(x)
    assert torch.equal(a, b)
    assert scripted.eval()(x) is not None and torch.equal(scripted(x), x)


def _small_net(couple=False):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        DropCluster2d(0.3, block_size=3, couple_channels=couple, feat_size=(12, 12)),
        nn.Conv2d(8, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_fx_trace_keeps_layer_as_leaf():
    from timm.layers._fx import create_feature_extractor
    net = _small_net().eval()
    extractor = create_feature_extractor(net, {'3': 'drop', '6': 'out'})
    targets = [n.target for n in extractor.graph.nodes if n.op == 'call_module']
    assert '3' in targets
    x = torch.randn(2, 3, 12, 12)
    assert torch.allclose(extractor(x)['out'], net(x))


def test_torch_compile_small_conv_net():
    torch.manual_seed(0)
    net = _small_net()
    net[3].update_clusters(torch.randn(4, 8, 12, 12))
    compiled = torch.compile(net, backend='inductor')
    x = torch.randn(4, 3, 12, 12)
    net.eval()
    assert torch.allclose(compiled(x), net(x), atol=1e-5)
    net.train()
    out = compiled(x)
    out.sum().backward()
    assert net[0].weight.grad is not None and torch.isfinite(out).all()


def test_grid_tiles_like_dropblock_and_builds_on_meta():
    assert DropCluster2d(0.1, block_size=5, feat_size=(14, 14)).max_clusters == 9  # 5x5 cells, ceil
    assert DropCluster2d(0.1, block_size=3, feat_size=(5, 5)).max_clusters == 4
    assert DropCluster3d(0.1, cluster_size=125, feat_size=(10, 10, 10)).max_clusters == 8
    meta = DropCluster2d(0.1, block_size=5, feat_size=(14, 14), device='meta')
    assert meta.cluster_map.is_meta and meta.cluster_map.shape == (1, 14, 14) and meta.max_clusters == 9
    with torch.device('meta'):
        implicit = DropCluster2d(0.1, block_size=5, feat_size=(14, 14))
    assert implicit.cluster_map.is_meta and implicit.max_clusters == 9


def _kept_per_cluster(kept: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Kept elements of every (sample, channel, cluster): ``kept`` (B, C, *spatial), ``labels`` (M, *spatial)."""
    B, C = kept.shape[:2]
    idx = labels.reshape(labels.shape[0], -1).long().expand(C, -1).unsqueeze(0).expand(B, -1, -1)
    out = torch.zeros(B, C, k)
    return out.scatter_add_(2, idx, kept.reshape(B, C, -1).float())


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize('couple', [False, True], ids=['per_channel', 'coupled'])
@pytest.mark.parametrize('shape,drop_prob', [
    ((1, 64, 1, 1), 0.1),  # one unit per draw when coupled: all dropped 1 call in 10
    ((2, 4, 3, 3), 0.5),
    ((2, 3, 5, 5), 0.9),
    ((1, 4, 1, 1), 0.999),
], ids=['1x1-p0.1', '3x3-p0.5', '5x5-p0.9', '1x1-p0.999'])
def test_output_finite_and_scaled_by_total_over_kept(dtype, couple, shape, drop_prob):
    torch.manual_seed(0)
    layer = DropCluster2d(drop_prob, block_size=2, couple_channels=couple)
    layer.update_clusters(torch.randn(shape))
    layer.train()
    labels, k = layer.cluster_map, layer.max_clusters
    sizes = torch.zeros(labels.shape[0], k).scatter_add_(
        1, labels.reshape(labels.shape[0], -1).long(), torch.ones(labels.shape[0], labels[0].numel()))
    x = (torch.rand(shape) + 0.5).to(dtype)  # never 0, so a 0 in the output marks a drop
    total = x.numel()
    rtol = 4 * torch.finfo(dtype).eps
    all_dropped = 0
    for seed in range(300):
        torch.manual_seed(seed)
        y = layer(x)
        assert y.dtype == dtype and torch.isfinite(y).all(), f'non-finite output at seed {seed}'
        kept = y != 0
        per_cluster = _kept_per_cluster(kept, labels, k)
        assert ((per_cluster == 0) | (per_cluster == sizes.unsqueeze(0))).all(), 'a cluster was partly dropped'
        if couple:
            assert torch.equal(kept, kept[:, :1].expand_as(kept))
        n_kept = int(kept.sum())
        if n_kept == 0:
            all_dropped += 1
            continue
        scale = total / n_kept  # elements / kept elements of the batch
        torch.testing.assert_close(y[kept].double(), x[kept].double() * scale, rtol=rtol, atol=0)
    if drop_prob == 0.999 or (couple and drop_prob == 0.1):
        assert all_dropped > 0, 'the all-dropped case was never drawn'
    # No rescaling on the noise path: dropped elements are gaussian noise, never inf or NaN.
    layer.with_noise = True
    for seed in range(20):
        torch.manual_seed(seed)
        assert torch.isfinite(layer(x)).all()


def test_half_scale_clamped_to_largest_finite_value():
    # One 1-element cluster and one of 65535: keeping only the small one scales by 65536, just past
    # float16's largest finite value 65504.
    labels = torch.zeros(1, 256, 256, dtype=torch.int32)
    labels[0, 0, 0] = 1
    layer = DropCluster2d(0.5, couple_channels=True)
    layer.set_cluster_map(labels)
    layer.train()
    x = torch.ones(1, 2, 256, 256, dtype=torch.float16)
    seen = 0
    for seed in range(40):
        torch.manual_seed(seed)
        y = layer(x)
        assert torch.isfinite(y).all(), f'non-finite output at seed {seed}'
        if int((y != 0).sum()) == 2 and y[0, 0, 0, 0] != 0:
            seen += 1
            assert torch.equal(y[:, :, 0, 0], torch.full((1, 2), torch.finfo(torch.float16).max, dtype=torch.float16))
    assert seen > 0, 'the small cluster was never kept alone'


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


# --- reference drop modes, per-map counts and undropped maps ---

def _uneven_map():
    """One 12x12 map with clusters of 1, 8, 27 and 108 elements (labels 0..3)."""
    labels = torch.full((12, 12), 3, dtype=torch.long)
    labels[:3, :9] = 2
    labels[3, :8] = 1
    labels[11, 11] = 0
    return labels.unsqueeze(0)


@pytest.mark.parametrize('rate', [0.05, 0.2, 0.6])
def test_size_mode_keeps_the_expected_fraction_and_favours_small_clusters(rate):
    from dropcluster_timm.layers.drop_cluster import cluster_drop_probs
    sizes = torch.tensor([[1.0, 8.0, 27.0, 108.0]])
    probs = cluster_drop_probs(sizes, rate, 'size')
    assert probs.shape == (1, 4) and (probs >= 0).all() and (probs <= 1).all()
    assert torch.allclose((probs * sizes).sum() / sizes.sum(), torch.tensor(rate), atol=1e-6)
    assert (probs[0, :-1] >= probs[0, 1:]).all(), 'smaller clusters should drop more often'
    # Uncapped, the ratio of two clusters' rates is DropBlock's: n / (s * (n - s + 1)).
    n = 144.0
    w = n / (sizes * (n - sizes + 1))
    free = probs < 1
    ratio = probs[free] / w[free]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)
    assert torch.equal(cluster_drop_probs(sizes, rate, 'uniform'), torch.full((1, 4), rate))


def test_size_mode_drops_the_expected_fraction_per_cluster():
    torch.manual_seed(0)
    cmap = _uneven_map()
    x = torch.ones(4000, 1, 12, 12)
    y = drop_cluster(x, cmap, 0.2, drop_mode='size', scale_by_keep=False)
    dropped = (y == 0).float().mean(0)[0]  # per pixel
    from dropcluster_timm.layers.drop_cluster import cluster_drop_probs
    sizes = torch.bincount(cmap.view(-1), minlength=4).float().unsqueeze(0)
    expected = cluster_drop_probs(sizes, 0.2, 'size')[0][cmap[0]]
    assert (dropped - expected).abs().max() < 0.04  # 4000 draws: sd <= 0.008
    assert abs(dropped.mean().item() - 0.2) < 0.02


def test_batch_shared_mask_is_the_same_for_every_sample():
    layer = _trained_layer(0.4)
    layer.batch_shared = True
    y = layer(torch.ones(6, 8, 14, 14))
    assert torch.equal(y, y[:1].expand_as(y))
    assert (y == 0).any() and (y != 0).any()
    # The scale still normalises the batch sum.
    assert torch.allclose(y.sum(), torch.tensor(float(y.numel())), rtol=1e-4)


def test_undropped_maps_are_never_dropped_and_survive_a_checkpoint(tmp_path):
    layer = _trained_layer(0.5)
    undropped = torch.tensor([True, False] * 4)
    layer.set_cluster_map(layer.cluster_map, undropped=undropped)
    assert (layer.cluster_counts[undropped] == 0).all() and (layer.cluster_counts[~undropped] > 0).all()
    assert (layer.cluster_map[undropped] == 0).all()
    path = tmp_path / 'layer.safetensors'
    save_file(layer.state_dict(), str(path))
    fresh = DropCluster2d(0.5, cluster_size=9).train()
    fresh.load_state_dict(load_file(str(path)))
    assert torch.equal(fresh.cluster_counts, layer.cluster_counts) and fresh.has_undropped
    for model in (layer, fresh):
        y = model(torch.ones(32, 8, 14, 14))
        assert (y[:, undropped] != 0).all(), 'an undropped map lost elements'
        assert (y[:, ~undropped] == 0).any()
    # Every map undropped: the layer passes the input through (up to the scale of 1).
    layer.set_cluster_map(layer.cluster_map, undropped=torch.ones(8, dtype=torch.bool))
    x = torch.randn(4, 8, 14, 14)
    assert torch.equal(layer(x), x)
    with pytest.raises(ValueError, match='one flag per map'):
        layer.set_cluster_map(layer.cluster_map, undropped=torch.ones(3, dtype=torch.bool))


def test_gap_count_layer_has_per_channel_counts_everywhere(tmp_path):
    from dropcluster_timm.testing import smooth_region_fields
    g = torch.Generator().manual_seed(0)
    x = torch.cat([smooth_region_fields(32, 4, 28, 28, 4, g), smooth_region_fields(32, 4, 28, 28, 64, g)], dim=1)
    layer = DropCluster2d(0.3, cluster_size=16, cluster_count='gap', min_cluster_size=4, max_cluster_size=196)
    assert layer.count_bounds([28, 28]) == (4, 196)
    layer.update_clusters(x, generator=torch.Generator().manual_seed(1))
    counts = layer.cluster_counts
    assert counts[:4].float().mean() < counts[4:].float().mean() / 4, counts.tolist()
    assert layer.max_clusters == int(counts.max())
    path = tmp_path / 'layer.safetensors'
    save_file(layer.state_dict(), str(path))
    fresh = DropCluster2d(0.3, cluster_size=16, cluster_count='gap').train()
    fresh.load_state_dict(load_file(str(path)))
    assert torch.equal(fresh.cluster_map, layer.cluster_map) and fresh.max_clusters == layer.max_clusters
    layer.train()
    for model in (layer, fresh):
        torch.manual_seed(3)
        out = model(torch.ones(8, 8, 28, 28))
        assert (out == 0).any()
    torch.manual_seed(3)
    a = layer(torch.ones(8, 8, 28, 28))
    torch.manual_seed(3)
    assert torch.equal(a, fresh(torch.ones(8, 8, 28, 28)))
    # Resampled to another input size (nearest labels): whole resampled clusters still drop.
    y = layer(torch.ones(4, 8, 20, 20))
    assert y.shape == (4, 8, 20, 20) and (y == 0).any()


def test_skip_unstructured_leaves_noise_channels_undropped():
    from dropcluster_timm.testing import smooth_region_fields
    g = torch.Generator().manual_seed(0)
    x = torch.cat([smooth_region_fields(32, 8, 20, 20, 8, g), torch.randn(32, 24, 20, 20, generator=g)], dim=1)
    layer = DropCluster2d(0.3, cluster_size=16, skip_unstructured=True)
    layer.update_clusters(x, generator=torch.Generator().manual_seed(1))
    counts = layer.cluster_counts
    assert (counts[:8] > 0).all()
    assert (counts[8:] == 0).float().mean() >= 0.8, counts.tolist()
    y = layer.train()(torch.ones(16, 32, 20, 20))
    assert (y[:, 8:][:, counts[8:] == 0] != 0).all()


def test_new_modes_script_and_match_eager():
    layer = _trained_layer(0.3)
    layer.drop_mode = 'size'
    layer.batch_shared = True
    layer.set_cluster_map(layer.cluster_map, undropped=torch.tensor([True] + [False] * 7))
    scripted = torch.jit.script(layer)
    x = torch.randn(4, 8, 14, 14)
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(0)
    assert torch.equal(a, scripted(x))


def test_bad_mode_arguments_fail_clearly():
    with pytest.raises(ValueError, match='drop_mode'):
        DropCluster2d(0.1, drop_mode='big')
    with pytest.raises(ValueError, match='cluster_count'):
        DropCluster2d(0.1, cluster_count='auto')
    with pytest.raises(ValueError, match='grid'):
        DropCluster2d(0.1, cluster_count='gap', cluster_method='grid')
    with pytest.raises(ValueError, match='exceeds'):
        DropCluster2d(0.1, min_cluster_size=50, max_cluster_size=10)
    with pytest.raises(ValueError, match='drop_mode'):
        drop_cluster(torch.ones(1, 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), 0.1, drop_mode='x')
    with pytest.raises(ValueError, match='cluster_counts'):
        drop_cluster(torch.ones(1, 2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), 0.1,
                     cluster_counts=torch.ones(3, dtype=torch.long))


def test_clustering_runs_on_one_cpu_thread_and_restores_the_count(monkeypatch):
    """Many small parallel operations stall on a busy CPU (benchmarks/bench_busy.py): one thread."""
    from dropcluster_timm.layers import drop_cluster_modules as dc
    seen, real = [], dc.cluster_features
    monkeypatch.setattr(dc, 'cluster_features', lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        DropCluster2d(0.1, block_size=3).update_clusters(torch.randn(2, 4, 12, 12))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
