""" The DropCluster layers: the functional core ``drop_cluster`` and the ``DropCluster1d/2d/3d`` modules,
the fused CUDA kernel, model-level helpers and the drop-rate schedule."""
from .drop_cluster import DROP_MODES, cluster_drop_probs, drop_cluster, resample_cluster_map
from .drop_cluster_modules import DropCluster1d, DropCluster2d, DropCluster3d, DropClusterNd
from .model_helpers import (
    cluster_state, copy_cluster_state, ddp_ignore_cluster_buffers, disable_own_schedule, dropcluster_layers,
    init_cluster_maps, set_drop_prob, update_clusters)
from .schedules import SCHEDULE_SHAPES, DropClusterSchedule
