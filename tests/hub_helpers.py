""" Shared by the Hub tests: the token they use and the check that it never leaks, the comparison of two
models' DropCluster layers, and the metrics a run passes to the card."""
from pathlib import Path

import torch

from dropcluster_timm import dropcluster_layers

TOKEN = 'hf_testtoken_do_not_leak_0123456789'


def assert_no_token(path: Path, *texts):
    for p in path.rglob('*'):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    for t in texts:
        assert TOKEN not in t


def assert_same_dropcluster(a, b):
    la, lb = list(dropcluster_layers(a)), list(dropcluster_layers(b))
    assert [n for n, _ in la] == [n for n, _ in lb]
    for (name, x), (_, y) in zip(la, lb):
        assert torch.equal(x.cluster_map, y.cluster_map), name
        assert torch.equal(x.cluster_counts, y.cluster_counts), name
        for attr in ('drop_prob', 'cluster_size', 'num_clusters', 'couple_channels', 'with_noise',
                     'cluster_method', 'max_clusters', 'cluster_count', 'min_cluster_size', 'max_cluster_size',
                     'skip_unstructured', 'drop_mode', 'batch_shared', 'has_undropped'):
            assert getattr(x, attr) == getattr(y, attr), (name, attr)


# What train_timm.py passes for a DropCluster run on an ImageFolder (an absolute local path as the data set).
RUN = {'top1': 55.5, 'top5': 80.25, 'eval_loss': 1.25, 'epoch': 9, 'epochs': 10, 'img_size': 64,
       'dataset': '/home/someone/data/imagenette2/', 'split': 'validation', 'weights': 'ema', 'ema_decay': 0.9998,
       'peak_drop_rate': 0.15, 'reclusterings': 4}
