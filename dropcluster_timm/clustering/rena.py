""" ReNA-style agglomeration (the default method): batched nearest-neighbour merging over the grid graph, pure torch. """
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .grid import CHUNK_ELEMENTS, grid_edges


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
# fresh large buffers: several times faster than one chunk of `CHUNK_ELEMENTS`.
_CPU_CHUNK_ELEMENTS = 1 << 19


def _chunk_rows(device: torch.device, D: int) -> int:
    return max(1, (_CPU_CHUNK_ELEMENTS if device.type == 'cpu' else CHUNK_ELEMENTS) // max(D, 1))


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
