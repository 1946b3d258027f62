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
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    'CLUSTER_METHODS', 'cluster_activations', 'cluster_features', 'activation_features',
    'grid_cluster_map', 'grid_edges', 'connected_components', 'within_cluster_variance',
    'rena_labels', 'kmeans_labels', 'random_labels', 'ward_labels', 'kmedoids_labels', 'gmm_labels', 'one_cpu_thread',
]

CLUSTER_METHODS = ('rena', 'kmeans', 'grid', 'random', 'ward', 'kmedoids', 'gmm')

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
    # Clusters are kept as feature sums and sizes, so that merging them is a plain index_add.
    # Gathers use index_select (and masks nonzero + index_select): on the CPU several times faster
    # than advanced indexing.
    grid = a = b = cost = pix_node = None
    if init_labels is None:
        # One node per pixel: the first round works on the grid's shifted differences, no edge list.
        sizes = torch.ones(G * N, device=device)
        sums = feats.reshape(G * N, D)
        node_group = torch.arange(G, device=device).repeat_interleave(N)
        grid = _grid_edge_sqdist(feats, spatial)
        if linkage == 'ward':
            for dist, _, _ in grid:
                dist.mul_(0.5)
    else:
        init_labels = init_labels.to(device=device, dtype=torch.long)
        counts = init_labels.amax(dim=1) + 1
        offsets = torch.cumsum(counts, 0) - counts
        pix_node = (init_labels + offsets[:, None]).reshape(-1)
        total = int(counts.sum())
        sizes = torch.zeros(total, device=device).index_add_(0, pix_node, torch.ones(G * N, device=device))
        sums = torch.zeros(total, D, device=device).index_add_(0, pix_node, feats.reshape(G * N, D))
        src, dst = grid_edges(spatial, device)
        node_map = pix_node.view(G, N)
        a, b = _unique_edges(node_map[:, src].reshape(-1), node_map[:, dst].reshape(-1), total)
        node_group = torch.arange(G, device=device).repeat_interleave(counts)
    fresh = 0  # edges from `fresh` on have no cost yet
    relabels = []
    while True:
        total = node_group.numel()
        counts = torch.bincount(node_group, minlength=G)
        allowed = (counts - num_clusters).clamp_min(0)
        if (grid is None and a.numel() == 0) or not bool(allowed.any()):
            break
        if grid is not None:
            best, nn = _grid_nearest_neighbours(grid, total)
        else:
            if fresh < a.numel():
                new_cost = _edge_cost(sums, sizes, a[fresh:], b[fresh:], linkage)
                cost = torch.cat([cost, new_cost]) if fresh else new_cost
            best, nn = _nearest_neighbours(cost, a, b, total)
        pairs_only = counts <= chain_factor * num_clusters
        allowed = torch.where(pairs_only, torch.ceil(allowed * pair_fraction).long(), allowed)
        parent = _nearest_neighbour_forest(best, nn, node_group, allowed, pairs_only)
        new_id, num_new = _find_roots(parent)
        relabels.append(new_id)
        node_group = torch.zeros(num_new, dtype=torch.long, device=device).scatter_(0, new_id, node_group)
        new_sizes = torch.zeros(num_new, device=device).index_add_(0, new_id, sizes)
        sums = torch.zeros(num_new, D, device=device).index_add_(0, new_id, sums)
        if grid is not None:
            a, b = _grid_cluster_edges(grid, new_id, num_new)
            grid, cost, fresh = None, None, 0
        elif bool(pairs_only.all()):
            # Pair rounds merge few clusters. Edges between unmerged clusters stay unique and keep
            # their costs; only those touching a merged cluster are deduplicated and costed again.
            a, b = new_id.index_select(0, a), new_id.index_select(0, b)
            grown = torch.bincount(new_id, minlength=num_new) > 1
            stale = grown.index_select(0, a) | grown.index_select(0, b)
            keep = torch.nonzero(~stale).squeeze(1)
            stale = torch.nonzero(stale).squeeze(1)
            new_a, new_b = _unique_edges(a.index_select(0, stale), b.index_select(0, stale), num_new)
            cost = cost.index_select(0, keep)
            fresh = keep.numel()
            a = torch.cat([a.index_select(0, keep), new_a])
            b = torch.cat([b.index_select(0, keep), new_b])
        else:
            a, b = _unique_edges(new_id.index_select(0, a), new_id.index_select(0, b), num_new)
            cost, fresh = None, 0
        sizes = new_sizes

    # Compose the relabellings from the last round back: cheaper than relabelling all pixels each round.
    node = torch.arange(node_group.numel(), device=device)
    for new_id in reversed(relabels):
        node = node.index_select(0, new_id)
    if pix_node is not None:
        node = node.index_select(0, pix_node)
    counts = torch.bincount(node_group, minlength=G)
    offsets = torch.cumsum(counts, 0) - counts
    return node.view(G, N) - offsets[:, None]


