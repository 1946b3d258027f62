""" ``train``: a DropCluster (or any timm) model trained with Accelerate, from a ``TrainConfig``.

The run reads top to bottom: start (checks, the accelerator, the output folder), build, resume,
record, then per epoch train, evaluate and save, and publish at the end. The pieces live beside it:
``builders`` (model, loss, schedules), ``loop`` (one epoch), ``resume`` (what a resume checks and
restores), ``mid_epoch`` (what a checkpoint inside an epoch adds), ``run_folder`` (the output folder and
checkpoints), ``records`` (run.json, args.yaml, metrics); data and evaluation in ``dropcluster_timm.data`` / ``.evaluation``, model
folders and the Hub in ``dropcluster_timm.hub``.
"""
import contextlib
import os
import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from accelerate.utils import set_seed
from timm.layers import DropBlock2d, convert_sync_batchnorm
from timm.utils import distribute_bn

from .. import hub
from ..accelerate_state import scoped_accelerate_state
from ..data import build_data, class_names, set_transforms
from ..errors import InputError, first_line
from ..evaluation.evaluate import evaluate
from ..layers.model_helpers import ddp_ignore_cluster_buffers, dropcluster_layers, init_cluster_maps, set_drop_prob
from . import records, run_folder as rf
from .builders import (
    build_accelerator, build_ema, build_loaders, build_loss, build_model, build_optimizer, build_scheduler,
    check_batch_size, recluster, use_cpu_cores)
from .config import TrainConfig
from .hooks import build_hooks
from .interrupt import files_written_whole
from .loop import TrainState, train_one_epoch
from .mid_epoch import save_rank_state
from .options import flat_settings
from .recipe import DropClusterRecipe, schedule_warnings
from .resume import ResumePoint, check_global_batch, check_resume, check_resume_point, resume_run

__all__ = ['train', 'Run']


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
    with contextlib.ExitStack() as stack, scoped_accelerate_state():
        cfg = cfg.resolved()  # the caller's config stays as it was; the run records this one
        cfg.check()  # one-line errors before any setup
        point = check_resume_point(cfg)  # NothingToTrain for a finished run
        run = start(cfg, point, stack)
        build(run, point)
        epoch_loss = resume_run(run, point) if point else start_fresh(run)
        write_records(run, point)
        while run.state.epoch < cfg.optim.epochs:
            row = train_epoch(run, on_step, epoch_loss)
            epoch_loss = None
            evaluate_epoch(run, row)
            save_epoch(run, row)
        publish(run)
        model = run.accelerator.unwrap_model(run.model, keep_fp32_wrapper=False, keep_torch_compile=False)
        return SimpleNamespace(model=model, ema=run.ema,
                               schedule=run.schedule, state=run.state, metrics=run.metrics.rows, hooks=run.hooks)


