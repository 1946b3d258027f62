""" timm's own train.py trains a *_dropcluster model with --model-ema and resumes it.

timm's train.py is not in timm's wheel or source distribution, so this runs only where
DROPCLUSTER_TIMM_TRAIN_PY names a copy of it (from huggingface/pytorch-image-models)."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

from run_helpers import make_image_folder

TRAIN_PY = os.environ.get('DROPCLUSTER_TIMM_TRAIN_PY')
pytestmark = pytest.mark.skipif(not TRAIN_PY, reason='set DROPCLUSTER_TIMM_TRAIN_PY to timm\'s train.py '
                                                     '(not shipped in timm\'s wheel or sdist)')


def _train(data, out, experiment, epochs, *extra):
    cmd = [sys.executable, TRAIN_PY, '--data-dir', str(data), '--train-split', 'train', '--val-split', 'validation',
           '--device-modules', 'dropcluster_timm', '--model', 'resnet18_dropcluster', '--drop-block', '0.1',
           '--model-ema', '--img-size', '64', '--num-classes', '3', '--epochs', str(epochs), '-b', '8',
           '--workers', '0', '--lr', '0.01', '--warmup-epochs', '0', '--device', 'cpu', '--no-prefetcher',
           '--output', str(out), '--experiment', experiment,
           '--model-kwargs', 'dc_recluster_every=4', 'dc_cluster_images=4', *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.serialization.safe_globals([argparse.Namespace]):  # timm stores its args beside the weights
        return torch.load(out / experiment / 'last.pth.tar', map_location='cpu', weights_only=True)


def test_timms_train_py_learns_the_maps_keeps_an_ema_of_them_and_resumes(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=3, train_per_class=16, val_per_class=4, size=64)
    first = _train(data, tmp_path / 'out', 'a', 2)
    model, ema = first['state_dict'], first['state_dict_ema']
    maps = [k for k in model if k.endswith('.cluster_map')]
    assert maps and all(model[k].shape[1:] in ((4, 4), (2, 2)) for k in maps)  # at 64 px, not the 224 px grids
    assert all(torch.equal(model[k], ema[k]) for k in maps)
    assert all(int(v) == 12 for k, v in model.items() if k.endswith('.num_steps'))  # 2 epochs of 6 batches
    resumed = _train(data, tmp_path / 'out', 'b', 3, '--resume', str(tmp_path / 'out' / 'a' / 'last.pth.tar'))
    assert all(int(v) == 18 for k, v in resumed['state_dict'].items() if k.endswith('.num_steps'))
