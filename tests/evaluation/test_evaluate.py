""" Evaluation of saved models: ``dropcluster-timm evaluate``, clean and under corruptions."""
import json
import os
import sys

import pytest

from run_helpers import assert_fails, launch_two, run_script

EVALUATE = [sys.executable, '-m', 'dropcluster_timm', 'evaluate']


def test_evaluate_entry_point_reports_corruptions(full_run, image_folder, tmp_path):
    """``dropcluster-timm evaluate FOLDER --corruptions``: clean top-1 as the plain evaluation, a full
    corruption table, JSON output, and a one-line error for an unknown corruption."""
    best = os.path.join(full_run, 'best')
    plain = run_script([best, '--data-dir', image_folder], command=EVALUATE)
    plain_top1 = float(plain.stdout.split()[1])
    out = str(tmp_path / 'corruptions.json')
    proc = run_script([best, '--data-dir', image_folder, '--corruptions', 'all', '--json', out], command=EVALUATE)
    report = json.load(open(out))
    assert report['top1'] == pytest.approx(plain_top1, abs=0.01)
    assert report['num_images'] == 12 and len(report['corruptions']) == 8
    assert 'mean corruption top1' in proc.stdout and 'gaussian_noise' in proc.stdout
    again = str(tmp_path / 'again.json')
    run_script([best, '--data-dir', image_folder, '--corruptions', 'all', '--json', again], command=EVALUATE)
    assert json.load(open(again)) == report  # deterministic for the default seed
    bad = run_script([best, '--data-dir', image_folder, '--corruptions', 'fog'], command=EVALUATE, check=False)
    assert_fails(bad, ['unknown corruption', 'fog'])


def test_two_process_evaluate_reports_and_writes_once(full_run, image_folder, tmp_path):
    out = tmp_path / 'eval.json'
    proc = launch_two(['-m', 'dropcluster_timm', 'evaluate', os.path.join(full_run, 'best'), '--data-dir',
                       image_folder, '--json', str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith('top1 ')]
    assert len(lines) == 1  # one process reports (and writes the JSON); both evaluated
    assert float(lines[0].split()[1]) == pytest.approx(json.loads(out.read_text())['top1'], abs=0.01)


def test_evaluate_refuses_data_whose_classes_are_not_the_trained_ones(full_run, image_folder, tmp_path):
    from dropcluster_timm.errors import InputError
    from dropcluster_timm.evaluation.evaluate import evaluate_checkpoint
    from run_helpers import make_image_folder
    best = os.path.join(full_run, 'best')
    assert json.load(open(os.path.join(best, 'config.json')))['label_names'] == ['class_0', 'class_1', 'class_2']
    root = make_image_folder(tmp_path / 'other')
    os.rename(os.path.join(root, 'validation', 'class_2'), os.path.join(root, 'validation', 'class_9'))
    with pytest.raises(InputError, match=r"classes \['class_0', 'class_1', 'class_9'\] are not those the model "
                                            r'was trained on'):
        evaluate_checkpoint(best, '', root, 'validation')
    assert evaluate_checkpoint(best, '', image_folder, 'validation')['num_images'] == 12
