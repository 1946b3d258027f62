""" Resuming a run as timm's ``train.py`` does: the checkpoint gives the weights, the optimizer and the
position; the command line gives every setting. Everything a resume reads and checks is here: finding
the checkpoint, its files (untrusted: read as data, never as code), its settings and position, and
putting the freshly built run at that position.

So ``--resume OUTPUT --epochs 20`` extends a finished 10-epoch run: the learning-rate schedule and the
DropCluster ramp are rebuilt from the command line and stepped to the resumed position. What differs
from the checkpoint's run is logged one line per setting and recorded in ``run.json``. Settings that
cannot change mid-run (the model, its DropCluster layers, the input size, the global batch size that
the step counts are made of) are refused in one line, and so is a position that the checkpoint's two
records disagree on or that lies past ``--epochs``.
"""
import copy
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from accelerate.utils import load as accelerate_load
from safetensors import safe_open

from ..errors import InputError, first_line
from ..files import json_object_or_none, read_json
from ..layers.model_helpers import nonfinite_tensor
from .layout import CHECKPOINT_DIR, META_FILE, RUN_FILE
from .mid_epoch import RANK_STATE, load_rank_state
from .options import flat_settings
from .run_state import STATE_JSON, STATE_TENSORS, load_run_state

__all__ = ['FIXED_SETTINGS', 'NothingToTrain', 'run_folder_of', 'list_checkpoints', 'find_checkpoint',
           'check_checkpoint_files', 'load_checkpoint', 'read_meta', 'check_resume', 'checkpoint_settings',
           'changed_settings', 'check_changes', 'read_position', 'check_position', 'check_global_batch',
           'ResumePoint', 'check_resume_point', 'resume_run', 'place_lr_schedule', 'continue_epoch']

# Settings a resumed run must keep: dotted TrainConfig keys, with why.
FIXED_SETTINGS = {
    'model.name': 'the weights belong to this architecture',
    'model.layer_options': 'the cluster maps and DropCluster layers are built from them',
    'model.kwargs': 'the architecture is built from them',
    'data.img_size': 'the cluster maps are made for one input size',
    'data.input_size': 'the cluster maps are made for one input size',
    'data.in_chans': 'the first layer is built for it',
    'data.num_classes': 'the classifier is built for it',
}
# Not settings of the training itself: where the folder is and how this start of the run was asked for.
_NOT_COMPARED = ('output.output', 'output.resume', 'output.no_resume_opt')


class NothingToTrain(Exception):
    """A finished run resumed with the same ``--epochs``: there is no epoch left; every file stays as it was."""


def run_folder_of(resume: str) -> str:
    """The run folder that ``--resume`` continues, so a run is never split over two folders: ``resume``
    itself, or for a checkpoint folder the run folder that holds it (``RUN/checkpoints/NAME``)."""
    path = os.path.normpath(resume)
    if os.path.isfile(os.path.join(path, META_FILE)):
        parent = os.path.dirname(path)
        if os.path.basename(parent) != CHECKPOINT_DIR:
            raise InputError(f'--resume {resume} is a checkpoint outside a run folder: give --output, the folder '
                             'the resumed run writes to')
        return os.path.dirname(parent) or '.'
    return resume


def list_checkpoints(output: str) -> List[str]:
    """Completed checkpoints of an output folder, oldest first (by global step)."""
    root = os.path.join(output, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if not n.startswith('.') and os.path.isfile(os.path.join(root, n, META_FILE))]
    paths = [os.path.join(root, n) for n in names]
    return sorted(paths, key=lambda p: read_json(os.path.join(p, META_FILE)).get('global_step', -1))


def find_checkpoint(path: str) -> Optional[str]:
    """A checkpoint folder, or the newest completed checkpoint of an output folder.

    ``None`` for a run folder that has no checkpoint yet (a run stopped in its first epoch): there
    is nothing to resume, so the run starts over there.
    """
    if not os.path.exists(path):
        raise InputError(f'resume checkpoint {path!r} does not exist')
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if os.path.isfile(os.path.join(path, RUN_FILE)):
        return None
    raise InputError(f'{path!r} holds no completed checkpoint to resume from')


