""" DropCluster layers.

DropCluster (Chen, Gautier, Aydore, 2020, https://arxiv.org/abs/2002.02997) drops whole clusters of
correlated activations. The clusters are learned from the data (see ``clustering.py``) and
re-computed during training, where DropBlock (https://arxiv.org/abs/1810.12890) drops fixed squares.

The layers sit beside timm's ``DropBlock2d``: same arguments where they mean the same thing,
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
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from timm.layers import register_notrace_module

from .cluster_count import CLUSTER_COUNTS, gap_statistic_labels, structured_maps
from .clustering import CLUSTER_METHODS, activation_features, cluster_features, grid_cluster_map, one_cpu_thread

if torch.cuda.is_available():  # the fused CUDA path (imports Triton): only where CUDA tensors can occur
    from . import fused_drop

__all__ = ['drop_cluster', 'cluster_drop_probs', 'DROP_MODES', 'resample_cluster_map', 'DropClusterNd', 'DropCluster1d', 'DropCluster2d', 'DropCluster3d']


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
        probs = torch.full_like(sizes, drop_prob)
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
        drop_prob: the expected dropped fraction, in [0, 1).
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
    if drop_prob < 0.0 or drop_prob >= 1.0:
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
    if drop_prob == 0.0:
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
        return _apply_fused(x, labels, keep)
    mask = _keep_mask(keep, idx, x)

    if with_noise:
        noise = torch.randn_like(x) * (1.0 - mask)
        if inplace:
            return x.mul_(mask).add_(noise)
        return x * mask + noise
    if inplace:
        return x.mul_(mask)
    return x * mask


def _keep_mask(keep: Tensor, idx: Tensor, x: Tensor) -> Tensor:
    """The mask ``keep[d, g, idx[m, s]]`` of shape ``(draws, G, *spatial)`` in x's dtype."""
    draws = keep.shape[0]
    G = keep.shape[1]
    # Cast the (draws, G, K) table, not the full-size mask; (draws, G, *spatial) with G = 1 or C
    # broadcasts over x in any memory format.
    table = keep.to(x.dtype)
    half = x.dtype == torch.float16 or x.dtype == torch.bfloat16
    if half:
        # The same bits gathered as int16: on the CPU that is 4-5x faster than gathering the half types.
        table = table.view(torch.int16)
    mask = table.gather(2, idx.unsqueeze(0).expand(draws, G, idx.shape[1])).view([draws, G] + list(x.shape[2:]))
    if half:
        mask = mask.view(x.dtype)
    return mask


