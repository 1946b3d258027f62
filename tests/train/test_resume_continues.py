""" A resumed run continues where it stopped: from a checkpoint inside an epoch bit for bit (data order,
augmentation, drop masks, metrics rows), and with a changed epoch length its learning-rate schedule
ends where a run with those settings from the start ends it."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from run_helpers import TINY, run_in_process, with_epochs
from dropcluster_timm.train import parse_train_args, train

# 36 images / batch 8 = 4 batches an epoch; a checkpoint every 3 batches: steps 3 and 6 are inside
# epochs 0 and 1 (epoch 1 re-clusters at its start and ramps the drop rate).
RECOVERY = ['--recovery-interval', '3', '--checkpoint-hist', '10']


class Interrupt(Exception):
    pass


def _stop_after(step):
    def on_step(state):
        if state.global_step == step:
            raise Interrupt
    return on_step


def _rows(out):
    return [{k: v for k, v in row.items() if k != 'epoch_time'} for row in json.loads((out / 'metrics.json').read_text())]


@pytest.fixture(scope='module')
def uninterrupted(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('exact') / 'whole'
    train(parse_train_args(with_epochs(TINY, 3) + ['--data-dir', image_folder, '--output', str(out)] + RECOVERY))
    return out


@pytest.mark.parametrize('stop_after, checkpoint', [(7, 'step_00000006'), (3, 'step_00000003')])
def test_a_run_resumed_inside_an_epoch_ends_as_one_never_stopped(uninterrupted, image_folder, tmp_path, stop_after,
                                                                 checkpoint):
    whole = uninterrupted
    out = tmp_path / 'stopped'
    args = with_epochs(TINY, 3) + ['--data-dir', image_folder, '--output', str(out)] + RECOVERY
    with pytest.raises(Interrupt):
        train(parse_train_args(args), on_step=_stop_after(stop_after))
    assert (out / 'checkpoints' / checkpoint / 'rank_state_0.safetensors').is_file()
    proc = run_in_process(args + ['--resume', str(out / 'checkpoints' / checkpoint)])
    assert proc.returncode == 0, proc.stderr
    assert f'resumed from {out / "checkpoints" / checkpoint}' in proc.stdout
    assert _rows(out) == _rows(whole)  # train_loss over the whole epoch, reclustered, drop_rate, lr, top-1
    for folder in ('last', 'best', 'checkpoints/epoch_0002'):
        name = 'model.safetensors'
        a, b = load_file(str(whole / folder / name)), load_file(str(out / folder / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def test_a_damaged_rank_state_is_refused_in_one_line(uninterrupted, image_folder, tmp_path):
    whole = uninterrupted
    run = tmp_path / 'run'
    shutil.copytree(whole, run)
    checkpoint = run / 'checkpoints' / 'step_00000006'
    (checkpoint / 'rank_state_0.safetensors').write_bytes(b'not a safetensors file')
    for name in ('epoch_0001', 'epoch_0002', 'step_00000009'):
        shutil.rmtree(run / 'checkpoints' / name)
    proc = run_in_process(with_epochs(TINY, 3) + ['--data-dir', image_folder, '--resume', str(checkpoint)])
    assert proc.returncode == 2 and 'rank_state_0.safetensors' in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_a_resume_with_a_longer_epoch_ends_its_learning_rate_schedule_where_a_fresh_run_does(image_folder, tmp_path):
    common = with_epochs(TINY, 2) + ['--data-dir', image_folder, '--sched-on-updates', '--lr', '0.1']
    fresh = tmp_path / 'fresh'
    train(parse_train_args(common + ['--output', str(fresh), '--train-batches-per-epoch', '4']))
    resumed = tmp_path / 'resumed'
    train(parse_train_args(with_epochs(common, 1) + ['--output', str(resumed), '--train-batches-per-epoch', '3']))
    proc = run_in_process(common + ['--resume', str(resumed), '--train-batches-per-epoch', '4'])
    assert proc.returncode == 0, proc.stderr
    assert 'resume: the learning-rate schedule re-placed for 4 updates per epoch (the checkpoint had 3): update 4, ' \
           'was 3' in proc.stdout
    end = [json.loads((f / 'metrics.json').read_text())[-1]['lr'] for f in (fresh, resumed)]
    assert end[1] == end[0]
    # An unchanged epoch length keeps the schedule's count as it was (no re-placing).
    again = run_in_process(with_epochs(common, 3) + ['--resume', str(resumed), '--train-batches-per-epoch', '4'])
    assert again.returncode == 0 and 're-placed' not in again.stdout, again.stderr
