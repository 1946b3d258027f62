#!/usr/bin/env python3
""" The studies' answer as the README gives it: the verdict in a paragraph and one table, a row per
regime and comparison, every figure read from the committed result files (v3's ``summary.json``, the
gates' ``gate.json``, v5's ``summary.json`` once its study is complete), so the README quotes them and
never copies by hand.

    python -m benchmarks.regularizer_study.answer      # prints the paragraph and the table the README carries
"""
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .protocols import CONFIGS, SECOND_RATE
from .report import METRIC

__all__ = ['RESULTS', 'V5_SEEDS', 'answer_paragraph', 'answer_table', 'main']

RESULTS = Path(__file__).resolve().parents[1] / 'results'
V5_SEEDS = 16  # the five-arm study's seeds, fixed before its runs


def _read(path: Path) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def _ci(low: float, high: float) -> str:
    return f'{low:+.2f} to {high:+.2f}'


def _control_verdict(mean: float, low: float, gain: float = 0.0) -> str:
    return 'helps' if low > 0 and mean >= gain else 'does not help'


def answer_table(results: Path = RESULTS) -> str:
    """The README's table (markdown) from the result files under ``results``."""
    rows: List[List[str]] = []
    v3 = _read(results / 'study_v3' / 'summary.json')
    if v3:
        c = v3['control'][0]
        rows.append(['v3: crop + flip, 2,000 images', 'Cutout 8 px - none (control)', str(c['n']),
                     f"{c['mean']:+.2f}", _ci(c['ci_low'], c['ci_high']), _control_verdict(c['mean'], c['ci_low'])])
        d = v3['primary'][0]
        rows.append(['', 'DropCluster - DropBlock', str(d['n']), f"{d['mean']:+.2f}", _ci(d['ci_low'], d['ci_high']),
                     d['verdict'] + ' (in a regime where the control failed)'])
    v4 = _read(results / 'study_v4' / 'gate.json')
    if v4:
        run = [c for c in v4['candidates'] if c['seeds']]
        best = max(run, key=lambda c: c['mean'])
        rows.append([f'v4: crop + flip, 1,000 images, {len(v4["candidates"])} regimes',
                     f"Cutout - none, best regime (`{best['config']}`)", str(best['seeds']), f"{best['mean']:+.2f}",
                     _ci(best['ci_low'], best['ci_high']), 'no regime passed' if v4['outcome'] == 'none passed'
                     else v4['outcome']])
    v5 = _read(results / 'study_v5' / 'gate.json')
    if v5:
        study = _read(results / 'study_v5' / 'summary.json')
        for c in v5['candidates']:
            if c['seeds']:
                rows.append([f"v5: `{c['config']}`", 'Cutout 16 px - none (control)', str(c['seeds']),
                             f"{c['mean']:+.2f}", _ci(c['ci_low'], c['ci_high']),
                             {'pass': 'helps: the gate passed', 'fail': 'does not help: failed',
                              'stopped': 'does not help: stopped', 'running': 'gate running',
                              'not run': 'not run', 'not needed': 'not needed after the pass'}[c['decision']]])
            if c['decision'] == 'pass':
                rows += _study_rows(c['config'], study)
    lines = ['| study and regime | comparison | seeds | difference (points) | 95% CI | verdict |', '|' + '---|' * 6]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows]) + '\n'


def _study_rows(config: str, study: Optional[Dict[str, Any]]) -> List[List[str]]:
    """The five-arm comparisons in the passing regime, once all their seeds are in; until then one row
    that says so (no verdict from a study still running)."""
    if not _complete(study, config):
        return [['', 'DropCluster - DropBlock (five arms, two rates)', f'{V5_SEEDS} planned', '-', '-',
                 'running: no verdict before all seeds']]
    c = study['control'][0]
    rows = [['', 'Cutout 16 px - none (control, all seeds)', str(c['n']), f"{c['mean']:+.2f}", _ci(c['ci_low'], c['ci_high']),
             _control_verdict(c['mean'], c['ci_low'])]]
    for d in study['primary']:
        metric = 'test top-1' if d['metric'] == 'top1' else 'corruption acc.'
        rows.append(['', f"{d['arm']} - {d['against']} ({metric})", str(d['n']), f"{d['mean']:+.2f}",
                     _ci(d['ci_low'], d['ci_high']), d['verdict']])
    return rows


