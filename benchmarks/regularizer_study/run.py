#!/usr/bin/env python3
""" Do learned clusters beat fixed blocks? The study's runner: trains and evaluates the arms of
``arms.py`` on CIFAR-10 in three phases, in chunks that resume from the results file.

    python -m benchmarks.regularizer_study.run --phase regime    # where does the positive control help?
    python -m benchmarks.regularizer_study.run --phase tune      # phase A: each arm's rate on validation
    python -m benchmarks.regularizer_study.run --phase final     # phase B: >= 16 paired seeds per arm
    python -m benchmarks.regularizer_study.run --phase auto --budget-minutes 9 --parallel 4 --device cuda
    python -m benchmarks.regularizer_study.run --quick           # the whole pipeline on the CPU, minutes
    python -m benchmarks.regularizer_study.run --reference-schedule  # secondary: start late, ramp to the end
    python -m benchmarks.regularizer_study.report benchmarks/results/regularizer_study

Protocol (``--help`` lists the settings): every arm trains the same timm ResNet with the same recipe,
schedule and epochs; runs are paired by seed (same training subset, data order, augmentation draws
and initial weights in every arm) and deterministic (a re-run of a seed reproduces its numbers on
the same machine). A class-balanced validation split (default 5,000 images) is carved from the
CIFAR-10 training images; training subsets come from the rest. The regime phase trains ``none`` and
``cutout`` on each candidate (training-set size, epochs) and keeps the one where Cutout helps most
with a 95% interval above 0 (``protocol.choose_regime``); phase A tunes each regularised arm's rate
over ``--rates`` with ``--tune-seeds`` on validation top-1 (``protocol.choose_rate``); phase B runs
``--final-seeds`` per arm at the frozen rates and measures top-1 on all 10,000 test images and under
every corruption and severity on ``--corruption-images`` of them.

Results: one JSON line per finished run in ``RESULTS/runs.jsonl`` (written by this process only, as
runs finish), ``RESULTS/plan.json`` (settings, DropBlock calibration, the choices). A command stops
starting runs when ``--budget-minutes`` would be exceeded and exits; run it again to go on. Files
from several machines merge by concatenating their ``runs*.jsonl`` (keys are unique).
"""
import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from dropcluster_timm import DropClusterSchedule, soft_reset, update_clusters
from dropcluster_timm.corruptions import corruption_accuracy

from . import arms as A
from .data import augment, balanced_split, cutout, load_cifar10
from .protocol import choose_rate, choose_regime

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA = REPO.parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'
PHASES = ('regime', 'tune', 'final')

# The GPU study: full-width ResNet-18 at 64 px (CIFAR upsampled), output stride 8 (stage 3-4 maps 8x8).
STUDY = dict(
    layers=[2, 2, 2, 2], channels=[64, 128, 256, 512], img_size=64, batch_size=128, lr=0.1, weight_decay=5e-4,
    regimes=['n1000_e200', 'n2500_e150', 'n5000_e100'], regime_seeds=[0, 1, 2],
    rates=[0.05, 0.1, 0.15, 0.2, 0.3], tune_seeds=[0, 1], final_seeds=list(range(100, 116)),
    val_images=5000, test_images=10000, corruption_images=2000, cutout_size=16,
    drop_start=0.2, drop_warmup=0.5, reclusters=4, cluster_images=256,
)
# --quick: the same pipeline on the CPU in a few minutes (numbers mean nothing).
QUICK = dict(STUDY, layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], batch_size=50, regimes=['n200_e2', 'n300_e2'],
             regime_seeds=[0, 1], rates=[0.1, 0.2], tune_seeds=[0], final_seeds=[100, 101], val_images=200,
             test_images=200, corruption_images=50, cluster_images=32)
