""" Training-step speed of resnet50_dropcluster against resnet50 without and with DropBlock, and the
cost of one full re-clustering amortised over an epoch.

All models are timed side by side in one process (steps interleaved round-robin) and reported as
ratios. On a 2-core CPU use a small resolution and batch; on a GPU use ImageNet settings:

    python -m benchmarks.bench_train                                  # CPU default: 128 px, batch 16
    python -m benchmarks.bench_train --device cuda --img-size 224 --batch-size 128 --amp
"""
import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import dropcluster_timm  # noqa: F401  registers *_dropcluster with timm
from dropcluster_timm import dropcluster_layers, update_clusters

from .timing import synchronize, time_interleaved

IMAGENET_TRAIN_IMAGES = 1_281_167


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='resnet50', help='base timm ResNet (its *_dropcluster twin must exist)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--img-size', type=int, default=128)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--drop-rate', type=float, default=0.1, help='DropBlock / DropCluster rate')
    parser.add_argument('--steps', type=int, default=10, help='timed steps per model')
    parser.add_argument('--update-batch-size', type=int, default=64, help='batch used for one re-clustering')
    parser.add_argument('--epoch-images', type=int, default=IMAGENET_TRAIN_IMAGES,
                        help='epoch size the re-clustering is amortised over (default: ImageNet-1k train)')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    parser.add_argument('--channels-last', action='store_true')
    args = parser.parse_args()
    device = torch.device(args.device)

    def build(name, **kwargs):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=1000, **kwargs).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.train()

    size = (args.img_size, args.img_size)
    models = {
        'resnet50': build(args.model),
        'resnet50 + DropBlock': build(args.model, drop_block_rate=args.drop_rate),
        'resnet50_dropcluster': build(f'{args.model}_dropcluster', drop_cluster_rate=args.drop_rate, img_size=size),
    }
    dc_model = models['resnet50_dropcluster']
    update_batch = torch.randn(args.update_batch_size, 3, *size, device=device)
    update_clusters(dc_model, update_batch)  # per-channel learned maps, as during training
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    x = torch.randn(args.batch_size, 3, *size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step(name):
        model, opt = models[name], optimizers[name]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # two warm-up steps per model, then timed steps interleaved round-robin
    med = time_interleaved({name: (lambda name=name: step(name)) for name in models}, device, args.steps)

    update_times = []
    for _ in range(3):
        synchronize(device)
        t = time.perf_counter()
        update_clusters(dc_model, update_batch)
        synchronize(device)
        update_times.append(time.perf_counter() - t)
    t_update = statistics.median(update_times)
    steps_per_epoch = args.epoch_images / args.batch_size
    epoch_time = steps_per_epoch * med['resnet50_dropcluster']

    print(f'torch {torch.__version__}, timm {timm.__version__}, device {device}'
          + (f' ({torch.cuda.get_device_name()})' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'))
    print(f'{args.model}, {args.img_size}px, batch {args.batch_size}, rate {args.drop_rate}, amp={args.amp}, '
          f'median of {args.steps} interleaved steps\n')
    print('| model | step ms | images/s | vs resnet50 | vs DropBlock |')
    print('|---|---|---|---|---|')
    for name, t in med.items():
        print(f'| {name} | {t * 1e3:.1f} | {args.batch_size / t:.1f} | {t / med["resnet50"]:.3f}x '
              f'| {t / med["resnet50 + DropBlock"]:.3f}x |')
    n_layers = len(list(dropcluster_layers(dc_model)))
    print(f'\nRe-clustering all {n_layers} DropCluster layers from a batch of {args.update_batch_size}: '
          f'{t_update:.2f} s (forward + clustering)')
    print(f'Amortised over one epoch of {args.epoch_images:,} images ({steps_per_epoch:,.0f} steps, '
          f'{epoch_time / 3600:.2f} h at the measured step time): {100 * t_update / epoch_time:.4f}% of the epoch')


if __name__ == '__main__':
    main()