# CPU chunks of this many (edge x feature) elements stay in cache and spare the page faults of
# fresh large buffers: several times faster than one chunk of `_CHUNK_ELEMENTS`.
_CPU_CHUNK_ELEMENTS = 1 << 19


def _chunk_rows(device: torch.device, D: int) -> int:
    return max(1, (_CPU_CHUNK_ELEMENTS if device.type == 'cpu' else _CHUNK_ELEMENTS) // max(D, 1))


def _grid_edge_sqdist(feats: Tensor, spatial: Sequence[int]) -> List[Tuple[Tensor, Tensor, int]]:
    """Squared distances of all pixel edges, as ``(dist, valid, stride)`` per axis.

    Along an axis of stride s, pixel i of the flat ``(G * N, D)`` features links to pixel i + s, so
    ``dist[i]`` is a shifted difference. Links that cross a border (of the axis or of the map) are
    not ``valid`` and get an infinite distance.
    """
    G, N, D = feats.shape
    M = G * N
    flat = feats.reshape(M, D)
    step = _chunk_rows(feats.device, D)
    out = []
    stride = N
    for size in spatial:
        stride //= size
        m = M - stride
        if m <= 0:
            continue
        dist = torch.empty(m, device=feats.device)
        for i in range(0, m, step):
            j = min(i + step, m)
            torch.linalg.vector_norm(flat[i + stride:j + stride] - flat[i:j], dim=-1, out=dist[i:j])
        valid = torch.ones(M // (size * stride), size, stride, dtype=torch.bool, device=feats.device)
        valid[:, -1] = False
        valid = valid.view(-1)[:m]
        out.append((dist.square_().masked_fill_(~valid, float('inf')), valid, stride))
    return out


def _grid_nearest_neighbours(grid: List[Tuple[Tensor, Tensor, int]], total: int) -> Tuple[Tensor, Tensor]:
    """Cheapest link cost of every pixel and its neighbour (the lowest id on ties), on the grid."""
    device = grid[0][0].device
    k = len(grid)
    # Columns in order of neighbour id: backward links by decreasing stride, then forward links, so
    # that min's first index on ties is the lowest neighbour id.
    costs = torch.full((total, 2 * k), float('inf'), device=device)
    strides = []
    for j, (dist, _, s) in enumerate(grid):
        costs[s:, j] = dist
        costs[:-s, 2 * k - 1 - j] = dist
        strides.append(s)
    offsets = torch.tensor([-s for s in strides] + strides[::-1], device=device)
    best, col = costs.min(dim=1)
    ids = torch.arange(total, device=device)
    nn = torch.where(best < float('inf'), ids + offsets.index_select(0, col), ids)
    return best, nn


def _grid_cluster_edges(
        grid: List[Tuple[Tensor, Tensor, int]], new_id: Tensor, num_nodes: int,
) -> Tuple[Tensor, Tensor]:
    """Edges between the clusters ``new_id`` of adjacent pixels, canonical and deduplicated."""
    a, b = [], []
    for dist, valid, s in grid:
        lo, hi = new_id[:dist.numel()], new_id[s:]
        idx = torch.nonzero((lo != hi) & valid).squeeze(1)
        a.append(lo.index_select(0, idx))
        b.append(hi.index_select(0, idx))
    return _unique_edges(torch.cat(a), torch.cat(b), num_nodes)


def _edge_cost(sums: Tensor, sizes: Tensor, a: Tensor, b: Tensor, linkage: str) -> Tensor:
    """Linkage cost of edges between clusters given by their feature sums and sizes."""
    step = _chunk_rows(sums.device, sums.shape[1])
    out = torch.empty(a.numel(), device=sums.device)
    for i in range(0, a.numel(), step):
        ai, bi = a[i:i + step], b[i:i + step]
        diff = sums.index_select(0, ai).div_(sizes.index_select(0, ai)[:, None])
        diff.sub_(sums.index_select(0, bi).div_(sizes.index_select(0, bi)[:, None]))
        torch.linalg.vector_norm(diff, dim=-1, out=out[i:i + step])
    out.square_()
    if linkage == 'ward':
        na, nb = sizes.index_select(0, a), sizes.index_select(0, b)
        out.mul_(na * nb / (na + nb))
    return out


def _unique_edges(a: Tensor, b: Tensor, num_nodes: int) -> Tuple[Tensor, Tensor]:
    """Canonical (lo, hi) edges between distinct nodes, duplicates removed."""
    keep = torch.nonzero(a != b).squeeze(1)
    a, b = a.index_select(0, keep), b.index_select(0, keep)
    key = torch.unique(torch.minimum(a, b) * num_nodes + torch.maximum(a, b))
    return key // num_nodes, key % num_nodes


def _nearest_neighbours(cost: Tensor, a: Tensor, b: Tensor, total: int) -> Tuple[Tensor, Tensor]:
    """Cheapest link cost of every node and its neighbour (the lowest id on ties; itself if it has no edge)."""
    device = cost.device
    node = torch.cat([a, b])
    nbr = torch.cat([b, a])
    c2 = torch.cat([cost, cost])
    best = torch.full((total,), float('inf'), device=device).scatter_reduce_(0, node, c2, 'amin')
    is_best = torch.nonzero(c2 <= best.index_select(0, node)).squeeze(1)
    nn = torch.arange(total, device=device).scatter_reduce_(
        0, node.index_select(0, is_best), nbr.index_select(0, is_best), 'amin', include_self=False)
    return best, nn


def _nearest_neighbour_forest(
        best: Tensor, nn: Tensor, node_group: Tensor, allowed: Tensor, pairs_only: Tensor,
) -> Tensor:
    """Parent pointers of the 1-NN forest, keeping only the ``allowed`` cheapest links per map.

    Ties go to the lower neighbour id, so the 1-NN graph has no cycle longer than a mutual pair;
    the lower id of a pair is its root. In maps flagged ``pairs_only`` only mutual pairs merge, and
    links of cost 0: merging equal clusters adds nothing to Ward's cost, and on plateaus (constant
    maps, dead ReLU regions) the lowest-id ties leave almost no mutual pair, one merge a round.
    """
    device = best.device
    ids = torch.arange(best.numel(), device=device)
    mutual = nn.index_select(0, nn) == ids
    link = ~((ids <= nn) & mutual | pairs_only.index_select(0, node_group) & ~mutual & (best > 0))
    cand = torch.nonzero(link).squeeze(1)
    grp = node_group.index_select(0, cand)
    num_links = torch.bincount(grp, minlength=allowed.numel())
    if bool((num_links <= allowed).all()):
        return torch.where(link, nn, ids)
    # Rank the links by cost within their map. Costs are >= 0, so their float bits sort like the
    # floats and one integer key sorts by (map, cost), ties by node id (stable sort).
    key = grp * (1 << 31) + best.index_select(0, cand).view(torch.int32)
    order = torch.sort(key, stable=True).indices
    rank = torch.empty_like(cand).scatter_(0, order, torch.arange(cand.numel(), device=device))
    rank -= (torch.cumsum(num_links, 0) - num_links).index_select(0, grp)
    merge = cand.index_select(0, torch.nonzero(rank < allowed.index_select(0, grp)).squeeze(1))
    return ids.index_copy(0, merge, nn.index_select(0, merge))


def _find_roots(parent: Tensor) -> Tuple[Tensor, int]:
    """Pointer jumping on a forest; returns compact root ids per node and the number of roots."""
    while True:
        nxt = parent.index_select(0, parent)
        if torch.equal(nxt, parent):
            break
        parent = nxt
    is_root = parent == torch.arange(parent.numel(), device=parent.device)
    compact = torch.cumsum(is_root, 0) - 1
    return compact.index_select(0, parent), int(compact[-1]) + 1


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
    pts = _with_coords(feats.float(), spatial, coord_weight)
    _, centres = _kmeanspp_seeds(pts, k, generator)
    for _ in range(iters):
        assign = torch.cdist(pts, centres).argmin(-1)
        sums = torch.zeros_like(centres).scatter_add_(1, assign[..., None].expand_as(pts), pts)
        cnt = torch.zeros(G, k, device=device).scatter_add_(1, assign, torch.ones(G, N, device=device))
        centres = torch.where(cnt[..., None] > 0, sums / cnt.clamp_min(1)[..., None], centres)
    assign = torch.cdist(pts, centres).argmin(-1)
    return _merge_pieces(feats, spatial, num_clusters, assign)


def kmedoids_labels(
        feats: Tensor,
        spatial: Sequence[int],
        num_clusters: int,
        generator: Optional[torch.Generator] = None,
        coord_weight: float = 0.0,
        iters: int = 6,
        candidates: int = 8,
) -> Tensor:
    """Batched k-medoids (alternating / Voronoi iteration), split into connected pieces, merged to <= K.

    k-means++ seeding picks the first medoids; then ``iters`` times every pixel joins its nearest
    medoid (Euclidean) and each cluster's new medoid is the member with the least summed Euclidean
    distance to all members. To bound the cost, the search runs over a candidate subset of at most
    ``candidates`` members per cluster: the current medoid, then the members nearest the cluster mean
    (exact when a cluster has at most that many members). One round costs O(G * N * candidates * D)
    time, and the candidates' distance sums are accumulated in chunks of bounded memory.
    ``coord_weight`` is as in ``kmeans_labels``.
    """
    if candidates < 1:
        raise ValueError(f'candidates must be >= 1, got {candidates}')
    G, N, _ = feats.shape
    device = feats.device
    pts = _with_coords(feats.float(), spatial, coord_weight)
    rows = torch.arange(G, device=device)[:, None]
    medoids, _ = _kmeanspp_seeds(pts, num_clusters, generator)
    for _ in range(iters):
        assign = torch.cdist(pts, pts[rows, medoids]).argmin(-1)
        medoids = _update_medoids(pts, assign, medoids, candidates)
    assign = torch.cdist(pts, pts[rows, medoids]).argmin(-1)
    return _merge_pieces(feats, spatial, num_clusters, assign)


def _update_medoids(pts: Tensor, assign: Tensor, medoids: Tensor, candidates: int) -> Tensor:
    """New medoid pixel per cluster ``(G, k)``: the candidate with the least summed distance to the members.

    Each cluster's members are ranked current medoid first, then by distance to the cluster mean;
    the first ``candidates`` are the candidates. Pixels are sorted by cluster so that every member
    meets its cluster's candidates in one ``(rows, candidates, D)`` block, computed in chunks.
    Empty clusters keep their medoid; ties go to the earlier candidate.
    """
    G, N, Dp = pts.shape
    k = medoids.shape[1]
    m = candidates
    device = pts.device
    flat = pts.reshape(G * N, Dp)
    gid = (assign + torch.arange(G, device=device)[:, None] * k).reshape(-1)   # global cluster id
    cnt = torch.bincount(gid, minlength=G * k)
    means = torch.zeros(G * k, Dp, device=device).index_add_(0, gid, flat) / cnt.clamp_min(1)[:, None]
    key = (flat - means[gid]).square().sum(-1)
    old = (medoids + torch.arange(G, device=device)[:, None] * N).reshape(-1)
    key[old] = -1.0
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(gid[order], stable=True)]        # members grouped by cluster, ranked
    start = torch.cumsum(cnt, 0) - cnt
    srt = flat.index_select(0, order)
    srt_gid = gid[order]
    slots = torch.arange(m, device=device)
    cost = torch.zeros(G * k * m, device=device)                  # (cluster, candidate slot)
    step = max(1, _CHUNK_ELEMENTS // max(m * Dp, 1))
    for r0 in range(0, G * N, step):
        c = srt_gid[r0:r0 + step]
        cand = start[c][:, None] + torch.minimum(slots, cnt[c][:, None] - 1)   # sorted rows of candidates
        diff = srt.index_select(0, cand.reshape(-1)).view(c.numel(), m, Dp).sub_(srt[r0:r0 + step, None])
        cost.index_add_(0, (c[:, None] * m + slots).reshape(-1), torch.linalg.vector_norm(diff, dim=-1).reshape(-1))
    cost = cost.view(G * k, m).masked_fill_(slots >= cnt[:, None], float('inf'))
    new = order[(start + cost.argmin(-1)).clamp_max(G * N - 1)]
    new = torch.where(cnt > 0, new, old)
    return new.view(G, k) - torch.arange(G, device=device)[:, None] * N


def gmm_labels(
        feats: Tensor,
        spatial: Sequence[int],
        num_clusters: int,
        generator: Optional[torch.Generator] = None,
        coord_weight: float = 0.0,
        iters: int = 10,
        var_floor: float = 1e-3,
) -> Tensor:
    """Batched diagonal Gaussian mixture (EM), hard-assigned, split into connected pieces, merged to <= K.

    Means are k-means++ seeded; the first M-step uses the hard assignment to the nearest seed.
    Responsibilities are normalised in the log domain (``exp(log p - logsumexp)``, as a fused softmax)
    and the labels are the argmax of the log joint densities. Variances are floored at
    ``var_floor`` times the map's mean per-feature variance (and 1e-30), so constant or all-zero maps
    stay finite; a component that loses all its pixels keeps its parameters with negligible weight.
    ``coord_weight`` is as in ``kmeans_labels``.
    """
    G, N, _ = feats.shape
    k = num_clusters
    pts = _with_coords(feats.float(), spatial, coord_weight)
    pts = pts - pts.mean(dim=1, keepdim=True)
    sq = pts.square()
    floor = (sq.mean(dim=(1, 2)) * var_floor).clamp_min(1e-30).view(G, 1, 1)
    _, mu = _kmeanspp_seeds(pts, k, generator)
    resp = torch.nn.functional.one_hot(torch.cdist(pts, mu).argmin(-1), k).float()   # (G, N, k)
    var = floor.expand_as(mu)
    iters = max(int(iters), 0)
    for it in range(iters + 1):
        # M-step.
        nk = resp.sum(dim=1)                                                   # (G, k)
        alive = (nk > 1e-6)[..., None]
        inv = 1.0 / nk.clamp_min(1e-6)[..., None]
        new_mu = torch.bmm(resp.transpose(1, 2), pts) * inv
        new_var = torch.bmm(resp.transpose(1, 2), sq) * inv - new_mu.square()
        mu = torch.where(alive, new_mu, mu)
        var = torch.maximum(torch.where(alive, new_var, var), floor)
        log_w = torch.log((nk / N).clamp_min(1e-30))
        # E-step: log w + log N(x | mu, diag var) up to a constant, expanded into matrix products:
        # -0.5 * (x^2 . prec - 2 x . mu prec + mu^2 . prec + sum log var).
        prec = 1.0 / var
        bias = log_w - 0.5 * ((mu.square() * prec).sum(-1) + torch.log(var).sum(-1))
        log_p = torch.baddbmm(bias[:, None, :], sq, prec.transpose(1, 2), alpha=-0.5)
        log_p = torch.baddbmm(log_p, pts, (mu * prec).transpose(1, 2))
        if it < iters:
            # exp(log_p - logsumexp(log_p)), fused (softmax shifts by the max, so no overflow).
            resp = torch.softmax(log_p, dim=-1)
    return _merge_pieces(feats, spatial, num_clusters, log_p.argmax(-1))


def _with_coords(pts: Tensor, spatial: Sequence[int], coord_weight: float) -> Tensor:
    """Append pixel coordinates scaled to [0, coord_weight] times the features' spread (if > 0)."""
    if coord_weight <= 0:
        return pts
    G, N, _ = pts.shape
    coords = torch.stack(torch.meshgrid(
        *[torch.arange(s, device=pts.device, dtype=torch.float32) / max(s - 1, 1) for s in spatial],
        indexing='ij'), dim=-1).view(1, N, len(spatial))
    spread = pts.std(dim=1).norm(dim=-1).clamp_min(1e-6).view(G, 1, 1)
    return torch.cat([pts, coords.expand(G, -1, -1) * coord_weight * spread], dim=-1)


def _kmeanspp_seeds(pts: Tensor, k: int, generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """k-means++ seeding of ``(G, N, D)`` points, one new seed per step for all maps at once.

    Returns the seeds' pixel indices ``(G, k)`` and the seeds ``(G, k, D)``.
    """
    G, N, _ = pts.shape
    device = pts.device
    rows = torch.arange(G, device=device)
    first = torch.randint(N, (G,), generator=_gen_for(generator, device), device=device)
    picks = [first]
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: a (G, N) matrix-vector product a step instead of a (G, N, D)
    # difference, which made the seeding most of the k-means time.
    sq = pts.square().sum(-1)
    mind = (sq - 2 * torch.bmm(pts, pts[rows, first][:, :, None]).squeeze(2) + sq[rows, first][:, None]).clamp_min(0)
    for _ in range(1, k):
        pick = torch.multinomial(mind + 1e-12, 1, generator=_gen_for(generator, device)).squeeze(1)
        picks.append(pick)
        d = sq - 2 * torch.bmm(pts, pts[rows, pick][:, :, None]).squeeze(2) + sq[rows, pick][:, None]
        mind = torch.minimum(mind, d.clamp_min(0))
    picks = torch.stack(picks, dim=1)
    return picks, pts.gather(1, picks[:, :, None].expand(G, k, pts.shape[2]))


def _merge_pieces(feats: Tensor, spatial: Sequence[int], num_clusters: int, assign: Tensor) -> Tensor:
    """Split a ``(G, N)`` assignment into grid-connected pieces and agglomerate them back to <= K."""
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
