import pytest
import torch

from dropcluster_timm.clustering.cluster_count import (
    candidate_counts, gap_statistic_labels, smooth_references, spatial_hopkins, structured_maps,
)
from dropcluster_timm.clustering.engine import activation_features, connected_components
from dropcluster_timm.testing import smooth_region_fields


def _feats(x):
    return activation_features(x), list(x.shape[2:])


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_candidate_counts_span_the_range_geometrically():
    ks = candidate_counts(4, 128, 6)
    assert ks == sorted(set(ks)) and ks[0] == 4 and ks[-1] == 128 and len(ks) == 6
    ratios = [b / a for a, b in zip(ks, ks[1:])]
    assert max(ratios) / min(ratios) < 1.3
    assert candidate_counts(5, 6, 6) == [5, 6]
    with pytest.raises(ValueError, match='k_min'):
        candidate_counts(8, 4)


@pytest.mark.parametrize('regions', [16, 64])
def test_gap_statistic_finds_the_planted_region_count(regions):
    x = smooth_region_fields(32, 12, 28, 28, regions, _gen(regions))
    feats, spatial = _feats(x)
    labels, counts = gap_statistic_labels(feats, spatial, 4, 128, generator=_gen(1))
    assert labels.shape == (12, 28 * 28)
    assert torch.equal(counts, labels.amax(1) + 1)
    # The candidates are 4, 8, 16, 32, 64, 128: the planted count is one of them.
    assert (counts == regions).float().mean() >= 0.75, counts.tolist()


def test_gap_statistic_keeps_unstructured_maps_coarse_and_labels_valid():
    x = torch.randn(32, 8, 20, 20, generator=_gen())
    feats, spatial = _feats(x)
    labels, counts = gap_statistic_labels(feats, spatial, 4, 100, generator=_gen(1))
    assert (counts <= 8).float().mean() >= 0.75, counts.tolist()
    assert (counts >= 4).all() and (counts <= 100).all()
    pieces = connected_components(labels, spatial)
    assert torch.equal(pieces.amax(1), labels.amax(1)), 'a cluster is not connected'
    for g in range(8):
        assert labels[g].unique().numel() == counts[g]


def test_gap_statistic_is_seeded_and_works_with_other_methods():
    x = smooth_region_fields(16, 4, 16, 16, 8, _gen(3))
    feats, spatial = _feats(x)
    a = gap_statistic_labels(feats, spatial, 2, 32, method='kmeans', generator=_gen(5))
    b = gap_statistic_labels(feats, spatial, 2, 32, method='kmeans', generator=_gen(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="not 'grid'"):
        gap_statistic_labels(feats, spatial, 2, 32, method='grid')
    with pytest.raises(ValueError, match='num_refs'):
        gap_statistic_labels(feats, spatial, 2, 32, num_refs=0)


def test_gap_statistic_on_constant_maps_and_one_candidate():
    feats, spatial = _feats(torch.zeros(4, 3, 10, 10))
    labels, counts = gap_statistic_labels(feats, spatial, 2, 20, generator=_gen())
    assert torch.isfinite(labels.float()).all() and (counts >= 2).all() and (counts <= 20).all()
    labels, counts = gap_statistic_labels(feats, spatial, 7, 7)
    assert (counts == 7).all()


def test_smooth_references_match_the_smoothness_of_each_map():
    smooth = smooth_region_fields(16, 4, 24, 24, 16, _gen())
    noise = torch.randn(16, 4, 24, 24, generator=_gen(1))
    feats, spatial = _feats(torch.cat([smooth, noise], dim=1))
    refs = smooth_references(feats, spatial, num_refs=2, generator=_gen(2), ref_features=8)
    assert refs.shape == (16, 24 * 24, 8)
    h_data = spatial_hopkins(feats, spatial, generator=_gen(3))
    h_refs = spatial_hopkins(refs, spatial, generator=_gen(3)).view(2, 8).mean(0)
    assert (h_refs - h_data).abs().max() < 0.05, (h_data, h_refs)
    assert (h_refs[:4] > 0.6).all() and ((h_refs[4:] - 0.5).abs() < 0.05).all()


def test_spatial_hopkins_separates_noise_from_structure():
    noise, spatial = _feats(torch.randn(32, 16, 28, 28, generator=_gen()))
    smooth, _ = _feats(smooth_region_fields(32, 16, 28, 28, 16, _gen(1)))
    const, _ = _feats(torch.zeros(8, 2, 28, 28))
    h_noise = spatial_hopkins(noise, spatial, generator=_gen(2))
    h_smooth = spatial_hopkins(smooth, spatial, generator=_gen(2))
    assert (h_noise - 0.5).abs().max() < 0.05
    assert h_smooth.min() > 0.65
    assert torch.equal(spatial_hopkins(const, spatial), torch.full((2,), 0.5))


@pytest.mark.parametrize('spatial', [[300], [20, 20], [6, 7, 8]])
def test_structured_maps_is_a_level_alpha_test(spatial):
    g = _gen(len(spatial))
    noise = torch.randn(16, 200, *spatial, generator=g)
    smooth = noise
    for _ in range(3):  # neighbour averaging along every axis: spatially correlated
        for axis in range(2, 2 + len(spatial)):
            smooth = (smooth + smooth.roll(1, axis) + smooth.roll(-1, axis)) / 3
    x = torch.cat([noise, smooth[:, :20], torch.zeros(16, 4, *spatial)], dim=1)
    feats, _ = _feats(x)
    flags = structured_maps(feats, spatial, alpha=0.05, generator=_gen(7))
    false_positives = int(flags[:200].sum())
    assert false_positives <= 22, false_positives  # 10 expected at alpha = 0.05; 22 is > 3.5 sd above
    assert flags[200:220].all()
    assert not flags[220:].any(), 'constant maps count as unstructured'
    with pytest.raises(ValueError, match='alpha'):
        structured_maps(feats, spatial, alpha=1.5)
