#!/usr/bin/env python3
""" Does DropCluster beat a matched DropBlock, and do its learned clusters beat a fixed grid?

The fixed protocol (``CONFIGS['cpu']``; ``report.py`` reads the rows): CIFAR-10, a different 2,000-image
class-balanced training subset per seed (the same in every arm), a small CIFAR ResNet, 60 epochs of SGD
with Nesterov momentum and a cosine schedule, flip + crop; five arms (``arms.py``), every drop arm at a
measured dropped fraction of 0.1 in the same slots, ramped and re-clustered by the package's
``DropClusterRecipe`` (what ``train_timm.py`` uses). Top-1 on all 10,000 test images; mean corruption
accuracy (mca) on 1,000 of them x 8 corruptions x 5 severities.

    python -m benchmarks.regularizer_study.run --arm dropcluster --seed 3      # one row, printed as JSON
    python -m benchmarks.regularizer_study.run --results benchmarks/results/study_v3 --budget-minutes 50
    python -m benchmarks.regularizer_study.report benchmarks/results/study_v3

Pairing: every random draw comes from its own stream seeded from (seed, purpose) (``streams.py``), so
two arms of a seed see the same subset, batches, augmentations and initial weights from the first
step to the last. On the CPU a run uses one thread and is deterministic: its row's ``command``, run
from the repository root at its ``commit``, prints the same ``top1``.
"""
import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F

import timm
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
import dropcluster_timm
from dropcluster_timm import update_clusters
from dropcluster_timm.evaluation.corruptions import corruption_accuracy
from dropcluster_timm.train import DropClusterConfig, DropClusterRecipe

from . import arms as A
from .data import augment, balanced_split, cutout, load_cifar10
from .protocols import CONFIGS
from .rows import append_row, read_rows, row_key
from .streams import purpose_seed, stream

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA = REPO.parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'
MODULE = 'benchmarks.regularizer_study.run'



def commit_of_checkout() -> str:
    """HEAD of the checkout that holds this file, with ``+dirty`` when its tracked files differ from it;
    'unknown' outside a git checkout."""
    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'
    return head.stdout.strip() + ('+dirty' if dirty else '')


def check_package_location() -> None:
    """The study must run the package of its own checkout (a worktree at a fixed commit), not another
    copy installed in the environment."""
    package = Path(dropcluster_timm.__file__).resolve().parents[1]
    if package != REPO:
        raise SystemExit(f'error: dropcluster_timm is imported from {package}, not from this checkout ({REPO}); '
                         'run from the repository root (python -m ...) so that the code of this commit runs')


