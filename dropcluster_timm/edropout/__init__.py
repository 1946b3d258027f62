""" EDropout (energy-based dropout, arXiv 2006.04270) and channel pruning to smaller timm ResNets: an
opt-in part. ``import dropcluster_timm.edropout`` registers the ``*_slim`` (pruned) models with timm;
training reaches it through ``dropcluster-timm train --edropout``.
"""
from .energy_search import EnergySearch
from .layers import (
    EDROPOUT_UNITS, EDropCluster2d, EDropout2d, add_edropout, drop_cluster_state, edropout, edropout_layers,
    edropout_state, edropout_step, make_search, set_edropout_state, state_energies)
from .prune import SLIM_SUFFIX, magnitude_keep, prune_channels, set_block_widths
from . import resnet_slim  # noqa: F401  registers the *_slim models with timm

__all__ = [
    'EDROPOUT_UNITS', 'edropout', 'EDropout2d', 'drop_cluster_state', 'EDropCluster2d', 'add_edropout',
    'edropout_layers', 'edropout_state', 'set_edropout_state', 'make_search', 'state_energies', 'edropout_step',
    'EnergySearch', 'SLIM_SUFFIX', 'prune_channels', 'magnitude_keep', 'set_block_widths',
]
