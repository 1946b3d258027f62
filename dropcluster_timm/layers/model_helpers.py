""" Model-level DropCluster helpers: find the layers, set their rate, give them their first maps,
re-cluster them from data, copy and snapshot their state."""
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import DropBlock2d
from timm.utils import unwrap_model


from .distributed import share_clusters
from .drop_cluster_modules import LAYER_BUFFERS, DropClusterNd

__all__ = [
    'dropcluster_layers', 'set_drop_prob', 'init_cluster_maps', 'update_clusters', 'copy_cluster_state',
    'cluster_state', 'ddp_ignore_cluster_buffers', 'nonfinite_tensor', 'disable_own_schedule',
]


def dropcluster_layers(model: nn.Module) -> Iterator[Tuple[str, DropClusterNd]]:
    """(name, layer) for every DropCluster layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, DropClusterNd):
            yield name, module


def set_drop_prob(model: nn.Module, drop_prob: float, drop_block: bool = False) -> int:
    """Set the drop rate of every DropCluster layer (and of timm ``DropBlock2d`` layers too with
    ``drop_block=True``, to ramp DropBlock the same way); returns how many layers were set."""
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f'drop_prob must be in [0, 1), got {drop_prob}')
    count = 0
    for _, layer in dropcluster_layers(model):
        layer.drop_prob = float(drop_prob)
        count += 1
    if drop_block:
        for module in model.modules():
            if isinstance(module, DropBlock2d):
                module.drop_prob = float(drop_prob)
                count += 1
    return count


def _forward_with_pre_hook(model: nn.Module, layers: Sequence[nn.Module], hook: Callable, batch: Any) -> None:
    """One forward of ``batch`` in eval mode with ``hook`` as a forward pre-hook of ``layers``.

    Eval mode: DropCluster layers pass activations through and BatchNorm statistics are left alone.
    Every module's train/eval mode is restored and the hooks removed afterwards, also on error.
    """
    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        if isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        else:
            model(batch)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training


@torch.no_grad()
def init_cluster_maps(model: nn.Module, input_size: Sequence[int]) -> int:
    """Give every DropCluster layer whose map is still empty its grid map (``grid_map``) for inputs
    of ``input_size`` (C, H, W), found with one forward of a zero image.

    So that every checkpoint carries the cluster state (empty buffers are not saved by safetensors).
    Returns the number of layers given a map.
    """
    model = unwrap_model(model)
    empty = [layer for _, layer in dropcluster_layers(model) if layer.cluster_map.numel() == 0]
    if not empty:
        return 0

    def hook(layer, args):
        if layer.cluster_map.numel() == 0:
            layer.set_cluster_map(layer.grid_map(list(args[0].shape[2:]), layer.cluster_map.device))

    p = next(model.parameters())
    _forward_with_pre_hook(model, empty, hook, torch.zeros((1, *input_size), device=p.device, dtype=p.dtype))
    return sum(1 for layer in empty if layer.cluster_map.numel() > 0)


@torch.no_grad()
def update_clusters(
        model: nn.Module,
        batch: Any,
        generator: Optional[torch.Generator] = None,
        src: int = 0,
        **kwargs,
) -> int:
    """Re-cluster every DropCluster layer of ``model`` from one no-grad forward of ``batch``.

    The model runs in eval mode (DropCluster layers pass activations through, BatchNorm statistics
    are left alone); each layer clusters its own input as it passes, so no activations are kept.
    The model's train/eval modes are restored afterwards, also on error. A DDP-wrapped model is
    unwrapped, so the forward involves no DDP collectives.

    Under ``torch.distributed`` (initialised, world size > 1) every rank must call this, in the same
    order relative to its other collectives: every rank runs the forward on its own ``batch`` (so no
    rank waits on a forward that only another rank runs), rank ``src`` clusters, and each layer's
    map is broadcast from it as the forward passes (``share_clusters``), so that all ranks hold
    identical ``cluster_map``, ``cluster_counts`` and ``max_clusters`` afterwards. Maps of unchanged
    shape and dtype are updated in place, so DDP's cached buffer references stay valid.

    Args:
        model: a module containing DropCluster layers (DDP-wrapped or not).
        batch: the model's input: a tensor, or a tuple / dict of arguments.
        generator: random generator for the randomised methods.
        src: the rank that clusters (distributed only).
        **kwargs: options for the clustering method.

    Returns:
        the number of layers re-clustered.
    """
    model = unwrap_model(model)
    layers = list(dropcluster_layers(model))
    if not layers:
        raise ValueError('update_clusters: the model has no DropCluster layers')
    reached = set()

    def hook(layer, args):
        share_clusters(layer, args[0], src=src, generator=generator, **kwargs)
        reached.add(layer)

    _forward_with_pre_hook(model, [layer for _, layer in layers], hook, batch)
    missed = [name for name, layer in layers if layer not in reached]
    if missed:
        raise RuntimeError(f'update_clusters: the forward pass did not reach DropCluster layers {missed}')
    return len(reached)


def copy_cluster_state(src: nn.Module, dst: nn.Module) -> int:
    """Copy every DropCluster layer's cluster maps from ``src`` to ``dst`` (same architecture).

    For model copies such as timm's ``ModelEmaV3``, whose update copies integer buffers in place and
    so cannot follow a change of map shape. Returns the number of layers copied.
    """
    src_layers = list(dropcluster_layers(unwrap_model(src)))
    dst_layers = list(dropcluster_layers(unwrap_model(dst)))
    if [n for n, _ in src_layers] != [n for n, _ in dst_layers]:
        raise ValueError('copy_cluster_state: the models have different DropCluster layers')
    count = 0
    for (_, a), (_, b) in zip(src_layers, dst_layers):
        if a.cluster_map.numel() > 0:
            b.set_cluster_map(a.cluster_map, undropped=a.cluster_counts == 0)
            count += 1
    return count


def cluster_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{layer name: cluster_map}`` (CPU copies) of every DropCluster layer of ``model`` (unwrapped)."""
    return {name: layer.cluster_map.detach().cpu().clone() for name, layer in dropcluster_layers(unwrap_model(model))}


def ddp_ignore_cluster_buffers(model: nn.Module) -> List[str]:
    """Keep ``DistributedDataParallel`` away from the cluster buffers; call before wrapping.

    DDP broadcasts every buffer from rank 0 when it wraps the model and at each training forward
    outside ``no_sync``, from the tensors it found at wrap time (stale once a map changes shape).
    The maps need no such copy: they start identical (grid maps, or the same checkpoint) and
    ``update_clusters`` broadcasts them itself, so this saves a broadcast per step (the rate, which
    every rank sets alike, is left out too). Other buffers
    (BatchNorm statistics) are still broadcast. Returns the buffer names excluded.
    """
    names = []
    for name, layer in dropcluster_layers(model):
        prefix = name + '.' if name else ''
        names += [prefix + buffer for buffer in LAYER_BUFFERS + ('drop_rate',)]
    existing = list(getattr(model, '_ddp_params_and_buffers_to_ignore', []))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, existing + [n for n in names if n not in existing])
    return names


def nonfinite_tensor(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or inf, or None: weights from a file are
    checked before a model trains on them or publishes them."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def disable_own_schedule(model: nn.Module) -> int:
    """Turn off the layers' own re-clustering and ramp (``recluster_every``, ``ramp_steps``), for a
    training loop that drives them itself (``set_drop_prob``, ``update_clusters``); one mechanism per
    run, never both. Returns the number of layers."""
    count = 0
    for _, layer in dropcluster_layers(model):
        layer.recluster_every = layer.ramp_steps = 0
        count += 1
    return count
