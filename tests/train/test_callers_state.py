""" A run leaves what is not its own alone: the caller's process state (timm's fast-norm switch,
Accelerate's state) is as it was when ``train`` and ``evaluate`` return, a resumed run stays in its
folder, and a model without DropCluster layers records no DropCluster rate."""
import json
import shutil

import pytest
from accelerate import Accelerator
from accelerate.state import is_initialized
from timm.layers import is_fast_norm

from run_helpers import TINY, run_in_process, with_epochs
from dropcluster_timm.train import parse_train_args, train

ONE_BATCH = ['--train-batches-per-epoch', '1', '--device', 'cpu']


def test_train_and_evaluate_leave_fast_norm_and_accelerate_as_they_found_them(image_folder, tmp_path, own_accelerator):
    assert not is_fast_norm() and not is_initialized()
    out = tmp_path / 'run'
    train(parse_train_args(with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(out), '--fast-norm',
                                                   '--amp', '--amp-dtype', 'bfloat16'] + ONE_BATCH))
    assert not is_fast_norm(), 'timm fast norm left switched on'
    assert not is_initialized(), "the run's Accelerate state outlived it"
    proc = run_in_process([str(out / 'last'), '--data-dir', image_folder], command='evaluate')
    assert proc.returncode == 0 and proc.stdout.startswith('top1 '), proc.stderr
    assert not is_initialized(), "the evaluation's Accelerate state outlived it"
    # The caller's next Accelerator is built from its own arguments, not the run's bf16.
    assert Accelerator(cpu=True).mixed_precision == 'no'


def test_a_state_the_caller_set_up_stays_up(image_folder, tmp_path, own_accelerator):
    accelerator = Accelerator(cpu=True)
    train(parse_train_args(with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(tmp_path / 'run')]
                           + ONE_BATCH))
    assert is_initialized() and accelerator.process_index == 0 and accelerator.mixed_precision == 'no'


def test_resume_without_output_continues_in_the_resumed_folder(one_epoch_run, image_folder, tmp_path, monkeypatch):
    run = tmp_path / 'run'
    shutil.copytree(one_epoch_run, run)
    monkeypatch.chdir(tmp_path)
    checkpoint = sorted((run / 'checkpoints').iterdir())[-1]
    for resume in (run, checkpoint):  # the run folder, or one of its checkpoints
        epochs = 2 if resume == run else 3
        train(parse_train_args(with_epochs(TINY, epochs) + ['--data-dir', image_folder, '--resume', str(resume)]))
        assert [r['epoch'] for r in json.loads((run / 'metrics.json').read_text())] == list(range(epochs))
        assert json.loads((run / 'run.json').read_text())['progress']['epochs_done'] == epochs
        assert (run / 'best' / 'model.safetensors').is_file()
        assert not (tmp_path / 'output').exists(), 'the run was split over two folders'
    # A checkpoint copied out of its run folder has no folder to continue: --output must say where.
    loose = tmp_path / 'loose'
    shutil.copytree(sorted((run / 'checkpoints').iterdir())[-1], loose)
    proc = run_in_process(with_epochs(TINY, 4) + ['--data-dir', image_folder, '--resume', str(loose)])
    assert proc.returncode == 2 and 'give --output' in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / 'output').exists()


def test_a_model_without_dropcluster_layers_records_no_drop_rate(image_folder, tmp_path):
    out = tmp_path / 'plain'
    args = with_epochs(TINY, 2)
    del args[args.index('--num-clusters'):args.index('--num-clusters') + 2]  # a layer option: not for resnet18
    args[args.index('resnet18_dropcluster')] = 'resnet18'
    proc = run_in_process(args + ['--data-dir', image_folder, '--output', str(out), '--drop-cluster', '0.1'] + ONE_BATCH)
    assert proc.returncode == 0, proc.stderr
    assert 'has no DropCluster layers, --drop-cluster is ignored' in proc.stdout
    assert 'drop_rate' not in proc.stdout and 'DropClusterSchedule' not in proc.stdout, proc.stdout
    rows = json.loads((out / 'metrics.json').read_text())
    assert len(rows) == 2 and all('drop_rate' not in row for row in rows)
    assert 'drop_rate' not in (out / 'metrics.csv').read_text()
    assert 'dropcluster' not in json.loads((out / 'run.json').read_text())


@pytest.mark.parametrize('extra, rate', [([], 0.2), (['--drop-cluster', '0'], 0.0)])
def test_a_dropcluster_model_records_its_rate(image_folder, tmp_path, extra, rate):
    out = tmp_path / 'dc'
    train(parse_train_args(with_epochs(TINY, 3) + ['--data-dir', image_folder, '--output', str(out)] + ONE_BATCH
                           + extra))
    rows = json.loads((out / 'metrics.json').read_text())
    assert [row['drop_rate'] for row in rows] == pytest.approx([0.0, 0.0, rate])  # the ramp: epochs 1 to 2
