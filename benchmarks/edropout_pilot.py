#!/usr/bin/env python3
""" EDropout pilot on CIFAR-10: does the energy search find a better pruned network than magnitude
pruning, or than a random sub-network, at the same size?

    python -m benchmarks.edropout_pilot                       # CPU pilot, resumes from its results file
    python -m benchmarks.edropout_pilot --quick               # the pipeline in a minute (numbers mean nothing)
    python -m benchmarks.edropout_pilot --device cuda --seeds 0 1 2 3 4 5 6 7 --budget-minutes 9

Arms, paired by seed (same training subset, data order, augmentation draws and initial weights):

* ``unpruned``: the timm ResNet trained without EDropout (the reference accuracy and size).
* ``edropout``: trained with EDropout in every block's drop_block slot (``dropcluster_timm.edropout.layers``:
  the energy search runs from the first batch), then pruned (``prune_channels``); its eval accuracy
  before and after pruning is measured (they must agree: removing zeroed channels is exact);
  ``edropout_ft``: the pruned model fine-tuned like ``magnitude_ft``, so both pruned arms get the same
  training budget (``--epochs`` + ``--ft-epochs``).
* ``magnitude``: the trained ``unpruned`` model pruned by filter L1 norm to exactly the per-block
  widths EDropout kept (same parameter count), no fine-tuning; ``magnitude_ft``: the same, fine-tuned
  for ``--ft-epochs`` with the same recipe.
* ``random_state``: the control for the search. Trained under EDropout's initial random state, which
  is never evolved. The sub-network is random and of about the same size.

Every run is deterministic on the CPU (same numbers on a re-run). Top-1 is measured on all 10,000
test images. One JSON line per finished arm is written to ``RESULTS/runs.jsonl``. Writing the report
(``RESULTS/report.md``) re-reads it, with paired differences and 95% t intervals over seeds.
"""
import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
import timm
from timm.scheduler import create_scheduler_v2

from dropcluster_timm.edropout.layers import add_edropout, edropout_step, make_search
from dropcluster_timm.edropout.prune import edropout_keep, magnitude_keep, prune_channels

from .regularizer_study.data import augment, balanced_split, load_cifar10
from .regularizer_study.stats import mean_std, paired_difference

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1].parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'
ARMS = ('unpruned', 'edropout', 'edropout_ft', 'magnitude', 'magnitude_ft', 'random_state')
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=str(DEFAULT_DATA))
    p.add_argument('--cache-dir', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'dropcluster_cifar10'))
    p.add_argument('--results', default=str(HERE / 'results' / 'edropout_pilot'))
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    p.add_argument('--train-images', type=int, default=10000, help='class-balanced subset of the training set')
    p.add_argument('--epochs', type=int, default=15)
    p.add_argument('--ft-epochs', type=int, default=3, help='fine-tuning epochs of magnitude_ft')
    p.add_argument('--layers', type=int, nargs=4, default=[2, 2, 2, 2])
    p.add_argument('--channels', type=int, nargs=4, default=[32, 64, 128, 256])
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=0.05)
    p.add_argument('--candidates', type=int, default=8)
    p.add_argument('--interval', type=int, default=2, help='evolve every N batches')
    p.add_argument('--converge', type=int, default=100)
    p.add_argument('--keep-prob', type=float, default=0.5)
    p.add_argument('--batch-per-state', type=int, default=8)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--budget-minutes', type=float, default=0, help='start no seed past this (0: no limit)')
    p.add_argument('--quick', action='store_true')
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.train_images, args.epochs, args.ft_epochs = [0, 1], 500, 1, 1
        args.channels, args.layers = [8, 16, 32, 64], [1, 1, 1, 1]
    return args


def settings(args) -> Dict[str, Any]:
    keys = ('train_images', 'epochs', 'ft_epochs', 'layers', 'channels', 'batch_size', 'lr', 'candidates',
            'interval', 'converge', 'keep_prob', 'batch_per_state')
    return {k: getattr(args, k) for k in keys}


