""" Resuming a run as timm's ``train.py`` does: the checkpoint gives the weights, the optimizer and the
position; the command line gives every setting.

So ``--resume OUTPUT --epochs 20`` extends a finished 10-epoch run: the learning-rate schedule and the
DropCluster ramp are rebuilt from the command line and stepped to the resumed position. What differs
from the checkpoint's run is logged one line per setting and recorded in ``run.json``. Settings that
cannot change mid-run (the model, its DropCluster layers, the input size, the global batch size that
the step counts are made of) are refused in one line, and so is a position that the checkpoint's two
records disagree on or that lies past ``--epochs``.
"""
import json
import os
from typing import Any, Dict, Optional, Tuple

from ..errors import InputError
from ..files import json_object_or_none
from .mid_epoch import load_rank_state
from .options import flat_settings

__all__ = ['CHECKPOINT_DIR', 'META_FILE', 'DEFAULT_OUTPUT', 'FIXED_SETTINGS', 'NothingToTrain', 'run_folder_of',
           'checkpoint_settings', 'changed_settings', 'check_changes', 'read_position', 'check_position',
           'check_global_batch']

CHECKPOINT_DIR = 'checkpoints'  # OUTPUT/checkpoints/<name>/
META_FILE = 'meta.json'  # a checkpoint's completion marker
DEFAULT_OUTPUT = 'output/train'  # a new run's folder when none is given, as timm's train.py

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
