""" Training support for ``train_timm.py``: data, model, DropCluster control, loops, checkpoints, outputs.

``train_timm.py`` stays a thin script (parse, build, loop, save); the pieces live here, where they
are tested. Errors a user can fix (missing data, unknown model, class-count mismatch, incompatible
resume, occupied output folder, push without credentials) raise ``TrainingError`` with a one-line
reason; the script prints it and exits with status 2.
"""
import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
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
    'TrainingError', 'DigitsDataset', 'TrainState', 'DataBundle', 'EMBEDDED_DATASET', 'build_data',
    'set_transforms', 'init_cluster_maps', 'build_model', 'configure_dropcluster', 'push_folder', 'make_schedule', 'cluster_batch', 'recluster',
    'train_one_epoch', 'evaluate', 'save_checkpoint', 'find_checkpoint', 'check_resume', 'check_output', 'write_run_file',
    'check_push_credentials', 'MetricsLog', 'save_model_folder', 'plot_cluster_maps', 'evaluate_checkpoint',
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


def _make_dataset(dataset: str, data_dir: Optional[str], split: str, is_training: bool, transform):
    if not dataset and not data_dir:
        dataset = EMBEDDED_DATASET
    if dataset == EMBEDDED_DATASET:
        return DigitsDataset(split, transform)
    if data_dir is None or not os.path.isdir(data_dir):
        raise TrainingError(f'data folder {data_dir!r} does not exist')
    try:
        ds = create_dataset(dataset, root=data_dir, split=split, is_training=is_training)
    except Exception as e:
        raise TrainingError(f'cannot read data set {dataset or "ImageFolder"} split {split!r} in {data_dir}: '
                            f'{_first_line(e)}') from e
    if len(ds) == 0:
        raise TrainingError(f'data set split {split!r} in {data_dir} is empty')
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


def build_data(args) -> DataBundle:
    """Datasets from timm's factory (or the embedded digits), without transforms yet (``set_transforms``
    adds them once the model, which decides the input size and normalisation, exists)."""
    train = _make_dataset(args.dataset, args.data_dir, args.train_split, True, None)
    val = _make_dataset(args.dataset, args.data_dir, args.val_split, False, None)
    cluster = _make_dataset(args.dataset, args.data_dir, args.train_split, False, None)
    n_train, n_val = _num_classes(train), _num_classes(val)
    if n_train is not None and n_val is not None and n_train != n_val:
        raise TrainingError(f'the train split has {n_train} classes but the validation split has {n_val}')
    return DataBundle(train, val, cluster, n_train or args.num_classes, {})


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
        self.best_top1 = None
        self.best_epoch = None

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
    bar = tqdm(total=steps, initial=skip, desc=f'epoch {epoch}', leave=False,
               disable=not (progress and accelerator.is_local_main_process))
    for i, (images, targets) in enumerate(loader):
        if i < skip:
            continue  # resumed mid-epoch: these batches were done before the checkpoint
        rate = schedule.step(epoch + i / steps)
        set_drop_prob(unwrapped, rate)
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
    for images, targets in tqdm(loader, desc='eval', leave=False,
                                disable=not (progress and accelerator.is_local_main_process)):
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


def find_checkpoint(path: str) -> str:
    """A checkpoint folder, or the newest completed checkpoint of an output folder."""
    if not os.path.exists(path):
        raise TrainingError(f'resume checkpoint {path!r} does not exist')
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise TrainingError(f'{path!r} holds no completed checkpoint to resume from')
    return found[-1]


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


def check_output(output: str, resume: Optional[str]) -> None:
    """Refuse an output folder that holds another run, unless this run resumes from it."""
    if os.path.exists(os.path.join(output, RUN_FILE)) or list_checkpoints(output):
        same = resume is not None and os.path.realpath(find_checkpoint(resume)).startswith(
            os.path.realpath(os.path.join(output, CHECKPOINT_DIR)) + os.sep)
        if not same:
            raise TrainingError(f'output folder {output} already holds another run; '
                                f'resume it with --resume {output} or choose another --output')


def write_run_file(output: str, args_dict: Dict[str, Any]) -> None:
    """Create the output folder and record the run's arguments in ``run.json`` (main process)."""
    os.makedirs(output, exist_ok=True)
    _write_json_atomic(os.path.join(output, RUN_FILE), args_dict)


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
    """Per-epoch metrics, rewritten as ``metrics.json`` and ``metrics.csv`` after each epoch."""

    def __init__(self, output: str):
        self.output = output
        self.rows: List[Dict[str, Any]] = []
        path = os.path.join(output, 'metrics.json')
        if os.path.exists(path):
            self.rows = _read_json(path)

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

    def truncate(self, epochs: int) -> None:
        """Drop rows of epochs >= ``epochs`` (written after the checkpoint a resume starts from)."""
        self.rows = [r for r in self.rows if r.get('epoch', 0) < epochs]


