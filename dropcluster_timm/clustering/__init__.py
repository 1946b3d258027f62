""" The clustering engine: connected clusters of a feature map's correlated activations (batched, on the
activations' device), per-map cluster counts and the structure test."""
from .cluster_count import CLUSTER_COUNTS, gap_statistic_labels, structured_maps
from .engine import CLUSTER_METHODS, activation_features, cluster_activations, cluster_features, within_cluster_variance
