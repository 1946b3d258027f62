import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dropcluster_timm import DropCluster1d, DropCluster2d, DropCluster3d, drop_cluster, resample_cluster_map
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
