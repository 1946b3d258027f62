""" Training support for ``train_timm.py``: data, model, DropCluster control, loops, checkpoints, outputs.

``train_timm.py`` stays a thin script (parse, build, loop, save); the pieces live here, where they
are tested. Errors a user can fix (missing data, unknown model, class-count mismatch, incompatible
resume, occupied output folder, push without credentials) raise ``TrainingError`` with a one-line
reason; the script prints it and exits with status 2.
"""
import csv
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import timm
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.utils import accuracy

from .corruptions import CORRUPTIONS, SEVERITIES, _check_names, corruption_accuracy
from .model_helpers import copy_cluster_state, dropcluster_layers, set_drop_prob, update_clusters
from .schedules import DropClusterSchedule

__all__ = [
    'TrainingError', 'DigitsDataset', 'TrainState', 'DataBundle', 'EMBEDDED_DATASET', 'TRAIN_SPLITS', 'EVAL_SPLITS',
    'find_split_folder', 'dataset_description', 'build_data', 'set_transforms', 'init_cluster_maps',
    'check_args', 'build_model', 'configure_dropcluster', 'push_folder', 'make_schedule', 'schedule_warnings',
    'cluster_batch', 'recluster', 'train_one_epoch', 'evaluate', 'save_checkpoint', 'find_checkpoint',
    'check_checkpoint_files', 'load_checkpoint', 'use_cpu_cores', 'check_resume', 'check_output', 'write_run_file',
    'check_push_credentials', 'MetricsLog', 'run_card_metrics', 'save_model_folder', 'evaluate_checkpoint',
    'cluster_state',
]

EMBEDDED_DATASET = 'digits'
CHECKPOINT_DIR = 'checkpoints'
RUN_FILE = 'run.json'
META_FILE = 'meta.json'


class TrainingError(Exception):
    """A problem the user can fix; ``str()`` is a one-line reason."""


