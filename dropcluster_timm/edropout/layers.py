""" EDropout: energy-based dropout and pruning of channels, for timm CNNs.

EDropout (Salehinejad & Valaee, https://arxiv.org/abs/2006.04270) switches whole units (here: the
channels of chosen layers) on and off with a binary state that an energy model evolves
(``dropcluster_timm.edropout.energy_search.EnergySearch``): the energy of a state is the loss of the network
under it on the current batch. Training uses the best state; the channels it keeps off at the end
are removed (``dropcluster_timm.edropout.prune``), giving a smaller plain timm model.

* ``edropout(x, state)``: the functional core, ``x`` times a per-channel keep state; a batch of
  ``S`` states applies one to each of ``S`` equal slices of the batch (how all candidates are scored
  in one forward).
* ``EDropout2d``: the layer, holding the applied state as a ``keep_state`` buffer (saved in
  checkpoints). It masks in training and evaluation alike: the state is a pruning decision, so the
  evaluated network is the one pruning will produce (no 1/keep rescaling either).
* ``add_edropout(model)``: one layer in the ``drop_block`` slot of every block (where timm puts
  DropBlock and this package DropCluster), ``edropout_layers`` / ``set_edropout_state`` find and set them.
* ``EDropCluster2d`` / ``drop_cluster_state``: the per-cluster variant, DropCluster with the dropped
  clusters chosen by the energy search instead of at random (units: the clusters of every map).
  Like DropCluster it acts in training only (and while its rate is above 0, so the rate's ramp
  still says when it starts), rescaling the kept elements; it prunes nothing. ``add_edropout(model,
  unit='cluster')`` turns a model's DropCluster layers into these.
* ``state_energies`` / ``edropout_step``: score states on a batch (no gradients, eval mode, averaged
  over processes) and take one evolution step.
"""
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor

from ..layers.drop_cluster import resample_cluster_map
from ..models.names import EDROPOUT_UNITS

from ..layers.drop_cluster_modules import DropCluster2d
from .energy_search import EnergySearch
from ..layers.distributed import distributed

__all__ = ['edropout', 'EDropout2d', 'drop_cluster_state', 'EDropCluster2d', 'EDROPOUT_UNITS', 'add_edropout',
           'edropout_layers', 'set_edropout_state', 'edropout_state', 'state_energies', 'edropout_step',
           'make_search']



def edropout(x: Tensor, state: Tensor) -> Tensor:
    """``x`` (N, C, ...) with the channels that ``state`` turns off zeroed.

    Args:
        x: activations, channels in dim 1.
        state: (C,) keep state for the whole batch, or (S, C) states, the s-th applied to the s-th
            of S equal slices of the batch (N must be a multiple of S).
    """
    if state.shape[-1] != x.shape[1]:
        raise ValueError(f'state has {state.shape[-1]} units but the activations have {x.shape[1]} channels')
    spatial = [1] * (x.dim() - 2)
    if state.dim() == 1:
        return x * state.to(x.dtype).view(1, -1, *spatial)
    s = state.shape[0]
    if x.shape[0] % s:
        raise ValueError(f'a batch of {x.shape[0]} cannot be split into {s} equal slices, one per state')
    mask = state.to(x.dtype).view(s, 1, -1, *spatial).expand(s, x.shape[0] // s, -1, *spatial)
    return x * mask.reshape(x.shape[0], -1, *spatial)


@register_notrace_module  # FX: a leaf, its state branch is decided at run time
class EDropout2d(nn.Module):
    """Energy-based channel dropout (EDropout) of ``num_channels`` channels; see the module docstring.

    ``keep_state`` (bool buffer) is the applied state; ``candidates`` (S, C), when set, replaces it
    for scoring S states in one forward.
    """

    def __init__(self, num_channels: int, device=None):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f'num_channels must be >= 1, got {num_channels}')
        self.num_channels = int(num_channels)
        self.register_buffer('keep_state', torch.ones(self.num_channels, dtype=torch.bool, device=device))
        self.candidates: Optional[Tensor] = None

    @property
    def group_sizes(self) -> List[int]:
        return [self.num_channels]

    def forward(self, x: Tensor) -> Tensor:
        return edropout(x, self.keep_state if self.candidates is None else self.candidates)

    def extra_repr(self) -> str:
        return f'num_channels={self.num_channels}, kept={int(self.keep_state.sum())}'


