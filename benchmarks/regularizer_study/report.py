#!/usr/bin/env python3
""" The regularizer study's report: tables, paired comparisons and what they establish.

    python -m benchmarks.regularizer_study.report RESULTS_DIR

reads ``RESULTS_DIR/runs*.jsonl`` (and ``plan.json`` if present) and writes ``report.md``,
``card_table.json`` (a results table for a model card, see ``dropcluster_timm.model_card``) and
``report.png``. Every number and every sentence follows from the rows: partial results give a
partial report that says what is missing.
"""
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import stats

__all__ = ['ARM_LABELS', 'REFERENCE', 'REQUIRED_SEEDS', 'MARGIN', 'ALPHA', 'load_rows', 'load_plan', 'label',
           'final_regime', 'arm_summaries', 'comparisons', 'build_report', 'plot', 'main']

ARM_LABELS = {
    'none': 'No structured dropout',
    'cutout': 'Cutout (positive control)',
    'dropblock_timm': 'DropBlock as timm configures it (stages 3-4)',
    'dropblock_matched': 'DropBlock, stages 3-4, matched (per channel, calibrated)',
    'dropblock_stem': 'DropBlock, stem, matched (per channel, calibrated)',
    'dc_stages': 'DropCluster learned (rena) clusters, stages 3-4',
    'dc_stem': 'DropCluster learned (rena) clusters, stem',
    'dc_grid_stages': 'DropCluster grid clusters, stages 3-4',
    'dc_grid_stem': 'DropCluster grid clusters, stem',
    'dc_random_stages': 'DropCluster random clusters, stages 3-4',
    'dc_random_stem': 'DropCluster random clusters, stem',
}
# The reference options (run.py --option-arms): a secondary family, each against dc_stages.
OPTION_LABELS = {
    'dc_gap_stages': 'DropCluster, stages 3-4, per-map counts (gap statistic)',
    'dc_hopkins_stages': 'DropCluster, stages 3-4, unstructured maps undropped (Hopkins test)',
    'dc_sizedrop_stages': 'DropCluster, stages 3-4, size-dependent cluster rates',
    'dc_shared_stages': 'DropCluster, stages 3-4, one mask per batch',
    'dc_kmedoids_stages': 'DropCluster, stages 3-4, k-medoids clusters',
    'dc_gmm_stages': 'DropCluster, stages 3-4, Gaussian-mixture (EM) clusters',
    'dc_expramp_stages': 'DropCluster, stages 3-4, exponential ramp',
    'dc_softreset_stages': 'DropCluster, stages 3-4, BRB soft resets (keep 90%) before re-clustering',
}
OPTION_BASE = 'dc_stages'
UNREGULARISED = ('none', 'cutout')  # the arms without a tuned rate
REFERENCE = 'dropblock_matched'  # fixed blocks, matched to DropCluster in placement, size and dropped fraction
REQUIRED_SEEDS = 16  # phase B's planned minimum per arm
MARGIN = 0.5  # equivalence margin, top-1 points
ALPHA = 0.05
METRICS = {'test_top1': 'clean test top-1', 'mean_corruption_top1': 'mean corruption top-1 (mCA)'}
_KIND = {'reference': 'vs matched DropBlock', 'grid': 'learned vs grid clusters',
         'random': 'learned vs random clusters'}

Row = Dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Input


def load_rows(results_dir) -> List[Row]:
    """Every run of ``results_dir/runs*.jsonl`` once (files merged from machines repeat keys: the
    first copy is kept). Raises ``ValueError`` naming the file and line of a malformed line."""
    rows: Dict[str, Row] = {}
    for path in sorted(Path(results_dir).glob('runs*.jsonl')):
        for n, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f'{path}:{n}: not a JSON line ({e})') from None
            if not isinstance(row, dict) or not isinstance(row.get('key'), str):
                raise ValueError(f'{path}:{n}: expected a JSON object with a string "key"')
            rows.setdefault(row['key'], row)
    return list(rows.values())


def load_plan(results_dir) -> Dict[str, Any]:
    """``results_dir/plan.json``, or {} when absent. Raises ``ValueError`` if it is not a JSON object."""
    path = Path(results_dir) / 'plan.json'
    if not path.exists():
        return {}
    try:
        plan = json.loads(path.read_text(encoding='utf-8'))
    except ValueError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(plan, dict):
        raise ValueError(f'{path}: expected a JSON object')
    return plan


