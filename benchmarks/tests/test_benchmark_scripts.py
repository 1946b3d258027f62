""" The benchmark scripts (bench_layer, bench_loop, bench_train, bench_edropout, bench_busy, edropout_pilot,
bench_own_schedule, bench_compile) run to the end at toy settings and print their tables; the figures
themselves are not checked (timings are noise on a shared machine), only that every row carries them."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='--device cuda needs a CUDA GPU')
NUM = r'-?[\d.]+'  # a printed figure (the tables print no inf or nan at these settings)


def run(name, *args, timeout=600):
    """``python -m benchmarks.<name> ARGS`` from the repository root, as the docs run it; its stdout."""
    # OMP_WAIT_POLICY: spinning OpenMP threads stall on a busy machine (what bench_busy measures).
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
    proc = subprocess.run([sys.executable, '-m', f'benchmarks.{name}', *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    return proc.stdout


def has_row(out, *cells):
    """Whether ``out`` holds a markdown table row whose leading cells match the regexes ``cells``."""
    return re.search(r'^\| ' + r' \| '.join(cells) + r' \|', out, re.M) is not None


# ---- bench_layer ----

def test_bench_layer_prints_every_table_at_tiny_shapes():
    """All four sections (the default), with the Ward reference where scikit-learn is installed."""
    out = run('bench_layer', '--tiny', '--quick', '--repeats', '1', '--device', 'cpu')
    assert '## Forward + backward, cpu, float32,' in out
    for shape in ('2x8x14x14', '2x8x28x28'):  # floor ms, then four ratios to it
        assert has_row(out, shape, NUM, *[NUM + 'x'] * 4), shape
    assert '## Drop modes, forward + backward, cpu, float32, 2x8x28x28' in out
    assert has_row(out, NUM, *[NUM + 'x'] * 4)
    try:
        import sklearn  # noqa: F401
        ward = [NUM, r'\d+x', NUM]  # Ward seconds, speed-up, WCV ratio
    except ImportError:
        ward = ['-', '-', '-']
    kinds = ('smooth regions', 'blurred noise', 'white noise', 'ReLU noise', 'ReLU noise, dead quarter')
    for shape, k in (('2x8x14x14', 4), ('2x8x28x28', 16)):
        for kind in kinds:
            assert has_row(out, shape, str(k), re.escape(kind), NUM, *ward), (shape, kind)
    assert '## Clustering methods and reference options, cpu, 2x8x28x28, K=16' in out
    for kind in kinds[:3]:
        for method in ('rena', 'kmeans', 'kmedoids', 'gmm', 'random', 'grid'):
            assert has_row(out, kind, method, NUM), (kind, method)
        assert has_row(out, kind, r'rena \+ gap count', NUM, ward[1], '-', r'counts: median \d+, range \d+-\d+')
        assert has_row(out, kind, 'Hopkins test', NUM, '-', '-', r'\d+% of maps structured')


def test_bench_layer_sections_dtype_and_channels_last():
    """--sections picks the tables; --dtype and --channels-last reach the layer and drop-mode tables."""
    out = run('bench_layer', '--tiny', '--repeats', '1', '--device', 'cpu', '--sections', 'layers', 'modes',
              '--dtype', 'bfloat16', '--channels-last')
    assert '## Forward + backward, cpu, bfloat16, channels_last,' in out
    assert '## Drop modes, forward + backward, cpu, bfloat16, channels_last,' in out
    assert has_row(out, '2x8x28x28', NUM, *[NUM + 'x'] * 4)
    assert '## Clustering' not in out  # the sections left out


@needs_cuda
def test_bench_layer_on_cuda():
    out = run('bench_layer', '--tiny', '--repeats', '1', '--device', 'cuda', '--sections', 'layers', 'modes',
              'methods', '--dtype', 'float16')
    assert '## Forward + backward, cuda, float16,' in out
    assert has_row(out, '2x8x28x28', NUM, *[NUM + 'x'] * 4)
    assert has_row(out, 'white noise', 'rena', NUM, '-', '-')  # no Ward reference on CUDA


# ---- bench_loop ----

LOOP_LINES = (r'step time, median of 1: no per-step wait [\d.]+ ms, waiting for the loss every step [\d.]+ ms, '
              r'ratio [\d.]+', r'resume at batch \d+ of \d+: loading and dropping \d+ ms, skip_first_batches \d+ ms, '
              r'ratio [\d.]+')


def test_bench_loop_cpu():
    """Step time against waiting every step, and skip_first_batches against loading (train_one_epoch's API)."""
    out = run('bench_loop', '--steps', '2', '--repeats', '1', '--device', 'cpu')
    assert 'device cpu;' in out
    for line in LOOP_LINES:
        assert re.search(line, out), line


@needs_cuda
def test_bench_loop_on_cuda():
    out = run('bench_loop', '--steps', '2', '--repeats', '1', '--device', 'cuda')
    assert 'device cuda' in out
    for line in LOOP_LINES:
        assert re.search(line, out), line


# ---- bench_train ----

TRAIN_TINY = ['--model', 'resnet18', '--img-size', '32', '--batch-size', '2', '--steps', '1',
              '--update-batch-size', '2', '--epoch-images', '1000', '--drop-rate', '0.2']


def check_train_table(out, peak):
    # rows named after --model: step ms, images/s, two speed ratios, peak (CUDA only), held for backward
    for name in ('resnet18', r'resnet18 \+ DropBlock', 'resnet18_dropcluster'):
        assert has_row(out, name, NUM, NUM, NUM + 'x', NUM + 'x', *peak, NUM, NUM + 'x'), name
    assert re.search(r'Re-clustering all 4 DropCluster layers from a batch of 2: [\d.]+ s', out)
    assert re.search(r'Amortised over one epoch of 1,000 images \(500 steps, .*\): [\d.]+% of the epoch', out)


def test_bench_train_cpu_amp_channels_last():
    """Every flag at once: a resnet18 at 32 px, bf16 autocast, channels_last."""
    out = run('bench_train', '--device', 'cpu', *TRAIN_TINY, '--amp', '--channels-last')
    assert 'resnet18, 32px, batch 2, rate 0.2, amp=True, median of 1 interleaved steps' in out
    check_train_table(out, peak=['-', '-'])
    assert '(peak memory is measured on CUDA only)' in out


@needs_cuda
def test_bench_train_on_cuda():
    out = run('bench_train', '--device', 'cuda', *TRAIN_TINY, '--amp')
    check_train_table(out, peak=[NUM, NUM + 'x'])


# ---- bench_edropout ----

def test_bench_edropout_cpu_amp():
    """An evolution step against a training step, at two images-per-state sizes (0: the default one)."""
    out = run('bench_edropout', '--device', 'cpu', '--models', 'resnet18', '--batch', '16', '--candidates', '4',
              '--batch-per-state', '0', '4', '--repeats', '1', '--amp')
    assert 'candidates 4, bf16 autocast' in out
    overhead = r'[\d.]+% / [\d.]+% / [\d.]+%'
    assert has_row(out, 'resnet18', '32', '16', r'2 \(default\)', NUM, NUM, NUM, overhead)  # 16 / (2 x 4)
    assert has_row(out, 'resnet18', '32', '16', '4', NUM, NUM, NUM, overhead)
    assert 'resnet50' not in out  # --models left it out


@needs_cuda
def test_bench_edropout_on_cuda():
    out = run('bench_edropout', '--device', 'cuda', '--batch', '16', '--repeats', '1')
    for model, size in (('resnet18', 32), ('resnet50', 96)):
        assert has_row(out, model, str(size), '16', r'1 \(default\)', NUM, NUM, NUM), model


# ---- bench_busy ----

def test_bench_busy_one_measurement():
    """Quiet against one spinning process, each measured in a fresh process."""
    # A single row (rena, passive, 1 thread): the full grid starts a fresh torch process per cell.
    out = run('bench_busy', '--what', 'rena', '--waits', 'passive', '--threads', '1', '--busy', '1', '--repeats', '1')
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
    assert [(r['load'], r['what'], r['wait'], r['threads']) for r in rows] == [
        ('quiet', 'rena', 'passive', 1), ('busy', 'rena', 'passive', 1)]
    assert all(r['seconds'] > 0 for r in rows)
    assert 'busy = 1 spinning processes; seconds (median of 1)' in out
    assert has_row(out, 'rena', 'passive', '1', NUM, NUM, NUM + 'x')


@pytest.mark.slow
def test_bench_busy_ward_and_a_model_at_every_thread_count():
    """Ward runs with the default wait only; a model's training step with each wait asked for."""
    out = run('bench_busy', '--what', 'ward', 'resnet18_dropcluster', '--waits', 'default', 'spin 10k',
              '--busy', '1', '--repeats', '1')
    threads = sorted({1, len(os.sched_getaffinity(0))})
    for n in threads:
        assert has_row(out, 'ward', 'default', str(n), NUM, NUM, NUM + 'x')
        for wait in ('default', 'spin 10k'):
            assert has_row(out, 'resnet18_dropcluster', wait, str(n), NUM, NUM, NUM + 'x'), (wait, n)
    assert not has_row(out, 'ward', 'spin 10k')


# ---- edropout_pilot ----

def tiny_cifar_cache(folder, n_train=500, n_test=40):
    """A CIFAR-shaped cache ``folder/cifar10_uint8.safetensors`` of random images: load_cifar10 reads it
    instead of the archive (no data needed); 50 per class, as --quick's 500 training images need."""
    g = torch.Generator().manual_seed(0)
    save_file({'train_x': torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
               'train_y': torch.arange(n_train) % 10,
               'test_x': torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
               'test_y': torch.arange(n_test) % 10}, str(Path(folder) / 'cifar10_uint8.safetensors'))


def read_runs(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_edropout_pilot_every_setting_and_the_budget(tmp_path):
    """One seed of every arm at toy settings; the budget stops it before the second seed."""
    tiny_cifar_cache(tmp_path)
    results = tmp_path / 'results'
    out = run('edropout_pilot', '--data', tmp_path / 'absent.tar.gz', '--cache-dir', tmp_path, '--results', results,
              '--device', 'cpu', '--seeds', '0', '1', '--train-images', '20', '--epochs', '1', '--ft-epochs', '1',
              '--layers', '1', '1', '1', '1', '--channels', '4', '8', '8', '8', '--batch-size', '10', '--lr', '0.01',
              '--candidates', '4', '--interval', '1', '--converge', '2', '--keep-prob', '0.6',
              '--batch-per-state', '2', '--threads', '1', '--budget-minutes', '1e-4')
    # 0.006 s: seed 0 starts at once, seed 1 not (seed 0 trains five models)
    assert 'budget reached: run again to go on' in out
    runs = read_runs(results / 'runs.jsonl')
    assert sorted(r['arm'] for r in runs) == sorted(('unpruned', 'edropout', 'edropout_ft', 'magnitude',
                                                     'magnitude_ft', 'random_state'))
    assert {r['seed'] for r in runs} == {0}
    by = {r['arm']: r for r in runs}
    assert by['edropout']['top1'] == by['edropout']['top1_before_pruning']  # pruning zeroed channels is exact
    assert by['magnitude']['params_m'] == by['edropout']['params_m'] < by['unpruned']['params_m']
    assert json.loads((results / 'config.json').read_text())['channels'] == [4, 8, 8, 8]
    for arm in by:
        assert has_row(out, arm, '1', rf'{NUM} ± (nan|{NUM})', NUM, NUM, NUM), arm
    assert re.search(r'EDropout kept [\d.]+% of the prunable channels', out)
    assert (results / 'report.md').read_text() in out


def test_edropout_pilot_quick(tmp_path):
    """--quick: two seeds, so the paired comparisons are printed; its results go under the cache folder."""
    tiny_cifar_cache(tmp_path)
    out = run('edropout_pilot', '--quick', '--data', tmp_path / 'absent.tar.gz', '--cache-dir', tmp_path,
              '--device', 'cpu', '--threads', '1')
    assert len(read_runs(tmp_path / 'edropout_pilot_quick' / 'runs.jsonl')) == 12  # 6 arms x 2 seeds
    assert has_row(out, 'unpruned', '2', rf'{NUM} ± {NUM}', NUM, NUM, NUM)
    # n, mean difference, 95% interval, p (nan where both arms scored the same on the 40 test images)
    for a, b in (('edropout_ft', 'magnitude_ft'), ('edropout', 'random_state'), ('magnitude_ft', 'unpruned')):
        assert has_row(out, f'{a} - {b}', '2', r'[+-][\d.]+', r'\[.+, .+\]', r'\S+'), (a, b)


@needs_cuda
def test_edropout_pilot_quick_on_cuda(tmp_path):
    tiny_cifar_cache(tmp_path)
    out = run('edropout_pilot', '--quick', '--data', tmp_path / 'absent.tar.gz', '--cache-dir', tmp_path,
              '--device', 'cuda')
    assert len(read_runs(tmp_path / 'edropout_pilot_quick' / 'runs.jsonl')) == 12
    assert has_row(out, 'edropout_ft - magnitude_ft', '2')


# ---- bench_own_schedule ----

def test_bench_own_schedule_cpu():
    """The amortised cost of the layers' own re-clustering, and the recompiles of a compiled model."""
    out = run('bench_own_schedule', '--model', 'resnet18_dropcluster', '--img-size', '64', '--batch', '4',
              '--steps', '1', '--compile-steps', '6', '--compile-interval', '2')
    assert re.search(rf'median training step {NUM} ms without re-clustering, {NUM} ms re-clustering every layer; '
                     rf'amortised at the default interval of 1000 steps: {NUM}% of a step', out), out
    # One graph for the steps that re-cluster, one for the others, none after the second step.
    assert re.search(r'torch.compile over 6 steps re-clustering every 2 \(3 re-clusterings\): 1 graphs compiled at '
                     r'the first step, 1 at the second, 0 after it', out), out
    for kind in ('re-clustering', 'plain'):
        assert f'torch._dynamo.explain at a {kind} step: 1 graph(s), 0 graph break(s)' in out, out


# ---- bench_compile ----

def test_bench_compile_cpu():
    """The compiled and eager steps of a self-driving model against the recipe-driven one (the dry run of
    the device script's part)."""
    out = run('bench_compile', '--img-size', '32', '--batch', '2', '--steps', '2', '--backend', 'eager')
    for name in ('self-driving', 'recipe'):
        assert re.search(rf'{name}: compile +{NUM} s, compiled step +{NUM} ms, eager step +{NUM} ms', out), out
    assert re.search(rf'self-driving / recipe: compiled step {NUM}x, eager step {NUM}x, compile time {NUM}x', out), out
    assert 'CPU (' in out
