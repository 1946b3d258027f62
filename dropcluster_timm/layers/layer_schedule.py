""" A DropCluster layer's own schedule, for training loops that know nothing of DropCluster: count the
training forwards, ramp the rate, say when the maps are due for re-clustering.

The host keeps the count (reading a device counter would synchronise every step), and a compiled
graph must not read it: a Python value that changes every step is a recompile every step. So compiled
graphs reach the host through two custom ops, opaque to ``torch.compile`` and run at every call:
``dropcluster::advance_schedule`` counts a step and writes the count into the layer's ``num_steps``
buffer, which the graph reads as a tensor for the ramp; ``dropcluster::recluster`` clusters the
layer's input where the schedule says so. What a graph does read of the schedule, ``recluster_due``,
changes only around the steps that re-cluster: those steps run one compiled variant, every other step
another, and neither breaks the graph.
"""
import itertools
import weakref
from typing import Dict, Tuple

import torch
from torch import Tensor

from .distributed import share_clusters
from .drop_cluster import LABEL_DTYPE

__all__ = ['LayerSchedule', 'register_layer']

# key -> layer: how the custom ops, which take no Python objects, find the layer they serve.
_LAYERS: Dict[int, weakref.ref] = {}
_KEYS = itertools.count()


def register_layer(layer: torch.nn.Module) -> int:
    """A key by which the custom ops find ``layer`` (held weakly)."""
    key = next(_KEYS)
    _LAYERS[key] = weakref.ref(layer, lambda _, key=key: _LAYERS.pop(key, None))
    return key


class LayerSchedule:
    """Re-cluster at the first training forward (unless the maps come from data) and every
    ``recluster_every`` after; ramp the rate linearly over ``ramp_steps`` forwards; cluster from
    ``cluster_images`` images of the batch. Both counts 0: off (the layer is driven from outside).
    ``forward`` drives one training forward of the layer; the layer holds the maps and drops.

    ``recluster_due`` says whether the next training forward re-clusters; it is stored, not computed
    when read, so that a compiled graph guards on one flag that changes only around those steps.
    """

    def __init__(self, recluster_every: int = 0, ramp_steps: int = 0, cluster_images: int = 32, steps: int = 0,
                 clustered: bool = False):
        self.ramp_steps = int(ramp_steps)
        self.cluster_images = int(cluster_images)
        self._recluster_every = int(recluster_every)
        self._clustered = bool(clustered)
        self.steps = int(steps)
        self.recluster_due = False
        self._update()

    def _update(self) -> None:
        every, steps = self._recluster_every, self.steps
        self.recluster_due = every > 0 and (not self._clustered or (steps > 0 and steps % every == 0))

    @property
    def recluster_every(self) -> int:
        return self._recluster_every

    @recluster_every.setter
    def recluster_every(self, every: int) -> None:
        self._recluster_every = int(every)
        self._update()

    @property
    def clustered(self) -> bool:
        """Whether the layer's maps come from data (clustering, a broadcast, a checkpoint), not a grid."""
        return self._clustered

    @clustered.setter
    def clustered(self, clustered: bool) -> None:
        self._clustered = bool(clustered)
        self._update()

    @property
    def active(self) -> bool:
        """Whether the layer drives itself."""
        return self._recluster_every > 0 or self.ramp_steps > 0

    def load(self, steps: int) -> None:
        """Continue from ``steps`` training forwards (a loaded ``num_steps``)."""
        self.steps = int(steps)
        self._update()

    def advance(self) -> int:
        """Count a training forward; returns the count."""
        self.load(self.steps + 1)
        return self.steps

    def rate(self, drop_prob: float, step: int) -> float:
        """The ramp's rate at training forward ``step`` (counted from 1)."""
        return drop_prob * (min(1.0, step / self.ramp_steps) if self.ramp_steps > 0 else 1.0)

    def rate_tensor(self, drop_rate: Tensor, num_steps: Tensor) -> Tensor:
        """``rate`` at the step held by ``num_steps`` (``ramp_steps`` > 0), computed on the device."""
        return (num_steps.to(torch.float32) / self.ramp_steps).clamp(max=1.0) * drop_rate

    def forward(self, layer: torch.nn.Module, x: Tensor) -> Tensor:
        """A training forward of ``layer`` on this schedule: re-cluster when due, count the step, drop
        at the ramp's rate."""
        # Due at the first training forward unless the maps already come from data, and every
        # recluster_every after; maps of another input size (grids made for 224 px) never wait.
        due = layer.drop_prob > 0.0 and (self.recluster_due or (
            self._recluster_every > 0 and tuple(layer.cluster_map.shape[1:]) != tuple(x.shape[2:])))
        if torch.compiler.is_compiling():
            return self.compiled_forward(layer, x, due)
        if due:
            self.recluster(layer, x)
        layer.num_steps.fill_(self.advance())
        return layer.drop(x, self.rate(layer.drop_prob, self.steps))

    def compiled_forward(self, layer: torch.nn.Module, x: Tensor, due: bool) -> Tensor:
        """``forward`` as a compiled graph sees it: the host work in the custom ops, the rate a tensor."""
        cluster_map = counts = None
        if due:
            maps = 1 if layer.couple_channels else x.shape[1]
            cluster_map, counts = torch.ops.dropcluster.recluster(x.detach(), layer.schedule_key, maps)
        torch.ops.dropcluster.advance_schedule(layer.num_steps, layer.schedule_key)
        rate = layer.drop_rate
        if self.ramp_steps > 0:
            rate = self.rate_tensor(rate, layer.num_steps)
        return layer.compiled_drop(x, rate, cluster_map, counts)

    @torch.no_grad()
    def recluster(self, layer: torch.nn.Module, x: Tensor) -> None:
        """Re-cluster ``layer`` from the first ``cluster_images`` images of its input ``x``; under
        ``torch.distributed`` rank 0's maps are broadcast to every rank."""
        share_clusters(layer, x.detach()[:self.cluster_images], src=0)

    def __repr__(self) -> str:
        return (f'LayerSchedule(recluster_every={self._recluster_every}, ramp_steps={self.ramp_steps}, '
                f'cluster_images={self.cluster_images}, steps={self.steps}, clustered={self._clustered})')


def _layer(key: int) -> torch.nn.Module:
    ref = _LAYERS.get(key)
    layer = ref() if ref is not None else None
    if layer is None:
        raise RuntimeError(f'no DropCluster layer is registered under key {key}')
    return layer


@torch.library.custom_op('dropcluster::advance_schedule', mutates_args=('num_steps',))
def advance_schedule(num_steps: Tensor, key: int) -> None:
    """Count a training forward of the layer ``key`` on the host and write the count into ``num_steps``."""
    num_steps.fill_(_layer(key).schedule.advance())


@advance_schedule.register_fake
def _(num_steps: Tensor, key: int) -> None:
    return None


@torch.library.custom_op('dropcluster::recluster', mutates_args=())
def recluster(x: Tensor, key: int, maps: int) -> Tuple[Tensor, Tensor]:
    """Re-cluster the layer ``key`` from its input ``x`` (``LayerSchedule.recluster``); returns copies of
    its new ``cluster_map`` (``maps`` maps) and ``cluster_counts``."""
    layer = _layer(key)
    layer.schedule.recluster(layer, x)
    return layer.cluster_map.clone(), layer.cluster_counts.clone()


@recluster.register_fake
def _(x: Tensor, key: int, maps: int) -> Tuple[Tensor, Tensor]:
    return (x.new_empty((maps,) + tuple(x.shape[2:]), dtype=LABEL_DTYPE),
            x.new_empty((maps,), dtype=LABEL_DTYPE))
