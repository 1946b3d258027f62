""" The training loop's overheads, measured side by side in one process (ratios, not absolute times).

    python -m benchmarks.bench_loop [--steps 40] [--repeats 3] [--device cpu|cuda]

1. Step time: ``train_one_epoch`` as it runs (the loss stays on the device, the host waits only
   when a line is printed) against the same loop waiting for the loss every step (a printed line per
   step, which is what the progress bar costs), on resnet18_dropcluster at 32 px, batch 64.
2. Resume in mid-epoch: reaching batch K of an epoch by loading and dropping the first K batches
   (the loop before ``skip_first_batches``) against Accelerate's ``skip_first_batches`` (the sampler
   skips them, nothing is loaded), on the embedded digits with timm's training transform.
"""
import argparse
import contextlib
import io
import time

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

import dropcluster_timm  # noqa: F401  registers the models
from dropcluster_timm.data import DigitsDataset
from dropcluster_timm.train import (
    DropClusterConfig, DropClusterRecipe, OutputConfig, TrainConfig, TrainState, train_one_epoch)
from timm import create_model
from timm.data import create_transform, resolve_data_config

from .timing import synchronize


class _NoSchedule:
    def step_update(self, num_updates):
        pass


def _epoch_time(accelerator, model, optimizer, loader, steps, log_interval):
    recipe = DropClusterRecipe(DropClusterConfig(rate=0.1, start_epoch=0, warmup_epochs=0, update_freq=1), steps)
    cfg = TrainConfig(output=OutputConfig(progress=log_interval > 0, log_interval=log_interval,
                                          train_batches_per_epoch=steps))
    out = io.StringIO()
    synchronize(accelerator.device)
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        train_one_epoch(accelerator, model, loader, optimizer, torch.nn.CrossEntropyLoss(), _NoSchedule(), recipe,
                        TrainState(), cfg)
    synchronize(accelerator.device)
    return (time.perf_counter() - start) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--steps', type=int, default=40)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--device', default='cpu')
    args = p.parse_args()
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=args.device == 'cpu')
    device = accelerator.device

    # 1. step time
    model = create_model('resnet18_dropcluster', num_classes=10, img_size=32, drop_cluster_rate=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.utils.data.TensorDataset(torch.randn(64 * args.steps, 3, 32, 32), torch.randint(0, 10, (64 * args.steps,)))
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=64))
    _epoch_time(accelerator, model, optimizer, loader, 3, 0)  # warm-up
    quiet, every = [], []
    for _ in range(args.repeats):  # interleaved
        quiet.append(_epoch_time(accelerator, model, optimizer, loader, args.steps, 0))
        every.append(_epoch_time(accelerator, model, optimizer, loader, args.steps, 1))
    q, e = sorted(quiet)[len(quiet) // 2], sorted(every)[len(every) // 2]
    print(f'device {device}; step time, median of {args.repeats}: no per-step wait {q * 1e3:.1f} ms, '
          f'waiting for the loss every step {e * 1e3:.1f} ms, ratio {e / q:.3f}')

    # 2. resume in mid-epoch
    digits = DigitsDataset('train')
    digits.transform = create_transform(**resolve_data_config({'input_size': (3, 32, 32)}), is_training=True,
                                        auto_augment='rand-m9-mstd0.5')
    loader = accelerator.prepare(DataLoader(digits, batch_size=64, shuffle=True, drop_last=True))
    k = len(loader) // 2
    old, new = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for i, batch in enumerate(loader):  # the loop before: load and drop
            if i >= k:
                break
        old.append(time.perf_counter() - start)
        start = time.perf_counter()
        next(iter(accelerator.skip_first_batches(loader, k)))
        new.append(time.perf_counter() - start)
    o, n = sorted(old)[len(old) // 2], sorted(new)[len(new) // 2]
    print(f'resume at batch {k} of {len(loader)}: loading and dropping {o * 1e3:.0f} ms, skip_first_batches '
          f'{n * 1e3:.0f} ms, ratio {o / n:.1f}')


if __name__ == '__main__':
    main()
