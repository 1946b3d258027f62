""" The run folder: checkpoints (atomic, resumable, checked before use), ``run.json``, the per-epoch
metrics files, and the results a published model's card shows.

    OUTPUT/checkpoints/epoch_0003/   accelerator.save_state + meta.json (the completion marker)
    OUTPUT/run.json                  settings, data read, progress, what DropCluster did
    OUTPUT/args.yaml                 the run's settings as train arguments (as timm's train.py)
    OUTPUT/metrics.json, metrics.csv one row per epoch; summary.csv as timm's train.py writes it
"""
import csv
import fcntl
import io
import json
import re
import os
import shutil
import socket
import time
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.nn as nn
import yaml
from accelerate.utils import broadcast_object_list, gather_object, load as accelerate_load
from safetensors import safe_open

from ..data import DataBundle, dataset_description, split_name
from ..destination import check_destination, overlaps
from ..errors import InputError, first_line
from ..files import read_json, write_atomic, write_json
from ..hub.run_results import RunResults
from ..layers.model_helpers import dropcluster_layers, nonfinite_tensor
from .config import TrainConfig
from .loop import TrainState
from .resume import CHECKPOINT_DIR, META_FILE
from .mid_epoch import RANK_STATE
from .run_state import STATE_JSON, STATE_TENSORS, save_run_state

__all__ = [
    'CHECKPOINT_DIR', 'RUN_FILE', 'META_FILE', 'list_checkpoints', 'find_checkpoint',
    'check_checkpoint_files', 'load_checkpoint', 'read_meta', 'run_identity', 'check_resume', 'check_output',
    'RESULTS', 'RECORDS', 'run_results_in', 'files_read', 'clear_results', 'write_run_file', 'best_metric_name', 'read_progress',
    'write_args_file',
    'save_checkpoint', 'MetricsLog', 'run_results',
]

RUN_FILE = 'run.json'
LOCK_FILE = '.lock'


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


def run_identity(model_name: str, num_classes: int) -> Dict[str, Any]:
    """What must match for a resume: the model and the classes."""
    return {'model': model_name, 'num_classes': num_classes}


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


# What a run leaves in its folder once it has trained: a new run there without --resume would replace
# it. A run stopped in its first epoch leaves only its records (RUN_FILE, args.yaml), which a new run rewrites.
RESULTS = (CHECKPOINT_DIR, 'best', 'last', 'metrics.json', 'metrics.csv', 'summary.csv')
RECORDS = (RUN_FILE, 'args.yaml')


def run_results_in(output: str, records: bool = False) -> List[str]:
    """The names of ``RESULTS`` (and with ``records``, of ``RECORDS``) present in ``output``."""
    return [name for name in RESULTS + (RECORDS if records else ()) if os.path.lexists(os.path.join(output, name))]


def check_output(output: str, checkpoint: Optional[str], resuming: bool = False, overwrite: bool = False,
                 reads: Sequence[Optional[str]] = ()) -> None:
    """Refuse, in one line, an output that cannot be written, one whose files would replace what the
    run reads (``reads``: weights it starts from), or a folder that holds a run's results unless this
    run resumes it (``resuming``: ``--resume`` names it) or ``overwrite`` is asked. A resumed folder
    must hold the checkpoint resumed from, or no checkpoint (a run stopped in its first epoch: it
    starts over there)."""
    check_destination(output, '--output', folder=True, overwrite=True)
    for name in RESULTS + RECORDS:  # what the run writes (or clears, with --overwrite)
        read = next((r for r in reads if r and overlaps(os.path.join(output, name), r)), None)
        if read:
            raise InputError(f'--output {output}: its {name} would replace {read}, which this run reads; choose '
                                'another --output')
    found = run_results_in(output) if os.path.isdir(output) else []
    if not found or overwrite:
        return
    ours = checkpoint is not None and os.path.realpath(checkpoint).startswith(
        os.path.realpath(os.path.join(output, CHECKPOINT_DIR)) + os.sep)
    if ours or (resuming and checkpoint is None and not list_checkpoints(output)):
        return
    what = 'another run' if list_checkpoints(output) else f'the results of a run ({", ".join(found)})'
    raise InputError(f'output folder {output} already holds {what}; resume it with --resume {output}, '
                        'choose another --output, or replace it with --overwrite')


def files_read(cfg: TrainConfig) -> List[str]:
    """The weights a run starts from, which its output must never replace: ``--initial-checkpoint``,
    ``--pretrained-path`` and a ``local-dir:`` model folder."""
    m = cfg.model
    reads = [m.initial_checkpoint, m.pretrained_path]
    if m.name.startswith('local-dir:'):
        reads.append(m.name[len('local-dir:'):])
    return [r for r in reads if r]


