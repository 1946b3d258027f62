#!/usr/bin/env python3
""" Evidence study on CIFAR-10: no structured dropout vs DropBlock vs DropCluster, clean and corrupted.

    python -m benchmarks.study_cifar10            # the default study (44 min on the 2-core CPU machine)
    python -m benchmarks.study_cifar10 --quick    # a few minutes: the same pipeline, tiny settings
    python -m benchmarks.study_cifar10 --device cuda --train-sizes 1000 5000 49000 --epochs 60 30 15 \\
        --channels 64 128 256 512 --layers 2 2 2 2 --seeds 5 --jobs 1       # scaled up on a GPU

Arms (same model family, recipe, epochs and seeds; only the regulariser differs):
    none         timm ResNet, no structured dropout
    dropblock    timm ResNet with ``drop_block_rate`` (timm's DropBlock2d in stages 3 and 4)
    dc_stages    ``resnet18_dropcluster``: DropCluster in stages 3 and 4 (the DropBlock slots)
    dc_stem      ``resnet18_dropcluster``: DropCluster in the stem only
The model is a narrow timm ResNet (``--layers``, ``--channels``) at 64 px (CIFAR upsampled) with
``output_stride=8``, so every clustered map is at least 8x8: the stem map is 32x32, stages 3 and 4
are 8x8. DropBlock and DropCluster ramp linearly from 0 after a start epoch (the same schedule for
both), and DropCluster re-clusters every few epochs from a no-grad forward of training images.

Protocol: a class-balanced validation split is carved from the CIFAR-10 training images; for each
training-set size and seed a class-balanced subset of the remaining training images is drawn. For
DropBlock and DropCluster the rate is chosen per size from ``--rates`` by validation top-1 of seed 0;
the other seeds then run at the chosen rate. Test top-1 is measured on a fixed class-balanced subset
of the test set, and mean corruption top-1 on a smaller subset of it under every corruption of
``dropcluster_timm.evaluation.corruptions`` at severities 1 to 5 (applied at the native 32 px, as CIFAR-10-C).

Writes ``OUTPUT.json`` (every run, written as they finish; a re-run with the same settings resumes),
``OUTPUT.md`` (tables), ``OUTPUT.png`` (top-1 against training-set size, mean +- std over seeds) and
``OUTPUT_card_table.json``, the results table of the ``resnet18_dropcluster`` model card:

    python -m benchmarks.study_cifar10 --card-table-only   # only the card table, from an existing OUTPUT.json
    dropcluster-timm cards --table resnet18_dropcluster=benchmarks/results/study_cifar10_card_table.json
"""
import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import timm
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import dropcluster_timm  # noqa: F401  registers resnet18_dropcluster
from dropcluster_timm import DropClusterSchedule, set_drop_prob, update_clusters
from dropcluster_timm.evaluation.corruptions import CORRUPTIONS, corruption_accuracy
from dropcluster_timm.hub.run_results import check_results_table

