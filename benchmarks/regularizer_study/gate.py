#!/usr/bin/env python3
""" The gate: does a candidate regime reward a known regulariser before the arms are compared?

For each candidate of a study (``protocols.CANDIDATES``: v4, v5), cheapest first, run ``none`` and
``cutout`` at up to 6 paired seeds. A candidate passes when Cutout - none is at least +1.0 point of test top-1 with the
paired 95% CI above 0 at 6 seeds; its pilot stops early when after 4 seeds the CI's upper bound is
below +1.0. The gate ends at the first candidate that passes (every one before it was cheaper and
failed), or when every candidate is decided. ``gate.md`` and ``gate.json`` (the figures the README
and the benchmarks guide quote, through ``gate_statement``) are rewritten after every row. With
``--study-seeds N`` the driver goes on, once a candidate passes, to the five arms there at seeds
0..N-1 plus DropBlock and DropCluster at the second rate (``protocols.second_rate``), seed by seed;
the gate's own rows are that study's first ``none`` and ``cutout`` rows.

    python -m benchmarks.regularizer_study.gate --study v5 --results benchmarks/results/study_v5 --workers 2 --study-seeds 16
    python -m benchmarks.regularizer_study.gate --study v4 --results benchmarks/results/study_v4 --report-only
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from .arms import ARMS
from .protocols import CANDIDATES, SECOND_RATE_ARMS, V4_CANDIDATES, second_rate
from dropcluster_timm.files import write_atomic

from .rows import read_rows
from .stats import mean_std, paired_difference

__all__ = ['GATE_ARMS', 'GAIN', 'SEEDS', 'PILOT_SEEDS', 'decide', 'gate_status', 'next_gate_job',
           'next_study_job', 'gate_summary', 'gate_statement', 'gate_headline', 'render_gate', 'write_gate', 'main']

GATE_ARMS = ('none', 'cutout')
GAIN = 1.0  # points of test top-1 that Cutout must add
SEEDS = 6
PILOT_SEEDS = 4


def decide(diff: Dict[str, Any]) -> str:
    """'pass', 'fail', 'stopped' (after the pilot seeds the CI cannot reach +GAIN) or 'running'."""
    n = diff['n']
    if n >= PILOT_SEEDS and diff['ci_high'] < GAIN:
        return 'stopped' if n < SEEDS else 'fail'
    if n >= SEEDS:
        return 'pass' if diff['mean'] >= GAIN and diff['ci_low'] > 0 else 'fail'
    return 'running'


def gate_status(rows: List[Dict[str, Any]], candidates: Sequence[Dict[str, Any]] = V4_CANDIDATES) -> List[Dict[str, Any]]:
    """One entry per candidate, in gate order: its rows' figures and its decision (after a pass: 'not run',
    or 'not needed' for one whose runs started before the pass was decided)."""
    out, passed = [], False
    for cfg in candidates:
        mine = [r for r in rows if r['config'] == cfg['name'] and r['arm'] in GATE_ARMS]
        by = {arm: {int(r['seed']): r for r in mine if r['arm'] == arm} for arm in GATE_ARMS}
        seeds = sorted(set(by['none']) & set(by['cutout']))[:SEEDS]
        diff = paired_difference({s: by['cutout'][s]['top1'] for s in seeds}, {s: by['none'][s]['top1'] for s in seeds})
        entry = dict(config=cfg['name'], cfg=cfg, seeds=seeds, diff=diff,
                     decision=('not needed' if mine else 'not run') if passed else decide(diff),
                     minutes=mean_std([r['total_time_s'] / 60 for r in mine])[0],
                     capabilities=sorted({r.get('cpu_capability', '?') for r in mine}))
        for arm in GATE_ARMS:
            entry[f'{arm}_top1'] = mean_std([by[arm][s]['top1'] for s in seeds])[0]
            entry[f'{arm}_train_top1'] = mean_std([by[arm][s]['train_top1'] for s in seeds])[0]
        passed = passed or entry['decision'] == 'pass'
        out.append(entry)
    return out


def next_gate_job(rows: List[Dict[str, Any]], running: Set[Tuple],
                  candidates: Sequence[Dict[str, Any]] = V4_CANDIDATES) -> Optional[Dict[str, Any]]:
    """The next (config, arm, seed) to run: the first undecided candidate's next missing pair up to its
    next decision (after the pilot seeds, then after all), or the next candidate's when the runs up to
    that decision are done or in flight. None when nothing is left to start."""
    done = {(r['config'], r['arm'], int(r['seed'])) for r in rows}
    for entry in gate_status(rows, candidates):
        if entry['decision'] == 'pass':
            return None
        if entry['decision'] != 'running':
            continue
        decision_at = PILOT_SEEDS if len(entry['seeds']) < PILOT_SEEDS else SEEDS
        for seed in range(decision_at):
            for arm in GATE_ARMS:
                key = (entry['config'], arm, seed)
                if key not in done and key not in running:
                    return dict(config=entry['config'], arm=arm, seed=seed)
    return None


def next_study_job(rows: List[Dict[str, Any]], running: Set[Tuple], candidates: Sequence[Dict[str, Any]],
                   seeds: int) -> Optional[Dict[str, Any]]:
    """After a pass: the next missing run of the five arms at the passing candidate and of
    ``SECOND_RATE_ARMS`` at its second rate, seed-major over ``range(seeds)`` (a stopped driver leaves
    whole seeds behind it). None before a pass or when all are done or in flight."""
    passed = [e['cfg'] for e in gate_status(rows, candidates) if e['decision'] == 'pass']
    if not passed:
        return None
    done = {(r['config'], r['arm'], int(r['seed'])) for r in rows}
    main, second = passed[0], second_rate(passed[0])
    for seed in range(seeds):
        for cfg, arms in ((main, ARMS), (second, SECOND_RATE_ARMS)):
            for arm in arms:
                key = (cfg['name'], arm, seed)
                if key not in done and key not in running:
                    return dict(config=cfg['name'], arm=arm, seed=seed)
    return None


_AUGMENT = {'crop_flip': '', 'flip': ', flip only (no crop)', 'none': ', no crop or flip'}


def _describe(cfg: Dict[str, Any]) -> str:
    layers = '' if cfg['layers'] == [1, 1, 1, 1] else f", {cfg['layers'][0]} blocks a stage"
    return (f"widths {'-'.join(map(str, cfg['channels']))}{layers}, {cfg['train_images']:,} images, "
            f"{cfg['epochs']} epochs{_AUGMENT[cfg['augment']]}, Cutout {cfg['cutout_size']} px")


def gate_summary(status: List[Dict[str, Any]], study: str = 'v4') -> Dict[str, Any]:
    """The gate's figures as plain JSON (None where undefined): one entry per candidate and the outcome,
    'pass', 'none passed' or 'running'."""
    num = lambda x: None if x != x else x  # noqa: E731
    candidates = [dict(config=e['config'], regime=_describe(e['cfg']), decision=e['decision'], seeds=e['diff']['n'],
                       mean=num(e['diff']['mean']), ci_low=num(e['diff']['ci_low']), ci_high=num(e['diff']['ci_high']),
                       none_top1=num(e['none_top1']), cutout_top1=num(e['cutout_top1']),
                       none_train_top1=num(e['none_train_top1']), cutout_train_top1=num(e['cutout_train_top1']),
                       minutes=num(e['minutes']), cpu_capabilities=e['capabilities'])
                  for e in status]
    decisions = [c['decision'] for c in candidates]
    outcome = 'pass' if 'pass' in decisions else 'running' if 'running' in decisions else 'none passed'
    return dict(study=study, gain=GAIN, seeds=SEEDS, pilot_seeds=PILOT_SEEDS, outcome=outcome, candidates=candidates)


_DONE = {'stopped': 'stopped after the pilot', 'fail': 'failed', 'pass': 'passed', 'running': 'running',
         'not run': 'not run', 'not needed': 'not needed after the pass'}


def gate_statement(summary: Dict[str, Any]) -> str:
    """The gate's state in a paragraph, quoted word for word by the README and the benchmarks guide."""
    def one(c: Dict[str, Any]) -> str:
        if not c['seeds']:
            return f"`{c['config']}` {'not run' if c['decision'] == 'not run' else 'no seed finished yet'}"
        ci = '' if c['ci_low'] is None else f", 95% CI {c['ci_low']:+.2f} to {c['ci_high']:+.2f}"
        seeds = f"{c['seeds']} seed{'s' if c['seeds'] > 1 else ''}"
        return f"`{c['config']}` {_DONE[c['decision']]} ({seeds}: {c['mean']:+.2f}{ci})"

    run = [c for c in summary['candidates'] if c['seeds']]
    fitted = min((min(c['none_train_top1'], c['cutout_train_top1']) for c in run), default=math.nan)
    caps = sorted({cap for c in run for cap in c['cpu_capabilities']})
    text = (f"Cutout - none in test top-1 points per candidate ({', '.join(caps) or 'no CPU yet'}): "
            + '; '.join(one(c) for c in summary['candidates']) + '.')
    if run:
        so_far = ' so far' if summary['outcome'] == 'running' else ''
        text += (f' Both arms fit their training images in every candidate run{so_far} (the lowest mean train '
                 f'top-1 of an arm: {fitted:.1f}%).')
    passed = [c['config'] for c in summary['candidates'] if c['decision'] == 'pass']
    if passed:
        return text + f' The gate passed at `{passed[0]}`: the five-arm study runs there.'
    if summary['outcome'] == 'running':
        return text + ' The gate is still running.'
    return text + (' No candidate passed: no CPU-affordable regime where Cutout helps was found, so the v3 study '
                   'stays the answer and the GPU protocol is the next evidence.' if summary.get('study', 'v4') == 'v4'
                   else ' No candidate passed: the next regime is the GPU protocol (a larger network on 5,000 '
                   'images, where a network that fits its images with the crop is affordable).')


