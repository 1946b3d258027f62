""" One training epoch: the rate stepped per batch, the step callback, resuming mid-epoch."""
import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from dropcluster_timm import DropCluster2d
from dropcluster_timm.train import DropClusterConfig, DropClusterRecipe, TrainState, train_one_epoch
from dropcluster_timm.train.config import OutputConfig, TrainConfig

QUIET = TrainConfig(output=OutputConfig(progress=False))
pytestmark = pytest.mark.usefixtures('own_accelerator')


class _Sched:
    def step_update(self, num_updates):
        pass


def _setup(seed=0, drop_block=False):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), DropCluster2d(0.0, block_size=2),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = TensorDataset(torch.randn(20, 3, 8, 8), torch.arange(20) % 2)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=4))
    recipe = DropClusterRecipe(DropClusterConfig(rate=0.2, start_epoch=0, warmup_epochs=1, update_freq=1), len(loader),
                               drop_block=drop_block)
    return accelerator, model, optimizer, loader, recipe


def test_rate_stepped_per_batch_and_callback_after_each():
    accelerator, model, optimizer, loader, schedule = _setup()
    state, seen = TrainState(), []
    row = train_one_epoch(accelerator, model, loader, optimizer, torch.nn.CrossEntropyLoss(), _Sched(), schedule,
                          state, QUIET, on_step=lambda s: seen.append((s.global_step, model[1].drop_prob)))
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5]
    assert [rate for _, rate in seen] == pytest.approx([0.2 * i / 5 for i in range(5)])  # epoch + i / steps
    assert state.epoch == 1 and state.step_in_epoch == 0 and state.num_updates == 5
    assert state.peak_drop_rate == seen[-1][1] and row['drop_rate'] == seen[-1][1]
    assert row['train_loss'] > 0 and row['lr'] == 0.1


def test_resume_mid_epoch_skips_the_batches_done():
    accelerator, model, optimizer, loader, schedule = _setup()
    state, seen = TrainState(), []
    state.step_in_epoch, state.global_step = 3, 3
    train_one_epoch(accelerator, model, loader, optimizer, torch.nn.CrossEntropyLoss(), _Sched(), schedule, state,
                    QUIET, on_step=lambda s: seen.append(s.global_step))
    assert seen == [4, 5] and state.epoch == 1


def test_drop_block_baseline_ramps_like_dropcluster():
    """A plain timm model's DropBlock layers follow the same ramp with drop_block=True."""
    from timm.layers import DropBlock2d
    accelerator, model, optimizer, loader, schedule = _setup(drop_block=True)
    block = DropBlock2d(0.3, block_size=3)
    accelerator.unwrap_model(model)[1] = block
    rates = []
    train_one_epoch(accelerator, model, loader, optimizer, torch.nn.CrossEntropyLoss(), _Sched(), schedule,
                    TrainState(), QUIET, on_step=lambda s: rates.append(block.drop_prob))
    assert rates == pytest.approx([0.2 * i / 5 for i in range(5)])


def test_log_lines_only_every_interval_and_max_steps(capsys):
    accelerator, model, optimizer, loader, schedule = _setup()
    state = TrainState()
    train_one_epoch(accelerator, model, loader, optimizer, torch.nn.CrossEntropyLoss(), _Sched(), schedule, state,
                    TrainConfig(output=OutputConfig(progress=True, log_interval=2, train_batches_per_epoch=4)))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('epoch 0 [')]
    assert [line.split(']')[0] for line in lines] == ['epoch 0 [2/4', 'epoch 0 [4/4']
    assert state.global_step == 4 and state.epoch == 1
