""" Data and runs for the tests: small generated ImageFolder data, ``train_timm.py`` in a subprocess,
two-process launches, and the one-line error check."""
import contextlib
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'train_timm.py')
CRASH_SCRIPT = os.path.join(ROOT, 'tests', 'crash_run.py')

TINY = ['--img-size', '32', '--batch-size', '8', '--epochs', '3', '--lr', '0.01', '--warmup-epochs', '0',
        '--drop-cluster', '0.2', '--drop-cluster-start', '1', '--drop-cluster-warmup', '1',
        '--drop-cluster-update-freq', '1', '--drop-cluster-update-batches', '1', '--model', 'resnet18_dropcluster',
        '--num-clusters', '2',
        '--workers', '0', '--no-progress', '--checkpoint-hist', '2']


def make_image_folder(root, classes=3, train_per_class=12, val_per_class=4, size=16, seed=0):
    """ImageFolder train/ and validation/ splits of small PNG and JPEG images, classes by colour."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)][:classes]
    for split, n in (('train', train_per_class), ('validation', val_per_class)):
        for c, colour in enumerate(colours):
            folder = os.path.join(root, split, f'class_{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.randn(size, size, 3) * 40, 0, 255).astype(np.uint8)
                ext = 'png' if i % 2 else 'jpg'
                Image.fromarray(img).save(os.path.join(folder, f'{i}.{ext}'))
    return str(root)


def relayout(root, renames):
    """Rename split folders of an ImageFolder root, e.g. {'validation': 'test'}."""
    for old, new in renames.items():
        os.rename(os.path.join(root, old), os.path.join(root, new))
    return root


def with_epochs(args, epochs):
    args = list(args)
    args[args.index('--epochs') + 1] = str(epochs)
    return args


def run_script(args, env=None, check=True, timeout=300, crash_at_step=None, command=None):
    """``train_timm.py ARGS`` (or ``command`` + ARGS) in a subprocess; with ``crash_at_step``, the run
    is killed (SIGKILL) after that many batches, through the test-only ``tests/crash_run.py``."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1')
    full_env.update(env or {})
    if command is None:
        command = [sys.executable, SCRIPT] if crash_at_step is None else \
            [sys.executable, CRASH_SCRIPT, str(crash_at_step)]
    proc = subprocess.run(command + list(args), capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f'{command} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def run_in_process(args, command='train'):
    """``dropcluster-timm COMMAND ARGS`` in this process, returned as ``run_script`` returns a process:
    for runs that stop with an error (0.2 s here against about 8 s for a new interpreter)."""
    from dropcluster_timm.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([command] + list(args))
        except SystemExit as e:  # argparse's errors
            code = e.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_fails(proc, words, out=None):
    """Exit status 2 with a one-line ``error: ...`` naming ``words``, no traceback, no half-written checkpoint."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert all(w in lines[-1] for w in words), lines[-1]
    if out is not None:
        ckpt = os.path.join(out, 'checkpoints')
        assert not os.path.exists(ckpt) or not any(n.startswith('.tmp') for n in os.listdir(ckpt))


def load_checkpoint_clusters(folder):
    from safetensors.torch import load_file
    sd = load_file(os.path.join(folder, 'model.safetensors'))
    return {k: v for k, v in sd.items() if 'cluster' in k}, sd


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch_two(args, timeout=600):
    """``accelerate launch`` with two CPU processes over gloo, running ``args`` (a script and its
    arguments, or ``-m module ...``); returns the finished process."""
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(free_port())] + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
