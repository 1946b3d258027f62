""" Soft resets (BRB): exact interpolation toward a seeded fresh init, optimizer state cleared, scope."""
import pytest
import timm
import torch

from dropcluster_timm.train.soft_reset import fresh_parameters, soft_reset


def _trained(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model('resnet18_dropcluster', num_classes=4, img_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        optimizer.step()
    return model, optimizer


def test_interpolates_exactly_toward_the_seeded_fresh_init():
    model, optimizer = _trained()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fresh = fresh_parameters(model, seed=7)
    again = fresh_parameters(model, seed=7)
    assert all(torch.equal(fresh[n], again[n]) for n in fresh)  # the same on every process
    assert not torch.equal(fresh['fc.weight'], fresh_parameters(model, seed=8)['fc.weight'])
    reset = soft_reset(model, optimizer, factor=0.75, seed=7)
    assert sorted(reset) == sorted(before)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, 0.75 * before[n] + 0.25 * fresh[n], rtol=0, atol=1e-6)
    assert len(optimizer.state) == 0  # momentum buffers of every reset parameter are gone


def test_scope_limits_the_reset_and_the_momentum_reset():
    model, optimizer = _trained()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reset = soft_reset(model, optimizer, factor=0.5, scope=['layer4', 'fc'], seed=1)
    assert reset and all(n.startswith(('layer4.', 'fc.')) for n in reset)
    params = dict(model.named_parameters())
    for n, p in params.items():
        assert torch.equal(p, before[n]) != (n in reset), n
        assert ('momentum_buffer' in optimizer.state.get(p, {})) != (n in reset), n
    with pytest.raises(ValueError, match='names no parameters'):
        soft_reset(model, optimizer, scope=['layer9'])
    with pytest.raises(ValueError, match='factor'):
        soft_reset(model, optimizer, factor=1.0)


def test_a_plain_module_resets_toward_its_own_initialisation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    soft_reset(model, factor=0.0, seed=3)  # factor 0: the fresh init itself
    assert torch.equal(model[0].weight, fresh_parameters(model, seed=3)['0.weight'])
    assert model[0].weight.abs().max() < 1.0
