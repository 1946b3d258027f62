""" Runs that cannot be broken by the options timm users pass: channels-last weights are saved and
reload equal to the trained ones; launch modes that cannot work are refused at start."""
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch

from run_helpers import SCRIPT, TINY, free_port, with_epochs
from dropcluster_timm.errors import InputError
from dropcluster_timm.train import build_accelerator, parse_train_args, train


def test_channels_last_run_saves_contiguous_weights_that_reload_equal(image_folder, tmp_path):
    out = tmp_path / 'run'
    result = train(parse_train_args(with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(out),
                                                            '--channels-last']))
    trained = result.model.eval()
    assert trained.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the run's layout is kept
    reloaded = timm.create_model(f'local-dir:{out / "last"}', pretrained=True).eval()
    for (name, a), b in zip(trained.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # in the same layout, the same kernels: the same outputs
        assert torch.equal(trained(x), reloaded.to(memory_format=torch.channels_last)(x))
    assert (out / 'checkpoints' / 'epoch_0000').is_dir()


def test_the_run_leaves_the_callers_thread_count_and_can_leave_it_alone_throughout(image_folder, tmp_path):
    """On the CPU a run takes its share of the cores (here, a single process: all of them) and gives
    the caller's count back when it returns; --cpu-threads 0 never touches it."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        torch.set_num_threads(1)
        for extra, during in (([], cores), (['--cpu-threads', '0'], 1), (['--cpu-threads', '2'], 2)):
            seen = []
            args = with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(tmp_path / f'run{len(extra)}{during}'),
                                           '--train-batches-per-epoch', '1', '--device', 'cpu'] + extra
            train(parse_train_args(args), on_step=lambda state: seen.append(torch.get_num_threads())
                  )
            assert seen == [during] and torch.get_num_threads() == 1, (extra, seen)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize('variable, name', [('ACCELERATE_USE_FSDP', 'FSDP'), ('ACCELERATE_USE_DEEPSPEED', 'DeepSpeed')])
def test_sharded_launch_modes_are_refused_at_start(variable, name, monkeypatch, tmp_path):
    """`accelerate launch --use_fsdp / --use_deepspeed` set these variables for every process."""
    monkeypatch.setenv(variable, 'true')
    cfg = parse_train_args(['--output', str(tmp_path / 'run'), '--epochs', '1'])
    with pytest.raises(InputError, match=f'^{name} is not supported: .* Supported: one process'):
        build_accelerator(cfg)


def test_a_second_run_into_the_same_output_stops_and_a_killed_runs_lock_does_not_block(image_folder, tmp_path):
    out = tmp_path / 'run'
    args = with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(out)]
    # Another process holds the folder, as a run does, until it is killed.
    code = f'from dropcluster_timm.train.run_folder import lock_output; f = lock_output({str(out)!r}); print(1, flush=True); input()'
    holder = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == '1'
        with pytest.raises(InputError, match=rf'is in use by another run \(pid {holder.pid} on '):
            train(parse_train_args(args))
        assert not (out / 'run.json').exists()
    finally:
        holder.kill()
        holder.wait()
    assert (out / '.lock').exists()  # a killed run leaves its lock file; the next run is not blocked by it
    result = train(parse_train_args(args))
    assert (out / 'last' / 'model.safetensors').exists()


def test_a_batch_larger_than_the_data_set_is_a_one_line_error(image_folder, tmp_path):
    args = with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(tmp_path / 'run'), '--batch-size', '64']
    with pytest.raises(InputError, match=r'--batch-size 64 on 1 process\(es\) is larger than the training set '
                                            r'\(36 images\)'):
        train(parse_train_args(args))


def test_a_run_that_failed_in_this_process_does_not_lock_its_folder(image_folder, tmp_path, capsys):
    out = tmp_path / 'run'
    with pytest.raises(InputError, match='larger than the training set'):
        train(parse_train_args(with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(out),
                                                       '--batch-size', '64']))
    with open(out / '.lock') as f:  # released at once (flock: another open file of this process would conflict)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    args = with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(out), '--sched', 'step',
                                   '--decay-epochs', '100']
    args[args.index('--lr') + 1] = '2e-5'
    result = train(parse_train_args(args))
    assert (out / 'last' / 'model.safetensors').exists()
    assert ' lr 2e-05 ' in capsys.readouterr().out  # the epoch line shows a small rate, not 0.0000


class _Exploit:
    """A pickle that runs code when it is loaded: it creates the file it names."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def _resume_copy(one_epoch_run, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(one_epoch_run, out)
    return out, next((out / 'checkpoints').iterdir())


@pytest.mark.parametrize('planted', ['custom_checkpoint_2.pkl', 'random_states_0.pkl'])
def test_resume_never_runs_code_from_a_checkpoint(one_epoch_run, image_folder, tmp_path, planted):
    out, ckpt = _resume_copy(one_epoch_run, tmp_path)
    marker = tmp_path / 'ran'
    torch.save(_Exploit(str(marker)), ckpt / planted)  # a pickle whose loading would run a command
    args = with_epochs(TINY, 2) + ['--data-dir', image_folder, '--output', str(out), '--resume', str(out)]
    with pytest.raises(InputError, match='cannot resume from'):
        train(parse_train_args(args))
    assert not marker.exists()


@pytest.mark.parametrize('tamper, words', [
    (lambda s: s['state'].update(epoch='x'), "state.epoch is 'x' but meta.json says 1"),
    (lambda s: s['state'].pop('global_step'), 'state: expected the keys'),
    (lambda s: s['state'].update(epoch=-3), 'state.epoch is -3 but meta.json says 1'),
    (lambda s: s['state'].update(num_updates=-3), 'TrainState.num_updates must be a count'),
    (lambda s: s['schedule'].update(rate=float('nan')), 'schedule.rate: nan is not a finite number'),
    (lambda s: s.pop('schedule'), 'expected the states of'),
])
def test_a_tampered_run_state_is_refused_before_training(one_epoch_run, image_folder, tmp_path, tamper, words):
    out, ckpt = _resume_copy(one_epoch_run, tmp_path)
    state = json.loads((ckpt / 'run_state.json').read_text())
    tamper(state)
    (ckpt / 'run_state.json').write_text(json.dumps(state))
    args = with_epochs(TINY, 2) + ['--data-dir', image_folder, '--output', str(out), '--resume', str(out)]
    with pytest.raises(InputError, match='run_state.json: ') as err:
        train(parse_train_args(args))
    assert words in str(err.value)
    assert len(json.loads((out / 'metrics.json').read_text())) == 1  # no epoch trained


def test_an_untampered_checkpoint_resumes(one_epoch_run, image_folder, tmp_path):
    out, ckpt = _resume_copy(one_epoch_run, tmp_path)
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix == '.pkl') == ['random_states_0.pkl']
    args = with_epochs(TINY, 2) + ['--data-dir', image_folder, '--output', str(out), '--resume', str(out)]
    result = train(parse_train_args(args))
    assert result.state.epoch == 2 and len(json.loads((out / 'metrics.json').read_text())) == 2