# ----------------------------------------------------------------------------------------------
# Data


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) as RGB PIL images.

    Ships inside scikit-learn, so it works offline. A fixed stratified split: 20% validation.
    """

    def __init__(self, split: str = 'train', transform=None):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover
            raise TrainingError('the embedded digits data set needs scikit-learn: pip install scikit-learn') from e
        from PIL import Image
        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        targets = digits.target.astype(np.int64)
        rng = np.random.RandomState(0)
        val = np.zeros(len(targets), dtype=bool)
        for c in range(10):
            idx = np.flatnonzero(targets == c)
            val[rng.permutation(idx)[:len(idx) // 5]] = True
        if split in ('train', 'training'):
            keep = ~val
        elif split in ('validation', 'val', 'test', 'eval'):
            keep = val
        else:
            raise TrainingError(f'unknown split {split!r} for the digits data set (train or validation)')
        self.images = [Image.fromarray(im).convert('RGB') for im in images[keep]]
        self.targets = targets[keep].tolist()
        self.transform = transform
        self.classes = [str(c) for c in range(10)]
        self.source = f'{EMBEDDED_DATASET}:{"train" if split in ("train", "training") else "validation"}'

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _num_classes(ds) -> Optional[int]:
    if hasattr(ds, 'classes'):
        return len(ds.classes)
    reader = getattr(ds, 'reader', None)
    if reader is not None and getattr(reader, 'class_to_idx', None):
        return len(reader.class_to_idx)
    return None


# Folder names tried for a split after the name given: timm's synonyms, plus 'test' for evaluation.
# Unlike timm's folder search, the root itself is never a fallback: it holds every split, the
# training images included.
TRAIN_SPLITS = ('train', 'training')
EVAL_SPLITS = ('validation', 'val', 'valid', 'eval', 'evaluation', 'test')
_FOLDER_DATASETS = ('', 'folder', 'image_folder', 'imagefolder')


def is_folder_dataset(dataset: str, data_dir: Optional[str]) -> bool:
    """Whether ``dataset`` / ``data_dir`` name an ImageFolder root with one sub-folder per split."""
    return dataset.lower() in _FOLDER_DATASETS and data_dir is not None and os.path.isdir(data_dir)


def find_split_folder(data_dir: str, split: str, flag: str) -> str:
    """The folder of ``split`` in an ImageFolder root: ``data_dir/split``, else the first synonym
    present (``TRAIN_SPLITS`` or ``EVAL_SPLITS``, whichever holds ``split``).

    Raises ``TrainingError`` naming the folders found and ``flag`` (the option that names a split)
    when there is none; never returns ``data_dir`` itself.
    """
    path = os.path.join(data_dir, split)
    if os.path.isdir(path):
        return path
    for synonyms in (TRAIN_SPLITS, EVAL_SPLITS):
        if split in synonyms:
            for name in synonyms:
                if os.path.isdir(os.path.join(data_dir, name)):
                    return os.path.join(data_dir, name)
    found = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    raise TrainingError(f'no {split!r} split folder in {data_dir} (folders found: {", ".join(found) or "none"}); '
                        f'name one with {flag}')


def _make_dataset(dataset: str, data_dir: Optional[str], split: str, is_training: bool, transform,
                  flag: str = '--split'):
    if not dataset and not data_dir:
        dataset = EMBEDDED_DATASET
    if dataset == EMBEDDED_DATASET:
        return DigitsDataset(split, transform)
    if data_dir is None or not os.path.exists(data_dir):
        raise TrainingError(f'data folder {data_dir!r} does not exist')
    root, search_split = data_dir, True
    if is_folder_dataset(dataset, data_dir):
        root, search_split = find_split_folder(data_dir, split, flag), False
    try:
        ds = create_dataset(dataset, root=root, split=split, is_training=is_training, search_split=search_split)
    except Exception as e:
        raise TrainingError(f'cannot read data set {dataset or "ImageFolder"} split {split!r} in {root}: '
                            f'{_first_line(e)}') from e
    if len(ds) == 0:
        raise TrainingError(f'data set split {split!r} in {root} is empty')
    ds.source = root if not search_split else f'{dataset}:{split}'
    if transform is not None:
        ds.transform = transform
    return ds


@dataclass
class DataBundle:
    train: Dataset
    eval: Dataset
    cluster: Dataset  # training images with the evaluation transform, for re-clustering
    num_classes: int
    data_config: Dict[str, Any]
    splits: Dict[str, str] = field(default_factory=dict)  # split -> folder (or dataset:split) it was read from


def dataset_description(dataset: str, data_dir: Optional[str]) -> Dict[str, str]:
    """How cards name the data set: ``dataset`` (shown), ``dataset_type``, and ``dataset_id`` only
    for a Hub data set (``hfds/org/name``); never a local path."""
    if dataset == EMBEDDED_DATASET or (not dataset and not data_dir):
        return {'dataset': 'scikit-learn handwritten digits', 'dataset_type': EMBEDDED_DATASET}
    if dataset.lower() in _FOLDER_DATASETS:
        return {'dataset': os.path.basename(os.path.realpath(data_dir)), 'dataset_type': 'imagefolder'}
    prefix, _, name = dataset.partition('/')
    if prefix.lower() in ('hfds', 'hfids') and name:
        return {'dataset': name, 'dataset_type': name, 'dataset_id': name}
    return {'dataset': name or dataset, 'dataset_type': name or dataset}


def build_data(args) -> DataBundle:
    """Datasets from timm's factory (or the embedded digits), without transforms yet (``set_transforms``
    adds them once the model, which decides the input size and normalisation, exists).

    Refuses a validation split that is, contains or lies inside the training split's folder."""
    train = _make_dataset(args.dataset, args.data_dir, args.train_split, True, None, '--train-split')
    val = _make_dataset(args.dataset, args.data_dir, args.val_split, False, None, '--val-split')
    if is_folder_dataset(args.dataset, args.data_dir):
        t, v = os.path.realpath(train.source), os.path.realpath(val.source)
        if t == v or v.startswith(t + os.sep) or t.startswith(v + os.sep):
            raise TrainingError(f'the validation split {val.source} overlaps the training split {train.source}; '
                                'name a held-out folder with --val-split')
    cluster = _make_dataset(args.dataset, args.data_dir, args.train_split, False, None, '--train-split')
    n_train, n_val = _num_classes(train), _num_classes(val)
    if n_train is not None and n_val is not None and n_train != n_val:
        raise TrainingError(f'the train split has {n_train} classes but the validation split has {n_val}')
    return DataBundle(train, val, cluster, n_train or args.num_classes, {},
                      splits={'train': train.source, 'validation': val.source})