# What a checkpoint holds: Accelerate's files (read with torch.load(weights_only=True): tensors and
# plain values, no code) and this package's data files. Anything else, a pickle of custom objects
# included, is refused.
CHECKPOINT_FILES = re.compile(r'(model(_\d+)?\.safetensors|optimizer(_\d+)?\.bin|sampler(_\d+)?\.bin|'
                              r'random_states_\d+\.pkl|scaler\.pt|' + RANK_STATE + '|'
                              + '|'.join(re.escape(n) for n in (STATE_JSON, STATE_TENSORS, META_FILE)) + ')')


def check_checkpoint_files(checkpoint: str) -> None:
    """Refuse files a checkpoint should not hold, and read every file for damage (zip CRCs of torch
    files, safetensors headers, weights that are NaN or inf) before any setup, so a broken resume fails
    at once and names the file."""
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if not CHECKPOINT_FILES.fullmatch(name) or not os.path.isfile(path):
            raise InputError(f'cannot resume from {checkpoint}: {name} is not a file this package writes into a '
                                'checkpoint (it is never loaded: remove it if you trust the rest of the folder)')
        if name == META_FILE:
            continue
        try:
            if name.endswith('.safetensors'):
                with safe_open(path, framework='pt') as f:
                    bad = nonfinite_tensor({k: f.get_tensor(k) for k in f.keys()})
                if bad is not None:
                    raise InputError(f'cannot resume from {checkpoint}: {name} holds NaN or inf values in {bad}; '
                                        f'resume from an earlier checkpoint in {os.path.dirname(checkpoint)}')
            elif name.endswith(('.bin', '.pkl', '.pt', '.pth')):
                with zipfile.ZipFile(path) as z:  # torch.save writes zip archives
                    bad = z.testzip()
                if bad is not None:
                    raise ValueError(f'checksum mismatch in {bad}')
                if name.startswith('random_states_'):
                    # Accelerate skips random states it cannot read: the resumed run would silently
                    # differ. Read them as it does (weights_only: plain values, no code) to refuse early.
                    accelerate_load(path)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f'cannot resume from {checkpoint}: {name} is damaged, truncated or not plain data '
                                f'({type(e).__name__}: {first_line(e)}); resume from an earlier checkpoint '
                                f'in {os.path.dirname(checkpoint)}') from e


def load_checkpoint(accelerator, checkpoint: str) -> None:
    """``accelerator.load_state`` with a one-line error."""
    try:
        accelerator.load_state(checkpoint)
    except Exception as e:
        raise InputError(f'cannot resume from {checkpoint}: {type(e).__name__}: {first_line(e)}') from e



def read_meta(checkpoint: str) -> Dict[str, Any]:
    """A checkpoint's ``meta.json``, with a one-line error when it is not a JSON object."""
    try:
        meta = read_json(os.path.join(checkpoint, META_FILE))
    except (OSError, ValueError) as e:
        raise InputError(f'cannot resume from {checkpoint}: {META_FILE}: {first_line(e)}') from None
    if not isinstance(meta, dict):
        raise InputError(f'cannot resume from {checkpoint}: {META_FILE} must hold a JSON object')
    return meta


def check_resume(checkpoint: str, identity: Dict[str, Any]) -> Dict[str, Any]:
    """Read a checkpoint's meta and check it belongs to a run of this model; returns the meta."""
    meta = read_meta(checkpoint)
    theirs = meta.get('identity', {})
    for key, value in identity.items():
        if theirs.get(key) != value:
            raise InputError(f'cannot resume from {checkpoint}: it was trained with {key}={theirs.get(key)!r}, '
                                f'this run has {key}={value!r}')
    return meta


