""" Layer benchmark: DropCluster2d against timm's DropBlock2d and the `x * mask` floor, and the
"rena" clustering engine against scikit-learn's Ward loop over channels, on five kinds of input
(smooth region fields, blurred noise, white noise, ReLU'd noise with and without a dead quarter:
rena's speed depends on the data), every clustering method and the reference options (gap count,
Hopkins test) at 56x56, and the cost of the drop modes.

Everything is measured side by side in one process and printed as ratios (CI machines are noisy, so
no timing is asserted anywhere). Runs on CPU, and on CUDA too when a GPU is present.

    python -m benchmarks.bench_layer            # full run (the Ward loops take ~1.5 min on 2 cores)
    python -m benchmarks.bench_layer --quick    # smaller repeat counts, skips the largest Ward case
    python -m benchmarks.bench_layer --device cuda --sections layers modes --dtype bfloat16 --channels-last
    python -m benchmarks.bench_layer --tiny --quick --repeats 1   # every table at toy shapes (a smoke test)
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from timm.layers import DropBlock2d

from dropcluster_timm import DropCluster2d
from dropcluster_timm.clustering.engine import activation_features, cluster_features, within_cluster_variance
from dropcluster_timm.testing import smooth_region_fields

from .timing import synchronize, time_interleaved

# ResNet-50 shapes (batch, channels, size) where DropBlock / DropCluster sit.
LAYER_SHAPES = [(64, 256, 14), (64, 64, 56), (32, 64, 112)]
# (batch, channels, size, num_clusters): cluster size 49 (a 7x7 block).
CLUSTER_SHAPES = [(64, 256, 14, 4), (64, 64, 56, 64), (64, 64, 112, 256)]
# --tiny: toy shapes that run every table in seconds (a smoke test; the figures mean nothing).
TINY_LAYER_SHAPES = [(2, 8, 14), (2, 8, 28)]
TINY_CLUSTER_SHAPES = [(2, 8, 14, 4), (2, 8, 28, 16)]
TINY_METHOD_SHAPE = dict(b=2, c=8, s=28, k=16)
TINY_MODE_SHAPE = (2, 8, 28, 28)
# The tables main() can print, in order.
SECTIONS = ['layers', 'modes', 'clustering', 'methods']
# The Ward loop clusters map by map: it is timed on this many maps of a layer and scaled.
WARD_MAPS = 16


def _forward_backward(layer, x, grad):
    """One timed step: ``layer(x)`` forward and backward."""
    def run():
        x.grad = None
        layer(x).backward(grad)
    return run


def _input(shape, device, dtype, channels_last):
    """A leaf input of ``shape`` in the benchmarked dtype and memory format."""
    x = torch.randn(*shape, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _layout(dtype, channels_last):
    return str(dtype).replace('torch.', '') + (', channels_last' if channels_last else '')


def bench_layers(device, repeats, drop_prob=0.1, block_size=7, dtype=torch.float32, channels_last=False,
                 shapes=LAYER_SHAPES):
    print(f'\n## Forward + backward, {device.type}, {_layout(dtype, channels_last)}, drop_prob={drop_prob}, '
          f'block/cluster 7x7 (median of {repeats}, ratio to the `x * mask` floor)\n')
    print('| shape | floor ms | DropCluster2d per-channel | DropCluster2d coupled | DropBlock2d per-channel | DropBlock2d coupled |')
    print('|---|---|---|---|---|---|')
    for b, c, s in shapes:
        x = _input((b, c, s, s), device, dtype, channels_last)
        grad = torch.randn_like(x)
        feats = torch.randn(8, c, s, s, device=device)
        per_channel = DropCluster2d(drop_prob, block_size=block_size, device=device).train()
        per_channel.update_clusters(feats)
        coupled = DropCluster2d(drop_prob, block_size=block_size, couple_channels=True, device=device).train()
        coupled.update_clusters(feats)
        mask = (torch.rand_like(x) > drop_prob).to(x.dtype) / (1 - drop_prob)
        layers = {
            'floor': lambda x_: x_ * mask,
            'dc_per_channel': per_channel,
            'dc_coupled': coupled,
            'db_per_channel': DropBlock2d(drop_prob, block_size, couple_channels=False).train(),
            'db_coupled': DropBlock2d(drop_prob, block_size, couple_channels=True).train(),
        }
        t = time_interleaved({k: _forward_backward(v, x, grad) for k, v in layers.items()}, device, repeats)
        floor = t['floor']
        print(f'| {b}x{c}x{s}x{s} | {floor * 1e3:.2f} | {t["dc_per_channel"] / floor:.2f}x | '
              f'{t["dc_coupled"] / floor:.2f}x | {t["db_per_channel"] / floor:.1f}x | {t["db_coupled"] / floor:.2f}x |',
              flush=True)


def cluster_inputs(b, c, s, k, generator):
    """The input kinds of the clustering table, activations ``(b, c, s, s)``: structured and not."""
    return {
        'smooth regions': smooth_region_fields(b, c, s, s, k, generator),
        'blurred noise': F.avg_pool2d(torch.randn(b, c, s + 4, s + 4, generator=generator), 5, 1),
        'white noise': torch.randn(b, c, s, s, generator=generator),
        'ReLU noise': torch.randn(b, c, s, s, generator=generator).relu(),
        # Dead ReLU areas: a plateau of exact zeros over a quarter of every map (many tied costs).
        'ReLU noise, dead quarter': torch.randn(b, c, s, s, generator=generator).relu()
        * (torch.arange(s).view(s, 1) >= s // 2).logical_or(torch.arange(s) >= s // 2).float(),
    }


def bench_clustering(device, quick, repeats=3, shapes=CLUSTER_SHAPES):
    try:
        import sklearn  # noqa: F401
        have_ward = device.type == 'cpu'
    except ImportError:
        have_ward = False
        print('\n(scikit-learn not installed: Ward reference skipped)')
    repeats = 1 if quick else repeats
    print(f'\n## Clustering one layer, {device.type}: "rena" against the scikit-learn Ward loop over channels\n')
    print(f'One map per channel. rena: median of {repeats} run(s) on all maps. Ward loop: one run on the first '
          f'{WARD_MAPS} maps, scaled to all maps (it clusters map by map); WCV ratio over those maps.\n')
    print('| activations | K | input | rena s | Ward loop s (scaled) | speed-up | rena WCV / Ward WCV |')
    print('|---|---|---|---|---|---|---|')
    g = torch.Generator().manual_seed(0)
    for b, c, s, k in shapes:
        for kind, x in cluster_inputs(b, c, s, k, g).items():
            feats = activation_features(x.to(device))
            cluster_features(feats, [s, s], k, 'rena')  # warm-up
            times = []
            for _ in range(repeats):
                synchronize(device)
                t = time.perf_counter()
                rena = cluster_features(feats, [s, s], k, 'rena')
                synchronize(device)
                times.append(time.perf_counter() - t)
            t_rena = statistics.median(times)
            row = f'| {b}x{c}x{s}x{s} | {k} | {kind} | {t_rena:.3f} |'
            if have_ward and not (quick and s > 56):
                sub = feats[:WARD_MAPS]
                t = time.perf_counter()
                ward = cluster_features(sub, [s, s], k, 'ward')
                t_ward = (time.perf_counter() - t) * feats.shape[0] / sub.shape[0]
                v_ratio = (within_cluster_variance(sub, rena[:sub.shape[0]]).mean()
                           / within_cluster_variance(sub, ward).mean()).item()
                row += f' {t_ward:.2f} | {t_ward / t_rena:.0f}x | {v_ratio:.3f} |'
            else:
                row += ' - | - | - |'
            print(row, flush=True)


def _timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def bench_methods(device, quick, b=64, c=64, s=56, k=64):
    """Every clustering method and the reference options at one shape, against the Ward loop."""
    from dropcluster_timm.clustering.cluster_count import gap_statistic_labels, structured_maps
    have_ward = device.type == 'cpu'
    try:
        import sklearn  # noqa: F401
    except ImportError:
        have_ward = False
    repeats = 1 if quick else 3
    print(f'\n## Clustering methods and reference options, {device.type}, {b}x{c}x{s}x{s}, K={k}\n')
    print(f'Seconds for the whole layer (median of {repeats}); WCV / Ward over the first {WARD_MAPS} maps, '
          f'Ward loop timed on them and scaled. Gap: counts chosen in [16, 256] (cluster sizes {s * s // 256} to '
          f'{s * s // 16}); '
          f'Hopkins: the structure test alone, with the share of maps found structured.\n')
    print('| input | method | s | speed-up vs Ward loop | WCV / Ward WCV | note |')
    print('|---|---|---|---|---|---|')
    g = torch.Generator().manual_seed(0)
    inputs = cluster_inputs(b, c, s, k, g)
    for kind in ('smooth regions', 'blurred noise', 'white noise'):
        feats = activation_features(inputs[kind].to(device))
        sub = feats[:WARD_MAPS]
        t_ward = v_ward = None
        if have_ward:
            t = time.perf_counter()
            ward = cluster_features(sub, [s, s], k, 'ward')
            t_ward = (time.perf_counter() - t) * feats.shape[0] / sub.shape[0]
            v_ward = within_cluster_variance(sub, ward).mean().item()
        for method in ('rena', 'kmeans', 'kmedoids', 'gmm', 'random', 'grid'):
            gen = torch.Generator(device=device).manual_seed(0)
            labels, sec = _timed(lambda: cluster_features(feats, [s, s], k, method, generator=gen), device, repeats)
            ratio = f'{t_ward / sec:.0f}x' if t_ward else '-'
            wcv = f'{within_cluster_variance(sub, labels[:WARD_MAPS]).mean().item() / v_ward:.3f}' if v_ward else '-'
            print(f'| {kind} | {method} | {sec:.3f} | {ratio} | {wcv} | |', flush=True)
        gen = torch.Generator(device=device).manual_seed(0)
        (labels, counts), sec = _timed(lambda: gap_statistic_labels(feats, [s, s], 16, 256, generator=gen),
                                       device, repeats)
        ratio = f'{t_ward / sec:.0f}x' if t_ward else '-'
        print(f'| {kind} | rena + gap count | {sec:.3f} | {ratio} | - | counts: median {int(counts.median())}, '
              f'range {int(counts.min())}-{int(counts.max())} |', flush=True)
        flags, sec = _timed(lambda: structured_maps(feats, [s, s], generator=gen), device, repeats)
        print(f'| {kind} | Hopkins test | {sec:.4f} | - | - | {flags.float().mean().item():.0%} of maps structured |',
              flush=True)


def bench_drop_modes(device, repeats, drop_prob=0.1, shape=(64, 64, 56, 56), dtype=torch.float32,
                     channels_last=False):
    """Forward + backward of the reference drop modes, against the `x * mask` floor."""
    b, c, h, w = shape
    print(f'\n## Drop modes, forward + backward, {device.type}, {_layout(dtype, channels_last)}, {b}x{c}x{h}x{w}, '
          f'drop_prob={drop_prob}, 7x7 clusters (median of {repeats}, ratio to the `x * mask` floor)\n')
    x = _input(shape, device, dtype, channels_last)
    grad = torch.randn_like(x)
    feats = torch.randn(8, c, h, w, device=device)
    mask = (torch.rand_like(x) > drop_prob).to(x.dtype) / (1 - drop_prob)
    layers = {}
    for name, kw in (('uniform (default)', {}), ('size', dict(drop_mode='size')),
                     ('batch_shared', dict(batch_shared=True)), ('half the maps undropped', {})):
        layer = DropCluster2d(drop_prob, block_size=7, device=device, **kw).train()
        layer.update_clusters(feats)
        if name == 'half the maps undropped':
            layer.set_cluster_map(layer.cluster_map, undropped=torch.arange(c, device=device) % 2 == 0)
        layers[name] = layer
    fns = {'floor': lambda x_: x_ * mask, **layers}
    t = time_interleaved({k: _forward_backward(v, x, grad) for k, v in fns.items()}, device, repeats)
    print('| floor ms | ' + ' | '.join(layers) + ' |')
    print('|---|' + '---|' * len(layers))
    print(f'| {t["floor"] * 1e3:.2f} | ' + ' | '.join(f'{t[k] / t["floor"]:.2f}x' for k in layers) + ' |', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='fewer repeats, skip the largest Ward case')
    parser.add_argument('--repeats', type=int, default=None, help='timed repeats per layer (default 15, quick 5)')
    parser.add_argument('--device', action='append', help='device(s) to run on (default: cpu, and cuda if present)')
    parser.add_argument('--sections', nargs='+', choices=SECTIONS, default=SECTIONS,
                        help='tables to print (default: all)')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default='float32',
                        help='input dtype of the layer and drop-mode tables')
    parser.add_argument('--channels-last', action='store_true', help='channels_last inputs in those tables')
    parser.add_argument('--tiny', action='store_true',
                        help='toy shapes (batch 2, 8 channels, at most 28 px): every table in seconds, as a smoke '
                             'test; the figures mean nothing')
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (5 if args.quick else 15)
    devices = args.device or (['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads'
          + (f', {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''))
    for name in devices:
        device = torch.device(name)
        if 'layers' in args.sections:
            bench_layers(device, repeats, dtype=dtype, channels_last=args.channels_last,
                         shapes=TINY_LAYER_SHAPES if args.tiny else LAYER_SHAPES)
        if 'modes' in args.sections:
            bench_drop_modes(device, repeats, dtype=dtype, channels_last=args.channels_last,
                             **(dict(shape=TINY_MODE_SHAPE) if args.tiny else {}))
        if 'clustering' in args.sections:
            bench_clustering(device, args.quick, shapes=TINY_CLUSTER_SHAPES if args.tiny else CLUSTER_SHAPES)
        if 'methods' in args.sections:
            bench_methods(device, args.quick, **(TINY_METHOD_SHAPE if args.tiny else {}))


if __name__ == '__main__':
    main()
