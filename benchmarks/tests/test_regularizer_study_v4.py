""" Study v4's harness: the pre-registered candidates, the gate's rule, rows written whole by any
number of workers or drivers, and a CIFAR-10 cache that two processes may build at once."""
import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from benchmarks.regularizer_study import gate as G
from benchmarks.regularizer_study import protocols as P
from benchmarks.regularizer_study import run as R
from benchmarks.regularizer_study.data import load_cifar10
from benchmarks.regularizer_study.rows import append_row, read_rows

REPO = Path(__file__).resolve().parents[2]
CIFAR = REPO.parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'


def test_candidates_are_registered_cheapest_first_with_a_scaled_schedule():
    names = [c['name'] for c in P.V4_CANDIDATES]
    assert 3 <= len(names) <= 4 and all(n in P.CONFIGS for n in names)
    assert [c['est_minutes'] for c in P.V4_CANDIDATES] == sorted(c['est_minutes'] for c in P.V4_CANDIDATES)
    for c in P.V4_CANDIDATES:
        assert c['est_minutes'] <= 15 and c['test_images'] == 10000 and c['train_images'] == 1000
        assert (c['drop_start'], c['drop_warmup'], c['recluster_every']) == (c['epochs'] // 5, c['epochs'] // 2,
                                                                             c['epochs'] // 5)
        assert R.parse_args(['--config', c['name'], '--arm', 'cutout', '--seed', '0']).config == c['name']


def _rows(config, gains, none=60.0):
    rows = []
    for seed, gain in enumerate(gains):
        for arm, top1 in (('none', none + 0.1 * seed), ('cutout', none + 0.1 * seed + gain)):
            rows.append(dict(config=config, arm=arm, seed=seed, top1=top1, train_top1=99.5, total_time_s=600.0,
                             cpu_capability='AVX2'))
    return rows


@pytest.mark.parametrize('gains, decision', [
    ([2.0, 1.6, 2.4, 1.8, 2.1, 1.9], 'pass'),
    ([2.0, 1.6, 2.4, 1.8, 2.1], 'running'),              # five seeds, the CI can still reach +1
    ([0.1, -0.2, 0.3, 0.0], 'stopped'),                  # after the pilot the upper bound is below +1
    ([0.1, 1.9, 0.4, 1.5], 'running'),
    ([0.9, 1.0, 1.1, 0.8, 1.3, 0.7], 'fail'),            # mean below +1 though the CI is above 0
    ([1.0, 5.0, -2.0, 4.0, -1.0, 3.0], 'fail'),          # mean above +1, CI not above 0
])
def test_gate_decision(gains, decision):
    name = P.V4_CANDIDATES[0]['name']
    assert G.gate_status(_rows(name, gains))[0]['decision'] == decision


def test_gate_runs_candidates_in_order_and_stops_at_the_first_pass(tmp_path):
    first, second = (c['name'] for c in P.V4_CANDIDATES[:2])
    assert G.next_gate_job([], set()) == dict(config=first, arm='none', seed=0)
    rows = _rows(first, [0.1, -0.2, 0.3, 0.0])  # stopped: the next candidate's first pair
    assert G.next_gate_job(rows, set()) == dict(config=second, arm='none', seed=0)
    rows = _rows(first, [0.1, -0.2, 0.3]) + [dict(_rows(first, [0] * 4)[6])]  # seed 3 half done
    assert G.next_gate_job(rows, {(first, 'cutout', 3)}) == dict(config=second, arm='none', seed=0)  # it may stop
    assert G.next_gate_job(rows, set()) == dict(config=first, arm='cutout', seed=3)
    running = {(first, 'cutout', 5)}
    rows = _rows(first, [2.0, 1.6, 2.4, 1.8, 2.1]) + [dict(_rows(first, [0] * 6)[10], seed=5)]
    assert G.next_gate_job(rows, running) == dict(config=second, arm='none', seed=0)  # the last run is in flight
    rows = _rows(first, [2.0, 1.6, 2.4, 1.8, 2.1, 1.9])
    assert G.next_gate_job(rows, set()) is None
    status = G.gate_status(rows)
    assert [e['decision'] for e in status] == ['pass'] + ['not run'] * (len(status) - 1)
    for row in rows:
        append_row(tmp_path, row)
    assert G.main(['--study', 'v4', '--results', str(tmp_path), '--report-only']) == 0
    text = (tmp_path / 'gate.md').read_text()
    assert f'The gate passed at `{first}`' in text and text.count('| `v4_') == len(P.V4_CANDIDATES)


def test_a_row_is_written_once_and_whole(tmp_path):
    row = dict(config='cpu', arm='none', seed=0, top1=50.0)
    assert append_row(tmp_path, row) and not append_row(tmp_path, dict(row, train_time_s=3.0))
    with open(tmp_path / 'runs.jsonl', 'a') as f:
        f.write('{"config": "cpu", "arm": "cut')  # a writer killed mid-line
    assert append_row(tmp_path, dict(row, seed=1))
    assert [r['seed'] for r in read_rows(tmp_path)] == [0, 1]


def _append_many(folder, start):
    for seed in range(start, start + 25):
        append_row(folder, dict(config='cpu', arm='none', seed=seed, top1=float(seed), pad='x' * 5000))


def test_two_writers_at_once_lose_and_duplicate_no_row(tmp_path):
    ctx = mp.get_context('spawn')
    procs = [ctx.Process(target=_append_many, args=(tmp_path, start)) for start in (0, 10)]  # 15 keys overlap
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    lines = (tmp_path / 'runs.jsonl').read_text().splitlines()
    assert sorted(json.loads(line)['seed'] for line in lines) == list(range(35))


def _load(data, cache, out):
    Path(out).write_text(json.dumps({k: int(v.sum()) for k, v in load_cifar10(data, cache).items()}))


@pytest.mark.skipif(not CIFAR.exists(), reason=f'CIFAR-10 archive not found at {CIFAR}')
def test_two_processes_building_the_cache_at_once_both_get_the_data(tmp_path):
    ctx = mp.get_context('spawn')
    procs = [ctx.Process(target=_load, args=(str(CIFAR), str(tmp_path / 'cache'), tmp_path / f'{i}.json'))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    sums = [json.loads((tmp_path / f'{i}.json').read_text()) for i in range(2)]
    assert sums[0] == sums[1] and sums[0]['train_y'] == int(torch.arange(10).mul(5000).sum())


def test_driver_runs_only_the_chosen_arms_with_two_workers(cifar_cache, tmp_path):
    args = ['--config', 'tiny', '--results', str(tmp_path), '--seeds', '0', '1', '--workers', '2',
            '--arms', 'none', 'cutout', '--cache-dir', str(cifar_cache)]
    assert R.main(args) == 0
    rows = read_rows(tmp_path)
    assert sorted((r['seed'], r['arm']) for r in rows) == [(s, a) for s in (0, 1) for a in ('cutout', 'none')]
    assert {r['cpu_capability'] for r in rows} == {torch.backends.cpu.get_cpu_capability()}
    assert all(r['cpu_model'] and r['threads'] == 1 for r in rows)
    one = R.run_one('cutout', 1, P.TINY, 'cpu', load_cifar10(str(CIFAR), str(cifar_cache)), commit='x')
    assert one['top1'] == next(r['top1'] for r in rows if (r['arm'], r['seed']) == ('cutout', 1))


def test_gate_says_when_no_candidate_passed(tmp_path):
    rows = [r for i, c in enumerate(P.V4_CANDIDATES) for r in _rows(c['name'], [0.1, -0.2, 0.3, 0.0], 60.0 + i)]
    for row in rows:
        append_row(tmp_path, row)
    G.write_gate(tmp_path)
    summary = json.loads((tmp_path / 'gate.json').read_text())
    assert summary['outcome'] == 'none passed'
    assert [c['decision'] for c in summary['candidates']] == ['stopped'] * len(P.V4_CANDIDATES)
    assert summary['candidates'][1]['none_top1'] == pytest.approx(61.15)
    statement = G.gate_statement(summary)
    assert 'No candidate passed' in statement and statement in (tmp_path / 'gate.md').read_text()
    assert f"`{P.V4_CANDIDATES[0]['name']}` stopped after the pilot (4 seeds: +0.05, 95% CI -0.28 to +0.38)" in statement


def test_committed_gate_is_current_and_quoted_by_the_readme_and_guide():
    """gate.json is what the committed rows give, and the README and the benchmarks guide quote it."""
    folder = REPO / 'benchmarks' / 'results' / 'study_v4'
    committed = json.loads((folder / 'gate.json').read_text())
    status = G.gate_status(read_rows(folder))
    stale = 'stale: run `python -m benchmarks.regularizer_study.gate --study v4 --results benchmarks/results/study_v4 --report-only`'
    assert committed == json.loads(json.dumps(G.gate_summary(status))), stale
    assert (folder / 'gate.md').read_text() == G.render_gate(status), stale
    statement, headline = G.gate_statement(committed), G.gate_headline(committed)
    assert statement in ' '.join((REPO / 'docs' / 'benchmarks.md').read_text().split()), statement
    assert headline in ' '.join((REPO / 'README.md').read_text().split()), f'README.md does not quote: {headline}'