# ----------------------------------------------------------------------------------------------
# Selection and formatting helpers


def label(arm: str) -> str:
    return ARM_LABELS.get(arm) or OPTION_LABELS.get(arm, arm)


def _ordered(arms: Iterable[str]) -> List[str]:
    """Known arms in the study's order, then unknown ones alphabetically."""
    known = list(ARM_LABELS) + list(OPTION_LABELS)
    return sorted(set(arms), key=lambda a: (known.index(a), '') if a in known else (len(known), a))


def _regime_key(regime: str, rows: List[Row]) -> Tuple:
    """Sort regimes by (training images, epochs), read from the rows."""
    r = next((r for r in rows if r.get('regime') == regime), {})
    return (r.get('train_size') or 0, r.get('epochs') or 0, regime)


def _select(rows: List[Row], **match) -> List[Row]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _by_seed(rows: List[Row], metric: str) -> Dict[int, float]:
    return {r['seed']: float(r[metric]) for r in rows if isinstance(r.get(metric), (int, float))}


def _is_nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _num(x: Optional[float], digits: int = 2) -> str:
    return 'n/a' if _is_nan(x) else f'{x:.{digits}f}'


def _signed(x: Optional[float]) -> str:
    return 'n/a' if _is_nan(x) else f'{x:+.2f}'


def _pm(values: Sequence[float]) -> str:
    if not values:
        return '-'
    mean, std = stats.mean_std(values)
    return f'{mean:.2f} +- {std:.2f}'


def _ci(d: Dict) -> str:
    return 'n/a' if _is_nan(d.get('ci_low')) else f'[{d["ci_low"]:+.2f}, {d["ci_high"]:+.2f}]'


def _p(p: Optional[float]) -> str:
    if _is_nan(p):
        return 'n/a'
    return '<0.0001' if p < 1e-4 else f'{p:.4f}'


def _rate(rate) -> str:
    return '-' if rate is None else f'{rate:g}'


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    cell = lambda v: str(v).replace('|', '\\|')  # noqa: E731  a bare pipe would split the cell
    return (['| ' + ' | '.join(cell(c) for c in columns) + ' |', '|' + '---|' * len(columns)]
            + ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows])


# ----------------------------------------------------------------------------------------------
# Phase B: which regime, per-arm summaries, the comparison family


def final_regime(rows: List[Row], plan: Optional[Dict] = None) -> Tuple[Optional[str], List[str]]:
    """The regime phase B is reported for, and notes: the plan's chosen regime if it has final
    rows, else the regime with most final rows (said in a note)."""
    counts = Counter(r.get('regime') for r in rows if r.get('phase') == 'final')
    chosen = (plan or {}).get('chosen_regime')
    if not counts:
        return chosen, []
    if chosen in counts:
        regime, notes = chosen, []
    else:
        regime = counts.most_common(1)[0][0]
        notes = [f'The plan names no chosen regime with final runs ({chosen!r}); phase B is reported for '
                 f'{regime}, the regime with most final runs.']
    others = sorted(r for r in counts if r != regime)
    if others:
        notes.append(f'Final runs of other regimes are left out: {", ".join(map(str, others))}.')
    return regime, notes


def _final_rows(rows: List[Row], regime: Optional[str]) -> List[Row]:
    return _select(rows, phase='final', regime=regime)


def arm_summaries(final_rows: List[Row]) -> List[Dict[str, Any]]:
    """Per arm of ``final_rows``: seeds, rates, test and mCA per seed, mean measured dropped fraction."""
    out = []
    for arm in _ordered(r['arm'] for r in final_rows):
        runs = _select(final_rows, arm=arm)
        fractions = [sum(f.values()) / len(f) for f in (r.get('dropped_fraction') for r in runs)
                     if isinstance(f, dict) and f]
        out.append(dict(arm=arm, seeds=sorted({r['seed'] for r in runs}),
                        rates=sorted({r.get('rate') for r in runs}, key=lambda v: (v is not None, v or 0)),
                        test=_by_seed(runs, 'test_top1'), mca=_by_seed(runs, 'mean_corruption_top1'),
                        dropped=sum(fractions) / len(fractions) if fractions else None))
    return out


