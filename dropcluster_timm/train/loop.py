""" The training loop of one epoch, with the DropCluster rate stepped per batch, and the run's position."""
import sys
from typing import Callable, Dict, Optional

import torch
from tqdm.auto import tqdm

from ..model_helpers import set_drop_prob
from ..schedules import DropClusterSchedule

__all__ = ['TrainState', 'train_one_epoch']


class TrainState:
    """Position and bookkeeping of a run, checkpointed with ``accelerator.register_for_checkpointing``."""

    def __init__(self):
        self.epoch = 0  # the epoch in progress (or next to run)
        self.step_in_epoch = 0  # batches of ``epoch`` already done
        self.global_step = 0  # batches done in all
        self.num_updates = 0  # optimizer steps done
        self.best_top1 = None  # of the published weights (EMA when EMA is on)
        self.best_epoch = None
        self.peak_drop_rate = 0.0  # what the run really did with DropCluster, for run.json and cards
        self.reclusterings = 0

    def state_dict(self):
        return dict(self.__dict__)

    def load_state_dict(self, state):
        self.__dict__.update(state)


def train_one_epoch(
        accelerator, model, loader, optimizer, loss_fn, lr_scheduler, schedule: DropClusterSchedule,
        state: TrainState, ema=None, mixup_fn=None, clip_grad: Optional[float] = None,
        checkpoint_fn: Optional[Callable[[str], str]] = None, checkpoint_steps: int = 0, progress: bool = True,
        on_step: Optional[Callable[[TrainState], None]] = None,
) -> Dict[str, float]:
    """One epoch of training; resumes at ``state.step_in_epoch`` batches into the epoch.

    ``checkpoint_fn(name)`` is called every ``checkpoint_steps`` optimizer steps (not at the end of
    the epoch, which the caller checkpoints); ``on_step(state)`` after every batch, e.g. to log.
    """
    model.train()
    epoch = state.epoch
    steps = len(loader)
    skip = state.step_in_epoch
    loss_sum = torch.zeros((), device=accelerator.device)
    count = 0
    unwrapped = accelerator.unwrap_model(model)
    # A bar only on a terminal: in a log file it is noise; the caller prints a line per epoch anyway.
    show = progress and accelerator.is_local_main_process and sys.stderr.isatty()
    bar = tqdm(total=steps, initial=skip, desc=f'epoch {epoch}', leave=False, disable=not show)
    for i, (images, targets) in enumerate(loader):
        if i < skip:
            continue  # resumed mid-epoch: these batches were done before the checkpoint
        rate = schedule.step(epoch + i / steps)
        set_drop_prob(unwrapped, rate)
        state.peak_drop_rate = max(state.peak_drop_rate, rate)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with accelerator.accumulate(model):
            output = model(images)
            loss = loss_fn(output, targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad()
        loss_sum += loss.detach()
        count += 1
        state.global_step += 1
        state.step_in_epoch = i + 1
        if accelerator.sync_gradients:
            state.num_updates += 1
            lr_scheduler.step_update(num_updates=state.num_updates)
            if ema is not None:
                ema.update(unwrapped, step=state.num_updates)
            if checkpoint_fn is not None and checkpoint_steps and state.global_step % checkpoint_steps == 0 \
                    and state.step_in_epoch < steps:
                checkpoint_fn(f'step_{state.global_step:08d}')
        if on_step is not None:
            on_step(state)
        if show:  # loss.item() waits for the device
            bar.set_postfix(loss=f'{loss.item():.3f}', drop=f'{rate:.3f}')
            bar.update(1)
    bar.close()
    state.step_in_epoch = 0
    state.epoch = epoch + 1
    mean_loss = accelerator.reduce(loss_sum / max(count, 1), reduction='mean').item()
    return {'train_loss': mean_loss, 'drop_rate': schedule.rate, 'lr': optimizer.param_groups[0]['lr']}
