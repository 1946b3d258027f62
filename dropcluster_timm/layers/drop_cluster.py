""" DropCluster, the functional core: ``drop_cluster(x, cluster_map, drop_prob, ...)``.

DropCluster (Chen, Gautier, Aydore, 2020, https://arxiv.org/abs/2002.02997) drops whole clusters of
correlated activations. The clusters are learned from the data (see ``dropcluster_timm.clustering``) and
re-computed during training, where DropBlock (https://arxiv.org/abs/1810.12890) drops fixed squares.

The layers around it (``drop_cluster_modules``) sit beside timm's ``DropBlock2d``: same arguments where they mean the same thing,
identity in eval mode or at ``drop_prob == 0``, masks built on the input's device in its dtype.

State: ``cluster_map`` holds the labels, shape ``(M, *spatial)`` with M = 1 (one map for every
channel) or M = C (one map per channel), and ``cluster_counts`` the number of clusters of each map.
Both are persistent integer buffers, so they travel in ``state_dict`` and safetensors files. Before
the first clustering the map is a regular grid of blocks, so a fresh layer acts like a
non-overlapping DropBlock.

An input whose spatial size differs from the stored map (multi-scale training, evaluation at another
resolution) gets the map resampled with nearest-neighbour labels; resampling down may disconnect or
lose small clusters for that input, the stored map is not changed.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .cluster_mask import cluster_keep_mask

if torch.cuda.is_available():  # the fused CUDA path (imports Triton): only where CUDA tensors can occur
    from . import fused_drop

__all__ = ['drop_cluster', 'cluster_drop_probs', 'DROP_MODES', 'resample_cluster_map', 'LABEL_DTYPE', 'cluster_values_error']


def resample_cluster_map(cluster_map: Tensor, size: List[int]) -> Tensor:
    """Nearest-neighbour resampling of label maps ``(M, *spatial)`` to ``(M, *size)``."""
    if list(cluster_map.shape[1:]) == size:
        return cluster_map
    # Labels are small integers, exact in float32.
    out = F.interpolate(cluster_map.unsqueeze(0).float(), size=size, mode='nearest')
    return out.squeeze(0).to(cluster_map.dtype)


def _max_finite(dtype: torch.dtype) -> float:
    """Largest finite value of a half precision ``dtype`` (``torch.finfo`` does not script)."""
    if dtype == torch.float16:
        return 65504.0
    if dtype == torch.bfloat16:
        return 3.3895313892515355e38
    return 3.4028234663852886e38  # float32, and wider types hold every float32


DROP_MODES = ('uniform', 'size')


def cluster_drop_probs(
        sizes: Tensor,
        drop_prob: float,
        drop_mode: str = 'uniform',
        cluster_counts: Optional[Tensor] = None,
) -> Tensor:
    """Drop probability of every cluster, ``(M, K)``, from cluster sizes ``(M, K)`` (0: no such label).

    ``'uniform'``: every cluster ``drop_prob``. ``'size'``: DropBlock-style, as in the reference
    implementation: cluster ``c`` of ``s_c`` of a map's ``n`` elements gets a probability proportional to
    ``n / (s_c * (n - s_c + 1))`` (DropBlock's seed rate with the block replaced by the cluster), so
    small clusters drop more often; the factor is set per map so that the expected dropped fraction of
    the map is exactly ``drop_prob``, probabilities capped at 1 (the excess goes to the other clusters).
    Maps whose ``cluster_counts`` entry is 0 are left undropped (probability 0).
    """
    n = sizes.sum(dim=1, keepdim=True)
    if drop_mode == 'size':
        w = torch.where(sizes > 0, n / (sizes * (n - sizes + 1.0)).clamp(min=1.0), torch.zeros_like(sizes))
        # Water-filling: the j largest weights are capped at probability 1 and the rest share
        # lam * w; exactly one j is consistent with its own lam.
        w_sorted, order = torch.sort(w, dim=1, descending=True)
        s_sorted = sizes.gather(1, order)
        sw = s_sorted * w_sorted
        capped_mass = torch.cumsum(s_sorted, dim=1) - s_sorted  # sum of sizes before j
        rest = sw.sum(dim=1, keepdim=True) - (torch.cumsum(sw, dim=1) - sw)  # sum of s * w from j on
        lam = (drop_prob * n - capped_mass) / rest.clamp(min=1e-30)
        prev_w = torch.cat([torch.full_like(w_sorted[:, :1], float('inf')), w_sorted[:, :-1]], dim=1)
        valid = (lam * w_sorted <= 1.0) & (lam * prev_w >= 1.0) & (rest > 0)
        j = torch.argmax(valid.to(torch.int32), dim=1, keepdim=True)
        probs = (lam.gather(1, j) * w).clamp(max=1.0)
    else:
        probs = torch.zeros_like(sizes) + drop_prob
    if cluster_counts is not None:
        probs = probs * (cluster_counts.view(-1, 1) > 0).to(probs.dtype)
    return probs


def drop_cluster(
        x: Tensor,
        cluster_map: Tensor,
        drop_prob: float = 0.1,
        num_clusters: Optional[int] = None,
        couple_channels: bool = False,
        with_noise: bool = False,
        inplace: bool = False,
        scale_by_keep: bool = True,
        drop_mode: str = 'uniform',
        batch_shared: bool = False,
        cluster_counts: Optional[Tensor] = None,
) -> Tensor:
    """DropCluster. See https://arxiv.org/abs/2002.02997

    Every (sample, channel, cluster) is dropped independently, or every (sample, cluster) when
    channels are coupled, or every (channel, cluster) for the whole batch with ``batch_shared``.
    Clusters partition the map, so the expected dropped fraction of every map is exactly
    ``drop_prob`` in either ``drop_mode``.

    Args:
        x: input ``(B, C, *spatial)``.
        cluster_map: integer labels ``(M, *spatial_map)``, M = 1 or C (M = 1 if ``couple_channels``);
            resampled (nearest) when ``spatial_map`` differs from the input's.
        drop_prob: the expected dropped fraction, in [0, 1); outside TorchScript also a 0-dim tensor
            (unchecked), so that a rate which changes every step does not recompile a compiled graph.
        num_clusters: an upper bound on the labels (max label + 1). ``None`` reads it from the map,
            which synchronises with the device; the layers always pass it.
        couple_channels: one drop decision per (sample, cluster) shared by all channels.
        with_noise: fill dropped elements with unit gaussian noise instead of zeros (no rescaling,
            as in timm's DropBlock).
        inplace: modify ``x`` in place.
        scale_by_keep: rescale kept elements by (elements / kept elements) of the batch, as timm's
            DropBlock does.
        drop_mode: ``'uniform'`` (every cluster ``drop_prob``) or ``'size'`` (size-dependent, see
            ``cluster_drop_probs``).
        batch_shared: one mask for every sample of the batch (the reference's default).
        cluster_counts: clusters per map ``(M,)``; a map counted 0 is left undropped.

    Returns:
        Tensor of the same shape, dtype and device as ``x``.
    """
    if x.ndim < 3:
        raise ValueError('drop_cluster expects input of shape (B, C, *spatial), got ' + str(x.ndim) + ' dims')
    if not x.is_floating_point():
        raise ValueError('drop_cluster expects a floating point input, got ' + str(x.dtype))
    rate_tensor = isinstance(drop_prob, Tensor)  # a rate the caller keeps out of compiled graphs' guards
    if not rate_tensor and (drop_prob < 0.0 or drop_prob >= 1.0):
        raise ValueError('drop_prob must be in [0, 1), got ' + str(drop_prob))
    if drop_mode != 'uniform' and drop_mode != 'size':
        raise ValueError("drop_mode must be 'uniform' or 'size', got " + drop_mode)
    if cluster_map.dim() != x.dim() - 1 or cluster_map.is_floating_point():
        raise ValueError('cluster_map must be integer labels of shape (M, *spatial) for an input with '
                         + str(x.dim() - 2) + ' spatial dims')
    B = x.shape[0]
    C = x.shape[1]
    spatial: List[int] = list(x.shape[2:])
    M = cluster_map.shape[0]
    G = 1 if couple_channels else C
    if M != 1 and M != G:
        raise ValueError('cluster_map has ' + str(M) + ' maps, expected 1 or ' + str(G))
    if cluster_counts is not None and (cluster_counts.dim() != 1 or cluster_counts.shape[0] != M):
        raise ValueError('cluster_counts must hold one count per map (' + str(M) + '), got shape '
                         + str(list(cluster_counts.shape)))
    if not rate_tensor and drop_prob == 0.0:
        return x
    n = 1
    for s in spatial:
        n *= s
    labels = resample_cluster_map(cluster_map, spatial).reshape(M, n)
    idx = labels.long()
    k = int(idx.max()) + 1 if num_clusters is None else num_clusters
    draws = 1 if batch_shared else B

    # The mask never involves x, so it builds no autograd graph (and no_grad would trip TorchScript).
    # Drawn and scaled in float32 whatever x.dtype: the scale can exceed the float16 range.
    # Cluster sizes: a (M, K) reduction that sizes the keep count (and the size-dependent rates)
    # without a pass over x.
    uniform = drop_mode == 'uniform' and cluster_counts is None
    sizes = torch.zeros((M, k), dtype=torch.float32, device=x.device)
    if not uniform or (scale_by_keep and not with_noise):
        sizes.scatter_add_(1, idx, torch.ones((M, n), dtype=torch.float32, device=x.device))
    if uniform:
        keep = torch.empty((draws, G, k), dtype=torch.float32, device=x.device).bernoulli_(1.0 - drop_prob)
    else:
        probs = cluster_drop_probs(sizes, drop_prob, drop_mode, cluster_counts)
        keep = (torch.rand((draws, G, k), dtype=torch.float32, device=x.device) >= probs.unsqueeze(0)).to(torch.float32)
    if scale_by_keep and not with_noise:
        kept = (keep * sizes.unsqueeze(0)).sum()
        # Everything dropped: kept is 0, and counting it as 1 keeps the scale finite (it multiplies
        # zeros only), so the output is all zeros rather than 0 * inf = NaN.
        keep = keep * kept.clamp(min=1.0).reciprocal().mul(float(draws * G * n))
        if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
            # A scale past the dtype's range would cast to inf (and 0 * inf to NaN).
            keep = keep.clamp(max=_max_finite(x.dtype))
    if x.is_cuda and not with_noise and not inplace and not torch.jit.is_scripting():
        # One fused kernel reads x once and keeps only the small table for the backward
        # (``fused_drop``); the result is bit-identical to the torch path below.
        return _fused_apply(x, labels, keep)
    mask = cluster_keep_mask(x, idx, keep)

    if with_noise:
        noise = torch.randn_like(x) * (1.0 - mask)
        if inplace:
            return x.mul_(mask).add_(noise)
        return x * mask + noise
    if inplace:
        return x.mul_(mask)
    return x * mask


@torch.jit.unused
def _fused_apply(x: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
    return fused_drop.apply_cluster_keep(x, labels, keep)


# int32 rather than int16: DistributedDataParallel broadcasts buffers, and neither gloo nor NCCL
# carries int16.
LABEL_DTYPE = torch.int32


_LABEL_DTYPES = (torch.int16, torch.int32, torch.int64)


def cluster_values_error(cluster_map: Tensor, counts: Tensor) -> Optional[str]:
    """Why loaded ``cluster_map`` / ``cluster_counts`` values are not a valid cluster state, or None.

    Valid: signed integer labels; per map, a count K in [0, map size] with labels in [0, K) and the
    largest label K - 1 (an undropped map: K = 0, all labels 0).
    """
    for name, t in (('cluster_map', cluster_map), ('cluster_counts', counts)):
        if t.dtype not in _LABEL_DTYPES:
            return f'{name}: dtype {t.dtype} is not a label type (int16, int32 or int64)'
    if cluster_map.is_meta or counts.is_meta or cluster_map.numel() == 0:
        return None
    size = cluster_map[0].numel()
    labels = cluster_map.flatten(1).long()
    counts = counts.long().to(labels.device)
    low, high = labels.amin(dim=1), labels.amax(dim=1)
    if bool((counts < 0).any()) or bool((counts > size).any()):
        return (f'cluster_counts: values must be in [0, {size}] (at most one cluster per element of a map), '
                f'got {int(counts.min())} to {int(counts.max())}')
    if bool((low < 0).any()):
        return f'cluster_map: labels must be >= 0, got {int(low.min())}'
    expected = torch.where(counts > 0, counts - 1, torch.zeros_like(counts))
    bad = torch.nonzero(high != expected).flatten()
    if len(bad):
        m = int(bad[0])
        return (f'cluster_map: map {m} has labels up to {int(high[m])} but cluster_counts[{m}] = {int(counts[m])} '
                f'(labels must run from 0 to count - 1; 0 for an undropped map)')
    return None