def set_transforms(data: DataBundle, args, model: nn.Module) -> Dict[str, Any]:
    """timm's ``resolve_data_config`` / ``create_transform`` for the model; returns the data config."""
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    data.train.transform = create_transform(
        **data_config, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob)
    data.eval.transform = create_transform(**data_config, is_training=False)
    data.cluster.transform = data.eval.transform
    data.data_config = data_config
    return data_config


# ----------------------------------------------------------------------------------------------
# Model


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_args(args) -> None:
    """One-line errors for settings that cannot work, before any setup is spent on them."""
    def fail(flag, value, expected):
        raise TrainingError(f'{flag} must be {expected}, got {value:g}')

    for flag, value in (('--drop-cluster', args.drop_cluster), ('--drop-block', args.drop_block),
                        ('--drop', args.drop), ('--drop-path', args.drop_path), ('--smoothing', args.smoothing),
                        ('--reprob', args.reprob)):
        if value is not None and not 0.0 <= value < 1.0:
            fail(flag, value, 'in [0, 1)')
    for flag, value in (('--epochs', args.epochs), ('--batch-size', args.batch_size),
                        ('--grad-accum-steps', args.grad_accum_steps),
                        ('--drop-cluster-update-batches', args.drop_cluster_update_batches),
                        ('--cluster-size', args.cluster_size), ('--num-clusters', args.num_clusters),
                        ('--img-size', args.img_size)):
        if value is not None and value < 1:
            fail(flag, value, '>= 1')
    for flag, value in (('--drop-cluster-start', args.drop_cluster_start),
                        ('--drop-cluster-warmup', args.drop_cluster_warmup),
                        ('--drop-cluster-update-freq', args.drop_cluster_update_freq),
                        ('--warmup-epochs', args.warmup_epochs), ('--workers', args.workers),
                        ('--checkpoint-steps', args.checkpoint_steps), ('--checkpoint-hist', args.checkpoint_hist),
                        ('--mixup', args.mixup), ('--cutmix', args.cutmix), ('--min-lr', args.min_lr)):
        if value is not None and value < 0:
            fail(flag, value, '>= 0')
    if not args.lr > 0:
        fail('--lr', args.lr, '> 0')
    if args.model_ema and not 0.0 < args.model_ema_decay < 1.0:
        fail('--model-ema-decay', args.model_ema_decay, 'in (0, 1)')


def build_model(args, num_classes: Optional[int]) -> nn.Module:
    """``timm.create_model`` with the script's options; checks the model name and class count."""
    name = args.model
    is_file_model = name.startswith(('hf-hub:', 'local-dir:'))
    if not is_file_model and not timm.is_model(name):
        raise TrainingError(f'unknown model {name!r} (see timm.list_models("*dropcluster*"))')
    if args.num_classes is not None and num_classes is not None and args.num_classes != num_classes:
        raise TrainingError(f'--num-classes {args.num_classes} does not match the data set, which has '
                            f'{num_classes} classes')
    kwargs = dict(
        pretrained=args.pretrained,
        num_classes=num_classes or args.num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
    )
    if 'dropcluster' in name and not is_file_model:
        # The zoo's arguments, recorded in config.json; the rate is driven by the schedule.
        kwargs.update(drop_cluster_prob=0.0, dc_cluster_method=args.cluster_method,
                      dc_cluster_size=args.cluster_size, dc_num_clusters=args.num_clusters)
        size = args.input_size[-2:] if args.input_size else args.img_size
        if size:
            kwargs['img_size'] = size
    kwargs.update(getattr(args, 'model_kwargs', None) or {})
    if args.initial_checkpoint:
        kwargs['checkpoint_path'] = args.initial_checkpoint
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as e:
        raise TrainingError(f'cannot create model {name!r}: {_first_line(e)}') from e
    return model


