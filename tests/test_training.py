""" train_timm.py and dropcluster_timm.training: schedule, distributed re-clustering, end-to-end runs,
resume after a kill, error cases. The runs are real processes on tiny generated ImageFolder data."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from dropcluster_timm import DropCluster2d, DropClusterSchedule, copy_cluster_state, update_clusters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'train_timm.py')


# ------------------------------------------------------------------------------------------------
# Schedule


def test_schedule_linear_ramp_stepped_per_batch():
    s = DropClusterSchedule(target=0.2, start_epoch=2, warmup_epochs=4, shape='linear', update_freq=3,
                            steps_per_epoch=10)
    rates = [s.step() for _ in range(80)]  # epochs 0.1 .. 8.0
    assert rates[:19] == [0.0] * 19  # before epoch 2
    assert rates[19] == 0.0 and rates[20] == pytest.approx(0.2 * 0.1 / 4)  # epoch 2.0, 2.1
    assert s.rate_at(4.0) == pytest.approx(0.1)
    assert all(b >= a for a, b in zip(rates, rates[1:]))  # monotone, one value per batch
    assert rates[59] == pytest.approx(0.2) and rates[-1] == pytest.approx(0.2)  # epoch 6 on
    assert s.epoch == pytest.approx(8.0)


def test_schedule_shapes_and_no_warmup():
    cos = DropClusterSchedule(0.1, start_epoch=0, warmup_epochs=2, shape='cosine')
    assert cos.rate_at(1.0) == pytest.approx(0.05)
    assert cos.rate_at(0.5) < 0.1 * 0.25  # eases in
    step = DropClusterSchedule(0.3, start_epoch=1, warmup_epochs=3, shape='step')
    assert [step.rate_at(e) for e in (0.5, 1.0, 1.9, 2.0, 3.2, 9.0)] == pytest.approx([0, 0.1, 0.1, 0.2, 0.3, 0.3])
    jump = DropClusterSchedule(0.1, start_epoch=5, warmup_epochs=0)
    assert jump.rate_at(4.99) == 0.0 and jump.rate_at(5.0) == 0.1
    assert DropClusterSchedule(0.0).rate_at(100) == 0.0
    for bad in (dict(target=1.0), dict(shape='exp'), dict(update_freq=-1), dict(start_epoch=-1)):
        with pytest.raises(ValueError):
            DropClusterSchedule(**bad)


def test_schedule_update_epochs():
    s = DropClusterSchedule(0.1, start_epoch=20, warmup_epochs=10, update_freq=10)
    assert [e for e in range(60) if s.is_update_epoch(e)] == [20, 30, 40, 50]
    assert not any(DropClusterSchedule(0.1, start_epoch=0, update_freq=0).is_update_epoch(e) for e in range(9))
    assert not any(DropClusterSchedule(0.0, start_epoch=0, update_freq=1).is_update_epoch(e) for e in range(9))


def test_schedule_state_dict_round_trip():
    a = DropClusterSchedule(0.15, start_epoch=1, warmup_epochs=2, shape='cosine', update_freq=2, steps_per_epoch=7)
    for _ in range(12):
        a.step()
    b = DropClusterSchedule()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.rate == a.rate
    assert [b.step() for _ in range(5)] == [a.step() for _ in range(5)]
    with pytest.raises(KeyError):
        b.load_state_dict({'bogus': 1})


# ------------------------------------------------------------------------------------------------
# Core behaviour the trainer relies on


def test_cluster_maps_update_in_place_when_shape_is_unchanged():
    layer = DropCluster2d(0.1, block_size=2, feat_size=(8, 8))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), layer)
    update_clusters(net, torch.randn(6, 3, 8, 8))  # grid (1, 8, 8) -> per channel (4, 8, 8): replaced
    buf_map, buf_counts = layer.cluster_map, layer.cluster_counts
    before = buf_map.clone()
    update_clusters(net, torch.randn(6, 3, 8, 8) * 5)
    assert layer.cluster_map is buf_map and layer.cluster_counts is buf_counts  # DDP's references stay valid
    assert not torch.equal(before, layer.cluster_map)
    # load_state_dict of same-shaped maps also copies in place
    layer.load_state_dict({'cluster_map': before, 'cluster_counts': before.flatten(1).amax(1) + 1})
    assert layer.cluster_map is buf_map and torch.equal(layer.cluster_map, before.to(buf_map.dtype))


def test_copy_cluster_state_follows_shape_changes():
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), DropCluster2d(0.1, block_size=2))
    b = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), DropCluster2d(0.1, block_size=2))
    update_clusters(a, torch.randn(6, 3, 8, 8))
    assert copy_cluster_state(a, b) == 1
    assert torch.equal(a[1].cluster_map, b[1].cluster_map) and b[1].max_clusters == a[1].max_clusters
    assert b[1].cluster_map.data_ptr() != a[1].cluster_map.data_ptr()  # a copy, not an alias
    before = b[1].cluster_map.clone()
    update_clusters(a, torch.randn(6, 3, 8, 8) * 3)
    assert torch.equal(b[1].cluster_map, before)


# ------------------------------------------------------------------------------------------------
# Real runs


def make_image_folder(root, classes=3, train_per_class=12, val_per_class=4, size=16, seed=0):
    """ImageFolder train/ and validation/ splits of small PNG and JPEG images, classes by colour."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)][:classes]
    for split, n in (('train', train_per_class), ('validation', val_per_class)):
        for c, colour in enumerate(colours):
            folder = os.path.join(root, split, f'class_{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.randn(size, size, 3) * 40, 0, 255).astype(np.uint8)
                ext = 'png' if i % 2 else 'jpg'
                Image.fromarray(img).save(os.path.join(folder, f'{i}.{ext}'))
    return str(root)


TINY = ['--img-size', '32', '--batch-size', '8', '--epochs', '3', '--lr', '0.01', '--warmup-epochs', '0',
        '--drop-cluster', '0.2', '--drop-cluster-start', '1', '--drop-cluster-warmup', '1',
        '--drop-cluster-update-freq', '1', '--drop-cluster-update-batches', '1', '--model', 'resnet18_dropcluster',
        '--num-clusters', '2',
        '--workers', '0', '--no-progress']


def run_script(args, env=None, check=True, timeout=300):
    full_env = dict(os.environ, PYTHONUNBUFFERED='1')
    full_env.pop('DROPCLUSTER_TIMM_CRASH_AT_STEP', None)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f'train_timm.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def full_run(image_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('runs') / 'full')
    run_script([image_folder, '--output', out] + TINY)
    return out


def _load_checkpoint_clusters(folder):
    from safetensors.torch import load_file
    sd = load_file(os.path.join(folder, 'model.safetensors'))
    return {k: v for k, v in sd.items() if 'cluster' in k}, sd


def test_end_to_end_image_folder_writes_every_output(full_run, image_folder):
    out = full_run
    for name in ('run.json', 'metrics.json', 'metrics.csv', 'cluster_maps.png'):
        assert os.path.isfile(os.path.join(out, name)), name
    for model_dir in ('best', 'last'):
        for name in ('config.json', 'model.safetensors', 'README.md', 'cluster_maps.png'):
            assert os.path.isfile(os.path.join(out, model_dir, name)), (model_dir, name)
        config = json.load(open(os.path.join(out, model_dir, 'config.json')))
        assert config['architecture'] == 'resnet18_dropcluster' and config['num_classes'] == 3
        clusters, _ = _load_checkpoint_clusters(os.path.join(out, model_dir))
        assert any(k.endswith('cluster_map') for k in clusters)
    metrics = json.load(open(os.path.join(out, 'metrics.json')))
    assert [m['epoch'] for m in metrics] == [0, 1, 2]
    for key in ('train_loss', 'eval_loss', 'top1', 'top5', 'drop_rate', 'lr', 'epoch_time', 'reclustered'):
        assert key in metrics[0]
    assert [m['reclustered'] for m in metrics] == [False, True, True]
    assert metrics[0]['drop_rate'] == 0.0 and metrics[-1]['drop_rate'] == pytest.approx(0.2)
    assert metrics[-1]['top1'] > 100 / 3  # colours are easy
    card = open(os.path.join(out, 'last', 'README.md')).read()
    assert f"{metrics[-1]['top1']:.1f}"[:3] in card or str(round(metrics[-1]['top1'], 2))[:3] in card
    # the last model holds the maps of the last re-clustering (per channel, not the initial grid)
    clusters, _ = _load_checkpoint_clusters(os.path.join(out, 'last'))
    assert clusters['layer3.0.drop_block.cluster_map'].shape[0] > 1
    ckpts = sorted(os.listdir(os.path.join(out, 'checkpoints')))
    assert ckpts == ['epoch_0001', 'epoch_0002']  # --checkpoint-hist 2, no temporary folders left
    # evaluation on its own, of the best model
    proc = subprocess.run([sys.executable, '-m', 'dropcluster_timm.training', os.path.join(out, 'best'),
                           '--data-dir', image_folder], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    best = max(m['top1'] for m in metrics)
    top1 = float(proc.stdout.split()[1])
    assert top1 == pytest.approx(best, abs=0.01)


def test_evaluate_entry_point_reports_corruptions(full_run, image_folder, tmp_path):
    """``train_timm.py evaluate FOLDER --corruptions``: clean top-1 as the plain evaluation, a full
    corruption table, JSON output, and a one-line error for an unknown corruption."""
    best = os.path.join(full_run, 'best')
    plain = run_script(['evaluate', best, '--data-dir', image_folder])
    plain_top1 = float(plain.stdout.split()[1])
    out = str(tmp_path / 'corruptions.json')
    proc = run_script(['evaluate', best, '--data-dir', image_folder, '--corruptions', 'all', '--json', out])
    report = json.load(open(out))
    assert report['top1'] == pytest.approx(plain_top1, abs=0.01)
    assert report['num_images'] == 12 and len(report['corruptions']) == 8
    assert 'mean corruption top1' in proc.stdout and 'gaussian_noise' in proc.stdout
    again = str(tmp_path / 'again.json')
    run_script(['evaluate', best, '--data-dir', image_folder, '--corruptions', 'all', '--json', again])
    assert json.load(open(again)) == report  # deterministic for the default seed
    bad = run_script(['evaluate', best, '--data-dir', image_folder, '--corruptions', 'fog'], check=False)
    _assert_fails(bad, ['unknown corruption', 'fog'])


def test_resume_after_kill_matches_uninterrupted_run(full_run, image_folder, tmp_path):
    out = str(tmp_path / 'killed')
    # 36 images / batch 8 = 4 batches per epoch: step 10 is in the middle of epoch 2 (0-based)
    proc = run_script([image_folder, '--output', out] + TINY, env={'DROPCLUSTER_TIMM_CRASH_AT_STEP': '10'},
                      check=False)
    assert proc.returncode != 0  # killed by SIGKILL
    assert sorted(os.listdir(os.path.join(out, 'checkpoints'))) == ['epoch_0000', 'epoch_0001']
    run_script([image_folder, '--output', out, '--resume', out] + TINY)
    a_clusters, a_sd = _load_checkpoint_clusters(os.path.join(full_run, 'last'))
    b_clusters, b_sd = _load_checkpoint_clusters(os.path.join(out, 'last'))
    assert a_clusters.keys() == b_clusters.keys()
    assert all(torch.equal(a_clusters[k], b_clusters[k]) for k in a_clusters)
    assert all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)  # CPU, one process: bit for bit
    a_meta = json.load(open(os.path.join(full_run, 'checkpoints', 'epoch_0002', 'meta.json')))
    b_meta = json.load(open(os.path.join(out, 'checkpoints', 'epoch_0002', 'meta.json')))
    assert a_meta['global_step'] == b_meta['global_step'] == 12
    a_rows = json.load(open(os.path.join(full_run, 'metrics.json')))
    b_rows = json.load(open(os.path.join(out, 'metrics.json')))
    for a, b in zip(a_rows, b_rows):
        assert a['drop_rate'] == b['drop_rate'] and a['top1'] == b['top1'] and a['train_loss'] == b['train_loss']
    assert len(a_rows) == len(b_rows) == 3


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_has_identical_cluster_maps(image_folder, tmp_path):
    dump = tmp_path / 'dump'
    dump.mkdir()
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('DROPCLUSTER_TIMM_CRASH_AT_STEP', None)
    args = [image_folder, '--output', str(tmp_path / 'out'), '--grad-accum-steps', '2', '--model-ema'] + TINY
    args[args.index('--epochs') + 1] = '2'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(_free_port()), os.path.join(ROOT, 'tests', 'dist_worker.py'), str(dump)] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = torch.load(dump / 'rank0.pt'), torch.load(dump / 'rank1.pt')
    assert (r0['world_size'], r1['world_size'], r0['rank'], r1['rank']) == (2, 2, 0, 1)
    assert r0['grad_accum'] == 2
    assert r0['reclustered'] == [False, True]
    for key in ('after_training', 'after_update', 'ema'):
        assert r0[key].keys() == r1[key].keys() and len(r0[key]) > 0
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), (key, name)
    assert r0['after_training'].keys() == r0['ema'].keys()
    assert all(torch.equal(r0['after_training'][k], r0['ema'][k]) for k in r0['ema'])
    # re-clustered from data: per-channel maps, not the grid, and the extra update changed them
    first = next(iter(r0['after_update']))
    assert r0['after_update'][first].shape[0] > 1 and int(r0['after_training'][first].max()) > 0
    assert not torch.equal(r0['after_update'][first], r0['after_training'][first])
    assert r0['step'] == r1['step'] and r0['rate'] == r1['rate']


