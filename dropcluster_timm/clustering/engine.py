""" Clustering engine for DropCluster.

Turns a batch of activations ``(B, C, *spatial)`` into label maps whose clusters are spatially
connected on the pixel grid (2-, 4- or 6-connectivity for 1d, 2d and 3d maps) and number at most
``num_clusters``. Every method is batched over all maps at once and runs on the activations' device.

Methods:
    * ``"rena"`` (default): recursive nearest agglomeration (Hoyos-Idrobo et al., 2016). Each
      cluster is linked to its nearest adjacent cluster, connected components of that 1-NN graph
      become the new clusters, and the graph is reduced. Close to K, rounds switch to merging only
      the cheapest mutual nearest pairs under Ward's cost, which brings the result within a few
      percent of Ward's within-cluster variance. Exactly K clusters come out when the grid allows.
    * ``"kmeans"``: k-means++ seeded Lloyd iterations on pixel feature vectors (optionally with
      weighted pixel coordinates), split into connected pieces, then agglomerated back to <= K.
    * ``"kmedoids"``: k-medoids by alternation (Voronoi iteration): k-means++ seeding, then each
      pixel joins its nearest medoid and each cluster's new medoid is the member with the least
      summed Euclidean distance to the members (searched among the members nearest the cluster
      mean). Split into connected pieces and agglomerated back to <= K like ``"kmeans"``.
    * ``"gmm"``: EM for a Gaussian mixture with diagonal covariances (k-means++ seeded, variance
      floor), hard assignment by maximum responsibility, then connected pieces and agglomeration
      back to <= K like ``"kmeans"``.
    * ``"grid"``: a regular partition into near-square blocks (what DropCluster starts from).
    * ``"random"``: random connected clusters (agglomeration of random features).
    * ``"ward"``: scikit-learn's Ward ``FeatureAgglomeration`` on ``grid_to_graph``, one map at a
      time on the CPU. Slow; kept as the quality reference (needs ``scikit-learn``).

A pixel's feature vector is its activation over the batch (one map per channel) or over batch and
channels (one coupled map). Non-finite activations are treated as zero so that degenerate inputs
still give valid maps.
"""
import contextlib
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .centroids import gmm_labels, kmeans_labels, kmedoids_labels, random_labels, ward_labels
from .grid import connected_components, grid_cluster_map, grid_edges
from .rena import rena_labels

__all__ = [
    'CLUSTER_METHODS', 'cluster_activations', 'cluster_features', 'activation_features',
    'grid_cluster_map', 'grid_edges', 'connected_components', 'within_cluster_variance',
    'rena_labels', 'kmeans_labels', 'random_labels', 'ward_labels', 'kmedoids_labels', 'gmm_labels', 'one_cpu_thread',
]

CLUSTER_METHODS = ('rena', 'kmeans', 'grid', 'random', 'ward', 'kmedoids', 'gmm')
# Above this magnitude squared distances over thousands of features could overflow float32.
_MAX_FEATURE = 1e15


