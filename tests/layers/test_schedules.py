""" DropClusterSchedule: the per-batch ramp, its shapes, the re-clustering epochs, checkpointing."""
import pytest

from dropcluster_timm import DropClusterSchedule


def test_schedule_linear_ramp_stepped_per_batch():
    s = DropClusterSchedule(target=0.2, start_epoch=2, warmup_epochs=4, shape='linear', update_freq=3,
                            steps_per_epoch=10)
    rates = [s.step() for _ in range(80)]  # epochs 0.1 .. 8.0
    assert rates[:19] == [0.0] * 19  # before epoch 2
    assert rates[19] == 0.0 and rates[20] == pytest.approx(0.2 * 0.1 / 4)  # epoch 2.0, 2.1
    assert s.rate_at(4.0) == pytest.approx(0.1)
    assert all(b >= a for a, b in zip(rates, rates[1:]))  # monotone, one value per batch
    assert rates[59] == pytest.approx(0.2) and rates[-1] == pytest.approx(0.2)  # epoch 6 on
    assert s.epoch == pytest.approx(8.0)


def test_schedule_shapes_and_no_warmup():
    cos = DropClusterSchedule(0.1, start_epoch=0, warmup_epochs=2, shape='cosine')
    assert cos.rate_at(1.0) == pytest.approx(0.05)
    assert cos.rate_at(0.5) < 0.1 * 0.25  # eases in
    step = DropClusterSchedule(0.3, start_epoch=1, warmup_epochs=3, shape='step')
    assert [step.rate_at(e) for e in (0.5, 1.0, 1.9, 2.0, 3.2, 9.0)] == pytest.approx([0, 0.1, 0.1, 0.2, 0.3, 0.3])
    jump = DropClusterSchedule(0.1, start_epoch=5, warmup_epochs=0)
    assert jump.rate_at(4.99) == 0.0 and jump.rate_at(5.0) == 0.1
    assert DropClusterSchedule(0.0).rate_at(100) == 0.0
    for bad in (dict(target=1.0), dict(shape='exp'), dict(update_freq=-1), dict(start_epoch=-1)):
        with pytest.raises(ValueError):
            DropClusterSchedule(**bad)


def test_schedule_update_epochs():
    s = DropClusterSchedule(0.1, start_epoch=20, warmup_epochs=10, update_freq=10)
    assert [e for e in range(60) if s.is_update_epoch(e)] == [20, 30, 40, 50]
    assert not any(DropClusterSchedule(0.1, start_epoch=0, update_freq=0).is_update_epoch(e) for e in range(9))
    assert not any(DropClusterSchedule(0.0, start_epoch=0, update_freq=1).is_update_epoch(e) for e in range(9))


def test_schedule_state_dict_round_trip():
    a = DropClusterSchedule(0.15, start_epoch=1, warmup_epochs=2, shape='cosine', update_freq=2, steps_per_epoch=7)
    for _ in range(12):
        a.step()
    b = DropClusterSchedule()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.rate == a.rate
    assert [b.step() for _ in range(5)] == [a.step() for _ in range(5)]
    with pytest.raises(KeyError):
        b.load_state_dict({'bogus': 1})


def test_exponential_shape_multiplies_the_rate_each_warmup_epoch():
    s = DropClusterSchedule(target=0.2, start_epoch=2, warmup_epochs=3, shape='exponential', gamma=0.5)
    assert s.rate_at(1.9) == 0.0
    assert [s.rate_at(e) for e in (2, 2.5, 3, 4, 4.99, 5, 9)] == [0.05, 0.05, 0.1, 0.2, 0.2, 0.2, 0.2]
    assert s.peak_rate(4) == 0.1 and s.peak_rate(5) == 0.2


def test_multistep_shape_rises_at_the_milestones():
    s = DropClusterSchedule(target=0.3, start_epoch=1, warmup_epochs=0, shape='multistep', gamma=0.1,
                            milestones=[6, 3])
    assert s.milestones == [3.0, 6.0]
    assert [round(s.rate_at(e), 6) for e in (0, 1, 2.9, 3, 5.9, 6, 10)] == [0.0, 0.003, 0.003, 0.03, 0.03, 0.3, 0.3]
    state = s.state_dict()
    other = DropClusterSchedule(shape='multistep', milestones=[1])
    other.load_state_dict(state)
    assert other.rate_at(4) == s.rate_at(4) and other.milestones == [3.0, 6.0]


def test_multiplicative_shapes_check_their_arguments():
    with pytest.raises(ValueError, match='milestones'):
        DropClusterSchedule(shape='multistep')
    with pytest.raises(ValueError, match='gamma'):
        DropClusterSchedule(shape='exponential', gamma=0.0)