def _comparison_pairs(arms: Sequence[str]) -> List[Tuple[str, str, str]]:
    """(a, b, kind): every regularised arm vs matched DropBlock, and each learned-cluster DropCluster
    arm vs the grid and random arms at its placement (``dc_X`` vs ``dc_grid_X``, ``dc_random_X``)."""
    arms = [a for a in arms if a not in OPTION_LABELS]  # their own family: option_comparisons
    pairs = []
    if REFERENCE in arms:
        pairs += [(a, REFERENCE, 'reference') for a in arms if a not in UNREGULARISED + (REFERENCE,)]
    for a in arms:
        if a.startswith('dc_') and not a.startswith(('dc_grid_', 'dc_random_')):
            placement = a[len('dc_'):]
            pairs += [(a, f'dc_{kind}_{placement}', kind) for kind in ('grid', 'random')
                      if f'dc_{kind}_{placement}' in arms]
    return pairs


def comparisons(rows: List[Row], regime: Optional[str] = None) -> List[Dict[str, Any]]:
    """The phase B comparison family in ``regime`` (default: ``final_regime(rows)``), one entry per
    (pair, metric): a, b, kind, metric, the paired difference a - b (n, mean, std, ci_low, ci_high,
    t, p), p_holm (Holm over the whole family: every pair and both metrics, since a claim may rest
    on either), and TOST within +-MARGIN (tost_p, equivalent, tost_ci_low, tost_ci_high)."""
    if regime is None:
        regime = final_regime(rows)[0]
    final = _final_rows(rows, regime)
    return _compare(final, _comparison_pairs(_ordered(r['arm'] for r in final)))


def option_comparisons(rows: List[Row], regime: Optional[str] = None) -> List[Dict[str, Any]]:
    """The secondary family: each option arm against ``dc_stages`` (kind 'option'), Holm within it."""
    if regime is None:
        regime = final_regime(rows)[0]
    final = _final_rows(rows, regime)
    arms = _ordered(r['arm'] for r in final)
    pairs = [(a, OPTION_BASE, 'option') for a in arms if a in OPTION_LABELS] if OPTION_BASE in arms else []
    return _compare(final, pairs)


def _compare(final: List[Row], pairs: List[Tuple[str, str, str]]) -> List[Dict[str, Any]]:
    out = []
    for a, b, kind in pairs:
        for metric in METRICS:
            va, vb = _by_seed(_select(final, arm=a), metric), _by_seed(_select(final, arm=b), metric)
            if not va or not vb:
                continue
            d = stats.paired_difference(va, vb)
            e = stats.tost(va, vb, margin=MARGIN, alpha=ALPHA)
            out.append(dict(d, a=a, b=b, kind=kind, metric=metric, tost_p=e['p'], equivalent=e['equivalent'],
                            tost_ci_low=e['ci_low'], tost_ci_high=e['ci_high']))
    adjusted = stats.holm({i: c['p'] for i, c in enumerate(out)})
    for i, c in enumerate(out):
        c['p_holm'] = adjusted[i]
    return out


def _significant(c: Dict) -> bool:
    return not _is_nan(c['p_holm']) and c['p_holm'] < ALPHA


# ----------------------------------------------------------------------------------------------
# Sections


def _plan_section(plan: Dict) -> List[str]:
    if not plan:
        return ['## Plan', '', 'No `plan.json`: the chosen regime and rates are unknown.', '']
    lines = ['## Plan', '', f'Chosen regime: {plan.get("chosen_regime") or "none yet"}.', '']
    if plan.get('forced_regime'):
        lines[-2] = (f'Regime: {plan["forced_regime"]}, forced with `run.py --regime`, not chosen by the rule '
                     '(Cutout beating no regularisation with a 95% interval above 0); results in it cannot show '
                     'that a regulariser helps.')
    rates = plan.get('chosen_rates') or {}
    if rates:
        lines += _table(['arm', 'chosen rate'], [[label(a), _rate(rates[a])] for a in _ordered(rates)]) + ['']
    else:
        lines += ['No rates chosen yet.', '']
    if plan.get('config'):
        lines += ['Settings:', '', '```json', json.dumps(plan['config'], sort_keys=True), '```', '']
    return lines


def _regime_comparisons(rows: List[Row]) -> List[Dict[str, Any]]:
    """Per regime and metric: Cutout vs none on the regime phase's seeds."""
    regime_rows = _select(rows, phase='regime')
    out = []
    for regime in sorted({r['regime'] for r in regime_rows}, key=lambda g: _regime_key(g, regime_rows)):
        for metric in ('val_top1', 'test_top1'):
            none = _by_seed(_select(regime_rows, regime=regime, arm='none'), metric)
            cut = _by_seed(_select(regime_rows, regime=regime, arm='cutout'), metric)
            if none or cut:
                out.append(dict(stats.paired_difference(cut, none), regime=regime, metric=metric,
                                none=none, cutout=cut))
    return out


