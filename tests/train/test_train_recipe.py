""" The DropCluster recipe: what happens at the start of an epoch, in which order, and the ramp."""
import pytest
import torch

from dropcluster_timm import DropCluster2d
from dropcluster_timm.train import DropClusterConfig, DropClusterRecipe


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), DropCluster2d(0.0, block_size=2))


def test_soft_reset_then_recluster_in_that_order_seeded_by_epoch():
    cfg = DropClusterConfig(rate=0.1, start_epoch=2, warmup_epochs=0, update_freq=3, soft_reset_interval=4, soft_reset_factor=0.5)
    recipe = DropClusterRecipe(cfg, steps_per_epoch=5, seed=7)
    model = _model()
    events = []
    before = model[0].weight.clone()
    for epoch in range(9):
        weights = model[0].weight.clone()
        done = recipe.begin_epoch(epoch, model, None, recluster=lambda seed: events.append(
            (epoch, seed, torch.equal(model[0].weight, weights))))
        assert done['soft_reset'] == (epoch in (4, 8))
    # the schedule's epochs (2, 5, 8) and every soft reset (4, 8); once per epoch, after the reset
    assert [(e, s) for e, s, _ in events] == [(2, 7002), (4, 7004), (5, 7005), (8, 7008)]
    assert [same for _, _, same in events] == [True, False, True, False]
    assert not torch.equal(model[0].weight, before)


def test_nothing_when_resuming_inside_an_epoch_or_without_clusters():
    cfg = DropClusterConfig(rate=0.1, start_epoch=0, warmup_epochs=0, update_freq=1, soft_reset_interval=1)
    recipe = DropClusterRecipe(cfg, steps_per_epoch=5)
    calls = []
    assert recipe.begin_epoch(3, _model(), None, calls.append, resuming=True) == \
        {'soft_reset': False, 'reclustered': False}
    plain = DropClusterRecipe(DropClusterConfig(rate=0.1, start_epoch=0, warmup_epochs=0, update_freq=1), steps_per_epoch=5, clustered=False)
    assert plain.begin_epoch(0, _model(), None, calls.append) == {'soft_reset': False, 'reclustered': False}
    assert calls == []


def test_step_puts_the_ramp_rate_into_the_layers():
    recipe = DropClusterRecipe(DropClusterConfig(rate=0.2, start_epoch=1, warmup_epochs=2, update_freq=1), steps_per_epoch=4)
    model = _model()
    assert recipe.step(model, 0.5) == 0.0 and model[1].drop_prob == 0.0
    assert recipe.step(model, 2.0) == pytest.approx(0.1) and model[1].drop_prob == pytest.approx(0.1)
    seen = []
    custom = DropClusterRecipe(DropClusterConfig(rate=0.2).resolved(epochs=10), 4, set_rate=lambda m, r: seen.append(r))
    custom.step(model, 3.0)
    assert seen == [0.2]


def test_a_ramp_left_to_the_run_length_needs_it():
    from dropcluster_timm.errors import InputError
    with pytest.raises(InputError, match=r'DropClusterConfig.start_epoch is None .*resolved\(epochs\)'):
        DropClusterRecipe(DropClusterConfig(rate=0.1), steps_per_epoch=4)
    resolved = DropClusterConfig(rate=0.1).resolved(epochs=50)
    assert (resolved.start_epoch, resolved.warmup_epochs, resolved.update_freq) == (10, 5, 5)
    assert DropClusterRecipe(resolved, steps_per_epoch=4).schedule.start_epoch == 10
