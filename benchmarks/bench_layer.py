""" Layer benchmark: DropCluster2d against timm's DropBlock2d and the `x * mask` floor, and the
"rena" clustering engine against scikit-learn's Ward loop over channels.

Everything is measured side by side in one process and printed as ratios (CI machines are noisy, so
no timing is asserted anywhere). Runs on CPU, and on CUDA too when a GPU is present.

    python -m benchmarks.bench_layer            # full run (the Ward loop at 112x112 takes ~40 s)
    python -m benchmarks.bench_layer --quick    # smaller repeat counts, skips the largest Ward case
"""
import argparse
import time

import torch
from timm.layers import DropBlock2d

from dropcluster_timm import DropCluster2d
from dropcluster_timm.clustering import activation_features, cluster_features, within_cluster_variance
from dropcluster_timm.testing import smooth_region_fields

from .timing import synchronize, time_interleaved

# ResNet-50 shapes (batch, channels, size) where DropBlock / DropCluster sit.
LAYER_SHAPES = [(64, 256, 14), (64, 64, 56), (32, 64, 112)]
# (batch, channels, size, num_clusters): cluster size 49 (a 7x7 block).
CLUSTER_SHAPES = [(64, 256, 14, 4), (64, 64, 56, 64), (64, 64, 112, 256)]


def bench_layers(device, repeats, drop_prob=0.1, block_size=7):
    print(f'\n## Forward + backward, {device.type}, drop_prob={drop_prob}, block/cluster 7x7 '
          f'(median of {repeats}, ratio to the `x * mask` floor)\n')
    print('| shape | floor ms | DropCluster2d per-channel | DropCluster2d coupled | DropBlock2d per-channel | DropBlock2d coupled |')
    print('|---|---|---|---|---|---|')
    for b, c, s in LAYER_SHAPES:
        x = torch.randn(b, c, s, s, device=device, requires_grad=True)
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

        def step(layer):
            def run():
                x.grad = None
                layer(x).backward(grad)
            return run

        t = time_interleaved({k: step(v) for k, v in layers.items()}, device, repeats)
        floor = t['floor']
        print(f'| {b}x{c}x{s}x{s} | {floor * 1e3:.2f} | {t["dc_per_channel"] / floor:.2f}x | '
              f'{t["dc_coupled"] / floor:.2f}x | {t["db_per_channel"] / floor:.1f}x | {t["db_coupled"] / floor:.2f}x |',
              flush=True)


def bench_clustering(device, quick):
    try:
        import sklearn  # noqa: F401
        have_ward = device.type == 'cpu'
    except ImportError:
        have_ward = False
        print('\n(scikit-learn not installed: Ward reference skipped)')
    print(f'\n## Clustering one layer, {device.type}: "rena" against the scikit-learn Ward loop over channels\n')
    print('Inputs: smooth random fields on Voronoi regions (dropcluster_timm.testing), one map per channel.\n')
    print('| activations | K | rena s | Ward loop s | speed-up | rena WCV / Ward WCV |')
    print('|---|---|---|---|---|---|')
    g = torch.Generator().manual_seed(0)
    for b, c, s, k in CLUSTER_SHAPES:
        x = smooth_region_fields(b, c, s, s, k, g).to(device)
        feats = activation_features(x)
        cluster_features(feats, [s, s], k, 'rena')  # warm-up
        synchronize(device)
        t = time.perf_counter()
        rena = cluster_features(feats, [s, s], k, 'rena')
        synchronize(device)
        t_rena = time.perf_counter() - t
        v_rena = within_cluster_variance(feats, rena).mean().item()
        if have_ward and not (quick and s > 56):
            t = time.perf_counter()
            ward = cluster_features(feats, [s, s], k, 'ward')
            t_ward = time.perf_counter() - t
            v_ward = within_cluster_variance(feats, ward).mean().item()
            print(f'| {b}x{c}x{s}x{s} | {k} | {t_rena:.3f} | {t_ward:.2f} | {t_ward / t_rena:.0f}x | {v_rena / v_ward:.3f} |',
                  flush=True)
        else:
            print(f'| {b}x{c}x{s}x{s} | {k} | {t_rena:.3f} | - | - | - |', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='fewer repeats, skip the largest Ward case')
    parser.add_argument('--repeats', type=int, default=None, help='timed repeats per layer (default 15, quick 5)')
    parser.add_argument('--device', action='append', help='device(s) to run on (default: cpu, and cuda if present)')
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 15)
    devices = args.device or (['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads'
          + (f', {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''))
    for name in devices:
        device = torch.device(name)
        bench_layers(device, repeats)
        bench_clustering(device, args.quick)


if __name__ == '__main__':
    main()