class Run:
    """What a training run is made of, filled in by ``start`` and ``build``: the settings and the
    accelerator, the data and loaders, the model, its optimizer, schedules, EMA and loss, the position
    (``state``) and what checkpoints hold of the run's own state (``run_objects``)."""

    def __init__(self, cfg: TrainConfig, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.global_batch = cfg.optim.batch_size * accelerator.num_processes * cfg.optim.grad_accum_steps
        self.state = TrainState()
        self.best_key = records.best_metric_name(cfg.to_dict())  # picks best/; with EMA, the EMA weights' metric


def start(cfg: TrainConfig, point: Optional[ResumePoint], stack: contextlib.ExitStack) -> Run:
    """The output checked (twice: before and after taking its lock), the Hub repo, the accelerator,
    the folder's lock, this process's threads and the seed."""
    out = cfg.output
    checkpoint = point.checkpoint if point else None
    reads = rf.files_read(cfg)
    rf.check_output(out.output, checkpoint, bool(out.resume), out.overwrite, reads)  # refuses a folder holding results
    if out.push_to_hub:
        hub.check_push(out.push_to_hub)
    accelerator = build_accelerator(cfg)
    if accelerator.is_main_process:
        stack.enter_context(rf.lock_output(out.output))
        # Again, now that no other run can start writing here.
        rf.check_output(out.output, checkpoint, bool(out.resume), out.overwrite, reads)
    rf.check_shared_output(accelerator, out.output)
    stack.callback(torch.set_num_threads, torch.get_num_threads())  # the caller's thread count, back at the end
    use_cpu_cores(accelerator, out.cpu_threads)
    set_seed(cfg.optim.seed)
    run = Run(cfg, accelerator)
    if point:
        check_global_batch(point.checkpoint, point.meta, run.global_batch)
    elif out.resume:
        accelerator.print(f'{out.resume} holds no checkpoint yet (its run stopped in the first epoch): starting over')
    return run


def build(run: Run, point: Optional[ResumePoint]) -> None:
    """Data, model (with the optional methods' hooks), loaders, optimizer, schedules, EMA and loss."""
    cfg, accelerator = run.cfg, run.accelerator
    d, o = cfg.data, cfg.optim
    with accelerator.main_process_first():  # --dataset-download: one process downloads, the others then read
        run.data = build_data(d.dataset, d.data_dir, d.train_split, d.val_split, d.num_classes, d.dataset_args(),
                              d.train_num_samples, d.val_num_samples)
    img_size = tuple(d.input_size[-2:]) if d.input_size else d.img_size
    model = build_model(cfg.model, run.data.num_classes, img_size, d.in_chans)
    check_batch_size(model, o.batch_size)
    run.identity = rf.run_identity(cfg.model.name, run.data.num_classes)
    if class_names(run.data.train):  # recorded in config.json, so evaluation can match classes by name
        model.pretrained_cfg = dict(model.pretrained_cfg, label_names=class_names(run.data.train))
    data_config = set_transforms(run.data, model, d.input_args(), d.train_transform_args())
    init_cluster_maps(model, data_config['input_size'])  # grid maps, so every checkpoint carries them
    if point:
        check_resume(point.checkpoint, run.identity)
    run.num_dropcluster = sum(1 for _ in dropcluster_layers(model))
    # A DropBlock baseline (a plain timm model with --drop-block) gets the same ramp as DropCluster.
    drop_block = not run.num_dropcluster and bool(cfg.model.drop_block_rate) and any(
        isinstance(m, DropBlock2d) for m in model.modules())
    run.ramped = bool(run.num_dropcluster) or drop_block  # with neither, no drop rate to ramp or record
    if cfg.dropcluster.rate > 0 and not run.num_dropcluster:
        accelerator.print(f'warning: {cfg.model.name} has no DropCluster layers, --drop-cluster is ignored')
    run.hooks = build_hooks(cfg, model)  # the optional methods (EDropout)
    for hook in run.hooks:
        accelerator.print(hook)
    if cfg.model.sync_bn and accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)

    run.train_loader, run.eval_loader = build_loaders(run.data, cfg, accelerator)
    if len(run.train_loader) == 0:  # incomplete batches are dropped
        raise InputError(f'--batch-size {o.batch_size} on {accelerator.num_processes} process(es) is larger than '
                         f'the training set ({len(run.data.train)} images): not one full batch per epoch')
    lr = o.scaled_lr(run.global_batch)
    if not o.lr:
        accelerator.print(f'learning rate {lr:.4g} from --lr-base {o.lr_base} and the global batch size')
    optimizer = build_optimizer(model, o, lr)
    ddp_ignore_cluster_buffers(model)  # the maps are synchronised by update_clusters, not by DDP
    run.model, run.optimizer = accelerator.prepare(model, optimizer)
    run.steps_per_epoch = min(len(run.train_loader), cfg.output.train_batches_per_epoch or len(run.train_loader))
    run.updates_per_epoch = max(1, run.steps_per_epoch // o.grad_accum_steps)
    run.lr_scheduler = build_scheduler(run.optimizer, o, run.updates_per_epoch)
    target = cfg.model.drop_block_rate if drop_block else None if run.num_dropcluster else 0.0
    run.recipe = DropClusterRecipe(cfg.dropcluster, run.steps_per_epoch, seed=o.seed, target=target,
                                   clustered=bool(run.num_dropcluster), drop_block=drop_block)
    run.schedule = run.recipe.schedule
    if run.num_dropcluster:
        for warning in schedule_warnings(run.schedule, o.epochs):
            accelerator.print(f'warning: {warning}')
    run.ema = build_ema(accelerator.unwrap_model(run.model, keep_torch_compile=False), o)
    run.mixup_fn, run.loss_fn = build_loss(cfg.loss, run.data.num_classes)
    # The run's own state goes into the checkpoint as data (run_state.json / .safetensors), not pickles.
    # The LR scheduler is not among them: it holds only settings, and those come from the command line.
    run.run_objects = dict(schedule=run.schedule, state=run.state, **({'ema': run.ema} if run.ema else {}))
    for hook in run.hooks:
        run.run_objects.update(hook.run_state())


def start_fresh(run: Run) -> None:
    """A run that resumes nothing: at ``--start-epoch`` (timm's), else at the beginning."""
    start_epoch = run.cfg.optim.start_epoch
    if start_epoch:
        run.state.epoch = start_epoch
        run.state.lr_updates = start_epoch * run.updates_per_epoch
        run.lr_scheduler.step(start_epoch)


def write_records(run: Run, point: Optional[ResumePoint]) -> None:
    """Every check has passed: an earlier run's results go (``--overwrite``), ``run.json`` and
    ``args.yaml`` are written, the trackers start, and the run says what it trains."""
    cfg, accelerator, state, out = run.cfg, run.accelerator, run.state, run.cfg.output
    state.updates_per_epoch = run.updates_per_epoch  # (after a resume placed the schedule by the old one)
    run.metrics = records.MetricsLog(out.output, keep_epochs=state.epoch)
    accelerator.wait_for_everyone()  # every process has checked the output folder before it is written
    if accelerator.is_main_process:
        if out.overwrite:
            rf.clear_results(out.output)
        resumed = dict(checkpoint=point.checkpoint, epoch=state.epoch, step=state.global_step,
                       changed=point.changes) if point else None
        records.write_run_file(out.output, cfg.to_dict(), run.data.splits, state if point else None, run.num_dropcluster,
                          resumed=resumed)
        records.write_args_file(out.output, cfg.to_args())
    if out.log_with:
        scalars = {k: v for k, v in flat_settings(cfg.to_dict()).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(out.wandb_project or 'train_timm', config=scalars,
                                  init_kwargs={'wandb': {'tags': out.wandb_tags}} if out.log_with == 'wandb' else {})
    data = run.data
    accelerator.print(f'training {cfg.model.name} ({data.num_classes} classes) for {cfg.optim.epochs} epochs, '
                      f'{run.steps_per_epoch} batches per epoch on {accelerator.num_processes} process(es); '
                      f'train {data.splits["train"]} ({len(data.train)} images), '
                      f'validation {data.splits["validation"]} ({len(data.eval)} images)'
                      + (f'; {run.schedule}' if run.ramped else ''))


def save_checkpoint(run: Run, name: str, epoch_loss: Optional[Tuple[Any, int]] = None) -> str:
    """A checkpoint of the run at its position; inside an epoch (``epoch_loss``: this process's losses of
    the epoch so far) with what continuing it exactly needs from every process."""
    state, accelerator = run.state, run.accelerator
    meta = {'identity': run.identity, 'epoch': state.epoch, 'global_step': state.global_step,
            'step_in_epoch': state.step_in_epoch, 'global_batch_size': run.global_batch, 'config': run.cfg.to_dict()}
    per_process = None
    if epoch_loss is not None:
        per_process = lambda folder: save_rank_state(  # noqa: E731
            folder, accelerator.process_index, run.train_loader.dataset.before_batch, *epoch_loss)
    with files_written_whole():
        return rf.save_checkpoint(accelerator, run.cfg.output.output, name, meta, run.run_objects,
                                  keep=run.cfg.output.checkpoint_hist, per_process=per_process)


def train_epoch(run: Run, on_step: Optional[Callable[[TrainState], None]],
                epoch_loss: Optional[Tuple[Any, int]]) -> Dict[str, Any]:
    """The epoch's start (a BRB soft reset and re-clustering when due, identical on every process),
    then its batches; returns its metrics row so far."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    epoch = state.epoch
    run.epoch_start = time.time()
    run.train_loader.set_epoch(epoch)
    if run.mixup_fn is not None and cfg.loss.mixup_off_epoch and epoch >= cfg.loss.mixup_off_epoch:
        run.mixup_fn.mixup_enabled = False
    if not state.step_in_epoch:  # (a resumed epoch began before the interruption)
        begun = run.recipe.begin_epoch(
            epoch, accelerator.unwrap_model(run.model, keep_torch_compile=False), run.optimizer,
            recluster=lambda seed: recluster(accelerator, run.model, run.ema, run.data.cluster, cfg.optim.batch_size,
                                             cfg.dropcluster.update_batches, seed=seed))
        state.epoch_soft_reset, state.epoch_reclustered = begun['soft_reset'], begun['reclustered']
        state.soft_resets += state.epoch_soft_reset
        state.reclusterings += state.epoch_reclustered
    row = {'epoch': epoch}
    row.update(train_one_epoch(accelerator, run.model, run.train_loader, run.optimizer, run.loss_fn,
                               run.lr_scheduler, run.recipe, state, cfg, ema=run.ema, mixup_fn=run.mixup_fn,
                               checkpoint_fn=lambda name, epoch_loss=None: save_checkpoint(run, name, epoch_loss),
                               on_step=on_step, hooks=run.hooks, epoch_loss=epoch_loss))
    if epoch_loss is not None:  # the resumed epoch is over: later epochs read their own random states
        run.train_loader.dataset.replay([])
    if not run.ramped:
        del row['drop_rate']
    if accelerator.num_processes > 1 and cfg.output.dist_bn and not cfg.model.sync_bn:
        distribute_bn(run.model, accelerator.num_processes, cfg.output.dist_bn == 'reduce')
    return row


def evaluate_epoch(run: Run, row: Dict[str, Any]) -> None:
    """Evaluate when due (with EMA, the EMA weights too, as timm's train.py), step the learning rate by
    the epoch, decide whether these weights are the best so far, print the row."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    epoch, eval_loader = row['epoch'], run.eval_loader
    run.evaluated = (epoch + 1) % cfg.output.val_interval == 0 or epoch + 1 == cfg.optim.epochs
    if run.evaluated:
        row.update(evaluate(accelerator, run.model, eval_loader))
        if run.ema is not None:
            row.update({'ema_' + k: v for k, v in evaluate(accelerator, run.ema.module, eval_loader).items()})
        published = accelerator.unwrap_model(run.model, keep_torch_compile=False) if run.ema is None else run.ema.module
        for hook in run.hooks:
            row.update(hook.after_eval(lambda m: evaluate(accelerator, m, eval_loader), published))
    run.lr_scheduler.step(epoch + 1, row.get(run.best_key))
    row.update({'reclustered': state.epoch_reclustered, 'soft_reset': state.epoch_soft_reset,
                'epoch_time': time.time() - run.epoch_start})
    lower_is_better = run.best_key.endswith('eval_loss')
    run.is_best = run.evaluated and (state.best_metric is None or (
        row[run.best_key] < state.best_metric if lower_is_better else row[run.best_key] > state.best_metric))
    if run.is_best:
        state.best_metric, state.best_epoch = row[run.best_key], epoch
    # Learning rates are small: significant digits, not places (lr 0.0000 says nothing).
    accelerator.print(' '.join(f'{k} {v:.4g}' if k == 'lr' else f'{k} {v:.4f}' if isinstance(v, float)
                               else f'{k} {v}' for k, v in row.items()))


def save_epoch(run: Run, row: Dict[str, Any]) -> None:
    """The epoch's files, whole even on Ctrl-C: the metrics, the model folders (``last/``, and ``best/``
    when these weights are the best), ``run.json``, the trackers and the epoch's checkpoint."""
    cfg, accelerator, out = run.cfg, run.accelerator, run.cfg.output
    with files_written_whole():
        if accelerator.is_main_process:
            run.metrics.add(row)
            published = run.ema.module if run.ema is not None else \
                accelerator.unwrap_model(run.model, keep_torch_compile=False)
            if run.ema is not None and run.num_dropcluster:
                set_drop_prob(published, run.schedule.rate)  # config.json records the rate of the run
            if run.evaluated:
                results = records.run_results(cfg, row, run.state, published, run.data,
                                         ema_decay=cfg.optim.model_ema_decay if run.ema is not None else None)
                for hook in run.hooks:
                    published, results = hook.publish(published, row, results)
                last = hub.save_pretrained(published, os.path.join(out.output, 'last'), metrics=results,
                                           data_config=run.data.data_config, repo_id=out.push_to_hub)
                if run.is_best:
                    hub.copy_model_folder(last, os.path.join(out.output, 'best'))
            records.write_run_file(out.output, cfg.to_dict(), run.data.splits, run.state, run.num_dropcluster)
        if out.log_with:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row['epoch'])
        save_checkpoint(run, f'epoch_{row["epoch"]:04d}')


def publish(run: Run) -> None:
    """The model folders are written every epoch: say where the best is, push it with ``--push-to-hub``,
    finish the trackers."""
    accelerator, out, state = run.accelerator, run.cfg.output, run.state
    if accelerator.is_main_process:
        accelerator.print(f'best {run.best_key} {state.best_metric:.4g} at epoch {state.best_epoch}; '
                          f'outputs in {out.output}')
        if out.push_to_hub:
            try:
                hub.push(os.path.join(out.output, 'best'), out.push_to_hub,
                         commit_message='Add DropCluster model trained with train_timm.py')
            except Exception as e:  # a failure while working (exit 1), not an input error
                raise RuntimeError(f'push to {out.push_to_hub} failed: {first_line(e)}') from e
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()