# --pilot: a CPU pilot of the protocol with a narrow model (hours on 2 cores, see BENCHMARKS.md).
PILOT = dict(STUDY, layers=[1, 1, 1, 1], channels=[16, 32, 64, 128], batch_size=64, lr=0.05,
             regimes=['n1000_e20', 'n500_e60'], regime_seeds=[0, 1, 2], rates=[0.1, 0.2], tune_seeds=[0],
             final_seeds=[100, 101, 102], val_images=2000, corruption_images=500, cluster_images=128)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--phase', default='auto', choices=PHASES + ('auto',),
                   help='auto: the first phase with runs left (regime, then tune, then final)')
    p.add_argument('--quick', action='store_true', help='tiny settings: the whole pipeline in minutes on a CPU')
    p.add_argument('--pilot', action='store_true', help='narrow-model CPU pilot of the protocol')
    p.add_argument('--reference-schedule', action='store_true',
                   help="secondary: the reference's schedule, no dropping for the first half, then a ramp to "
                        'the end (default: start at 20%% of training, full rate from 70%%)')
    p.add_argument('--results', default=None, help='results folder (default benchmarks/results/regularizer_study[_quick|_pilot])')
    p.add_argument('--data', default=str(DEFAULT_DATA), help='cifar10-jpg.tar.gz or its unpacked folder')
    p.add_argument('--cache-dir', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'dropcluster_cifar10'))
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--parallel', type=int, default=1, help='runs at once (worker processes; several fit one GPU)')
    p.add_argument('--budget-minutes', type=float, default=9.0, help='start no run that would end past this')
    p.add_argument('--regime', default=None, help='override the chosen regime, e.g. n1000_e200')
    p.add_argument('--max-runs', type=int, default=None, help='stop after this many runs (tests)')
    p.add_argument('--option-arms', nargs='+', default=[], metavar='ARM', choices=list(A.OPTION_ARMS) + ['all'],
                   help='add option arms (the reference options, see arms.py) to the tune and final phases; '
                        'recorded in plan.json, so later commands keep them')
    p.add_argument('--options-only', action='store_true',
                   help='a secondary study in its own --results folder: only dc_stages and the option arms '
                        '(pair it with --regime, since the positive control is not run)')
    args = p.parse_args(argv)
    if args.quick and args.pilot:
        p.error('--quick and --pilot exclude each other')
    if 'all' in args.option_arms:
        args.option_arms = list(A.OPTION_ARMS)
    args.config = dict(QUICK if args.quick else PILOT if args.pilot else STUDY)
    suffix = '_quick' if args.quick else '_pilot' if args.pilot else ''
    if args.reference_schedule:
        args.config.update(drop_start=0.5, drop_warmup=0.5)
        suffix += '_refsched'
    args.results = Path(args.results or REPO / 'benchmarks' / 'results' / f'regularizer_study{suffix}')
    if args.parallel < 1 or args.budget_minutes <= 0:
        p.error('--parallel must be >= 1 and --budget-minutes > 0')
    if args.regime is not None and args.regime not in args.config['regimes']:
        p.error(f'--regime must be one of {args.config["regimes"]}')
    return args


def parse_regime(regime: str) -> Dict[str, int]:
    size, epochs = regime.split('_')
    return {'train_size': int(size[1:]), 'epochs': int(epochs[1:])}


# ----------------------------------------------------------------------------------------------
# Results folder: runs.jsonl (append-only, one writer) and plan.json


def read_rows(results: Path) -> List[Dict[str, Any]]:
    rows = {}
    for path in sorted(results.glob('runs*.jsonl')):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f'{path}:{n}: not a JSON line ({e})') from None
                rows[row['key']] = row
    return list(rows.values())


def append_row(results: Path, row: Dict[str, Any]) -> None:
    with open(results / 'runs.jsonl', 'a') as f:
        f.write(json.dumps(row) + '\n')
        f.flush()
        os.fsync(f.fileno())


def load_plan(results: Path, config: Dict[str, Any]) -> Dict[str, Any]:
    """plan.json: the settings (a folder serves one set of settings), DropBlock calibration, choices."""
    path = results / 'plan.json'
    if path.exists():
        plan = json.loads(path.read_text())
        if plan['config'] != config:
            raise SystemExit(f'error: {path} holds results of other settings; use another --results folder')
        return plan
    calibration = {}
    model = A.build_model('dropblock_matched', config, calibration)
    A.build_model('dropblock_stem', config, calibration)
    del model
    plan = {'config': config, 'chosen_regime': None, 'chosen_rates': {},
            'calibration': {f'{b}x{f[0]}x{f[1]}': [t[0].tolist(), t[1].tolist()] for (b, f), t in calibration.items()}}
    save_plan(results, plan)
    return plan


def save_plan(results: Path, plan: Dict[str, Any]) -> None:
    tmp = results / 'plan.json.tmp'
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, results / 'plan.json')


