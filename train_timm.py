#!/usr/bin/env python3
""" Train timm models with DropCluster, on one or many GPUs / machines or on CPU, with Accelerate.

    accelerate launch train_timm.py                      # embedded default: resnet18_dropcluster on digits
    python train_timm.py evaluate OUTPUT/best --corruptions all   # clean and corrupted top-1 of a saved model
    accelerate launch train_timm.py --data-dir /data/imagenet --model resnet50_dropcluster \\
        --drop-cluster 0.1 --drop-cluster-start 20 --drop-cluster-warmup 10 --output runs/r50

Parse, build, loop, save; the pieces live in ``dropcluster_timm.training``.
"""
import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, ParseKwargs
from torch.utils.data import DataLoader

import dropcluster_timm  # noqa: F401  registers the *_dropcluster models with timm
from dropcluster_timm import (
    CLUSTER_METHODS, SCHEDULE_SHAPES, ddp_ignore_cluster_buffers, dropcluster_layers, set_drop_prob)
from dropcluster_timm.visualization import plot_cluster_maps
from dropcluster_timm import training as T

# Options whose default depends on the data: the embedded digits run is small and short.
# drop_cluster_fractions: the defaults of --drop-cluster-start, --drop-cluster-warmup and
# --drop-cluster-update-freq as fractions of --epochs, so that DropCluster switches on in a run of
# any length (at 100 epochs: start 20, warmup 10, re-cluster every 10).
EMBEDDED_DEFAULTS = dict(
    model='resnet18_dropcluster', img_size=32, batch_size=64, epochs=12, opt='adamw', lr=2e-3,
    weight_decay=0.05, warmup_epochs=1, drop_cluster=0.1, hflip=0.0, scale=[0.75, 1.0], workers=0,
    # At 32 px stages 3-4 are 2x2 and 1x1: put DropCluster in the stem (16x16) too, ~16-pixel clusters.
    cluster_size=16, model_kwargs={'dc_stem': True}, drop_cluster_fractions=(0.25, 0.25, 0.25),
)
GENERAL_DEFAULTS = dict(
    model='resnet50_dropcluster', img_size=None, batch_size=128, epochs=100, opt='sgd', lr=0.1,
    weight_decay=1e-4, warmup_epochs=5, drop_cluster=0.1, hflip=0.5, scale=[0.08, 1.0], workers=4,
    model_kwargs={}, drop_cluster_fractions=(0.2, 0.1, 0.1),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('data (none given: the embedded scikit-learn digits data set)')
    g.add_argument('data_dir_pos', nargs='?', metavar='DATA_DIR', help='same as --data-dir')
    g.add_argument('--data-dir', default=None, help='ImageFolder root (with train/ and validation/ or val/)')
    g.add_argument('--dataset', default='', help='timm dataset name (torch/..., hfds/..., wds/...); '
                   '"" = ImageFolder, "digits" = embedded')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation')
    g.add_argument('--num-classes', type=int, default=None, help='checked against the data set')
    g.add_argument('--img-size', type=int, default=None)
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'))
    g.add_argument('--crop-pct', type=float, default=None)
    g.add_argument('--mean', type=float, nargs='+', default=None)
    g.add_argument('--std', type=float, nargs='+', default=None)
    g.add_argument('--interpolation', default='')
    g.add_argument('--workers', '-j', type=int, default=None)
    g = p.add_argument_group('model')
    g.add_argument('--model', default=None)
    g.add_argument('--pretrained', action='store_true')
    g.add_argument('--initial-checkpoint', default='')
    g.add_argument('--drop', type=float, default=None, help='classifier dropout')
    g.add_argument('--drop-path', type=float, default=None)
    g.add_argument('--drop-block', type=float, default=None)
    g.add_argument('--model-kwargs', nargs='*', default=None, action=ParseKwargs, metavar='KEY=VALUE',
                   help='more model arguments, e.g. dc_stem=True dc_stages=[2,3,4]')
    g = p.add_argument_group('DropCluster')
    g.add_argument('--drop-cluster', type=float, default=None, metavar='RATE', help='target drop rate')
    g.add_argument('--drop-cluster-start', type=float, default=None, metavar='EPOCH',
                   help='first epoch with a non-zero rate (default: 20%% of --epochs; 25%% on the digits)')
    g.add_argument('--drop-cluster-warmup', type=float, default=None, metavar='EPOCHS',
                   help='epochs of the ramp to the target rate (default: 10%% of --epochs; 25%% on the digits)')
    g.add_argument('--drop-cluster-shape', default='linear', choices=SCHEDULE_SHAPES)
    g.add_argument('--drop-cluster-update-freq', type=int, default=None, metavar='EPOCHS',
                   help='re-cluster every N epochs from the start epoch on (0: never; default: 10%% of '
                   '--epochs, at least 1; 25%% on the digits)')
    g.add_argument('--drop-cluster-update-batches', type=int, default=2, metavar='N',
                   help='batches of training images the clusters are computed from')
    g.add_argument('--cluster-method', default=None, choices=CLUSTER_METHODS)
    g.add_argument('--cluster-size', type=int, default=None, help='target mean cluster size (elements)')
    g.add_argument('--num-clusters', type=int, default=None, help='clusters per map')
    g = p.add_argument_group('optimisation')
    g.add_argument('--batch-size', '-b', type=int, default=None, help='per process')
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--epochs', type=int, default=None)
    g.add_argument('--opt', default=None)
    g.add_argument('--lr', type=float, default=None)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=None)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--sched', default='cosine')
    g.add_argument('--warmup-epochs', type=int, default=None)
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--smoothing', type=float, default=0.0)
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--model-ema', action='store_true')
    g.add_argument('--model-ema-decay', type=float, default=0.998)
    g.add_argument('--hflip', type=float, default=None)
    g.add_argument('--vflip', type=float, default=0.0)
    g.add_argument('--scale', type=float, nargs=2, default=None)
    g.add_argument('--ratio', type=float, nargs=2, default=[3 / 4, 4 / 3])
    g.add_argument('--color-jitter', type=float, default=None)
    g.add_argument('--aa', default=None, help='auto-augment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--reprob', type=float, default=0.0)
    g.add_argument('--seed', type=int, default=42)
    g = p.add_argument_group('output')
    g.add_argument('--output', default='output/train', help='run folder: checkpoints/, best/, last/, metrics')
    g.add_argument('--resume', default=None, help='an output folder (its newest checkpoint) or a checkpoint')
    g.add_argument('--checkpoint-steps', type=int, default=0, help='also checkpoint every N batches')
    g.add_argument('--checkpoint-hist', type=int, default=2, help='checkpoints kept')
    g.add_argument('--log-with', default=None, help='accelerate tracker, e.g. tensorboard')
    g.add_argument('--push-to-hub', default=None, metavar='ORG/NAME')
    g.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    args.data_dir = args.data_dir or args.data_dir_pos
    embedded = not args.data_dir and args.dataset in ('', T.EMBEDDED_DATASET)
    defaults = dict(EMBEDDED_DEFAULTS if embedded else GENERAL_DEFAULTS)
    start, warmup, update = defaults.pop('drop_cluster_fractions')
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.drop_cluster_start is None:
        args.drop_cluster_start = round(start * args.epochs, 4)
    if args.drop_cluster_warmup is None:
        args.drop_cluster_warmup = round(warmup * args.epochs, 4)
    if args.drop_cluster_update_freq is None:
        args.drop_cluster_update_freq = max(1, round(update * args.epochs))
    if embedded:
        args.dataset = T.EMBEDDED_DATASET
    return args


