""" Names of what an opt-in package brings, known without importing it: the architectures it
registers, so that a saved model of one loads without that package being imported everywhere else
(model cards, training, export), and EDropout's units, which the training options declare."""
import importlib

import timm

__all__ = ['SLIM_SUFFIX', 'OPT_IN_ARCHITECTURES', 'EDROPOUT_UNITS', 'register_architecture']

SLIM_SUFFIX = '_slim'  # channel-pruned ResNets: ``resnet50_slim``
# name suffix -> the package whose import registers those architectures with timm
OPT_IN_ARCHITECTURES = {SLIM_SUFFIX: 'dropcluster_timm.edropout'}
# What EDropout scores and drops: channels (and prunes them), or the clusters of DropCluster layers.
EDROPOUT_UNITS = ('channel', 'cluster')


def register_architecture(arch: str) -> bool:
    """Import the opt-in package that registers ``arch`` when timm does not know it yet; True if one was."""
    if timm.is_model(arch):
        return False
    for suffix, package in OPT_IN_ARCHITECTURES.items():
        if arch.endswith(suffix):
            importlib.import_module(package)
            return True
    return False
