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
    * ``"grid"``: a regular partition into near-square blocks (what DropCluster starts from).
    * ``"random"``: random connected clusters (agglomeration of random features).
    * ``"ward"``: scikit-learn's Ward ``FeatureAgglomeration`` on ``grid_to_graph``, one map at a
      time on the CPU. Slow; kept as the quality reference (needs ``scikit-learn``).

A pixel's feature vector is its activation over the batch (one map per channel) or over batch and
channels (one coupled map). Non-finite activations are treated as zero so that degenerate inputs
still give valid maps.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    'CLUSTER_METHODS', 'cluster_activations', 'cluster_features', 'activation_features',
    'grid_cluster_map', 'grid_edges', 'connected_components', 'within_cluster_variance',
    'rena_labels', 'kmeans_labels', 'random_labels', 'ward_labels',
]

CLUSTER_METHODS = ('rena', 'kmeans', 'grid', 'random', 'ward')

# Edge costs are computed in chunks of this many (edge x feature) elements to bound memory.
_CHUNK_ELEMENTS = 1 << 24
# Above this magnitude squared distances over thousands of features could overflow float32.
_MAX_FEATURE = 1e15


def grid_cluster_map(spatial: List[int], num_clusters: int, device: Optional[torch.device] = None) -> Tensor:
    """Regular partition of a grid into at most ``num_clusters`` near-cubic blocks.

    The block side is the smallest one whose block count fits in ``num_clusters``, so a target of
    ``ceil(H / s) * ceil(W / s)`` clusters gives exactly the non-overlapping s x s blocks. TorchScript
    friendly: the layers call it in ``forward`` before their first clustering.

    Returns:
        int64 labels of shape ``(1, *spatial)``.
    """
    n = 1
    for d in spatial:
        n *= d
    k = max(1, min(num_clusters, n))
    side = max(1, int(math.floor((n / k) ** (1.0 / len(spatial)))))
    while True:
        count = 1
        for d in spatial:
            count *= (d + side - 1) // side
        if count <= k:
            break
        side += 1
    labels = torch.zeros([1] * len(spatial), dtype=torch.long, device=device)
    for i, d in enumerate(spatial):
        blocks = (d + side - 1) // side
        shape = [1] * len(spatial)
        shape[i] = d
        labels = labels * blocks + (torch.arange(d, device=device) // side).view(shape)
    return labels.unsqueeze(0)


def grid_edges(spatial: Sequence[int], device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    """Pixel adjacency of a grid (2/4/6-connectivity) as ``(src, dst)`` flat indices, ``src < dst``.

    Edges are listed axis by axis in raster order of ``src``, so the costs of axis ``k`` equal a
    shifted difference along that axis flattened (see ``_grid_edge_sqdist``).
    """
    spatial = list(spatial)
    idx = torch.arange(math.prod(spatial), device=device).view(spatial)
    src, dst = [], []
    for axis in range(len(spatial)):
        src.append(idx.narrow(axis, 0, spatial[axis] - 1).reshape(-1))
        dst.append(idx.narrow(axis, 1, spatial[axis] - 1).reshape(-1))
    return torch.cat(src), torch.cat(dst)


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
        generator: random generator for ``"kmeans"`` and ``"random"`` (the others are deterministic).
        **kwargs: method options (``linkage`` for rena, ``coord_weight`` / ``iters`` for kmeans).

    Returns:
        int64 labels ``(G, *spatial)``, G = 1 if coupled else C, compact per map (0 .. k-1).
    """
    spatial = list(x.shape[2:])
    feats = activation_features(x, couple_channels)
    return cluster_features(feats, spatial, num_clusters, method, generator, **kwargs).view([-1] + spatial)


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
    if method == 'random':
        return random_labels(G, spatial, num_clusters, generator=generator, device=feats.device)
    return ward_labels(feats, spatial, num_clusters)


def rena_labels(
        feats: Tensor,
        spatial: Sequence[int],
        num_clusters: int,
        init_labels: Optional[Tensor] = None,
        linkage: str = 'ward',
        chain_factor: float = 8.0,
        pair_fraction: float = 0.3,
) -> Tensor:
    """Recursive nearest agglomeration of ``(G, N, D)`` pixel features, batched over the G maps.

    Args:
        feats: per-pixel features.
        spatial: grid shape, ``prod(spatial) == N``.
        num_clusters: at most this many clusters per map come out.
        init_labels: optional ``(G, N)`` connected starting partition (compact per map);
            default one cluster per pixel.
        linkage: cost of linking two adjacent clusters: ``"ward"`` (increase of within-cluster sum of
            squares, ``n_a n_b / (n_a + n_b) * |m_a - m_b|^2``, favours even sizes) or
            ``"centroid"`` (``|m_a - m_b|^2``, the original ReNA).
        chain_factor: ReNA rounds (whole 1-NN components merge) run while a map has more than
            ``chain_factor * num_clusters`` clusters. They are fast but coarse.
        pair_fraction: after that, each round merges only mutual nearest pairs, and only the
            cheapest ``pair_fraction`` of the merges still needed. Merging all mutual pairs at once
            would give Ward's tree but not Ward's cut at K; rationing them by cost comes within a
            few percent of Ward's within-cluster variance (see ``benchmarks/bench_layer.py``).

    Returns:
        int64 labels ``(G, N)``, compact per map, every cluster connected on the grid.
    """
    if linkage not in ('ward', 'centroid'):
        raise ValueError(f"linkage must be 'ward' or 'centroid', got {linkage!r}")
    if not 0.0 < pair_fraction <= 1.0:
        raise ValueError(f'pair_fraction must be in (0, 1], got {pair_fraction}')
    G, N, D = feats.shape
    device = feats.device
    feats = feats.float()
    src, dst = grid_edges(spatial, device)
    if init_labels is None:
        # One node per pixel: the first round's costs come from shifted differences on the grid.
        sizes = torch.ones(G * N, device=device)
        node_feats = feats.reshape(G * N, D)
        offsets = torch.arange(G, device=device) * N
        pix_node = (torch.arange(N, device=device) + offsets[:, None])
        node_group = torch.arange(G, device=device).repeat_interleave(N)
        a = (src + offsets[:, None]).reshape(-1)
        b = (dst + offsets[:, None]).reshape(-1)
        first_cost = _grid_edge_sqdist(feats, spatial) * 0.5 if linkage == 'ward' else _grid_edge_sqdist(feats, spatial)
    else:
        init_labels = init_labels.to(device=device, dtype=torch.long)
        counts = init_labels.amax(dim=1) + 1
        offsets = torch.cumsum(counts, 0) - counts
        pix_node = init_labels + offsets[:, None]
        total = int(counts.sum())
        sizes = torch.zeros(total, device=device).index_add_(0, pix_node.reshape(-1), torch.ones(G * N, device=device))
        node_feats = torch.zeros(total, D, device=device).index_add_(0, pix_node.reshape(-1), feats.reshape(G * N, D))
        node_feats /= sizes[:, None]
        a, b = _unique_edges(pix_node[:, src].reshape(-1), pix_node[:, dst].reshape(-1), total)
        node_group = torch.arange(G, device=device).repeat_interleave(counts)
        first_cost = None

    while True:
        total = node_group.numel()
        counts = torch.bincount(node_group, minlength=G)
        allowed = (counts - num_clusters).clamp_min(0)
        if a.numel() == 0 or not bool(allowed.any()):
            break
        if first_cost is not None:
            cost, first_cost = first_cost, None
        else:
            cost = _edge_sqdist(node_feats, a, b)
            if linkage == 'ward':
                cost = cost * (sizes[a] * sizes[b] / (sizes[a] + sizes[b]))
        pairs_only = counts <= chain_factor * num_clusters
        allowed = torch.where(pairs_only, torch.ceil(allowed * pair_fraction).long(), allowed)
        parent = _nearest_neighbour_forest(cost, a, b, total, node_group, allowed, counts, pairs_only)
        new_id, num_new = _find_roots(parent)
        node_group = torch.zeros(num_new, dtype=torch.long, device=device).scatter_(0, new_id, node_group)
        new_sizes = torch.zeros(num_new, device=device).index_add_(0, new_id, sizes)
        node_feats = torch.zeros(num_new, D, device=device).index_add_(0, new_id, node_feats * sizes[:, None])
        node_feats /= new_sizes[:, None]
        sizes = new_sizes
        pix_node = new_id[pix_node]
        a, b = _unique_edges(new_id[a], new_id[b], num_new)

    counts = torch.bincount(node_group, minlength=G)
    offsets = torch.cumsum(counts, 0) - counts
    return pix_node - offsets[:, None]


def _grid_edge_sqdist(feats: Tensor, spatial: Sequence[int]) -> Tensor:
    """Squared distances of all pixel edges, in ``grid_edges`` order, from shifted differences."""
    G, N, D = feats.shape
    grid = feats.view([G] + list(spatial) + [D])
    out = []
    for axis in range(len(spatial)):
        diff = grid.narrow(axis + 1, 1, spatial[axis] - 1) - grid.narrow(axis + 1, 0, spatial[axis] - 1)
        out.append(torch.linalg.vector_norm(diff, dim=-1).square().reshape(G, -1))
    return torch.cat(out, dim=1).reshape(-1)


def _edge_sqdist(node_feats: Tensor, a: Tensor, b: Tensor) -> Tensor:
    D = node_feats.shape[1]
    step = max(1, _CHUNK_ELEMENTS // max(D, 1))
    out = torch.empty(a.numel(), device=node_feats.device)
    for i in range(0, a.numel(), step):
        diff = node_feats.index_select(0, a[i:i + step]).sub_(node_feats.index_select(0, b[i:i + step]))
        out[i:i + step] = torch.linalg.vector_norm(diff, dim=-1).square()
    return out


def _unique_edges(a: Tensor, b: Tensor, num_nodes: int) -> Tuple[Tensor, Tensor]:
    """Canonical (lo, hi) edges between distinct nodes, duplicates removed."""
    keep = a != b
    a, b = a[keep], b[keep]
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    key = torch.unique(lo * num_nodes + hi)
    return key // num_nodes, key % num_nodes


def _nearest_neighbour_forest(
        cost: Tensor, a: Tensor, b: Tensor, total: int, node_group: Tensor, allowed: Tensor, counts: Tensor,
        pairs_only: Tensor,
) -> Tensor:
    """Parent pointers of the 1-NN forest, keeping only the ``allowed`` cheapest links per map.

    Ties go to the lower neighbour id, so the 1-NN graph has no cycle longer than a mutual pair;
    the lower id of a pair is its root. In maps flagged ``pairs_only`` only mutual pairs merge.
    """
    device = cost.device
    ids = torch.arange(total, device=device)
    node = torch.cat([a, b])
    nbr = torch.cat([b, a])
    c2 = torch.cat([cost, cost])
    best = torch.full((total,), float('inf'), device=device).scatter_reduce(0, node, c2, 'amin')
    is_best = c2 <= best[node]
    nn = torch.full((total,), total, dtype=torch.long, device=device)
    nn = nn.scatter_reduce(0, node[is_best], nbr[is_best], 'amin')
    nn = torch.where(nn == total, ids, nn)
    mutual = nn[nn] == ids
    root = (ids <= nn) & mutual | pairs_only[node_group] & ~mutual

    # Rank non-root links by cost within their map; only the cheapest `allowed` ones merge.
    link_cost = torch.where(root, torch.full_like(best, float('inf')), best)
    order = torch.argsort(link_cost, stable=True)
    order = order[torch.argsort(node_group[order], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(ids)
    rank[order] = ids - starts[node_group[order]]
    merge = ~root & (rank < allowed[node_group])
    return torch.where(merge, nn, ids)


def _find_roots(parent: Tensor) -> Tuple[Tensor, int]:
    """Pointer jumping on a forest; returns compact root ids per node and the number of roots."""
    while True:
        nxt = parent[parent]
        if torch.equal(nxt, parent):
            break
        parent = nxt
    ids = torch.arange(parent.numel(), device=parent.device)
    is_root = parent == ids
    compact = torch.cumsum(is_root.long(), 0) - 1
    return compact[parent], int(is_root.sum())


def connected_components(labels: Tensor, spatial: Sequence[int]) -> Tensor:
    """Split every cluster of ``labels`` ``(G, N)`` into its grid-connected pieces.

    Returns compact int64 labels ``(G, N)``; a map whose clusters are all connected keeps its
    number of distinct labels.
    """
    G, N = labels.shape
    device = labels.device
    src, dst = grid_edges(spatial, device)
    offsets = torch.arange(G, device=device)[:, None] * N
    same = labels[:, src] == labels[:, dst]
    a = (src + offsets)[same]
    b = (dst + offsets)[same]
    comp = torch.arange(G * N, device=device)
    while True:
        nxt = comp.scatter_reduce(0, a, comp[b], 'amin').scatter_reduce(0, b, comp[a], 'amin')
        nxt = nxt[nxt]
        if torch.equal(nxt, comp):
            break
        comp = nxt
    is_rep = (comp == torch.arange(G * N, device=device)).view(G, N)
    local = torch.cumsum(is_rep.long(), 1) - 1
    return local.view(-1)[comp].view(G, N)


def kmeans_labels(
        feats: Tensor,
        spatial: Sequence[int],
        num_clusters: int,
        generator: Optional[torch.Generator] = None,
        coord_weight: float = 0.0,
        iters: int = 10,
) -> Tensor:
    """Batched k-means (k-means++ seeding), split into connected pieces, then merged to <= K.

    ``coord_weight`` appends pixel coordinates scaled to [0, coord_weight] times the features'
    typical distance, which makes clusters more compact (and less often split).
    """
    G, N, D = feats.shape
    device = feats.device
    k = num_clusters
    pts = feats.float()
    if coord_weight > 0:
        coords = torch.stack(torch.meshgrid(
            *[torch.arange(s, device=device, dtype=torch.float32) / max(s - 1, 1) for s in spatial],
            indexing='ij'), dim=-1).view(1, N, len(spatial))
        spread = pts.std(dim=1).norm(dim=-1).clamp_min(1e-6).view(G, 1, 1)
        pts = torch.cat([pts, coords.expand(G, -1, -1) * coord_weight * spread], dim=-1)

    # k-means++ seeding, one new centre per step for all maps at once.
    first = torch.randint(N, (G,), generator=_gen_for(generator, device), device=device)
    centres = pts[torch.arange(G, device=device), first][:, None]
    mind = (pts - centres).square().sum(-1)
    for _ in range(1, k):
        w = mind.clamp_min(0) + 1e-12
        pick = torch.multinomial(w, 1, generator=_gen_for(generator, device)).squeeze(1)
        c = pts[torch.arange(G, device=device), pick][:, None]
        centres = torch.cat([centres, c], dim=1)
        mind = torch.minimum(mind, (pts - c).square().sum(-1))
    for _ in range(iters):
        assign = torch.cdist(pts, centres).argmin(-1)
        sums = torch.zeros_like(centres).scatter_add_(1, assign[..., None].expand_as(pts), pts)
        cnt = torch.zeros(G, k, device=device).scatter_add_(1, assign, torch.ones(G, N, device=device))
        centres = torch.where(cnt[..., None] > 0, sums / cnt.clamp_min(1)[..., None], centres)
    assign = torch.cdist(pts, centres).argmin(-1)
    pieces = connected_components(assign, spatial)
    return rena_labels(feats, spatial, num_clusters, init_labels=pieces)


def random_labels(
        num_maps: int,
        spatial: Sequence[int],
        num_clusters: int,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
) -> Tensor:
    """Random connected partitions: agglomeration of random pixel features."""
    n = math.prod(spatial)
    feats = torch.rand(num_maps, n, 4, generator=_gen_for(generator, device), device=device)
    return rena_labels(feats, spatial, num_clusters, linkage='centroid')


def ward_labels(feats: Tensor, spatial: Sequence[int], num_clusters: int) -> Tensor:
    """scikit-learn Ward agglomeration with grid connectivity, one map at a time (reference)."""
    try:
        from sklearn.cluster import FeatureAgglomeration
        from sklearn.feature_extraction.image import grid_to_graph
    except ImportError as e:
        raise ImportError("cluster method 'ward' needs scikit-learn: pip install scikit-learn") from e
    spatial = list(spatial)
    graph = grid_to_graph(*spatial) if len(spatial) > 1 else grid_to_graph(spatial[0], 1)
    out = []
    for f in feats.detach().float().cpu().numpy():
        agglo = FeatureAgglomeration(n_clusters=num_clusters, connectivity=graph, linkage='ward')
        out.append(torch.as_tensor(agglo.fit(f.T).labels_, dtype=torch.long))
    return torch.stack(out).to(feats.device)


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


def _gen_for(generator: Optional[torch.Generator], device) -> Optional[torch.Generator]:
    # torch samplers need a generator on the tensor's device; fall back to the global RNG otherwise.
    if generator is None:
        return None
    gen_dev = torch.device(generator.device)
    dev = torch.device(device) if device is not None else torch.device('cpu')
    if gen_dev.type != dev.type:
        raise ValueError(f'generator is on {gen_dev} but the activations are on {dev}')
    return generator
