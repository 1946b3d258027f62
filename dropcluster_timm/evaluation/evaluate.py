""" Evaluation: top-1 / top-5 of a model over a (sharded) loader, and of a saved model on a data set,
clean or under common corruptions. The role of timm's ``validate.py``; the ``dropcluster-timm
evaluate`` command line calls ``evaluate_checkpoint``.
"""
import json
import os
import re
import sys
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import timm
from timm.data import create_transform, resolve_data_config
from timm.utils import accuracy

from .corruptions import SEVERITIES, check_corruptions, corruption_accuracy
from ..accelerate_state import scoped_accelerate_state
from ..data import EMBEDDED_DATASET, class_names, make_dataset, num_classes_of
from ..errors import InputError, classify
from ..models.names import register_architecture

__all__ = ['evaluate', 'evaluate_checkpoint', 'default_eval_dataset', 'format_corruption_report']


@torch.no_grad()
def evaluate(accelerator, model, loader, loss_fn=None, progress: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and loss over the whole (sharded) loader."""
    model.eval()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    loss_sum, top1, top5, n = 0.0, 0.0, 0.0, 0
    show = progress and accelerator.is_local_main_process and sys.stderr.isatty()
    for images, targets in tqdm(loader, desc='eval', leave=False, disable=not show):
        output = model(images)
        if isinstance(output, (tuple, list)):
            output = output[0]
        output, targets = accelerator.gather_for_metrics((output, targets))
        k = min(5, output.shape[-1])
        acc1, acc5 = accuracy(output.float(), targets, topk=(1, k))
        b = targets.shape[0]
        loss_sum += loss_fn(output.float(), targets).item() * b
        top1 += acc1.item() * b
        top5 += acc5.item() * b
        n += b
    n = max(n, 1)
    return {'eval_loss': loss_sum / n, 'top1': top1 / n, 'top5': top5 / n}


@scoped_accelerate_state()  # the caller's Accelerate state, as it was
def evaluate_checkpoint(
        checkpoint: str, dataset: str = '', data_dir: Optional[str] = None, split: str = 'validation',
        batch_size: int = 128, workers: int = 0, img_size: Optional[int] = None,
        corruptions: Optional[Sequence[str]] = None, severities: Sequence[int] = SEVERITIES,
        corruption_seed: int = 0,
) -> Dict[str, Any]:
    """Top-1 / top-5 of a saved model: a Hub-format folder (``best/``, ``last/``), ``local-dir:``
    or ``hf-hub:`` id, on a data set (default: the embedded digits validation split).

    With ``corruptions`` (names from ``corruptions.CORRUPTIONS``) it returns
    ``corruptions.corruption_accuracy``'s report instead: clean top-1 and top-1 under every
    corruption and severity, applied to the images after the evaluation resize and crop, before
    mean/std normalisation.
    """
    if corruptions is not None:
        try:
            check_corruptions(corruptions, severities)
        except ValueError as e:
            raise InputError(str(e)) from e
    if checkpoint.startswith(('hf-hub:', 'local-dir:')):
        name = checkpoint
    else:
        if not os.path.isfile(os.path.join(checkpoint, 'config.json')):
            raise InputError(f'{checkpoint!r} is not a model folder (no config.json)')
        name = 'local-dir:' + checkpoint
    if not dataset and not data_dir:
        dataset = default_eval_dataset(checkpoint)
    try:
        try:
            model = timm.create_model(name, pretrained=True)
        except RuntimeError as e:  # an architecture of an opt-in package (a pruned *_slim ResNet)
            unknown = re.fullmatch(r'Unknown model \((\S+)\)', str(e))
            if not unknown or not register_architecture(unknown.group(1)):
                raise
            model = timm.create_model(name, pretrained=True)
    except Exception as e:  # a wrong name or folder (exit 2), or the network or disk (exit 1)
        raise classify(e, f'cannot load {checkpoint!r}') from e
    data_config = resolve_data_config({'img_size': img_size} if img_size else {}, model=model)
    if corruptions is not None:
        # Corruptions act on [0, 1] pixels: the transform stops before normalisation, done on the batch.
        transform = create_transform(**dict(data_config, mean=(0., 0., 0.), std=(1., 1., 1.)), is_training=False)
    else:
        transform = create_transform(**data_config, is_training=False)
    ds = make_dataset(dataset, data_dir, split, False, transform, '--split')
    n = num_classes_of(ds)
    if n is not None and n != model.num_classes:
        raise InputError(f'the model has {model.num_classes} classes but the data set has {n}')
    trained, here = model.pretrained_cfg.get('label_names'), class_names(ds)
    if trained and here and list(trained) != here:  # labels are folder indices: the names must agree
        raise InputError(f'the data set classes {here[:5]} are not those the model was trained on, in order '
                            f'({list(trained)[:5]}): images would be scored against the wrong class')
    accelerator = Accelerator()
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    model, loader = accelerator.prepare(model, loader)
    if corruptions is None:
        return dict(evaluate(accelerator, model, loader, progress=True), num_images=len(ds), data=ds.source)
    mean = torch.tensor(data_config['mean'], device=accelerator.device).view(1, -1, 1, 1)
    std = torch.tensor(data_config['std'], device=accelerator.device).view(1, -1, 1, 1)
    return corruption_accuracy(
        model, loader, corruptions, severities, preprocess=lambda x: (x - mean) / std, seed=corruption_seed,
        gather=accelerator.gather_for_metrics)


def default_eval_dataset(checkpoint: str) -> str:
    """The embedded digits for a model folder trained on them (its ``metrics.json`` says so); any other
    model needs its evaluation data named, never a silent fallback to the digits."""
    folder = checkpoint[len('local-dir:'):] if checkpoint.startswith('local-dir:') else checkpoint
    path = os.path.join(folder, 'metrics.json')
    metrics = {}
    if not checkpoint.startswith('hf-hub:') and os.path.isfile(path):
        with open(path) as f:
            metrics = json.load(f)
    if metrics.get('dataset_type', metrics.get('dataset')) == EMBEDDED_DATASET:
        return EMBEDDED_DATASET
    trained_on = f' was trained on {metrics["dataset"]!r}' if metrics.get('dataset') else ''
    raise InputError(f'{checkpoint}{trained_on}: name its evaluation data with --data-dir DIR '
                        f'(and --dataset NAME for a timm data set, or --dataset {EMBEDDED_DATASET})')


def format_corruption_report(report: Dict[str, Any]) -> str:
    """A plain-text table of ``corruption_accuracy``'s report."""
    sevs = report['severities']
    lines = [f"{'corruption':<18}" + ''.join(f'{"s" + str(s):>8}' for s in sevs) + f"{'mean':>8}"]
    for name, accs in report['corruptions'].items():
        lines.append(f'{name:<18}' + ''.join(f'{a:8.2f}' for a in accs) + f"{report['mean_per_corruption'][name]:8.2f}")
    lines.append(f"clean top1 {report['top1']:.2f}  mean corruption top1 {report['mean_corruption_top1']:.2f}  "
                 f"({report['num_images']} images)")
    return '\n'.join(lines)
