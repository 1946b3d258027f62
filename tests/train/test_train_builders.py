""" The parts of a run: schedule warnings, CPU threads, the model."""
import os
import subprocess
import sys

import pytest

from dropcluster_timm import DropClusterSchedule
from dropcluster_timm.train import schedule_warnings


def test_schedule_warnings_name_what_never_happens():
    never = DropClusterSchedule(0.1, start_epoch=20, warmup_epochs=10, update_freq=10, steps_per_epoch=5)
    assert never.peak_rate(20) == 0.0 and never.update_epochs(20) == []
    (warning,) = schedule_warnings(never, 20)
    assert 'never switches on' in warning and '--drop-cluster-start 20' in warning
    partial = DropClusterSchedule(0.1, start_epoch=2, warmup_epochs=10, update_freq=0, steps_per_epoch=5)
    text = ' '.join(schedule_warnings(partial, 4))
    assert 'reaches only' in text and 'never re-computed (--drop-cluster-update-freq is 0)' in text
    one_epoch = DropClusterSchedule(0.1, start_epoch=0.25, warmup_epochs=0.25, update_freq=1, steps_per_epoch=5)
    (warning,) = schedule_warnings(one_epoch, 1)  # says why, not that update-freq 1 is at fault
    assert 're-clustering starts epochs from 1 (--drop-cluster-start 0.25, rounded up) and the run has 1' in warning
    assert partial.peak_rate(4) == pytest.approx(partial.rate_at(3.8))
    fine = DropClusterSchedule(0.1, start_epoch=1, warmup_epochs=1, update_freq=1, steps_per_epoch=5)
    assert schedule_warnings(fine, 4) == []
    assert 'stay off' in schedule_warnings(DropClusterSchedule(0.0), 4)[0]


def test_single_cpu_process_uses_the_cores():
    code = ('import os, torch; from accelerate import Accelerator; from dropcluster_timm.train import use_cpu_cores; '
            'acc = Accelerator(cpu=True); print(use_cpu_cores(acc), len(os.sched_getaffinity(0)))')
    env = dict(os.environ, OMP_NUM_THREADS='1')  # what `accelerate launch` sets for one process
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    threads, cores = map(int, proc.stdout.split())
    assert threads == cores


def test_build_model_applies_the_cluster_settings_once_and_checks_the_name():
    from dropcluster_timm import dropcluster_layers
    from dropcluster_timm.errors import InputError
    from dropcluster_timm.train import ModelConfig, build_model
    model = build_model(ModelConfig('resnet18_dropcluster', layer_options=dict(cluster_method='kmeans', num_clusters=3)), 4, (32, 32))
    layers = [layer for _, layer in dropcluster_layers(model)]
    assert layers and all(layer.cluster_method == 'kmeans' and layer.num_clusters == 3 for layer in layers)
    assert all(layer.drop_prob == 0.0 for layer in layers)  # the schedule drives the rate
    assert model.num_classes == 4 and model.pretrained_cfg['architecture'] == 'resnet18_dropcluster'
    default = build_model(ModelConfig('resnet18_dropcluster'), 4)
    assert all(layer.cluster_method == 'rena' and layer.num_clusters == 0 for _, layer in dropcluster_layers(default))
    plain = build_model(ModelConfig('resnet18', drop_block_rate=0.1), 4)
    assert not list(dropcluster_layers(plain))
    with pytest.raises(InputError, match="unknown model 'resnet18_dropclustr'"):
        build_model(ModelConfig('resnet18_dropclustr'), 4)
    with pytest.raises(InputError, match="cannot create model 'resnet18'"):
        build_model(ModelConfig('resnet18', layer_options=dict(num_clusters=3)), 4)  # a plain model takes no cluster settings


def test_recluster_runs_outside_accelerates_autocast(own_accelerator):
    """Under bf16 mixed precision the forward runs in bfloat16, the re-clustering in float32."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import TensorDataset
    from dropcluster_timm import DropCluster2d
    from dropcluster_timm.train import recluster
    accelerator = Accelerator(cpu=True, mixed_precision='bf16')
    layer = DropCluster2d(0.1, block_size=2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), layer, torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    model = accelerator.prepare(model)
    seen = []
    layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype) and None)
    model(torch.randn(2, 3, 8, 8))
    recluster(accelerator, model, None, TensorDataset(torch.randn(8, 3, 8, 8), torch.zeros(8)), 4, 1, seed=0)
    model(torch.randn(2, 3, 8, 8))  # the mixed-precision forward is back
    assert seen == [torch.bfloat16, torch.float32, torch.bfloat16]
    assert layer.cluster_map.shape[0] == 4  # re-clustered per channel


def test_reference_options_reach_the_layers_and_the_schedule():
    from dropcluster_timm import dropcluster_layers
    from dropcluster_timm.train import build_model, parse_train_args
    from dropcluster_timm.train.recipe import make_schedule
    cfg = parse_train_args(['--cluster-count', 'gap', '--min-cluster-size', '4', '--max-cluster-size', '64',
                            '--skip-unstructured', '--cluster-drop-mode', 'size', '--batch-shared-mask',
                            '--drop-cluster', '0.2', '--drop-cluster-shape', 'multistep',
                            '--drop-cluster-milestones', '2', '4', '--drop-cluster-gamma', '0.25'])
    cfg.check()
    model = build_model(cfg.model, 4, (32, 32))
    layers = [layer for _, layer in dropcluster_layers(model)]
    assert layers
    for layer in layers:
        assert (layer.cluster_count, layer.min_cluster_size, layer.max_cluster_size) == ('gap', 4, 64)
        assert layer.skip_unstructured and layer.drop_mode == 'size' and layer.batch_shared
    assert model.pretrained_cfg['architecture'] == 'resnet18_dropcluster'
    args = model._model_args if hasattr(model, '_model_args') else {}
    assert args.get('dc_cluster_count') == 'gap' and args.get('dc_drop_mode') == 'size'
    schedule = make_schedule(cfg.resolved().dropcluster, steps_per_epoch=10)
    assert schedule.shape == 'multistep' and schedule.milestones == [2.0, 4.0]
    assert [schedule.rate_at(e) for e in (3, 4)] == [0.2 * 0.25, 0.2]
    default = build_model(parse_train_args([]).model, 4, (32, 32))
    for _, layer in dropcluster_layers(default):
        assert (layer.cluster_count, layer.drop_mode, layer.batch_shared, layer.skip_unstructured) == \
            ('fixed', 'uniform', False, False)