def checkpoint_settings(checkpoint: str, meta: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The settings the checkpoint's run trained with: its ``meta.json``, or for older checkpoints the
    ``run.json`` of the run folder that holds it; None when neither says."""
    if isinstance(meta.get('config'), dict):
        return meta['config']
    record = json_object_or_none(os.path.join(os.path.dirname(os.path.dirname(checkpoint)), 'run.json'))
    return record.get('config') if record and isinstance(record.get('config'), dict) else None


def changed_settings(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` of the settings that differ (JSON-normalised: tuples are lists)."""
    old_flat, new_flat = (flat_settings(json.loads(json.dumps(tree)), whole=FIXED_SETTINGS) for tree in (old, new))
    return {k: (old_flat.get(k), v) for k, v in new_flat.items()
            if k not in _NOT_COMPARED and k in old_flat and old_flat[k] != v}


def check_changes(checkpoint: str, changes: Dict[str, Tuple[Any, Any]]) -> None:
    """Refuse, in one line, a change of a setting that cannot change mid-run."""
    for key, why in FIXED_SETTINGS.items():
        if key in changes:
            old, new = changes[key]
            raise InputError(f'cannot resume from {checkpoint} with {key} {new!r}: it trained with {old!r}, and '
                                f'{why}; start a new run (another --output) to change it')


def read_position(checkpoint: str, meta: Dict[str, Any]) -> Dict[str, int]:
    """The position (epoch, global_step, step_in_epoch) that ``meta.json`` and ``run_state.json`` agree
    on; a one-line error naming both when they do not (an edited or mixed-up checkpoint)."""
    state = (json_object_or_none(os.path.join(checkpoint, 'run_state.json')) or {}).get('state')
    position = {}
    for key in ('epoch', 'global_step', 'step_in_epoch'):
        recorded, saved = meta.get(key), state.get(key) if isinstance(state, dict) else None
        if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded < 0:
            raise InputError(f'cannot resume from {checkpoint}: meta.json {key} must be a count, got {recorded!r}')
        if saved is not None and saved != recorded:
            raise InputError(f'cannot resume from {checkpoint}: run_state.json: state.{key} is {saved!r} but meta.json '
                                f'says {recorded}; the checkpoint was edited or mixed up: resume from another one')
        position[key] = recorded
    return position


def check_position(checkpoint: str, position: Dict[str, int], epochs: int) -> None:
    """Refuse a position past ``--epochs``; raise ``NothingToTrain`` for a finished run."""
    epoch, step = position['epoch'], position['step_in_epoch']
    if epoch > epochs or (epoch == epochs and step > 0):
        raise InputError(f'cannot resume from {checkpoint} with --epochs {epochs}: it is at epoch {epoch}'
                            f'{f" (step {step})" if step else ""}; give --epochs {epoch + (1 if step else 0)} '
                            'or more to train on')
    if epoch == epochs:
        raise NothingToTrain(f'nothing to train: {checkpoint} finished all {epochs} epochs; give a larger --epochs '
                             'to train on')


def check_global_batch(checkpoint: str, meta: Dict[str, Any], global_batch: int) -> None:
    """Refuse a change of the images per optimizer step: the step counts of the schedules are made of it."""
    if meta.get('global_batch_size', global_batch) != global_batch:
        raise InputError(f'cannot resume from {checkpoint}: it trained with {meta["global_batch_size"]} images per '
                            f'optimizer step, this run has {global_batch} (--batch-size x processes x '
                            '--grad-accum-steps); keep them, or start a new run to change them')


def place_lr_schedule(accelerator, lr_scheduler, state, updates_per_epoch: int, grad_accum_steps: int) -> None:
    """Put the learning-rate schedule of a resumed run at its position, as timm's train.py steps it from the
    epoch: when the epoch length (in updates) differs from the checkpoint's (more images, another
    ``--train-batches-per-epoch``), at ``epoch * updates_per_epoch`` plus the updates done in the epoch,
    so the run ends its schedule where a run with these settings from the start ends it."""
    if state.updates_per_epoch is not None and state.updates_per_epoch != updates_per_epoch:
        placed = state.epoch * updates_per_epoch + state.step_in_epoch // grad_accum_steps
        accelerator.print(f'resume: the learning-rate schedule re-placed for {updates_per_epoch} updates per epoch '
                          f'(the checkpoint had {state.updates_per_epoch}): update {placed}, was {state.lr_updates}')
        state.lr_updates = placed
    lr_scheduler.step(state.epoch)
    lr_scheduler.step_update(num_updates=state.lr_updates)


def continue_epoch(accelerator, checkpoint: str, train_set, workers: int):
    """A resume inside an epoch: the training set reads its next batches from the random states they had
    (``mid_epoch``), and the epoch's losses so far come back; returns ``(loss sum, batches)``, or None
    when the checkpoint does not hold them (the resumed epoch's ``train_loss`` then covers only its rest)."""
    saved = load_rank_state(checkpoint, accelerator.process_index)
    if saved is None:
        accelerator.print(f'resume: {checkpoint} holds no state of this process inside its epoch (an older '
                          'checkpoint, or fewer processes): the epoch goes on with other random draws')
        return None
    states, loss_sum, batches = saved
    if workers == 0 and len(states) == 2:
        train_set.replay(states)
    else:
        accelerator.print('resume: with --workers above 0 the rest of the epoch sees other augmentation draws than '
                          'a run that never stopped (the loader processes keep their own random state)')
    return loss_sum, batches


@dataclass
class ResumePoint:
    """A checkpoint a run resumes from, checked before any setup: its ``meta.json`` and the settings
    the command line changes (``{dotted key: (old, new)}``)."""
    checkpoint: str
    meta: Dict[str, Any]
    changes: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)