def _complete(study: Optional[Dict[str, Any]], config: str) -> bool:
    return bool(study and study['config'] == config and len(study['complete_seeds']) >= V5_SEEDS)


def answer_paragraph(results: Path = RESULTS) -> str:
    """The verdict in v5's passing regime as one paragraph (one line of markdown): the positive control,
    the Holm-corrected family counted by outcome, each drop arm against no regulariser. Until the study
    is complete it says only that it runs."""
    gate = _read(results / 'study_v5' / 'gate.json')
    passed = [c for c in (gate or {}).get('candidates', []) if c['decision'] == 'pass']
    if not passed:
        return 'No CPU regime where a known regulariser helps has been found yet, so there is no verdict.'
    config = passed[0]['config']
    study = _read(results / 'study_v5' / 'summary.json')
    if not _complete(study, config):
        return (f'The five-arm study runs in `{config}`, the regime where the positive control passed; '
                f'there is no verdict before all {V5_SEEDS} seeds are in.')
    c = study['control'][0]
    family = study['primary']
    better = [d for d in family if 'better than' in d['verdict']]
    same = [d for d in family if d['equivalent']]
    neither = len(family) - len(better) - len(same)
    rates = (CONFIGS[config]['drop_rate'], SECOND_RATE)
    text = (f"In `{config}` ({len(study['seeds_per_arm'])} arms at {len(study['complete_seeds'])} paired seeds), "
            f"Cutout beats no regulariser by {c['mean']:+.2f} points of test top-1 (95% CI "
            f"{_ci(c['ci_low'], c['ci_high'])}), so the regime rewards regularisation. Of the {len(family)} Holm-corrected comparisons (DropCluster - DropBlock at "
            f"dropped fractions {rates[0]:g} and {rates[1]:g}, learned - grid clusters; test top-1 and "
            f"corruption accuracy): a difference in {len(better)}"
            + (' (' + '; '.join(f"{d['verdict']} in {METRIC[d['metric']]}, {d['mean']:+.2f}" for d in better) + ')'
               if better else '')
            + f", equivalence within +-{study['margin']:g} points in {len(same)}, neither in {neither}. "
            + _dropcluster_verdict([d for d in family if d['name'].startswith('dropcluster_vs_dropblock')], study['margin']))
    each = [v for v in study['versus_none'] if v['n'] >= 2]
    if each:
        low, high = min(each, key=lambda v: v['mean']), max(each, key=lambda v: v['mean'])
        text += (f" Each drop arm against no regulariser: {low['mean']:+.2f} ({low['arm']}) to {high['mean']:+.2f} "
                 f"({high['arm']}) points of test top-1, against Cutout's {c['mean']:+.2f}.")
    return text


def _dropcluster_verdict(versus_dropblock: List[Dict[str, Any]], margin: float) -> str:
    """The answer to the package's question, from the DropCluster - DropBlock comparisons alone."""
    wins = [d for d in versus_dropblock if d['verdict'] == f"{d['arm']} better than {d['against']}"]
    losses = [d for d in versus_dropblock if d['verdict'] == f"{d['against']} better than {d['arm']}"]
    if wins or losses:
        return (f'DropCluster beats DropBlock in {len(wins)} and loses to it in {len(losses)} of their '
                f'{len(versus_dropblock)} comparisons.')
    same = sum(1 for d in versus_dropblock if d['equivalent'])
    if same == len(versus_dropblock):
        return f'DropCluster and DropBlock are equivalent here within +-{margin:g} points.'
    return (f'So DropCluster is not shown to regularise better than DropBlock here, and the two are shown '
            f'equivalent within +-{margin:g} points in {same} of their {len(versus_dropblock)} comparisons.')


def main() -> int:
    print(answer_paragraph() + '\n\n' + answer_table(), end='')
    return 0


if __name__ == '__main__':
    sys.exit(main())
