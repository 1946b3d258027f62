""" ``train``: a DropCluster (or any timm) model trained with Accelerate, from a ``TrainConfig``.

Build, loop, save, on one or many processes (``accelerate launch``) or the CPU. The pieces live
beside it: ``builders`` (model, loss, schedule), ``loop`` (one epoch), ``run_folder`` (checkpoints,
run.json, metrics), ``resume`` (what a resume checks and restores) and ``mid_epoch`` (what a
checkpoint inside an epoch adds); data and evaluation in ``dropcluster_timm.data`` / ``.evaluation``, model
folders and the Hub in ``dropcluster_timm.hub``.
"""
import contextlib
import copy
import os
import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional

import torch
from accelerate.utils import set_seed
from timm.layers import DropBlock2d, convert_sync_batchnorm
from timm.utils import distribute_bn

from .. import hub
from ..data import build_data, class_names, set_transforms
from ..accelerate_state import scoped_accelerate_state
from ..errors import InputError, first_line
from ..evaluation.evaluate import evaluate
from ..layers.model_helpers import ddp_ignore_cluster_buffers, dropcluster_layers, init_cluster_maps, set_drop_prob
from . import run_folder as rf
from .hooks import build_hooks
from .interrupt import files_written_whole
from .builders import (
    build_accelerator, build_ema, build_loaders, build_loss, build_model, build_optimizer, build_scheduler,
    check_batch_size, recluster, use_cpu_cores)
from .config import TrainConfig
from .loop import TrainState, train_one_epoch
from .options import flat_settings
from .recipe import DropClusterRecipe, schedule_warnings
from .resume import (
    changed_settings, check_changes, check_global_batch, check_position, checkpoint_settings, continue_epoch,
    place_lr_schedule, read_position)
from .mid_epoch import save_rank_state
from .run_state import load_run_state

__all__ = ['train']


def train(cfg: TrainConfig, on_step: Optional[Callable[[TrainState], None]] = None) -> SimpleNamespace:
    """Train as ``cfg`` says; returns the trained model (unwrapped), EMA, schedule, state, metric rows
    and the hooks of the optional methods (``train.hooks``; EDropout's holds its ``search``).

    ``on_step(state)`` runs after every training batch. Errors a user can fix raise ``InputError``
    before anything is written. The caller's state is as it was when this returns: the thread count,
    timm's fast-norm switch, and Accelerate's process state (what the run set up, its process group
    included, is taken down; a state the caller set up stays: build an ``Accelerator()`` before the
    call to use the process group afterwards).
    """
    # The output folder's lock is released and the caller's state restored however the run ends.
    with contextlib.ExitStack() as run, scoped_accelerate_state():
        return _train(cfg, on_step, run)


