""" DropCluster for timm: learned structured dropout layers, a batched clustering engine, drop-rate
schedules and the ``*_dropcluster`` models.

``import dropcluster_timm`` registers the ``*_dropcluster`` models with timm and the DropCluster layers
as FX leaf modules. The parts: ``layers`` (the functional core, the modules, the fused kernel, the
schedules), ``clustering`` (the engine, cluster counts), ``models``, ``train``, ``hub`` (save, export,
push, cards; loaded on first use), ``evaluation``, and ``edropout`` (energy-based dropout and pruning,
opt-in: ``import dropcluster_timm.edropout`` registers the ``*_slim`` models).
"""
from .clustering.cluster_count import CLUSTER_COUNTS, gap_statistic_labels, structured_maps
from .clustering.engine import CLUSTER_METHODS, cluster_activations, within_cluster_variance
from .layers.drop_cluster import DROP_MODES, cluster_drop_probs, drop_cluster, resample_cluster_map
from .layers.drop_cluster_modules import DropCluster1d, DropCluster2d, DropCluster3d
from .layers.model_helpers import (
    cluster_state, copy_cluster_state, ddp_ignore_cluster_buffers, disable_own_schedule, dropcluster_layers,
    init_cluster_maps, set_drop_prob, update_clusters)
from .layers.schedules import SCHEDULE_SHAPES, DropClusterSchedule
from .models.convert import convert_drop_blocks
from . import models  # noqa: F401  registers the *_dropcluster models with timm

__version__ = '0.1.0'

__all__ = [
    'CLUSTER_METHODS', 'cluster_activations', 'within_cluster_variance',
    'CLUSTER_COUNTS', 'gap_statistic_labels', 'structured_maps', 'DROP_MODES', 'cluster_drop_probs',
    'DropCluster1d', 'DropCluster2d', 'DropCluster3d', 'drop_cluster', 'resample_cluster_map',
    'dropcluster_layers', 'set_drop_prob', 'init_cluster_maps', 'update_clusters', 'copy_cluster_state',
    'cluster_state', 'ddp_ignore_cluster_buffers', 'disable_own_schedule',
    'DropClusterSchedule', 'SCHEDULE_SHAPES', 'convert_drop_blocks',
    'save_pretrained', 'export_plain', 'push',
]


def __getattr__(name):
    if name in ('save_pretrained', 'export_plain', 'push'):  # the Hub code (model cards, matplotlib) only when used
        from . import hub
        return getattr(hub, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
