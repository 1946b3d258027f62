""" The ``*_dropcluster`` models: every timm architecture with DropBlock slots, registered with timm
(the ``*_slim`` pruned ResNets are EDropout's: ``dropcluster_timm.edropout``)."""
from .variants import DROPCLUSTER_ARGS, dropcluster_model_args
from . import byobnet_dropcluster, resnet_dropcluster  # noqa: F401  register the models

__all__ = ['DROPCLUSTER_ARGS', 'dropcluster_model_args']