def configure_dropcluster(model: nn.Module, args) -> int:
    """Apply ``--cluster-method``, ``--cluster-size`` and ``--num-clusters`` to every DropCluster layer."""
    count = 0
    for _, layer in dropcluster_layers(model):
        if args.cluster_method:
            layer.cluster_method = args.cluster_method
        if args.cluster_size:
            layer.cluster_size = int(args.cluster_size)
            layer.num_clusters = 0
        if args.num_clusters:
            layer.num_clusters = int(args.num_clusters)
        count += 1
    return count


@torch.no_grad()
def init_cluster_maps(model: nn.Module, input_size: Sequence[int]) -> int:
    """Give every DropCluster layer whose map is still empty its grid map for ``input_size`` (C, H, W).

    So that every checkpoint carries the cluster state (empty buffers are not saved by safetensors).
    """
    from .clustering import grid_cluster_map
    from .model_helpers import _unwrap
    model = _unwrap(model)
    empty = [layer for _, layer in dropcluster_layers(model) if layer.cluster_map.numel() == 0]
    if not empty:
        return 0
    done = []

    def hook(layer, args):
        x = args[0]
        spatial = list(x.shape[2:])
        grid = grid_cluster_map(spatial, layer.target_clusters(spatial), layer.cluster_map.device)
        layer.set_cluster_map(grid.reshape([1] + spatial))
        done.append(layer)

    handles = [layer.register_forward_pre_hook(hook) for layer in empty]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        p = next(model.parameters())
        model(torch.zeros((1, *input_size), device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return len(done)


def make_schedule(args, steps_per_epoch: int) -> DropClusterSchedule:
    return DropClusterSchedule(
        target=args.drop_cluster,
        start_epoch=args.drop_cluster_start,
        warmup_epochs=args.drop_cluster_warmup,
        shape=args.drop_cluster_shape,
        update_freq=args.drop_cluster_update_freq,
        steps_per_epoch=steps_per_epoch,
    )


def schedule_warnings(schedule: DropClusterSchedule, num_epochs: int) -> List[str]:
    """What a run of ``num_epochs`` epochs with ``schedule`` will not do that a user may expect."""
    if schedule.target == 0.0:
        return ['--drop-cluster is 0: the DropCluster layers stay off for the whole run']
    warnings = []
    peak = schedule.peak_rate(num_epochs)
    if peak == 0.0:
        warnings.append(f'DropCluster never switches on: the rate stays 0 for all {num_epochs} epochs '
                        f'(--drop-cluster-start {schedule.start_epoch:g} >= --epochs {num_epochs})')
    elif peak < schedule.target - 1e-12:
        warnings.append(f'the drop rate reaches only {peak:.4f} of --drop-cluster {schedule.target:g} by the last '
                        f'epoch (--drop-cluster-start {schedule.start_epoch:g} + --drop-cluster-warmup '
                        f'{schedule.warmup_epochs:g} > --epochs {num_epochs})')
    if peak > 0.0 and not schedule.update_epochs(num_epochs):
        warnings.append(f'the clusters are never re-computed (--drop-cluster-update-freq {schedule.update_freq}): '
                        'the layers keep their grid maps')
    return warnings


def cluster_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{layer name: cluster_map}`` (CPU copies) of every DropCluster layer."""
    from .model_helpers import _unwrap
    return {name: layer.cluster_map.detach().cpu().clone() for name, layer in dropcluster_layers(_unwrap(model))}


def cluster_batch(dataset: Dataset, batch_size: int, num_batches: int, seed: int) -> torch.Tensor:
    """``num_batches * batch_size`` training images (evaluation transform), chosen by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    n = min(len(dataset), batch_size * max(1, num_batches))
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    return torch.stack([dataset[i][0] for i in idx])


def recluster(accelerator, model, ema, dataset, args, epoch: int) -> None:
    """Re-cluster every DropCluster layer, identically on every process; EMA copies follow."""
    images = cluster_batch(dataset, args.batch_size, args.drop_cluster_update_batches, args.seed * 1000 + epoch)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + epoch)
    unwrapped = accelerator.unwrap_model(model)
    # Full precision (no autocast): the clustering compares activations.
    update_clusters(unwrapped, images.to(accelerator.device), generator=generator)
    if ema is not None:
        copy_cluster_state(unwrapped, ema.module)


# ----------------------------------------------------------------------------------------------
# Loops


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
        checkpoint_fn=None, checkpoint_steps: int = 0, progress: bool = True,
) -> Dict[str, float]:
    """One epoch of training; resumes at ``state.step_in_epoch`` batches into the epoch."""
    from tqdm.auto import tqdm
    model.train()
    epoch = state.epoch
    steps = len(loader)
    skip = state.step_in_epoch
    loss_sum = torch.zeros((), device=accelerator.device)
    count = 0
    unwrapped = accelerator.unwrap_model(model)
    crash_at = int(os.environ.get('DROPCLUSTER_TIMM_CRASH_AT_STEP', '0'))  # tests: a real kill
    # A bar only on a terminal: in a log file it is noise; the script prints a line per epoch anyway.
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
        if crash_at and state.global_step == crash_at:
            accelerator.wait_for_everyone()
            os.kill(os.getpid(), 9)
        if show:  # loss.item() waits for the device
            bar.set_postfix(loss=f'{loss.item():.3f}', drop=f'{rate:.3f}')
            bar.update(1)
    bar.close()
    state.step_in_epoch = 0
    state.epoch = epoch + 1
    mean_loss = accelerator.reduce(loss_sum / max(count, 1), reduction='mean').item()
    return {'train_loss': mean_loss, 'drop_rate': schedule.rate, 'lr': optimizer.param_groups[0]['lr']}