def cpu_model() -> str:
    """The processor's model name (float results differ between CPU models and capabilities)."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def _setup_determinism(device: torch.device) -> None:
    if device.type == 'cuda':
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.backends.cudnn.benchmark = False
    # warn_only: a kernel without a deterministic version warns; the row records whether any did.
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def top1(model, preprocess, x: torch.Tensor, y: torch.Tensor, amp, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        with amp():
            out = model(preprocess(x[i:i + batch_size].float() / 255.0))
        correct += int((out.argmax(-1) == y[i:i + batch_size]).sum())
    return 100.0 * correct / len(x)


def evaluation_images(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """All test images, or a class-balanced ``count`` of them: the same for every run (a fixed seed)."""
    if count >= len(labels):
        return torch.arange(len(labels))
    return balanced_split(labels, count // 10, torch.Generator().manual_seed(seed))


def run_one(arm: str, seed: int, cfg: Dict[str, Any], device: str, data: Dict[str, torch.Tensor],
            commit: str, threads: int = 1) -> Dict[str, Any]:
    """Train and evaluate one (arm, seed) under ``cfg``; returns its result row."""
    device = torch.device(device)
    if device.type == 'cpu':
        torch.set_num_threads(threads)  # results depend on the thread count: fixed, and recorded
    _setup_determinism(device)
    t0 = time.perf_counter()
    subset = balanced_split(data['train_y'], cfg['train_images'] // 10, stream(seed, 'subset')).to(device)
    train_x, train_y = data['train_x'].to(device)[subset], data['train_y'].to(device)[subset]
    n, bs = len(subset), cfg['batch_size']
    steps = n // bs
    if cfg['amp']:
        amp = lambda: torch.autocast(device.type, dtype=getattr(torch, cfg['amp']))  # noqa: E731
    else:
        amp = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731
    memory_format = torch.channels_last if cfg['channels_last'] else torch.contiguous_format

    model = A.build_model(arm, cfg, seed).to(device, memory_format=memory_format)
    data_config = resolve_data_config({}, model=model)
    mean = torch.tensor(data_config['mean'], device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_config['std'], device=device).view(1, 3, 1, 1)

    def preprocess(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean) / std).contiguous(memory_format=memory_format)

    optimizer = create_optimizer_v2(model, 'sgd', lr=cfg['lr'], weight_decay=cfg['weight_decay'],
                                    momentum=cfg['momentum'])  # timm's 'sgd' is Nesterov momentum
    lr_scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=cfg['epochs'],
                                          warmup_epochs=cfg['lr_warmup_epochs'], warmup_lr=cfg['lr'] / 10,
                                          step_on_epochs=False, updates_per_epoch=steps)
    recipe_cfg = DropClusterConfig(rate=cfg['drop_rate'], start_epoch=cfg['drop_start'],
                                   warmup_epochs=cfg['drop_warmup'], update_freq=cfg['recluster_every'])
    recipe = DropClusterRecipe(recipe_cfg, steps, seed=seed, clustered=arm in A.CLUSTER_ARMS, set_rate=A.set_rate)
    g_order, g_recluster = stream(seed, 'order'), stream(seed, 'recluster_images')
    g_augment, g_cutout = stream(seed, 'augment', device), stream(seed, 'cutout', device)
    g_partitions = stream(seed, 'partitions', device)
    torch.manual_seed(purpose_seed(seed, 'masks'))  # the drop layers draw their masks from the global stream

    def recluster(_epoch_seed: int) -> None:  # the study's own streams, not the recipe's epoch seed
        pick = torch.randperm(n, generator=g_recluster)[:cfg['cluster_images']].to(device)
        update_clusters(model, preprocess(train_x[pick].float() / 255.0), generator=g_partitions)

    reclusters = 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        for epoch in range(cfg['epochs']):
            reclusters += recipe.begin_epoch(epoch, model, optimizer, recluster)['reclustered']
            model.train()
            order = torch.randperm(n, generator=g_order).to(device)
            for step in range(steps):
                batch = order[step * bs:(step + 1) * bs]
                recipe.step(model, epoch + step / steps)
                x = augment(train_x[batch], g_augment, cfg['augment'])
                if arm == 'cutout':
                    x = cutout(x, cfg['cutout_size'], g_cutout)
                with amp():
                    loss = F.cross_entropy(model(preprocess(x)), train_y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr_scheduler.step_update(num_updates=epoch * steps + step + 1)
            lr_scheduler.step(epoch + 1)
    deterministic = not any('deterministic' in str(w.message) for w in seen)
    train_time = time.perf_counter() - t0

    row: Dict[str, Any] = dict(config=cfg['name'], arm=arm, seed=seed)
    test_pick = evaluation_images(data['test_y'], cfg['test_images'], seed=12345).to(device)
    test_x, test_y = data['test_x'].to(device)[test_pick], data['test_y'].to(device)[test_pick]
    row['top1'] = top1(model, preprocess, test_x, test_y, amp)
    row['test_images'] = len(test_pick)
    row['train_top1'] = top1(model, preprocess, train_x, train_y, amp)  # clean, eval mode: fit, not augmentation
    pick = evaluation_images(data['test_y'], cfg['corruption_images'], seed=54321).to(device)
    loader = [(data['test_x'].to(device)[pick[i:i + 500]].float() / 255.0, data['test_y'].to(device)[pick[i:i + 500]])
              for i in range(0, len(pick), 500)]
    with amp():
        report = corruption_accuracy(model, loader, preprocess=preprocess, seed=0)
    row.update(mca=report['mean_corruption_top1'], corruption_images=report['num_images'],
               corruptions=report['corruptions'])
    # At the final rate, after the evaluations (it runs in training mode), on the subset's first images.
    fractions = A.measure_dropped_fraction(model, preprocess(train_x[:256].float() / 255.0), seed)
    row.update(dropped_fraction=fractions.get('all', 0.0),
               dropped_fraction_layers={k: v for k, v in fractions.items() if k != 'all'},
               final_rate=recipe.schedule.rate if arm in A.DROP_ARMS else 0.0, reclusters=reclusters,
               final_loss=float(loss.detach()), deterministic=deterministic, train_images=n, epochs=cfg['epochs'])
    row.update(device='cpu' if device.type == 'cpu' else torch.cuda.get_device_name(device),
               cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_model=cpu_model(),
               threads=threads if device.type == 'cpu' else None, torch=torch.__version__.split('+')[0],
               timm=timm.__version__, commit=commit, command=row_command(arm, seed, cfg['name'], device.type),
               train_time_s=round(train_time, 1), total_time_s=round(time.perf_counter() - t0, 1))
    return row


def row_command(arm: str, seed: int, config: str, device: str) -> List[str]:
    """The argument list that re-runs one row alone from the repository root and prints it."""
    command = ['python', '-m', MODULE, '--config', config, '--arm', arm, '--seed', str(seed)]
    return command + (['--device', device] if device != 'cpu' else [])


# ----------------------------------------------------------------------------------------------
# Driver

_DATA: Dict[str, Dict[str, torch.Tensor]] = {}


def _worker(job: Dict[str, Any]) -> Dict[str, Any]:
    """One run in a worker process (the data loaded once per process)."""
    key = (job['data'], job['cache_dir'])
    if key not in _DATA:
        _DATA[key] = load_cifar10(*key)
    return run_one(job['arm'], job['seed'], CONFIGS[job['config']], job['device'], _DATA[key], job['commit'],
                   job['threads'])


def missing_jobs(cfg: Dict[str, Any], rows: List[Dict[str, Any]], seeds: List[int],
                 arms: Sequence[str] = A.ARMS) -> List[Dict[str, Any]]:
    """The (arm, seed) runs of ``seeds`` not in ``rows``, seed-major: an interrupted chunk leaves whole
    seeds behind it."""
    done = {row_key(r) for r in rows}
    return [dict(config=cfg['name'], arm=arm, seed=seed) for seed in seeds for arm in arms
            if (cfg['name'], arm, seed) not in done]


def run_jobs(next_job: Callable[[Set[Tuple]], Optional[Dict[str, Any]]], results: Path, common: Dict[str, Any],
             workers: int = 1, deadline: float = float('inf')) -> int:
    """Run jobs (``{config, arm, seed}``) in ``workers`` one-thread processes until ``next_job`` (given
    the keys running now) returns None or the deadline nears; each row is appended as it finishes.
    Returns the number of rows written. A stopped driver loses only the runs in flight."""
    longest, done = 0.0, 0
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context('spawn')) as pool:
        pending: Dict[cf.Future, Tuple] = {}
        while True:
            # Start a run only when it can end before the deadline, judged by the longest so far.
            while len(pending) < workers and time.time() + longest * 1.1 < deadline:
                job = next_job(set(pending.values()))
                if job is None:
                    break
                pending[pool.submit(_worker, dict(job, **common))] = (job['config'], job['arm'], job['seed'])
            if not pending:
                return done
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                del pending[future]
                row = future.result()
                written = append_row(results, row)
                done += written
                longest = max(longest, row['total_time_s'])
                print(f"{row['config']} {row['arm']}/{row['seed']}: top1 {row['top1']:.2f} train {row['train_top1']:.2f} "
                      f"mca {row['mca']:.2f} dropped {row['dropped_fraction']:.3f} ({row['total_time_s']:.0f} s)"
                      + ('' if written else ' (already in the results: not written again)'), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='cpu', choices=sorted(CONFIGS),
                   help='the protocol: cpu (the study), gpu (its GPU version), tiny (seconds; for tests)')
    p.add_argument('--arm', choices=A.ARMS, help='run this arm alone (with --seed) and print its row')
    p.add_argument('--seed', type=int, help='the seed of the one row to run (with --arm)')
    p.add_argument('--seeds', type=int, nargs=2, metavar=('FIRST', 'LAST'),
                   help="driver: the seeds to run, inclusive (default: the config's)")
    p.add_argument('--results', type=Path, help='folder whose runs.jsonl receives the rows; rows there are skipped')
    p.add_argument('--budget-minutes', type=float, default=None,
                   help='driver: start no run that would end past this many minutes (default: no limit)')
    p.add_argument('--workers', '--parallel', type=int, default=1, dest='workers',
                   help='driver: runs at once, each in its own one-thread process (rows do not depend on it)')
    p.add_argument('--arms', nargs='+', choices=A.ARMS, default=list(A.ARMS),
                   help='driver: the arms to run (default: all five)')
    p.add_argument('--threads', type=int, default=1, help='CPU threads per run (recorded; results depend on it)')
    p.add_argument('--device', default='cpu', help="'cpu' or a CUDA device, e.g. 'cuda'")
    p.add_argument('--data', default=str(DEFAULT_DATA), help='cifar10-jpg.tar.gz or its unpacked folder')
    p.add_argument('--cache-dir', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'dropcluster_cifar10'),
                   help='where the decoded images are cached')
    p.add_argument('--commit', default=None,
                   help='the commit to record when this copy is no git checkout (e.g. on a device machine)')
    args = p.parse_args(argv)
    if (args.arm is None) != (args.seed is None):
        p.error('--arm and --seed go together (one row); leave both out to run the study')
    if args.arm is None and args.results is None:
        p.error('the driver needs --results (the folder of runs.jsonl)')
    if args.workers < 1 or args.threads < 1:
        p.error('--workers and --threads must be >= 1')
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        p.error('--budget-minutes must be > 0')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check_package_location()
    cfg = CONFIGS[args.config]
    commit = commit_of_checkout()
    if commit == 'unknown' and args.commit:
        commit = args.commit
    data = load_cifar10(args.data, args.cache_dir)
    if args.arm is not None:  # one row
        row = run_one(args.arm, args.seed, cfg, args.device, data, commit, args.threads)
        if args.results is not None:
            append_row(args.results, row)
        print(json.dumps(row, sort_keys=True), flush=True)
        return 0
    deadline = time.time() + args.budget_minutes * 60 if args.budget_minutes else float('inf')
    seeds = list(range(args.seeds[0], args.seeds[1] + 1)) if args.seeds else cfg['seeds']
    left = len(missing_jobs(cfg, read_rows(args.results), seeds, args.arms))
    print(f'{left} runs left of {len(seeds) * len(args.arms)} ({args.config}, seeds {seeds[0]}-{seeds[-1]}), '
          f'{args.workers} at a time on {args.device}', flush=True)

    def next_job(running: Set[Tuple]) -> Optional[Dict[str, Any]]:
        # Re-read: another driver on the same folder may have written rows meanwhile.
        jobs = missing_jobs(cfg, read_rows(args.results), seeds, args.arms)
        return next((j for j in jobs if (j['config'], j['arm'], j['seed']) not in running), None)

    done = run_jobs(next_job, args.results, common_job_args(args, commit), args.workers, deadline)
    left = len(missing_jobs(cfg, read_rows(args.results), seeds, args.arms))
    print(f'{done} runs done, {left} left' + ('; run the command again to go on' if left else ''), flush=True)
    return 0


def common_job_args(args: argparse.Namespace, commit: str) -> Dict[str, Any]:
    """What every worker job of a driver shares."""
    return dict(device=args.device, threads=args.threads, commit=commit, data=args.data, cache_dir=args.cache_dir)


if __name__ == '__main__':
    sys.exit(main())