@torch.jit.unused
def _apply_fused(x: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
    return fused_drop.apply_cluster_keep(x, labels, keep)


# int32 rather than int16: DistributedDataParallel broadcasts buffers, and neither gloo nor NCCL
# carries int16.
LABEL_DTYPE = torch.int32


_LABEL_DTYPES = (torch.int16, torch.int32, torch.int64)


def _cluster_values_error(cluster_map: Tensor, counts: Tensor) -> Optional[str]:
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


class DropClusterNd(nn.Module):
    """Shared implementation of DropCluster1d/2d/3d (``spatial_dims`` set by the subclass).

    Args:
        drop_prob: probability of dropping a cluster, in [0, 1).
        block_size: the DropBlock block this layer stands in for; the default cluster size is
            ``block_size ** spatial_dims`` elements.
        cluster_size: target mean cluster size in elements (overrides ``block_size``).
        num_clusters: fixed number of clusters per map (overrides ``cluster_size``).
        couple_channels: one cluster map and one drop decision for all channels; default is one map
            per channel, as in the paper.
        with_noise: fill dropped elements with gaussian noise instead of zeros.
        inplace: modify the input in place.
        scale_by_keep: rescale kept elements like timm's DropBlock.
        cluster_method: method of ``update_clusters``, one of ``CLUSTER_METHODS``.
        cluster_count: ``'fixed'`` (``num_clusters`` or ``cluster_size`` sets the count of every map) or
            ``'gap'`` (each map gets its own count, chosen by a gap statistic between the bounds below;
            see ``cluster_count.gap_statistic_labels``).
        min_cluster_size, max_cluster_size: mean cluster sizes (elements) bounding the ``'gap'`` count;
            default a quarter and four times the fixed mode's mean size.
        skip_unstructured: leave maps without spatial structure undropped (a Hopkins-type permutation
            test at each clustering, ``cluster_count.structured_maps``); their count is stored as 0.
        drop_mode: ``'uniform'`` (every cluster dropped with the rate) or ``'size'`` (DropBlock-style
            size-dependent probabilities with the same expected dropped fraction, see
            ``cluster_drop_probs``).
        batch_shared: one drop mask for the whole batch instead of one per sample.
        gamma_scale: scales the rate, as in timm's ``DropBlock2d`` (whose expected dropped fraction is
            ``gamma_scale * drop_prob``; timm uses 0.25 in a ResNet's third stage): clusters are
            dropped with probability ``gamma_scale * drop_prob``. ``drop_prob`` stays the nominal
            rate that schedules and ``set_drop_prob`` set.
        batchwise, fast: accepted so that ``DropCluster2d(**kwargs_of_a_DropBlock2d)`` works; like
            timm's ``DropBlock2d`` since 1.0.23, they have no effect (one decision per cluster and
            sample, one implementation).
        feat_size: spatial size of the input, if known: the grid map buffer is then created
            here (and so saved in every checkpoint); otherwise the buffer stays empty until the
            first clustering or load and a grid is made on the fly.
        num_channels: channel count of the input, if known (as GroupNorm's ``num_channels``): inputs,
            ``set_cluster_map`` and loaded state are checked against it, so a checkpoint whose maps
            do not fit fails at load rather than at the first training step. Left ``None``, the
            first ``update_clusters`` records it.
        device: device of the cluster buffers.
        dtype: accepted for timm's factory-kwargs convention; the buffers are integer labels.
    """
    spatial_dims: int = 2
    num_channels: Optional[int]  # typed for TorchScript, which would otherwise see a NoneType attribute

    def __init__(
            self,
            drop_prob: float = 0.1,
            block_size: int = 7,
            cluster_size: Optional[int] = None,
            num_clusters: Optional[int] = None,
            couple_channels: bool = False,
            with_noise: bool = False,
            inplace: bool = False,
            scale_by_keep: bool = True,
            cluster_method: str = 'rena',
            cluster_count: str = 'fixed',
            min_cluster_size: Optional[int] = None,
            max_cluster_size: Optional[int] = None,
            skip_unstructured: bool = False,
            drop_mode: str = 'uniform',
            batch_shared: bool = False,
            feat_size: Optional[Tuple[int, ...]] = None,
            num_channels: Optional[int] = None,
            gamma_scale: float = 1.0,
            batchwise: bool = False,
            fast: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f'drop_prob must be in [0, 1), got {drop_prob}')
        if cluster_method not in CLUSTER_METHODS:
            raise ValueError(f'unknown cluster_method {cluster_method!r}, expected one of {CLUSTER_METHODS}')
        if cluster_count not in CLUSTER_COUNTS:
            raise ValueError(f'unknown cluster_count {cluster_count!r}, expected one of {CLUSTER_COUNTS}')
        if cluster_count == 'gap' and cluster_method == 'grid':
            raise ValueError("cluster_count='gap' needs a data-driven cluster_method, not 'grid'")
        if drop_mode not in DROP_MODES:
            raise ValueError(f'unknown drop_mode {drop_mode!r}, expected one of {DROP_MODES}')
        if min_cluster_size is not None and max_cluster_size is not None and min_cluster_size > max_cluster_size:
            raise ValueError(f'min_cluster_size ({min_cluster_size}) exceeds max_cluster_size ({max_cluster_size})')
        for name, value in (('block_size', block_size), ('cluster_size', cluster_size), ('num_clusters', num_clusters),
                            ('min_cluster_size', min_cluster_size), ('max_cluster_size', max_cluster_size)):
            if value is not None and int(value) < 1:
                raise ValueError(f'{name} must be >= 1, got {value}')
        if not 0.0 < gamma_scale <= 1.0:
            raise ValueError(f'gamma_scale must be in (0, 1], got {gamma_scale}')
        if num_channels is not None and int(num_channels) < 1:
            raise ValueError(f'num_channels must be >= 1, got {num_channels}')
        self.spatial_dims = type(self).spatial_dims  # TorchScript only sees instance attributes
        self.drop_prob = float(drop_prob)
        self.block_size = int(block_size)
        self.gamma_scale = float(gamma_scale)
        self.cluster_size = int(cluster_size) if cluster_size is not None else self.block_size ** self.spatial_dims
        self.num_clusters = int(num_clusters) if num_clusters is not None else 0  # 0: from cluster_size
        self.couple_channels = couple_channels
        self.with_noise = with_noise
        self.inplace = inplace
        self.scale_by_keep = scale_by_keep
        self.cluster_method = cluster_method
        self.cluster_count = cluster_count
        self.min_cluster_size = int(min_cluster_size) if min_cluster_size is not None else 0  # 0: default
        self.max_cluster_size = int(max_cluster_size) if max_cluster_size is not None else 0
        self.skip_unstructured = skip_unstructured
        self.drop_mode = drop_mode
        self.batch_shared = batch_shared
        self.num_channels = int(num_channels) if num_channels is not None else None
        empty_shape = [0] * (self.spatial_dims + 1)
        self.register_buffer('cluster_map', torch.zeros(empty_shape, dtype=LABEL_DTYPE, device=device))
        self.register_buffer('cluster_counts', torch.zeros(0, dtype=LABEL_DTYPE, device=device))
        self.max_clusters = 0  # host copy of cluster_counts.max(): sizes the random draw without a sync
        self.has_undropped = False  # host copy of (cluster_counts == 0).any()
        if feat_size is not None:
            size = [int(s) for s in (feat_size if isinstance(feat_size, (tuple, list)) else [feat_size])]
            if len(size) != self.spatial_dims:
                raise ValueError(f'feat_size must have {self.spatial_dims} dims, got {feat_size}')
            # Built on the CPU, where label values can be read, then moved: the device may be 'meta', also
            # implicitly through a `with torch.device('meta')` block (timm's factory tests use one).
            self.set_cluster_map(self.grid_map(size, torch.device('cpu')))

    def grid_map(self, spatial: List[int], device: torch.device) -> Tensor:
        """The map a layer starts from, for inputs of this spatial size: ``target_clusters`` regular
        blocks (DropBlock's non-overlapping blocks), shape ``(1, *spatial)``."""
        return grid_cluster_map(spatial, self.target_clusters(spatial), device)

    def target_clusters(self, spatial: List[int]) -> int:
        """Clusters per map for inputs of this spatial size.

        ``num_clusters`` if set, else the cell count of a grid of ``cluster_size``-element cubes
        (``ceil(size / side)`` per dim), so a fresh grid map tiles like DropBlock's blocks and the
        learned maps keep the same count.
        """
        n = 1
        for s in spatial:
            n *= s
        if self.num_clusters > 0:
            k = self.num_clusters
        else:
            side = self.cluster_size ** (1.0 / self.spatial_dims)
            if abs(side - round(side)) < 1e-6:  # 125 ** (1/3) is 4.999...
                side = float(round(side))
            k = 1
            for s in spatial:
                k *= int(math.ceil(s / side))
        return max(1, min(k, n))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError('DropCluster' + str(self.spatial_dims) + 'd expects input with '
                             + str(self.spatial_dims + 2) + ' dims, got ' + str(x.dim()))
        num_channels = self.num_channels  # a local: TorchScript refines Optional locals only
        if num_channels is not None and x.shape[1] != num_channels:
            raise ValueError('DropCluster' + str(self.spatial_dims) + 'd expects ' + str(num_channels)
                             + ' input channels, got ' + str(x.shape[1]))
        if not self.training or self.drop_prob == 0.0:
            return x
        spatial = x.shape[2:]
        if self.cluster_map.numel() > 0:
            cluster_map, k = self.cluster_map, self.max_clusters
        else:
            cluster_map, k = self.grid_map(spatial, x.device), self.target_clusters(spatial)
        return drop_cluster(
            x,
            cluster_map,
            drop_prob=self.drop_prob * self.gamma_scale,
            num_clusters=k,
            couple_channels=self.couple_channels,
            with_noise=self.with_noise,
            inplace=self.inplace,
            scale_by_keep=self.scale_by_keep,
            drop_mode=self.drop_mode,
            batch_shared=self.batch_shared,
            cluster_counts=self.cluster_counts if self.has_undropped else None,
        )

    def count_bounds(self, spatial: List[int]) -> Tuple[int, int]:
        """The range of cluster counts ``cluster_count='gap'`` chooses from, for inputs of this size."""
        n = 1
        for s in spatial:
            n *= s
        mean_size = n / self.target_clusters(spatial)
        min_size = self.min_cluster_size or max(1.0, mean_size / 4)
        max_size = self.max_cluster_size or mean_size * 4
        k_max = max(1, min(n, int(n // min_size)))
        k_min = max(1, min(k_max, int(math.ceil(n / max_size))))
        return k_min, k_max

    @torch.no_grad()
    def update_clusters(self, x: Tensor, generator: Optional[torch.Generator] = None, **kwargs) -> Tensor:
        """Re-cluster from activations ``x`` (the layer's input, ``(B, C, *spatial)``).

        ``kwargs`` go to the clustering method (see ``clustering.cluster_activations``).
        Returns the new map.
        """
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f'DropCluster{self.spatial_dims}d expects input with {self.spatial_dims + 2} dims, '
                             f'got shape {tuple(x.shape)}')
        if self.num_channels is not None and x.shape[1] != self.num_channels:
            raise ValueError(f'DropCluster{self.spatial_dims}d expects {self.num_channels} input channels, '
                             f'got shape {tuple(x.shape)}')
        spatial = list(x.shape[2:])
        with one_cpu_thread(x.device):
            feats = activation_features(x, self.couple_channels)
            if self.cluster_count == 'gap':
                k_min, k_max = self.count_bounds(spatial)
                labels, _ = gap_statistic_labels(feats, spatial, k_min, k_max, self.cluster_method, generator,
                                                 **kwargs)
            else:
                labels = cluster_features(feats, spatial, self.target_clusters(spatial), self.cluster_method,
                                          generator, **kwargs)
            undropped = ~structured_maps(feats, spatial, generator=generator) if self.skip_unstructured else None
        self.set_cluster_map(labels.view([-1] + spatial), undropped=undropped)
        if self.num_channels is None:
            # Learned from the input, so later loads and set_cluster_map calls are checked.
            self.num_channels = int(x.shape[1])
        return self.cluster_map

    def _map_count_error(self, shape: Tuple[int, ...]) -> Optional[str]:
        """Why maps of ``shape`` ``(M, *spatial)`` do not fit this layer, or ``None`` if they do."""
        m = shape[0]
        if self.couple_channels:
            if m == 1:
                return None
            return (f'{m} maps of shape {tuple(shape)} do not fit this layer, which takes one map '
                    f'(its channels are coupled)')
        if self.num_channels is None or m in (1, self.num_channels):
            return None
        return (f'{m} maps of shape {tuple(shape)} do not fit this layer, which takes 1 map or '
                f'{self.num_channels} (one per channel of its {self.num_channels}-channel input)')

    @torch.no_grad()
    def set_cluster_map(self, cluster_map: Tensor, undropped: Optional[Tensor] = None) -> None:
        """Install label maps ``(M, *spatial)``, M = 1 or the channel count (1 if coupled).

        ``undropped``: ``(M,)`` bool, maps to leave undropped; they are stored as one cluster with a
        count of 0.
        """
        if cluster_map.is_floating_point() or cluster_map.dim() != self.spatial_dims + 1:
            raise ValueError(f'cluster_map must hold integer labels of shape (M, *spatial) with '
                             f'{self.spatial_dims} spatial dims, got {cluster_map.dtype} {tuple(cluster_map.shape)}')
        if cluster_map.numel() == 0 or int(cluster_map.min()) < 0:
            raise ValueError('cluster_map must be non-empty with labels >= 0')
        error = self._map_count_error(tuple(cluster_map.shape))
        if error is not None:
            raise ValueError('cluster_map: ' + error)
        if undropped is not None:
            undropped = undropped.to(device=cluster_map.device, dtype=torch.bool)
            if undropped.shape != cluster_map.shape[:1]:
                raise ValueError(f'undropped must hold one flag per map ({cluster_map.shape[0]}), '
                                 f'got shape {tuple(undropped.shape)}')
            cluster_map = cluster_map.masked_fill(undropped.view([-1] + [1] * self.spatial_dims), 0)
        counts = cluster_map.flatten(1).amax(dim=1) + 1
        if undropped is not None:
            counts = counts.masked_fill(undropped, 0)
        max_clusters = max(1, int(counts.max()))
        has_undropped = bool((counts == 0).any())
        dtype = LABEL_DTYPE
        device = self.cluster_map.device
        if self.cluster_map.shape == cluster_map.shape and self.cluster_map.dtype == dtype \
                and self.cluster_counts.dtype == dtype:
            # In place: wrappers that cache buffer references (DDP's buffer broadcast) stay valid.
            self.cluster_map.copy_(cluster_map)
            self.cluster_counts.copy_(counts)
        else:
            # copy=True: never alias the caller's tensor (another model's buffer, say), which a later
            # in-place update would change too.
            self.cluster_map = cluster_map.to(device=device, dtype=dtype, copy=True).contiguous()
            self.cluster_counts = counts.to(device=device, dtype=dtype)
        self.max_clusters = max_clusters
        self.has_undropped = has_undropped

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Maps differ in shape between checkpoints (other resolutions, per-channel vs grid), so
        # adopt the incoming shapes instead of failing on a size mismatch.
        incoming = state_dict.get(prefix + 'cluster_map')
        counts = state_dict.get(prefix + 'cluster_counts')
        if incoming is not None and counts is not None:
            if incoming.dim() != self.spatial_dims + 1 or incoming.is_floating_point():
                error_msgs.append(f'{prefix}cluster_map: expected integer labels with {self.spatial_dims} spatial '
                                  f'dims, got {incoming.dtype} {tuple(incoming.shape)}')
                return
            # Checked here, where the key names the layer: otherwise a map that does not fit loads
            # cleanly and fails only at the first training forward, unnamed. An empty map is the
            # state of a layer not yet clustered.
            error = self._map_count_error(tuple(incoming.shape)) if incoming.numel() else None
            if error is not None:
                error_msgs.append(f'{prefix}cluster_map: {error}')
                return
            if counts.dim() != 1 or counts.shape[0] != incoming.shape[0]:
                error_msgs.append(f'{prefix}cluster_counts: shape {tuple(counts.shape)} does not match the '
                                  f'{incoming.shape[0]} maps of cluster_map {tuple(incoming.shape)}, '
                                  f'expected one count per map')
                return
            error = _cluster_values_error(incoming, counts)
            if error is not None:  # a file from outside: the values must be what set_cluster_map makes
                error_msgs.append(f'{prefix}{error}')
                return
            device = self.cluster_map.device
            # Replace the buffers only when the shape or dtype changes; otherwise the default load
            # copies in place and wrappers that cache buffer references (DDP) stay valid.
            if self.cluster_map.shape != incoming.shape or self.cluster_map.dtype != incoming.dtype:
                self.cluster_map = torch.empty(incoming.shape, dtype=incoming.dtype, device=device)
            if self.cluster_counts.shape != counts.shape or self.cluster_counts.dtype != counts.dtype:
                self.cluster_counts = torch.empty(counts.shape, dtype=counts.dtype, device=device)
            known = counts.numel() > 0 and not counts.is_meta
            self.max_clusters = max(1, int(counts.max())) if known else 0
            self.has_undropped = bool((counts == 0).any()) if known else False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        k = f'num_clusters={self.num_clusters}' if self.num_clusters else f'cluster_size={self.cluster_size}'
        c = f'num_channels={self.num_channels}, ' if self.num_channels is not None else ''
        g = f', gamma_scale={self.gamma_scale}' if self.gamma_scale != 1.0 else ''
        extra = ''
        if self.cluster_count != 'fixed':
            extra += f', cluster_count={self.cluster_count!r}'
        if self.skip_unstructured:
            extra += ', skip_unstructured=True'
        if self.drop_mode != 'uniform':
            extra += f', drop_mode={self.drop_mode!r}'
        if self.batch_shared:
            extra += ', batch_shared=True'
        return (f'{c}drop_prob={self.drop_prob}{g}, {k}, couple_channels={self.couple_channels}, '
                f'cluster_method={self.cluster_method!r}{extra}, map={tuple(self.cluster_map.shape)}')


@register_notrace_module
class DropCluster1d(DropClusterNd):
    __doc__ = """DropCluster for ``(B, C, L)`` inputs; clusters are runs of the sequence.""" + DropClusterNd.__doc__.split('\n', 1)[1]
    spatial_dims = 1


@register_notrace_module
class DropCluster2d(DropClusterNd):
    __doc__ = """DropCluster for ``(B, C, H, W)`` inputs, a drop-in for timm's ``DropBlock2d``.""" + DropClusterNd.__doc__.split('\n', 1)[1]
    spatial_dims = 2


@register_notrace_module
class DropCluster3d(DropClusterNd):
    __doc__ = """DropCluster for ``(B, C, D, H, W)`` inputs (video, volumes).""" + DropClusterNd.__doc__.split('\n', 1)[1]
    spatial_dims = 3
