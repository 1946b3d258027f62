""" DropCluster for timm: learned structured dropout layers, a batched clustering engine and helpers.

``import dropcluster_timm`` also registers the DropCluster layers as FX leaf modules with timm.
"""
from .clustering import CLUSTER_METHODS, cluster_activations, within_cluster_variance
from .drop_cluster import DropCluster1d, DropCluster2d, DropCluster3d, drop_cluster, resample_cluster_map
from .model_helpers import (
    copy_cluster_state, ddp_ignore_cluster_buffers, dropcluster_layers, set_drop_prob, update_clusters)
from .schedules import SCHEDULE_SHAPES, DropClusterSchedule
from . import models  # registers the *_dropcluster models with timm
from .hub import push, save_pretrained

__version__ = '0.1.0'

__all__ = [
    'CLUSTER_METHODS', 'cluster_activations', 'within_cluster_variance',
    'DropCluster1d', 'DropCluster2d', 'DropCluster3d', 'drop_cluster', 'resample_cluster_map',
    'dropcluster_layers', 'set_drop_prob', 'update_clusters', 'copy_cluster_state',
    'ddp_ignore_cluster_buffers',
    'DropClusterSchedule', 'SCHEDULE_SHAPES',
]
__all__ += ['save_pretrained', 'push']
