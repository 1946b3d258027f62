""" End-to-end training runs: ``train_timm.py`` (and ``accelerate launch`` with two CPU processes over
gloo) on tiny generated ImageFolder data; every output, resume after a kill, one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from run_helpers import (
    ROOT, TINY, assert_fails, free_port, load_checkpoint_clusters, make_image_folder, relayout, run_in_process,
    run_script)

EVALUATE = [sys.executable, '-m', 'dropcluster_timm', 'evaluate']


def test_end_to_end_image_folder_writes_every_output(full_run, image_folder):
    out = full_run
    for name in ('run.json', 'metrics.json', 'metrics.csv'):
        assert os.path.isfile(os.path.join(out, name)), name
    for model_dir in ('best', 'last'):
        for name in ('config.json', 'model.safetensors', 'README.md', 'cluster_maps.png'):
            assert os.path.isfile(os.path.join(out, model_dir, name)), (model_dir, name)
        config = json.load(open(os.path.join(out, model_dir, 'config.json')))
        assert config['architecture'] == 'resnet18_dropcluster' and config['num_classes'] == 3
        clusters, _ = load_checkpoint_clusters(os.path.join(out, model_dir))
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
    clusters, _ = load_checkpoint_clusters(os.path.join(out, 'last'))
    assert clusters['layer3.0.drop_block.cluster_map'].shape[0] > 1
    ckpts = sorted(os.listdir(os.path.join(out, 'checkpoints')))
    assert ckpts == ['epoch_0001', 'epoch_0002']  # --checkpoint-hist 2, no temporary folders left
    # evaluation on its own, of the best model
    proc = run_script([os.path.join(out, 'best'), '--data-dir', image_folder], command=EVALUATE)
    best = max(m['top1'] for m in metrics)
    top1 = float(proc.stdout.split()[1])
    assert top1 == pytest.approx(best, abs=0.01)


def test_resume_after_kill_matches_uninterrupted_run(full_run, image_folder, tmp_path):
    out = str(tmp_path / 'killed')
    # 36 images / batch 8 = 4 batches per epoch: step 10 is in the middle of epoch 2 (0-based)
    proc = run_script([image_folder, '--output', out] + TINY, crash_at_step=10, check=False)
    assert proc.returncode != 0  # killed by SIGKILL
    assert sorted(os.listdir(os.path.join(out, 'checkpoints'))) == ['epoch_0000', 'epoch_0001']
    run_script([image_folder, '--output', out, '--resume', out] + TINY)
    a_clusters, a_sd = load_checkpoint_clusters(os.path.join(full_run, 'last'))
    b_clusters, b_sd = load_checkpoint_clusters(os.path.join(out, 'last'))
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


def test_two_process_gloo_run_has_identical_cluster_maps(image_folder, tmp_path):
    dump = tmp_path / 'dump'
    dump.mkdir()
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    # Per-map counts (gap statistic) must reach every rank too.
    args = [image_folder, '--output', str(tmp_path / 'out'), '--grad-accum-steps', '2', '--model-ema',
            '--cluster-count', 'gap'] + TINY
    args[args.index('--epochs') + 1] = '2'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(free_port()), os.path.join(ROOT, 'tests', 'dist_worker.py'), str(dump)] + args
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
    assert r0['counts'].keys() == r1['counts'].keys()
    for name in r0['counts']:
        assert torch.equal(r0['counts'][name], r1['counts'][name]), name
    assert r0['after_training'].keys() == r0['ema'].keys()
    assert all(torch.equal(r0['after_training'][k], r0['ema'][k]) for k in r0['ema'])
    # re-clustered from data: per-channel maps, not the grid, and the extra update changed them
    first = max(r0['after_update'], key=lambda name: r0['after_update'][name][0].numel())  # the stem's
    assert r0['after_update'][first].shape[0] > 1 and int(r0['after_training'][first].max()) > 0
    assert not torch.equal(r0['after_update'][first], r0['after_training'][first])
    assert r0['step'] == r1['step'] and r0['rate'] == r1['rate']


def test_error_missing_data_folder(tmp_path):
    proc = run_script([str(tmp_path / 'nope'), '--output', str(tmp_path / 'o')] + TINY, check=False)
    assert_fails(proc, ['data folder', 'does not exist'])
    assert not os.path.exists(tmp_path / 'o' / 'checkpoints')


def test_error_unknown_model(image_folder, tmp_path):
    proc = run_in_process([image_folder, '--output', str(tmp_path / 'o')] + TINY + ['--model', 'resnet18_dropclustr'])
    assert_fails(proc, ['unknown model', 'resnet18_dropclustr'])


def test_error_class_count_mismatch(image_folder, tmp_path):
    proc = run_in_process([image_folder, '--output', str(tmp_path / 'o'), '--num-classes', '5'] + TINY)
    assert_fails(proc, ['--num-classes 5', '3 classes'])


def test_error_incompatible_resume(full_run, image_folder, tmp_path):
    proc = run_in_process([image_folder, '--output', str(tmp_path / 'o'), '--resume', full_run] + TINY
                          + ['--model', 'resnet34_dropcluster'])
    assert_fails(proc, ['cannot resume', 'resnet18_dropcluster', 'resnet34_dropcluster'], str(tmp_path / 'o'))
    assert not os.path.exists(tmp_path / 'o' / 'checkpoints')


def test_error_output_folder_holds_another_run(full_run, image_folder):
    before = sorted(os.listdir(os.path.join(full_run, 'checkpoints')))
    proc = run_script([image_folder, '--output', full_run] + TINY, check=False)
    assert_fails(proc, ['already holds another run', '--resume'])
    assert sorted(os.listdir(os.path.join(full_run, 'checkpoints'))) == before


def test_error_push_without_credentials(image_folder, tmp_path):
    env = {'HF_TOKEN': '', 'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1'}
    proc = run_script([image_folder, '--output', str(tmp_path / 'o'), '--push-to-hub', 'me/model'] + TINY,
                      env=env, check=False)
    assert_fails(proc, ['--push-to-hub', 'credentials'])
    assert not os.path.exists(tmp_path / 'o')


def test_train_and_evaluate_use_the_test_folder_of_a_train_test_layout(train_test_folder, tmp_path):
    out = str(tmp_path / 'run')
    tiny = list(TINY)
    tiny[tiny.index('--epochs') + 1] = '1'
    proc = run_script([train_test_folder, '--output', out] + tiny)
    assert f'validation {os.path.join(train_test_folder, "test")} (12 images)' in proc.stdout
    run = json.load(open(os.path.join(out, 'run.json')))
    assert run['data']['validation'] == os.path.join(train_test_folder, 'test')
    ev = run_script([os.path.join(out, 'best'), '--data-dir', train_test_folder], command=EVALUATE)
    assert f'(12 images of {os.path.join(train_test_folder, "test")})' in ev.stdout
    # without data arguments a model trained on an ImageFolder asks for them (no digits fallback)
    bad = run_in_process([os.path.join(out, 'best')], command='evaluate')
    assert_fails(bad, ['--data-dir', os.path.basename(train_test_folder)])
    holdout = relayout(make_image_folder(tmp_path / 'holdout'), {'validation': 'holdout'})
    bad = run_in_process([os.path.join(out, 'best'), '--data-dir', holdout], command='evaluate')
    assert_fails(bad, ['holdout, train', '--split'])


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
    assert run['progress']['epochs_done'] == 3 and run['config']['model']['name'] == 'resnet18_dropcluster'
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
    run_state = load_file(os.path.join(ckpt, 'run_state.safetensors'))  # the EMA's tensors: 'ema.module.*'
    ema_params = {k[len('ema.module.'):]: v for k, v in run_state.items() if k.startswith('ema.module.')}
    key = 'fc.weight'
    assert torch.equal(published[key], ema_params[key]) and not torch.equal(published[key], raw[key])
    assert 'exponential moving average' in open(os.path.join(out, 'last', 'README.md')).read().lower()


def test_run_killed_in_its_first_epoch_can_be_resumed_or_rerun(image_folder, tmp_path):
    out = str(tmp_path / 'early')
    tiny = list(TINY)
    tiny[tiny.index('--epochs') + 1] = '2'
    proc = run_script([image_folder, '--output', out] + tiny, crash_at_step=2, check=False)
    assert proc.returncode != 0 and os.path.isfile(os.path.join(out, 'run.json'))
    assert not os.path.exists(os.path.join(out, 'checkpoints'))
    resumed = run_script([image_folder, '--output', out, '--resume', out] + tiny)
    assert 'starting over' in resumed.stdout
    assert [r['epoch'] for r in json.load(open(os.path.join(out, 'metrics.json')))] == [0, 1]
    # a fresh run may also reuse a folder whose run stopped before its first checkpoint
    again = str(tmp_path / 'again')
    run_script([image_folder, '--output', again] + tiny, crash_at_step=2, check=False)
    run_script([image_folder, '--output', again] + tiny)
    assert sorted(os.listdir(os.path.join(again, 'checkpoints'))) == ['epoch_0000', 'epoch_0001']


@pytest.mark.parametrize('extra, words', [
    (['--drop-cluster', '1.5'], ['--drop-cluster', 'in [0, 1)', '1.5']),
    (['--drop-cluster', '-0.1'], ['--drop-cluster', '-0.1']),
    (['--epochs', '0'], ['--epochs', '>= 1']),
])
def test_bad_settings_fail_early_with_one_line(image_folder, tmp_path, extra, words):
    out = tmp_path / 'o'
    proc = run_in_process([image_folder, '--output', str(out)] + TINY + extra)
    assert_fails(proc, words)
    assert not out.exists()


def test_output_naming_a_file_fails_with_one_line(image_folder, tmp_path):
    target = tmp_path / 'taken'
    target.write_text('keep me')
    for output in (target, target / 'sub'):
        proc = run_in_process([image_folder, '--output', str(output)] + TINY)
        assert_fails(proc, ['--output', 'is a file'])
    assert target.read_text() == 'keep me'


def test_corrupt_checkpoint_file_fails_with_one_line(full_run, image_folder, tmp_path):
    import shutil
    out = str(tmp_path / 'copy')
    shutil.copytree(full_run, out)
    optimizer = os.path.join(out, 'checkpoints', 'epoch_0002', 'optimizer.bin')
    data = open(optimizer, 'rb').read()
    open(optimizer, 'wb').write(data[:len(data) // 2])
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in ('run.json', 'metrics.json')}
    proc = run_in_process([image_folder, '--output', out, '--resume', out] + TINY)
    assert_fails(proc, ['cannot resume', 'optimizer.bin', 'damaged'])
    assert before == {n: os.path.getmtime(os.path.join(out, n)) for n in before}  # nothing rewritten


def test_no_progress_bars_in_logs_and_readable_help(image_folder, tmp_path):
    tiny = [a for a in TINY if a != '--no-progress']
    tiny[tiny.index('--epochs') + 1] = '1'
    proc = run_script([image_folder, '--output', str(tmp_path / 'o')] + tiny)  # stderr is a pipe, not a terminal
    assert '\r' not in proc.stderr and 'it/s' not in proc.stderr and 's/it' not in proc.stderr
    assert 'epoch 0 train_loss' in proc.stdout  # the plain line per epoch
    usage = run_script(['--help']).stdout
    assert '--input-size C H W' in usage and 'C H W C H W' not in usage


def test_plain_timm_model_run_is_not_labelled_dropcluster(image_folder, tmp_path):
    out = str(tmp_path / 'plain')
    tiny = list(TINY)
    del tiny[tiny.index('--num-clusters'):tiny.index('--num-clusters') + 2]
    tiny[tiny.index('--epochs') + 1] = '1'
    tiny[tiny.index('--model') + 1] = 'resnet18'
    proc = run_script([image_folder, '--output', out] + tiny + ['--drop-block', '0.1'])
    assert 'no DropCluster layers' in proc.stdout  # the --drop-cluster warning
    config = json.load(open(os.path.join(out, 'best', 'config.json')))
    assert config['architecture'] == 'resnet18' and 'drop_cluster_rate' not in config.get('model_args', {})
    card = open(os.path.join(out, 'best', 'README.md')).read()
    assert 'DropBlock (rate 0.1)' in card and 'trained with DropCluster' not in card
    run = json.load(open(os.path.join(out, 'run.json')))
    assert 'dropcluster' not in run


# timm's documented train.py command lines (hfdocs/source/training_script.mdx; the a3 line is the
# "ResNet strikes back" A3 recipe of timm's resnet50.a3_in1k weights), model swapped for a
# *_dropcluster one, sizes scaled down to the small test ImageFolder; the rest unchanged. (On a CPU
# without native bfloat16, a3's --amp-dtype bfloat16 is ~35x slower than float32: few images keep it short.)
RECIPES = {
    'resnext50_32x4d': '--lr 0.6 --warmup-epochs 5 --epochs 240 --weight-decay 1e-4 --sched cosine --reprob 0.4 '
                       '--recount 3 --remode pixel --aa rand-m7-mstd0.5-inc1 -b 192 -j 6 --amp --dist-bn reduce',
    'efficientnet_b2': '-b 128 --sched step --epochs 450 --decay-epochs 2.4 --decay-rate .97 --opt rmsproptf '
                       '--opt-eps .001 -j 8 --warmup-lr 1e-6 --weight-decay 1e-5 --drop 0.3 --drop-path 0.2 '
                       '--model-ema --model-ema-decay 0.9999 --aa rand-m9-mstd0.5 --remode pixel --reprob 0.2 --amp '
                       '--lr .016',
    'resnet50_a3': '--sched cosine --epochs 100 --warmup-epochs 5 --lr 8e-3 --weight-decay 0.02 --opt lamb '
                   '--smoothing 0.0 --bce-loss --mixup 0.1 --cutmix 1.0 --aug-repeats 3 --aa rand-m6-mstd0.5-inc1 '
                   '-b 256 --amp --amp-dtype bfloat16 --model-ema --model-ema-warmup --model-ema-decay 0.99',
}
SCALED = ['--model', 'resnet18_dropcluster', '--img-size', '32', '--epochs', '2', '-b', '16', '-j', '0',
          '--warmup-epochs', '1', '--train-batches-per-epoch', '3', '--drop-cluster', '0.2', '--drop-cluster-start', '0',
          '--no-progress']


@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_timm_recipe_command_line_runs_unchanged(recipe, image_folder, tmp_path):
    import yaml
    out = str(tmp_path / recipe)
    argv = [image_folder] + RECIPES[recipe].split() + SCALED + ['--output', out]
    run_script(argv)
    run = json.load(open(os.path.join(out, 'run.json')))
    args = yaml.safe_load(open(os.path.join(out, 'args.yaml')))
    flags = RECIPES[recipe].split()
    assert args['opt'] == (flags[flags.index('--opt') + 1] if '--opt' in flags else 'sgd')  # timm's default
    assert run['config']['optim']['sched'] == flags[flags.index('--sched') + 1]
    assert run['config']['loss']['bce_loss'] == ('--bce-loss' in flags)
    assert run['config']['data']['aug_repeats'] == (3 if '--aug-repeats' in flags else 0)
    assert run['dropcluster']['peak_rate'] > 0 and run['progress']['epochs_done'] == 2
    summary = open(os.path.join(out, 'summary.csv')).read().splitlines()
    assert summary[0] == 'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr' and len(summary) == 3


@pytest.mark.parametrize('flags, words', [
    (['--torchscript'], ['--torchscript', 'deprecated']),
    (['--aug-splits', '3'], ['--aug-splits', 'AugMix']),
    (['--kd-model-name', 'resnet50'], ['--kd-model-name', 'distillation']),
    (['--device', 'npu'], ['--device npu', 'Accelerate']),
])
def test_unsupported_timm_flags_fail_with_the_reason(flags, words, tmp_path):
    proc = run_in_process(flags + SCALED + ['--output', str(tmp_path / 'o')])
    assert_fails(proc, words)
    assert not (tmp_path / 'o').exists()


def test_config_file_supplies_defaults_and_args_yaml_records_them(tmp_path):
    config = tmp_path / 'recipe.yaml'
    config.write_text('opt: sgd\nlr: 0.02\nsmoothing: 0.2\nmodel-ema: true\n')
    out = str(tmp_path / 'o')
    run_script(['-c', str(config), '--lr', '0.03'] + SCALED + ['--output', out])
    run = json.load(open(os.path.join(out, 'run.json')))
    assert (run['config']['optim']['opt'], run['config']['optim']['lr']) == ('sgd', 0.03)  # the command line wins
    assert run['config']['loss']['smoothing'] == 0.2 and run['config']['optim']['model_ema'] is True
    bad = tmp_path / 'bad.yaml'
    bad.write_text('not_a_flag: 1\n')
    assert_fails(run_in_process(['-c', str(bad)] + SCALED + ['--output', str(tmp_path / 'b')]),
                 ['-c', 'unknown arguments not_a_flag'])


def test_soft_reset_every_epoch_reclusters_right_after(image_folder, tmp_path):
    """BRB: --soft-reset-interval 1 resets at the start of epochs 1 and 2 and re-clusters then, even
    with the periodic re-clustering off."""
    out = str(tmp_path / 'brb')
    args = list(TINY)
    args[args.index('--drop-cluster-update-freq') + 1] = '0'
    run_script([image_folder, '--output', out, '--soft-reset-interval', '1', '--soft-reset-factor', '0.8',
                '--soft-reset-scope', 'layer4', 'fc'] + args)
    rows = json.load(open(os.path.join(out, 'metrics.json')))
    assert [r['soft_reset'] for r in rows] == [False, True, True]
    assert [r['reclustered'] for r in rows] == [False, True, True]
    run = json.load(open(os.path.join(out, 'run.json')))
    assert run['dropcluster']['soft_resets'] == 2 and run['config']['dropcluster']['soft_reset_scope'] == ['layer4', 'fc']


def test_torchcompile_run_publishes_plain_weights_and_does_not_recompile_as_the_rate_ramps(image_folder, tmp_path):
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    out = str(tmp_path / 'compiled')
    proc = run_in_process([image_folder, '--output', out, '--torchcompile', 'eager', '--cpu-threads', '1'] + TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Training before and after the first clustering, and evaluation: the rate changes at every step of
    # the warm-up epoch and compiles nothing.
    assert counters['stats']['unique_graphs'] <= 4, dict(counters['stats'])
    weights = load_file(os.path.join(out, 'last', 'model.safetensors'))
    assert not any(k.startswith('_orig_mod.') for k in weights) and any(k.endswith('cluster_map') for k in weights)
    torch._dynamo.reset()
