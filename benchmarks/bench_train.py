""" Training-step speed of resnet50_dropcluster against resnet50 without and with DropBlock, and the
cost of one full re-clustering amortised over an epoch.

All models are timed side by side in one process (steps interleaved round-robin) and reported as
ratios, with the memory of a step of each (built alone): the CUDA peak, and on any device the bytes
autograd holds for the backward. On a 2-core CPU use a small resolution and batch; on a GPU use ImageNet settings:

    python -m benchmarks.bench_train                                  # CPU default: 128 px, batch 16
    python -m benchmarks.bench_train --device cuda --img-size 224 --batch-size 128 --amp
"""
import argparse
import gc
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import dropcluster_timm  # noqa: F401  registers *_dropcluster with timm
from dropcluster_timm import dropcluster_layers, update_clusters

from .timing import synchronize, time_interleaved

IMAGENET_TRAIN_IMAGES = 1_281_167


def step_memory(build, step, name, device):
    """Memory of a training step of one model, built alone: ``(peak bytes or None, bytes held for the backward)``.

    The peak (CUDA only) counts everything allocated since before the model was built: weights,
    gradients, optimizer state and activations. Held for the backward: the distinct storages autograd
    saves during a forward, parameters left out (they are the same in every model), on any device.
    """
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    model, opt = build(name)
    for _ in range(2):  # from here on gradients and optimizer state exist, as in training
        step(model, opt)
    peak = None
    if device.type == 'cuda':
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(model, opt)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        # Everything saved is alive until the backward, so a storage's address identifies it.
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, opt)
    del model, opt
    return peak, sum(saved.values())


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

    size = (args.img_size, args.img_size)
    # the rows, named after --model: the plain model, with DropBlock, and its DropCluster twin
    plain, dropblock, dropcluster = args.model, f'{args.model} + DropBlock', f'{args.model}_dropcluster'
    specs = {
        plain: (args.model, {}),
        dropblock: (args.model, dict(drop_block_rate=args.drop_rate)),
        dropcluster: (f'{args.model}_dropcluster', dict(drop_cluster_rate=args.drop_rate, img_size=size)),
    }
    update_batch = torch.randn(args.update_batch_size, 3, *size, device=device)
    x = torch.randn(args.batch_size, 3, *size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def build(name):
        arch, kwargs = specs[name]
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=1000, **kwargs).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if next(dropcluster_layers(model), None) is not None:
            update_clusters(model, update_batch)  # per-channel learned maps, as during training
        return model.train(), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(model, opt):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # Memory first, one model at a time, so that no other model's tensors are counted.
    memory = {name: step_memory(build, step, name, device) for name in specs}

    models = {name: build(name) for name in specs}
    dc_model = models[dropcluster][0]
    # two warm-up steps per model, then timed steps interleaved round-robin
    med = time_interleaved({name: (lambda name=name: step(*models[name])) for name in models}, device, args.steps)

    update_times = []
    for _ in range(3):
        synchronize(device)
        t = time.perf_counter()
        update_clusters(dc_model, update_batch)
        synchronize(device)
        update_times.append(time.perf_counter() - t)
    t_update = statistics.median(update_times)
    steps_per_epoch = args.epoch_images / args.batch_size
    epoch_time = steps_per_epoch * med[dropcluster]

    print(f'torch {torch.__version__}, timm {timm.__version__}, device {device}'
          + (f' ({torch.cuda.get_device_name()})' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'))
    print(f'{args.model}, {args.img_size}px, batch {args.batch_size}, rate {args.drop_rate}, amp={args.amp}, '
          f'median of {args.steps} interleaved steps\n')
    print(f'| model | step ms | images/s | vs {plain} | vs DropBlock | peak MiB | peak vs {plain} '
          f'| held for backward MiB | held vs {plain} |')
    print('|---|---|---|---|---|---|---|---|---|')
    peak0, held0 = memory[plain]
    for name, t in med.items():
        peak, held = memory[name]
        peak_cols = (f'{peak / 2 ** 20:.0f} | {peak / peak0:.4f}x' if peak is not None else '- | -')
        print(f'| {name} | {t * 1e3:.1f} | {args.batch_size / t:.1f} | {t / med[plain]:.3f}x '
              f'| {t / med[dropblock]:.3f}x | {peak_cols} | {held / 2 ** 20:.0f} | {held / held0:.4f}x |')
    if device.type != 'cuda':
        print('\n(peak memory is measured on CUDA only)')
    n_layers = len(list(dropcluster_layers(dc_model)))
    print(f'\nRe-clustering all {n_layers} DropCluster layers from a batch of {args.update_batch_size}: '
          f'{t_update:.2f} s (forward + clustering)')
    print(f'Amortised over one epoch of {args.epoch_images:,} images ({steps_per_epoch:,.0f} steps, '
          f'{epoch_time / 3600:.2f} h at the measured step time): {100 * t_update / epoch_time:.4f}% of the epoch')


if __name__ == '__main__':
    main()
