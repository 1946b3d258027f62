""" Model statistics of the cards: parameters, MACs and activations, measured on the meta device."""
import pytest
import timm
import torch
import torch.nn as nn

import dropcluster_timm  # noqa: F401  registers the models
from dropcluster_timm.hub.model_stats import model_stats


def test_model_stats_counted():
    """GMACs from FlopCounterMode equal the MACs of every conv / linear counted from their shapes."""
    model = timm.create_model('resnet18_dropcluster').eval()
    macs, acts = [], []

    def hook(m, a, o):
        macs.append(o.numel() * m.weight[0].numel())
        acts.append(o.numel())

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    stats = model_stats('resnet18_dropcluster')
    assert stats['gmacs'] == pytest.approx(sum(macs) / 1e9, rel=1e-6)
    assert stats['activations_m'] == pytest.approx(sum(acts) / 1e6)
    assert stats['params_m'] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert model_stats('resnet18_dropcluster', img_size=(112, 112))['gmacs'] < stats['gmacs'] / 3
    # the model's own input size by default (img_size of a DropCluster model), any timm architecture
    assert model_stats('resnet18_dropcluster', model_args={'img_size': [32, 32]})['img_size'] == (32, 32)
    plain = model_stats('resnet18', img_size=32, model_args={'num_classes': 3})
    assert plain['img_size'] == (32, 32) and plain['gmacs'] == pytest.approx(stats['gmacs'] * (32 / 224) ** 2, rel=0.05)
    assert plain['params_m'] == pytest.approx(sum(p.numel() for p in timm.create_model('resnet18', num_classes=3).parameters()) / 1e6)
