""" DropCluster in place of timm's DropBlock: ``convert_drop_blocks``, in the style of timm's
``convert_sync_batchnorm``.

timm puts ``DropBlock2d`` layers into a model built with ``drop_block_rate`` (the ResNet family,
ResNeSt, SKNet, Res2Net, and the ByobNet family: GERNet, RegNetZ, ResNet-*ts, MobileViT, ...).
``convert_drop_blocks`` replaces each with a ``DropCluster2d`` of the same block size in the same
place, so any such model gets DropCluster without a model file of its own.
"""
import itertools
import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropBlock2d
from timm.models import get_model_input_config

from ..layers.drop_cluster_modules import DropCluster2d

__all__ = ['convert_drop_blocks', 'drop_cluster_from_drop_block', 'probe_input_shapes', 'slot_channels', 'slot_feat_size']


def _num_features(module: nn.Module) -> Optional[int]:
    """Channel count of a norm layer (BatchNorm's ``num_features``, GroupNorm's ``num_channels``)."""
    for attr in ('num_features', 'num_channels'):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def slot_channels(model: nn.Module, name: str) -> Optional[int]:
    """Channels of the activations at the slot ``name`` (a dotted module path), or ``None``.

    timm applies DropBlock right after a norm: inside the norm-act layer itself (``BatchNormAct2d.drop``
    in the ByobNet family), or as the block child registered after it (``bn1`` then ``drop_block`` in
    ResNet's BasicBlock, ``bn2`` in its Bottleneck). ``None`` leaves it to the first clustering.
    """
    parent_name, _, attr = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    own = _num_features(parent)
    if own is not None:
        return own
    previous = None
    for child_name, child in parent.named_children():
        if child_name == attr:
            return previous
        channels = _num_features(child)
        if channels is not None:
            previous = channels
    return None


def slot_feat_size(model: nn.Module, name: str, img_size: Union[int, Sequence[int]]) -> Optional[Tuple[int, int]]:
    """Spatial size at the slot ``name`` for ``img_size`` inputs, from the model's ``feature_info``:
    the reduction of the deepest feature module that contains the slot (``layer3`` for
    ``layer3.0.drop_block``). ``None`` where the model has no such entry."""
    size = _size(img_size)
    best = None
    for info in getattr(model, 'feature_info', None) or []:
        module = info.get('module', '') if isinstance(info, dict) else ''
        if module and (name == module or name.startswith(module + '.')):
            if best is None or len(module) > len(best['module']):
                best = info
    if best is None:
        return None
    return tuple(math.ceil(s / best['reduction']) for s in size)


def _size(img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (int(img_size),) * 2 if isinstance(img_size, (int, float)) else tuple(int(s) for s in img_size)


@torch.no_grad()
def probe_input_shapes(model: nn.Module, names: Iterable[str], img_size: Union[int, Sequence[int]]) -> Dict[str, Tuple[int, ...]]:
    """The input shape ``(C, *spatial)`` of each module ``names`` for one ``img_size`` image, from an
    eval-mode forward on the 'meta' device (``torch.func.functional_call`` with meta copies of the
    parameters and buffers): no memory, no compute. Empty if the model cannot run on 'meta'."""
    names = set(names)
    shapes = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape[1:]))
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if n in names]
    tensors = {n: torch.empty_like(t, device='meta')
               for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    in_chans = get_model_input_config(model)['input_size'][0] if hasattr(model, 'pretrained_cfg') else 3
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        torch.func.functional_call(model, tensors, (torch.empty((1, in_chans, *_size(img_size)), device='meta'),))
    except Exception:  # an op without a meta kernel, or a tensor kept outside the buffers
        shapes = {}
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return shapes


def drop_cluster_from_drop_block(block: DropBlock2d, **dropcluster_args: Any) -> DropCluster2d:
    """A ``DropCluster2d`` standing in for ``block``: its rate, block size (the cluster size),
    ``gamma_scale``, noise, in-place and scaling settings; ``dropcluster_args`` override them.

    Channels are not coupled unless asked (DropCluster's reference uses one map per channel; timm's
    DropBlock2d defaults to ``couple_channels=True``).
    """
    args = dict(drop_prob=block.drop_prob, block_size=block.block_size, gamma_scale=block.gamma_scale,
                with_noise=block.with_noise, inplace=block.inplace, scale_by_keep=block.scale_by_keep)
    args.update(dropcluster_args)
    return DropCluster2d(**args)


def convert_drop_blocks(
        model: nn.Module,
        img_size: Optional[Union[int, Sequence[int]]] = None,
        allow_none: bool = False,
        **dropcluster_args: Any,
) -> nn.Module:
    """Replace every timm ``DropBlock2d`` of ``model`` by an equivalent ``DropCluster2d`` in its place.

    Args:
        model: a model with DropBlock layers (e.g. ``timm.create_model('resnet50', drop_block_rate=0.1)``),
            or a ``DropBlock2d`` itself.
        img_size: the nominal input size; with it every layer gets its grid cluster map now (sized by
            a shape-only forward on the 'meta' device, else by the model's ``feature_info``), so
            checkpoints carry the cluster state from the start; without it the maps stay empty
            until the first clustering (a grid is made on the fly).
        allow_none: return a model without DropBlock layers unchanged instead of raising.
        **dropcluster_args: ``DropCluster2d`` arguments for every layer (``drop_prob``,
            ``cluster_size``, ``num_clusters``, ``couple_channels``, ``cluster_method``, ...).

    Returns:
        ``model`` with its layers replaced (a new layer if ``model`` is a ``DropBlock2d``).
    """
    if isinstance(model, DropBlock2d):
        return drop_cluster_from_drop_block(model, **dropcluster_args)
    slots = [name for name, module in model.named_modules() if isinstance(module, DropBlock2d)]
    if not slots and not allow_none:
        raise ValueError(f'{type(model).__name__} has no timm DropBlock2d layers to convert: build it with '
                         "drop_block_rate > 0 (e.g. timm.create_model('resnet50', drop_block_rate=0.1)); "
                         'architectures without DropBlock slots (ConvNeXt, EfficientNet, ...) cannot be converted')
    shapes = probe_input_shapes(model, slots, img_size) if img_size is not None and slots else {}
    param = next(model.parameters(), None)
    for name in slots:
        block = model.get_submodule(name)
        args = dict(num_channels=slot_channels(model, name), device='cpu')
        if name in shapes:
            args.update(num_channels=shapes[name][0], feat_size=shapes[name][1:])
        elif img_size is not None:
            args['feat_size'] = slot_feat_size(model, name, img_size)
        args.update(dropcluster_args)
        # Grids are built on the CPU (clustering reads label values, impossible on 'meta'), then
        # follow the parameters.
        layer = drop_cluster_from_drop_block(block, **args)
        if param is not None:
            layer.to(param.device)
        parent_name, _, attr = name.rpartition('.')
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    return model
