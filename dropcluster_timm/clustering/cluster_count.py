""" How many clusters each map gets, and whether a map has cluster structure at all.

The reference DropCluster implementation picks the number of clusters of every channel with a gap
statistic (Tibshirani, Walther, Hastie, 2001) and leaves channels without cluster structure (a
Hopkins statistic) out of the dropping. Both are computed here for all maps of a layer at once, on
the activations' device:

    * ``gap_statistic_labels``: cluster every map at a few candidate counts between a minimum and a
      maximum (a coarse-to-fine hierarchy: the finest clustering is merged down, so each candidate
      costs one agglomeration from the previous one), do the same for uniform reference features
      drawn in each map's bounding box, and keep per map the smallest count whose gap is within one
      standard error of the next candidate's.
    * ``spatial_hopkins`` / ``structured_maps``: a Hopkins-type ratio on the pixel grid (distances of
      random pixel pairs against distances of grid neighbours: about 0.5 when pixels are
      exchangeable, towards 1 when neighbours are alike), tested against the same ratio of randomly
      permuted maps (an exact Monte Carlo permutation test).
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .engine import cluster_features
from .grid import generator_for
from .rena import rena_labels

__all__ = ['CLUSTER_COUNTS', 'candidate_counts', 'gap_statistic_labels', 'smooth_references', 'spatial_hopkins', 'structured_maps']

CLUSTER_COUNTS = ('fixed', 'gap')


def candidate_counts(k_min: int, k_max: int, num_candidates: int = 6) -> List[int]:
    """Up to ``num_candidates`` cluster counts from ``k_min`` to ``k_max``, geometrically spaced, ascending."""
    if not 1 <= k_min <= k_max:
        raise ValueError(f'need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}')
    if num_candidates < 2:
        raise ValueError(f'num_candidates must be >= 2, got {num_candidates}')
    ratio = (k_max / k_min) ** (1.0 / (num_candidates - 1))
    return sorted({min(k_max, max(k_min, round(k_min * ratio ** i))) for i in range(num_candidates)})


def gap_statistic_labels(
        feats: Tensor,
        spatial: Sequence[int],
        k_min: int,
        k_max: int,
        method: str = 'rena',
        generator: Optional[torch.Generator] = None,
        num_refs: int = 2,
        num_candidates: int = 6,
        **kwargs,
) -> Tuple[Tensor, Tensor]:
    """Cluster each map of ``feats`` ``(G, N, D)`` with its own count, chosen by the gap statistic.

    Args:
        feats: per-pixel features (``clustering.activation_features``).
        spatial: grid shape, ``prod(spatial) == N``.
        k_min, k_max: the range of counts tried (``candidate_counts``).
        method: clustering method of the finest level (any of ``CLUSTER_METHODS`` but ``'grid'``);
            coarser levels merge it with Ward-linkage agglomeration.
        generator: random generator of the reference features (and of the method, if randomised).
        num_refs: reference draws per map (their spread gives the standard error).
        num_candidates: counts tried between ``k_min`` and ``k_max``.
        **kwargs: options of ``method``.

    Returns:
        ``(labels (G, N), counts (G,))``: compact labels with connected clusters, and each map's count.
    """
    if method == 'grid':
        raise ValueError("the gap statistic needs a data-driven clustering method, not 'grid'")
    if num_refs < 1:
        raise ValueError(f'num_refs must be >= 1, got {num_refs}')
    G, N, D = feats.shape
    k_max = min(k_max, N)
    k_min = min(k_min, k_max)
    ks = candidate_counts(k_min, k_max, num_candidates) if k_max > k_min else [k_max]
    if len(ks) == 1:
        labels = cluster_features(feats, spatial, ks[0], method, generator, **kwargs)
        return labels, labels.amax(dim=1) + 1

    refs = smooth_references(feats, spatial, num_refs, generator)
    # The data and the references are clustered apart: the references have fewer features.
    data_levels, log_w_data = _levels(feats.float(), spatial, ks, method, generator, **kwargs)
    _, log_w_ref = _levels(refs, spatial, ks, 'rena', None)
    log_w_ref = log_w_ref.reshape(len(ks), num_refs, G)
    gap = log_w_ref.mean(dim=1) - log_w_data
    s = log_w_ref.std(dim=1, unbiased=False) * math.sqrt(1.0 + 1.0 / num_refs)
    # Tibshirani's rule: the smallest k with gap(k) >= gap(k_next) - s(k_next); the largest if none.
    ok = torch.cat([gap[:-1] >= gap[1:] - s[1:], torch.ones_like(gap[:1], dtype=torch.bool)], dim=0)
    choice = torch.argmax(ok.to(torch.int32), dim=0)  # first True per map
    labels = data_levels.gather(0, choice.view(1, G, 1).expand(1, G, N)).squeeze(0)
    return labels, labels.amax(dim=1) + 1


def _levels(feats: Tensor, spatial: Sequence[int], ks: List[int], method: str, generator, **kwargs):
    """Labels ``(len(ks), G, N)`` and log within-cluster sums of squares ``(len(ks), G)`` at every count
    of ``ks`` (ascending): the finest by ``method``, each coarser one merged from the next finer."""
    G, N, D = feats.shape
    feats = feats - feats.mean(dim=1, keepdim=True)  # centred: less cancellation in the sums below
    total = feats.double().square().sum(dim=(1, 2))
    labels = cluster_features(feats, spatial, ks[-1], method, generator, **kwargs)
    k = int(labels.max()) + 1
    # Cluster sums from one pass over the pixels; coarser levels add up the finer clusters' sums.
    sums = torch.zeros(G, k, D, device=feats.device).scatter_add_(1, labels[..., None].expand(G, N, D), feats).double()
    sizes = torch.zeros(G, k, device=feats.device, dtype=torch.float64).scatter_add_(
        1, labels, torch.ones(G, N, device=feats.device, dtype=torch.float64))

    def log_wcss(sums: Tensor, sizes: Tensor) -> Tensor:
        between = (sums.square().sum(-1) / sizes.clamp_min(1)).sum(-1)
        return (total - between).clamp_min(1e-30).log().float()

    levels, log_w = [labels], [log_wcss(sums, sizes)]
    for k_next in reversed(ks[:-1]):
        coarse = rena_labels(feats, spatial, k_next, init_labels=labels)
        # Each fine cluster lies inside one coarse cluster: map it there from any of its pixels.
        parent = torch.zeros(G, sums.shape[1], dtype=torch.long, device=feats.device).scatter_(1, labels, coarse)
        kc = int(coarse.max()) + 1
        sums = torch.zeros(G, kc, D, device=feats.device, dtype=torch.float64).scatter_add_(
            1, parent[..., None].expand_as(sums), sums)
        sizes = torch.zeros(G, kc, device=feats.device, dtype=torch.float64).scatter_add_(1, parent, sizes)
        labels = coarse
        levels.append(labels)
        log_w.append(log_wcss(sums, sizes))
    return torch.stack(levels[::-1]), torch.stack(log_w[::-1])


def _smooth_step(x: Tensor) -> Tensor:
    """One 3-wide box average along every spatial axis of ``x`` ``(B, D, *spatial)``, edges replicated."""
    dims = x.dim() - 2
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    return pool(F.pad(x, [1, 1] * dims, mode='replicate'), 3, 1)


def smooth_references(
        feats: Tensor,
        spatial: Sequence[int],
        num_refs: int = 2,
        generator: Optional[torch.Generator] = None,
        max_smoothing: int = 16,
        ref_features: int = 16,
) -> Tensor:
    """Reference features for the gap statistic: as smooth on the grid as each map, but one region.

    Uniform noise smoothed by repeated 3-wide box averages until its ``spatial_hopkins`` ratio is
    closest to the map's own (at most ``max_smoothing`` steps). A reference of unstructured noise (the
    textbook choice) would make any smooth map look clustered at every count, so the gap would just
    grow with K. The gap statistic only compares how ``log W`` falls with K, so the references need
    neither the maps' scale nor all their features: ``min(D, ref_features)`` features each.

    Returns:
        ``(num_refs * G, N, min(D, ref_features))`` features, reference ``r`` of map ``g`` at row ``r * G + g``.
    """
    G, N, D = feats.shape
    device = feats.device
    spatial = list(spatial)
    gen = generator_for(generator, device)
    p, q, r = _neighbour_pairs(spatial, 512, generator, device)
    target = _pair_ratio(feats.float(), p, q, r)  # (G,)

    def ratio(x: Tensor) -> Tensor:
        return _pair_ratio(x.flatten(2).transpose(1, 2), p, q, r)

    # The ratio after t steps depends on t and the grid only: one small probe gives the curve.
    probe = torch.rand((1, 32, *spatial), generator=gen, device=device)
    curve = [ratio(probe)]
    for _ in range(max_smoothing):
        probe = _smooth_step(probe)
        curve.append(ratio(probe))
    steps = torch.argmin((torch.cat(curve).view(-1, 1) - target.view(1, G)).abs(), dim=0).repeat(num_refs)
    d = min(D, ref_features)
    x = torch.rand((num_refs * G, d, *spatial), generator=gen, device=device)
    out = x.clone()
    for t in range(1, int(steps.max()) + 1):
        x = _smooth_step(x)
        out = torch.where((steps == t).view([-1] + [1] * (len(spatial) + 1)), x, out)
    return out.flatten(2).transpose(1, 2).contiguous()


def _pair_ratio(feats: Tensor, p: Tensor, q: Tensor, r: Tensor) -> Tensor:
    """sum |f_p - f_r| / (sum |f_p - f_r| + sum |f_p - f_q|) per map; 0.5 where all are 0."""
    fp = feats[:, p]
    u = torch.linalg.vector_norm(fp - feats[:, r], dim=-1).sum(dim=1)
    w = torch.linalg.vector_norm(fp - feats[:, q], dim=-1).sum(dim=1)
    total = u + w
    return torch.where(total > 0, u / total.clamp_min(1e-30), torch.full_like(total, 0.5))


def _neighbour_pairs(spatial: Sequence[int], num_samples: int, generator, device) -> Tuple[Tensor, Tensor, Tensor]:
    """Random pixels, one random grid neighbour of each, and another random pixel of each."""
    n = math.prod(spatial)
    gen = generator_for(generator, device)
    p = torch.randint(n, (num_samples,), generator=gen, device=device)
    axis = torch.randint(len(spatial), (num_samples,), generator=gen, device=device)
    step = torch.randint(2, (num_samples,), generator=gen, device=device) * 2 - 1
    strides = [math.prod(spatial[i + 1:]) for i in range(len(spatial))]
    coord = torch.stack([(p // st) % sz for st, sz in zip(strides, spatial)])  # (dims, num_samples)
    sizes = torch.tensor(spatial, device=device)
    strides_t = torch.tensor(strides, device=device)
    pos = coord.gather(0, axis.view(1, -1)).squeeze(0)
    size = sizes[axis]
    # At a border, step inwards.
    step = torch.where(pos + step < 0, torch.ones_like(step), step)
    step = torch.where(pos + step >= size, -torch.ones_like(step), step)
    step = torch.where(size > 1, step, torch.zeros_like(step))
    q = p + step * strides_t[axis]
    r = torch.randint(n, (num_samples,), generator=gen, device=device)
    return p, q, r


def spatial_hopkins(
        feats: Tensor,
        spatial: Sequence[int],
        num_samples: int = 512,
        generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Hopkins-type statistic of every map of ``feats`` ``(G, N, D)`` on its grid, ``(G,)``.

    ``sum u / (sum u + sum w)`` over ``num_samples`` random pixels, ``u`` the distance of a pixel's
    features to a random pixel's and ``w`` to a random grid neighbour's: about 0.5 for a map whose
    pixels are exchangeable (no spatial structure), towards 1 for maps of smooth regions. Constant
    maps get exactly 0.5.
    """
    p, q, r = _neighbour_pairs(list(spatial), num_samples, generator, feats.device)
    return _pair_ratio(feats.float(), p, q, r)