# ------------------------------------------------------------------------------------------------
# Errors: one line, non-zero exit, nothing half written


def _assert_fails(proc, words, out=None):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert all(w in lines[-1] for w in words), lines[-1]
    if out is not None:
        ckpt = os.path.join(out, 'checkpoints')
        assert not os.path.exists(ckpt) or not any(n.startswith('.tmp') for n in os.listdir(ckpt))


def test_error_missing_data_folder(tmp_path):
    proc = run_script([str(tmp_path / 'nope'), '--output', str(tmp_path / 'o')] + TINY, check=False)
    _assert_fails(proc, ['data folder', 'does not exist'])
    assert not os.path.exists(tmp_path / 'o' / 'checkpoints')


def test_error_unknown_model(image_folder, tmp_path):
    proc = run_script([image_folder, '--output', str(tmp_path / 'o')] + TINY + ['--model', 'resnet18_dropclustr'],
                      check=False)
    _assert_fails(proc, ['unknown model', 'resnet18_dropclustr'])


def test_error_class_count_mismatch(image_folder, tmp_path):
    proc = run_script([image_folder, '--output', str(tmp_path / 'o'), '--num-classes', '5'] + TINY, check=False)
    _assert_fails(proc, ['--num-classes 5', '3 classes'])


def test_error_incompatible_resume(full_run, image_folder, tmp_path):
    proc = run_script([image_folder, '--output', str(tmp_path / 'o'), '--resume', full_run] + TINY
                      + ['--model', 'resnet34_dropcluster'], check=False)
    _assert_fails(proc, ['cannot resume', 'resnet18_dropcluster', 'resnet34_dropcluster'], str(tmp_path / 'o'))
    assert not os.path.exists(tmp_path / 'o' / 'checkpoints')


