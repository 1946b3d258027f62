""" ByobNet-family models with DropCluster

timm's ByobNet class (``byobnet.py``: GERNet, RepVGG, RegNetZ, ResNet-*ts, ...; ``byoanet.py``:
attention variants; MobileViT) with DropCluster (https://arxiv.org/abs/2002.02997) in the slots where
timm puts DropBlock (https://arxiv.org/abs/1810.12890): after the norm of the kxk conv of the blocks
of the last two stages. Pretrained tags load timm's weights of the base with grid-initialised maps.

    import timm
    import dropcluster_timm  # registers *_dropcluster with timm
    model = timm.create_model('regnetz_b16_dropcluster', pretrained=True, drop_cluster_rate=0.1)
"""
from timm.models.byobnet import checkpoint_filter_fn

from .variants import ModelFamily, load_architectures, register_family

__all__ = ['FAMILY']

FAMILY = ModelFamily(
    module='byobnet_dropcluster',
    timm_modules=('byobnet', 'byoanet', 'mobilevit'),
    feature_cfg=dict(flatten_sequential=True),  # as timm's byobnet / mobilevit builders
    takes_img_size=True,
    filter_fn=checkpoint_filter_fn,
)

register_family(FAMILY, __name__, load_architectures()[FAMILY.module])
