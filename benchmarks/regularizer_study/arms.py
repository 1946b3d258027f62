""" The study's arms: the same timm ResNet and recipe, only the regulariser differs.

    none                no structured dropout
    cutout              positive control: Cutout on the input images (not tuned, no rate)
    dropblock_timm      DropBlock as timm configures it (``drop_block_rate``: stages 3-4, gamma_scale
                        0.25 in stage 3, channels coupled), so it drops less than its nominal rate
    dropblock_matched   DropBlock in the same slots, per channel, gamma_scale 1, its rate calibrated
                        so the measured dropped fraction equals the target rate, as DropCluster's does
    dropblock_stem      matched DropBlock in the stem slot of ``dc_stem``
    dc_stages, dc_stem  DropCluster with learned (rena) clusters in stages 3-4 or in the stem
    dc_grid_*           DropCluster with fixed grid clusters at the same placement: the control for "learned"
    dc_random_*         DropCluster with random connected clusters at the same placement

Option arms (``run.py --option-arms``), each ``dc_stages`` with one of the reference options:

    dc_gap_stages       per-map cluster counts from the gap statistic (``dc_cluster_count='gap'``)
    dc_hopkins_stages   maps without spatial structure left undropped (``dc_skip_unstructured``)
    dc_sizedrop_stages  size-dependent cluster rates (``dc_drop_mode='size'``)
    dc_shared_stages    one mask for the whole batch (``dc_batch_shared``)
    dc_kmedoids_stages, dc_gmm_stages   k-medoids / Gaussian-mixture re-clustering
    dc_expramp_stages   the 'exponential' ramp shape instead of the linear one
    dc_softreset_stages BRB: a soft reset (keep 90%) before every re-clustering after the first

Block and cluster sizes are matched: DropBlock blocks of side 5 (stage 3), 3 (stage 4) and 7 (stem),
DropCluster clusters of 25, 9 and 49 elements (the zoo's defaults for those slots).
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.layers import DropBlock2d

import timm
import dropcluster_timm  # noqa: F401  registers resnet18_dropcluster
from dropcluster_timm import set_drop_prob
from dropcluster_timm.drop_cluster import DropClusterNd

__all__ = ['ARMS', 'OPTION_ARMS', 'ALL_ARMS', 'REGULARISED', 'DC_ARMS', 'schedule_shape', 'soft_reset_factor',
           'build_model', 'set_rate', 'regulariser_layers',
           'calibrate_dropblock', 'measure_dropped_fraction']

ARMS = ('none', 'cutout', 'dropblock_timm', 'dropblock_matched', 'dropblock_stem', 'dc_stages', 'dc_stem',
        'dc_grid_stages', 'dc_grid_stem', 'dc_random_stages', 'dc_random_stem')
# name -> (model arguments, schedule shape, soft reset factor or None), on top of dc_stages
OPTION_ARMS = {
    'dc_gap_stages': (dict(dc_cluster_count='gap'), 'linear', None),
    'dc_hopkins_stages': (dict(dc_skip_unstructured=True), 'linear', None),
    'dc_sizedrop_stages': (dict(dc_drop_mode='size'), 'linear', None),
    'dc_shared_stages': (dict(dc_batch_shared=True), 'linear', None),
    'dc_kmedoids_stages': (dict(dc_cluster_method='kmedoids'), 'linear', None),
    'dc_gmm_stages': (dict(dc_cluster_method='gmm'), 'linear', None),
    'dc_expramp_stages': ({}, 'exponential', None),
    'dc_softreset_stages': ({}, 'linear', 0.9),
}
ALL_ARMS = ARMS + tuple(OPTION_ARMS)
REGULARISED = tuple(a for a in ALL_ARMS if a not in ('none', 'cutout'))  # the arms with a tuned rate
DC_ARMS = tuple(a for a in ALL_ARMS if a.startswith('dc_'))
_BLOCK = {'stem': 7, 3: 5, 4: 3}


def _dc_settings(arm: str) -> Tuple[str, Dict]:
    method = 'grid' if '_grid_' in arm else 'random' if '_random_' in arm else 'rena'
    placement = dict(dc_stages=(), dc_stem=True) if arm.endswith('_stem') else dict(dc_stages=(3, 4), dc_stem=False)
    if arm in OPTION_ARMS:
        placement.update(OPTION_ARMS[arm][0])
        method = placement.pop('dc_cluster_method', method)
    return method, placement


def schedule_shape(arm: str) -> str:
    """The drop-rate ramp shape of ``arm`` (``'linear'`` but for ``dc_expramp_stages``)."""
    return OPTION_ARMS[arm][1] if arm in OPTION_ARMS else 'linear'


def soft_reset_factor(arm: str) -> Optional[float]:
    """The BRB soft-reset factor of ``arm``, or ``None`` for no soft reset."""
    return OPTION_ARMS[arm][2] if arm in OPTION_ARMS else None


def build_model(arm: str, cfg: Dict, calibration_cache: Optional[Dict] = None) -> nn.Module:
    """The arm's model, rate 0 (the schedule sets it); ``cfg``: layers, channels, img_size."""
    if arm not in ALL_ARMS:
        raise ValueError(f'unknown arm {arm!r}, expected one of {ALL_ARMS}')
    kwargs = dict(num_classes=10, layers=tuple(cfg['layers']), channels=tuple(cfg['channels']),
                  stem_width=cfg['channels'][0], output_stride=8)
    if arm.startswith('dc_'):
        method, placement = _dc_settings(arm)
        return timm.create_model('resnet18_dropcluster', drop_cluster_rate=0.0, img_size=cfg['img_size'],
                                 dc_cluster_method=method, **placement, **kwargs)
    if arm == 'dropblock_timm':
        # timm builds DropBlock layers only for a non-zero rate; the schedule starts them at 0.
        model = timm.create_model('resnet18', drop_block_rate=0.1, **kwargs)
        set_drop_prob(model, 0.0, drop_block=True)
        return model
    model = timm.create_model('resnet18', **kwargs)
    if arm in ('dropblock_matched', 'dropblock_stem'):
        feats = _feature_sizes(model, cfg['img_size'])
        cache = calibration_cache if calibration_cache is not None else {}
        if arm == 'dropblock_matched':
            for stage in (3, 4):
                for blk in getattr(model, f'layer{stage}'):
                    blk.drop_block = _matched_dropblock(_BLOCK[stage], feats[stage], cache)
        else:
            model.maxpool = nn.Sequential(OrderedDict([
                ('drop_block', _matched_dropblock(_BLOCK['stem'], feats['stem'], cache)), ('pool', model.maxpool)]))
    return model


