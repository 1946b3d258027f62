""" ``train_timm.py --edropout`` on the embedded digits data: the published model is the pruned one
(a ``*_slim`` folder with its card), a killed run resumes to the same search and weights, two CPU
processes over gloo agree on the state, and bad settings fail with one line."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

import dropcluster_timm.edropout  # noqa: F401  registers the *_slim models
from run_helpers import ROOT, assert_fails, free_port, run_script

EVALUATE = [sys.executable, '-m', 'dropcluster_timm', 'evaluate']
# digits: 1442 training images, 16 per batch; 5 batches per epoch keep the runs short
DIGITS = ['--model', 'resnet18', '--edropout', '--epochs', '2', '--batch-size', '16', '--train-batches-per-epoch',
          '5', '--edropout-batch', '4', '--edropout-candidates', '4', '--edropout-converge', '100',
          '--edropout-interval', '1', '--workers', '0',
          '--no-progress', '--checkpoint-hist', '3', '--warmup-epochs', '0']


@pytest.fixture(scope='module')
def edropout_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('edropout') / 'run')
    proc = run_script(['--output', out] + DIGITS)
    return out, proc


def test_edropout_run_publishes_the_pruned_model_with_its_card(edropout_run):
    out, proc = edropout_run
    assert 'EDropout: EnergySearch(' in proc.stdout
    rows = json.load(open(os.path.join(out, 'metrics.json')))
    assert all(r['pruned_top1'] == r['top1'] for r in rows)  # removing the off channels is exact
    config = json.load(open(os.path.join(out, 'best', 'config.json')))
    assert config['architecture'] == 'resnet18_slim'
    widths = config['model_args']['block_widths']
    full = {k: 64 * 2 ** (int(k[5]) - 1) for k in widths}  # resnet18's inner widths: 64 in layer1 ... 512
    assert len(widths) == 8 and all(1 <= w <= full[k] for k, w in widths.items()) and sum(widths.values()) < sum(
        full.values())
    metrics = json.load(open(os.path.join(out, 'best', 'metrics.json')))
    assert metrics['pruned_from'] == 'resnet18' and metrics['pruning_method'] == 'edropout'
    assert metrics['top1'] == metrics['top1_before_pruning'] and metrics['edropout_steps'] > 0
    assert 0.2 < metrics['kept_channels'] < 0.8  # started at keep probability 0.5
    card = open(os.path.join(out, 'best', 'README.md')).read()
    assert '**Pruning:**' in card and 'Params (M), before -> after: 11.2 -> ' in card
    assert 'import dropcluster_timm.edropout  # registers the *_slim' in card
    # the folder loads as a plain timm ResNet, smaller, and evaluates to the recorded top-1
    model = timm.create_model(f'local-dir:{os.path.join(out, "best")}', pretrained=True)
    assert type(model).__name__ == 'ResNet' and model.layer1[0].conv1.out_channels == widths['layer1.0']
    assert sum(p.numel() for p in model.parameters()) < 0.8 * sum(
        p.numel() for p in timm.create_model('resnet18', num_classes=10).parameters())
    ev = run_script([os.path.join(out, 'best')], command=EVALUATE)
    assert f'{metrics["top1"]:.2f}' in ev.stdout


def test_edropout_resume_after_kill_matches_uninterrupted_run(edropout_run, tmp_path):
    full, _ = edropout_run
    out = str(tmp_path / 'killed')
    proc = run_script(['--output', out] + DIGITS, crash_at_step=7, check=False)
    assert proc.returncode != 0
    run_script(['--output', out, '--resume', out] + DIGITS)
    a = load_file(os.path.join(full, 'checkpoints', 'epoch_0001', 'model.safetensors'))
    b = load_file(os.path.join(out, 'checkpoints', 'epoch_0001', 'model.safetensors'))
    assert a.keys() == b.keys() and any(k.endswith('keep_state') for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # CPU, one process: bit for bit, the states included
    rows_a = json.load(open(os.path.join(full, 'metrics.json')))
    rows_b = json.load(open(os.path.join(out, 'metrics.json')))
    assert [r['edropout_kept'] for r in rows_a] == [r['edropout_kept'] for r in rows_b]


def test_two_process_gloo_edropout_run_agrees_on_the_state(tmp_path):
    dump = tmp_path / 'dump'
    dump.mkdir()
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    args = ['--output', str(tmp_path / 'out')] + DIGITS
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(free_port()), os.path.join(ROOT, 'tests', 'edropout_dist_worker.py'),
           str(dump)] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = torch.load(dump / 'rank0.pt'), torch.load(dump / 'rank1.pt')
    assert (r0['world_size'], r0['rank'], r1['rank']) == (2, 0, 1)
    assert r0['search']['step'] == r1['search']['step'] == 10  # every batch of 2 x 5
    assert torch.equal(r0['state'], r1['state']) and torch.equal(r0['state'], r0['search']['best_state'])
    for key in ('population', 'energies', 'best_state'):
        assert torch.equal(r0['search'][key], r1['search'][key]), key


@pytest.mark.parametrize('extra, words', [
    (['--edropout-candidates', '3'], ['--edropout-candidates', '>= 4']),
    (['--edropout-keep-prob', '0'], ['--edropout-keep-prob']),
    (['--edropout-batch', '64'], ['--edropout-batch 64', '--batch-size 16']),
    (['--model', 'resnext26ts'], ['--edropout', 'resnext26ts', 'layer1']),
    (['--model', 'resnet18_dropcluster'], ['--edropout', 'holds DropCluster2d']),
])
def test_edropout_bad_settings_fail_with_one_line(extra, words, tmp_path):
    out = str(tmp_path / 'bad')
    proc = run_script(['--output', out] + DIGITS + extra, check=False)
    assert_fails(proc, words, out)


def test_cluster_unit_run_publishes_a_dropcluster_model_and_resumes_exactly(tmp_path):
    # digits defaults for *_dropcluster: a stem DropCluster (16x16 maps, 16 clusters each) and stages 3-4
    args = [a if a != 'resnet18' else 'resnet18_dropcluster' for a in DIGITS] + [
        '--edropout-unit', 'cluster', '--drop-cluster-start', '0', '--drop-cluster-warmup', '0',
        '--edropout-interval', '3']  # step 7, where the run resumes, uses the state without evolving it
    full, killed = str(tmp_path / 'full'), str(tmp_path / 'killed')
    run_script(['--output', full] + args)
    config = json.load(open(os.path.join(full, 'best', 'config.json')))
    assert config['architecture'] == 'resnet18_dropcluster'  # nothing pruned
    rows = json.load(open(os.path.join(full, 'metrics.json')))
    assert 'pruned_top1' not in rows[0] and 0.2 < rows[-1]['edropout_kept'] < 1.0
    model = timm.create_model(f'local-dir:{os.path.join(full, "best")}', pretrained=True)  # a DropCluster checkpoint
    assert not any('keep_state' in k for k in model.state_dict())
    proc = run_script(['--output', killed] + args, crash_at_step=7, check=False)
    assert proc.returncode != 0
    run_script(['--output', killed, '--resume', killed] + args)
    a = load_file(os.path.join(full, 'checkpoints', 'epoch_0001', 'model.safetensors'))
    b = load_file(os.path.join(killed, 'checkpoints', 'epoch_0001', 'model.safetensors'))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the re-applied per-cluster state trained the same weights
    assert [r['train_loss'] for r in rows] == [r['train_loss'] for r in json.load(
        open(os.path.join(killed, 'metrics.json')))]
