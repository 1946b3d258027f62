import pytest
import torch

from dropcluster_timm.clustering.engine import (
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


# ---- k-medoids and Gaussian mixture ----------------------------------------------------------------

_CENTROID_METHODS = ['kmedoids', 'gmm']


def _planted_blocks(C, B=12, noise=0.1, seed=0):
    """Features of C maps on a 16 x 20 grid made of 8 constant 8 x 5 blocks plus noise; the block labels."""
    g = torch.Generator().manual_seed(seed)
    region = (torch.arange(16)[:, None] // 8) * 4 + torch.arange(20)[None, :] // 5
    vals = torch.randn(B, C, 8, generator=g)
    x = vals[:, :, region.view(-1)].view(B, C, 16, 20) + noise * torch.randn(B, C, 16, 20, generator=g)
    return activation_features(x), region.view(1, -1).expand(C, -1)


@pytest.mark.parametrize('method', _CENTROID_METHODS)
def test_centroid_methods_listed(method):
    import dropcluster_timm.clustering.engine as clustering
    assert method in CLUSTER_METHODS and CLUSTER_METHODS[:5] == ('rena', 'kmeans', 'grid', 'random', 'ward')
    assert f'{method}_labels' in clustering.__all__


@pytest.mark.parametrize('method', _CENTROID_METHODS)
@pytest.mark.parametrize('spatial', [[37], [12, 15], [5, 6, 7]])
@pytest.mark.parametrize('options', [{}, {'coord_weight': 0.5, 'iters': 2}])
def test_centroid_methods_connected_compact_at_most_k(method, spatial, options):
    x = torch.randn([6, 3] + spatial, generator=torch.Generator().manual_seed(0))
    labels = cluster_activations(x, 9, method, generator=torch.Generator().manual_seed(1), **options)
    assert labels.shape == tuple([3] + spatial)
    _assert_valid(labels, spatial, 9)
    assert ((labels.reshape(3, -1).amax(1) + 1) == 9).all(), 'random input splits into more than K pieces'


@pytest.mark.parametrize('method', _CENTROID_METHODS)
def test_centroid_methods_coupled_and_one_feature(method):
    x = torch.randn(4, 5, 10, 10, generator=torch.Generator().manual_seed(0))
    labels = cluster_activations(x, 6, method, couple_channels=True, generator=torch.Generator().manual_seed(0))
    assert labels.shape == (1, 10, 10)
    _assert_valid(labels, [10, 10], 6)
    # D = 1: a batch of one sample, one feature per pixel.
    labels = cluster_activations(x[:1], 6, method, generator=torch.Generator().manual_seed(0))
    assert labels.shape == (5, 10, 10)
    _assert_valid(labels, [10, 10], 6)


@pytest.mark.parametrize('method', _CENTROID_METHODS)
def test_centroid_methods_seeded(method):
    x = torch.randn(8, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    a = cluster_activations(x, 10, method, generator=torch.Generator().manual_seed(3))
    b = cluster_activations(x, 10, method, generator=torch.Generator().manual_seed(3))
    c = cluster_activations(x, 10, method, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize('method', _CENTROID_METHODS)
def test_centroid_methods_degenerate_inputs(method):
    test_degenerate_inputs(method)
    # Maps mixing constant and all-zero (dead ReLU) channels with live ones.
    x = torch.randn(4, 3, 9, 9).relu()
    x[:, 0] = 0.0
    x[:, 1] = 2.5
    feats = activation_features(x)
    labels = cluster_features(feats, [9, 9], 7, method, generator=torch.Generator().manual_seed(0))
    _assert_valid(labels, [9, 9], 7)
    assert labels[:2].amax() == 0, 'constant maps are one cluster'


def test_gmm_stays_finite_on_degenerate_features():
    from dropcluster_timm.clustering.engine import gmm_labels
    # One feature, most pixels identical, a few outliers: components collapse onto single values.
    feats = torch.zeros(3, 64, 1)
    feats[0, ::9] = 1.0
    feats[1] = 1e14
    feats[2, :5] = torch.tensor([1e-20, -1e-20, 0.0, 3e-20, 1.0]).view(5, 1)
    labels = gmm_labels(feats, [8, 8], 5, generator=torch.Generator().manual_seed(0))
    _assert_valid(labels, [8, 8], 5)


@pytest.mark.parametrize('method', _CENTROID_METHODS)
def test_centroid_methods_recover_planted_blocks(method):
    feats, planted = _planted_blocks(16)
    best = within_cluster_variance(feats, planted)
    rand = within_cluster_variance(
        feats, cluster_features(feats, [16, 20], 8, 'random', generator=torch.Generator().manual_seed(0)))
    for seed in range(3):
        labels = cluster_features(feats, [16, 20], 8, method, generator=torch.Generator().manual_seed(seed))
        _assert_valid(labels, [16, 20], 8)
        ratio = within_cluster_variance(feats, labels) / best
        # Most maps find the planted blocks exactly; the rest are local optima, still far below random.
        assert (ratio < 1.01).float().mean() >= 0.75, f'seed {seed}: {ratio}'
        assert within_cluster_variance(feats, labels).mean() < 0.1 * rand.mean()


@pytest.mark.parametrize('method', _CENTROID_METHODS)
def test_centroid_methods_quality_on_smooth_regions(method):
    g = torch.Generator().manual_seed(0)
    feats = activation_features(smooth_region_fields(32, 4, 28, 28, 16, g))
    ours = within_cluster_variance(
        feats, cluster_features(feats, [28, 28], 16, method, generator=torch.Generator().manual_seed(0))).mean()
    rand = within_cluster_variance(
        feats, cluster_features(feats, [28, 28], 16, 'random', generator=torch.Generator().manual_seed(0))).mean()
    rena = within_cluster_variance(feats, cluster_features(feats, [28, 28], 16, 'rena')).mean()
    assert ours < 0.1 * rand
    assert ours < 2.0 * rena, f'{method} {ours:.4f} vs rena {rena:.4f}'


def test_kmedoids_update_picks_exact_medoids():
    from dropcluster_timm.clustering.centroids import _update_medoids
    g = torch.Generator().manual_seed(0)
    G, N, D, k = 3, 40, 2, 4
    pts = torch.randn(G, N, D, generator=g)
    assign = torch.randint(0, k, (G, N), generator=g)
    assign[:, :k] = torch.arange(k)                       # no empty cluster
    old = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(G)])

    def cost(m):  # summed distance of each cluster's members to its medoid, (G, k)
        d = (pts[:, :, None] - pts[torch.arange(G)[:, None], m][:, None]).norm(dim=-1)
        return torch.stack([d[..., c].mul(assign == c).sum(1) for c in range(k)], 1)

    exact = _update_medoids(pts, assign, old, candidates=N)
    for gi in range(G):
        for c in range(k):
            members = (assign[gi] == c).nonzero().squeeze(1)
            sums = torch.cdist(pts[gi, members], pts[gi, members]).sum(1)
            assert exact[gi, c] in members
            assert torch.isclose(sums.min(), cost(exact)[gi, c], rtol=1e-5)
    # A small candidate subset is never worse than the exact search by much, and never worse than
    # keeping a medoid that is a member of its cluster.
    old_members = torch.stack([(assign[gi] == torch.arange(k)[:, None]).float().argmax(1) for gi in range(G)])
    sub = _update_medoids(pts, assign, old_members, candidates=2)
    assert (cost(sub) <= cost(old_members) + 1e-5).all()
    assert (cost(sub) >= cost(exact) - 1e-5).all()


@pytest.mark.parametrize('spatial', [[37], [12, 15], [5, 6, 7], [1, 9], [4, 1, 5]])
@pytest.mark.parametrize('linkage', ['ward', 'centroid'])
def test_rena_grid_round_matches_edge_list_round(spatial, linkage):
    # rena's first round works on the grid's shifted differences; starting instead from one cluster
    # per pixel goes through the edge-list rounds, and must give the same labels, ties included.
    from dropcluster_timm.clustering.engine import rena_labels
    g = torch.Generator().manual_seed(0)
    n = int(torch.tensor(spatial).prod())
    for feats in [torch.randn(6, n, 5, generator=g), torch.randint(0, 3, (6, n, 2), generator=g).float()]:
        for k in [1, 3, 8]:
            labels = rena_labels(feats, spatial, k, linkage=linkage)
            _assert_valid(labels, spatial, k)
            assert ((labels.amax(1) + 1) == k).all()
            per_pixel = torch.arange(n).expand(6, n)
            assert torch.equal(labels, rena_labels(feats, spatial, k, init_labels=per_pixel, linkage=linkage))