def activation_features(x: Tensor, couple_channels: bool = False) -> Tensor:
    """Per-pixel feature vectors ``(G, N, D)`` of activations ``(B, C, *spatial)``.

    One group per channel with the batch as features, or a single group (``couple_channels``) with
    batch and channels as features. Returns a float32 copy with non-finite entries zeroed, scaled
    down only if squared distances could overflow.
    """
    if x.ndim < 3:
        raise ValueError(f'expected activations of shape (B, C, *spatial), got shape {tuple(x.shape)}')
    B, C = x.shape[:2]
    n = math.prod(x.shape[2:])
    f = x.detach().reshape(B, C, n)
    f = f.permute(2, 0, 1).reshape(1, n, B * C) if couple_channels else f.permute(1, 2, 0)
    out = torch.empty(f.shape, dtype=torch.float32, device=f.device).copy_(f)
    torch.nan_to_num_(out, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = torch.aminmax(out)
    peak = float(torch.maximum(-lo, hi))
    if peak > _MAX_FEATURE:
        out.mul_(1.0 / peak)
    return out


def cluster_activations(
        x: Tensor,
        num_clusters: int,
        method: str = 'rena',
        couple_channels: bool = False,
        generator: Optional[torch.Generator] = None,
        **kwargs,
) -> Tensor:
    """Cluster the pixels of activations ``(B, C, *spatial)``.

    Args:
        x: activations, at least one sample.
        num_clusters: upper bound K on the clusters of each map.
        method: one of ``CLUSTER_METHODS``.
        couple_channels: one map for all channels instead of one per channel.
        generator: random generator for ``"kmeans"``, ``"kmedoids"``, ``"gmm"`` and ``"random"``
            (the others are deterministic).
        **kwargs: method options (``linkage`` for rena; ``coord_weight`` / ``iters`` for kmeans,
            kmedoids and gmm; ``candidates`` for kmedoids; ``var_floor`` for gmm).

    Returns:
        int64 labels ``(G, *spatial)``, G = 1 if coupled else C, compact per map (0 .. k-1).
    """
    spatial = list(x.shape[2:])
    feats = activation_features(x, couple_channels)
    return cluster_features(feats, spatial, num_clusters, method, generator, **kwargs).view([-1] + spatial)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Cluster on one CPU thread: the engine's many small operations, split over OpenMP threads that
    spin-wait for each other, stall whenever other processes hold the cores (4-35x slower on a busy
    2-core machine; 1.8x with one thread, benchmarks/bench_busy.py). Quiet, one thread costs a few
    hundredths of a second per layer. No effect on other devices."""
    if torch.device(device).type != 'cpu' or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cluster_features(
        feats: Tensor,
        spatial: Sequence[int],
        num_clusters: int,
        method: str = 'rena',
        generator: Optional[torch.Generator] = None,
        **kwargs,
) -> Tensor:
    """Cluster per-pixel features ``(G, N, D)`` on a grid of shape ``spatial``; labels ``(G, N)``."""
    if method not in CLUSTER_METHODS:
        raise ValueError(f'unknown cluster method {method!r}, expected one of {CLUSTER_METHODS}')
    if int(num_clusters) < 1:
        raise ValueError(f'num_clusters must be >= 1, got {num_clusters}')
    spatial = [int(s) for s in spatial]
    if feats.ndim != 3 or feats.shape[1] != math.prod(spatial):
        raise ValueError(f'expected features (G, {math.prod(spatial)}, D), got {tuple(feats.shape)}')
    G, N, _ = feats.shape
    if method == 'grid':
        return grid_cluster_map(spatial, num_clusters, feats.device).view(1, N).expand(G, N).clone()
    if num_clusters >= N:
        return torch.arange(N, device=feats.device).expand(G, N).clone()
    if method == 'rena':
        return rena_labels(feats, spatial, num_clusters, **kwargs)
    if method == 'kmeans':
        return kmeans_labels(feats, spatial, num_clusters, generator=generator, **kwargs)
    if method == 'kmedoids':
        return kmedoids_labels(feats, spatial, num_clusters, generator=generator, **kwargs)
    if method == 'gmm':
        return gmm_labels(feats, spatial, num_clusters, generator=generator, **kwargs)
    if method == 'random':
        return random_labels(G, spatial, num_clusters, generator=generator, device=feats.device)
    return ward_labels(feats, spatial, num_clusters)


def within_cluster_variance(feats: Tensor, labels: Tensor) -> Tensor:
    """Mean squared distance of pixel features ``(G, N, D)`` to their cluster means, per map ``(G,)``."""
    G, N, D = feats.shape
    labels = labels.reshape(G, N).long()
    k = int(labels.max()) + 1
    f = feats.float()
    sums = torch.zeros(G, k, D, device=f.device).scatter_add_(1, labels[..., None].expand(G, N, D), f)
    cnt = torch.zeros(G, k, device=f.device).scatter_add_(1, labels, torch.ones(G, N, device=f.device))
    means = sums / cnt.clamp_min(1)[..., None]
    resid = f - means.gather(1, labels[..., None].expand(G, N, D))
    return resid.square().sum(-1).mean(-1)
