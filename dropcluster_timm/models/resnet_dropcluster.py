""" ResNets with DropCluster

timm's ResNet with DropCluster (https://arxiv.org/abs/2002.02997) in the slots where timm puts
DropBlock (https://arxiv.org/abs/1810.12890): after the 3x3 conv + norm of every block of stages 3
and 4 by default, optionally also in the stem (after conv, norm and activation, before max-pooling).

The DropCluster layers exist at any rate, including 0, with grid cluster maps sized for the
configured input size, so every checkpoint carries the cluster state. The placement and cluster
settings are plain JSON model arguments (``drop_cluster_prob``, ``dc_*``) that timm records in
``config.json``, so ``create_model('hf-hub:...')`` rebuilds the same architecture.

The pretrained tags load timm's own ImageNet weights of the base ResNet (e.g.
``resnet50_dropcluster.a1_in1k`` loads ``timm/resnet50.a1_in1k``) and add grid-initialised cluster
maps: a starting point for fine-tuning with DropCluster, not DropCluster-trained weights.

Usage (timm has no plugin discovery, importing the package registers the models)::

    import timm
    import dropcluster_timm  # registers *_dropcluster with timm
    model = timm.create_model('resnet50_dropcluster.a1_in1k', pretrained=True, drop_cluster_prob=0.1)

Papers:
* `DropCluster: A structured dropout for convolutional networks` - https://arxiv.org/abs/2002.02997
* `DropBlock: A regularization method for convolutional networks` - https://arxiv.org/abs/1810.12890
* `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385
"""
import dataclasses
import math
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model, \
    resolve_pretrained_cfg
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from timm.models._input import update_model_args  # timm has no public name for it (timm >= 1.0.31)

from ..drop_cluster import DropCluster2d
from ..model_helpers import dropcluster_layers

__all__ = ['DropClusterResNet', 'checkpoint_filter_fn', 'dropcluster_model_args']

# Cluster size of each location as a DropBlock block side: timm's drop_blocks() uses 5 in stage 3
# and 3 in stage 4; the stem and stages 1-2 (no DropBlock in timm) get 7, DropBlock's default.
_BLOCK_SIZES = {0: 7, 1: 7, 2: 7, 3: 5, 4: 3}


def _norm_channels(norm: nn.Module) -> Optional[int]:
    """Channel count of a norm layer (BatchNorm's ``num_features``, GroupNorm's ``num_channels``)."""
    for attr in ('num_features', 'num_channels'):
        value = getattr(norm, attr, None)
        if isinstance(value, int):
            return value
    return None


def _drop_block_channels(block: nn.Module) -> Optional[int]:
    """Channels at a block's ``drop_block`` slot, ``None`` (learned at the first clustering) if unknown.

    timm applies it after the norm of the 3x3 conv: ``bn1`` in BasicBlock, ``bn2`` in Bottleneck,
    whose width differs from the block's (and stage's) output channels.
    """
    if isinstance(block, Bottleneck):
        return _norm_channels(block.bn2)
    if isinstance(block, BasicBlock):
        return _norm_channels(block.bn1)
    return None