def clear_results(output: str) -> None:
    """Remove a run's results from ``output`` (``--overwrite``; main process, under the folder's lock)."""
    for name in run_results_in(output, records=True):
        path = os.path.join(output, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def lock_output(output: str):
    """Hold an exclusive lock on ``output`` for the run's lifetime (main process), so that a second run
    into the same folder stops at start. The system releases it when the process ends, however it
    ends, so the file a killed run leaves behind never blocks a resume. Returns the open lock file:
    closing it releases the lock."""
    try:
        os.makedirs(output, exist_ok=True)
        path = os.path.realpath(os.path.join(output, LOCK_FILE))
        f = open(path, 'a+')
    except OSError as e:
        raise InputError(f'--output {output}: cannot create the run folder ({e.strerror or first_line(e)})') from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or 'unknown process'
        f.close()
        raise InputError(f'--output {output} is in use by another run ({holder}); wait for it to end or '
                            'choose another --output') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    return f


SHARED_CHECK_FILE = '.shared_check'


def check_shared_output(accelerator, output: str) -> None:
    """On several machines, make sure every machine sees the same ``output`` folder: checkpoints and
    model folders are written by the global main process only, and a resume reads them everywhere.
    Node-local disks are refused at start, with one line."""
    local = int(os.environ.get('LOCAL_WORLD_SIZE', accelerator.num_processes))
    if accelerator.num_processes <= local:
        return  # one machine
    token = f'{socket.gethostname()}-{os.getpid()}-{time.time_ns()}'
    path = os.path.join(output, SHARED_CHECK_FILE)
    if accelerator.is_main_process:
        write_atomic(path, token)
    token = broadcast_object_list([token])[0]
    accelerator.wait_for_everyone()
    seen = True
    if accelerator.is_local_main_process:
        try:
            with open(path) as f:
                seen = f.read() == token
        except OSError:
            seen = False
    missing = [host for host, ok in gather_object([(socket.gethostname(), seen)]) if not ok]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.unlink(path)
    if missing:
        raise InputError(f'--output {output} is not one folder shared by all machines ({", ".join(missing)} '
                            'do not see what the main process writes there): put it on a shared file system; '
                            'node-local disks are not supported')


def write_run_file(output: str, config: Dict[str, Any], data_splits: Dict[str, str],
                   state: Optional[TrainState] = None, num_dropcluster_layers: int = 0,
                   resumed: Optional[Dict[str, Any]] = None) -> None:
    """Record the run in ``run.json`` (main process): its settings, the data it read and, as it goes,
    what it really did (epochs done, best value of the eval metric, peak DropCluster rate, re-clusterings). ``resumed``
    (checkpoint, position, settings changed from the command line) joins the list of the run's resumes."""
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, RUN_FILE)
    try:
        resumes = read_json(path).get('resumes', []) if os.path.isfile(path) else []
    except (OSError, ValueError, AttributeError):
        resumes = []
    if resumed is not None:
        resumes = list(resumes) + [{**resumed, 'changed': {k: list(v) for k, v in resumed['changed'].items()}}]
    record = {'config': config, 'data': data_splits}
    if resumes:
        record['resumes'] = resumes
    if state is not None:
        record['progress'] = {'epochs_done': state.epoch, 'eval_metric': best_metric_name(config),
                              'best_metric': state.best_metric, 'best_epoch': state.best_epoch}
        if num_dropcluster_layers:
            record['dropcluster'] = {'layers': num_dropcluster_layers, 'peak_rate': state.peak_drop_rate,
                                     'reclusterings': state.reclusterings,
                                     'soft_resets': state.soft_resets}
    write_json(path, record)


def best_metric_name(config: Dict[str, Any]) -> str:
    """The row key that picks ``best/`` for a run's config (``TrainConfig.to_dict()``): ``top1``,
    ``eval_loss``, ..., prefixed ``ema_`` when the EMA weights are evaluated and published."""
    optim = config.get('optim', {})
    metric = optim.get('eval_metric', 'top1')
    metric = 'eval_loss' if 'loss' in metric else metric
    return ('ema_' if optim.get('model_ema') else '') + metric


