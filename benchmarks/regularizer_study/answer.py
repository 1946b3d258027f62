#!/usr/bin/env python3
""" The studies' answer as the README gives it: one table, a row per regime and comparison, every
figure read from the committed result files (v3's ``summary.json``, the gates' ``gate.json``, v5's
``summary.json`` once its study is complete), so the README quotes it and never copies by hand.

    python -m benchmarks.regularizer_study.answer      # prints the table the README carries
"""
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ['RESULTS', 'V5_SEEDS', 'answer_table', 'main']

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
    if not (study and study['config'] == config and len(study['complete_seeds']) >= V5_SEEDS):
        return [['', 'DropCluster - DropBlock (five arms, two rates)', f'{V5_SEEDS} planned', '-', '-',
                 'running: no verdict before all seeds']]
    rows = []
    for d in study['primary']:
        metric = 'test top-1' if d['metric'] == 'top1' else 'corruption acc.'
        rows.append(['', f"{d['arm']} - {d['against']} ({metric})", str(d['n']), f"{d['mean']:+.2f}",
                     _ci(d['ci_low'], d['ci_high']), d['verdict']])
    return rows


def main() -> int:
    print(answer_table(), end='')
    return 0


if __name__ == '__main__':
    sys.exit(main())