def _regime_section(rows: List[Row], plan: Dict) -> List[str]:
    lines = ['## Regime phase: where does the positive control help?', '']
    found = _regime_comparisons(rows)
    if not found:
        return lines + ['No regime-phase runs.', '']
    chosen = plan.get('chosen_regime')
    table = [[g['regime'] + (' (chosen)' if g['regime'] == chosen else ''),
              'validation' if g['metric'] == 'val_top1' else 'test',
              _pm(list(g['none'].values())), _pm(list(g['cutout'].values())),
              _signed(g['mean']), _ci(g), _p(g['p']), g['n']] for g in found]
    lines += ['Top-1 (%) of no structured dropout and of Cutout, mean +- std over seeds; the difference is '
              'Cutout - none, paired by seed, with its 95% t interval. The choice rule uses validation top-1.', '']
    lines += _table(['regime', 'top-1 on', 'none', 'Cutout', 'Cutout - none', '95% CI', 'p', 'pairs'], table)
    return lines + ['']


def _tune_section(rows: List[Row], plan: Dict) -> List[str]:
    lines = ['## Phase A: rate tuning (validation top-1)', '']
    tune = _select(rows, phase='tune')
    if not tune:
        return lines + ['No phase A (tune) runs.', '']
    chosen_regime, rates = plan.get('chosen_regime'), plan.get('chosen_rates') or {}
    groups: Dict[Tuple, List[float]] = {}
    for r in tune:
        if isinstance(r.get('val_top1'), (int, float)):
            groups.setdefault((r['regime'], r['arm'], r.get('rate')), []).append(r['val_top1'])
    regimes = sorted({k[0] for k in groups}, key=lambda g: _regime_key(g, tune))
    table = []
    for regime in regimes:
        for arm in _ordered(k[1] for k in groups if k[0] == regime):
            for rate in sorted(k[2] for k in groups if k[:2] == (regime, arm) and k[2] is not None):
                chosen = (regime == chosen_regime and rates.get(arm) is not None and abs(rates[arm] - rate) < 1e-9)
                vals = groups[(regime, arm, rate)]
                table.append([regime, label(arm), _rate(rate), _pm(vals), len(vals), 'chosen' if chosen else ''])
    lines += ['Validation top-1 (%), mean +- std over the tuning seeds, per rate; "chosen" marks the rate in '
              '`plan.json`.', '']
    return lines + _table(['regime', 'arm', 'rate', 'val top-1', 'seeds', ''], table) + ['']


def _final_section(summaries: List[Dict], family: List[Dict], control: Optional[Dict],
                   regime: Optional[str], notes: List[str]) -> List[str]:
    lines = [f'## Phase B: final runs{f" (regime {regime})" if regime else ""}', '']
    if not summaries:
        return lines + ['Phase B is missing: no final runs yet.', '']
    several = [s['arm'] for s in summaries if len(s['rates']) > 1]
    if several:  # phase B freezes one rate per arm: more than one means mixed results folders
        notes = notes + [f'Arms with final runs at several rates (each seed counts once, at its last row): '
                         f'{", ".join(several)}.']
    lines += notes + ([''] if notes else [])
    lines += ['Top-1 (%) on the test images and mean corruption top-1 (mCA, 8 corruptions x 5 severities), '
              'mean +- std over seeds; dropped: the measured fraction of elements a regulariser zeroes at its '
              'rate, averaged over its layers and runs.', '']
    table = [[s['arm'], label(s['arm']), len(s['seeds']), ', '.join(_rate(r) for r in s['rates']), _pm(list(s['test'].values())),
              _pm(list(s['mca'].values())), '-' if s['dropped'] is None else f'{s["dropped"]:.3f}'] for s in summaries]
    lines += _table(['key', 'arm', 'seeds', 'rate', 'test top-1', 'mCA', 'dropped'], table) + ['']
    if control is not None:
        lines += [f'Positive control in phase B: Cutout - none, test top-1 {_signed(control["mean"])} points, 95% CI '
                  f'{_ci(control)}, p {_p(control["p"])}, {control["n"]} pairs (not part of the family below).', '']
    if not family:
        return lines + ['No comparisons: matched DropBlock, the DropCluster arms or their test and corruption '
                        'results are missing.', '']
    lines += ['### Comparisons (a - b, paired by seed)', '',
              f'Mean difference in points with its 95% t interval; p: paired t-test; Holm p: adjusted over all '
              f'{sum(not _is_nan(c["p"]) for c in family)} tested comparisons (both metrics); equivalent: TOST within '
              f'+-{MARGIN} points at alpha {ALPHA} (90% interval inside the margin).', '']
    table = [[c['a'], c['b'], METRICS[c['metric']], c['n'], _signed(c['mean']), _ci(c), _p(c['p']),
              _p(c['p_holm']), _p(c['tost_p']), 'yes' if c['equivalent'] else 'no'] for c in family]
    lines += _table(['a', 'b', 'metric', 'pairs', 'a - b', '95% CI', 'p', 'Holm p', 'TOST p', 'equivalent'], table)
    return lines + ['']


