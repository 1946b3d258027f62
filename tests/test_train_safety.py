""" Runs that cannot be broken by the options timm users pass: channels-last weights are saved and
reload equal to the trained ones; launch modes that cannot work are refused at start."""
import subprocess
import sys

import pytest
import timm
import torch

from run_helpers import TINY, with_epochs
from dropcluster_timm.errors import TrainingError
from dropcluster_timm.train import build_accelerator, parse_train_args, train


def test_channels_last_run_saves_contiguous_weights_that_reload_equal(image_folder, tmp_path):
    out = tmp_path / 'run'
    result = train(parse_train_args(with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(out),
                                                            '--channels-last']))
    result.accelerator.end_training()
    trained = result.accelerator.unwrap_model(result.model).eval()
    assert trained.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the run's layout is kept
    reloaded = timm.create_model(f'local-dir:{out / "last"}', pretrained=True).eval()
    for (name, a), b in zip(trained.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # in the same layout, the same kernels: the same outputs
        assert torch.equal(trained(x), reloaded.to(memory_format=torch.channels_last)(x))
    assert (out / 'checkpoints' / 'epoch_0000').is_dir()


@pytest.mark.parametrize('variable, name', [('ACCELERATE_USE_FSDP', 'FSDP'), ('ACCELERATE_USE_DEEPSPEED', 'DeepSpeed')])
def test_sharded_launch_modes_are_refused_at_start(variable, name, monkeypatch, tmp_path):
    """`accelerate launch --use_fsdp / --use_deepspeed` set these variables for every process."""
    monkeypatch.setenv(variable, 'true')
    cfg = parse_train_args(['--output', str(tmp_path / 'run'), '--epochs', '1'])
    with pytest.raises(TrainingError, match=f'^{name} is not supported: .* Supported: one process'):
        build_accelerator(cfg)


def test_a_second_run_into_the_same_output_stops_and_a_killed_runs_lock_does_not_block(image_folder, tmp_path):
    out = tmp_path / 'run'
    args = with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(out)]
    # Another process holds the folder, as a run does, until it is killed.
    code = f'from dropcluster_timm.train.run_folder import lock_output; lock_output({str(out)!r}); print(1, flush=True); input()'
    holder = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == '1'
        with pytest.raises(TrainingError, match=rf'is in use by another run \(pid {holder.pid} on '):
            train(parse_train_args(args))
        assert not (out / 'run.json').exists()
    finally:
        holder.kill()
        holder.wait()
    assert (out / '.lock').exists()  # a killed run leaves its lock file; the next run is not blocked by it
    result = train(parse_train_args(args))
    result.accelerator.end_training()
    assert (out / 'last' / 'model.safetensors').exists()


def test_a_batch_larger_than_the_data_set_is_a_one_line_error(image_folder, tmp_path):
    args = with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(tmp_path / 'run'), '--batch-size', '64']
    with pytest.raises(TrainingError, match=r'--batch-size 64 on 1 process\(es\) is larger than the training set '
                                            r'\(36 images\)'):
        train(parse_train_args(args))


def test_a_run_that_failed_in_this_process_does_not_lock_its_folder(image_folder, tmp_path, capsys):
    out = tmp_path / 'run'
    with pytest.raises(TrainingError, match='larger than the training set'):
        train(parse_train_args(with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(out),
                                                       '--batch-size', '64']))
    args = with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(out), '--sched', 'step',
                                   '--decay-epochs', '100']
    args[args.index('--lr') + 1] = '2e-5'
    result = train(parse_train_args(args))
    result.accelerator.end_training()
    assert (out / 'last' / 'model.safetensors').exists()
    assert ' lr 2e-05 ' in capsys.readouterr().out  # the epoch line shows a small rate, not 0.0000
