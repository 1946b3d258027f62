#!/usr/bin/env python3
""" What EDropout's energy evaluation costs, as a share of a training step, measured side by side.

    python -m benchmarks.bench_edropout                 # CPU (or the GPU when there is one)
    python -m benchmarks.bench_edropout --device cuda --amp
    python -m benchmarks.bench_edropout --models resnet18 --batch 16 --repeats 1   # a quick look

For each model and batch, one training step (forward, backward, SGD step) and one EDropout
evolution step (``edropout_step``: 2 x candidates states scored in one no-grad eval-mode forward
of ``batch_per_state`` images each, then the update) are timed interleaved (median of
``--repeats``). The table gives the evolution step as a fraction of the training step, and the
overhead per training batch at evolution intervals 1, 2 and 4. Once the search has converged the
overhead is 0.
"""
import argparse

import timm
import torch
import torch.nn.functional as F

from dropcluster_timm.edropout.layers import add_edropout, edropout_step, make_search

from .timing import time_interleaved

CASES = [  # model, image size, training batch
    ('resnet18', 32, 128),
    ('resnet50', 96, 32),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast for both steps')
    p.add_argument('--candidates', type=int, default=8, help='population size of the search (at least 4)')
    p.add_argument('--batch-per-state', type=int, nargs='+', default=[0, 4, 8, 16],
                   help="0: train_timm.py's default, batch / (2 x candidates)")
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--models', nargs='+', choices=[c[0] for c in CASES], default=[c[0] for c in CASES],
                   help='the cases to time, by model (default: all)')
    p.add_argument('--batch', type=int, default=None,
                   help="training batch of every case (default: each case's own, see CASES)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'device: {name}; torch {torch.__version__}, timm {timm.__version__}; candidates {args.candidates}'
          f'{", bf16 autocast" if args.amp else ""}')
    print('| model | image | batch | images per state | training step (s) | evolution step (s) | '
          'evolution / step | overhead at interval 1 / 2 / 4 |')
    print('|---|---:|---:|---:|---:|---:|---:|---|')
    for model_name, size, batch in [c for c in CASES if c[0] in args.models]:
        batch = args.batch or batch
        torch.manual_seed(0)
        model = timm.create_model(model_name, num_classes=10).to(device)
        add_edropout(model)
        search = make_search(model, num_states=args.candidates, converge_steps=0, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)  # noqa: E731

        def train_step():
            model.train()
            with autocast():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns = {'train': train_step}
        sizes = sorted({b or max(1, batch // (2 * args.candidates)) for b in args.batch_per_state})
        default = max(1, batch // (2 * args.candidates))
        for b in sizes:
            def evolve(b=b):
                with autocast():
                    edropout_step(model, search, x[:b], y[:b])
            fns[b] = evolve
        times = time_interleaved(fns, device, args.repeats)
        for b in sizes:
            r = times[b] / times['train']
            label = f'{b} (default)' if b == default and 0 in args.batch_per_state else str(b)
            print(f'| {model_name} | {size} | {batch} | {label} | {times["train"]:.4f} | {times[b]:.4f} | {r:.3f} | '
                  f'{100 * r:.1f}% / {100 * r / 2:.1f}% / {100 * r / 4:.1f}% |')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