class DropClusterResNet(ResNet):
    """timm ResNet with DropCluster2d layers in the DropBlock slots (and optionally the stem).

    Args (besides timm's ``ResNet`` arguments, of which ``drop_block_rate`` is refused):
        drop_cluster_prob: drop probability of every DropCluster layer, in [0, 1). The layers are
            built at 0 too; set the rate later with ``dropcluster_timm.set_drop_prob``.
        dc_stages: stages (1-4) whose blocks get DropCluster in their DropBlock slot.
        dc_stem: also put DropCluster in the stem, after conv, norm and activation, before pooling.
        dc_block_size: DropBlock-equivalent cluster side for every layer (default: 7 in the stem
            and stages 1-2, 5 in stage 3, 3 in stage 4, as timm's DropBlock).
        dc_cluster_size: target mean cluster size in elements (overrides ``dc_block_size``).
        dc_num_clusters: fixed number of clusters per map (overrides the sizes).
        dc_couple_channels: one cluster map and drop decision for all channels.
        dc_with_noise: fill dropped elements with gaussian noise.
        dc_cluster_method: clustering method of ``update_clusters``.
        img_size: nominal input size (H, W); sizes the initial grid cluster maps.
    """

    def __init__(
            self,
            block: Union[BasicBlock, Bottleneck],
            layers: Tuple[int, ...],
            drop_cluster_prob: float = 0.,
            dc_stages: Sequence[int] = (3, 4),
            dc_stem: bool = False,
            dc_block_size: Optional[int] = None,
            dc_cluster_size: Optional[int] = None,
            dc_num_clusters: Optional[int] = None,
            dc_couple_channels: bool = False,
            dc_with_noise: bool = False,
            dc_cluster_method: str = 'rena',
            img_size: Union[int, Sequence[int]] = 224,
            device=None,
            dtype=None,
            **kwargs,
    ):
        if kwargs.get('drop_block_rate'):
            raise ValueError('DropClusterResNet puts DropCluster in the DropBlock slots: use drop_cluster_prob '
                             f'instead of drop_block_rate (got drop_block_rate={kwargs["drop_block_rate"]})')
        dc_stages = tuple(int(s) for s in dc_stages)  # lists come back from config.json
        if any(s not in (1, 2, 3, 4) for s in dc_stages):
            raise ValueError(f'dc_stages must be stage numbers in 1..4, got {dc_stages}')
        if not dc_stages and not dc_stem:
            raise ValueError('no DropCluster placement: give dc_stages and/or dc_stem=True (use timm\'s resnet '
                             'for a model without DropCluster)')
        img_size = (int(img_size),) * 2 if isinstance(img_size, (int, float)) else tuple(int(s) for s in img_size)
        if len(img_size) != 2 or min(img_size) < 1:
            raise ValueError(f'img_size must be a positive int or (H, W), got {img_size}')
        super().__init__(block, layers, device=device, dtype=dtype, **kwargs)

        dc_args = dict(
            drop_cluster_prob=float(drop_cluster_prob),
            dc_stages=list(dc_stages),
            dc_stem=bool(dc_stem),
            dc_block_size=dc_block_size,
            dc_cluster_size=dc_cluster_size,
            dc_num_clusters=dc_num_clusters,
            dc_couple_channels=bool(dc_couple_channels),
            dc_with_noise=bool(dc_with_noise),
            dc_cluster_method=dc_cluster_method,
        )
        # Recorded as reconstruction arguments: timm's save_for_hf / push_to_hf_hub write them to
        # config.json even when the model was created with the defaults.
        update_model_args(self, **dc_args)

        def make_layer(location: int, num_channels: Optional[int]) -> DropCluster2d:
            reduction = self.feature_info[location]['reduction']
            # Grids are built on the CPU (clustering reads label values, impossible on 'meta') and
            # moved to the parameters' device below.
            return DropCluster2d(
                drop_prob=drop_cluster_prob,
                block_size=dc_block_size or _BLOCK_SIZES[location],
                cluster_size=dc_cluster_size,
                num_clusters=dc_num_clusters,
                couple_channels=dc_couple_channels,
                with_noise=dc_with_noise,
                cluster_method=dc_cluster_method,
                feat_size=tuple(math.ceil(s / reduction) for s in img_size),  # 'same' padded convs, pools
                num_channels=num_channels,
                device='cpu',
            )

        # The blocks call self.drop_block(x) after the norm that timm's DropBlock follows.
        for stage in dc_stages:
            for blk in getattr(self, f'layer{stage}'):
                blk.drop_block = make_layer(stage, _drop_block_channels(blk))
        if dc_stem:
            # Before the pool, after act1: feature_info / forward_intermediates keep tapping 'act1'.
            stem_layer = make_layer(0, _norm_channels(self.bn1))  # bn1 is the stem's last norm, any stem_type
            self.maxpool = nn.Sequential(OrderedDict([('drop_cluster', stem_layer), ('pool', self.maxpool)]))
        # Follow the parameters to the requested device, or a `with torch.device(...)` context.
        param_device = next(self.parameters()).device
        for _, layer in dropcluster_layers(self):
            layer.to(param_device)