def gate_headline(summary: Dict[str, Any]) -> str:
    """The gate's outcome in one clause (the README quotes it; ``gate_statement`` has every candidate)."""
    run = [c for c in summary['candidates'] if c['seeds']]
    passed = [c for c in run if c['decision'] == 'pass']
    if passed:
        c = passed[0]
        return (f"the gate passed at `{c['config']}` (Cutout - none {c['mean']:+.2f} points of test top-1, 95% CI "
                f"{c['ci_low']:+.2f} to {c['ci_high']:+.2f}, {c['seeds']} seeds)")
    if summary['outcome'] == 'running':
        return 'the gate is still running'
    means = [c['mean'] for c in run]
    return (f"none of its {len(summary['candidates'])} candidate regimes passed (Cutout - none between "
            f"{min(means):+.2f} and {max(means):+.2f} points of test top-1)")


def render_gate(status: List[Dict[str, Any]], study: str = 'v4') -> str:
    f = lambda x, s=False: '-' if x != x else (f'{x:+.2f}' if s else f'{x:.2f}')  # noqa: E731
    lines = [f'# Study {study}: the gate on the positive control', '',
             f'Each candidate regime (`benchmarks/regularizer_study/protocols.py`, registered before its first run) '
             f'runs `none` and `cutout` at up to {SEEDS} paired seeds. It passes when Cutout - none is at least '
             f'+{GAIN:g} point of test top-1 (all 10,000 test images) with the paired 95% CI above 0; its pilot '
             f'stops when after {PILOT_SEEDS} seeds the upper CI bound is below +{GAIN:g}. The cheapest passing '
             'candidate hosts the five-arm study. Minutes: mean wall time of one run (one thread, two runs at a time).',
             '', '| candidate | regime | est. min | min/run | seeds | train top-1 none / cutout | test top-1 none '
             '| Cutout - none [95% CI] | CPU | decision |', '|' + '---|' * 10]
    for e in status:
        d = e['diff']
        lines.append(f"| `{e['config']}` | {_describe(e['cfg'])} | {e['cfg']['est_minutes']:.1f} | {f(e['minutes'])} "
                     f"| {d['n']} | {f(e['none_train_top1'])} / {f(e['cutout_train_top1'])} | {f(e['none_top1'])} "
                     f"| {f(d['mean'], True)} [{f(d['ci_low'])}, {f(d['ci_high'])}] | {', '.join(e['capabilities']) or '-'} "
                     f"| {e['decision']} |")
    lines += ['', gate_statement(gate_summary(status, study))]
    return '\n'.join(lines) + '\n'


