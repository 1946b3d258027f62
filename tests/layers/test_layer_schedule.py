""" The layer's own schedule object: when re-clustering is due, the ramp, and the flag a compiled graph
reads, which changes only around the steps that re-cluster."""
import pytest
import torch

from dropcluster_timm.layers.layer_schedule import LayerSchedule


def _due_steps(schedule, steps):
    """The steps (counted from 1) at which a layer using ``schedule`` re-clusters."""
    due = []
    for _ in range(steps):
        if schedule.recluster_due:
            due.append(schedule.steps + 1)
            schedule.clustered = True  # what re-clustering does
        schedule.advance()
    return due


def test_due_at_the_first_forward_and_every_n_after():
    assert _due_steps(LayerSchedule(recluster_every=4), 13) == [1, 5, 9, 13]
    assert _due_steps(LayerSchedule(recluster_every=4, clustered=True), 13) == [5, 9, 13]  # maps from data
    assert _due_steps(LayerSchedule(recluster_every=0, ramp_steps=5), 13) == []


def test_the_flag_changes_only_around_due_steps_and_follows_loads_and_settings():
    schedule = LayerSchedule(recluster_every=3, clustered=True)
    flags = []
    for _ in range(9):
        schedule.advance()
        flags.append(schedule.recluster_due)
    assert flags == [False, False, True] * 3
    schedule.load(5)
    assert not schedule.recluster_due and schedule.steps == 5
    schedule.recluster_every = 5
    assert schedule.recluster_due  # 5 forwards done: the sixth re-clusters
    schedule.recluster_every = 0
    assert not schedule.recluster_due and schedule.active is False


@pytest.mark.parametrize('ramp_steps', [1, 4, 10])
def test_the_tensor_rate_is_the_host_rate(ramp_steps):
    schedule = LayerSchedule(ramp_steps=ramp_steps)
    for step in range(1, 13):
        tensor = schedule.rate_tensor(torch.tensor(0.3), torch.tensor(step))
        assert float(tensor) == pytest.approx(schedule.rate(0.3, step), rel=1e-6)
    assert schedule.rate(0.3, 100) == 0.3 and LayerSchedule().rate(0.3, 1) == 0.3


@pytest.mark.parametrize('options', [dict(), dict(couple_channels=True, drop_mode='size'),
                                     dict(cluster_count='gap', skip_unstructured=True)])
def test_an_eager_layer_on_its_schedule_is_the_functional_core_driven_from_outside(options):
    """The same outputs, maps and counts, bit for bit, as a layer driven by hand: re-clustered at
    steps 1, 4 and 7 from its input's first two images, at the ramp's rate."""
    from dropcluster_timm import DropCluster2d
    torch.manual_seed(0)
    layer = DropCluster2d(0.3, block_size=2, recluster_every=3, ramp_steps=4, cluster_images=2, **options).train()
    driven = DropCluster2d(0.3, block_size=2, **options).train()
    g = torch.Generator().manual_seed(1)
    for step in range(1, 9):
        x = torch.randn(4, 3, 8, 8, generator=g)
        state = torch.get_rng_state()
        out = layer(x)
        torch.set_rng_state(state)
        if step in (1, 4, 7):
            driven.update_clusters(x[:2])
        driven.drop_prob = 0.3 * min(1.0, step / 4)
        assert torch.equal(out, driven(x)), step
        assert torch.equal(layer.cluster_map, driven.cluster_map) and torch.equal(layer.cluster_counts,
                                                                                 driven.cluster_counts)
        assert layer.steps == step == int(layer.num_steps) and layer.own_rate() == driven.drop_prob