def drop_cluster_state(x: Tensor, cluster_map: Tensor, state: Tensor, scale_by_keep: bool = True) -> Tensor:
    """``x`` (N, C, H, W) with the clusters that ``state`` turns off zeroed.

    Args:
        x: activations.
        cluster_map: integer labels (M, h, w), M = 1 or the maps' count G (resampled to H, W).
        state: (S, G, K) keep decisions per map and cluster label, G = C (one map per channel) or 1
            (channels coupled); the s-th state applies to the s-th of S equal slices of the batch.
        scale_by_keep: rescale each slice's kept elements by elements / kept elements, as DropCluster.
    """
    s, g, k = state.shape
    n_batch, c, h, w = x.shape
    if g not in (1, c) or cluster_map.shape[0] not in (1, g):
        raise ValueError(f'state has {g} maps and the cluster map {cluster_map.shape[0]}; expected 1 or {c}')
    if n_batch % s:
        raise ValueError(f'a batch of {n_batch} cannot be split into {s} equal slices, one per state')
    idx = resample_cluster_map(cluster_map, [h, w]).reshape(cluster_map.shape[0], h * w).long()
    mask = state.float().gather(2, idx.unsqueeze(0).expand(s, g, h * w))
    if scale_by_keep:
        mask = mask * (g * h * w / mask.sum((1, 2), keepdim=True).clamp(min=1.0))
    mask = mask.to(x.dtype).view(s, 1, g, h * w)
    return (x.reshape(s, n_batch // s, c, h * w) * mask).view(n_batch, c, h, w)


@register_notrace_module
class EDropCluster2d(DropCluster2d):
    """DropCluster with the dropped clusters chosen by EDropout's energy search (see the module
    docstring); the arguments are ``DropCluster2d``'s, with ``feat_size`` and ``num_channels`` required
    and a fixed cluster count (the search needs a fixed number of units).

    ``keep_state`` ((maps x clusters,) bool) is a non-persistent buffer: a checkpoint of this layer is
    a DropCluster checkpoint (the energy search's state, saved with the training checkpoint, re-applies
    it on resume), so a published model loads as the ``*_dropcluster`` model it was built from.
    Re-clustering renumbers the clusters: the state then selects other clusters until it evolves.
    Every map keeps at least one cluster (the search keeps a unit of every group; here a group is a map).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cluster_count != 'fixed':
            raise ValueError("EDropCluster2d needs cluster_count='fixed': the energy search has a fixed set of units")
        if self.num_channels is None or self.cluster_map.numel() == 0:
            raise ValueError('EDropCluster2d needs feat_size and num_channels (its unit count is fixed at creation)')
        self.num_maps = 1 if self.couple_channels else int(self.num_channels)
        self.units_per_map = self.target_clusters(list(self.cluster_map.shape[1:]))
        self.register_buffer('keep_state', torch.ones(self.num_maps * self.units_per_map, dtype=torch.bool,
                                                      device=self.cluster_map.device), persistent=False)
        self.candidates: Optional[Tensor] = None

    @classmethod
    def from_drop_cluster(cls, layer: DropCluster2d) -> 'EDropCluster2d':
        """The energy-selected version of a ``DropCluster2d``: same settings and cluster state."""
        new = cls(drop_prob=layer.drop_prob, block_size=layer.block_size, cluster_size=layer.cluster_size,
                  num_clusters=layer.num_clusters or None, couple_channels=layer.couple_channels,
                  scale_by_keep=layer.scale_by_keep, cluster_method=layer.cluster_method,
                  cluster_count=layer.cluster_count, skip_unstructured=layer.skip_unstructured,
                  feat_size=tuple(layer.cluster_map.shape[1:]), num_channels=layer.num_channels,
                  gamma_scale=layer.gamma_scale, device=layer.cluster_map.device)
        new.set_cluster_map(layer.cluster_map.clone(), undropped=(layer.cluster_counts == 0)
                            if layer.has_undropped else None)
        return new

    @property
    def num_units(self) -> int:
        return self.num_maps * self.units_per_map

    @property
    def group_sizes(self) -> List[int]:
        return [self.units_per_map] * self.num_maps

    def forward(self, x: Tensor) -> Tensor:
        if self.candidates is None and (not self.training or self.drop_prob == 0.0):
            return x
        state = self.keep_state.unsqueeze(0) if self.candidates is None else self.candidates
        state = state.view(-1, self.num_maps, self.units_per_map)
        if self.has_undropped:  # maps without structure stay whole, as in DropCluster
            state = state | (self.cluster_counts == 0).view(1, -1, 1).to(state.device)
        return drop_cluster_state(x, self.cluster_map, state, self.scale_by_keep)


_LAYERS = (EDropout2d, EDropCluster2d)


def _num_units(layer: nn.Module) -> int:
    return layer.num_channels if isinstance(layer, EDropout2d) else layer.num_units


def edropout_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, layer) for every EDropout layer of ``model`` (per channel or per cluster), in module
    order (the order of a state's units)."""
    for name, module in model.named_modules():
        if isinstance(module, _LAYERS):
            yield name, module


def _slot_channels(block: nn.Module) -> int:
    # The slot follows the norm of the conv it masks: bn1 in a basic block, bn2 in a bottleneck.
    norm = block.bn2 if hasattr(block, 'conv3') else block.bn1
    return int(norm.num_features)


def add_edropout(model: nn.Module, stages: Optional[Sequence[int]] = None, unit: str = 'channel') -> List[str]:
    """Put an ``EDropout2d`` in the ``drop_block`` slot of every block of ``model`` (ResNet-style
    timm models: ``layer1`` .. ``layer4``), or of the blocks of ``stages``; returns the layer names.
    The slots must be empty (``nn.Identity``): build the model without DropBlock or DropCluster there.

    ``unit='cluster'``: instead turn every ``DropCluster2d`` of the model (a ``*_dropcluster`` model,
    whose placement ``stages`` does not change) into an ``EDropCluster2d``.
    """
    if unit not in EDROPOUT_UNITS:
        raise ValueError(f'unknown EDropout unit {unit!r}, expected one of {EDROPOUT_UNITS}')
    if unit == 'cluster':
        return _convert_drop_clusters(model)
    param = next(model.parameters())
    stages = tuple(stages) if stages is not None else (1, 2, 3, 4)
    names = []
    for stage in stages:
        blocks = getattr(model, f'layer{stage}', None)
        if blocks is None:
            raise ValueError(f'{type(model).__name__} has no stage layer{stage}: EDropout takes the drop_block '
                             'slots of ResNet-style blocks')
        for i, block in enumerate(blocks):
            if not hasattr(block, 'drop_block'):
                raise ValueError(f'layer{stage}.{i} ({type(block).__name__}) has no drop_block slot')
            if isinstance(block.drop_block, EDropout2d):
                continue
            if not isinstance(block.drop_block, nn.Identity):
                raise ValueError(f'layer{stage}.{i}.drop_block holds {type(block.drop_block).__name__}: EDropout '
                                 'takes empty slots (build the model without DropBlock / DropCluster there)')
            block.drop_block = EDropout2d(_slot_channels(block), device=param.device)
            names.append(f'layer{stage}.{i}.drop_block')
    if not names and not any(True for _ in edropout_layers(model)):
        raise ValueError('no block to put EDropout in')
    return names


def _convert_drop_clusters(model: nn.Module) -> List[str]:
    names = [n for n, m in model.named_modules() if type(m) is DropCluster2d]
    if not names:
        raise ValueError(f'{type(model).__name__} has no DropCluster2d layers for per-cluster EDropout '
                         '(use a *_dropcluster model)')
    for name in names:
        parent, _, attr = name.rpartition('.')
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, EDropCluster2d.from_drop_cluster(getattr(owner, attr)))
    return names


def edropout_state(model: nn.Module) -> Tensor:
    """The applied state of all EDropout layers, concatenated in module order (bool, CPU)."""
    states = [layer.keep_state.detach().cpu() for _, layer in edropout_layers(model)]
    if not states:
        raise ValueError('the model has no EDropout layers (see add_edropout)')
    return torch.cat(states)


def set_edropout_state(model: nn.Module, state: Tensor) -> None:
    """Apply ``state`` (all layers' units, module order) to the EDropout layers."""
    layers = [layer for _, layer in edropout_layers(model)]
    sizes = [_num_units(layer) for layer in layers]
    if state.numel() != sum(sizes):
        raise ValueError(f'state has {state.numel()} units, the EDropout layers {sum(sizes)}')
    for layer, piece in zip(layers, torch.split(state.flatten(), sizes)):
        layer.keep_state.copy_(piece.to(device=layer.keep_state.device, dtype=torch.bool))


def make_search(model: nn.Module, **kwargs) -> EnergySearch:
    """An ``EnergySearch`` over the channels of the model's EDropout layers (one group per layer);
    ``kwargs`` are its settings (one group per channel layer, one per cluster map). The model's layers
    get its initial best state."""
    sizes = [size for _, layer in edropout_layers(model) for size in layer.group_sizes]
    if not sizes:
        raise ValueError('the model has no EDropout layers (see add_edropout)')
    search = EnergySearch(sizes, **kwargs)
    set_edropout_state(model, search.best_state)
    return search


@torch.no_grad()
def state_energies(model: nn.Module, states: Tensor, images: Tensor, targets: Tensor,
                   loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Tensor:
    """The energy of each of ``states`` (S, units): the loss of ``model`` under that state on
    ``images`` / ``targets``, all S scored in one forward of the batch repeated S times.

    Eval mode (BatchNorm's running statistics, no other dropout; every module's mode is restored), so
    states are compared on equal terms and no statistic moves. In a distributed run the energies
    are averaged over processes, so every process sees the same ones. ``loss_fn`` (default cross
    entropy) takes logits and targets (class indices or soft targets) and returns the mean loss.
    """
    layers = [layer for _, layer in edropout_layers(model)]
    sizes = [_num_units(layer) for layer in layers]
    if states.dim() != 2 or states.shape[1] != sum(sizes):
        raise ValueError(f'states must be (S, {sum(sizes)}), got {tuple(states.shape)}')
    loss_fn = loss_fn or F.cross_entropy
    s, n = states.shape[0], images.shape[0]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for layer, piece in zip(layers, torch.split(states, sizes, dim=1)):
            layer.candidates = piece.to(device=layer.keep_state.device, dtype=torch.bool)
        x = images.repeat(s, *([1] * (images.dim() - 1)))
        logits = model(x).float().view(s, n, -1)
    finally:
        for layer in layers:
            layer.candidates = None
        for m, mode in modes.items():
            m.train(mode)
    energies = torch.stack([loss_fn(logits[i], targets) for i in range(s)]).float()
    if distributed():
        torch.distributed.all_reduce(energies)
        energies /= torch.distributed.get_world_size()
    return energies


def edropout_step(model: nn.Module, search: EnergySearch, images: Tensor, targets: Tensor,
                  loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> bool:
    """One evolution step: score the search's proposals on ``images`` / ``targets`` and apply the
    new best state to the model. Returns False (and does nothing) once the search has converged."""
    if search.converged:
        return False
    energies = state_energies(model, search.proposals(), images, targets, loss_fn)
    set_edropout_state(model, search.update(energies))
    return True