def test_error_output_folder_holds_another_run(full_run, image_folder):
    before = sorted(os.listdir(os.path.join(full_run, 'checkpoints')))
    proc = run_script([image_folder, '--output', full_run] + TINY, check=False)
    _assert_fails(proc, ['already holds another run', '--resume'])
    assert sorted(os.listdir(os.path.join(full_run, 'checkpoints'))) == before


def test_error_push_without_credentials(image_folder, tmp_path):
    env = {'HF_TOKEN': '', 'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1'}
    proc = run_script([image_folder, '--output', str(tmp_path / 'o'), '--push-to-hub', 'me/model'] + TINY,
                      env=env, check=False)
    _assert_fails(proc, ['--push-to-hub', 'credentials'])
    assert not os.path.exists(tmp_path / 'o')


# ------------------------------------------------------------------------------------------------
# Correctness for real users (issue 10): splits, schedule defaults, EMA, recovery, early errors


def _import_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location('train_timm_script', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _relayout(root, renames):
    """Rename split folders of an ImageFolder root, e.g. {'validation': 'test'}."""
    for old, new in renames.items():
        os.rename(os.path.join(root, old), os.path.join(root, new))
    return root


@pytest.fixture(scope='module')
def train_test_folder(tmp_path_factory):
    """CIFAR's layout: train/ and test/, no validation/ folder."""
    return _relayout(make_image_folder(tmp_path_factory.mktemp('cifar_layout')), {'validation': 'test'})


def test_validation_split_is_found_by_name_never_the_whole_root(train_test_folder, tmp_path):
    from types import SimpleNamespace
    from dropcluster_timm.training import TrainingError, build_data
    args = SimpleNamespace(dataset='', data_dir=train_test_folder, train_split='train', val_split='validation',
                           num_classes=None)
    data = build_data(args)
    assert os.path.basename(data.splits['validation']) == 'test' and len(data.eval) == 12  # not all 48 images
    assert os.path.basename(data.splits['train']) == 'train' and len(data.train) == 36
    # no held-out folder by any known name: refused, listing the folders and the flag
    other = _relayout(make_image_folder(tmp_path / 'holdout'), {'validation': 'holdout'})
    with pytest.raises(TrainingError, match=r"folders found: holdout, train\); name one with --val-split"):
        build_data(SimpleNamespace(**dict(vars(args), data_dir=other)))
    assert len(build_data(SimpleNamespace(**dict(vars(args), data_dir=other, val_split='holdout'))).eval) == 12
    with pytest.raises(TrainingError, match='overlaps the training split'):
        build_data(SimpleNamespace(**dict(vars(args), val_split='train')))
    # no train folder either: never the root
    with pytest.raises(TrainingError, match='--train-split'):
        build_data(SimpleNamespace(**dict(vars(args), data_dir=os.path.join(train_test_folder, 'test'))))


def test_train_and_evaluate_use_the_test_folder_of_a_train_test_layout(train_test_folder, tmp_path):
    out = str(tmp_path / 'run')
    tiny = list(TINY)
    tiny[tiny.index('--epochs') + 1] = '1'
    proc = run_script([train_test_folder, '--output', out] + tiny)
    assert f'validation {os.path.join(train_test_folder, "test")} (12 images)' in proc.stdout
    run = json.load(open(os.path.join(out, 'run.json')))
    assert run['data']['validation'] == os.path.join(train_test_folder, 'test')
    ev = run_script(['evaluate', os.path.join(out, 'best'), '--data-dir', train_test_folder])
    assert f'(12 images of {os.path.join(train_test_folder, "test")})' in ev.stdout
    # without data arguments a model trained on an ImageFolder asks for them (no digits fallback)
    bad = run_script(['evaluate', os.path.join(out, 'best')], check=False)
    _assert_fails(bad, ['--data-dir', os.path.basename(train_test_folder)])
    holdout = _relayout(make_image_folder(tmp_path / 'holdout'), {'validation': 'holdout'})
    bad = run_script(['evaluate', os.path.join(out, 'best'), '--data-dir', holdout], check=False)
    _assert_fails(bad, ['holdout, train', '--split'])


def test_drop_cluster_defaults_follow_the_run_length(tmp_path):
    script = _import_script()
    args = script.parse_args(['--data-dir', str(tmp_path), '--epochs', '10'])
    assert (args.drop_cluster_start, args.drop_cluster_warmup, args.drop_cluster_update_freq) == (2, 1, 1)
    args = script.parse_args(['--data-dir', str(tmp_path)])  # 100 epochs: the reference recipe
    assert (args.drop_cluster_start, args.drop_cluster_warmup, args.drop_cluster_update_freq) == (20, 10, 10)
    args = script.parse_args([])  # the digits: 12 epochs
    assert (args.drop_cluster_start, args.drop_cluster_warmup, args.drop_cluster_update_freq) == (3, 3, 3)
    args = script.parse_args(['--epochs', '4', '--drop-cluster-start', '0'])
    assert (args.drop_cluster_start, args.drop_cluster_warmup, args.drop_cluster_update_freq) == (0, 1, 1)
    for epochs in (1, 2, 5, 20, 300):
        args = script.parse_args(['--data-dir', str(tmp_path), '--epochs', str(epochs)])
        schedule = DropClusterSchedule(args.drop_cluster, args.drop_cluster_start, args.drop_cluster_warmup,
                                       update_freq=args.drop_cluster_update_freq, steps_per_epoch=10)
        assert schedule.peak_rate(epochs) == pytest.approx(args.drop_cluster), epochs
        # clusters are re-computed at epoch starts: a one-epoch run has none after its start
        assert bool(schedule.update_epochs(epochs)) == (epochs > 1), epochs


def test_schedule_warnings_name_what_never_happens():
    from dropcluster_timm.training import schedule_warnings
    never = DropClusterSchedule(0.1, start_epoch=20, warmup_epochs=10, update_freq=10, steps_per_epoch=5)
    assert never.peak_rate(20) == 0.0 and never.update_epochs(20) == []
    (warning,) = schedule_warnings(never, 20)
    assert 'never switches on' in warning and '--drop-cluster-start 20' in warning
    partial = DropClusterSchedule(0.1, start_epoch=2, warmup_epochs=10, update_freq=0, steps_per_epoch=5)
    text = ' '.join(schedule_warnings(partial, 4))
    assert 'reaches only' in text and 'never re-computed' in text
    assert partial.peak_rate(4) == pytest.approx(partial.rate_at(3.8))
    fine = DropClusterSchedule(0.1, start_epoch=1, warmup_epochs=1, update_freq=1, steps_per_epoch=5)
    assert schedule_warnings(fine, 4) == []
    assert 'stay off' in schedule_warnings(DropClusterSchedule(0.0), 4)[0]


def test_run_records_what_dropcluster_really_did(image_folder, tmp_path):
    # DropCluster starts after the last epoch: a warning, and run.json / the card say it never switched on
    off = str(tmp_path / 'off')
    tiny = [a for a in TINY]
    tiny[tiny.index('--epochs') + 1] = '1'
    proc = run_script([image_folder, '--output', off] + tiny + ['--drop-cluster-start', '5'])
    assert 'warning: DropCluster never switches on' in proc.stdout
    run = json.load(open(os.path.join(off, 'run.json')))
    assert run['dropcluster']['peak_rate'] == 0.0 and run['dropcluster']['reclusterings'] == 0
    assert run['progress']['epochs_done'] == 1
    card_metrics = json.load(open(os.path.join(off, 'best', 'metrics.json')))
    assert card_metrics['peak_drop_rate'] == 0.0 and card_metrics['reclusterings'] == 0
    card = open(os.path.join(off, 'best', 'README.md')).read()
    assert 'never switched on' in card and 'trained with DropCluster' not in card


def test_run_record_of_full_run(full_run):
    run = json.load(open(os.path.join(full_run, 'run.json')))
    assert run['dropcluster']['peak_rate'] == pytest.approx(0.2) and run['dropcluster']['reclusterings'] == 2
    assert run['progress']['epochs_done'] == 3 and run['args']['model'] == 'resnet18_dropcluster'
    card = open(os.path.join(full_run, 'last', 'README.md')).read()
    assert 'trained with DropCluster' in card


def test_ema_weights_are_picked_and_published(image_folder, tmp_path):
    out = str(tmp_path / 'ema')
    run_script([image_folder, '--output', out, '--model-ema', '--model-ema-decay', '0.9'] + TINY)
    rows = json.load(open(os.path.join(out, 'metrics.json')))
    best_epoch = max(rows, key=lambda r: r['ema_top1'])['epoch']  # first maximum, as the run picks
    best = json.load(open(os.path.join(out, 'best', 'metrics.json')))
    assert best['weights'] == 'ema' and best['ema_decay'] == 0.9 and best['epoch'] == best_epoch
    assert best['top1'] == rows[best_epoch]['ema_top1']
    # last/ holds the EMA weights of the last checkpoint, not the raw ones
    from safetensors.torch import load_file
    published = load_file(os.path.join(out, 'last', 'model.safetensors'))
    ckpt = os.path.join(out, 'checkpoints', 'epoch_0002')
    raw = load_file(os.path.join(ckpt, 'model.safetensors'))
    ema_state = torch.load(os.path.join(ckpt, 'custom_checkpoint_3.pkl'), weights_only=False)  # registered 4th
    ema_params = {k[len('module.'):]: v for k, v in ema_state.items() if k.startswith('module.')}
    key = 'fc.weight'
    assert torch.equal(published[key], ema_params[key]) and not torch.equal(published[key], raw[key])
    assert 'exponential moving average' in open(os.path.join(out, 'last', 'README.md')).read().lower()


def test_run_killed_in_its_first_epoch_can_be_resumed_or_rerun(image_folder, tmp_path):
    out = str(tmp_path / 'early')
    tiny = list(TINY)
    tiny[tiny.index('--epochs') + 1] = '2'
    proc = run_script([image_folder, '--output', out] + tiny, env={'DROPCLUSTER_TIMM_CRASH_AT_STEP': '2'},
                      check=False)
    assert proc.returncode != 0 and os.path.isfile(os.path.join(out, 'run.json'))
    assert not os.path.exists(os.path.join(out, 'checkpoints'))
    resumed = run_script([image_folder, '--output', out, '--resume', out] + tiny)
    assert 'starting over' in resumed.stdout
    assert [r['epoch'] for r in json.load(open(os.path.join(out, 'metrics.json')))] == [0, 1]
    # a fresh run may also reuse a folder whose run stopped before its first checkpoint
    again = str(tmp_path / 'again')
    run_script([image_folder, '--output', again] + tiny, env={'DROPCLUSTER_TIMM_CRASH_AT_STEP': '2'}, check=False)
    run_script([image_folder, '--output', again] + tiny)
    assert sorted(os.listdir(os.path.join(again, 'checkpoints'))) == ['epoch_0000', 'epoch_0001']


@pytest.mark.parametrize('extra, words', [
    (['--drop-cluster', '1.5'], ['--drop-cluster', 'in [0, 1)', '1.5']),
    (['--drop-cluster', '-0.1'], ['--drop-cluster', '-0.1']),
    (['--epochs', '0'], ['--epochs', '>= 1']),
])
def test_bad_settings_fail_early_with_one_line(image_folder, tmp_path, extra, words):
    out = tmp_path / 'o'
    proc = run_script([image_folder, '--output', str(out)] + TINY + extra, check=False)
    _assert_fails(proc, words)
    assert not out.exists()


def test_output_naming_a_file_fails_with_one_line(image_folder, tmp_path):
    target = tmp_path / 'taken'
    target.write_text('keep me')
    for output in (target, target / 'sub'):
        proc = run_script([image_folder, '--output', str(output)] + TINY, check=False)
        _assert_fails(proc, ['--output', 'is a file'])
    assert target.read_text() == 'keep me'


def test_corrupt_checkpoint_file_fails_with_one_line(full_run, image_folder, tmp_path):
    import shutil
    out = str(tmp_path / 'copy')
    shutil.copytree(full_run, out)
    optimizer = os.path.join(out, 'checkpoints', 'epoch_0002', 'optimizer.bin')
    data = open(optimizer, 'rb').read()
    open(optimizer, 'wb').write(data[:len(data) // 2])
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in ('run.json', 'metrics.json')}
    proc = run_script([image_folder, '--output', out, '--resume', out] + TINY, check=False)
    _assert_fails(proc, ['cannot resume', 'optimizer.bin', 'damaged'])
    assert before == {n: os.path.getmtime(os.path.join(out, n)) for n in before}  # nothing rewritten


def test_no_progress_bars_in_logs_and_readable_help(image_folder, tmp_path):
    tiny = [a for a in TINY if a != '--no-progress']
    tiny[tiny.index('--epochs') + 1] = '1'
    proc = run_script([image_folder, '--output', str(tmp_path / 'o')] + tiny)  # stderr is a pipe, not a terminal
    assert '\r' not in proc.stderr and 'it/s' not in proc.stderr and 's/it' not in proc.stderr
    assert 'epoch 0 train_loss' in proc.stdout  # the plain line per epoch
    usage = run_script(['--help']).stdout
    assert '--input-size C H W' in usage and 'C H W C H W' not in usage


def test_single_cpu_process_uses_the_cores():
    code = ('import os, torch; from accelerate import Accelerator; from dropcluster_timm.training import use_cpu_cores; '
            'acc = Accelerator(cpu=True); print(use_cpu_cores(acc), len(os.sched_getaffinity(0)))')
    env = dict(os.environ, OMP_NUM_THREADS='1')  # what `accelerate launch` sets for one process
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    threads, cores = map(int, proc.stdout.split())
    assert threads == cores


def test_plain_timm_model_run_is_not_labelled_dropcluster(image_folder, tmp_path):
    out = str(tmp_path / 'plain')
    tiny = [a for a in TINY if a not in ('--num-clusters', '2')]
    tiny[tiny.index('--epochs') + 1] = '1'
    tiny[tiny.index('--model') + 1] = 'resnet18'
    proc = run_script([image_folder, '--output', out] + tiny + ['--drop-block', '0.1'])
    assert 'no DropCluster layers' in proc.stdout  # the --drop-cluster warning
    config = json.load(open(os.path.join(out, 'best', 'config.json')))
    assert config['architecture'] == 'resnet18' and 'drop_cluster_prob' not in config.get('model_args', {})
    card = open(os.path.join(out, 'best', 'README.md')).read()
    assert 'DropBlock (rate 0.1)' in card and 'trained with DropCluster' not in card
    run = json.load(open(os.path.join(out, 'run.json')))
    assert 'dropcluster' not in run
