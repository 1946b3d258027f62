""" Channel pruning of ResNet-style timm models: remove the channels an EDropout state (or a
magnitude criterion) turns off, giving a smaller plain timm model.

The pruned channels are the inner channels of each block, where the block's ``drop_block`` slot sits:
the output of ``conv1`` / ``bn1`` and input of ``conv2`` in a basic block, the output of ``conv2`` /
``bn2`` and input of ``conv3`` in a bottleneck. A zeroed channel there contributes nothing to the
next conv (the activation maps 0 to 0), so removing it leaves the eval-mode outputs unchanged.

The smaller architecture is rebuilt with timm's own ``adapt_model_from_string`` (what timm's
``*_pruned`` models use), from the base architecture and ``block_widths`` (``{'layer1.0': 37, ...}``);
``<base>_slim`` (``dropcluster_timm.edropout.resnet_slim``) registers it, so the folder that
``hub.save_pretrained`` writes loads with ``timm.create_model('hf-hub:...')`` after ``import dropcluster_timm``.
"""
import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import is_model
from torch import Tensor

from .layers import EDropout2d, edropout_layers
from ..models.names import SLIM_SUFFIX
from ..timm_compat import adapt_model_from_string, recorded_model_args, update_model_args

__all__ = ['SLIM_SUFFIX', 'block_parts', 'prunable_blocks', 'set_block_widths', 'edropout_keep', 'magnitude_keep',
           'prune_channels', 'slim_architecture']


def block_parts(block: nn.Module) -> Tuple[nn.Conv2d, nn.BatchNorm2d, nn.Conv2d]:
    """(producer conv, its norm, consumer conv) of the inner channels of a timm ResNet block."""
    if hasattr(block, 'conv3'):
        return block.conv2, block.bn2, block.conv3
    return block.conv1, block.bn1, block.conv2


def prunable_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, block) of every block of ``layer1`` .. ``layer4``; a clear error for models whose
    structure this pruning (and timm's ``adapt_model_from_string``) cannot rebuild."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            raise ValueError(f'{name} is a grouped conv: channel pruning supports ResNets without grouped convs '
                             "(timm's adapt_model_from_string rebuilds grouped convs as depthwise)")
        if isinstance(m, nn.modules.batchnorm._NormBase) and not isinstance(m, nn.BatchNorm2d):
            raise ValueError(f'{name} is a {type(m).__name__}: channel pruning supports BatchNorm2d models')
    blocks = []
    for stage in (1, 2, 3, 4):
        for i, block in enumerate(getattr(model, f'layer{stage}', ())):
            parts = block_parts(block) if hasattr(block, 'conv2') else None
            if parts is None or not isinstance(parts[1], nn.BatchNorm2d):
                raise ValueError(f'layer{stage}.{i} ({type(block).__name__}) is not a timm ResNet basic or '
                                 'bottleneck block')
            if not isinstance(getattr(block, 'aa', nn.Identity()), (nn.Identity, nn.AvgPool2d)):
                raise ValueError(f'layer{stage}.{i} has an anti-aliasing layer with per-channel state '
                                 f'({type(block.aa).__name__}): not supported')
            blocks.append((f'layer{stage}.{i}', block))
    if not blocks:
        raise ValueError(f'{type(model).__name__} has no layer1..layer4 blocks to prune')
    return blocks


def _shape_spec(model: nn.Module, block_widths: Dict[str, int]) -> str:
    """timm's pruned-model string: the weight shape of every conv, norm and linear layer."""
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            shapes[name] = list(m.weight.shape)
    blocks = dict(prunable_blocks(model))
    unknown = sorted(set(block_widths) - set(blocks))
    if unknown:
        raise ValueError(f'block_widths names blocks the model does not have: {unknown}')
    names = {id(m): n for n, m in model.named_modules()}
    for block_name, width in block_widths.items():
        producer, norm, consumer = block_parts(blocks[block_name])
        if not 1 <= int(width) <= producer.out_channels:
            raise ValueError(f'block_widths[{block_name!r}] must be in 1..{producer.out_channels}, got {width}')
        shapes[names[id(producer)]][0] = int(width)
        shapes[names[id(norm)]][0] = int(width)
        shapes[names[id(consumer)]][1] = int(width)
    return '***'.join(f'{n}.weight:[{", ".join(str(d) for d in s)}]' for n, s in shapes.items())


def set_block_widths(model: nn.Module, block_widths: Dict[str, int]) -> nn.Module:
    """A copy of ``model`` whose blocks have the inner widths ``block_widths`` (fresh weights in the
    rebuilt layers), built by timm's ``adapt_model_from_string``; the train/eval mode is kept."""
    training = model.training
    slim = adapt_model_from_string(model, _shape_spec(model, block_widths))  # sets both to eval mode
    model.train(training)
    slim.train(training)
    return slim