def _option_section(options: List[Dict]) -> List[str]:
    """The reference options against plain learned clusters (a family of its own)."""
    if not options:
        return []
    lines = ['## Reference options (secondary family)', '',
             f'Each option arm against {OPTION_BASE} (same placement, rate tuned the same way), paired by seed; '
             f'Holm p adjusted over these {sum(not _is_nan(c["p"]) for c in options)} tested comparisons only.', '']
    table = [[c['a'], METRICS[c['metric']], c['n'], _signed(c['mean']), _ci(c), _p(c['p']), _p(c['p_holm']),
              'yes' if c['equivalent'] else 'no'] for c in options]
    lines += _table(['option arm', 'metric', 'pairs', f'a - {OPTION_BASE}', '95% CI', 'p', 'Holm p',
                     f'equivalent (+-{MARGIN})'], table)
    sig = [c for c in options if _significant(c)]
    lines += ['', ('Differences established after Holm: ' + '; '.join(
        f'{c["a"]} {"better" if c["mean"] > 0 else "worse"} by {_signed(c["mean"])} points in {METRICS[c["metric"]]}'
        for c in sig) + '.') if sig else 'No option differs from plain learned clusters after Holm correction.']
    return lines + ['']


def _runs_section(rows: List[Row]) -> List[str]:
    phases = Counter(r.get('phase') for r in rows)
    devices = Counter(r.get('device') for r in rows if r.get('device'))
    undet = sum(1 for r in rows if r.get('deterministic') is False)
    lines = ['## Runs', '', 'Runs per phase: ' + (', '.join(f'{p} {n}' for p, n in sorted(phases.items(), key=str))
                                                  or 'none') + '.']
    if devices:
        lines.append('Devices: ' + ', '.join(f'{d} ({n})' for d, n in devices.most_common()) + '.')
    if undet:
        lines.append(f'{undet} run(s) were not deterministic (a re-run of their seed need not reproduce them).')
    return lines + ['']


# ----------------------------------------------------------------------------------------------
# What is and is not established


def _control_sentence(rows: List[Row], plan: Dict) -> str:
    found = [g for g in _regime_comparisons(rows) if g['metric'] == 'val_top1']
    chosen = plan.get('chosen_regime')
    if not found:
        return ('The regime phase has no results, so it is not established that the setting can show any '
                "regulariser's benefit (the positive control has not been run).")
    mine = [g for g in found if g['regime'] == chosen]
    if chosen and mine:
        g = mine[0]
        if g['n'] < 2:
            return (f'In the chosen regime {chosen} the positive control cannot be checked yet ({g["n"]} paired '
                    'seeds of Cutout and none).')
        text = (f'In the chosen regime {chosen}, Cutout - none in validation top-1 is {_signed(g["mean"])} points '
                f'(95% CI {_ci(g)}, {g["n"]} paired seeds): ')
        if not _is_nan(g['ci_low']) and g['ci_low'] > 0:
            return text + 'the positive control beat no regularisation, so this regime can show a regulariser\'s benefit.'
        return text + ('the positive control did not beat no regularisation with an interval above 0, so a null '
                       'result for the regularisers below would not mean they cannot help.')
    if chosen:
        return f'The chosen regime {chosen} has no regime-phase runs: the positive control is unchecked there.'
    helped = [g['regime'] for g in found if not _is_nan(g['ci_low']) and g['ci_low'] > 0]
    if helped:
        return (f'Cutout beat no regularisation (95% CI above 0) in {", ".join(helped)}, but no regime is chosen '
                'yet (the regime phase may be incomplete).')
    return ('No regime is chosen, and in no candidate regime with results did Cutout beat no regularisation with '
            'a 95% interval above 0: in these regimes no regulariser can be shown to help.')