@pytest.mark.slow
def test_two_machines_without_a_shared_output_folder_stop_at_start(image_folder, tmp_path):
    """Two `accelerate launch` agents on this host as machines 0 and 1, each in its own folder with a
    relative --output: two node-local disks. Both stop with one line before any training."""
    port, procs = free_port(), []
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    for rank in (0, 1):
        cwd = tmp_path / f'machine{rank}'
        cwd.mkdir()
        cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_machines', '2',
               '--machine_rank', str(rank), '--num_processes', '2', '--main_process_ip', '127.0.0.1',
               '--main_process_port', str(port), '--mixed_precision', 'no', '--dynamo_backend', 'no',
               SCRIPT] + with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', 'run']
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode != 0
        assert 'error: --output run is not one folder shared by all machines' in err, err[-2000:]
    assert not (tmp_path / 'machine0' / 'run' / 'checkpoints').exists()


def test_a_progress_bar_on_a_terminal_stdout_when_stderr_is_piped(image_folder, tmp_path):
    """What `accelerate launch` with one process does: stdout on the terminal, stderr piped."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))  # a terminal has a size
    cmd = [sys.executable, SCRIPT] + with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output',
                                                              str(tmp_path / 'run')]
    cmd.remove('--no-progress')
    proc = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.PIPE, text=True)
    os.close(slave)
    screen = b''
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    proc.wait(timeout=300)
    os.close(master)
    assert proc.returncode == 0
    assert b'epoch 0:' in screen and (b'it/s' in screen or b's/it' in screen), screen[-500:]
