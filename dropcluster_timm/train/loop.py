""" The training loop of one epoch, with the drop rate stepped per batch, and the run's position."""
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from timm.utils import dispatch_clip_grad
from tqdm.auto import tqdm

from .config import TrainConfig
from .hooks import TrainHook
from .recipe import DropClusterRecipe

__all__ = ['TrainState', 'ADDED_STATE', 'train_one_epoch']

# TrainState fields that checkpoints written before them lack (they load with their defaults).
ADDED_STATE = ('lr_updates', 'updates_per_epoch', 'epoch_reclustered', 'epoch_soft_reset')


class TrainState:
    """Position and bookkeeping of a run, saved in checkpoints as data (``run_state``)."""

    added_keys = ADDED_STATE

    def __init__(self):
        self.epoch = 0  # the epoch in progress (or next to run)
        self.step_in_epoch = 0  # batches of ``epoch`` already done
        self.global_step = 0  # batches done in all
        self.num_updates = 0  # optimizer steps done
        # The learning-rate schedule's position in updates, and the epoch length (in updates) it was placed
        # for: a resume that changes the length re-places it. None: a checkpoint older than the field.
        self.lr_updates = 0
        self.updates_per_epoch = None
        self.epoch_reclustered = False  # what the start of the epoch in progress did, for its metrics row
        self.epoch_soft_reset = False
        self.best_metric = None  # the run's eval metric (records.best_metric_name) of the published weights
        self.best_epoch = None
        self.peak_drop_rate = 0.0  # what the run really did with DropCluster, for run.json and cards
        self.reclusterings = 0
        self.soft_resets = 0

    def state_dict(self):
        return dict(self.__dict__)

    def load_state_dict(self, state):
        missing = set(self.__dict__) - set(state) - set(ADDED_STATE)
        if missing or set(state) - set(self.__dict__):
            raise ValueError(f'a TrainState holds {sorted(self.__dict__)}, got {sorted(state)}')
        state = dict(state)
        state.setdefault('lr_updates', state['num_updates'])  # a checkpoint older than the field
        for key in ('epoch', 'step_in_epoch', 'global_step', 'num_updates', 'lr_updates', 'reclusterings', 'soft_resets'):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f'TrainState.{key} must be a count (an int >= 0), got {state[key]!r}')
        per_epoch = state.get('updates_per_epoch')
        if per_epoch is not None and (isinstance(per_epoch, bool) or not isinstance(per_epoch, int) or per_epoch < 1):
            raise ValueError(f'TrainState.updates_per_epoch must be a count >= 1, got {per_epoch!r}')
        self.__dict__.update(state)