def _family_sentences(family: List[Dict], metric: str) -> List[str]:
    """What the DropCluster comparisons of one metric establish: differences after Holm, equivalence."""
    out, name = [], METRICS[metric]
    for kind, against in (('reference', 'matched DropBlock'), ('grid', 'grid clusters at the same placement'),
                          ('random', 'random clusters at the same placement')):
        group = [c for c in family if c['metric'] == metric and c['kind'] == kind
                 and (kind != 'reference' or c['a'].startswith('dc_'))]
        tested = [c for c in group if not _is_nan(c['p'])]
        if not group:
            continue
        if not tested:
            out.append(f'DropCluster vs {against} cannot be tested yet (fewer than 2 paired seeds).')
            continue
        sig = [c for c in tested if _significant(c)]
        if sig:
            out.append('; '.join(
                f'{c["a"]} is {"better" if c["mean"] > 0 else "worse"} than {c["b"]} by {_signed(c["mean"])} points '
                f'(95% CI {_ci(c)}, Holm p {_p(c["p_holm"])}{", yet within the equivalence margin" if c["equivalent"] else ""})'
                for c in sig) + '.')
        rest = [c for c in tested if not _significant(c)]
        if rest:
            text = f'No difference from {against} is established for {", ".join(c["a"] for c in rest)}'
            eq = [c['a'] for c in rest if c['equivalent']]
            neq = [c['a'] for c in rest if not c['equivalent']]
            if eq:
                text += f'; equivalence within +-{MARGIN} points holds for {", ".join(eq)}'
            if neq:
                text += (f'; for {", ".join(neq)} equivalence within +-{MARGIN} points is not established either '
                         '(the data cannot tell)')
            out.append(text + '.')
    return [f'In {name}, after Holm correction: ' + ' '.join(out)] if out else []


def _answer_sentence(family: List[Dict]) -> str:
    """The study's question, answered only as far as the clean test top-1 comparisons go."""
    test = [c for c in family if c['metric'] == 'test_top1']
    learned = sorted({c['a'] for c in test if c['kind'] in ('grid', 'random')}
                     | {c['a'] for c in test if c['kind'] == 'reference' and c['a'].startswith('dc_')
                        and not c['a'].startswith(('dc_grid_', 'dc_random_'))})
    beats_blocks = [a for a in learned if any(c['a'] == a and c['kind'] == 'reference' and _significant(c)
                                              and c['mean'] > 0 for c in test)]
    if not beats_blocks:
        return 'That learned clusters beat fixed blocks in clean test top-1 is not established by these runs.'
    parts = []
    for a in beats_blocks:
        grid = [c for c in test if c['a'] == a and c['kind'] == 'grid']
        if not grid:
            parts.append(f'{a} beats matched DropBlock, but its grid-cluster control has no runs, so the gain is not '
                         'shown to come from learning the clusters')
        elif _significant(grid[0]) and grid[0]['mean'] > 0:
            parts.append(f'{a} beats matched DropBlock and its grid-cluster control {grid[0]["b"]}, so in this setting '
                         'its gain is attributable to learned clusters')
        else:
            parts.append(f'{a} beats matched DropBlock, but not its grid-cluster control {grid[0]["b"]} (Holm p '
                         f'{_p(grid[0]["p_holm"])}), so the gain is not shown to come from learning the clusters')
    return 'In clean test top-1, ' + '; '.join(parts) + '.'


_CAVEAT = ('A difference that is not significant is not evidence of no difference (only TOST equivalence is), and '
           'every result holds for this model, recipe and regime only.')


