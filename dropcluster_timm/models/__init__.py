""" DropCluster models, registered with timm on import (``timm.list_models('*dropcluster*')``)."""
from .resnet_dropcluster import DropClusterResNet, checkpoint_filter_fn, dropcluster_model_args

__all__ = ['DropClusterResNet', 'checkpoint_filter_fn', 'dropcluster_model_args']