def dropcluster_model_args(model: nn.Module) -> Dict[str, Any]:
    """The DropCluster model arguments of ``model`` with its current drop rate (as set by
    ``set_drop_prob`` or a schedule), for ``config.json``; empty for a model without DropCluster
    layers, whose recorded arguments timm writes as they are."""
    layers = [layer for _, layer in dropcluster_layers(model)]
    if not layers:
        return {}
    rates = sorted({layer.drop_prob for layer in layers})
    if len(rates) > 1:
        raise ValueError(f'DropCluster layers have different drop rates {rates}; config.json records one '
                         'drop_cluster_prob, set a common rate with dropcluster_timm.set_drop_prob first')
    args = dict(getattr(model, '_model_args', {}))
    dc_args = {k: v for k, v in args.items() if k == 'drop_cluster_prob' or k.startswith('dc_')}
    dc_args['drop_cluster_prob'] = rates[0]
    return dc_args


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a timm ResNet checkpoint: add the model's (grid) cluster buffers where missing.

    timm's ResNet has no checkpoint filter of its own. Our own checkpoints carry their cluster maps,
    which are kept (the layers adopt their shapes). A stem DropCluster moves a stem pool that has
    parameters (``replace_stem_pool``, ``aa_layer``) from ``maxpool.*`` to ``maxpool.pool.*``.
    """
    state_dict = dict(state_dict)
    model_keys = model.state_dict(keep_vars=True)
    for k in list(state_dict):
        if k.startswith('maxpool.') and k not in model_keys and 'maxpool.pool.' + k[8:] in model_keys:
            state_dict['maxpool.pool.' + k[8:]] = state_dict.pop(k)
    for name, layer in dropcluster_layers(model):
        prefix = name + '.' if name else ''
        for buffer_name in ('cluster_map', 'cluster_counts'):
            state_dict.setdefault(prefix + buffer_name, getattr(layer, buffer_name).detach().cpu())
    return state_dict


def _create_resnet_dropcluster(variant: str, pretrained: bool = False, **kwargs) -> DropClusterResNet:
    if kwargs.get('img_size') is None:
        # Size the grid maps for the input size of the weights' config (e.g. 160 for *.a3_in1k).
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        kwargs['img_size'] = tuple((cfg.input_size or (3, 224, 224))[-2:])
    return build_model_with_cfg(
        DropClusterResNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _timm_cfg(base_model_tag: str, **kwargs) -> Dict[str, Any]:
    """The pretrained cfg of a timm ResNet weight, read from timm's registry (so it exists)."""
    cfg = get_pretrained_cfg(base_model_tag)
    if cfg is None or not cfg.hf_hub_id:
        raise RuntimeError(f'timm has no Hub weights {base_model_tag}')
    cfg = dataclasses.replace(cfg, architecture=None, tag=None, **kwargs)
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


_BASE_TAGS = {
    'resnet18': ('a1_in1k', 'a2_in1k', 'a3_in1k', 'tv_in1k'),
    'resnet34': ('a1_in1k', 'a2_in1k', 'a3_in1k', 'tv_in1k'),
    'resnet50': ('a1_in1k', 'a2_in1k', 'a3_in1k', 'tv_in1k'),
    'resnet101': ('a1_in1k', 'a2_in1k', 'a3_in1k', 'tv_in1k'),
    'resnet152': ('a1_in1k', 'a2_in1k', 'a3_in1k', 'tv_in1k'),
    'resnet50d': ('a1_in1k', 'a2_in1k', 'a3_in1k', 'ra2_in1k'),
}

# Only timm's published ImageNet weights of the base ResNets (hf_hub_id 'timm/<base>.<tag>'),
# no DropCluster-trained weights yet. The first tag of each model is its default.
default_cfgs = generate_default_cfgs({
    f'{base}_dropcluster.{tag}': _timm_cfg(
        f'{base}.{tag}', notes=(f'timm {base}.{tag} ImageNet weights with grid-initialised DropCluster maps',))
    for base, tags in _BASE_TAGS.items() for tag in tags
})


@register_model
def resnet18_dropcluster(pretrained: bool = False, **kwargs) -> DropClusterResNet:
    """Constructs a ResNet-18 with DropCluster."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_resnet_dropcluster('resnet18_dropcluster', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet34_dropcluster(pretrained: bool = False, **kwargs) -> DropClusterResNet:
    """Constructs a ResNet-34 with DropCluster."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3))
    return _create_resnet_dropcluster('resnet34_dropcluster', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_dropcluster(pretrained: bool = False, **kwargs) -> DropClusterResNet:
    """Constructs a ResNet-50 with DropCluster."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_resnet_dropcluster('resnet50_dropcluster', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_dropcluster(pretrained: bool = False, **kwargs) -> DropClusterResNet:
    """Constructs a ResNet-101 with DropCluster."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3))
    return _create_resnet_dropcluster('resnet101_dropcluster', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet152_dropcluster(pretrained: bool = False, **kwargs) -> DropClusterResNet:
    """Constructs a ResNet-152 with DropCluster."""
    model_args = dict(block=Bottleneck, layers=(3, 8, 36, 3))
    return _create_resnet_dropcluster('resnet152_dropcluster', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50d_dropcluster(pretrained: bool = False, **kwargs) -> DropClusterResNet:
    """Constructs a ResNet-50-D (deep stem, avg-pool downsample) with DropCluster."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), stem_width=32, stem_type='deep', avg_down=True)
    return _create_resnet_dropcluster('resnet50d_dropcluster', pretrained, **dict(model_args, **kwargs))
