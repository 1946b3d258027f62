#!/usr/bin/env python3
""" The study's report: ``report.md``, ``summary.json`` and the model card's results table
``card_table.json`` from the rows of a results folder.

    python -m benchmarks.regularizer_study.report benchmarks/results/study_v3
    python -m benchmarks.regularizer_study.report benchmarks/results/study_v5 --config v5_flip2k

The primary family is four paired comparisons: DropCluster vs matched DropBlock and learned vs grid
clusters, each on test top-1 and on mean corruption accuracy (mca); with rows of the protocol at its
second rate (``protocols.second_rate``), DropCluster vs DropBlock there too (six in all). 95% t
intervals, Holm's correction over the family, and TOST equivalence within +-0.3 points. Cutout vs
none is the check that the regime responds to regularisation at all.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .arms import ARMS, DROP_ARMS
from .protocols import CONFIGS, SECOND_RATE_ARMS, second_rate
from dropcluster_timm.files import write_atomic

from .rows import read_rows
from .stats import holm, mean_std, paired_difference, tost

__all__ = ['PRIMARY', 'SECOND_RATE_PRIMARY', 'MARGIN', 'summarise', 'headline', 'render', 'card_table', 'main']

MARGIN = 0.3  # points: the equivalence margin, fixed with the protocol
ALPHA = 0.05
# (name, arm, against, metric)
PRIMARY = (
    ('dropcluster_vs_dropblock_top1', 'dropcluster', 'dropblock', 'top1'),
    ('dropcluster_vs_dropblock_mca', 'dropcluster', 'dropblock', 'mca'),
    ('learned_vs_grid_top1', 'dropcluster', 'dropcluster_grid', 'top1'),
    ('learned_vs_grid_mca', 'dropcluster', 'dropcluster_grid', 'mca'),
)
# At the second rate (its rows are another protocol's, paired by seed): arm names with their rate.
SECOND_RATE_PRIMARY = (
    ('dropcluster_vs_dropblock_top1_second_rate', 'dropcluster', 'dropblock', 'top1'),
    ('dropcluster_vs_dropblock_mca_second_rate', 'dropcluster', 'dropblock', 'mca'),
)
CONTROL = (('cutout_vs_none_top1', 'cutout', 'none', 'top1'), ('cutout_vs_none_mca', 'cutout', 'none', 'mca'))
METRIC = {'top1': 'test top-1', 'mca': 'corruption accuracy'}


def _by_seed(rows: List[Dict], arm: str, metric: str) -> Dict[int, float]:
    return {int(r['seed']): float(r[metric]) for r in rows if r['arm'] == arm}


def _verdict(c: Dict[str, Any]) -> str:
    if c['n'] < 2:
        return 'not enough seeds'
    if c['equivalent']:  # a difference may still be detectable, but it is smaller than the margin
        return f'equivalent within +-{MARGIN:g}' + (' (a smaller difference is detectable)' if c['p_holm'] < ALPHA else '')
    if c['p_holm'] < ALPHA:
        better, worse = (c['arm'], c['against']) if c['mean'] > 0 else (c['against'], c['arm'])
        return f'{better} better than {worse}'
    return 'inconclusive'


def summarise(rows: List[Dict[str, Any]], config: Optional[str] = None) -> Dict[str, Any]:
    """The numbers of the report, for one protocol (``config``; default: the one with most rows)."""
    if not rows:
        raise ValueError('no result rows yet')
    config = config or Counter(r['config'] for r in rows).most_common(1)[0][0]
    second = second_rate(CONFIGS[config]) if config in CONFIGS else None
    second_rows = [r for r in rows if second and r['config'] == second['name']]
    rows = [r for r in rows if r['config'] == config]
    seeds_of = {arm: sorted(int(r['seed']) for r in rows if r['arm'] == arm) for arm in ARMS}
    if second_rows:
        seeds_of.update({f"{arm} @ {second['drop_rate']:g}": sorted(int(r['seed']) for r in second_rows if r['arm'] == arm)
                         for arm in SECOND_RATE_ARMS})
    complete = sorted(set.intersection(*(set(s) for s in seeds_of.values())))
    arms = []
    for arm in ARMS:
        mine = [r for r in rows if r['arm'] == arm]
        entry = dict(arm=arm, n=len(mine))
        for metric in ('top1', 'mca', 'train_top1', 'dropped_fraction'):
            entry[metric], entry[metric + '_std'] = mean_std([r[metric] for r in mine])
        arms.append(entry)
    for arm in SECOND_RATE_ARMS if second_rows else ():
        mine = [r for r in second_rows if r['arm'] == arm]
        entry = dict(arm=f"{arm} @ {second['drop_rate']:g}", n=len(mine))
        for metric in ('top1', 'mca', 'train_top1', 'dropped_fraction'):
            entry[metric], entry[metric + '_std'] = mean_std([r[metric] for r in mine])
        arms.append(entry)
    primary = []
    family = [(n, a, b, m, rows) for n, a, b, m in PRIMARY]
    family += [(n, a, b, m, second_rows) for n, a, b, m in SECOND_RATE_PRIMARY if second_rows]
    for name, arm, against, metric, mine in family:
        a, b = _by_seed(mine, arm, metric), _by_seed(mine, against, metric)
        d = paired_difference(a, b, alpha=ALPHA)
        rate = f" @ {second['drop_rate']:g}" if mine is second_rows else ''
        primary.append(dict(name=name, arm=arm + rate, against=against + rate, metric=metric, n=d['n'], mean=d['mean'],
                            ci_low=d['ci_low'], ci_high=d['ci_high'], p=d['p'], std=d['std'],
                            tost_p=tost(a, b, MARGIN, ALPHA)['p'], equivalent=tost(a, b, MARGIN, ALPHA)['equivalent']))
    adjusted = holm({c['name']: c['p'] for c in primary}, alpha=ALPHA)
    for c in primary:
        c['p_holm'] = adjusted[c['name']]
        c['verdict'] = _verdict(c)
    control = []
    for name, arm, against, metric in CONTROL:
        d = paired_difference(_by_seed(rows, arm, metric), _by_seed(rows, against, metric), alpha=ALPHA)
        control.append(dict(name=name, arm=arm, against=against, metric=metric, n=d['n'], mean=d['mean'],
                            ci_low=d['ci_low'], ci_high=d['ci_high'], p=d['p']))
    # Does each drop arm regularise at all here? Descriptive: outside the family, no correction, no verdict.
    none = _by_seed(rows, 'none', 'top1')
    versus_none = []
    for arm, mine in [(a, rows) for a in DROP_ARMS] + [(a, second_rows) for a in SECOND_RATE_ARMS if second_rows]:
        d = paired_difference(_by_seed(mine, arm, 'top1'), none, alpha=ALPHA)
        rate = f" @ {second['drop_rate']:g}" if mine is second_rows else ''
        versus_none.append(dict(arm=arm + rate, against='none', metric='top1', n=d['n'], mean=d['mean'],
                                ci_low=d['ci_low'], ci_high=d['ci_high']))
    return dict(config=config, rows=len(rows), complete_seeds=complete, seeds_per_arm={a: len(s) for a, s in seeds_of.items()},
                commits=sorted({r.get('commit', 'unknown') for r in rows}), devices=sorted({r.get('device', '?') for r in rows}),
                nondeterministic=sum(1 for r in rows if not r.get('deterministic', False)),
                arms=arms, primary=primary, control=control, versus_none=versus_none, margin=MARGIN, alpha=ALPHA)


def _f(x: float, digits: int = 2, signed: bool = False) -> str:
    if x != x:  # nan
        return '-'
    return f'{x:+.{digits}f}' if signed else f'{x:.{digits}f}'


def _p(p: float) -> str:
    return '-' if p != p else ('<0.001' if p < 0.001 else f'{p:.3f}')


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> List[str]:
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(r) + ' |' for r in body]


def statement(s: Dict[str, Any]) -> List[str]:
    """What is and is not established, in plain sentences."""
    cutout = s['control'][0]
    helps = cutout['n'] >= 2 and cutout['ci_low'] > 0
    lines = []
    if cutout['n'] < 2:
        lines.append('- The positive control has fewer than two paired seeds: nothing can be concluded yet.')
    elif helps:
        lines.append(f"- The regime responds to regularisation: Cutout beats no regulariser by "
                     f"{_f(cutout['mean'], signed=True)} points of test top-1 (95% CI {_f(cutout['ci_low'])} to "
                     f"{_f(cutout['ci_high'])}).")
    else:
        lines.append(f"- Cutout, the positive control, does not beat no regulariser here "
                     f"({_f(cutout['mean'], signed=True)} points, 95% CI {_f(cutout['ci_low'])} to {_f(cutout['ci_high'])}). "
                     'A regime where a known regulariser does not help cannot show that another one does; an '
                     'equivalence then means "no difference in this regime", not "no difference where '
                     'regularisation matters".')
    each = [f"{c['arm']} {_f(c['mean'], signed=True)} ({_f(c['ci_low'])} to {_f(c['ci_high'])})"
            for c in s['versus_none'] if c['n'] >= 2]
    if each:
        lines.append('- Against no regulariser (test top-1 points, 95% CI; descriptive, outside the corrected family): '
                     + '; '.join(each) + '.')
    for c in s['primary']:
        what = f"{c['arm']} vs {c['against']} ({METRIC[c['metric']]}, {c['n']} seeds)"
        ci = f"{_f(c['mean'], signed=True)} points, 95% CI {_f(c['ci_low'])} to {_f(c['ci_high'])}"
        if c['equivalent']:
            lines.append(f"- {what}: equivalent within +-{MARGIN:g} points ({ci}, TOST p {_p(c['tost_p'])}).")
        elif 'better than' in c['verdict']:
            lines.append(f"- {what}: a difference, {c['verdict']} ({ci}, Holm p {_p(c['p_holm'])}).")
        else:
            lines.append(f"- {what}: not established either way ({ci}); neither a difference nor "
                         f"equivalence within +-{MARGIN:g}.")
    return lines


def headline(s: Dict[str, Any]) -> str:
    """The study's answer in one sentence (the README quotes it): DropCluster against DropBlock in test
    top-1, and whether the regime rewarded the positive control."""
    d, c = s['primary'][0], s['control'][0]
    text = (f"DropCluster - DropBlock {_f(d['mean'], signed=True)} points of test top-1 (95% CI {_f(d['ci_low'])} to "
            f"{_f(d['ci_high'])}: {_verdict(d)}) at {d['n']} paired seeds")
    ci = f"{_f(c['mean'], signed=True)}, 95% CI {_f(c['ci_low'])} to {_f(c['ci_high'])}"
    if c['n'] >= 2 and c['ci_low'] > 0:
        return text + f", where Cutout beats no regulariser ({ci})"
    return text + f", but Cutout does not beat no regulariser ({ci}), so the regime could not show a difference"


def render(s: Dict[str, Any]) -> str:
    lines = [f"# Regulariser study: protocol `{s['config']}`", '',
             f"{s['rows']} runs; seeds per arm: " + ', '.join(f'{a} {n}' for a, n in s['seeds_per_arm'].items())
             + f"; {len(s['complete_seeds'])} seeds complete in all {len(s['seeds_per_arm'])} arms. Devices: {', '.join(s['devices'])}. "
             f"Code: {', '.join('`' + c[:12] + '`' for c in s['commits'])}."
             + (f" {s['nondeterministic']} runs used a non-deterministic kernel." if s['nondeterministic'] else ''),
             '', 'Protocol and arms: `benchmarks/regularizer_study/protocols.py`, `run.py` and `arms.py`. Every row of '
             '`runs.jsonl` holds the `command` that re-runs it alone. Reproducibility holds per CPU capability '
             '(`torch.backends.cpu.get_cpu_capability()`, recorded in every row from study v4 on): float results '
             'differ between AVX2 and AVX-512 machines, so a row re-run on another capability can differ slightly '
             '(a v3 row, dropcluster seed 5, re-run at its commit on an AVX2 machine gave top-1 58.78 twice against '
             'the recorded 58.83).', '', '## What is and is not established', '']
    lines += statement(s)
    lines += ['', '## Arms (mean +- std over seeds)', '']
    lines += _table(['arm', 'seeds', 'test top-1', 'corruption acc.', 'train top-1', 'dropped fraction'],
                    [[a['arm'], str(a['n']), f"{_f(a['top1'])} +- {_f(a['top1_std'])}", f"{_f(a['mca'])} +- {_f(a['mca_std'])}",
                      _f(a['train_top1']), _f(a['dropped_fraction'], 3)] for a in s['arms']])
    family = {4: 'four', 6: 'six'}.get(len(s['primary']), str(len(s['primary'])))
    lines += ['', f"## Primary comparisons (paired by seed; Holm over the {family}; TOST at +-{s['margin']:g})", '']
    lines += _table(['comparison', 'metric', 'seeds', 'mean diff', '95% CI', 'p', 'Holm p', 'TOST p', 'verdict'],
                    [[f"{c['arm']} - {c['against']}", METRIC[c['metric']], str(c['n']), _f(c['mean'], signed=True),
                      f"{_f(c['ci_low'])} to {_f(c['ci_high'])}", _p(c['p']), _p(c['p_holm']), _p(c['tost_p']),
                      c['verdict']] for c in s['primary']])
    lines += ['', '## Check on the regime: Cutout vs none', '']
    lines += _table(['comparison', 'metric', 'seeds', 'mean diff', '95% CI', 'p'],
                    [[f"{c['arm']} - {c['against']}", METRIC[c['metric']], str(c['n']), _f(c['mean'], signed=True),
                      f"{_f(c['ci_low'])} to {_f(c['ci_high'])}", _p(c['p'])] for c in s['control']])
    lines += ['', '## Each drop arm against no regulariser (descriptive: outside the family, no correction)', '']
    lines += _table(['comparison', 'metric', 'seeds', 'mean diff', '95% CI'],
                    [[f"{c['arm']} - {c['against']}", METRIC[c['metric']], str(c['n']), _f(c['mean'], signed=True),
                      f"{_f(c['ci_low'])} to {_f(c['ci_high'])}"] for c in s['versus_none']])
    return '\n'.join(lines) + '\n'


_AUGMENTED = {'crop_flip': '', 'flip': ' with horizontal flips and no random crop',
              'none': ' without crop or flip'}


def card_table(s: Dict[str, Any], folder: str = 'benchmarks/results/study_v3') -> Dict[str, Any]:
    """The study as a results table for the ``resnet18_dropcluster`` card (``dropcluster_timm.hub``'s
    results-table format): the arms, then the paired differences, and what they do and do not show.
    ``folder``: where its rows and report are (the description says so)."""
    cfg = CONFIGS.get(s['config'], {})
    rate = cfg.get('drop_rate', 0.1)
    second = ' (and 0.2 in the rows marked @ 0.2)' if any('@' in a['arm'] for a in s['arms']) else ''
    rows = [[a['arm'], a['n'], f"{_f(a['top1'])} +- {_f(a['top1_std'])}", f"{_f(a['mca'])} +- {_f(a['mca_std'])}"]
            for a in s['arms']]
    for c in s['primary'] + s['control'][:1]:
        rows.append([f"{c['arm']} - {c['against']} ({METRIC[c['metric']]})", c['n'],
                     f"{_f(c['mean'], signed=True)} [{_f(c['ci_low'])}, {_f(c['ci_high'])}]", '-'])
    return {
        'title': 'CIFAR-10 study: DropCluster against matched DropBlock, grid clusters and no regulariser',
        'description': (
            f'From `benchmarks/regularizer_study/` (rows and report in `{folder}/`): a small '
            'CIFAR-stem timm ResNet (one basic block per stage, widths 16-128) trained for 60 epochs on a '
            f"2,000-image CIFAR-10 subset per seed{_AUGMENTED[cfg.get('augment', 'crop_flip')]}, every drop arm at "
            f'a measured dropped fraction of {rate:g}{second} in the stem and stages 1-2; test top-1 on all 10,000 test images and mean accuracy over 8 corruptions x 5 '
            'severities (1,000 images). Arms: mean +- std over seeds; comparisons: paired by seed, mean '
            'difference in points [95% CI]. Not these ImageNet weights.'),
        'columns': ['arm or comparison', 'seeds', 'test top-1', 'corruption acc.'],
        'rows': rows,
        'notes': ' '.join(line[2:] for line in statement(s)),  # the report's bullet points, as one paragraph
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('results', type=Path, help='the folder of runs.jsonl')
    p.add_argument('--config', default=None, help='the protocol to report (default: the one with most rows)')
    args = p.parse_args(argv)
    try:
        summary = summarise(read_rows(args.results), args.config)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    for name, text in (('report.md', render(summary)), ('summary.json', json.dumps(summary, indent=1) + '\n'),
                       ('card_table.json', json.dumps(card_table(summary, args.results.as_posix().rstrip('/')),
                                                      indent=1) + '\n')):
        write_atomic(args.results / name, text)
    print(render(summary))
    return 0


if __name__ == '__main__':
    sys.exit(main())
