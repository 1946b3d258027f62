""" ResNet-family models with DropCluster

timm's ResNet class (the ResNets of ``resnet.py``: ResNet, ResNet-D, ResNeXt, SE- and ECA-ResNets,
wide ResNets, ResNet-RS, ...; ResNeSt; SKNet; Res2Net) with DropCluster
(https://arxiv.org/abs/2002.02997) in the slots where timm puts DropBlock
(https://arxiv.org/abs/1810.12890): after the 3x3 conv + norm of every block of stages 3 and 4 by
default. ``dc_stages`` moves them to other stages (1-4) of blocks that have a ``drop_block`` slot, and
``dc_stem=True`` also puts one in the stem (after conv, norm and activation, before max-pooling).

The layers exist at any rate, 0 included, with grid cluster maps sized for the input size, so every
checkpoint carries the cluster state. The placement and cluster settings are JSON model arguments
(``drop_cluster_rate``, ``dc_*``) recorded in ``config.json``, so ``create_model('hf-hub:...')``
rebuilds the same model. Pretrained tags load timm's weights of the base (e.g.
``resnet50_dropcluster.a1_in1k`` loads ``timm/resnet50.a1_in1k``) with grid-initialised maps.

Usage (timm has no plugin discovery: importing the package registers the models)::

    import timm
    import dropcluster_timm  # registers *_dropcluster with timm
    model = timm.create_model('resnet50_dropcluster.a1_in1k', pretrained=True, drop_cluster_rate=0.1)

Papers:
* `DropCluster: A structured dropout for convolutional networks` - https://arxiv.org/abs/2002.02997
* `DropBlock: A regularization method for convolutional networks` - https://arxiv.org/abs/1810.12890
* `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385
"""
from collections import OrderedDict
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from .convert import probe_input_shapes, slot_channels, slot_feat_size
from ..layers.drop_cluster_modules import DropCluster2d
from .variants import ModelFamily, load_architectures, register_family

__all__ = ['FAMILY', 'checkpoint_filter_fn']

# DropBlock-equivalent cluster side of each location: timm's drop_blocks() uses 5 in stage 3 and 3 in
# stage 4; the stem and stages 1-2 (no timm slots) use 7, DropBlock's default.
_BLOCK_SIZES = {0: 7, 1: 7, 2: 7, 3: 5, 4: 3}


def _place(model: nn.Module, img_size: Tuple[int, int], layer_args: Dict[str, Any],
           family_args: Dict[str, Any]) -> Dict[str, Any]:
    """DropCluster in the ``drop_block`` slots of the blocks of ``dc_stages`` (none elsewhere), and
    before the stem pool with ``dc_stem``."""
    stages = tuple(int(s) for s in family_args['dc_stages'])  # lists come back from config.json
    stem = bool(family_args['dc_stem'])
    if any(s not in (1, 2, 3, 4) for s in stages):
        raise ValueError(f'dc_stages must be stage numbers in 1..4, got {stages}')
    if not stages and not stem:
        raise ValueError("no DropCluster placement: give dc_stages and/or dc_stem=True (use timm's model "
                         'for one without DropCluster)')
    param_device = next(model.parameters()).device
    points = ['maxpool'] + [f'layer{s}.{i}.drop_block' for s in stages for i in range(len(getattr(model, f'layer{s}')))]
    shapes = probe_input_shapes(model, points, img_size)

    def make_layer(location: int, name: str, num_channels) -> DropCluster2d:
        args = dict(dict(block_size=_BLOCK_SIZES[location]), **layer_args)
        feat_size = shapes[name][1:] if name in shapes else slot_feat_size(model, name, img_size)
        layer = DropCluster2d(**args, feat_size=feat_size, num_channels=num_channels, device='cpu')
        return layer.to(param_device)

    for stage in (1, 2, 3, 4):
        for i, block in enumerate(getattr(model, f'layer{stage}')):
            # timm's slots: the block's drop_block, or inside its conv-norm layers (SKNet)
            slots = [n for n, m in block.named_modules() if isinstance(m, DropCluster2d)]
            if stage not in stages:
                for n in slots:
                    parent, _, attr = n.rpartition('.')
                    setattr(block.get_submodule(parent) if parent else block, attr, nn.Identity())
            elif not slots:
                if not hasattr(block, 'drop_block'):
                    raise ValueError(f'dc_stages: the blocks of stage {stage} ({type(block).__name__}) have no '
                                     'drop_block slot')
                name = f'layer{stage}.{i}.drop_block'
                block.drop_block = make_layer(stage, name, slot_channels(model, name))
    if stem:
        # Before the pool, after act1: feature_info / forward_intermediates keep tapping 'act1'.
        stem_layer = make_layer(0, 'maxpool', getattr(model.bn1, 'num_features', None))  # the stem's last norm
        model.maxpool = nn.Sequential(OrderedDict([('drop_cluster', stem_layer), ('pool', model.maxpool)]))
    return dict(dc_stages=list(stages), dc_stem=stem)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A stem DropCluster moves a stem pool that has parameters (``replace_stem_pool``, ``aa_layer``)
    from ``maxpool.*`` to ``maxpool.pool.*``."""
    model_keys = model.state_dict(keep_vars=True)
    for k in list(state_dict):
        if k.startswith('maxpool.') and k not in model_keys and 'maxpool.pool.' + k[8:] in model_keys:
            state_dict['maxpool.pool.' + k[8:]] = state_dict.pop(k)
    return state_dict


def _plain_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The base ResNet's keys: a stem DropCluster's ``maxpool.pool.*`` back to ``maxpool.*``."""
    return {'maxpool.' + k[len('maxpool.pool.'):] if k.startswith('maxpool.pool.') else k: v
            for k, v in state_dict.items()}


def _placement(model_args: Dict[str, Any]) -> str:
    return ('stages ' + ', '.join(str(s) for s in model_args.get('dc_stages', (3, 4)))
            + ' (every block, in the DropBlock slot)'
            + ('; stem (after conv, norm and activation, before max-pooling)' if model_args.get('dc_stem') else ''))


FAMILY = ModelFamily(
    module='resnet_dropcluster',
    timm_modules=('resnet', 'resnest', 'sknet', 'res2net'),
    filter_fn=checkpoint_filter_fn,
    place=_place,
    family_args=dict(dc_stages=(3, 4), dc_stem=False),
    placement=_placement,
    plain_state_fn=_plain_state,
)

register_family(FAMILY, __name__, load_architectures()[FAMILY.module])