def read_progress(output: str) -> Dict[str, Any]:
    """The ``progress`` of a run folder's ``run.json`` (empty before the first epoch ends); files
    written before the best metric had its own name (``best_top1``, whatever the metric) are read
    as ``best_metric`` with the ``eval_metric`` of their config."""
    record = read_json(os.path.join(output, RUN_FILE))
    progress = dict(record.get('progress') or {})
    if 'best_top1' in progress and 'best_metric' not in progress:
        progress['best_metric'] = progress.pop('best_top1')
        progress['eval_metric'] = best_metric_name(record.get('config') or {})
    return progress


def write_args_file(output: str, args: Dict[str, Any]) -> None:
    """``args.yaml``: the run's settings as ``train`` arguments, as timm's train.py writes them (main
    process); ``-c args.yaml`` runs the same settings again."""
    write_atomic(os.path.join(output, 'args.yaml'), yaml.safe_dump(args, default_flow_style=False))


def save_checkpoint(accelerator, output: str, name: str, meta: Dict[str, Any], run_objects: Dict[str, Any],
                    keep: int = 2, per_process: Optional[Callable[[str], None]] = None) -> str:
    """``accelerator.save_state`` (model, optimizer, data order, random states) and the run's own
    state (``run_objects``, see ``run_state``) into a hidden temporary folder, renamed into place when
    complete.

    A crash mid-save leaves only the temporary folder, which is ignored (and cleared next time), so
    the previous checkpoint stays the newest usable one. Keeps the newest ``keep`` checkpoints.
    ``per_process(folder)`` writes each process's own files into it (every process calls it).
    """
    root = os.path.join(output, CHECKPOINT_DIR)
    final = os.path.join(root, name)
    tmp = os.path.join(root, '.tmp-' + name)
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if per_process is not None:
        per_process(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_run_state(tmp, run_objects)
        write_json(os.path.join(tmp, META_FILE), meta)  # the completion marker
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_checkpoints(output)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class MetricsLog:
    """Per-epoch metrics, rewritten after each epoch as ``metrics.json`` and ``metrics.csv`` (every
    column) and as timm's ``summary.csv`` (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr).

    Rows of an earlier run in the folder are kept for epochs before ``keep_epochs`` (those of the
    checkpoint a resume starts from) and dropped from there on; a fresh run keeps none.
    """

    def __init__(self, output: str, keep_epochs: int = 0):
        self.output = output
        self.rows: List[Dict[str, Any]] = []
        path = os.path.join(output, 'metrics.json')
        if keep_epochs > 0 and os.path.exists(path):
            self.rows = [r for r in read_json(path) if r.get('epoch', 0) < keep_epochs]

    def add(self, row: Dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if r.get('epoch') != row.get('epoch')] + [row]
        self.rows.sort(key=lambda r: r.get('epoch', 0))
        write_json(os.path.join(self.output, 'metrics.json'), self.rows)
        keys: List[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        self._write_csv('metrics.csv', keys, self.rows)
        summary = [{'epoch': r['epoch'], 'train_loss': r.get('train_loss'), 'eval_loss': r.get('eval_loss'),
                    'eval_top1': r.get('top1'), 'eval_top5': r.get('top5'), 'lr': r.get('lr')} for r in self.rows]
        self._write_csv('summary.csv', list(summary[0]), summary)

    def _write_csv(self, name: str, keys: List[str], rows: List[Dict[str, Any]]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(os.path.join(self.output, name), text.getvalue())


def run_results(cfg: TrainConfig, row: Dict[str, Any], state: TrainState, model: nn.Module, data: DataBundle,
                ema_decay: Optional[float] = None) -> RunResults:
    """Results and description of the weights a run publishes, for ``hub.save_pretrained``'s card:
    the EMA weights' metrics when EMA is on, the data set without local paths, what DropCluster did."""
    prefix = 'ema_' if ema_decay is not None else ''
    results = {k: row[prefix + k] for k in ('top1', 'top5', 'eval_loss')}
    results.update(epoch=row['epoch'], epochs=cfg.optim.epochs, split=split_name(data.splits['validation']),
                   weights='raw' if ema_decay is None else 'ema', ema_decay=ema_decay)
    results.update(dataset_description(cfg.data.dataset, cfg.data.data_dir))
    if 'input_size' in data.data_config:
        results['img_size'] = int(data.data_config['input_size'][-1])
    base = (getattr(model, 'pretrained_cfg', None) or {}).get('hf_hub_id')
    if cfg.model.pretrained and base:
        results['base_model'] = base  # a fine-tune of these weights
    if any(True for _ in dropcluster_layers(model)):
        results.update(peak_drop_rate=state.peak_drop_rate, reclusterings=state.reclusterings)
    if cfg.model.drop_block_rate:
        results['drop_block_rate'] = cfg.model.drop_block_rate
    return RunResults(**results)
