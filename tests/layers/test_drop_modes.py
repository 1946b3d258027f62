""" The DropCluster drop modes beyond the uniform one: size-dependent rates, one mask for the batch,
maps left undropped, counts per map, and the one-thread clustering."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from dropcluster_timm import DropCluster2d, drop_cluster


def _trained_layer(drop_prob=0.2, couple=False, shape=(16, 8, 14, 14), cluster_size=9, seed=0):
    torch.manual_seed(seed)
    layer = DropCluster2d(drop_prob, cluster_size=cluster_size, couple_channels=couple)
    layer.update_clusters(torch.randn(shape))
    return layer.train()


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