def train_one_epoch(
        accelerator, model, loader, optimizer, loss_fn, lr_scheduler, recipe: DropClusterRecipe, state: TrainState,
        cfg: TrainConfig, ema=None, mixup_fn=None, checkpoint_fn: Optional[Callable[..., str]] = None,
        on_step: Optional[Callable[[TrainState], None]] = None, hooks: Sequence[TrainHook] = (),
        epoch_loss: Optional[Tuple[torch.Tensor, int]] = None,
) -> Dict[str, float]:
    """One epoch of training; resumes at ``state.step_in_epoch`` batches into the epoch (those batches
    are skipped without being loaded, Accelerate's ``skip_first_batches``).

    The ``recipe`` steps the drop rate every batch. ``cfg`` gives gradient clipping (``optim``),
    channels-last (``model``), and from ``output`` the batches of the epoch
    (``train_batches_per_epoch``), progress, checkpoint and device-sync settings. The loss stays on
    the device: the host waits for it only to print (a bar on a terminal, or a line every
    ``log_interval`` batches) and once at the end. ``checkpoint_fn(name)`` is called every
    ``checkpoint_steps`` batches (not at the end of the epoch, which the caller checkpoints) with
    ``epoch_loss``, the sum of this process's losses of the epoch so far and their count: a run
    resumed there passes them back, so the epoch's ``train_loss`` covers all its batches;
    ``on_step(state)`` after every batch. Every hook's ``before_step`` runs before each training step
    (EDropout scores and applies its states there).
    """
    o, out = cfg.optim, cfg.output
    clip_grad, clip_mode, max_steps = o.clip_grad, o.clip_mode, out.train_batches_per_epoch
    progress, log_interval, checkpoint_steps = out.progress, out.log_interval, out.checkpoint_steps
    model.train()
    epoch = state.epoch
    steps = min(len(loader), max_steps) if max_steps else len(loader)
    skip = state.step_in_epoch
    loss_sum = torch.zeros((), device=accelerator.device)
    count = 0
    if epoch_loss is not None:
        loss_sum += epoch_loss[0].to(accelerator.device)
        count = epoch_loss[1]
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    # A bar only on a terminal: in a log file it is noise; log_interval lines are printed there instead.
    # stdout when stderr is not a terminal: `accelerate launch` with one process pipes the latter.
    terminal = next((f for f in (sys.stderr, sys.stdout) if f.isatty()), None)
    bar_on = progress and accelerator.is_local_main_process and terminal is not None
    lines_on = progress and log_interval > 0 and not bar_on
    bar = tqdm(total=steps, initial=skip, desc=f'epoch {epoch}', leave=False, disable=not bar_on, file=terminal)
    batches = accelerator.skip_first_batches(loader, skip) if skip else loader
    for i, (images, targets) in enumerate(batches, start=skip):
        if i >= steps:
            break
        rate = recipe.step(unwrapped, epoch + i / steps)
        state.peak_drop_rate = max(state.peak_drop_rate, rate)
        if cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        for hook in hooks:
            hook.before_step(accelerator, unwrapped, images, targets, loss_fn, state)
        with accelerator.accumulate(model):
            output = model(images)
            loss = loss_fn(output, targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip_grad:
                if clip_mode == 'norm':
                    accelerator.clip_grad_norm_(model.parameters(), clip_grad)
                elif clip_mode == 'value':
                    accelerator.clip_grad_value_(model.parameters(), clip_grad)
                else:  # timm's adaptive gradient clipping, on unscaled gradients
                    accelerator.unscale_gradients()
                    dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
            optimizer.step()
            optimizer.zero_grad()
        loss_sum += loss.detach()
        count += 1
        state.global_step += 1
        state.step_in_epoch = i + 1
        if accelerator.sync_gradients:
            state.num_updates += 1
            state.lr_updates += 1
            lr_scheduler.step_update(num_updates=state.lr_updates)
            if ema is not None:
                ema.update(unwrapped, step=state.num_updates)
            if checkpoint_fn is not None and checkpoint_steps and state.global_step % checkpoint_steps == 0 \
                    and state.step_in_epoch < steps:
                checkpoint_fn(f'step_{state.global_step:08d}', epoch_loss=(loss_sum, count))
        if out.synchronize_step and accelerator.device.type == 'cuda':
            torch.cuda.synchronize()
        if on_step is not None:
            on_step(state)
        if bar_on:  # loss.item() waits for the device: only to show it
            bar.set_postfix(loss=f'{loss.item():.3f}', drop=f'{rate:.3f}')
            bar.update(1)
        elif lines_on and (i + 1) % log_interval == 0:
            accelerator.print(f'epoch {epoch} [{i + 1}/{steps}] loss {loss.item():.4f} drop {rate:.4f} '
                              f'lr {optimizer.param_groups[0]["lr"]:.3g}')
    bar.close()
    state.step_in_epoch = 0
    state.epoch = epoch + 1
    mean_loss = accelerator.reduce(loss_sum / max(count, 1), reduction='mean').item()
    return {'train_loss': mean_loss, 'drop_rate': recipe.schedule.rate, 'lr': optimizer.param_groups[0]['lr']}
