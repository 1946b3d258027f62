""" Channel-pruned ResNets: ``<base>_slim``

timm's ResNet (``resnet.py``, without grouped convs) with the inner width of each block set by
``block_widths`` (``{'layer1.0': 37, ...}``; blocks not named keep theirs): what
``dropcluster_timm.edropout.prune.prune_channels`` makes of an EDropout-trained model
(https://arxiv.org/abs/2006.04270) or of magnitude pruning. A plain model of timm's own classes,
rebuilt by timm's ``adapt_model_from_string``; ``block_widths`` is recorded in ``config.json``, so
a saved folder loads with::

    import timm
    import dropcluster_timm.edropout  # registers *_slim with timm
    model = timm.create_model('hf-hub:<user>/<repo>', pretrained=True)

No ``*_slim`` weights are published by this package: these names have no pretrained tags.
"""
import sys
from typing import Callable, Dict, Optional

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, list_models, model_entrypoint, register_model

from .prune import SLIM_SUFFIX, set_block_widths
from ..timm_compat import update_model_args
from ..models.variants import input_cfg

__all__ = ['slim_bases']


def _create_slim(variant: str, base: str, pretrained: bool = False,
                 block_widths: Optional[Dict[str, int]] = None, **kwargs) -> nn.Module:
    widths = {str(k): int(v) for k, v in (block_widths or {}).items()}

    def build(**model_kwargs) -> nn.Module:
        model = model_entrypoint(base)(pretrained=False, **model_kwargs)
        if widths:
            model = set_block_widths(model, widths)
        update_model_args(model, block_widths=widths)
        return model

    return build_model_with_cfg(build, variant, pretrained, **kwargs)


def _entrypoint(variant: str, base: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create_slim(variant, base, pretrained, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'timm {base} with per-block inner widths (block_widths), e.g. after channel pruning.'
    return entrypoint


# Name parts of resnet.py architectures channel pruning refuses: grouped convs (ResNeXt), anti-aliasing
# layers with per-channel state (blur pool, 'aa'), GroupNorm; SENet-154 is a grouped-conv ResNet too.
_UNPRUNABLE = ('resnext', 'senet154', 'blur', 'resnetaa', 'seresnetaa', '_gn')


def slim_bases() -> list:
    """The timm ResNets that get a ``*_slim`` variant: the ``resnet.py`` architectures channel pruning
    can rebuild (by name: no ResNeXt, anti-aliased or GroupNorm variants), not already pruned."""
    return [name for name in list_models(module='resnet')
            if not name.endswith(('_pruned', SLIM_SUFFIX)) and not any(part in name for part in _UNPRUNABLE)]


_bases = slim_bases()
default_cfgs = generate_default_cfgs({base + SLIM_SUFFIX: input_cfg(base) for base in _bases})
for _base in _bases:
    setattr(sys.modules[__name__], _base + SLIM_SUFFIX, register_model(_entrypoint(_base + SLIM_SUFFIX, _base)))
