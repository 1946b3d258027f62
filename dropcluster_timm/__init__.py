""" DropCluster for timm: learned structured dropout layers, a batched clustering engine and helpers;
EDropout (energy-based channel dropout, ``edropout`` / ``energy_search``) and channel pruning to
smaller timm ResNets (``prune``, the ``*_slim`` models).

``import dropcluster_timm`` registers the ``*_dropcluster`` models with timm and the DropCluster
layers as FX leaf modules. The Hub functions (``save_pretrained``, ``push``) load on first use;
training lives in ``dropcluster_timm.train``, evaluation in ``dropcluster_timm.evaluate``.
"""
from .cluster_count import CLUSTER_COUNTS, gap_statistic_labels, structured_maps
from .clustering import CLUSTER_METHODS, cluster_activations, within_cluster_variance
from .convert import convert_drop_blocks
from .edropout import (
    EDropCluster2d, EDropout2d, add_edropout, drop_cluster_state, edropout, edropout_layers, edropout_state,
    edropout_step, make_search, set_edropout_state, state_energies)
from .energy_search import EnergySearch
from .drop_cluster import (
    DROP_MODES, DropCluster1d, DropCluster2d, DropCluster3d, cluster_drop_probs, drop_cluster, resample_cluster_map)
from .prune import magnitude_keep, prune_channels
from .model_helpers import (
    cluster_state, copy_cluster_state, ddp_ignore_cluster_buffers, dropcluster_layers, init_cluster_maps,
    set_drop_prob, update_clusters)
from .schedules import SCHEDULE_SHAPES, DropClusterSchedule
from .soft_reset import soft_reset
from . import models  # noqa: F401  registers the *_dropcluster models with timm

__version__ = '0.1.0'

__all__ = [
    'CLUSTER_METHODS', 'cluster_activations', 'within_cluster_variance',
    'CLUSTER_COUNTS', 'gap_statistic_labels', 'structured_maps', 'DROP_MODES', 'cluster_drop_probs',
    'DropCluster1d', 'DropCluster2d', 'DropCluster3d', 'drop_cluster', 'resample_cluster_map',
    'dropcluster_layers', 'set_drop_prob', 'init_cluster_maps', 'update_clusters', 'copy_cluster_state',
    'cluster_state', 'ddp_ignore_cluster_buffers',
    'DropClusterSchedule', 'SCHEDULE_SHAPES', 'convert_drop_blocks', 'soft_reset',
    'edropout', 'EDropout2d', 'drop_cluster_state', 'EDropCluster2d', 'add_edropout', 'edropout_layers',
    'edropout_state', 'set_edropout_state', 'make_search', 'state_energies', 'edropout_step', 'EnergySearch',
    'prune_channels', 'magnitude_keep',
    'save_pretrained', 'export_plain', 'push',
]


def __getattr__(name):
    if name in ('save_pretrained', 'export_plain', 'push'):  # the Hub code (model cards, matplotlib) only when used
        from . import hub
        return getattr(hub, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
