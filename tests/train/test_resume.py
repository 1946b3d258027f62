""" Runs that never silently lose results or train wrong: a resume follows the command line as timm's
train.py does, its position is cross-checked, a run's results are never replaced without --overwrite,
and input errors end in one line (exit 2) before any work; Ctrl-C in one line (exit 130)."""
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from run_helpers import ROOT, TINY, assert_fails, run_in_process, with_epochs


def _copy(run, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(run, out)
    return out


def _files(folder):
    """Every file of a run folder with the hash of its contents and its modification time (not the
    lock file, which names the process that holds the folder)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob('*')) if p.is_file() and p.name != '.lock'}


def _args(image_folder, out, epochs, *extra):
    return with_epochs(TINY, epochs) + ['--data-dir', image_folder, '--output', str(out)] + list(extra)


def test_extending_a_finished_run_trains_with_the_command_lines_schedules(one_epoch_run, full_run, image_folder,
                                                                           tmp_path):
    out = _copy(one_epoch_run, tmp_path)
    before = load_file(str(out / 'last' / 'model.safetensors'))
    state_file = out / 'checkpoints' / 'epoch_0000' / 'run_state.json'  # as written before best_top1 was renamed
    state = json.loads(state_file.read_text())
    state['state']['best_top1'] = state['state'].pop('best_metric')
    state_file.write_text(json.dumps(state))
    proc = run_in_process(_args(image_folder, out, 3, '--resume', str(out), '--drop-cluster', '0.3'))
    assert proc.returncode == 0, proc.stderr
    assert 'resume: optim.epochs 1 -> 3 (from the command line)' in proc.stdout
    assert 'resume: dropcluster.rate 0.2 -> 0.3 (from the command line)' in proc.stdout
    after = load_file(str(out / 'last' / 'model.safetensors'))
    assert not all(before[k].equal(after[k]) for k in before if k.endswith('conv1.weight') or k.startswith('fc.'))
    rows = json.loads((out / 'metrics.json').read_text())
    fresh = json.loads((Path(full_run) / 'metrics.json').read_text())  # the same run, trained 3 epochs at once
    # The learning rate of epochs 1 and 2 is the 3-epoch schedule's (a fresh 3-epoch run's), not the
    # 1-epoch schedule's 0; the drop rate ramps to the new --drop-cluster.
    assert [r['lr'] for r in rows[1:]] == [r['lr'] for r in fresh[1:]] and rows[1]['lr'] > 0
    assert rows[2]['drop_rate'] == pytest.approx(0.3)
    record = json.loads((out / 'run.json').read_text())
    assert record['config']['optim']['epochs'] == 3 and record['config']['dropcluster']['rate'] == 0.3
    assert record['resumes'][-1]['changed'] == {'optim.epochs': [1, 3], 'dropcluster.rate': [0.2, 0.3]}
    assert record['progress']['epochs_done'] == 3 and record['dropcluster']['peak_rate'] == pytest.approx(0.3)
    assert record['progress']['eval_metric'] == 'top1' and record['progress']['best_metric'] == max(r['top1'] for r in rows)


def test_a_finished_run_resumed_with_the_same_epochs_trains_nothing_and_changes_no_file(one_epoch_run, image_folder,
                                                                                        tmp_path):
    out = _copy(one_epoch_run, tmp_path)
    before = _files(out)
    proc = run_in_process(_args(image_folder, out, 1, '--resume', str(out)))
    assert proc.returncode == 0 and proc.stdout.strip().startswith('nothing to train: '), proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and _files(out) == before


@pytest.mark.parametrize('tamper, epochs, words', [
    (lambda meta, state: meta.update(epoch=5), 3, ['run_state.json: state.epoch is 1 but meta.json says 5']),
    (lambda meta, state: (meta.update(epoch=5), state['state'].update(epoch=5)), 3,
     ['it is at epoch 5', 'give --epochs 5 or more']),
])
def test_the_resumed_position_is_cross_checked(one_epoch_run, image_folder, tmp_path, tamper, epochs, words):
    out = _copy(one_epoch_run, tmp_path)
    ckpt = next((out / 'checkpoints').iterdir())
    meta, state = json.loads((ckpt / 'meta.json').read_text()), json.loads((ckpt / 'run_state.json').read_text())
    tamper(meta, state)
    (ckpt / 'meta.json').write_text(json.dumps(meta))
    (ckpt / 'run_state.json').write_text(json.dumps(state))
    before = _files(out)
    assert_fails(run_in_process(_args(image_folder, out, epochs, '--resume', str(out))), words)
    assert _files(out) == before


@pytest.mark.parametrize('extra, words', [
    (['--model', 'resnet34_dropcluster'], ["model.name 'resnet34_dropcluster'", "trained with 'resnet18_dropcluster'"]),
    (['--num-clusters', '3'], ['model.layer_options', 'cluster maps']),
    (['--img-size', '48'], ['data.img_size 48', 'one input size']),
    (['--batch-size', '4'], ['8 images per optimizer step, this run has 4']),
])
def test_settings_that_cannot_change_mid_run_are_refused(one_epoch_run, image_folder, tmp_path, extra, words):
    out = _copy(one_epoch_run, tmp_path)
    args = _args(image_folder, out, 3, '--resume', str(out))
    before = _files(out)
    assert_fails(run_in_process(args + extra), words)
    assert _files(out) == before


def test_a_resume_refuses_weights_with_nan(one_epoch_run, image_folder, tmp_path):
    out = _copy(one_epoch_run, tmp_path)
    ckpt = next((out / 'checkpoints').iterdir())
    weights = load_file(str(ckpt / 'model.safetensors'))
    weights['fc.weight'][0, 0] = float('nan')
    save_file(weights, str(ckpt / 'model.safetensors'), metadata={'format': 'pt'})
    assert_fails(run_in_process(_args(image_folder, out, 3, '--resume', str(out))),
                 ['model.safetensors holds NaN or inf values in fc.weight'])


@pytest.mark.parametrize('remove', [[], ['checkpoints']])
def test_a_new_run_into_a_finished_runs_folder_is_refused_unless_overwrite(one_epoch_run, image_folder, tmp_path,
                                                                           remove):
    out = _copy(one_epoch_run, tmp_path)
    for name in remove:
        shutil.rmtree(out / name)
    before = _files(out)
    assert_fails(run_in_process(_args(image_folder, out, 1)), ['already holds', '--overwrite'])
    assert _files(out) == before
    assert_fails(run_in_process(_args(image_folder, out, 1, '--overwrite', '--resume', str(out))),
                 ['--overwrite replaces', 'give one'])
    proc = run_in_process(_args(image_folder, out, 1, '--overwrite', '--seed', '7'))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / 'run.json').read_text())['config']['optim']['seed'] == 7
    assert len(list((out / 'checkpoints').iterdir())) == 1 and 'resumes' not in json.loads((out / 'run.json').read_text())


@pytest.mark.parametrize('output, words', [
    ('', ['--output is empty']),
    ('/proc/no/such/run', ['--output /proc/no/such/run: cannot create the run folder']),
])
def test_an_output_that_cannot_be_written_is_one_line(image_folder, output, words):
    assert_fails(run_in_process(with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', output]), words)


def test_a_batch_of_one_with_batchnorm_is_one_line(image_folder, tmp_path):
    args = _args(image_folder, tmp_path / 'run', 1)
    args[args.index('--batch-size') + 1] = '1'
    assert_fails(run_in_process(args), ['--batch-size 1', 'BatchNorm'])
    assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_ctrl_c_ends_in_one_line_naming_the_folder_to_resume(image_folder, tmp_path):
    out = tmp_path / 'run'
    # SIGINT back to its default in the child (a suite started in the background passes it on ignored)
    proc = subprocess.Popen([sys.executable, '-m', 'dropcluster_timm', 'train'] + _args(image_folder, out, 50),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith('epoch 0 '):  # a checkpoint exists from here on
            break
    time.sleep(0.1)  # while epoch 0's model folders and checkpoint are being written
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == f'interrupted; resume with --resume {out}' and 'Traceback' not in err
    # The interrupt waited for the epoch's files: its checkpoint is whole, nothing half written is left.
    assert (out / 'checkpoints' / 'epoch_0000' / 'meta.json').is_file()
    assert not list(out.rglob('.tmp*'))
