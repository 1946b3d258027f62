""" The study's five arms: one small CIFAR network, one recipe; only the regulariser differs.

    none              no regulariser
    cutout            the positive control: one 8 px Cutout square per training image
    dropblock         timm's DropBlock2d in the drop slots, per channel, its drop_prob calibrated so
                      that the measured dropped fraction equals the target rate (blocks overlap and
                      are clipped at the border, so DropBlock's gamma formula alone drops less)
    dropcluster       DropCluster2d in the same slots with learned clusters (the layer's default method)
    dropcluster_grid  the same layers with a fixed grid partition of the same cluster count: the
                      control that isolates "learned"

The network: timm's ResNet with a CIFAR stem (one 3x3 stride-1 conv, no max-pool), so the drop slots
(the stem and the blocks of ``drop_stages``) see 32x32 and 16x16 maps. Blocks and clusters are
``block_size`` on a side (16 elements at 4): a 16x16 map holds 16 clusters, a 32x32 map 64, so
learned and grid partitions can differ.
"""
from collections import OrderedDict
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.layers import DropBlock2d

import timm
from dropcluster_timm import dropcluster_layers, set_drop_prob  # (the import registers resnet18_dropcluster)
from dropcluster_timm.layers.drop_cluster_modules import DropClusterNd

from .streams import purpose_seed

__all__ = ['ARMS', 'DROP_ARMS', 'CLUSTER_ARMS', 'build_model', 'set_rate', 'calibrate_dropblock',
           'measure_dropped_fraction']

ARMS = ('none', 'cutout', 'dropblock', 'dropcluster', 'dropcluster_grid')
DROP_ARMS = ('dropblock', 'dropcluster', 'dropcluster_grid')
CLUSTER_ARMS = ('dropcluster', 'dropcluster_grid')


def build_model(arm: str, cfg: Dict, seed: int) -> nn.Module:
    """The arm's network at rate 0 (the recipe ramps it), initial weights from the ``init`` stream
    of ``seed``: identical in every arm of a seed. ``cfg``: layers, channels, drop_stages, block_size, img_size."""
    if arm not in ARMS:
        raise ValueError(f'unknown arm {arm!r}, expected one of {ARMS}')
    width = cfg['channels'][0]
    # stem_type 'deep' makes the stem end in `width` channels; its convs are replaced below.
    kwargs = dict(num_classes=10, layers=tuple(cfg['layers']), channels=tuple(cfg['channels']), stem_type='deep',
                  stem_width=width // 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(purpose_seed(seed, 'init'))
        if arm in CLUSTER_ARMS:
            method = dict(dc_cluster_method='grid') if arm == 'dropcluster_grid' else {}
            model = timm.create_model('resnet18_dropcluster', drop_cluster_rate=0.0, dc_stem=True,
                                      dc_stages=tuple(cfg['drop_stages']), dc_block_size=cfg['block_size'],
                                      dc_recluster_every=0, dc_ramp_steps=0,  # the recipe drives the layers
                                      **method, **kwargs)
        else:
            model = timm.create_model('resnet18', **kwargs)
        model.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode='fan_out', nonlinearity='relu')  # as timm's ResNet
    if arm in CLUSTER_ARMS:
        model.maxpool.pool = nn.Identity()
        _grid_maps(model, cfg['img_size'])
    elif arm == 'dropblock':
        feats = _slot_sizes(model, cfg)
        model.maxpool = nn.Sequential(OrderedDict([('drop_block', _matched_dropblock(cfg['block_size'], feats[0])),
                                                   ('pool', nn.Identity())]))
        for stage in cfg['drop_stages']:
            for block in getattr(model, f'layer{stage}'):
                block.drop_block = _matched_dropblock(cfg['block_size'], feats[stage])
    else:
        model.maxpool = nn.Identity()
    return model


@torch.no_grad()
def _grid_maps(model: nn.Module, img_size: int) -> None:
    """Grid maps sized for the CIFAR stem (the model was built with timm's stride-4 stem)."""
    def hook(layer, args):
        layer.set_cluster_map(layer.grid_map(list(args[0].shape[2:]), layer.cluster_map.device))

    handles = [layer.register_forward_pre_hook(hook) for _, layer in dropcluster_layers(model)]
    try:
        model.eval()(torch.zeros(1, 3, img_size, img_size))
    finally:
        for h in handles:
            h.remove()
        model.train()