def _feature_sizes(model: nn.Module, img_size: int) -> Dict:
    """Spatial size of the stem output (before pooling) and of stages 3 and 4."""
    red = {info['module']: info['reduction'] for info in model.feature_info}
    size = lambda r: (-(-img_size // r),) * 2  # noqa: E731  'same'-padded convs and pools round up
    return {'stem': size(red['act1']), 3: size(red['layer3']), 4: size(red['layer4'])}


def _matched_dropblock(block_size: int, feat: Tuple[int, int], cache: Dict) -> DropBlock2d:
    layer = DropBlock2d(drop_prob=0.0, block_size=block_size, gamma_scale=1.0, couple_channels=False)
    key = (block_size, feat)
    if key not in cache:
        cache[key] = calibrate_dropblock(block_size, feat)
    layer.calibration = cache[key]  # (drop_prob grid, measured dropped fraction), read by set_rate
    return layer


@torch.no_grad()
def calibrate_dropblock(block_size: int, feat: Tuple[int, int], draws: int = 40, seed: int = 0,
                        grid: Sequence[float] = tuple(np.linspace(0.0, 0.9, 46))) -> Tuple[np.ndarray, np.ndarray]:
    """Measured dropped fraction of a per-channel ``DropBlock2d`` on ``feat`` maps for every
    ``drop_prob`` of ``grid``: DropBlock's gamma formula only approximates its rate (blocks overlap
    and are clipped at the border), so matched arms invert this table instead."""
    layer = DropBlock2d(drop_prob=0.0, block_size=block_size, gamma_scale=1.0, couple_channels=False).train()
    x = torch.ones(32, 4, *feat)  # 128 maps a draw: enough elements for a smooth table
    fractions = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in grid:
            layer.drop_prob = float(p)
            fractions.append(float(np.mean([(layer(x) == 0).float().mean().item() for _ in range(draws)])))
    # Monte Carlo noise could make the table dip; the true curve rises with drop_prob.
    return np.asarray(grid, dtype=np.float64), np.maximum.accumulate(np.asarray(fractions))


def set_rate(model: nn.Module, rate: float) -> None:
    """Set every regulariser of ``model`` to ``rate``: DropCluster layers and timm's DropBlock take it
    as their drop_prob; matched DropBlock layers take the drop_prob whose measured fraction is ``rate``."""
    set_drop_prob(model, rate)
    for module in model.modules():
        if isinstance(module, DropBlock2d):
            table = getattr(module, 'calibration', None)
            module.drop_prob = float(rate if table is None or rate == 0 else np.interp(rate, table[1], table[0]))


def regulariser_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (DropBlock2d, DropClusterNd))]


@torch.no_grad()
def measure_dropped_fraction(model: nn.Module, x: torch.Tensor, draws: int = 4) -> Dict[str, float]:
    """Fraction of each regulariser's non-zero inputs that it zeroes, in training mode at the current
    rate, over ``draws`` forwards of ``x``. BatchNorm statistics are saved and restored."""
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
        model.train()
        for _ in range(draws):
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(state)
        model.train(was_training)
    return {n: c[0] / max(c[1], 1) for n, c in counts.items()}