def build(args, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('resnet18', num_classes=10, layers=args.layers, channels=args.channels)


def top1(model, x: torch.Tensor, y: torch.Tensor, device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 500):
            xb = (x[i:i + 500].to(device).float() / 255 - MEAN.to(device)) / STD.to(device)
            correct += int((model(xb).argmax(1) == y[i:i + 500].to(device)).sum())
    return 100.0 * correct / len(x)


def train(model, args, data, seed: int, epochs: int, lr: float, search=None, device='cpu') -> Dict[str, float]:
    """SGD (Nesterov, wd 5e-4) with a per-step cosine schedule; with ``search``, an EDropout evolution
    step every ``args.interval`` batches. Returns the seconds spent training and in the energy steps."""
    train_idx = balanced_split(data['train_y'], args.train_images // 10, torch.Generator().manual_seed(seed))
    x_all, y_all = data['train_x'][train_idx], data['train_y'][train_idx]
    steps = len(x_all) // args.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = create_scheduler_v2(opt, 'cosine', num_epochs=epochs, warmup_epochs=0, step_on_epochs=False,
                                updates_per_epoch=steps)[0]
    g = torch.Generator().manual_seed(seed + 1)
    energy_time, start, step = 0.0, time.time(), 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=g)
        for i in range(steps):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            xb = (augment(x_all[idx], g) - MEAN) / STD
            yb = y_all[idx]
            xb, yb = xb.to(device), yb.to(device)
            if search is not None and not search.converged and step % args.interval == 0:
                t = time.time()
                edropout_step(model, search, xb[:args.batch_per_state], yb[:args.batch_per_state])
                energy_time += time.time() - t
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(num_updates=step)
    return {'train_seconds': time.time() - start, 'energy_seconds': energy_time}


