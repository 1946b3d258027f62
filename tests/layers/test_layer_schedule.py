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
