""" The parts of a training run, built from its typed settings: model, loss, DropCluster schedule,
re-clustering, CPU threads."""
import os
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset

import timm
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from ..data import cluster_batch
from ..errors import TrainingError, first_line
from ..model_helpers import copy_cluster_state, update_clusters
from ..schedules import DropClusterSchedule
from .config import DropClusterConfig, ModelConfig, OptimConfig

__all__ = ['build_model', 'build_loss', 'make_schedule', 'schedule_warnings', 'recluster', 'use_cpu_cores']


def build_model(cfg: ModelConfig, num_classes: Optional[int], img_size: Optional[Tuple[int, ...]] = None) -> nn.Module:
    """``timm.create_model`` with the run's settings; checks the model name and the class count.

    A ``*_dropcluster`` model is built at rate 0 (the schedule drives it) with the run's cluster
    settings, which its config.json then records; ``img_size`` sizes its first grid maps.
    """
    is_file_model = cfg.name.startswith(('hf-hub:', 'local-dir:'))
    if not is_file_model and not timm.is_model(cfg.name):
        raise TrainingError(f'unknown model {cfg.name!r} (see timm.list_models("*dropcluster*"))')
    kwargs = dict(pretrained=cfg.pretrained, num_classes=num_classes, drop_rate=cfg.drop_rate,
                  drop_path_rate=cfg.drop_path_rate, drop_block_rate=cfg.drop_block_rate)
    if 'dropcluster' in cfg.name and not is_file_model:
        kwargs.update(drop_cluster_rate=0.0, img_size=img_size)
    if 'dropcluster' in cfg.name or cfg.cluster_method or cfg.cluster_size or cfg.num_clusters:
        kwargs.update(dc_cluster_method=cfg.cluster_method, dc_cluster_size=cfg.cluster_size,
                      dc_num_clusters=cfg.num_clusters)
    kwargs.update(cfg.kwargs)
    if cfg.initial_checkpoint:
        kwargs['checkpoint_path'] = cfg.initial_checkpoint
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return timm.create_model(cfg.name, **kwargs)
    except Exception as e:
        raise TrainingError(f'cannot create model {cfg.name!r}: {first_line(e)}') from e


def build_loss(cfg: OptimConfig, num_classes: int) -> Tuple[Optional[Mixup], nn.Module]:
    """timm's mixup / cutmix (None when off) and the matching training loss."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def make_schedule(cfg: DropClusterConfig, steps_per_epoch: int) -> DropClusterSchedule:
    return DropClusterSchedule(
        target=cfg.rate,
        start_epoch=cfg.start_epoch,
        warmup_epochs=cfg.warmup_epochs,
        shape=cfg.shape,
        update_freq=cfg.update_freq,
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


def recluster(accelerator, model: nn.Module, ema, dataset: Dataset, batch_size: int, num_batches: int,
              seed: int) -> None:
    """Re-cluster every DropCluster layer from ``num_batches`` batches of ``dataset`` chosen by
    ``seed``, identically on every process; the EMA copy follows."""
    images = cluster_batch(dataset, batch_size, num_batches, seed)
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    unwrapped = accelerator.unwrap_model(model)
    update_clusters(unwrapped, images.to(accelerator.device), generator=generator)
    if ema is not None:
        copy_cluster_state(unwrapped, ema.module)


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
