import pytest
import torch

from dropcluster_timm.clustering import (
    CLUSTER_METHODS, activation_features, cluster_activations, cluster_features, connected_components,
    grid_cluster_map, within_cluster_variance,
)
from dropcluster_timm.testing import smooth_region_fields

scipy_ndimage = pytest.importorskip('scipy.ndimage')


def _assert_valid(labels, spatial, k):
    """Labels are compact, at most k per map, and every cluster is grid-connected."""
    G = labels.shape[0]
    flat = labels.reshape(G, -1)
    assert flat.dtype == torch.long and flat.min() >= 0
    counts = flat.amax(1) + 1
    assert (counts <= k).all()
    for g in range(G):
        assert flat[g].unique().numel() == counts[g], 'labels are not compact'
    pieces = connected_components(flat, spatial)
    assert torch.equal(pieces.amax(1), flat.amax(1)), 'a cluster is not connected'


@pytest.mark.parametrize('method', CLUSTER_METHODS)
@pytest.mark.parametrize('spatial', [[37], [12, 15], [5, 6, 7]])
def test_methods_give_connected_maps_with_at_most_k(method, spatial):
    if method == 'ward':
        pytest.importorskip('sklearn')
    g = torch.Generator().manual_seed(0)
    x = torch.randn([6, 3] + spatial, generator=g)
    k = 9
    labels = cluster_activations(x, k, method=method, generator=torch.Generator().manual_seed(1))
    assert labels.shape == tuple([3] + spatial)
    _assert_valid(labels, spatial, k)
    if method in ('rena', 'kmeans', 'random', 'ward'):
        assert ((labels.reshape(3, -1).amax(1) + 1) == k).all(), 'exactly K clusters expected'


def test_coupled_clustering_gives_one_map():
    x = torch.randn(4, 5, 10, 10)
    labels = cluster_activations(x, 6, couple_channels=True)
    assert labels.shape == (1, 10, 10)
    _assert_valid(labels, [10, 10], 6)


def test_grid_is_regular_blocks():
    labels = grid_cluster_map([14, 14], 4)[0]
    assert labels.unique().numel() == 4
    assert torch.equal(labels[:7, :7], torch.zeros(7, 7, dtype=torch.long))
    assert labels[7, 7] == 3 and labels[0, 7] == 1
    # Too many clusters asked: one pixel each. Non-square counts round to a coarser grid.
    assert grid_cluster_map([3, 4], 100).unique().numel() == 12
    assert grid_cluster_map([10, 10], 7).unique().numel() <= 7


def test_connected_components_matches_scipy():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (4, 9 * 11), generator=g)
    ours = connected_components(labels, [9, 11])
    for m in range(4):
        lab = labels[m].view(9, 11).numpy()
        expected = sum(scipy_ndimage.label(lab == v)[1] for v in range(3))
        assert int(ours[m].max()) + 1 == expected
        # Same partition: pixels share our label iff they share value and scipy component.
        same_ours = ours[m][:, None] == ours[m][None, :]
        comp = torch.zeros(99, dtype=torch.long)
        offset = 0
        for v in range(3):
            cc, n = scipy_ndimage.label(lab == v)
            cc = torch.as_tensor(cc).view(-1).long()
            comp[cc > 0] = cc[cc > 0] + offset
            offset += n
        assert torch.equal(same_ours, comp[:, None] == comp[None, :])


def test_rena_quality_close_to_ward():
    pytest.importorskip('sklearn')
    g = torch.Generator().manual_seed(0)
    for (B, C, H, W, regions) in [(32, 6, 14, 14, 8), (32, 4, 28, 28, 16)]:
        feats = activation_features(smooth_region_fields(B, C, H, W, regions, g))
        ward = within_cluster_variance(feats, cluster_features(feats, [H, W], regions, 'ward')).mean()
        rena = within_cluster_variance(feats, cluster_features(feats, [H, W], regions, 'rena')).mean()
        grid = within_cluster_variance(feats, cluster_features(feats, [H, W], regions, 'grid')).mean()
        assert rena <= 1.25 * ward, f'rena {rena:.4f} vs ward {ward:.4f}'
        assert grid > 2 * ward  # the data has structure that a grid misses


def test_rena_recovers_separated_regions():
    # Two halves with different signals: K=2 must split them exactly.
    x = torch.randn(16, 1, 1, 1).expand(16, 1, 8, 8).clone()
    x[..., 4:] = torch.randn(16, 1, 1, 1)
    labels = cluster_activations(x, 2)[0]
    assert labels[:, :4].unique().numel() == 1 and labels[:, 4:].unique().numel() == 1
    assert labels[0, 0] != labels[0, 7]


@pytest.mark.parametrize('method', ['rena', 'kmeans', 'random'])
def test_deterministic_for_a_seed(method):
    x = torch.randn(8, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    a = cluster_activations(x, 10, method, generator=torch.Generator().manual_seed(3))
    b = cluster_activations(x, 10, method, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    if method == 'random':
        c = cluster_activations(x, 10, method, generator=torch.Generator().manual_seed(4))
        assert not torch.equal(a, c)


@pytest.mark.parametrize('method', ['rena', 'kmeans', 'random', 'grid'])
def test_degenerate_inputs(method):
    k = 7
    cases = {
        'constant': torch.full((4, 2, 9, 9), 3.0),
        'zeros': torch.zeros(4, 2, 9, 9),
        'nan_inf': torch.randn(4, 2, 9, 9).index_put_((torch.tensor([0, 1]),), torch.tensor(float('nan'))),
        'batch_one': torch.randn(1, 2, 9, 9),
        'huge': torch.randn(4, 2, 9, 9) * 1e30,
    }
    cases['nan_inf'][2, :, :3] = float('inf')
    cases['nan_inf'][3, :, 5:] = -float('inf')
    for name, x in cases.items():
        labels = cluster_activations(x, k, method, generator=torch.Generator().manual_seed(0))
        _assert_valid(labels, [9, 9], k)
    # K >= number of pixels: one pixel per cluster.
    labels = cluster_activations(torch.randn(2, 3, 4, 4), 16, method)
    assert torch.equal(labels.reshape(3, -1), torch.arange(16).expand(3, 16))


def test_bad_arguments():
    with pytest.raises(ValueError, match='unknown cluster method'):
        cluster_activations(torch.randn(2, 2, 4, 4), 3, 'spectral')
    with pytest.raises(ValueError, match='num_clusters'):
        cluster_activations(torch.randn(2, 2, 4, 4), 0)
    with pytest.raises(ValueError, match='shape'):
        cluster_activations(torch.randn(4, 4), 3)