def save_model_folder(model: nn.Module, path: str, args, metrics: Dict[str, Any], data_config=None) -> str:
    """The model in the Hub format (config.json, model.safetensors with the cluster state, README.md).

    ``*_dropcluster`` models go through the model zoo's ``dropcluster_timm.hub.save_pretrained`` (card
    with this run's metrics), other timm models through timm's ``save_for_hf`` and a short card. Written into a temporary folder first and renamed into place.
    """
    tmp = path + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    from .models import DropClusterResNet
    if isinstance(model, DropClusterResNet):
        from .hub import save_pretrained
        card_metrics = dict(metrics)
        card_metrics.setdefault('dataset', args.data_dir or args.dataset or EMBEDDED_DATASET)
        card_metrics.setdefault('epochs', args.epochs)
        if data_config and 'input_size' in data_config:
            card_metrics.setdefault('img_size', int(data_config['input_size'][-1]))
        save_pretrained(model, tmp, metrics=card_metrics, data_config=data_config)
    else:
        from timm.models import save_for_hf
        save_for_hf(model, tmp, safe_serialization=True, data_config=data_config)
        _write_simple_card(tmp, args, metrics)
    plot_cluster_maps(model, os.path.join(tmp, 'cluster_maps.png'))
    old = path + '.old'
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _write_simple_card(folder: str, args, metrics: Dict[str, Any]) -> None:
    lines = [
        '---', 'library_name: timm', 'tags:', '- image-classification', '- timm', '- dropcluster', '---', '',
        f'# {args.model} trained with DropCluster', '',
        'Load it with `import dropcluster_timm` first (it registers the DropCluster models with timm).', '',
        '## Results', '',
        '| metric | value |', '|---|---|',
    ]
    for key in ('epoch', 'top1', 'top5', 'eval_loss', 'train_loss', 'drop_rate'):
        if key in metrics:
            value = metrics[key]
            lines.append(f'| {key} | {value:.4f} |' if isinstance(value, float) else f'| {key} | {value} |')
    data = args.data_dir or args.dataset or EMBEDDED_DATASET
    lines += ['', f'Trained by `train_timm.py` on `{data}` for {args.epochs} epochs.', '']
    with open(os.path.join(folder, 'README.md'), 'w') as f:
        f.write('\n'.join(lines))


def plot_cluster_maps(model: nn.Module, path: str, channels: int = 4) -> Optional[str]:
    """A PNG of the cluster maps of the first ``channels`` maps of each DropCluster layer."""
    from .model_helpers import _unwrap
    layers = [(n, l) for n, l in dropcluster_layers(_unwrap(model)) if l.cluster_map.numel() > 0 and l.cluster_map.dim() == 3]
    if not layers:
        return None
    try:
        import matplotlib
    except ImportError:
        return None  # optional: pip install matplotlib (or dropcluster-timm[train])
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cols = min(channels, max(l.cluster_map.shape[0] for _, l in layers))
    fig, axes = plt.subplots(len(layers), cols, figsize=(2 * cols, 2 * len(layers)), squeeze=False)
    for r, (name, layer) in enumerate(layers):
        maps = layer.cluster_map.detach().cpu().long()
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < maps.shape[0]:
                ax.imshow(maps[c].numpy() % 20, cmap='tab20', vmin=0, vmax=19, interpolation='nearest')
                ax.set_title(f'{name} [{c}]', fontsize=7)
            else:
                ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
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
    ds = _make_dataset(dataset, data_dir, split, False, transform)
    n = _num_classes(ds)
    if n is not None and n != model.num_classes:
        raise TrainingError(f'the model has {model.num_classes} classes but the data set has {n}')
    accelerator = Accelerator()
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    model, loader = accelerator.prepare(model, loader)
    if corruptions is None:
        return evaluate(accelerator, model, loader, progress=True)
    mean = torch.tensor(data_config['mean'], device=accelerator.device).view(1, -1, 1, 1)
    std = torch.tensor(data_config['std'], device=accelerator.device).view(1, -1, 1, 1)
    return corruption_accuracy(
        model, loader, corruptions, severities, preprocess=lambda x: (x - mean) / std, seed=corruption_seed,
        gather=accelerator.gather_for_metrics)


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
        print(f"top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  loss {result['eval_loss']:.4f}")
    else:
        print(format_corruption_report(result))
    return 0


if __name__ == '__main__':  # pragma: no cover
    raise SystemExit(eval_main())