def plan_arms(plan: Dict[str, Any]) -> List[str]:
    """The arms of a results folder: the study's (only dc_stages with --options-only), then the option arms."""
    base = ['dc_stages'] if plan.get('options_only') else list(A.ARMS)
    return base + [a for a in plan.get('option_arms', []) if a not in base]


def calibration_cache(plan: Dict[str, Any]) -> Dict:
    import numpy as np
    out = {}
    for key, (grid, frac) in plan['calibration'].items():
        b, h, w = (int(v) for v in key.split('x'))
        out[(b, (h, w))] = (np.asarray(grid), np.asarray(frac))
    return out


# ----------------------------------------------------------------------------------------------
# Jobs


def make_jobs(phase: str, plan: Dict[str, Any], rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The runs of ``phase`` not yet in ``rows``; raises if an earlier phase's choice is missing."""
    cfg, done = plan['config'], {r['key'] for r in rows}
    jobs = []
    if phase == 'regime':
        if plan.get('options_only') and not plan.get('forced_regime'):
            raise RuntimeError('an --options-only folder runs no regime phase: give --regime')
        for regime in ([] if plan.get('options_only') else cfg['regimes']):
            for arm in ('none', 'cutout'):
                for seed in cfg['regime_seeds']:
                    jobs.append(dict(phase=phase, regime=regime, arm=arm, rate=None, seed=seed))
    else:
        regime = plan['chosen_regime']
        if regime is None:
            raise RuntimeError('no regime chosen yet: run --phase regime first (or give --regime)')
        arms = plan_arms(plan)
        regularised = [a for a in arms if a in A.REGULARISED]
        if phase == 'tune':
            for arm in regularised:
                for rate in cfg['rates']:
                    for seed in cfg['tune_seeds']:
                        jobs.append(dict(phase=phase, regime=regime, arm=arm, rate=rate, seed=seed))
        else:
            missing = [a for a in regularised if a not in plan['chosen_rates']]
            if missing:
                raise RuntimeError(f'no rate chosen yet for {missing}: finish --phase tune first')
            for seed in cfg['final_seeds']:  # seed-major: an interrupted phase has whole pairs
                for arm in arms:
                    jobs.append(dict(phase=phase, regime=regime, arm=arm, rate=plan['chosen_rates'].get(arm), seed=seed))
    for job in jobs:
        rate = '-' if job['rate'] is None else f"{job['rate']:g}"
        job['key'] = f"{job['phase']}/{job['regime']}/{job['arm']}/{rate}/{job['seed']}"
    return [j for j in jobs if j['key'] not in done]


def update_choices(plan: Dict[str, Any], rows: List[Dict[str, Any]], forced_regime: Optional[str]) -> None:
    cfg = plan['config']
    if forced_regime:  # recorded: a forced regime did not come from the choice rule
        plan['forced_regime'] = forced_regime
    plan['chosen_regime'] = forced_regime or plan['chosen_regime'] or choose_regime(
        rows, cfg['regimes'], cfg['regime_seeds'])
    if plan['chosen_regime']:
        for arm in [a for a in plan_arms(plan) if a in A.REGULARISED]:
            rate = choose_rate(rows, arm, plan['chosen_regime'], cfg['rates'], cfg['tune_seeds'])
            if rate is not None:
                plan['chosen_rates'][arm] = rate


# ----------------------------------------------------------------------------------------------
# One run

_DATA: Dict[str, Any] = {}


def _setup_determinism(device: torch.device) -> None:
    if device.type == 'cuda':
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.backends.cudnn.benchmark = False
    # warn_only: an op without a deterministic kernel warns instead of failing the run; run_one
    # records such warnings, so a row says whether its run was deterministic.
    torch.use_deterministic_algorithms(True, warn_only=True)


def _splits(labels_train: torch.Tensor, cfg: Dict[str, Any], seed: int, size: int):
    val = balanced_split(labels_train, cfg['val_images'] // 10, seed=12345)
    train = balanced_split(labels_train, size // 10, seed=seed, exclude=val)
    return train, val


@torch.no_grad()
def top1(model, preprocess, x: torch.Tensor, y: torch.Tensor, device, amp, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        with amp():
            out = model(preprocess(x[i:i + batch_size].to(device).float() / 255.0))
        correct += (out.argmax(-1).cpu() == y[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(x)


def run_one(job: Dict[str, Any]) -> Dict[str, Any]:
    """Train and evaluate one (phase, regime, arm, rate, seed); returns its results row."""
    cfg, device = job['config'], torch.device(job['device'])
    torch.set_num_threads(job['threads'])
    _setup_determinism(device)
    if job['cache'] not in _DATA:  # once per worker process
        _DATA[job['cache']] = {k: v.to(device) for k, v in torch.load(job['cache']).items()}
    data = _DATA[job['cache']]
    arm, seed, rate = job['arm'], job['seed'], job['rate'] or 0.0
    size, epochs = parse_regime(job['regime']).values()
    train_idx, val_idx = _splits(data['train_y'].cpu(), cfg, seed, size)
    train_x, train_y = data['train_x'][train_idx.to(device)], data['train_y'][train_idx.to(device)]
    amp = (lambda: torch.autocast('cuda', dtype=torch.bfloat16)) if device.type == 'cuda' else \
        (lambda: torch.autocast('cpu', enabled=False))

    torch.manual_seed(seed)  # initial weights and the drop masks: the same in every arm
    model = A.build_model(arm, cfg, job['calibration']).to(device, memory_format=torch.channels_last)
    data_config = resolve_data_config({}, model=model)
    mean = torch.tensor(data_config['mean'], device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_config['std'], device=device).view(1, 3, 1, 1)

    def preprocess(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(cfg['img_size'],) * 2, mode='bilinear', align_corners=False)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    steps = size // cfg['batch_size']
    optimizer = create_optimizer_v2(model, 'sgd', lr=cfg['lr'], weight_decay=cfg['weight_decay'], momentum=0.9)
    lr_scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=epochs, warmup_epochs=max(1, epochs // 20),
                                          warmup_lr=cfg['lr'] / 10, step_on_epochs=False, updates_per_epoch=steps)
    start = cfg['drop_start'] * epochs
    schedule = DropClusterSchedule(target=rate, start_epoch=start, warmup_epochs=cfg['drop_warmup'] * epochs,
                                   update_freq=max(1, round((epochs - math.ceil(start)) / cfg['reclusters'])),
                                   steps_per_epoch=steps, shape=A.schedule_shape(arm))
    reset_factor = A.soft_reset_factor(arm)
    g_cpu = torch.Generator().manual_seed(seed)  # data order and the re-clustering images
    g_dev = torch.Generator(device=device).manual_seed(seed)  # augmentation and cluster draws
    reclusters, t0 = 0, time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        for epoch in range(epochs):
            if arm in A.DC_ARMS and schedule.is_update_epoch(epoch):
                if reset_factor is not None and reclusters > 0:  # BRB: reset, then re-cluster
                    soft_reset(model, optimizer, reset_factor, seed=seed * 1000 + epoch)
                pick = torch.randperm(size, generator=g_cpu)[:cfg['cluster_images']].to(device)
                update_clusters(model, preprocess(train_x[pick].float() / 255.0), generator=g_dev)
                reclusters += 1
            model.train()
            perm = torch.randperm(size, generator=g_cpu).to(device)
            for step in range(steps):
                b = perm[step * cfg['batch_size']:(step + 1) * cfg['batch_size']]
                A.set_rate(model, schedule.step(epoch + step / steps))
                x = augment(train_x[b], g_dev)
                if arm == 'cutout':
                    x = cutout(x, cfg['cutout_size'], g_dev)
                with amp():
                    loss = F.cross_entropy(model(preprocess(x)), train_y[b])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr_scheduler.step_update(num_updates=epoch * steps + step + 1)
            lr_scheduler.step(epoch + 1)
    deterministic = not any('deterministic' in str(w.message) for w in seen)
    train_time = time.perf_counter() - t0

    row = {k: job[k] for k in ('key', 'phase', 'regime', 'arm', 'rate', 'seed')}
    row.update(train_size=size, epochs=epochs, reclusters=reclusters, final_loss=float(loss.detach()),
               train_time_s=round(train_time, 2),
               images_per_s=round(steps * cfg['batch_size'] * epochs / train_time, 1),
               device=str(device) if device.type == 'cpu' else torch.cuda.get_device_name(device),
               deterministic=deterministic)
    val_x, val_y = data['train_x'][val_idx.to(device)], data['train_y'][val_idx.to(device)].cpu()
    row['val_top1'] = top1(model, preprocess, val_x, val_y, device, amp)
    row['val_images'] = len(val_idx)
    if job['phase'] in ('regime', 'final'):
        n = min(cfg['test_images'], len(data['test_y']))
        row['test_top1'] = top1(model, preprocess, data['test_x'][:n], data['test_y'][:n].cpu(), device, amp)
        row['test_images'] = n
    if job['phase'] == 'final':
        c = balanced_split(data['test_y'].cpu(), cfg['corruption_images'] // 10, seed=54321).to(device)
        loader = [(data['test_x'][c[i:i + 500]].float() / 255.0, data['test_y'][c[i:i + 500]])
                  for i in range(0, len(c), 500)]
        with amp():
            report = corruption_accuracy(model, loader, preprocess=preprocess, seed=0)
        row.update(mean_corruption_top1=report['mean_corruption_top1'], corruption_images=report['num_images'],
                   corruptions=report['corruptions'])
    if arm not in ('none', 'cutout'):  # at the final rate, after every evaluation (it runs in train mode)
        row['dropped_fraction'] = A.measure_dropped_fraction(model, preprocess(augment(train_x[:64], g_dev)))
    row['total_time_s'] = round(time.perf_counter() - t0, 2)
    return row


# ----------------------------------------------------------------------------------------------
# Driver


def run_phase(args, phase: str, plan: Dict[str, Any], rows: List[Dict[str, Any]], deadline: float) -> int:
    jobs = make_jobs(phase, plan, rows)
    if args.max_runs is not None:
        jobs = jobs[:args.max_runs]
    if not jobs:
        return 0
    cpu = args.device == 'cpu'
    threads = max(1, (os.cpu_count() or 1) // args.parallel) if cpu else 2
    common = dict(config=plan['config'], device=args.device, threads=threads, calibration=calibration_cache(plan),
                  cache=str(Path(args.cache_dir) / 'cifar10_uint8.pt'))
    print(f'{phase}: {len(jobs)} runs left, {args.parallel} at a time on {args.device}', flush=True)
    done, longest = 0, 0.0
    ctx = mp.get_context('spawn')
    with cf.ProcessPoolExecutor(args.parallel, mp_context=ctx) as pool:
        pending, queue = set(), list(jobs)
        while queue or pending:
            # Start a run only if it can end before the deadline, judged by the longest run so far.
            while queue and len(pending) < args.parallel and time.time() + longest * 1.2 < deadline:
                pending.add(pool.submit(run_one, dict(queue.pop(0), **common)))
            if not pending:
                break
            finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                row = fut.result()
                append_row(args.results, row)
                rows.append(row)
                done += 1
                longest = max(longest, row['total_time_s'])
                print(f"{row['key']}: val {row['val_top1']:.2f} test {row.get('test_top1', float('nan')):.2f} "
                      f"({row['total_time_s']:.0f} s)", flush=True)
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    deadline = time.time() + args.budget_minutes * 60
    args.results.mkdir(parents=True, exist_ok=True)
    load_cifar10(args.data, args.cache_dir)  # decode once, before the workers start
    plan = load_plan(args.results, args.config)
    if args.options_only:
        plan['options_only'] = True
    plan['option_arms'] = plan.get('option_arms', []) + [a for a in args.option_arms if a not in plan.get('option_arms', [])]
    rows = read_rows(args.results)
    update_choices(plan, rows, args.regime)
    save_plan(args.results, plan)
    phases = PHASES if args.phase == 'auto' else (args.phase,)
    for phase in phases:
        if time.time() >= deadline:
            break
        try:
            n = run_phase(args, phase, plan, rows, deadline)
        except RuntimeError as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
        update_choices(plan, rows, args.regime)
        save_plan(args.results, plan)
        left = len(make_jobs(phase, plan, rows))
        print(f'{phase}: {n} runs done now, {left} left; regime {plan["chosen_regime"]}, rates {plan["chosen_rates"]}')
        if left:
            break  # out of budget: run the command again to go on
        if phase == 'regime' and plan['chosen_regime'] is None:
            print('the positive control does not help in any candidate regime: no regulariser can be shown to '
                  'help there; widen the candidates (fewer images, more epochs) before tuning')
            break
    return 0


if __name__ == '__main__':
    sys.exit(main())
