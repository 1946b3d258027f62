""" The parts of a training run, built from its typed settings with timm's factories: model,
optimizer, learning-rate schedule, EMA, loss, the DropCluster schedule; re-clustering; CPU threads."""
import dataclasses
import os
from typing import Optional, Tuple

import torch
import torch.nn as nn
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.data_loader import DataLoaderShard
from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin, parse_flag_from_env
from torch.utils.data import DataLoader, Dataset

import timm
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.layers import is_fast_norm, set_fast_norm
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3

from ..data import DataBundle, cluster_batch
from ..errors import InputError, classify, first_line
from ..layers.model_helpers import copy_cluster_state, disable_own_schedule, update_clusters
from ..layers.options import layer_option
from .config import LossConfig, ModelConfig, OptimConfig, TrainConfig
from .mid_epoch import RecordedRandomness

__all__ = ['build_accelerator', 'build_loaders', 'build_model', 'check_batch_size', 'build_optimizer', 'build_scheduler', 'build_ema', 'build_loss',
           'recluster', 'use_cpu_cores']


def build_model(cfg: ModelConfig, num_classes: Optional[int], img_size: Optional[Tuple[int, ...]] = None,
                in_chans: Optional[int] = None) -> nn.Module:
    """``timm.create_model`` with the run's settings; checks the model name and the class count.

    A ``*_dropcluster`` model is built at rate 0 (the schedule drives it) with the run's cluster
    settings, which its config.json then records; ``img_size`` sizes its first grid maps. timm's
    model options of train.py apply: ``--gp``, ``--bn-momentum`` / ``--bn-eps``, ``--pretrained-path``,
    ``--head-init-scale`` / ``--head-init-bias``, ``--grad-checkpointing``, ``--fast-norm``.
    """
    is_file_model = cfg.name.startswith(('hf-hub:', 'local-dir:'))
    if not is_file_model and not timm.is_model(cfg.name):
        raise InputError(f'unknown model {cfg.name!r} (see timm.list_models("*dropcluster*"))')
    kwargs = dict(pretrained=cfg.pretrained, num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.drop_rate,
                  drop_path_rate=cfg.drop_path_rate, drop_block_rate=cfg.drop_block_rate, global_pool=cfg.global_pool,
                  bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
    if cfg.pretrained_path:
        kwargs['pretrained_cfg_overlay'] = dict(file=cfg.pretrained_path, num_classes=-1)  # as timm's train.py
    if 'dropcluster' in cfg.name and not is_file_model:
        if cfg.drop_block_rate:  # the recipe ramps the layers to --drop-cluster; one rate flag per run
            raise InputError(f'--drop-block: {cfg.name} puts DropCluster in its DropBlock slots; set their rate '
                                'with --drop-cluster')
        kwargs.update(drop_cluster_rate=0.0, img_size=img_size)
    try:
        layer_args = {layer_option(name).model_arg: value for name, value in cfg.layer_options.items()}
    except KeyError as e:
        raise InputError(e.args[0]) from None
    kwargs.update(layer_args)  # a model without DropCluster layers refuses them with its own error
    kwargs.update(cfg.kwargs)
    if cfg.initial_checkpoint:
        kwargs['checkpoint_path'] = cfg.initial_checkpoint
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    fast_norm = is_fast_norm()  # timm's switch is global; its norm layers read it when they are built
    set_fast_norm(cfg.fast_norm or fast_norm)
    try:
        model = timm.create_model(cfg.name, **kwargs)
    except Exception as e:  # a wrong name or argument (exit 2), or the network or disk (exit 1)
        raise classify(e, f'cannot create model {cfg.name!r}') from e
    finally:
        set_fast_norm(fast_norm)
    if cfg.head_init_scale is not None or cfg.head_init_bias is not None:
        with torch.no_grad():
            head = model.get_classifier()
            if cfg.head_init_scale is not None:
                head.weight.mul_(cfg.head_init_scale)
                head.bias.mul_(cfg.head_init_scale)
            if cfg.head_init_bias is not None:
                nn.init.constant_(head.bias, cfg.head_init_bias)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    disable_own_schedule(model)  # the run's recipe ramps and re-clusters the layers
    return model


def check_batch_size(model: nn.Module, batch_size: int) -> None:
    """One-line error for a training batch of one image in a model with BatchNorm (torch stops on it
    at the first layer with a single value per channel)."""
    if batch_size == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise InputError('--batch-size 1: the model has BatchNorm layers, which need more than one image per '
                            'process in training; use --batch-size 2 or more')


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` from the run's settings (timm's ``optimizer_kwargs``) at ``lr``."""
    return create_optimizer_v2(model, **optimizer_kwargs(dataclasses.replace(cfg, lr=lr)), **cfg.opt_kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, updates_per_epoch: int):
    """timm's ``create_scheduler_v2`` from the run's settings (timm's ``scheduler_kwargs``)."""
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(cfg), updates_per_epoch=updates_per_epoch)
    return scheduler


def build_ema(model: nn.Module, cfg: OptimConfig) -> Optional[ModelEmaV3]:
    """timm's ``ModelEmaV3`` of ``model`` with ``--model-ema``: ``--model-ema-decay``, its warm-up
    (``--model-ema-warmup``) and ``--model-ema-force-cpu`` as in timm's train.py; else None."""
    if not cfg.model_ema:
        return None
    return ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup,
                      device='cpu' if cfg.model_ema_force_cpu else None)


def build_loss(cfg: LossConfig, num_classes: int) -> Tuple[Optional[Mixup], nn.Module]:
    """timm's mixup / cutmix (None when off) and the training loss, chosen as timm's train.py does
    (binary cross-entropy with ``--bce-loss``)."""
    bce = dict(target_threshold=cfg.bce_target_thresh, sum_classes=cfg.bce_sum, pos_weight=cfg.bce_pos_weight)
    if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                      prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                      label_smoothing=cfg.smoothing, num_classes=num_classes)
        # smoothing is in the mixed targets
        return mixup, BinaryCrossEntropy(**bce) if cfg.bce_loss else SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        if cfg.bce_loss:
            return None, BinaryCrossEntropy(smoothing=cfg.smoothing, **bce)
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, BinaryCrossEntropy(smoothing=0.0, **bce) if cfg.bce_loss else nn.CrossEntropyLoss()


def recluster(accelerator, model: nn.Module, ema, dataset: Dataset, batch_size: int, num_batches: int,
              seed: int) -> None:
    """Re-cluster every DropCluster layer from ``num_batches`` batches of ``dataset`` chosen by
    ``seed``, identically on every process; the EMA copy follows.

    In full precision: Accelerate runs the model's forward under autocast with mixed precision, and
    the clustering compares activations, so the forward without that wrapper is used here.
    """
    images = cluster_batch(dataset, batch_size, num_batches, seed)
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    original = unwrapped.__dict__.get('_original_forward')  # Accelerate's un-autocast forward
    if original is not None:
        wrapped = unwrapped.forward
        unwrapped.forward = original
    try:
        update_clusters(unwrapped, images.to(accelerator.device), generator=generator)
    finally:
        if original is not None:
            unwrapped.forward = wrapped
    if ema is not None:
        copy_cluster_state(unwrapped, ema.module)


def use_cpu_cores(accelerator, threads: Optional[int] = None) -> int:
    """On the CPU, set the threads of this process: ``threads``, or by default its local share of the
    cores (``accelerate launch`` starts processes with one thread each; an affinity mask such as
    ``taskset`` limits the share), never fewer than it has; ``threads=0`` leaves PyTorch's setting.
    Returns the thread count. ``train`` restores the caller's count when it returns."""
    if accelerator.device.type == 'cpu' and threads != 0:
        if threads is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
            local = int(os.environ.get('LOCAL_WORLD_SIZE', accelerator.num_processes))
            threads = max(torch.get_num_threads(), max(1, cores // max(1, local)))
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """The ``Accelerator`` of a run: timm's ``--amp`` / ``--amp-dtype`` as Accelerate's mixed precision,
    ``--torchcompile`` as its dynamo plugin, ``--no-ddp-bb`` as a DDP setting, ``--device cpu``;
    ``accelerate launch`` settings apply where these are not given."""
    o, out = cfg.optim, cfg.output
    # Set by `accelerate launch --use_fsdp / --use_deepspeed / --use_megatron_lm` (or its config file).
    sharded = [name for name, var in (('FSDP', 'ACCELERATE_USE_FSDP'), ('DeepSpeed', 'ACCELERATE_USE_DEEPSPEED'),
                                      ('Megatron-LM', 'ACCELERATE_USE_MEGATRON_LM')) if parse_flag_from_env(var)]
    if sharded:
        raise InputError(f'{sharded[0]} is not supported: re-clustering, the EMA and the published weights need '
                            'the whole model on every process. Supported: one process (GPU or CPU) and data '
                            'parallel runs (accelerate launch --multi_gpu, or CPU processes over gloo)')
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)] if out.no_ddp_bb else []
    kwargs = {}
    if o.amp:
        kwargs['mixed_precision'] = 'bf16' if o.amp_dtype == 'bfloat16' else 'fp16'
    if cfg.model.torchcompile:
        kwargs['dynamo_plugin'] = TorchDynamoPlugin(backend=cfg.model.torchcompile, mode=cfg.model.torchcompile_mode)
    try:
        return Accelerator(
            gradient_accumulation_steps=o.grad_accum_steps,
            log_with=out.log_with,
            project_dir=out.output,
            cpu=out.cpu,
            kwargs_handlers=handlers,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            **kwargs,
        )
    except (ValueError, RuntimeError, ImportError) as e:  # e.g. fp16 without a GPU, a tracker not installed
        raise InputError(f'cannot set up Accelerate as asked (--amp / --torchcompile / --log-with): '
                            f'{first_line(e)}') from e


def build_loaders(data: DataBundle, cfg: TrainConfig, accelerator: Accelerator) -> Tuple[DataLoader, DataLoader]:
    """Training and evaluation loaders, on the accelerator's device and shards. Pinned host memory on a
    GPU (or with ``--pin-mem``). With ``--aug-repeats`` timm's ``RepeatAugSampler`` spreads the
    repeated images across processes itself, so the training loader is only placed on the device.
    The training loader reads ``data.train`` through ``RecordedRandomness`` (a mid-epoch resume reads
    its next batches from the random states they had)."""
    d, o = cfg.data, cfg.optim
    train_set = RecordedRandomness(data.train)
    common = dict(num_workers=d.workers, persistent_workers=d.workers > 0,
                  pin_memory=d.pin_mem or accelerator.device.type == 'cuda')
    eval_loader = DataLoader(data.eval, batch_size=o.validation_batch_size or o.batch_size, **common)
    if d.aug_repeats:
        sampler = RepeatAugSampler(train_set, num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                   num_repeats=int(d.aug_repeats))
        train_loader = DataLoaderShard(train_set, device=accelerator.device, sampler=sampler, batch_size=o.batch_size,
                                       drop_last=True, **common)
        return train_loader, accelerator.prepare(eval_loader)
    train_loader = DataLoader(train_set, batch_size=o.batch_size, shuffle=True, drop_last=True, **common)
    return accelerator.prepare(train_loader, eval_loader)
