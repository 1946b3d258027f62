""" Centroid and model-based methods (k-means, k-medoids, a diagonal Gaussian mixture), random and Ward partitions; every result split into connected clusters. """
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .grid import CHUNK_ELEMENTS, generator_for, connected_components
from .rena import rena_labels


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
    step = max(1, CHUNK_ELEMENTS // max(m * Dp, 1))
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
    first = torch.randint(N, (G,), generator=generator_for(generator, device), device=device)
    picks = [first]
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: a (G, N) matrix-vector product a step instead of a (G, N, D)
    # difference, which made the seeding most of the k-means time.
    sq = pts.square().sum(-1)
    mind = (sq - 2 * torch.bmm(pts, pts[rows, first][:, :, None]).squeeze(2) + sq[rows, first][:, None]).clamp_min(0)
    for _ in range(1, k):
        pick = torch.multinomial(mind + 1e-12, 1, generator=generator_for(generator, device)).squeeze(1)
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
    feats = torch.rand(num_maps, n, 4, generator=generator_for(generator, device), device=device)
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