@torch.no_grad()
def evaluate(accelerator, model, loader, loss_fn=None, progress: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and loss over the whole (sharded) loader."""
    from tqdm.auto import tqdm
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


# ----------------------------------------------------------------------------------------------
# Output folder, checkpoints, resume


def _write_json_atomic(path: str, data) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _checkpoint_key(name: str):
    kind, _, number = name.partition('_')
    return int(number) if number.isdigit() else -1


def list_checkpoints(output: str) -> List[str]:
    """Completed checkpoints of an output folder, oldest first (by global step)."""
    root = os.path.join(output, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if not n.startswith('.') and os.path.isfile(os.path.join(root, n, META_FILE))]
    paths = [os.path.join(root, n) for n in names]
    return sorted(paths, key=lambda p: _read_json(os.path.join(p, META_FILE)).get('global_step', -1))


def _read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def find_checkpoint(path: str) -> Optional[str]:
    """A checkpoint folder, or the newest completed checkpoint of an output folder.

    ``None`` for a run folder that has no checkpoint yet (a run stopped in its first epoch): there
    is nothing to resume, so the run starts over there.
    """
    if not os.path.exists(path):
        raise TrainingError(f'resume checkpoint {path!r} does not exist')
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if os.path.isfile(os.path.join(path, RUN_FILE)):
        return None
    raise TrainingError(f'{path!r} holds no completed checkpoint to resume from')


def check_checkpoint_files(checkpoint: str) -> None:
    """Read every file of a checkpoint for damage (zip CRCs of torch files, safetensors headers)
    before any setup, so a broken resume fails at once and names the file."""
    import zipfile
    from safetensors import safe_open
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path) or name == META_FILE:
            continue
        try:
            if name.endswith('.safetensors'):
                with safe_open(path, framework='pt') as f:
                    f.keys()
            elif name.endswith(('.bin', '.pkl', '.pt', '.pth')):
                with zipfile.ZipFile(path) as z:  # torch.save writes zip archives
                    bad = z.testzip()
                if bad is not None:
                    raise ValueError(f'checksum mismatch in {bad}')
        except Exception as e:
            raise TrainingError(f'cannot resume from {checkpoint}: {name} is damaged or truncated '
                                f'({type(e).__name__}: {_first_line(e)}); resume from an earlier checkpoint '
                                f'in {os.path.dirname(checkpoint)}') from e


def load_checkpoint(accelerator, checkpoint: str) -> None:
    """``accelerator.load_state`` with a one-line error."""
    try:
        accelerator.load_state(checkpoint)
    except Exception as e:
        raise TrainingError(f'cannot resume from {checkpoint}: {type(e).__name__}: {_first_line(e)}') from e


def use_cpu_cores(accelerator) -> int:
    """On the CPU, give each local process its share of the cores (``accelerate launch`` starts
    processes with one thread each); an affinity mask (``taskset``) limits the share. Returns the
    thread count."""
    if accelerator.device.type == 'cpu':
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        local = int(os.environ.get('LOCAL_WORLD_SIZE', accelerator.num_processes))
        share = max(1, cores // max(1, local))
        if torch.get_num_threads() < share:
            torch.set_num_threads(share)
    return torch.get_num_threads()


def run_identity(args) -> Dict[str, Any]:
    """What must match for a resume: the model and the classes."""
    return {'model': args.model, 'num_classes': args.num_classes}


def check_resume(checkpoint: str, identity: Dict[str, Any]) -> Dict[str, Any]:
    """Read a checkpoint's meta and check it belongs to a run of this model; returns the meta."""
    meta = _read_json(os.path.join(checkpoint, META_FILE))
    theirs = meta.get('identity', {})
    for key, value in identity.items():
        if theirs.get(key) != value:
            raise TrainingError(f'cannot resume from {checkpoint}: it was trained with {key}={theirs.get(key)!r}, '
                                f'this run has {key}={value!r}')
    return meta


def check_output(output: str, checkpoint: Optional[str]) -> None:
    """Refuse an output that is a file, or a folder holding checkpoints of another run unless this
    run resumes from one of them. A folder with no checkpoint (a run stopped in its first epoch)
    is reused: it holds nothing to resume."""
    existing = output
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise TrainingError(f'--output {output}: {existing} is a file, not a folder')
    if list_checkpoints(output):
        same = checkpoint is not None and os.path.realpath(checkpoint).startswith(
            os.path.realpath(os.path.join(output, CHECKPOINT_DIR)) + os.sep)
        if not same:
            raise TrainingError(f'output folder {output} already holds another run; '
                                f'resume it with --resume {output} or choose another --output')


def write_run_file(output: str, args_dict: Dict[str, Any], data_splits: Dict[str, str],
                   state: Optional['TrainState'] = None, num_dropcluster_layers: int = 0) -> None:
    """Record the run in ``run.json`` (main process): its arguments, the data it read and, as it goes,
    what it really did (epochs done, best top-1, peak DropCluster rate, re-clusterings)."""
    os.makedirs(output, exist_ok=True)
    record = {'args': args_dict, 'data': data_splits}
    if state is not None:
        record['progress'] = {'epochs_done': state.epoch, 'best_top1': state.best_top1,
                              'best_epoch': state.best_epoch}
        if num_dropcluster_layers:
            record['dropcluster'] = {'layers': num_dropcluster_layers, 'peak_rate': state.peak_drop_rate,
                                     'reclusterings': state.reclusterings}
    _write_json_atomic(os.path.join(output, RUN_FILE), record)


def save_checkpoint(accelerator, output: str, name: str, meta: Dict[str, Any], keep: int = 2) -> str:
    """``accelerator.save_state`` into a hidden temporary folder, renamed into place when complete.

    A crash mid-save leaves only the temporary folder, which is ignored (and cleared next time), so
    the previous checkpoint stays the newest usable one. Keeps the newest ``keep`` checkpoints.
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
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomic(os.path.join(tmp, META_FILE), meta)  # the completion marker
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_checkpoints(output)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_push_credentials(repo_id: str) -> None:
    """Fail early, with a one-line reason, when pushing cannot work (the zoo's own push checks)."""
    from .hub import resolve_push_token
    try:
        resolve_push_token(repo_id)
    except ValueError as e:
        raise TrainingError(f'--push-to-hub: {e}') from e
    except RuntimeError as e:
        raise TrainingError(f'--push-to-hub needs Hugging Face credentials: {e}') from e


def push_folder(folder: str, repo_id: str, private: bool = False) -> str:
    """Upload a model folder (safetensors, config, card, picture; never pickles) to the Hub.

    Through the model zoo's ``dropcluster_timm.hub.push``."""
    from .hub import push
    try:
        info = push(folder, repo_id, private=private, commit_message='Add DropCluster model trained with train_timm.py')
    except Exception as e:
        raise TrainingError(f'push to {repo_id} failed: {_first_line(e)}') from e
    return str(info)


# ----------------------------------------------------------------------------------------------
# Metrics, model folders, pictures


class MetricsLog:
    """Per-epoch metrics, rewritten as ``metrics.json`` and ``metrics.csv`` after each epoch.

    Rows of an earlier run in the folder are kept for epochs before ``keep_epochs`` (those of the
    checkpoint a resume starts from) and dropped from there on; a fresh run keeps none.
    """

    def __init__(self, output: str, keep_epochs: int = 0):
        self.output = output
        self.rows: List[Dict[str, Any]] = []
        path = os.path.join(output, 'metrics.json')
        if keep_epochs > 0 and os.path.exists(path):
            self.rows = [r for r in _read_json(path) if r.get('epoch', 0) < keep_epochs]

    def add(self, row: Dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if r.get('epoch') != row.get('epoch')] + [row]
        self.rows.sort(key=lambda r: r.get('epoch', 0))
        _write_json_atomic(os.path.join(self.output, 'metrics.json'), self.rows)
        keys: List[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        tmp = os.path.join(self.output, 'metrics.csv.tmp')
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, os.path.join(self.output, 'metrics.csv'))


def split_name(source: str) -> str:
    """The split's name from a ``DataBundle.splits`` entry (a folder, or ``dataset:split``)."""
    return os.path.basename(source.rpartition(':')[2].rstrip(os.sep))


def run_card_metrics(args, row: Dict[str, Any], state: 'TrainState', model: nn.Module, data: 'DataBundle',
                     ema_decay: Optional[float] = None) -> Dict[str, Any]:
    """Results and description of the weights a run publishes, for ``hub.save_pretrained``'s card:
    the EMA weights' metrics when EMA is on, the data set without local paths, what DropCluster did."""
    prefix = 'ema_' if ema_decay is not None else ''
    metrics = {k: row[prefix + k] for k in ('top1', 'top5', 'eval_loss')}
    metrics.update(epoch=row['epoch'], epochs=args.epochs, split=split_name(data.splits['validation']),
                   weights='raw' if ema_decay is None else 'ema')
    metrics.update(dataset_description(args.dataset, args.data_dir))
    if ema_decay is not None:
        metrics['ema_decay'] = ema_decay
    if 'input_size' in data.data_config:
        metrics['img_size'] = int(data.data_config['input_size'][-1])
    base = (getattr(model, 'pretrained_cfg', None) or {}).get('hf_hub_id')
    if args.pretrained and base:
        metrics['base_model'] = base  # a fine-tune of these weights
    if any(True for _ in dropcluster_layers(model)):
        metrics.update(peak_drop_rate=state.peak_drop_rate, reclusterings=state.reclusterings)
    if args.drop_block:
        metrics['drop_block_rate'] = args.drop_block
    return metrics


def save_model_folder(model: nn.Module, path: str, metrics: Dict[str, Any], data_config: Dict[str, Any],
                      repo_id: Optional[str] = None) -> str:
    """The model in the Hub format (``hub.save_pretrained``: config.json, model.safetensors with the
    cluster state, card, cluster-map picture), written into a temporary folder and renamed into place."""
    from .hub import save_pretrained
    tmp = path + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, metrics=metrics, data_config=data_config, repo_id=repo_id)
    old = path + '.old'
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------------------
# Evaluation of a saved model


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
    from accelerate import Accelerator
    if corruptions is not None:
        try:
            _check_names(corruptions, severities)
        except ValueError as e:
            raise TrainingError(str(e)) from e
    if checkpoint.startswith(('hf-hub:', 'local-dir:')):
        name = checkpoint
    else:
        if not os.path.isfile(os.path.join(checkpoint, 'config.json')):
            raise TrainingError(f'{checkpoint!r} is not a model folder (no config.json)')
        name = 'local-dir:' + checkpoint
    if not dataset and not data_dir:
        dataset = _default_eval_dataset(checkpoint)
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:
        raise TrainingError(f'cannot load {checkpoint!r}: {_first_line(e)}') from e
    data_config = resolve_data_config({'img_size': img_size} if img_size else {}, model=model)
    if corruptions is not None:
        # Corruptions act on [0, 1] pixels: the transform stops before normalisation, done on the batch.
        transform = create_transform(**dict(data_config, mean=(0., 0., 0.), std=(1., 1., 1.)), is_training=False)
    else:
        transform = create_transform(**data_config, is_training=False)
    ds = _make_dataset(dataset, data_dir, split, False, transform, '--split')
    n = _num_classes(ds)
    if n is not None and n != model.num_classes:
        raise TrainingError(f'the model has {model.num_classes} classes but the data set has {n}')
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


def _default_eval_dataset(checkpoint: str) -> str:
    """The embedded digits for a model folder trained on them (its ``metrics.json`` says so); any other
    model needs its evaluation data named, never a silent fallback to the digits."""
    folder = checkpoint[len('local-dir:'):] if checkpoint.startswith('local-dir:') else checkpoint
    path = os.path.join(folder, 'metrics.json')
    metrics = _read_json(path) if not checkpoint.startswith('hf-hub:') and os.path.isfile(path) else {}
    if metrics.get('dataset_type', metrics.get('dataset')) == EMBEDDED_DATASET:
        return EMBEDDED_DATASET
    trained_on = f' was trained on {metrics["dataset"]!r}' if metrics.get('dataset') else ''
    raise TrainingError(f'{checkpoint}{trained_on}: name its evaluation data with --data-dir DIR '
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


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dropcluster_timm.training CHECKPOINT [--data-dir DIR] [--corruptions all] ...``:
    print top-1 / top-5, or accuracy under common corruptions."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(description='Evaluate a DropCluster / timm checkpoint.')
    parser.add_argument('checkpoint', help='model folder (OUTPUT/best), local-dir:PATH or hf-hub:org/name')
    parser.add_argument('--dataset', default='', help='timm dataset name (default: ImageFolder, or digits)')
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--split', default='validation')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--img-size', type=int, default=None)
    parser.add_argument('--corruptions', nargs='+', default=None, metavar='NAME',
                        help=f"'all' or names from: {', '.join(CORRUPTIONS)}")
    parser.add_argument('--severities', nargs='+', type=int, default=list(SEVERITIES))
    parser.add_argument('--corruption-seed', type=int, default=0)
    parser.add_argument('--json', default=None, metavar='PATH', help='also write the result as JSON')
    args = parser.parse_args(argv)
    corruptions = list(CORRUPTIONS) if args.corruptions == ['all'] else args.corruptions
    try:
        result = evaluate_checkpoint(args.checkpoint, args.dataset, args.data_dir, args.split, args.batch_size,
                                     args.workers, args.img_size, corruptions, args.severities,
                                     args.corruption_seed)
    except TrainingError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.json:
        _write_json_atomic(args.json, result)
    if corruptions is None:
        print(f"top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  loss {result['eval_loss']:.4f}  "
              f"({result['num_images']} images of {result['data']})")
    else:
        print(format_corruption_report(result))
    return 0


if __name__ == '__main__':  # pragma: no cover
    raise SystemExit(eval_main())
