""" Model-level DropCluster helpers: find the layers, set their rate, re-cluster them from data."""
from typing import Any, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from .drop_cluster import _DropClusterNd

__all__ = ['dropcluster_layers', 'set_drop_prob', 'update_clusters']


def dropcluster_layers(model: nn.Module) -> Iterator[Tuple[str, _DropClusterNd]]:
    """(name, layer) for every DropCluster layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _DropClusterNd):
            yield name, module


def set_drop_prob(model: nn.Module, drop_prob: float) -> int:
    """Set the drop rate of every DropCluster layer; returns how many layers were set."""
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f'drop_prob must be in [0, 1), got {drop_prob}')
    count = 0
    for _, layer in dropcluster_layers(model):
        layer.drop_prob = float(drop_prob)
        count += 1
    return count


@torch.no_grad()
def update_clusters(
        model: nn.Module,
        batch: Any,
        generator: Optional[torch.Generator] = None,
        **kwargs,
) -> int:
    """Re-cluster every DropCluster layer of ``model`` from one no-grad forward of ``batch``.

    The model runs in eval mode (DropCluster layers pass activations through, BatchNorm statistics
    are left alone); each layer clusters its own input as it passes, so no activations are kept.
    The model's train/eval modes are restored afterwards, also on error.

    Args:
        model: a module containing DropCluster layers.
        batch: the model's input: a tensor, or a tuple / dict of arguments.
        generator: random generator for the randomised methods.
        **kwargs: options for the clustering method.

    Returns:
        the number of layers re-clustered.
    """
    layers = list(dropcluster_layers(model))
    if not layers:
        raise ValueError('update_clusters: the model has no DropCluster layers')
    modes = {m: m.training for m in model.modules()}
    seen = []

    def hook(layer, args):
        layer.update_clusters(args[0], generator=generator, **kwargs)
        seen.append(layer)

    handles = [layer.register_forward_pre_hook(hook) for _, layer in layers]
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
    missed = [name for name, layer in layers if layer not in seen]
    if missed:
        raise RuntimeError(f'update_clusters: the forward pass did not reach DropCluster layers {missed}')
    return len(seen)