def _established(rows: List[Row], plan: Dict, summaries: List[Dict], family: List[Dict],
                 control: Optional[Dict], regime: Optional[str]) -> Dict[str, List[str]]:
    """The statements the numbers support, by topic: 'control', 'status', one per metric of METRICS
    (the DropCluster comparisons), 'answer'."""
    out: Dict[str, List[str]] = dict(control=[], status=[], answer=[], **{m: [] for m in METRICS})
    if not rows:
        out['status'].append('No runs found: nothing is established yet (the regime phase, phase A and phase B '
                             'are all missing).')
        return out
    out['control'].append(_control_sentence(rows, plan))
    if control is not None and control['n'] >= 2:
        ok = not _is_nan(control['ci_low']) and control['ci_low'] > 0
        out['control'].append(f'In phase B, Cutout - none in test top-1 is {_signed(control["mean"])} points (95% CI '
                              f'{_ci(control)}){"" if ok else ", an interval that does not lie above 0"}.')
    if not summaries:
        tuned = len(plan.get('chosen_rates') or {})
        out['status'].append(f'Phase B (final runs) is missing ({tuned} arm(s) have a chosen rate): no comparison '
                             'of DropCluster with DropBlock is established.')
        return out
    counts = [len(s['seeds']) for s in summaries]
    lo, hi = min(counts), max(counts)
    seeds = f'{lo}' if lo == hi else f'{lo} to {hi}'
    if lo < REQUIRED_SEEDS:
        out['status'].append(f'Phase B is incomplete: {seeds} seed(s) per arm where at least {REQUIRED_SEEDS} are '
                             'planned, so what follows is preliminary.')
    else:
        out['status'].append(f'Phase B has {seeds} paired seeds per arm in regime {regime}.')
    missing = [a for a in ARM_LABELS if a not in {s['arm'] for s in summaries}]
    if missing:
        out['status'].append(f'Arms without final runs: {", ".join(missing)}.')
    for metric in METRICS:
        out[metric] = _family_sentences(family, metric)
    out['answer'] += [_answer_sentence(family), _CAVEAT]
    return out


def _established_markdown(found: Dict[str, List[str]]) -> List[str]:
    """One bullet per topic, in reading order."""
    return [f'- {" ".join(found[k])}' for k in ('control', 'status', *METRICS, 'answer') if found[k]]


# ----------------------------------------------------------------------------------------------
# The report and the card table


def _card_table(summaries: List[Dict], plan: Dict, regime: Optional[str], final: List[Row],
                found: Dict[str, List[str]]) -> Dict:
    """The model card's results table: one row per phase B arm; the notes say what is established in
    clean test top-1 (the full report has the rest)."""
    cfg = plan.get('config') or {}
    established = ' '.join(found['control'] + found['status'] + found['test_top1'] + found['answer'])
    if found['test_top1']:
        established += (' The comparisons of both metrics, with Holm correction and equivalence tests, are in the '
                        "study's report (`benchmarks/regularizer_study/report.py`).")
    title = 'CIFAR-10 regularizer study: DropCluster vs DropBlock' + (f' ({regime})' if regime else '')
    if not summaries:
        return dict(title=title, description='Phase B of `benchmarks/regularizer_study/` has no final runs yet.',
                    columns=['regulariser', 'seeds', 'rate', 'test top-1 (%)', 'mCA (%)'], rows=[], notes=established)
    counts = sorted({len(s['seeds']) for s in summaries})
    seeds = f'{counts[0]}' if len(counts) == 1 else f'{counts[0]} to {counts[-1]}'
    r0 = final[0]
    model = ''
    if cfg.get('layers') and cfg.get('channels'):
        model = f' (layers {cfg["layers"]}, channels {cfg["channels"]}, {cfg.get("img_size", "?")} px)'
    test_images = sorted({r['test_images'] for r in final if r.get('test_images')})
    corr_images = sorted({r['corruption_images'] for r in final if r.get('corruption_images')})
    description = (
        f'From `benchmarks/regularizer_study/` (phase B): a timm ResNet{model} trained from scratch on '
        f'{r0.get("train_size", "?")} CIFAR-10 training images for {r0.get("epochs", "?")} epochs, the same recipe '
        f'in every arm, only the regulariser differs; rates were tuned on a validation split (phase A). Test top-1 '
        f'on {"/".join(map(str, test_images)) or "?"} test images and mean corruption top-1 (mCA) over 8 corruptions '
        f'x 5 severities on {"/".join(map(str, corr_images)) or "?"} of them; mean +- std over {seeds} seeds per '
        'arm, paired by seed across arms.')
    # the key in brackets: the notes name arms by key
    rows = [[f'{label(s["arm"])} ({s["arm"]})', str(len(s['seeds'])), ', '.join(_rate(r) for r in s['rates']),
             _pm(list(s['test'].values())), _pm(list(s['mca'].values()))] for s in summaries]
    return dict(title=title, description=description,
                columns=['regulariser', 'seeds', 'rate', 'test top-1 (%)', 'mCA (%)'], rows=rows, notes=established)


