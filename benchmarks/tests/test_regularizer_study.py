""" The regulariser study's harness: separate random streams, arms paired from the first step to the
last, matched dropped fractions, the recipe of the package, one rule for duplicate rows, rows that
re-run bit for bit. Runs on synthetic CIFAR-shaped data; the end-to-end ones need the CIFAR-10 archive."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.regularizer_study import arms as A
from benchmarks.regularizer_study import protocols as P
from benchmarks.regularizer_study import run as R
from benchmarks.regularizer_study.data import load_cifar10
from benchmarks.regularizer_study.rows import append_row, merge_rows, read_rows
from benchmarks.regularizer_study.streams import PURPOSES, purpose_seed, stream

REPO = Path(__file__).resolve().parents[2]
CIFAR = REPO.parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'
needs_cifar = pytest.mark.skipif(not CIFAR.exists(), reason=f'CIFAR-10 archive not found at {CIFAR}')


def _fake_data(n_train=200, n_test=100):
    g = torch.Generator().manual_seed(0)
    return {'train_x': torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
            'train_y': torch.arange(n_train) % 10,
            'test_x': torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
            'test_y': torch.arange(n_test) % 10}


def test_streams_differ_by_purpose_and_repeat_by_seed():
    draws = {p: torch.rand(4, generator=stream(3, p)) for p in PURPOSES}
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(PURPOSES)
    assert torch.equal(torch.rand(4, generator=stream(3, 'order')), draws['order'])
    assert purpose_seed(3, 'order') != purpose_seed(4, 'order')
    with pytest.raises(ValueError, match='unknown random stream'):
        stream(0, 'data order')


def test_every_arm_of_a_seed_starts_from_the_same_weights():
    params = {arm: dict(A.build_model(arm, P.TINY, seed=5).named_parameters()) for arm in A.ARMS}
    ref = params['none']
    for arm, p in params.items():
        assert p.keys() == ref.keys(), arm
        assert all(torch.equal(p[k], ref[k]) for k in ref), arm
    other = dict(A.build_model('none', P.TINY, seed=6).named_parameters())
    assert not torch.equal(other['conv1.weight'], ref['conv1.weight'])


def test_drop_slots_and_maps_sit_where_the_protocol_says():
    model = A.build_model('dropcluster', P.CPU, seed=0)
    maps = {n: tuple(m.cluster_map.shape[1:]) for n, m in A.regulariser_layers(model)}
    assert maps == {'maxpool.drop_cluster': (32, 32), 'layer1.0.drop_block': (32, 32), 'layer2.0.drop_block': (16, 16)}
    counts = {n: int(m.cluster_counts.max()) for n, m in A.regulariser_layers(model)}
    assert min(counts.values()) >= 16  # learned and grid partitions can differ
    blocks = A.build_model('dropblock', P.CPU, seed=0)
    assert [n for n, _ in A.regulariser_layers(blocks)] == [n.replace('drop_cluster', 'drop_block') for n in maps]
    assert A.regulariser_layers(A.build_model('none', P.CPU, seed=0)) == []


def _recorded_inputs(arm, monkeypatch, seed=1):
    """The images of every training step of a tiny run of ``arm`` (forward inputs with grad enabled)."""
    seen = []
    build = A.build_model

    def recording_build(arm_, cfg, seed_):
        model = build(arm_, cfg, seed_)
        model.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].detach().clone()) if torch.is_grad_enabled() else None)
        return model

    monkeypatch.setattr(A, 'build_model', recording_build)
    row = R.run_one(arm, seed, P.TINY, 'cpu', _fake_data(), commit='test')
    monkeypatch.setattr(A, 'build_model', build)
    return seen, row


def test_two_arms_of_a_seed_see_the_same_batches_and_augmentations_to_the_last_step(monkeypatch):
    none, _ = _recorded_inputs('none', monkeypatch)
    clustered, row = _recorded_inputs('dropcluster', monkeypatch)
    blocks, _ = _recorded_inputs('dropblock', monkeypatch)
    assert row['reclusters'] == 2 and len(none) == P.TINY['epochs'] * (P.TINY['train_images'] // P.TINY['batch_size']) > 1
    assert len(clustered) == len(none) == len(blocks)
    for step, (a, b, c) in enumerate(zip(none, clustered, blocks)):
        assert torch.equal(a, b) and torch.equal(a, c), f'step {step} differs'
    cut, _ = _recorded_inputs('cutout', monkeypatch)
    for a, b in zip(none, cut):  # the same images, each with one square of at most 8 x 8 pixels changed
        changed = (a != b).any(1).flatten(1).sum(1)
        assert bool((changed <= 64).all()) and bool((changed > 0).any())
    other_seed, _ = _recorded_inputs('none', monkeypatch, seed=2)
    assert not torch.equal(other_seed[0], none[0])


def test_drop_arms_drop_the_target_fraction_and_the_recipe_ramps_them():
    data = _fake_data()
    for arm, tol in (('dropcluster', 0.015), ('dropcluster_grid', 0.015), ('dropblock', 0.03)):
        row = R.run_one(arm, 0, P.TINY, 'cpu', data, commit='test')
        assert row['final_rate'] == pytest.approx(0.1)
        assert row['dropped_fraction'] == pytest.approx(0.1, abs=tol), arm
        assert len(row['dropped_fraction_layers']) == 3
    assert R.run_one('none', 0, P.TINY, 'cpu', data, commit='test')['dropped_fraction'] == 0.0


def test_a_run_is_deterministic_on_the_cpu():
    data = _fake_data()
    a = R.run_one('dropcluster', 3, P.TINY, 'cpu', data, commit='test')
    b = R.run_one('dropcluster', 3, P.TINY, 'cpu', data, commit='test')
    for key in ('top1', 'mca', 'train_top1', 'final_loss', 'dropped_fraction', 'corruptions'):
        assert a[key] == b[key], key
    assert a['command'][-4:] == ['--arm', 'dropcluster', '--seed', '3'] and a['deterministic']


def test_duplicate_rows_merge_when_identical_and_are_refused_when_they_conflict(tmp_path):
    row = dict(config='cpu', arm='none', seed=0, top1=50.0, train_time_s=10.0)
    assert merge_rows([row, dict(row, train_time_s=12.0)]) == [row]
    with pytest.raises(ValueError, match='cpu/none/0 disagree on top1'):
        merge_rows([row, dict(row, top1=51.0)])
    append_row(tmp_path, row)
    append_row(tmp_path, dict(row, seed=1))
    (tmp_path / 'runs_gpu.jsonl').write_text(json.dumps(row) + '\n')
    assert [r['seed'] for r in read_rows(tmp_path)] == [0, 1]
    (tmp_path / 'runs_bad.jsonl').write_text('{"config": "cpu"\n')
    with pytest.raises(ValueError, match='runs_bad.jsonl:1: not a JSON line'):
        read_rows(tmp_path)


def test_missing_jobs_are_seed_major():
    rows = [dict(config='cpu', arm='none', seed=0)]
    jobs = R.missing_jobs(P.CPU, rows, [0, 1])
    assert [(j['seed'], j['arm']) for j in jobs[:5]] == [(0, a) for a in A.ARMS[1:]] + [(1, 'none')]


def test_command_line_errors():
    with pytest.raises(SystemExit):
        R.parse_args(['--arm', 'none'])
    with pytest.raises(SystemExit):
        R.parse_args([])
    with pytest.raises(SystemExit):
        R.parse_args(['--arm', 'dropblock_timm', '--seed', '0'])


def test_the_study_refuses_another_checkout_of_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(R, 'REPO', tmp_path)
    with pytest.raises(SystemExit, match='not from this checkout'):
        R.check_package_location()


def test_data_files_are_checked(tmp_path):
    from safetensors.torch import save_file
    bad = tmp_path / 'cifar.tar.gz'
    bad.write_bytes(b'not the archive')
    with pytest.raises(ValueError, match='sha256'):
        load_cifar10(str(bad), str(tmp_path / 'cache'))
    cache = tmp_path / 'cache2'
    cache.mkdir()
    save_file({'train_x': torch.zeros(5, 3, 32, 32, dtype=torch.uint8)}, str(cache / 'cifar10_uint8.safetensors'))
    with pytest.raises(ValueError, match='train_y must be 5 int64 labels, got missing'):
        load_cifar10('unused', str(cache))
    fake = _fake_data()
    save_file(dict(fake, test_y=fake['test_y'] + 5), str(cache / 'cifar10_uint8.safetensors'))
    with pytest.raises(ValueError, match='test_y holds labels outside 0..9'):
        load_cifar10('unused', str(cache))


@needs_cifar
def test_driver_writes_rows_that_re_run_alone_bit_for_bit(cifar_cache, tmp_path, capsys):
    results = tmp_path / 'results'
    args = ['--config', 'tiny', '--results', str(results), '--seeds', '0', '0', '--cache-dir', str(cifar_cache)]
    assert R.main(args) == 0
    rows = read_rows(results)
    assert sorted(r['arm'] for r in rows) == sorted(A.ARMS)
    assert R.main(args) == 0 and '0 runs left' in capsys.readouterr().out  # done rows are skipped
    row = next(r for r in rows if r['arm'] == 'dropcluster')
    out = subprocess.run([sys.executable] + row['command'][1:] + ['--cache-dir', str(cifar_cache)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    again = json.loads(out.strip().splitlines()[-1])
    assert again['top1'] == row['top1']
    assert {k: v for k, v in again.items() if 'time' not in k} == {k: v for k, v in row.items() if 'time' not in k}


@needs_cifar
def test_device_script_dry_run_on_the_cpu(cifar_cache, tmp_path):
    out = tmp_path / 'device_out'
    env = dict(__import__('os').environ, DEVICE='cpu', CONFIG='tiny', SEEDS='1 1', WORKERS='2', BUDGET='5',
               DATA=str(CIFAR), CACHE_DIR=str(cifar_cache), OUT=str(out), COMMIT='0123abc')
    subprocess.run(['bash', 'benchmarks/device_study.sh'], cwd=REPO, env=env, check=True, capture_output=True)
    rows = read_rows(out)
    assert sorted(r['arm'] for r in rows) == sorted(A.ARMS) and {r['seed'] for r in rows} == {1}
    assert 'runs done' in (out / 'driver.txt').read_text()
    subprocess.run(['bash', 'benchmarks/device_study.sh'], cwd=REPO, env=env, check=True, capture_output=True)
    assert '0 runs left' in (out / 'driver.txt').read_text() and len(read_rows(out)) == 5
