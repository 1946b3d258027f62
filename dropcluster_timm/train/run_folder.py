""" Writing the run folder (``layout.py`` names its parts): the checks of the output before a run,
its lock, checkpoints written whole, ``run.json``, ``args.yaml``, the per-epoch metrics files, and
the results a published model's card shows. Reading a checkpoint back is ``resume.py``'s.
"""
import csv
import fcntl
import io
import os
import shutil
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.nn as nn
import yaml
from accelerate.utils import broadcast_object_list, gather_object

from ..data import DataBundle, dataset_description, split_name
from ..destination import check_destination, overlaps
from ..errors import InputError, first_line
from ..files import read_json, write_atomic, write_json
from ..hub.run_results import RunResults
from ..layers.model_helpers import dropcluster_layers
from .config import TrainConfig
from .loop import TrainState
from .layout import ARGS_FILE, CHECKPOINT_DIR, LOCK_FILE, META_FILE, RECORDS, RESULTS, RUN_FILE
from .resume import list_checkpoints
from .run_state import save_run_state

__all__ = [
    'run_identity', 'check_output', 'run_results_in', 'files_read', 'clear_results', 'lock_output',
    'check_shared_output', 'write_run_file', 'best_metric_name', 'read_progress', 'write_args_file',
    'save_checkpoint', 'MetricsLog', 'run_results',
]



def run_identity(model_name: str, num_classes: int) -> Dict[str, Any]:
    """What must match for a resume: the model and the classes."""
    return {'model': model_name, 'num_classes': num_classes}




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
    write_atomic(os.path.join(output, ARGS_FILE), yaml.safe_dump(args, default_flow_style=False))


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
