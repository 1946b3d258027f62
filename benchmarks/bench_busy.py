#!/usr/bin/env python3
""" Re-clustering and training on a busy CPU: OpenMP threads that spin-wait for each other while other
processes hold the cores turn each of the many small parallel operations of a clustering into a wait.

Side by side in one command: each measurement runs in a fresh process (OpenMP reads its wait policy
once, at start), on a quiet machine and while ``--busy`` other processes keep the cores busy, with
every thread count and with three ways for OpenMP threads to wait (``WAITS``).

    python -m benchmarks.bench_busy                 # prints a table; the figures in docs/benchmarks.md
    python -m benchmarks.bench_busy --what rena --waits passive --threads 1 --repeats 1   # one row

Measured: one ``update_clusters`` of 64 activations of 32 channels at 56x56 (rena, the default),
scikit-learn's Ward loop on the same activations ('ward', the reference), and a training step of
``resnet18_dropcluster`` and of timm's ``resnet18`` (batch 32, 64 px). Medians of ``--repeats``.
"""
import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import torch

_WORKER = r'''
import json, sys, time, statistics, torch, timm
import dropcluster_timm
from dropcluster_timm import DropCluster2d
what, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
if what in ('rena', 'ward'):
    x = torch.randn(64, 32, 56, 56)
    layer = DropCluster2d(0.1, block_size=7, cluster_method=what)
    run = lambda: layer.update_clusters(x, generator=torch.Generator().manual_seed(0))
else:
    model = timm.create_model(what, num_classes=10, img_size=64) if 'dropcluster' in what else \
        timm.create_model(what, num_classes=10)
    dropcluster_timm.set_drop_prob(model, 0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
    def run():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
run()
times = []
for _ in range(repeats):
    t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
print(json.dumps(statistics.median(times)))
'''


def _spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


# OpenMP's waiting, as environment settings read when torch loads: the default (spin 300,000 times,
# then sleep), a short spin, and passive (sleep at once).
WAITS = {'default': {}, 'spin 10k': {'GOMP_SPINCOUNT': '10000'}, 'passive': {'OMP_WAIT_POLICY': 'PASSIVE'}}


def measure(what: str, threads: int, wait: str, repeats: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}
    env.update(WAITS[wait])
    out = subprocess.run([sys.executable, '-c', _WORKER, what, str(threads), str(repeats)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--busy', type=int, default=2, help='other processes keeping the cores busy')
    p.add_argument('--repeats', type=int, default=5, help='timed calls per measurement (median)')
    p.add_argument('--what', nargs='+', default=['rena', 'ward', 'resnet18_dropcluster', 'resnet18'],
                   help="what to time: 'rena', 'ward' (one re-clustering) or timm model names (a training step)")
    p.add_argument('--waits', nargs='+', choices=list(WAITS), default=list(WAITS),
                   help='OpenMP wait policies to compare (default: all; Ward, a scikit-learn loop, runs with the '
                        'default only)')
    p.add_argument('--threads', type=int, nargs='+', default=None,
                   help='torch thread counts to measure (default: 1 and all cores)')
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    threads = sorted(set(args.threads or {1, cores}))
    waits = [w for w in WAITS if w in args.waits]
    rows = []
    for load in ('quiet', 'busy'):
        spinners = [mp.Process(target=_spin, args=(3600,), daemon=True) for _ in range(args.busy if load == 'busy' else 0)]
        for s in spinners:
            s.start()
        try:
            for what in args.what:
                for wait in waits if what != 'ward' else ['default']:  # Ward is scikit-learn's loop
                    for n in threads:
                        rows.append(dict(load=load, what=what, wait=wait, threads=n,
                                         seconds=measure(what, n, wait, 1 if what == 'ward' else args.repeats)))
                        print(json.dumps(rows[-1]), flush=True)
        finally:
            for s in spinners:
                s.terminate()
    print(f'\n{cores} cores, busy = {args.busy} spinning processes; seconds (median of {args.repeats})\n')
    print('| what | wait policy | threads | quiet s | busy s | busy / quiet |')
    print('|---|---|---:|---:|---:|---:|')
    for what in args.what:
        for wait in waits if what != 'ward' else ['default']:
            for n in threads:
                q, b = (next(r['seconds'] for r in rows if (r['load'], r['what'], r['wait'], r['threads']) ==
                             (load, what, wait, n)) for load in ('quiet', 'busy'))
                print(f'| {what} | {wait} | {n} | {q:.3f} | {b:.3f} | {b / q:.1f}x |')
    return 0


if __name__ == '__main__':
    torch.set_num_threads(1)
    sys.exit(main())