def write_gate(results: Path, study: str = 'v4') -> str:
    """Rewrite ``gate.md`` and ``gate.json`` in ``results`` from its rows; returns gate.md's text."""
    status = gate_status(read_rows(results), CANDIDATES[study])
    text = render_gate(status, study)
    write_atomic(results / 'gate.json', json.dumps(gate_summary(status, study), indent=1) + '\n')
    write_atomic(results / 'gate.md', text)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    from . import run as R  # the driver (its data loading and workers), for runs only

    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--study', choices=sorted(CANDIDATES), required=True,
                   help="whose candidates to gate (v4, v5; tiny: seconds, for tests), into the --results folder "
                        "of that study")
    p.add_argument('--results', type=Path, required=True, help='folder of runs.jsonl; gate.md is written there')
    p.add_argument('--study-seeds', type=int, default=0,
                   help='after a pass, run the five-arm study there at this many seeds (default 0: the gate alone)')
    p.add_argument('--report-only', action='store_true', help='write gate.md from the rows and run nothing')
    p.add_argument('--workers', type=int, default=1, help='runs at once, each in its own one-thread process')
    p.add_argument('--budget-minutes', type=float, default=None, help='start no run that would end past this')
    p.add_argument('--data', default=str(R.DEFAULT_DATA), help='cifar10-jpg.tar.gz or its unpacked folder')
    p.add_argument('--cache-dir', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'dropcluster_cifar10'),
                   help='where the decoded images are cached')
    args = p.parse_args(argv)
    if args.workers < 1 or args.study_seeds < 0:
        p.error('--workers must be >= 1 and --study-seeds >= 0')
    candidates = CANDIDATES[args.study]
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        R.check_package_location()
        R.load_cifar10(args.data, args.cache_dir)  # built once here, before the workers start
        args.device, args.threads = 'cpu', 1
        deadline = time.time() + args.budget_minutes * 60 if args.budget_minutes else float('inf')

        def next_job(running: Set[Tuple]) -> Optional[Dict[str, Any]]:
            write_gate(args.results, args.study)
            rows = read_rows(args.results)
            return (next_gate_job(rows, running, candidates)
                    or next_study_job(rows, running, candidates, args.study_seeds))

        R.run_jobs(next_job, args.results, R.common_job_args(args, R.commit_of_checkout()), args.workers, deadline)
    print(write_gate(args.results, args.study))
    return 0


if __name__ == '__main__':
    sys.exit(main())
