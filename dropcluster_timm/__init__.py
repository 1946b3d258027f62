""" DropCluster for timm: learned structured dropout layers, a batched clustering engine and helpers.

``import dropcluster_timm`` also registers the DropCluster layers as FX leaf modules with timm.
"""
from .clustering import CLUSTER_METHODS, cluster_activations, within_cluster_variance
from .drop_cluster import DropCluster1d, DropCluster2d, DropCluster3d, drop_cluster, resample_cluster_map
from .model_helpers import dropcluster_layers, set_drop_prob, update_clusters

__version__ = '0.1.0'

__all__ = [
    'CLUSTER_METHODS', 'cluster_activations', 'within_cluster_variance',
    'DropCluster1d', 'DropCluster2d', 'DropCluster3d', 'drop_cluster', 'resample_cluster_map',
    'dropcluster_layers', 'set_drop_prob', 'update_clusters',
]
