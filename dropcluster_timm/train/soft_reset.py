""" Soft resets, after "Breaking the Reclustering Barrier" (BRB): pull weights part of the way back to a
fresh initialisation and forget their optimizer state, so training (and the clusters re-computed right
after) can leave the plateau it settled in.

    w <- factor * w + (1 - factor) * w_fresh

``w_fresh`` is the model's own initialisation (timm's, from the architecture and its recorded
arguments), drawn from a seed, so every process of a distributed run computes the same one.
"""
import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ['fresh_parameters', 'soft_reset']


def _scoped(model: nn.Module, scope: Optional[Sequence[str]]) -> Dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    if not scope:
        return params
    picked = {n: p for n, p in params.items() if any(n == s or n.startswith(s + '.') for s in scope)}
    missing = [s for s in scope if not any(n == s or n.startswith(s + '.') for n in params)]
    if missing:
        raise ValueError(f'soft reset scope {missing} names no parameters of the model (e.g. "layer4", "fc")')
    return picked


@torch.no_grad()
def fresh_parameters(model: nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """The parameters ``model`` would have freshly initialised, from ``seed`` (on the CPU, then on each
    parameter's device and dtype).

    A timm model is built again from its architecture and recorded arguments; any other module is
    copied and every submodule's ``reset_parameters`` called.
    """
    import timm
    from timm.models import get_model_args
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch and timm.is_model(arch):
            fresh = timm.create_model(arch, pretrained=False, **get_model_args(model))
        else:
            fresh = copy.deepcopy(model).cpu()
            for module in fresh.modules():
                if hasattr(module, 'reset_parameters'):
                    module.reset_parameters()
    ref = dict(model.named_parameters())
    return {n: p.detach().to(device=ref[n].device, dtype=ref[n].dtype) for n, p in fresh.named_parameters() if n in ref}


@torch.no_grad()
def soft_reset(
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        factor: float = 0.9,
        scope: Optional[Sequence[str]] = None,
        seed: int = 0,
) -> List[str]:
    """Interpolate the parameters of ``scope`` (name prefixes; all when empty) toward a fresh
    initialisation, keeping ``factor`` of the current weights, and clear their optimizer state
    (momentum, Adam moments, step counts). Returns the names of the parameters reset.

    Re-cluster the DropCluster layers right after (``update_clusters``): their activations changed.
    """
    if not 0.0 <= factor < 1.0:
        raise ValueError(f'soft reset factor must be in [0, 1) (the share of the weights kept), got {factor}')
    params = _scoped(model, scope)
    fresh = fresh_parameters(model, seed)
    for name, p in params.items():
        p.mul_(factor).add_(fresh[name], alpha=1.0 - factor)
    if optimizer is not None:
        inner = getattr(optimizer, 'optimizer', optimizer)  # Accelerate's wrapper holds the optimizer
        for p in params.values():
            inner.state.pop(p, None)
    return list(params)