def _slot_sizes(model: nn.Module, cfg: Dict) -> Dict[int, Tuple[int, int]]:
    """Spatial size at the stem (key 0) and in each stage: stride 1 stem, stages 2-4 halve."""
    size = cfg['img_size']
    return {0: (size, size), **{s: ((size >> (s - 1)),) * 2 for s in (1, 2, 3, 4)}}


_CALIBRATION: Dict[Tuple[int, Tuple[int, int]], Tuple[np.ndarray, np.ndarray]] = {}


def _matched_dropblock(block_size: int, feat: Tuple[int, int]) -> DropBlock2d:
    layer = DropBlock2d(drop_prob=0.0, block_size=block_size, gamma_scale=1.0, couple_channels=False)
    key = (block_size, feat)
    if key not in _CALIBRATION:
        _CALIBRATION[key] = calibrate_dropblock(block_size, feat)
    layer.calibration = _CALIBRATION[key]  # (drop_prob grid, measured dropped fraction), read by set_rate
    return layer


@torch.no_grad()
def calibrate_dropblock(block_size: int, feat: Tuple[int, int], draws: int = 40, seed: int = 0,
                        grid: Tuple[float, ...] = tuple(np.linspace(0.0, 0.9, 46))) -> Tuple[np.ndarray, np.ndarray]:
    """Measured dropped fraction of a per-channel ``DropBlock2d`` on ``feat`` maps at every
    ``drop_prob`` of ``grid`` (a fixed seed: the same table in every run)."""
    layer = DropBlock2d(drop_prob=0.0, block_size=block_size, gamma_scale=1.0, couple_channels=False).train()
    x = torch.ones(32, 4, *feat)
    fractions = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in grid:
            layer.drop_prob = float(p)
            fractions.append(float(np.mean([(layer(x) == 0).float().mean().item() for _ in range(draws)])))
    # Monte Carlo noise could make the table dip; the true curve rises with drop_prob.
    return np.asarray(grid, dtype=np.float64), np.maximum.accumulate(np.asarray(fractions))


def set_rate(model: nn.Module, rate: float) -> None:
    """Every regulariser of ``model`` at ``rate``: DropCluster layers take it as their drop_prob,
    calibrated DropBlock layers the drop_prob whose measured dropped fraction is ``rate``."""
    set_drop_prob(model, rate)
    for module in model.modules():
        if isinstance(module, DropBlock2d):
            grid, fraction = module.calibration
            module.drop_prob = float(0.0 if rate == 0 else np.interp(rate, fraction, grid))


def regulariser_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (DropBlock2d, DropClusterNd))]


@torch.no_grad()
def measure_dropped_fraction(model: nn.Module, x: torch.Tensor, seed: int, draws: int = 4) -> Dict[str, float]:
    """Share of the non-zero inputs that the regularisers zero, in training mode at their current
    rate, over ``draws`` forwards of ``x``: ``{'all': ..., layer name: ...}`` ({} without any).
    The masks come from the ``dropped_fraction`` stream; BatchNorm statistics are restored."""
    layers = regulariser_layers(model)
    if not layers:
        return {}
    counts = {n: [0, 0] for n, _ in layers}

    def hook(name):
        def fn(module, args, output):
            nonzero = args[0] != 0
            counts[name][0] += int((nonzero & (output == 0)).sum())
            counts[name][1] += int(nonzero.sum())
        return fn

    state = {k: v.clone() for k, v in model.state_dict().items()}
    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == 'cuda' else []):
            torch.manual_seed(purpose_seed(seed, 'dropped_fraction'))
            model.train()
            for _ in range(draws):
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(state)
        model.train(was_training)
    out = {'all': sum(c[0] for c in counts.values()) / max(1, sum(c[1] for c in counts.values()))}
    out.update({n: c[0] / max(c[1], 1) for n, c in counts.items()})
    return out