def build_report(rows: List[Row], plan: Optional[Dict] = None) -> Tuple[str, Dict]:
    """The markdown report of ``rows`` and ``plan`` (may be partial or empty), and the card table."""
    plan = plan or {}
    regime, notes = final_regime(rows, plan)
    final = _final_rows(rows, regime) if regime is not None else []
    summaries = arm_summaries(final)
    family = comparisons(rows, regime) if final else []
    control = None
    if final:
        none, cut = (_by_seed(_select(final, arm=a), 'test_top1') for a in ('none', 'cutout'))
        if none and cut:
            control = stats.paired_difference(cut, none)
    found = _established(rows, plan, summaries, family, control, regime)
    lines = ['# Regularizer study: do learned clusters (DropCluster) beat fixed blocks (DropBlock)?', '',
             f'From {len(rows)} runs. Top-1 accuracies in percent; differences in points, paired by seed (same data, '
             'order, augmentation and initial weights in every arm).', '',
             '## What is and is not established', ''] + _established_markdown(found) + ['']
    lines += _plan_section(plan) + _regime_section(rows, plan) + _tune_section(rows, plan)
    options = option_comparisons(rows, regime) if final else []
    lines += _final_section(summaries, family, control, regime, notes) + _option_section(options) + _runs_section(rows)
    return '\n'.join(lines), _card_table(summaries, plan, regime, final, found)


# ----------------------------------------------------------------------------------------------
# Plot


def plot(rows: List[Row], plan: Optional[Dict], path) -> Optional[Path]:
    """Phase B as a PNG: per arm, mean test top-1 with its 95% interval and the per-seed points; and the
    paired differences from matched DropBlock with their 95% intervals. None when there are no final rows."""
    regime, _ = final_regime(rows, plan or {})
    final = _final_rows(rows, regime) if regime is not None else []
    summaries = [s for s in arm_summaries(final) if s['test']]
    if not summaries:
        return None
    # Figure + Agg canvas: no pyplot, so no global backend state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), tight_layout=True)
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    for i, s in enumerate(summaries):
        vals = list(s['test'].values())
        mean, lo, hi = stats.mean_ci(vals)
        jitter = [0.0] if len(vals) == 1 else [-0.15 + 0.3 * k / (len(vals) - 1) for k in range(len(vals))]
        ax.scatter([i + j for j in jitter], vals, s=10, color='0.6', zorder=1)
        err = [[0.0], [0.0]] if _is_nan(lo) else [[mean - lo], [hi - mean]]
        ax.errorbar([i], [mean], yerr=err, fmt='o', color='C0', capsize=4, zorder=2)
    ax.set_xticks(range(len(summaries)), [s['arm'] for s in summaries], rotation=45, ha='right')
    ax.set_ylabel('test top-1 (%)')
    ax.set_title(f'Phase B{f" ({regime})" if regime else ""}: mean, 95% CI, seeds')
    diffs = [c for c in comparisons(rows, regime) if c['kind'] == 'reference' and c['metric'] == 'test_top1']
    for i, c in enumerate(diffs):
        err = [[0.0], [0.0]] if _is_nan(c['ci_low']) else [[c['mean'] - c['ci_low']], [c['ci_high'] - c['mean']]]
        bx.errorbar([i], [c['mean']], yerr=err, fmt='o', color='C3' if _significant(c) else 'C0', capsize=4)
    bx.axhline(0.0, color='k', lw=0.8)
    bx.set_xticks(range(len(diffs)), [c['a'] for c in diffs], rotation=45, ha='right')
    bx.set_ylabel('test top-1 difference (points)')
    bx.set_title(f'a - {REFERENCE}, paired, 95% CI (red: Holm p < {ALPHA})' if diffs else f'no {REFERENCE} runs')
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('results', type=Path, help='results folder with runs*.jsonl (and plan.json)')
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f'error: results folder not found: {args.results}', file=sys.stderr)
        return 2
    try:
        rows, plan = load_rows(args.results), load_plan(args.results)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    markdown, card = build_report(rows, plan)
    out = args.results / 'report.md'
    out.write_text(markdown + '\n', encoding='utf-8')
    (args.results / 'card_table.json').write_text(json.dumps(card, indent=1) + '\n', encoding='utf-8')
    png = args.results / 'report.png'
    try:
        if plot(rows, plan, png) is None and png.exists():
            png.unlink()  # a figure of earlier results would contradict report.md
    except ImportError as e:  # the figure is optional; the markdown and the table are the report
        print(f'note: no figure ({e})', file=sys.stderr)
    print(out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