from .regularizer_study.data import balanced_split, load_cifar10  # the data helpers it shares with regularizer_study

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'
BASE_MODEL, DC_MODEL = 'resnet18', 'resnet18_dropcluster'
ARMS = ('none', 'dropblock', 'dc_stages', 'dc_stem')
ARM_LABELS = {'none': 'no structured dropout', 'dropblock': 'DropBlock, stages 3-4',
              'dc_stages': 'DropCluster, stages 3-4', 'dc_stem': 'DropCluster, stem'}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=str(DEFAULT_DATA), help='cifar10-jpg.tar.gz or its unpacked folder')
    p.add_argument('--cache-dir', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'dropcluster_cifar10'),
                   help='where the archive is unpacked and the decoded images are cached')
    p.add_argument('--output', default=str(REPO / 'benchmarks' / 'results' / 'study_cifar10'),
                   help='path stem of the .json, .md, .png and _card_table.json results')
    p.add_argument('--quick', action='store_true', help='tiny settings: checks the pipeline in a few minutes')
    p.add_argument('--card-table-only', action='store_true',
                   help='train nothing: write OUTPUT_card_table.json (the model card\'s table) from OUTPUT.json')
    p.add_argument('--arms', nargs='+', default=list(ARMS), choices=ARMS)
    p.add_argument('--train-sizes', nargs='+', type=int, default=[1000, 5000, 10000])
    p.add_argument('--epochs', nargs='+', type=int, default=[30, 8, 6], help='one per training-set size')
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--rates', nargs='+', type=float, default=[0.1, 0.2], help='drop-rate grid (DropBlock, DropCluster)')
    p.add_argument('--val-images', type=int, default=1000)
    p.add_argument('--test-images', type=int, default=2000)
    p.add_argument('--corruption-images', type=int, default=300)
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--layers', nargs=4, type=int, default=[1, 1, 1, 1])
    p.add_argument('--channels', nargs=4, type=int, default=[16, 32, 64, 128])
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=0.05)
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--drop-start', type=float, default=0.2, help='fraction of training before dropping starts')
    p.add_argument('--drop-warmup', type=float, default=0.5, help='fraction of training of the linear ramp')
    p.add_argument('--reclusters', type=int, default=4, help='re-clusterings per run (DropCluster arms)')
    p.add_argument('--cluster-images', type=int, default=128)
    p.add_argument('--dc-block-size', type=int, default=None,
                   help="DropCluster's DropBlock-equivalent cluster side (default: the model's, 5 in stage 3, "
                        '3 in stage 4, 7 in the stem)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--jobs', type=int, default=None,
                   help='runs in parallel (default: 2 on a CPU with 2+ cores, else 1)')
    args = p.parse_args(argv)
    if args.quick:
        args.train_sizes, args.epochs, args.seeds = [200, 500], [3, 2], 2
        args.val_images, args.test_images, args.corruption_images = 200, 300, 50
        if args.output == p.get_default('output'):
            args.output += '_quick'
    if len(args.epochs) != len(args.train_sizes):
        p.error(f'--epochs needs one value per --train-sizes ({len(args.train_sizes)}), got {len(args.epochs)}')
    if any(n % 10 or n <= 0 for n in args.train_sizes + [args.val_images, args.test_images, args.corruption_images]):
        p.error('image counts must be positive multiples of 10 (class-balanced CIFAR-10 subsets)')
    if max(args.train_sizes) + args.val_images > 50000 or args.test_images > 10000:
        p.error('CIFAR-10 has 5,000 training and 1,000 test images per class')
    if args.corruption_images > args.test_images:
        p.error('--corruption-images must not exceed --test-images')
    if args.dc_block_size is not None and args.dc_block_size < 1:
        p.error('--dc-block-size must be a positive integer')
    if args.seeds < 1 or not args.rates or any(not 0 < r < 1 for r in args.rates):
        p.error('need --seeds >= 1 and --rates in (0, 1)')
    if args.jobs is None:
        args.jobs = 2 if args.device == 'cpu' and (os.cpu_count() or 1) >= 2 else 1
    return args


# ----------------------------------------------------------------------------------------------
# Data: decoded once into uint8 tensors, split into class-balanced subsets


