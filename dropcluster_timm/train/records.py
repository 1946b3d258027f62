""" The run's records in its folder (main process): ``run.json`` (settings, data read, progress,
what DropCluster did, the resumes), ``args.yaml`` (the settings as ``train`` arguments, as timm's
train.py writes them), the per-epoch metrics files, and the results a published model's card shows.
"""
import csv
import io
import os
from typing import Any, Dict, List, Optional

import torch.nn as nn
import yaml

from ..data import DataBundle, dataset_description, split_name
from ..files import read_json, write_atomic, write_json
from ..hub.run_results import RunResults
from ..layers.model_helpers import dropcluster_layers
from .config import TrainConfig
from .layout import ARGS_FILE, RUN_FILE
from .loop import TrainState

__all__ = ['write_run_file', 'best_metric_name', 'read_progress', 'write_args_file', 'MetricsLog', 'run_results']


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