def _train(cfg: TrainConfig, on_step: Optional[Callable[[TrainState], None]], run: contextlib.ExitStack) -> SimpleNamespace:
    cfg = cfg.resolved()  # the caller's config stays as it was; the run records this one
    d, o, out = cfg.data, cfg.optim, cfg.output
    cfg.check()  # one-line errors before any setup
    checkpoint = rf.find_checkpoint(out.resume) if out.resume else None
    changes: Dict[str, Any] = {}
    if checkpoint:
        rf.check_checkpoint_files(checkpoint)
        meta = rf.read_meta(checkpoint)
        changes = changed_settings(checkpoint_settings(checkpoint, meta) or {}, cfg.to_dict())
        check_changes(checkpoint, changes)
        check_position(checkpoint, read_position(checkpoint, meta), o.epochs)  # NothingToTrain for a finished run
    reads = rf.files_read(cfg)
    rf.check_output(out.output, checkpoint, bool(out.resume), out.overwrite, reads)  # refuses a folder holding results
    if out.push_to_hub:
        hub.check_push(out.push_to_hub)
    accelerator = build_accelerator(cfg)
    if accelerator.is_main_process:
        run.enter_context(rf.lock_output(out.output))
        rf.check_output(out.output, checkpoint, bool(out.resume), out.overwrite, reads)  # again, now that no other run
        # can start writing here
    rf.check_shared_output(accelerator, out.output)
    run.callback(torch.set_num_threads, torch.get_num_threads())  # the caller's thread count, back at the end
    use_cpu_cores(accelerator, out.cpu_threads)
    set_seed(o.seed)
    global_batch = o.batch_size * accelerator.num_processes * o.grad_accum_steps
    if checkpoint:
        check_global_batch(checkpoint, meta, global_batch)
    if out.resume and checkpoint is None:
        accelerator.print(f'{out.resume} holds no checkpoint yet (its run stopped in the first epoch): starting over')

    # Build: data, model, optimisation.
    with accelerator.main_process_first():  # --dataset-download: one process downloads, the others then read
        data = build_data(d.dataset, d.data_dir, d.train_split, d.val_split, d.num_classes, d.dataset_args(),
                          d.train_num_samples, d.val_num_samples)
    img_size = tuple(d.input_size[-2:]) if d.input_size else d.img_size
    model = build_model(cfg.model, data.num_classes, img_size, d.in_chans)
    check_batch_size(model, o.batch_size)
    identity = rf.run_identity(cfg.model.name, data.num_classes)
    if class_names(data.train):  # recorded in config.json, so evaluation can match classes by name
        model.pretrained_cfg = dict(model.pretrained_cfg, label_names=class_names(data.train))
    data_config = set_transforms(data, model, d.input_args(), d.train_transform_args())
    init_cluster_maps(model, data_config['input_size'])  # grid maps, so every checkpoint carries them
    if checkpoint:
        rf.check_resume(checkpoint, identity)
    num_dropcluster = sum(1 for _ in dropcluster_layers(model))
    # A DropBlock baseline (a plain timm model with --drop-block) gets the same ramp as DropCluster.
    drop_block = not num_dropcluster and bool(cfg.model.drop_block_rate) and any(
        isinstance(m, DropBlock2d) for m in model.modules())
    if cfg.dropcluster.rate > 0 and not num_dropcluster:
        accelerator.print(f'warning: {cfg.model.name} has no DropCluster layers, --drop-cluster is ignored')
    hooks = build_hooks(cfg, model)  # the optional methods (EDropout)
    for hook in hooks:
        accelerator.print(hook)
    if cfg.model.sync_bn and accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)

    train_loader, eval_loader = build_loaders(data, cfg, accelerator)
    if len(train_loader) == 0:  # incomplete batches are dropped
        raise InputError(f'--batch-size {o.batch_size} on {accelerator.num_processes} process(es) is larger than '
                            f'the training set ({len(data.train)} images): not one full batch per epoch')
    lr = o.scaled_lr(o.batch_size * accelerator.num_processes * o.grad_accum_steps)
    if not o.lr:
        accelerator.print(f'learning rate {lr:.4g} from --lr-base {o.lr_base} and the global batch size')
    optimizer = build_optimizer(model, o, lr)
    ddp_ignore_cluster_buffers(model)  # the maps are synchronised by update_clusters, not by DDP
    model, optimizer = accelerator.prepare(model, optimizer)
    steps_per_epoch = min(len(train_loader), out.train_batches_per_epoch or len(train_loader))
    updates_per_epoch = max(1, steps_per_epoch // o.grad_accum_steps)
    lr_scheduler = build_scheduler(optimizer, o, updates_per_epoch)
    ramped = bool(num_dropcluster) or drop_block  # a model with neither has no drop rate to ramp or record
    recipe = DropClusterRecipe(cfg.dropcluster, steps_per_epoch, seed=o.seed,
                               target=cfg.model.drop_block_rate if drop_block else None if num_dropcluster else 0.0,
                               clustered=bool(num_dropcluster), drop_block=drop_block)
    schedule = recipe.schedule
    if num_dropcluster:
        for warning in schedule_warnings(schedule, o.epochs):
            accelerator.print(f'warning: {warning}')
    ema = build_ema(accelerator.unwrap_model(model), o)
    mixup_fn, loss_fn = build_loss(cfg.loss, data.num_classes)

    state = TrainState()
    # The run's own state goes into the checkpoint as data (run_state.json / .safetensors), not pickles.
    # The LR scheduler is not among them: it holds only settings, and those come from the command line.
    run_objects = dict(schedule=schedule, state=state, **({'ema': ema} if ema else {}))
    for hook in hooks:
        run_objects.update(hook.run_state())
    epoch_loss = None  # a mid-epoch resume: the losses of the epoch before the checkpoint
    if checkpoint:
        fresh_optimizer = copy.deepcopy(optimizer.state_dict()) if out.no_resume_opt else None
        settings = schedule.state_dict()
        load_run_state(checkpoint, run_objects)  # checked whole before anything is loaded
        rf.load_checkpoint(accelerator, checkpoint)
        if fresh_optimizer is not None:
            optimizer.load_state_dict(fresh_optimizer)  # --no-resume-opt: the weights only
        # The command line's schedules, at the checkpoint's position.
        schedule.load_state_dict(dict(settings, epoch=schedule.epoch))
        schedule.step(schedule.epoch)
        for key, (old, new) in changes.items():
            accelerator.print(f'resume: {key} {old!r} -> {new!r} (from the command line)')
        place_lr_schedule(accelerator, lr_scheduler, state, updates_per_epoch, o.grad_accum_steps)
        if state.step_in_epoch:
            epoch_loss = continue_epoch(accelerator, checkpoint, train_loader.dataset, d.workers)
        for hook in hooks:
            hook.after_resume(accelerator.unwrap_model(model))
        accelerator.print(f'resumed from {checkpoint}: epoch {state.epoch}, step {state.global_step}, '
                          f'drop rate {schedule.rate:.4f}')
    elif o.start_epoch:
        state.epoch = o.start_epoch
        state.lr_updates = o.start_epoch * updates_per_epoch
        lr_scheduler.step(o.start_epoch)
    state.updates_per_epoch = updates_per_epoch
    metrics = rf.MetricsLog(out.output, keep_epochs=state.epoch)
    accelerator.wait_for_everyone()  # every process has checked the output folder before it is written
    if accelerator.is_main_process:
        if out.overwrite:  # all checks passed: the earlier run's results go only now
            rf.clear_results(out.output)
        rf.write_run_file(out.output, cfg.to_dict(), data.splits, state if checkpoint else None, num_dropcluster,
                          resumed=dict(checkpoint=checkpoint, epoch=state.epoch, step=state.global_step,
                                       changed=changes) if checkpoint else None)  # all checks passed
        rf.write_args_file(out.output, cfg.to_args())
    if out.log_with:
        scalars = {k: v for k, v in flat_settings(cfg.to_dict()).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(out.wandb_project or 'train_timm', config=scalars,
                                  init_kwargs={'wandb': {'tags': out.wandb_tags}} if out.log_with == 'wandb' else {})

    def checkpoint_fn(name, epoch_loss=None):
        meta = {'identity': identity, 'epoch': state.epoch, 'global_step': state.global_step,
                'step_in_epoch': state.step_in_epoch, 'global_batch_size': global_batch, 'config': cfg.to_dict()}
        per_process = None
        if epoch_loss is not None:  # inside an epoch: what continuing it exactly needs, from every process
            per_process = lambda folder: save_rank_state(  # noqa: E731
                folder, accelerator.process_index, train_loader.dataset.before_batch, *epoch_loss)
        with files_written_whole():
            return rf.save_checkpoint(accelerator, out.output, name, meta, run_objects, keep=out.checkpoint_hist,
                                      per_process=per_process)

    # Loop. With EMA, the EMA weights are evaluated, picked as best and published, as in timm's train.py.
    accelerator.print(f'training {cfg.model.name} ({data.num_classes} classes) for {o.epochs} epochs, '
                      f'{steps_per_epoch} batches per epoch on {accelerator.num_processes} process(es); '
                      f'train {data.splits["train"]} ({len(data.train)} images), '
                      f'validation {data.splits["validation"]} ({len(data.eval)} images)'
                      + (f'; {schedule}' if ramped else ''))
    best_key = rf.best_metric_name(cfg.to_dict())
    lower_is_better = best_key.endswith('eval_loss')
    while state.epoch < o.epochs:
        epoch, start = state.epoch, time.time()
        train_loader.set_epoch(epoch)
        if mixup_fn is not None and cfg.loss.mixup_off_epoch and epoch >= cfg.loss.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        # BRB soft reset and re-clustering, identical on every process (seeded from the epoch)
        if not state.step_in_epoch:  # (a resumed epoch began before the interruption)
            begun = recipe.begin_epoch(
                epoch, accelerator.unwrap_model(model), optimizer,
                recluster=lambda seed: recluster(accelerator, model, ema, data.cluster, o.batch_size,
                                                 cfg.dropcluster.update_batches, seed=seed))
            state.epoch_soft_reset, state.epoch_reclustered = begun['soft_reset'], begun['reclustered']
            state.soft_resets += state.epoch_soft_reset
            state.reclusterings += state.epoch_reclustered
        reset, reclustered = state.epoch_soft_reset, state.epoch_reclustered
        row = {'epoch': epoch}
        row.update(train_one_epoch(accelerator, model, train_loader, optimizer, loss_fn, lr_scheduler, recipe, state,
                                   cfg, ema=ema, mixup_fn=mixup_fn, checkpoint_fn=checkpoint_fn, on_step=on_step,
                                   hooks=hooks, epoch_loss=epoch_loss))
        if epoch_loss is not None:  # the resumed epoch is over: later epochs read their own random states
            train_loader.dataset.replay([])
            epoch_loss = None
        if not ramped:
            del row['drop_rate']
        if accelerator.num_processes > 1 and out.dist_bn and not cfg.model.sync_bn:
            distribute_bn(model, accelerator.num_processes, out.dist_bn == 'reduce')
        evaluated = (epoch + 1) % out.val_interval == 0 or epoch + 1 == o.epochs
        if evaluated:
            row.update(evaluate(accelerator, model, eval_loader))
            if ema is not None:
                row.update({'ema_' + k: v for k, v in evaluate(accelerator, ema.module, eval_loader).items()})
            for hook in hooks:
                row.update(hook.after_eval(lambda m: evaluate(accelerator, m, eval_loader),
                                           accelerator.unwrap_model(model) if ema is None else ema.module))
        lr_scheduler.step(epoch + 1, row.get(best_key))
        row.update({'reclustered': reclustered, 'soft_reset': reset, 'epoch_time': time.time() - start})
        is_best = evaluated and (state.best_metric is None or (
            row[best_key] < state.best_metric if lower_is_better else row[best_key] > state.best_metric))
        if is_best:
            state.best_metric, state.best_epoch = row[best_key], epoch
        # Learning rates are small: significant digits, not places (lr 0.0000 says nothing).
        accelerator.print(' '.join(f'{k} {v:.4g}' if k == 'lr' else f'{k} {v:.4f}' if isinstance(v, float)
                                   else f'{k} {v}' for k, v in row.items()))
        with files_written_whole():  # the epoch's files and checkpoint, whole even on Ctrl-C
            if accelerator.is_main_process:
                metrics.add(row)
                published = accelerator.unwrap_model(model) if ema is None else ema.module
                if ema is not None and num_dropcluster:
                    set_drop_prob(published, schedule.rate)  # config.json records the rate of the run
                if evaluated:
                    results = rf.run_results(cfg, row, state, published, data,
                                             ema_decay=o.model_ema_decay if ema is not None else None)
                    for hook in hooks:
                        published, results = hook.publish(published, row, results)
                    last = hub.save_pretrained(published, os.path.join(out.output, 'last'), metrics=results,
                                               data_config=data.data_config, repo_id=out.push_to_hub)
                    if is_best:
                        hub.copy_model_folder(last, os.path.join(out.output, 'best'))
                rf.write_run_file(out.output, cfg.to_dict(), data.splits, state, num_dropcluster)
            if out.log_with:
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
            checkpoint_fn(f'epoch_{epoch:04d}')

    # Save: the model folders are written every epoch; publish the best one.
    if accelerator.is_main_process:
        accelerator.print(f'best {best_key} {state.best_metric:.4g} at epoch {state.best_epoch}; outputs in {out.output}')
        if out.push_to_hub:
            try:
                hub.push(os.path.join(out.output, 'best'), out.push_to_hub,
                         commit_message='Add DropCluster model trained with train_timm.py')
            except Exception as e:  # a failure while working (exit 1), not an input error
                raise RuntimeError(f'push to {out.push_to_hub} failed: {first_line(e)}') from e
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()
    return SimpleNamespace(model=accelerator.unwrap_model(model, keep_fp32_wrapper=False), ema=ema, schedule=schedule,
                           state=state, metrics=metrics.rows, hooks=hooks)