def splits(labels_train: torch.Tensor, labels_test: torch.Tensor, args) -> Dict[str, torch.Tensor]:
    val = balanced_split(labels_train, args.val_images // 10, torch.Generator().manual_seed(12345))
    out = {'val': val, 'test': balanced_split(labels_test, args.test_images // 10, torch.Generator().manual_seed(54321))}
    for seed in range(args.seeds):
        out[f'train_seed{seed}'] = balanced_split(labels_train, max(args.train_sizes) // 10, torch.Generator().manual_seed(seed),
                                                   exclude=val)
    return out


# ----------------------------------------------------------------------------------------------
# One run: train an arm on a subset, evaluate on validation, test and corrupted test images

_DATA: Dict[str, Any] = {}


def preprocess_fn(img_size: int, mean: Sequence[float], std: Sequence[float], device):
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images at 32 px -> normalised model input at ``img_size``, channels-last."""
        x = F.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)
    return preprocess


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The standard CIFAR augmentation on a uint8 batch: random 32 px crop of a 4 px reflect-padded
    image and a horizontal flip. Done on whole batches of in-memory tensors, because the per-image
    PIL pipeline would cost more than the narrow model's step on a 2-core CPU."""
    B = x.shape[0]
    padded = F.pad(x.float(), (4, 4, 4, 4), mode='reflect')
    dy, dx = torch.randint(0, 9, (2, B), generator=g)
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :]
    out = padded[torch.arange(B)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(B, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out / 255.0


def build_model(arm: str, rate: float, cfg: Dict[str, Any]) -> torch.nn.Module:
    kwargs = dict(num_classes=10, layers=tuple(cfg['layers']), channels=tuple(cfg['channels']),
                  stem_width=cfg['channels'][0], output_stride=8)
    if arm == 'none':
        return timm.create_model(BASE_MODEL, **kwargs)
    if arm == 'dropblock':
        return timm.create_model(BASE_MODEL, drop_block_rate=rate, **kwargs)
    placement = dict(dc_stages=(3, 4), dc_stem=False) if arm == 'dc_stages' else dict(dc_stages=(), dc_stem=True)
    return timm.create_model(DC_MODEL, drop_cluster_rate=rate, img_size=cfg['img_size'],
                             dc_block_size=cfg.get('dc_block_size'), **placement, **kwargs)


@torch.no_grad()
def top1(model, preprocess, x: torch.Tensor, y: torch.Tensor, device, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).float() / 255.0
        correct += (model(preprocess(xb)).argmax(-1).cpu() == y[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(x)


def run_one(job: Dict[str, Any]) -> Dict[str, Any]:
    """Train and evaluate one (arm, size, seed, rate); returns the row for the results file."""
    cfg = job['cfg']
    torch.set_num_threads(cfg['threads'])
    cache = cfg['cache_dir']
    if cache not in _DATA:  # loaded once per worker process (from the cache main() wrote)
        _DATA[cache] = load_cifar10('', cache)
    data = _DATA[cache]
    device = torch.device(cfg['device'])
    arm, size, seed, rate, epochs = job['arm'], job['size'], job['seed'], job['rate'], job['epochs']
    idx = job['splits'][f'train_seed{seed}'][:size]
    train_x, train_y = data['train_x'][idx], data['train_y'][idx]

    torch.manual_seed(seed)
    model = build_model(arm, rate, cfg).to(device, memory_format=torch.channels_last)
    data_config = resolve_data_config({}, model=model)
    preprocess = preprocess_fn(cfg['img_size'], data_config['mean'], data_config['std'], device)
    steps = math.ceil(size / cfg['batch_size'])
    optimizer = create_optimizer_v2(model, 'sgd', lr=cfg['lr'], weight_decay=cfg['weight_decay'], momentum=0.9)
    lr_scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=epochs, warmup_epochs=max(1, epochs // 10),
                                          warmup_lr=cfg['lr'] / 10, step_on_epochs=False, updates_per_epoch=steps)
    start = round(cfg['drop_start'] * epochs)
    schedule = DropClusterSchedule(
        target=rate, start_epoch=start, warmup_epochs=cfg['drop_warmup'] * epochs, shape='linear',
        update_freq=max(1, round((epochs - start) / cfg['reclusters'])), steps_per_epoch=steps)
    g = torch.Generator().manual_seed(seed)
    cluster_g = torch.Generator(device=device).manual_seed(seed)
    reclusters, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        if arm.startswith('dc_') and schedule.is_update_epoch(epoch):
            pick = torch.randperm(size, generator=g)[:cfg['cluster_images']]
            update_clusters(model, preprocess(train_x[pick].to(device).float() / 255.0), generator=cluster_g)
            reclusters += 1
        model.train()
        perm = torch.randperm(size, generator=g)
        for step in range(steps):
            b = perm[step * cfg['batch_size']:(step + 1) * cfg['batch_size']]
            set_drop_prob(model, schedule.rate, drop_block=True)
            x = preprocess(augment(train_x[b], g).to(device))
            loss = F.cross_entropy(model(x), train_y[b].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_scheduler.step_update(num_updates=epoch * steps + step + 1)
            schedule.step()
        lr_scheduler.step(epoch + 1)
    train_time = time.perf_counter() - t0

    splits_ = job['splits']
    row = dict(arm=arm, size=size, seed=seed, rate=rate, epochs=epochs, final_loss=loss.item(),
               reclusters=reclusters, train_time_s=round(train_time, 1))
    row['val_top1'] = top1(model, preprocess, data['train_x'][splits_['val']], data['train_y'][splits_['val']], device)
    # Un-augmented top-1 on (up to 1,000 of) the run's own training images: the gap to val_top1 shows
    # how much the model overfits, i.e. how much a regulariser has to work on.
    row['train_top1'] = top1(model, preprocess, train_x[:1000], train_y[:1000], device)
    t = splits_['test']
    row['test_top1'] = top1(model, preprocess, data['test_x'][t], data['test_y'][t], device)
    c = t[:cfg['corruption_images']]
    loader = [(data['test_x'][c[i:i + 100]].float() / 255.0, data['test_y'][c[i:i + 100]])
              for i in range(0, len(c), 100)]
    report = corruption_accuracy(model, loader, preprocess=preprocess, seed=0)
    row['corruption_subset_top1'] = report['top1']
    row['mean_corruption_top1'] = report['mean_corruption_top1']
    row['corruptions'] = report['mean_per_corruption']
    row['total_time_s'] = round(time.perf_counter() - t0, 1)
    return row


# ----------------------------------------------------------------------------------------------
# The study: rate selection on validation (seed 0), then the other seeds at the chosen rate


def run_key(arm: str, size: int, seed: int, rate: float) -> str:
    return f'{arm}/{size}/{seed}/{rate:g}'


def select_rate(rows: Dict[str, Dict[str, Any]], arm: str, size: int, rates: Sequence[float]) -> float:
    """The grid rate with the best seed-0 validation top-1 (ties: the smaller rate)."""
    return max(sorted(rates), key=lambda r: (rows[run_key(arm, size, 0, r)]['val_top1'], -r))


def study_config(args) -> Dict[str, Any]:
    keys = ('arms', 'train_sizes', 'epochs', 'seeds', 'rates', 'val_images', 'test_images', 'corruption_images',
            'img_size', 'layers', 'channels', 'batch_size', 'lr', 'weight_decay', 'drop_start', 'drop_warmup',
            'reclusters', 'cluster_images')
    cfg = {k: getattr(args, k) for k in keys}
    if args.dc_block_size is not None:  # recorded only when set: results of the defaults keep their config
        cfg['dc_block_size'] = args.dc_block_size
    return cfg


def run_study(args) -> Dict[str, Any]:
    results_path = Path(args.output + '.json')
    results = {'config': study_config(args), 'models': {'dropcluster': DC_MODEL, 'base': BASE_MODEL}, 'runs': {}}
    earlier_wall_time = 0.0
    if results_path.exists():
        old = json.loads(results_path.read_text())
        if old.get('config') == results['config']:
            results['runs'] = old['runs']  # resume: same settings, keep finished runs
            earlier_wall_time = old.get('wall_time_s', 0.0)
            print(f'resuming: {len(results["runs"])} runs already in {results_path}')
    data = load_cifar10(args.data, args.cache_dir)
    split_idx = splits(data['train_y'], data['test_y'], args)
    cfg = dict(results['config'], device=args.device, cache_dir=args.cache_dir,
               threads=max(1, (os.cpu_count() or 1) // args.jobs) if args.device == 'cpu' else 1)
    rows = results['runs']
    epochs = dict(zip(args.train_sizes, args.epochs))

    def job(arm, size, seed, rate):
        return dict(cfg=cfg, splits=split_idx, arm=arm, size=size, seed=seed, rate=rate, epochs=epochs[size])

    def save():
        results['machine'] = machine(args)
        results['selected_rates'] = selected
        tmp = results_path.with_suffix('.tmp')
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, results_path)

    # Phase 1: every seed of 'none', and seed 0 of every (arm, rate) of the grid.
    pending = []
    for size in sorted(args.train_sizes, reverse=True):  # longest first: better packing of parallel jobs
        for arm in args.arms:
            if arm == 'none':
                pending += [job(arm, size, s, 0.0) for s in range(args.seeds)]
            else:
                pending += [job(arm, size, 0, r) for r in args.rates]
    selected: Dict[str, Dict[str, float]] = {}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def phase2(arm, size):
        """Jobs for the remaining seeds once an arm's grid at this size is done."""
        grid = [run_key(arm, size, 0, r) for r in args.rates]
        if arm == 'none' or any(k not in rows for k in grid) or arm in selected.get(str(size), {}):
            return []
        rate = select_rate(rows, arm, size, args.rates)
        selected.setdefault(str(size), {})[arm] = rate
        return [job(arm, size, s, rate) for s in range(1, args.seeds)]

    def done(row):
        rows[run_key(row['arm'], row['size'], row['seed'], row['rate'])] = row
        print(f"[{time.perf_counter() - t0:7.0f} s] {row['arm']:<10} n={row['size']:<6} seed {row['seed']} "
              f"rate {row['rate']:<5g} val {row['val_top1']:5.1f}  test {row['test_top1']:5.1f}  "
              f"mCA {row['mean_corruption_top1']:5.1f}  ({row['total_time_s']:.0f} s)", flush=True)

    queue = [j for j in pending if run_key(j['arm'], j['size'], j['seed'], j['rate']) not in rows]
    for size in args.train_sizes:  # phase-2 jobs whose grid finished in an earlier, interrupted run
        for arm in args.arms:
            queue += [j for j in phase2(arm, size) if run_key(j['arm'], j['size'], j['seed'], j['rate']) not in rows]
    if args.jobs == 1:
        while queue:
            j = queue.pop(0)
            done(run_one(j))
            queue += phase2(j['arm'], j['size'])
            save()
    else:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context('spawn')) as pool:
            running = {pool.submit(run_one, j): j for j in queue}
            while running:
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    j = running.pop(f)
                    done(f.result())
                    for nj in phase2(j['arm'], j['size']):
                        running[pool.submit(run_one, nj)] = nj
                    save()
    for size in args.train_sizes:
        for arm in args.arms:
            phase2(arm, size)
    results['wall_time_s'] = round(earlier_wall_time + time.perf_counter() - t0, 1)
    save()
    return results


def machine(args) -> Dict[str, Any]:
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), device=args.device, jobs=args.jobs, torch=torch.__version__,
                timm=timm.__version__, python=platform.python_version(),
                gpu=torch.cuda.get_device_name() if args.device.startswith('cuda') else None)


# ----------------------------------------------------------------------------------------------
# Summary: tables and plot


def summarize(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Mean and standard deviation over seeds, per (size, arm), at the selected rate."""
    cfg, rows = results['config'], results['runs']
    out = []
    for size in cfg['train_sizes']:
        for arm in cfg['arms']:
            rate = 0.0 if arm == 'none' else results['selected_rates'].get(str(size), {}).get(arm)
            if rate is None:
                continue
            runs = [rows[k] for s in range(cfg['seeds']) if (k := run_key(arm, size, s, rate)) in rows]
            if not runs:
                continue
            entry = dict(size=size, arm=arm, rate=rate, seeds=len(runs))
            metrics = ['test_top1', 'mean_corruption_top1', 'val_top1']
            if all('train_top1' in r for r in runs):  # absent from results of earlier versions
                metrics.append('train_top1')
            for metric in metrics:
                v = torch.tensor([r[metric] for r in runs], dtype=torch.float64)
                entry[metric] = v.mean().item()
                entry[metric + '_std'] = v.std().item() if len(v) > 1 else 0.0
            out.append(entry)
    return out


def render_markdown(results: Dict[str, Any], summary: List[Dict[str, Any]], command: str) -> str:
    cfg, m = results['config'], results['machine']
    lines = [
        '# CIFAR-10 study: no structured dropout vs DropBlock vs DropCluster', '',
        f'Command: `{command}`  ',
        f"Machine: {m['processor']}, {m['cpus']} CPUs, device {m['device']}"
        + (f" ({m['gpu']})" if m.get('gpu') else '') + f", {m['jobs']} parallel runs; torch {m['torch']}, "
        f"timm {m['timm']}; wall time {results.get('wall_time_s', 0) / 60:.0f} min.", '',
        f"Model: timm ResNet, layers {cfg['layers']}, channels {cfg['channels']}, output_stride 8, "
        f"{cfg['img_size']} px input (CIFAR-10 upsampled from 32 px); SGD lr {cfg['lr']}, batch {cfg['batch_size']}, "
        f"cosine schedule, crop + flip. Epochs per training-set size: "
        + ', '.join(f'{n}: {e}' for n, e in zip(cfg['train_sizes'], cfg['epochs']))
        + f". Drop rate ramps linearly from {cfg['drop_start']:.0%} of training over {cfg['drop_warmup']:.0%} of it; "
        f"DropCluster re-clusters {cfg['reclusters']} times from {cfg['cluster_images']} training images"
        + (f", cluster side {cfg['dc_block_size']} in every layer" if cfg.get('dc_block_size') else '') + '.', '',
        f"Rates chosen from {cfg['rates']} per size by seed-0 top-1 on {cfg['val_images']} validation images "
        f"carved from the training set. Test top-1 on {cfg['test_images']} class-balanced test images; mean "
        f"corruption top-1 (mCA) over {len(CORRUPTIONS)} corruptions x 5 severities on the first "
        f"{cfg['corruption_images']} of them. Mean +- std over {cfg['seeds']} seeds (each seed draws its own "
        'training subset and initialisation).', '',
        '| train images | arm | rate | test top-1 (%) | mCA (%) | val top-1 (%) | seeds |',
        '|---:|---|---:|---:|---:|---:|---:|',
    ]
    for e in summary:
        lines.append(f"| {e['size']} | {ARM_LABELS[e['arm']]} | {e['rate']:g} | {e['test_top1']:.2f} +- "
                     f"{e['test_top1_std']:.2f} | {e['mean_corruption_top1']:.2f} +- {e['mean_corruption_top1_std']:.2f}"
                     f" | {e['val_top1']:.2f} +- {e['val_top1_std']:.2f} | {e['seeds']} |")
    lines += ['', 'Rate selection (seed 0, validation top-1 %):', '',
              '| train images | arm | ' + ' | '.join(f'rate {r:g}' for r in cfg['rates']) + ' | chosen |',
              '|---:|---|' + '---:|' * (len(cfg['rates']) + 1)]
    for size in cfg['train_sizes']:
        for arm in cfg['arms']:
            if arm == 'none':
                continue
            vals = [results['runs'].get(run_key(arm, size, 0, r), {}).get('val_top1') for r in cfg['rates']]
            chosen = results['selected_rates'].get(str(size), {}).get(arm)
            lines.append(f'| {size} | {ARM_LABELS[arm]} | ' + ' | '.join('-' if v is None else f'{v:.2f}' for v in vals)
                         + f" | {'-' if chosen is None else f'{chosen:g}'} |")
    lines += ['', 'Top-1 (%) per corruption, mean over severities and seeds:', '',
              '| train images | arm | ' + ' | '.join(CORRUPTIONS) + ' |', '|---:|---|' + '---:|' * len(CORRUPTIONS)]
    for e in summary:
        runs = [results['runs'][k] for s in range(cfg['seeds'])
                if (k := run_key(e['arm'], e['size'], s, e['rate'])) in results['runs']]
        lines.append(f"| {e['size']} | {ARM_LABELS[e['arm']]} | " + ' | '.join(
            f"{sum(r['corruptions'][c] for r in runs) / len(runs):.1f}" for c in CORRUPTIONS) + ' |')
    return '\n'.join(lines) + '\n'


def card_table(results: Dict[str, Any]) -> Dict[str, Any]:
    """The study's results table for the model card of ``results['models']['dropcluster']``, in the
    format of ``dropcluster_timm.hub.run_results.load_results_table``."""
    cfg, models = results['config'], results['models']
    description = (
        f'From `benchmarks/study_cifar10.py` (results file `benchmarks/results/study_cifar10.json`): a narrow '
        f'`{models["dropcluster"]}` (layers {cfg["layers"]}, channels {cfg["channels"]}, output_stride 8, '
        f'{cfg["img_size"]} px) trained from scratch on class-balanced CIFAR-10 subsets, against the same timm '
        f'`{models["base"]}` without structured dropout and with DropBlock. Rates chosen on a validation '
        f'split; test top-1 on {cfg["test_images"]} test images, mean corruption top-1 (mCA) over '
        f'{len(CORRUPTIONS)} corruptions x 5 severities on {cfg["corruption_images"]} of them; mean +- std over '
        f'{cfg["seeds"]} seeds. A difference smaller than the standard deviations is not evidence either way; '
        f'docs/benchmarks.md of the dropcluster-timm repository discusses these figures.')
    rows = [[e['size'], ARM_LABELS.get(e['arm'], e['arm']), e['rate'],
             f"{e['test_top1']:.2f} +- {e['test_top1_std']:.2f}",
             f"{e['mean_corruption_top1']:.2f} +- {e['mean_corruption_top1_std']:.2f}"]
            for e in results.get('summary') or summarize(results)]
    return check_results_table({
        'title': 'CIFAR-10 study (from-scratch runs; no weights published)',
        'description': description,
        'columns': ['train images', 'regulariser', 'rate', 'test top-1 (%)', 'mCA (%)'],
        'align': ['right', 'left', 'right', 'right', 'right'],  # the +- cells are figures too
        'rows': rows,
    }, source='card_table')


def write_card_table(results: Dict[str, Any], output: str) -> Path:
    """Write ``card_table(results)`` to ``OUTPUT_card_table.json``."""
    path = Path(output + '_card_table.json')
    path.write_text(json.dumps(card_table(results), indent=1) + '\n', encoding='utf-8')
    return path


def plot(summary: List[Dict[str, Any]], path: str) -> Optional[str]:
    try:
        import matplotlib
    except ImportError:
        print('matplotlib not installed: no plot (pip install matplotlib)')
        return None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    arms = list(dict.fromkeys(e['arm'] for e in summary))
    for ax, metric, title in zip(axes, ('test_top1', 'mean_corruption_top1'),
                                 ('clean test top-1 (%)', 'mean corruption top-1 (%)')):
        for k, arm in enumerate(arms):
            es = [e for e in summary if e['arm'] == arm]
            # A small horizontal offset per arm keeps the error bars apart.
            xs = [e['size'] * (1 + 0.03 * (k - (len(arms) - 1) / 2)) for e in es]
            ax.errorbar(xs, [e[metric] for e in es], yerr=[e[metric + '_std'] for e in es], marker='o',
                        capsize=3, label=ARM_LABELS[arm])
        ax.set_xscale('log')
        ax.set_xlabel('training images (CIFAR-10, class-balanced)')
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.card_table_only:
        results_path = Path(args.output + '.json')
        if not results_path.is_file():
            print(f'study_cifar10.py: error: no results at {results_path} (run the study first)', file=sys.stderr)
            return 2
        print(write_card_table(json.loads(results_path.read_text()), args.output))
        return 0
    if not Path(args.data).exists() and not (Path(args.cache_dir) / 'cifar10_uint8.safetensors').exists():
        print(f'skipped: CIFAR-10 not found at {args.data} (see ../shared/data/README.md; --data PATH)')
        return 0
    results = run_study(args)
    summary = summarize(results)
    results['summary'] = summary
    Path(args.output + '.json').write_text(json.dumps(results, indent=1))
    command = 'python -m benchmarks.study_cifar10 ' + ' '.join(argv if argv is not None else sys.argv[1:])
    Path(args.output + '.md').write_text(render_markdown(results, summary, command.strip()))
    plot(summary, args.output + '.png')
    write_card_table(results, args.output)
    print(Path(args.output + '.md').read_text())
    return 0


if __name__ == '__main__':
    sys.exit(main())