def main(args):
    T.check_args(args)  # one-line errors before any setup
    checkpoint = T.find_checkpoint(args.resume) if args.resume else None
    if checkpoint:
        T.check_checkpoint_files(checkpoint)
    T.check_output(args.output, checkpoint)  # refuses a file, or a folder holding another run
    if args.push_to_hub:
        T.check_push_credentials(args.push_to_hub)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum_steps,
        log_with=args.log_with,
        project_dir=args.output,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    T.use_cpu_cores(accelerator)
    set_seed(args.seed)
    if args.resume and checkpoint is None:
        accelerator.print(f'{args.resume} holds no checkpoint yet (its run stopped in the first epoch): '
                          'starting over')

    # Build: model, data, optimisation.
    data = T.build_data(args)
    model = T.build_model(args, data.num_classes)
    args.num_classes = data.num_classes
    data_config = T.set_transforms(data, args, model)
    T.init_cluster_maps(model, data_config['input_size'])  # grid maps, so every checkpoint carries them
    if checkpoint:
        T.check_resume(checkpoint, T.run_identity(args))
    T.configure_dropcluster(model, args)
    num_dropcluster = sum(1 for _ in dropcluster_layers(model))
    if args.drop_cluster > 0 and not num_dropcluster:
        accelerator.print(f'warning: {args.model} has no DropCluster layers, --drop-cluster is ignored')

    train_loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.workers, persistent_workers=args.workers > 0)
    eval_loader = DataLoader(data.eval, batch_size=args.batch_size, num_workers=args.workers)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    ddp_ignore_cluster_buffers(model)  # the maps are synchronised by update_clusters, not by DDP
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = len(train_loader)
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False,
        updates_per_epoch=max(1, steps_per_epoch // args.grad_accum_steps))
    schedule = T.make_schedule(args, steps_per_epoch)
    if num_dropcluster:
        for warning in T.schedule_warnings(schedule, args.epochs):
            accelerator.print(f'warning: {warning}')
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=args.model_ema_decay) if args.model_ema else None
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                         num_classes=data.num_classes)
        loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss_fn = torch.nn.CrossEntropyLoss()

    state = T.TrainState()
    for obj in (lr_scheduler, schedule, state) + ((ema,) if ema is not None else ()):
        accelerator.register_for_checkpointing(obj)
    if checkpoint:
        T.load_checkpoint(accelerator, checkpoint)
        lr_scheduler.step_update(num_updates=state.num_updates)
        accelerator.print(f'resumed from {checkpoint}: epoch {state.epoch}, step {state.global_step}, '
                          f'drop rate {schedule.rate:.4f}')
    metrics = T.MetricsLog(args.output, keep_epochs=state.epoch)
    accelerator.wait_for_everyone()  # every process has checked the output folder before it is written
    if accelerator.is_main_process:
        T.write_run_file(args.output, vars(args), data.splits)  # all checks passed
    if args.log_with:
        accelerator.init_trackers('train_timm', config={k: v for k, v in vars(args).items()
                                                        if isinstance(v, (int, float, str, bool))})

    def checkpoint_fn(name):
        meta = {'identity': T.run_identity(args), 'epoch': state.epoch, 'global_step': state.global_step,
                'step_in_epoch': state.step_in_epoch}
        return T.save_checkpoint(accelerator, args.output, name, meta, keep=args.checkpoint_hist)

    # Loop. With EMA, the EMA weights are evaluated, picked as best and published, as in timm's train.py.
    accelerator.print(f'training {args.model} ({data.num_classes} classes) for {args.epochs} epochs, '
                      f'{steps_per_epoch} batches per epoch on {accelerator.num_processes} process(es); '
                      f'train {data.splits["train"]} ({len(data.train)} images), '
                      f'validation {data.splits["validation"]} ({len(data.eval)} images); {schedule}')
    best_key = 'top1' if ema is None else 'ema_top1'
    while state.epoch < args.epochs:
        epoch, start = state.epoch, time.time()
        train_loader.set_epoch(epoch)
        reclustered = bool(num_dropcluster) and state.step_in_epoch == 0 and schedule.is_update_epoch(epoch)
        if reclustered:
            T.recluster(accelerator, model, ema, data.cluster, args, epoch)
            state.reclusterings += 1
        row = {'epoch': epoch}
        row.update(T.train_one_epoch(
            accelerator, model, train_loader, optimizer, loss_fn, lr_scheduler, schedule, state, ema=ema,
            mixup_fn=mixup_fn, clip_grad=args.clip_grad, checkpoint_fn=checkpoint_fn,
            checkpoint_steps=args.checkpoint_steps, progress=not args.no_progress))
        lr_scheduler.step(epoch + 1)
        row.update(T.evaluate(accelerator, model, eval_loader))
        if ema is not None:
            row.update({'ema_' + k: v for k, v in T.evaluate(accelerator, ema.module, eval_loader).items()})
        row.update({'reclustered': reclustered, 'epoch_time': time.time() - start})
        is_best = state.best_top1 is None or row[best_key] > state.best_top1
        if is_best:
            state.best_top1, state.best_epoch = row[best_key], epoch
        accelerator.print(' '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()))
        if accelerator.is_main_process:
            metrics.add(row)
            published = accelerator.unwrap_model(model) if ema is None else ema.module
            if ema is not None and num_dropcluster:
                set_drop_prob(published, schedule.rate)  # config.json records the rate of the run
            card = T.run_card_metrics(args, row, state, published, data,
                                      ema_decay=args.model_ema_decay if ema is not None else None)
            T.save_model_folder(published, os.path.join(args.output, 'last'), card, data.data_config,
                                repo_id=args.push_to_hub)
            if is_best:
                T.save_model_folder(published, os.path.join(args.output, 'best'), card, data.data_config,
                                    repo_id=args.push_to_hub)
            plot_cluster_maps(published, os.path.join(args.output, 'cluster_maps.png'))
            T.write_run_file(args.output, vars(args), data.splits, state, num_dropcluster)
        if args.log_with:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
        checkpoint_fn(f'epoch_{epoch:04d}')

    # Save.
    if args.log_with:
        accelerator.end_training()
    if accelerator.is_main_process:
        accelerator.print(f'best {best_key} {state.best_top1:.2f} at epoch {state.best_epoch}; '
                          f'outputs in {args.output}')
        if args.push_to_hub:
            T.push_folder(os.path.join(args.output, 'best'), args.push_to_hub)
    accelerator.wait_for_everyone()
    return SimpleNamespace(accelerator=accelerator, model=model, ema=ema, schedule=schedule, state=state,
                           metrics=metrics.rows)


if __name__ == '__main__':
    if sys.argv[1:2] == ['evaluate']:
        sys.exit(T.eval_main(sys.argv[2:]))
    try:
        main(parse_args())
    except T.TrainingError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