def check_resume_point(cfg) -> Optional[ResumePoint]:
    """The checkpoint ``cfg.output.resume`` names, its files, settings and position checked in one-line
    errors (``NothingToTrain`` for a finished run); None without ``--resume`` or for a run folder that
    holds no checkpoint yet (it starts over)."""
    checkpoint = find_checkpoint(cfg.output.resume) if cfg.output.resume else None
    if checkpoint is None:
        return None
    check_checkpoint_files(checkpoint)
    meta = read_meta(checkpoint)
    changes = changed_settings(checkpoint_settings(checkpoint, meta) or {}, cfg.to_dict())
    check_changes(checkpoint, changes)
    check_position(checkpoint, read_position(checkpoint, meta), cfg.optim.epochs)
    return ResumePoint(checkpoint, meta, changes)


def resume_run(run, point: ResumePoint) -> Optional[Tuple[Any, int]]:
    """Put a freshly built run (``trainer.Run``) at ``point``: the run's own state (checked whole before
    anything is loaded), Accelerate's (weights, optimizer, data order, random states), the command
    line's schedules stepped to the position, and inside an epoch what continues it exactly. Returns
    the epoch's losses so far inside an epoch (``continue_epoch``), else None."""
    accelerator, cfg, state, schedule = run.accelerator, run.cfg, run.state, run.schedule
    fresh_optimizer = copy.deepcopy(run.optimizer.state_dict()) if cfg.output.no_resume_opt else None
    settings = schedule.state_dict()
    load_run_state(point.checkpoint, run.run_objects)
    load_checkpoint(accelerator, point.checkpoint)
    if fresh_optimizer is not None:
        run.optimizer.load_state_dict(fresh_optimizer)  # --no-resume-opt: the weights only
    schedule.load_state_dict(dict(settings, epoch=schedule.epoch))  # the command line's ramp, at the position
    schedule.step(schedule.epoch)
    for key, (old, new) in point.changes.items():
        accelerator.print(f'resume: {key} {old!r} -> {new!r} (from the command line)')
    place_lr_schedule(accelerator, run.lr_scheduler, state, run.updates_per_epoch, cfg.optim.grad_accum_steps)
    epoch_loss = None
    if state.step_in_epoch:
        epoch_loss = continue_epoch(accelerator, point.checkpoint, run.train_loader.dataset, cfg.data.workers)
    for hook in run.hooks:
        hook.after_resume(accelerator.unwrap_model(run.model, keep_torch_compile=False))
    accelerator.print(f'resumed from {point.checkpoint}: epoch {state.epoch}, step {state.global_step}, '
                      f'drop rate {schedule.rate:.4f}')
    return epoch_loss