def structured_maps(
        feats: Tensor,
        spatial: Sequence[int],
        alpha: float = 0.05,
        num_samples: int = 512,
        generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Whether each map of ``feats`` ``(G, N, D)`` has spatial cluster structure, ``(G,)`` bool.

    A one-sided Monte Carlo permutation test of ``spatial_hopkins`` at level ``alpha``: the map's
    statistic is compared with those of ``ceil(1 / alpha) - 1`` random pixel permutations of it
    (the same pixel pairs), and the map counts as structured when it exceeds all of them; under
    the null of exchangeable pixels that happens with probability ``alpha`` (up to ties).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f'alpha must be in (0, 1), got {alpha}')
    device = feats.device
    G, N, _ = feats.shape
    feats = feats.float()
    p, q, r = _neighbour_pairs(list(spatial), num_samples, generator, device)
    observed = _pair_ratio(feats, p, q, r)
    num_perms = max(1, math.ceil(1.0 / alpha) - 1)
    null_max = torch.full_like(observed, -1.0)
    for _ in range(num_perms):
        perm = torch.randperm(N, generator=generator_for(generator, device), device=device)
        # Permuting the pixels and then taking the same pairs = taking the pairs through perm.
        null_max = torch.maximum(null_max, _pair_ratio(feats, perm[p], perm[q], perm[r]))
    return observed > null_max