def edropout_keep(model: nn.Module) -> Dict[str, Tensor]:
    """``{block name: keep state}`` of the blocks whose slot holds an EDropout layer."""
    keep = {}
    for name, layer in edropout_layers(model):
        if not isinstance(layer, EDropout2d):
            continue  # per-cluster EDropout prunes nothing
        if not name.endswith('.drop_block'):
            raise ValueError(f'EDropout layer {name} is not in a drop_block slot')
        keep[name[:-len('.drop_block')]] = layer.keep_state.detach().cpu().clone()
    if not keep:
        raise ValueError('the model has no per-channel EDropout layers (see dropcluster_timm.add_edropout)')
    return keep


def magnitude_keep(model: nn.Module, block_widths: Dict[str, int]) -> Dict[str, Tensor]:
    """Magnitude pruning (Li et al. 2017, https://arxiv.org/abs/1608.08710): in each block of
    ``block_widths`` keep the channels whose producing filters have the largest L1 norms."""
    blocks = dict(prunable_blocks(model))
    keep = {}
    for name, width in block_widths.items():
        if name not in blocks:
            raise ValueError(f'block_widths names a block the model does not have: {name!r}')
        producer = block_parts(blocks[name])[0]
        norms = producer.weight.detach().abs().flatten(1).sum(1).cpu()
        if not 1 <= int(width) <= norms.numel():
            raise ValueError(f'block_widths[{name!r}] must be in 1..{norms.numel()}, got {width}')
        mask = torch.zeros(norms.numel(), dtype=torch.bool)
        mask[norms.topk(int(width)).indices] = True
        keep[name] = mask
    return keep


def slim_architecture(architecture: str) -> str:
    """The registered ``<base>_slim`` architecture of a model of ``architecture``."""
    base = architecture.split('.')[0]
    base = base[:-len(SLIM_SUFFIX)] if base.endswith(SLIM_SUFFIX) else base
    return base + SLIM_SUFFIX


@torch.no_grad()
def prune_channels(model: nn.Module, keep: Optional[Dict[str, Tensor]] = None) -> nn.Module:
    """A smaller plain copy of ``model`` without the channels ``keep`` turns off (default: the
    states of its EDropout layers), and without EDropout layers: same eval-mode outputs, fewer
    parameters and MACs. ``model`` is left as it is.

    A model from ``timm.create_model`` becomes ``<base>_slim`` with ``block_widths`` recorded, which
    ``hub.save_pretrained`` writes as a loadable folder; a model built otherwise is pruned in memory only.
    """
    keep = edropout_keep(model) if keep is None else {k: torch.as_tensor(v).bool().cpu() for k, v in keep.items()}
    plain = copy.deepcopy(model)
    for name, _ in [(n, m) for n, m in edropout_layers(plain) if isinstance(m, EDropout2d)]:
        parent, _, attr = name.rpartition('.')
        setattr(plain.get_submodule(parent) if parent else plain, attr, nn.Identity())
    blocks = dict(prunable_blocks(plain))
    architecture = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    slim_name = slim_architecture(architecture) if architecture else None
    if slim_name and not is_model(slim_name):
        raise ValueError(f'{architecture} has no registered {slim_name} architecture to save the pruned model as '
                         '(channel pruning covers the timm ResNets of dropcluster_timm.edropout.resnet_slim)')
    for name, mask in keep.items():
        if name not in blocks:
            raise ValueError(f'keep names a block the model does not have: {name!r}')
        if mask.numel() != block_parts(blocks[name])[0].out_channels or not mask.any():
            raise ValueError(f'keep[{name!r}] must be a non-empty state over the block\'s '
                             f'{block_parts(blocks[name])[0].out_channels} channels')
    widths = dict(recorded_model_args(plain).get('block_widths') or {})
    widths.update({name: int(mask.sum()) for name, mask in keep.items()})
    slim = set_block_widths(plain, {name: int(mask.sum()) for name, mask in keep.items()})
    names = {id(m): n for n, m in plain.named_modules()}
    state = plain.state_dict()
    for name, mask in keep.items():
        index = mask.nonzero().flatten()
        producer, norm, consumer = (names[id(m)] for m in block_parts(blocks[name]))
        for key in list(state):
            prefix, _, leaf = key.rpartition('.')
            if prefix in (producer, norm) and leaf != 'num_batches_tracked':
                state[key] = state[key].index_select(0, index.to(state[key].device))
            elif prefix == consumer and leaf == 'weight':
                state[key] = state[key].index_select(1, index.to(state[key].device))
    slim.load_state_dict(state)
    if slim_name:
        update_model_args(slim, block_widths=widths)
        slim.pretrained_cfg = dict(model.pretrained_cfg, architecture=slim_name)
        slim.default_cfg = slim.pretrained_cfg
    return slim
