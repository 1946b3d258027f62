""" Model statistics for the cards, measured, not typed in (``model_stats``; ``format_stat`` prints them):

  * Params (M): parameters of the model, classifier included.
  * GMACs: multiply-accumulates of one forward at the card's image size, counted with
    ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2; convolutions, matmuls, as fvcore
    counts them). The model runs on the 'meta' device, so no memory or compute is spent.
  * Activations (M): output elements of every convolution and linear layer, fvcore's activation
    count that timm's cards use.
"""
import math
from typing import Any, Dict, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from timm.models import get_model_input_config
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['model_stats', 'format_stat']


@torch.no_grad()
def model_stats(
        model_name: str,
        img_size: Optional[Union[int, Sequence[int]]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> Dict[str, Any]:
    """Params (M), GMACs and Activations (M) of ``model_name`` for one image (see module docstring).

    Args:
        model_name: any timm classification architecture (optionally ``arch.tag``).
        img_size: input size of the count; None: the model's own input size (its ``img_size``
            argument where it has one, else its pretrained config's).
        model_args: arguments the model is built with, e.g. config.json's ``model_args``.
        **kwargs: more model arguments (override ``model_args``).
    """
    model = timm.create_model(model_name, pretrained=False, device='meta', **{**(model_args or {}), **kwargs}).eval()
    if img_size is None:
        img_size = get_model_input_config(model)['input_size'][-2:]
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    x = torch.empty((1, model.in_chans, *size), device='meta')
    activations = []

    def count(module, args, output):
        activations.append(output.numel())

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {
        'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
        'gmacs': counter.get_total_flops() / 2 / 1e9,
        'activations_m': sum(activations) / 1e6,
        'img_size': size,
    }


def format_stat(value: float) -> str:
    """A model statistic for the card: one decimal from 10 up, three significant digits below (so the
    GMACs of a small model at a small image size do not print as 0.0)."""
    if value >= 10:
        return f'{value:.1f}'
    if value <= 0:
        return '0'
    return f'{value:.{max(2 - math.floor(math.log10(value)), 0)}f}'


# The keys of a results table file (see ``load_results_table``): required, then optional.
