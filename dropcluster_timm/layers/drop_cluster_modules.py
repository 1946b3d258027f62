""" The DropCluster modules: ``DropCluster1d/2d/3d`` around the functional core ``drop_cluster``, with
the cluster maps as persistent buffers, re-clustered from activations."""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from timm.layers import register_notrace_module

from ..clustering.cluster_count import gap_statistic_labels, structured_maps
from ..clustering.engine import activation_features, cluster_features, grid_cluster_map, one_cpu_thread
from .drop_cluster import LABEL_DTYPE, drop_cluster
from .layer_schedule import LayerSchedule, register_layer
from .map_copies import FollowsOriginalMaps
from .map_state import ClusterMapState
from .options import layer_options_error, option_defaults

__all__ = ['DropClusterNd', 'DropCluster1d', 'DropCluster2d', 'DropCluster3d', 'LAYER_BUFFERS']

_DEFAULTS = option_defaults(alone=True)  # the option defaults of options.LAYER_OPTIONS
# The state of a DropCluster layer: what a base architecture lacks and export_plain drops.
LAYER_BUFFERS = ('cluster_map', 'cluster_counts', 'num_steps')


class DropClusterNd(FollowsOriginalMaps, ClusterMapState, nn.Module):
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
        recluster_every, ramp_steps, cluster_images: the layer's own schedule (``options.py``), kept
            by ``self.schedule`` (``LayerSchedule``, which drives the training forward when either
            count is set) and counted in training forwards by the ``num_steps`` buffer, saved with
            the maps; under ``torch.distributed`` rank 0's new maps are broadcast.
        device: device of the cluster buffers.
        dtype: accepted for timm's factory-kwargs convention; the buffers are integer labels.
    """
    spatial_dims: int = 2
    __jit_unused_properties__ = ['recluster_every', 'ramp_steps', 'cluster_images', 'steps', 'clustered']
    _drop_prob: float
    num_channels: Optional[int]  # typed for TorchScript, which would otherwise see a NoneType attribute

    def __init__(
            self,
            drop_prob: float = 0.1,
            block_size: int = 7,
            cluster_size: Optional[int] = _DEFAULTS['cluster_size'],
            num_clusters: Optional[int] = _DEFAULTS['num_clusters'],
            couple_channels: bool = _DEFAULTS['couple_channels'],
            with_noise: bool = _DEFAULTS['with_noise'],
            inplace: bool = False,
            scale_by_keep: bool = True,
            cluster_method: str = _DEFAULTS['cluster_method'],
            cluster_count: str = _DEFAULTS['cluster_count'],
            min_cluster_size: Optional[int] = _DEFAULTS['min_cluster_size'],
            max_cluster_size: Optional[int] = _DEFAULTS['max_cluster_size'],
            skip_unstructured: bool = _DEFAULTS['skip_unstructured'],
            drop_mode: str = _DEFAULTS['drop_mode'],
            batch_shared: bool = _DEFAULTS['batch_shared'],
            recluster_every: int = _DEFAULTS['recluster_every'],
            ramp_steps: int = _DEFAULTS['ramp_steps'],
            cluster_images: int = _DEFAULTS['cluster_images'],
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
        error = layer_options_error(dict(
            block_size=block_size, cluster_size=cluster_size, num_clusters=num_clusters, cluster_method=cluster_method,
            cluster_count=cluster_count, min_cluster_size=min_cluster_size, max_cluster_size=max_cluster_size,
            drop_mode=drop_mode, recluster_every=recluster_every, ramp_steps=ramp_steps,
            cluster_images=cluster_images), label=lambda option: option.name)  # the checks of options.py
        if error:
            raise ValueError(error)
        if not 0.0 < gamma_scale <= 1.0:
            raise ValueError(f'gamma_scale must be in (0, 1], got {gamma_scale}')
        if num_channels is not None and int(num_channels) < 1:
            raise ValueError(f'num_channels must be >= 1, got {num_channels}')
        self.spatial_dims = type(self).spatial_dims  # TorchScript only sees instance attributes
        # The rate as a tensor too, for compiled graphs: a Python float that a training loop changes
        # every step (a ramp) would be a recompile every step. Not saved: drop_prob is an argument.
        self.register_buffer('drop_rate', torch.tensor(float(drop_prob), device=device), persistent=False)
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
        self.schedule = LayerSchedule(recluster_every, ramp_steps, cluster_images)
        self.schedule_key = register_layer(self)  # how the schedule's custom ops find this layer
        self.register_buffer('num_steps', torch.zeros((), dtype=torch.int64, device=device))
        empty_shape = [0] * (self.spatial_dims + 1)
        self.register_buffer('cluster_map', torch.zeros(empty_shape, dtype=LABEL_DTYPE, device=device))
        self.register_buffer('cluster_counts', torch.zeros(0, dtype=LABEL_DTYPE, device=device))
        self.max_clusters = 0  # host copy of cluster_counts.max(): sizes the random draw without a sync
        self.has_undropped = False  # host copy of (cluster_counts == 0).any()
        self.draw_clusters = 0  # clusters a compiled graph draws per map: max_clusters, or more
        if feat_size is not None:
            size = [int(s) for s in (feat_size if isinstance(feat_size, (tuple, list)) else [feat_size])]
            if len(size) != self.spatial_dims:
                raise ValueError(f'feat_size must have {self.spatial_dims} dims, got {feat_size}')
            # Built on the CPU, where label values can be read, then moved: the device may be 'meta', also
            # implicitly through a `with torch.device('meta')` block (timm's factory tests use one).
            self.set_cluster_map(self.grid_map(size, torch.device('cpu')))

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)
        copied.schedule_key = register_layer(copied)  # a copy (an EMA model) is a layer of its own
        return copied

    def __setstate__(self, state):
        super().__setstate__(state)
        self.schedule_key = register_layer(self)

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
        if not self.training:
            return x
        if not torch.jit.is_scripting():
            if self.schedule.active:
                return self.schedule.forward(self, x)
            if torch.compiler.is_compiling():
                return self.compiled_drop(x, self.drop_rate)
        return self.drop(x, self.drop_prob)

    @property
    def drop_prob(self) -> float:
        """The nominal rate (``set_drop_prob`` and schedules set it)."""
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, drop_prob: float) -> None:
        self._drop_prob = float(drop_prob)
        self.drop_rate.fill_(self._drop_prob)

    def drop(self, x: Tensor, drop_prob: float) -> Tensor:
        """The training forward at rate ``drop_prob``."""
        if drop_prob == 0.0:
            return x
        if self.cluster_map.numel() > 0:
            return self.drop_with(x, drop_prob, self.cluster_map, self.max_clusters,
                                  self.cluster_counts if self.has_undropped else None)
        spatial = list(x.shape[2:])
        return self.drop_with(x, drop_prob, self.grid_map(spatial, x.device), self.target_clusters(spatial), None)

    def drop_with(self, x: Tensor, drop_prob: float, cluster_map: Tensor, num_clusters: int,
                  cluster_counts: Optional[Tensor]) -> Tensor:
        """``drop_cluster`` with this layer's options and the given maps (``drop_prob`` may be a 0-dim
        tensor outside TorchScript)."""
        return drop_cluster(
            x,
            cluster_map,
            drop_prob=drop_prob * self.gamma_scale,
            num_clusters=num_clusters,
            couple_channels=self.couple_channels,
            with_noise=self.with_noise,
            inplace=self.inplace,
            scale_by_keep=self.scale_by_keep,
            drop_mode=self.drop_mode,
            batch_shared=self.batch_shared,
            cluster_counts=cluster_counts,
        )

    # The options of the layer's own schedule, kept by ``self.schedule``.
    @property
    def recluster_every(self) -> int:
        return self.schedule.recluster_every

    @recluster_every.setter
    def recluster_every(self, every: int) -> None:
        self.schedule.recluster_every = every

    @property
    def ramp_steps(self) -> int:
        return self.schedule.ramp_steps

    @ramp_steps.setter
    def ramp_steps(self, steps: int) -> None:
        self.schedule.ramp_steps = int(steps)

    @property
    def cluster_images(self) -> int:
        return self.schedule.cluster_images

    @cluster_images.setter
    def cluster_images(self, images: int) -> None:
        self.schedule.cluster_images = int(images)

    @property
    def clustered(self) -> bool:
        """Whether the maps come from data (``update_clusters``, a broadcast, a checkpoint), not a grid."""
        return self.schedule.clustered

    @clustered.setter
    def clustered(self, clustered: bool) -> None:
        self.schedule.clustered = clustered

    @property
    def steps(self) -> int:
        """Training forwards counted by the layer's own schedule (the host copy of ``num_steps``)."""
        return self.schedule.steps

    @torch.jit.unused
    def own_rate(self, step: Optional[int] = None) -> float:
        """The rate of the layer's own ramp at training forward ``step`` (counted from 1; default: the
        last one): ``drop_prob`` once ``ramp_steps`` have passed."""
        return self.schedule.rate(self.drop_prob, self.schedule.steps if step is None else step)

    @torch.jit.unused
    def compiled_drop(self, x: Tensor, rate: Tensor, cluster_map: Optional[Tensor] = None,
                      counts: Optional[Tensor] = None) -> Tensor:
        """The drop in a compiled graph: at a tensor rate, with the stored maps (or those given), as
        many clusters drawn as any re-clustering can make and the counts always passed, so that
        nothing the graph reads changes as the rate and maps do."""
        spatial = list(x.shape[2:])
        if cluster_map is not None:
            return self.drop_with(x, rate, cluster_map, self.cluster_bound(spatial), counts)
        if self.cluster_map.numel() == 0:  # not clustered yet: the grid for this size
            return self.drop_with(x, rate, self.grid_map(spatial, x.device), self.target_clusters(spatial), None)
        return self.drop_with(x, rate, self.cluster_map, self.draw_clusters, self.cluster_counts)

    def cluster_bound(self, spatial: List[int]) -> int:
        """The most clusters a re-clustering makes per map for inputs of this spatial size."""
        return self.count_bounds(spatial)[1] if self.cluster_count == 'gap' else self.target_clusters(spatial)

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
        self.clustered = True
        if self.num_channels is None:
            # Learned from the input, so later loads and set_cluster_map calls are checked.
            self.num_channels = int(x.shape[1])
        return self.cluster_map

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self.forget_original()
        steps = state_dict.get(prefix + 'num_steps')
        if steps is None:  # saved before the layers counted their steps: they start counting here
            state_dict[prefix + 'num_steps'] = self.num_steps.detach().clone()
        elif steps.numel() != 1 or steps.is_floating_point() or int(steps) < 0:
            error_msgs.append(f'{prefix}num_steps: expected one integer count >= 0, got {steps.dtype} '
                              f'{tuple(steps.shape)}')
            return
        else:
            self.schedule.load(int(steps))
            self.clustered = self.steps > 0  # the layer's own schedule ran, so its maps come from data
        if not self.load_maps(state_dict, prefix, error_msgs):
            return
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