def params_m(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def run_seed(args, data, seed: int, done: Dict[str, Dict], write) -> None:
    device = torch.device(args.device)
    test_x, test_y = data['test_x'], data['test_y']
    unpruned = None

    def get_unpruned():
        nonlocal unpruned
        if unpruned is None:  # deterministic: a re-run gives the model the row came from
            unpruned = build(args, seed).to(device)
            unpruned.times = train(unpruned, args, data, seed, args.epochs, args.lr, device=device)
        return unpruned

    if 'unpruned' not in done:
        model = get_unpruned()
        write(dict(arm='unpruned', seed=seed, top1=top1(model, test_x, test_y, device), params_m=params_m(model),
                   **model.times))
    edropout_widths = None
    if any(a not in done for a in ('edropout', 'edropout_ft', 'magnitude', 'magnitude_ft')):
        model = build(args, seed).to(device)
        add_edropout(model)
        search = make_search(model, num_states=args.candidates, keep_prob=args.keep_prob,
                             converge_steps=args.converge, seed=seed)
        times = train(model, args, data, seed, args.epochs, args.lr, search=search, device=device)
        before = top1(model, test_x, test_y, device)
        pruned = prune_channels(model)
        edropout_widths = {k: int(v.sum()) for k, v in edropout_keep(model).items()}
        if 'edropout' not in done:
            write(dict(arm='edropout', seed=seed, top1=top1(pruned, test_x, test_y, device), top1_before_pruning=before,
                       params_m=params_m(pruned), kept_channels=search.kept_fraction(), evolution_steps=search.step,
                       converged=search.converged, widths=edropout_widths, **times))
        if 'edropout_ft' not in done:
            times = train(pruned, args, data, seed, args.ft_epochs, args.lr / 5, device=device)
            write(dict(arm='edropout_ft', seed=seed, top1=top1(pruned, test_x, test_y, device),
                       params_m=params_m(pruned), **times))
    if edropout_widths is not None and any(a not in done for a in ('magnitude', 'magnitude_ft')):
        base = get_unpruned()
        pruned = prune_channels(base, magnitude_keep(base, edropout_widths))
        if 'magnitude' not in done:
            write(dict(arm='magnitude', seed=seed, top1=top1(pruned, test_x, test_y, device), params_m=params_m(pruned)))
        if 'magnitude_ft' not in done:
            times = train(pruned, args, data, seed, args.ft_epochs, args.lr / 5, device=device)
            write(dict(arm='magnitude_ft', seed=seed, top1=top1(pruned, test_x, test_y, device),
                       params_m=params_m(pruned), **times))
    if 'random_state' not in done:
        model = build(args, seed).to(device)
        add_edropout(model)
        search = make_search(model, num_states=args.candidates, keep_prob=args.keep_prob, seed=seed)
        times = train(model, args, data, seed, args.epochs, args.lr, device=device)  # never evolved
        pruned = prune_channels(model)
        write(dict(arm='random_state', seed=seed, top1=top1(pruned, test_x, test_y, device),
                   params_m=params_m(pruned), kept_channels=search.kept_fraction(), **times))


def read_rows(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def report(rows: List[Dict[str, Any]], config: Dict[str, Any]) -> str:
    """Markdown: per-arm mean top-1 and size, then paired differences with 95% t intervals."""
    by = {(r['arm'], r['seed']): r for r in rows}
    seeds = sorted({r['seed'] for r in rows})
    lines = ['# EDropout pilot, CIFAR-10', '', f'Settings: `{json.dumps(config)}`', '',
             '| arm | seeds | test top-1 (mean ± sd) | params (M) | train s | energy s |', '|---|---:|---:|---:|---:|---:|']
    for arm in ARMS:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        if not rs:
            continue
        acc, sd = mean_std([r['top1'] for r in rs])

        def mean(key):
            return sum(r.get(key, 0.0) for r in rs) / len(rs)
        lines.append(f'| {arm} | {len(rs)} | {acc:.2f} ± {sd:.2f} | {mean("params_m"):.3f} | '
                     f'{mean("train_seconds"):.0f} | {mean("energy_seconds"):.0f} |')
    lines += ['', '| comparison (paired by seed) | n | mean difference | 95% CI | p |', '|---|---:|---:|---:|---:|']
    for a, b in (('edropout_ft', 'magnitude_ft'), ('edropout', 'magnitude'), ('edropout', 'random_state'),
                 ('edropout', 'unpruned'), ('edropout_ft', 'unpruned'), ('magnitude_ft', 'unpruned')):
        d = paired_difference({s: by[(a, s)]['top1'] for s in seeds if (a, s) in by},
                              {s: by[(b, s)]['top1'] for s in seeds if (b, s) in by})
        if d['n'] < 2:
            continue
        lines.append(f'| {a} - {b} | {d["n"]} | {d["mean"]:+.2f} | [{d["ci_low"]:+.2f}, {d["ci_high"]:+.2f}] | '
                     f'{d["p"]:.3g} |')
    ed = [by[('edropout', s)] for s in seeds if ('edropout', s) in by]
    if ed:
        gap = max(abs(r['top1'] - r['top1_before_pruning']) for r in ed)
        lines += ['', f'EDropout kept {100 * sum(r["kept_channels"] for r in ed) / len(ed):.1f}% of the prunable '
                  f'channels on average; largest |top-1 after - before pruning|: {gap:.3f} points; evolution '
                  f'steps {[r["evolution_steps"] for r in ed]}, converged {[r["converged"] for r in ed]}; energy '
                  f'evaluation took {100 * sum(r["energy_seconds"] for r in ed) / sum(r["train_seconds"] for r in ed):.1f}% '
                  'of the training time.']
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    results = Path(args.results) if not args.quick else Path(args.cache_dir) / 'edropout_pilot_quick'
    results.mkdir(parents=True, exist_ok=True)
    config = settings(args)
    config_path = results / 'config.json'
    if config_path.exists() and json.loads(config_path.read_text()) != config and read_rows(results / 'runs.jsonl'):
        raise SystemExit(f'{results} holds runs with other settings ({config_path}); use another --results')
    config_path.write_text(json.dumps(config, indent=2))
    data = load_cifar10(args.data, args.cache_dir)
    runs = results / 'runs.jsonl'
    start = time.time()

    def write(row):
        with runs.open('a') as f:
            f.write(json.dumps(row) + '\n')
        print(json.dumps({k: v for k, v in row.items() if k != 'widths'}), flush=True)

    for seed in args.seeds:
        if args.budget_minutes and time.time() - start > 60 * args.budget_minutes:
            print('budget reached: run again to go on')
            break
        done = {r['arm']: r for r in read_rows(runs) if r['seed'] == seed}
        if all(a in done for a in ARMS):
            continue
        run_seed(args, data, seed, done, write)
    text = report(read_rows(runs), config)
    (results / 'report.md').write_text(text)
    print(text)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
