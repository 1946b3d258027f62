""" The run folder: which checkpoint a resume takes (``resume``), what an output folder may hold, metrics rows."""
import json
import os

import pytest

from dropcluster_timm.errors import InputError
from dropcluster_timm.files import write_json
from dropcluster_timm.train import layout, records, resume
from dropcluster_timm.train import run_folder as rf
from dropcluster_timm.train.loop import TrainState


def _fake_checkpoint(output, name, step, complete=True):
    folder = os.path.join(output, layout.CHECKPOINT_DIR, name)
    os.makedirs(folder)
    if complete:
        write_json(os.path.join(folder, layout.META_FILE), {'global_step': step, 'identity': {'model': 'm'}})
    return folder


def test_find_checkpoint_takes_the_newest_complete_one(tmp_path):
    out = str(tmp_path / 'run')
    with pytest.raises(InputError, match='does not exist'):
        resume.find_checkpoint(out)
    os.makedirs(out)
    with pytest.raises(InputError, match='holds no completed checkpoint'):
        resume.find_checkpoint(out)
    records.write_run_file(out, {'model': {'name': 'm'}}, {'train': 't'})
    assert resume.find_checkpoint(out) is None  # a run stopped in its first epoch: start over
    old = _fake_checkpoint(out, 'epoch_0000', 4)
    new = _fake_checkpoint(out, 'step_00000010', 10)
    _fake_checkpoint(out, '.tmp-epoch_0002', 12)  # a save that crashed midway
    _fake_checkpoint(out, 'epoch_0003', 16, complete=False)  # no meta.json: incomplete
    assert resume.list_checkpoints(out) == [old, new]
    assert resume.find_checkpoint(out) == new and resume.find_checkpoint(old) == old
    assert resume.check_resume(new, {'model': 'm'})['global_step'] == 10
    with pytest.raises(InputError, match="it was trained with model='m', this run has model='other'"):
        resume.check_resume(new, {'model': 'other'})


def test_check_output_refuses_files_and_other_runs(tmp_path):
    rf.check_output(str(tmp_path / 'new' / 'deeper'), None)  # nothing there yet: fine
    (tmp_path / 'file').write_text('x')
    with pytest.raises(InputError, match='is a file'):
        rf.check_output(str(tmp_path / 'file' / 'sub'), None)
    out = str(tmp_path / 'run')
    ckpt = _fake_checkpoint(out, 'epoch_0000', 4)
    with pytest.raises(InputError, match='already holds another run'):
        rf.check_output(out, None)
    rf.check_output(out, ckpt)  # resuming from its own checkpoint


def test_metrics_log_keeps_the_rows_before_the_resume_point(tmp_path):
    out = str(tmp_path)
    log = records.MetricsLog(out)
    for epoch in range(3):
        log.add({'epoch': epoch, 'top1': 10.0 * epoch})
    log.add({'epoch': 1, 'top1': 99.0, 'extra': 1})  # an epoch run again replaces its row
    rows = json.load(open(os.path.join(out, 'metrics.json')))
    assert [r['top1'] for r in rows] == [0.0, 99.0, 20.0]
    assert open(os.path.join(out, 'metrics.csv')).readline().strip() == 'epoch,top1,extra'
    assert [r['epoch'] for r in records.MetricsLog(out, keep_epochs=2).rows] == [0, 1]
    assert records.MetricsLog(out).rows == []  # a fresh run keeps none


def test_run_file_records_config_data_and_progress(tmp_path):
    state = TrainState()
    state.epoch, state.best_metric, state.best_epoch, state.peak_drop_rate, state.reclusterings = 3, 50.0, 2, 0.1, 2
    records.write_run_file(str(tmp_path), {'optim': {'lr': 0.1}}, {'train': 'a', 'validation': 'b'}, state, 4)
    record = json.load(open(tmp_path / layout.RUN_FILE))
    assert record == {'config': {'optim': {'lr': 0.1}}, 'data': {'train': 'a', 'validation': 'b'},
                      'progress': {'epochs_done': 3, 'eval_metric': 'top1', 'best_metric': 50.0, 'best_epoch': 2},
                      'dropcluster': {'layers': 4, 'peak_rate': 0.1, 'reclusterings': 2, 'soft_resets': 0}}


@pytest.mark.parametrize('optim, metric', [({}, 'top1'), ({'eval_metric': 'loss', 'model_ema': True}, 'ema_eval_loss')])
def test_run_files_from_before_the_best_metric_had_its_name_are_read(tmp_path, optim, metric):
    write_json(str(tmp_path / layout.RUN_FILE), {'config': {'optim': optim}, 'data': {},
                                                       'progress': {'epochs_done': 3, 'best_top1': 0.7, 'best_epoch': 1}})
    assert records.read_progress(str(tmp_path)) == {'epochs_done': 3, 'eval_metric': metric, 'best_metric': 0.7,
                                               'best_epoch': 1}
