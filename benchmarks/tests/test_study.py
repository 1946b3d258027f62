""" benchmarks/study_cifar10.py: splits, augmentation, one real run, selection, reports; the real
CIFAR-10 quick study is a slow test that skips where the data is absent."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dropcluster_timm import dropcluster_layers

# Imported as a module of the benchmarks package (not from a file spec) so that the study's worker
# processes, started with 'spawn', can import it again to unpickle run_one.
from benchmarks import study_cifar10 as study

REPO = Path(__file__).resolve().parents[2]
CIFAR = REPO.parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'
RESULTS = REPO / 'benchmarks' / 'results' / 'study_cifar10'  # the committed study: .json and _card_table.json


def tiny_cifar_cache(folder, n_train=60, n_test=40):
    """A CIFAR-shaped cache file ``folder/cifar10_uint8.safetensors`` of random images (for pipeline tests);
    returns its content."""
    g = torch.Generator().manual_seed(0)
    data = {'train_x': torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
            'train_y': torch.arange(n_train) % 10,
            'test_x': torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
            'test_y': torch.arange(n_test) % 10}
    save_file(data, os.path.join(folder, 'cifar10_uint8.safetensors'))
    return data


def test_balanced_split_is_balanced_nested_and_excludes():
    labels = torch.arange(10).repeat_interleave(30)
    val = study.balanced_split(labels, 5, torch.Generator().manual_seed(1))
    assert torch.bincount(labels[val], minlength=10).tolist() == [5] * 10
    train = study.balanced_split(labels, 20, torch.Generator().manual_seed(2), exclude=val)
    assert not set(train.tolist()) & set(val.tolist())
    # interleaved by class: every prefix of a multiple of 10 is class-balanced (the size regimes)
    assert torch.bincount(labels[train[:70]], minlength=10).tolist() == [7] * 10
    assert torch.equal(train, study.balanced_split(labels, 20, torch.Generator().manual_seed(2), exclude=val))
    with pytest.raises(ValueError, match='requested'):
        study.balanced_split(labels, 26, torch.Generator().manual_seed(2), exclude=val)


def test_augment_crops_padded_images_and_flips():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = study.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode='reflect') / 255
    flipped = 0
    for i in range(16):
        crops = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(torch.equal(out[i], c) for c in crops)
        mirrored = any(torch.equal(out[i], c.flip(-1)) for c in crops)
        assert plain or mirrored, i
        flipped += mirrored and not plain
    assert 0 < flipped < 16




TINY = ['--train-sizes', '20', '--epochs', '2', '--seeds', '2', '--rates', '0.1', '0.3', '--val-images', '10',
        '--test-images', '20', '--corruption-images', '10', '--layers', '1', '1', '1', '1',
        '--channels', '8', '8', '8', '8', '--batch-size', '10', '--cluster-images', '8', '--jobs', '1',
        '--device', 'cpu']


def test_run_one_trains_reclusters_and_evaluates(tmp_path):
    data = tiny_cifar_cache(tmp_path)
    args = study.parse_args(TINY + ['--cache-dir', str(tmp_path)])
    splits = study.splits(data['train_y'], data['test_y'], args)
    cfg = dict(study.study_config(args), device='cpu', cache_dir=str(tmp_path), threads=1)
    rows = {}
    for arm in ('dropblock', 'dc_stages', 'dc_stem'):
        row = study.run_one(dict(cfg=cfg, splits=splits, arm=arm, size=20, seed=0, rate=0.3, epochs=2))
        rows[arm] = row
        assert 0 <= row['test_top1'] <= 100 and 0 <= row['mean_corruption_top1'] <= 100
        assert 0 <= row['train_top1'] <= 100
        assert set(row['corruptions']) == set(study.CORRUPTIONS)
    assert rows['dropblock']['reclusters'] == 0
    assert rows['dc_stages']['reclusters'] == rows['dc_stem']['reclusters'] == 2  # epochs 0 and 1
    # the arms are different models: DropCluster sits where the arm says
    names = lambda m: [n for n, _ in dropcluster_layers(m)]  # noqa: E731
    assert names(study.build_model('dc_stem', 0.1, cfg)) == ['maxpool.drop_cluster']
    assert names(study.build_model('dc_stages', 0.1, cfg)) == ['layer3.0.drop_block', 'layer4.0.drop_block']
    assert names(study.build_model('dropblock', 0.1, cfg)) == []


def test_study_selects_on_validation_resumes_and_reports(tmp_path, capsys):
    tiny_cifar_cache(tmp_path)
    out = str(tmp_path / 'res')
    argv = TINY + ['--cache-dir', str(tmp_path), '--output', out, '--arms', 'none', 'dc_stages']
    assert study.main(argv) == 0
    results = json.loads(Path(out + '.json').read_text())
    runs = results['runs']
    # none: 2 seeds; dc_stages: both grid rates at seed 0, then seed 1 at the chosen one
    assert len(runs) == 5
    chosen = results['selected_rates']['20']['dc_stages']
    grid = {r: runs[f'dc_stages/20/0/{r:g}']['val_top1'] for r in (0.1, 0.3)}
    assert grid[chosen] == max(grid.values()) and (grid[0.1] != grid[0.3] or chosen == 0.1)
    assert f'dc_stages/20/1/{chosen:g}' in runs
    summary = {e['arm']: e for e in results['summary']}
    tops = [runs[f'dc_stages/20/{s}/{chosen:g}']['test_top1'] for s in (0, 1)]
    assert summary['dc_stages']['test_top1'] == pytest.approx(sum(tops) / 2)
    assert summary['dc_stages']['test_top1_std'] == pytest.approx(torch.tensor(tops).std().item())
    md = Path(out + '.md').read_text()
    assert study.ARM_LABELS['dc_stages'] in md and f"{summary['none']['test_top1']:.2f}" in md
    assert Path(out + '.png').stat().st_size > 1000
    assert json.loads(Path(out + '_card_table.json').read_text()) == study.card_table(results)
    # a second call with the same settings trains nothing
    capsys.readouterr()
    assert study.main(argv) == 0
    assert 'resuming: 5 runs' in capsys.readouterr().out
    assert json.loads(Path(out + '.json').read_text())['runs'] == runs


def test_card_table_reproduces_the_committed_table_from_the_committed_results():
    """benchmarks/results/study_cifar10_card_table.json (the resnet18_dropcluster card's table) is
    card_table() of the committed results, one row per summary entry with its figures."""
    results = json.loads(RESULTS.with_suffix('.json').read_text())
    table = study.card_table(results)
    assert table == json.loads(RESULTS.with_name(RESULTS.name + '_card_table.json').read_text()), \
        'stale: run `python -m benchmarks.study_cifar10 --card-table-only`'
    assert table['columns'] == ['train images', 'regulariser', 'rate', 'test top-1 (%)', 'mCA (%)']
    assert [r[:4] for r in table['rows']] == [
        [e['size'], study.ARM_LABELS[e['arm']], e['rate'], f"{e['test_top1']:.2f} +- {e['test_top1_std']:.2f}"]
        for e in results['summary']]


def test_card_table_only_writes_the_table_without_training(tmp_path, capsys):
    out = tmp_path / 'res'
    assert study.main(['--card-table-only', '--output', str(out)]) == 2  # no results yet: nothing to tabulate
    assert 'no results at' in capsys.readouterr().err and not list(tmp_path.iterdir())
    results = json.loads(RESULTS.with_suffix('.json').read_text())
    del results['summary']  # results saved mid-run have none: it is computed from the runs
    Path(f'{out}.json').write_text(json.dumps(results))
    assert study.main(['--card-table-only', '--output', str(out), '--data', str(tmp_path / 'missing')]) == 0
    written = Path(f'{out}_card_table.json')
    assert capsys.readouterr().out.strip() == str(written)
    assert json.loads(written.read_text()) == study.card_table(json.loads(RESULTS.with_suffix('.json').read_text()))


def test_study_skips_cleanly_without_data(tmp_path, capsys):
    assert study.main(['--data', str(tmp_path / 'missing.tar.gz'), '--cache-dir', str(tmp_path)]) == 0
    assert 'skipped: CIFAR-10 not found' in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        study.parse_args(['--train-sizes', '1000', '5000', '--epochs', '3'])


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.exists(), reason=f'CIFAR-10 not found at {CIFAR} (see ../shared/data/README.md)')
def test_quick_study_on_real_cifar10(tmp_path):
    out = str(tmp_path / 'quick')
    argv = ['--quick', '--output', out, '--cache-dir', os.environ.get('DROPCLUSTER_CIFAR_CACHE', str(tmp_path))]
    assert study.main(argv) == 0
    results = json.loads(Path(out + '.json').read_text())
    assert {(e['size'], e['arm']) for e in results['summary']} == {(n, a) for n in (200, 500) for a in study.ARMS}
    # above chance (10%) after the short quick training, on the real test images
    assert max(e['test_top1'] for e in results['summary']) > 15
