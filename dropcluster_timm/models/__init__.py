""" The ``*_dropcluster`` models: every timm architecture with DropBlock slots, registered with timm, and the
``*_slim`` channel-pruned ResNets."""
from .variants import DROPCLUSTER_ARGS, dropcluster_model_args
from . import byobnet_dropcluster, resnet_dropcluster, resnet_slim  # noqa: F401  register the models

__all__ = ['DROPCLUSTER_ARGS', 'dropcluster_model_args']
