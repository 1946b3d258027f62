""" benchmarks/regularizer_study: the statistics (stats.py) and the report (report.py) on synthetic results."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

scipy_stats = pytest.importorskip('scipy.stats')

from benchmarks.regularizer_study import report, stats  # noqa: E402  (after the scipy skip)

ARMS = ('none', 'cutout', 'dropblock_timm', 'dropblock_matched', 'dropblock_stem', 'dc_stages', 'dc_stem',
        'dc_grid_stages', 'dc_grid_stem', 'dc_random_stages', 'dc_random_stem')
REGULARISED = ARMS[2:]
REGIME = 'n1000_e100'


# ----------------------------------------------------------------------------------------------
# stats.py


def test_mean_std():
    assert stats.mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3)))  # ddof=1
    assert stats.mean_std([7.5]) == (7.5, 0.0)
    assert all(math.isnan(v) for v in stats.mean_std([]))


def test_paired_difference_by_hand():
    # differences 1, 2, 3 (seed 9 is unpaired): mean 2, std 1, t = 2 / (1 / sqrt 3) = sqrt 12, df 2.
    a = {0: 11.0, 1: 12.0, 2: 13.0, 9: 99.0}
    b = {2: 10.0, 1: 10.0, 0: 10.0}
    d = stats.paired_difference(a, b)
    assert (d['n'], d['mean'], d['std']) == (3, 2.0, 1.0)
    assert d['t'] == pytest.approx(math.sqrt(12))
    # t with 2 df has a closed-form tail: P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2
    assert d['p'] == pytest.approx(1 - math.sqrt(12) / math.sqrt(14))
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2 df) from a table
    assert (d['ci_low'], d['ci_high']) == pytest.approx((2 - half, 2 + half), abs=1e-5)


def test_paired_difference_matches_scipy_ttest_rel():
    rng = np.random.default_rng(3)
    seeds = list(range(20))
    base = rng.normal(60, 3, size=20)
    a = {s: base[s] + 0.4 + rng.normal(0, 0.5) for s in seeds}
    b = {s: base[s] + rng.normal(0, 0.5) for s in reversed(seeds)}  # key order must not matter
    d = stats.paired_difference(a, b, confidence=0.9)
    ref = scipy_stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    assert d['t'] == pytest.approx(ref.statistic) and d['p'] == pytest.approx(ref.pvalue)
    lo, hi = ref.confidence_interval(0.9)
    assert (d['ci_low'], d['ci_high']) == pytest.approx((lo, hi))


def test_paired_difference_edge_cases():
    same = stats.paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same['mean'] == 0.0 and same['p'] == 1.0
    shift = stats.paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert shift['p'] == 0.0 and shift['ci_low'] == shift['ci_high'] == 1.0
    one = stats.paired_difference({0: 2.0, 1: 5.0}, {0: 1.0})
    assert one['n'] == 1 and one['mean'] == 1.0 and math.isnan(one['p']) and math.isnan(one['ci_low'])
    none = stats.paired_difference({0: 2.0}, {1: 1.0})
    assert none['n'] == 0 and math.isnan(none['mean'])


def test_holm_textbook_example():
    # Holm (1979) as in most textbooks: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04,
    # then non-decreasing: 0.04 -> 0.06.
    adj = stats.holm({'H1': 0.01, 'H2': 0.04, 'H3': 0.03, 'H4': 0.005})
    assert list(adj) == ['H1', 'H2', 'H3', 'H4']
    assert adj == pytest.approx({'H1': 0.03, 'H2': 0.06, 'H3': 0.06, 'H4': 0.02})
    capped = stats.holm({'a': 0.6, 'b': 0.7, 'c': float('nan')})  # nan is not counted: m = 2
    assert capped['a'] == 1.0 and capped['b'] == 1.0 and math.isnan(capped['c'])
    assert stats.holm({'a': 0.01, 'b': float('nan')})['a'] == pytest.approx(0.01)
    assert stats.holm({}) == {}


def test_tost():
    rng = np.random.default_rng(0)
    seeds = range(200)
    base = {s: rng.normal(60, 3) for s in seeds}
    a = {s: base[s] + rng.normal(0, 0.05) for s in seeds}
    b = {s: base[s] + rng.normal(0, 0.05) for s in seeds}
    eq = stats.tost(a, b, margin=0.5)
    assert eq['equivalent'] and eq['p'] < 1e-6
    ci90 = stats.paired_difference(a, b, confidence=0.9)
    assert (eq['ci_low'], eq['ci_high']) == pytest.approx((ci90['ci_low'], ci90['ci_high']))
    shifted = {s: v + 1.0 for s, v in a.items()}
    far = stats.tost(shifted, b, margin=0.5)
    assert not far['equivalent'] and far['p'] > 0.5
    # each one-sided test is scipy's paired t-test against the shifted null
    x, y = [shifted[s] for s in seeds], [b[s] for s in seeds]
    assert far['p_lower'] == pytest.approx(scipy_stats.ttest_rel(np.add(x, 0.5), y, alternative='greater').pvalue)
    assert far['p_upper'] == pytest.approx(scipy_stats.ttest_rel(np.subtract(x, 0.5), y, alternative='less').pvalue)
    few = stats.tost({0: 1.0}, {0: 1.0})
    assert math.isnan(few['p']) and not few['equivalent']


# ----------------------------------------------------------------------------------------------
# Synthetic results


def _final_rows(seeds, effects, noise=0.3, null_noise=2.0, rng_seed=0):
    """Phase B rows: a per-seed base shared by every arm (what pairing cancels), a planted effect per
    arm, independent noise; dc_grid_stem is dc_stem plus noise of mean exactly 0 (a planted null)."""
    rng = np.random.default_rng(rng_seed)
    base = {s: 60 + rng.normal(0, 3) for s in seeds}
    null = rng.normal(size=len(seeds))
    null = (null - null.mean()) / null.std(ddof=1) * null_noise if len(seeds) > 1 else 0 * null
    rows = []
    for arm in ARMS:
        for i, s in enumerate(seeds):
            if arm == 'dc_grid_stem':
                test = next(r for r in rows if r['arm'] == 'dc_stem' and r['seed'] == s)['test_top1'] + null[i]
            else:
                test = base[s] + effects.get(arm, 0.0) + rng.normal(0, noise)
            rate = None if arm in ('none', 'cutout') else 0.2
            row = dict(key=f'final/{REGIME}/{arm}/{"-" if rate is None else rate}/{s}', phase='final',
                       regime=REGIME, train_size=1000, epochs=100, arm=arm, rate=rate, seed=s,
                       val_top1=test + 1, test_top1=test, test_images=10000,
                       mean_corruption_top1=test - 10 + rng.normal(0, noise),
                       corruption_images=2000, corruptions={'noise': [test - 5] * 5}, train_time_s=10.0,
                       images_per_s=1e4, device='NVIDIA H100', deterministic=True)
            if rate is not None:
                row['dropped_fraction'] = {'layer3.0.drop_block': 0.19, 'layer4.0.drop_block': 0.21}
            rows.append(row)
    return rows


def _regime_rows():
    """Cutout +3 points in n1000_e100, no effect in n5000_e50; 3 seeds each."""
    rows = []
    for regime, size, epochs, gain in (('n5000_e50', 5000, 50, 0.0), (REGIME, 1000, 100, 3.0)):
        for s, (base, jitter) in enumerate(((50.0, 0.1), (52.0, -0.2), (49.0, 0.15))):
            for arm in ('none', 'cutout'):
                v = base + (gain + jitter if arm == 'cutout' else 0.0)
                rows.append(dict(key=f'regime/{regime}/{arm}/-/{s}', phase='regime', regime=regime, train_size=size,
                                 epochs=epochs, arm=arm, rate=None, seed=s, val_top1=v, test_top1=v - 1,
                                 test_images=10000, device='cpu', deterministic=True))
    return rows


def _tune_rows():
    rows = []
    for arm in REGULARISED:
        for rate in (0.1, 0.2):
            for s in (0, 1):
                rows.append(dict(key=f'tune/{REGIME}/{arm}/{rate}/{s}', phase='tune', regime=REGIME, train_size=1000,
                                 epochs=100, arm=arm, rate=rate, seed=s, val_top1=50 + 10 * rate + s,
                                 device='cpu', deterministic=True))
    return rows


PLAN = {'config': {'layers': [2, 2, 2, 2], 'channels': [64, 128, 256, 512], 'img_size': 64},
        'chosen_regime': REGIME, 'chosen_rates': {arm: 0.2 for arm in REGULARISED}}


def _write(results: Path, rows, plan=PLAN):
    """Two JSONL files from two 'machines' with overlapping duplicates, and plan.json."""
    results.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    (results / 'runs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows[:half + 5]))
    (results / 'runs_gpu2.jsonl').write_text('\n' + ''.join(json.dumps(r) + '\n' for r in rows[half:]))
    if plan is not None:
        (results / 'plan.json').write_text(json.dumps(plan))
    return results


def _find(family, a, b, metric='test_top1'):
    (c,) = [c for c in family if (c['a'], c['b'], c['metric']) == (a, b, metric)]
    return c


# ----------------------------------------------------------------------------------------------
# report.py


def test_load_rows_merges_duplicates_and_names_bad_lines(tmp_path):
    rows = _regime_rows() + _tune_rows()
    loaded = report.load_rows(_write(tmp_path, rows))
    assert sorted(r['key'] for r in loaded) == sorted(r['key'] for r in rows)
    (tmp_path / 'runs_bad.jsonl').write_text(json.dumps(rows[0]) + '\n{"key": "x", oops\n')
    with pytest.raises(ValueError, match=r'runs_bad\.jsonl:2'):
        report.load_rows(tmp_path)
    (tmp_path / 'runs_bad.jsonl').write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r'runs_bad\.jsonl:1'):
        report.load_rows(tmp_path)


def test_planted_effect_and_null(tmp_path):
    seeds = list(range(100, 116))
    rows = _regime_rows() + _tune_rows() + _final_rows(seeds, {'dc_stem': 2.0, 'cutout': 1.5})
    loaded = report.load_rows(_write(tmp_path, rows))
    family = report.comparisons(loaded)
    # the family: 8 arms vs matched DropBlock, 2 learned arms x (grid, random), both metrics
    assert len(family) == (8 + 4) * 2

    effect = _find(family, 'dc_stem', 'dropblock_matched')
    by = {(r['arm'], r['seed']): r['test_top1'] for r in rows if r['phase'] == 'final'}
    x, y = [by['dc_stem', s] for s in seeds], [by['dropblock_matched', s] for s in seeds]
    assert effect['n'] == 16 and effect['mean'] == pytest.approx(np.mean(np.subtract(x, y)))
    assert effect['p'] == pytest.approx(scipy_stats.ttest_rel(x, y).pvalue)
    assert abs(effect['mean'] - 2.0) < 0.4 and effect['ci_low'] > 0
    assert effect['p_holm'] < 0.05 and effect['p_holm'] >= effect['p'] and not effect['equivalent']

    null = _find(family, 'dc_stem', 'dc_grid_stem')
    assert null['kind'] == 'grid' and abs(null['mean']) < 1e-9 and null['p_holm'] > 0.05
    assert not null['equivalent']  # 16 seeds with 2-point noise cannot show equivalence within 0.5
    assert _find(family, 'dc_stages', 'dc_random_stages')['kind'] == 'random'

    # Holm over the whole family, recomputed independently
    ps = sorted(c['p'] for c in family)
    m = len(ps)
    expected = np.maximum.accumulate([min(1.0, (m - i) * p) for i, p in enumerate(ps)])
    assert sorted(c['p_holm'] for c in family) == pytest.approx(list(expected))

    markdown, card = report.build_report(loaded, json.loads((tmp_path / 'plan.json').read_text()))
    established = markdown.split('## What is and is not established')[1].split('\n## ')[0]
    assert 'the positive control beat no regularisation' in established
    assert 'dc_stem is better than dropblock_matched by +' in established
    assert 'not shown to come from learning the clusters' in established  # grid control not beaten
    assert 'incomplete' not in established and '16 paired seeds per arm' in established
    assert '## Phase A' in markdown and 'chosen' in markdown.split('## Phase A')[1]
    assert '## Phase B' in markdown and 'n1000_e100 (chosen)' in markdown
    assert f'{effect["mean"]:+.2f}' in markdown


def test_equivalence_with_many_seeds_and_tiny_noise(tmp_path):
    rows = _final_rows(list(range(64)), {}, noise=0.05, null_noise=0.05)
    family = report.comparisons(report.load_rows(_write(tmp_path, rows, plan=None)))
    null = _find(family, 'dc_stem', 'dc_grid_stem')
    assert null['equivalent'] and null['p_holm'] > 0.05
    markdown, _ = report.build_report(rows, None)
    assert 'equivalence within +-0.5 points holds for' in markdown
    assert 'learned clusters beat fixed blocks in clean test top-1 is not established' in markdown


def test_partial_results(tmp_path):
    markdown, card = report.build_report(report.load_rows(_write(tmp_path, _regime_rows(), plan=None)), None)
    assert 'Phase B is missing' in markdown and 'Phase B (final runs) is missing' in markdown
    assert 'No phase A (tune) runs' in markdown and 'No `plan.json`' in markdown
    assert 'Cutout beat no regularisation (95% CI above 0) in n1000_e100' in markdown  # not in n5000_e50
    assert card['rows'] == [] and report.plot(_regime_rows(), None, tmp_path / 'p.png') is None

    # phase B with 4 seeds and an arm missing: incomplete, preliminary
    rows = [r for r in _final_rows([100, 101, 102, 103], {}) if r['arm'] != 'dc_random_stem']
    markdown, card = report.build_report(rows, PLAN)
    assert 'Phase B is incomplete: 4 seed(s) per arm' in markdown
    assert 'Arms without final runs: dc_random_stem' in markdown
    assert 'regime phase has no results' in markdown
    assert len(card['rows']) == len(ARMS) - 1

    # one seed per arm: nothing can be tested, still a report
    markdown, _ = report.build_report(_final_rows([7], {}), PLAN)
    assert 'cannot be tested yet' in markdown and 'n/a' in markdown

    markdown, card = report.build_report([], None)
    assert 'No runs found' in markdown and card['rows'] == []


def test_card_table_shape(tmp_path):
    seeds = list(range(100, 116))
    rows = _final_rows(seeds, {'dc_stem': 2.0})
    _, card = report.build_report(rows, PLAN)
    from dropcluster_timm.model_card import check_results_table
    check_results_table(card)
    assert set(card) == {'title', 'description', 'columns', 'rows', 'notes'}
    assert len(card['rows']) == len(ARMS) and all(len(r) == len(card['columns']) for r in card['rows'])
    assert '16 seeds' in card['description'] and '1000 CIFAR-10 training images' in card['description']
    (dc,) = [r for r in card['rows'] if r[0] == report.ARM_LABELS['dc_stem'] + ' (dc_stem)']
    vals = [r['test_top1'] for r in rows if r['arm'] == 'dc_stem']
    assert dc[1:4] == ['16', '0.2', f'{np.mean(vals):.2f} +- {np.std(vals, ddof=1):.2f}']
    (none,) = [r for r in card['rows'] if r[0].endswith('(none)')]
    assert none[2] == '-'


def test_main_writes_report_card_and_plot(tmp_path, capsys):
    results = _write(tmp_path / 'results', _regime_rows() + _tune_rows() + _final_rows(list(range(16)), {}))
    assert report.main([str(results)]) == 0
    assert capsys.readouterr().out.strip() == str(results / 'report.md')
    assert (results / 'report.md').read_text().startswith('# Regularizer study')
    assert json.loads((results / 'card_table.json').read_text())['columns'][0] == 'regulariser'
    assert (results / 'report.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    assert report.main([str(tmp_path / 'missing')]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith('error:') and '\n' not in err

    (results / 'runs_bad.jsonl').write_text('nope\n')
    assert report.main([str(results)]) != 0
    assert 'runs_bad.jsonl:1' in capsys.readouterr().err


def test_option_arms_form_their_own_family_against_dc_stages():
    seeds = list(range(16))
    rows = _final_rows(seeds, {'dc_stages': 1.0})
    base = {r['seed']: r['test_top1'] for r in rows if r['arm'] == 'dc_stages'}
    rng = np.random.default_rng(5)
    for arm, effect in (('dc_gap_stages', 2.0), ('dc_shared_stages', 0.0)):
        noise = rng.normal(0, 0.3, len(seeds))
        noise -= noise.mean()  # a planted null: the paired differences average exactly the effect
        for s, e in zip(seeds, noise):
            test = base[s] + effect + e
            rows.append(dict(next(r for r in rows if r['arm'] == 'dc_stages' and r['seed'] == s),
                             key=f'final/{REGIME}/{arm}/0.2/{s}', arm=arm, test_top1=test, val_top1=test + 1))
    primary = report.comparisons(rows, REGIME)
    assert not {c['a'] for c in primary} & {'dc_gap_stages', 'dc_shared_stages'}, 'options must not enter the main family'
    options = report.option_comparisons(rows, REGIME)
    assert {(c['a'], c['b'], c['kind']) for c in options} == {
        ('dc_gap_stages', 'dc_stages', 'option'), ('dc_shared_stages', 'dc_stages', 'option')}
    gap = next(c for c in options if c['a'] == 'dc_gap_stages' and c['metric'] == 'test_top1')
    shared = next(c for c in options if c['a'] == 'dc_shared_stages' and c['metric'] == 'test_top1')
    assert gap['mean'] == pytest.approx(2.0, abs=1e-9) and gap['p_holm'] < 0.05
    assert shared['ci_low'] < 0 < shared['ci_high']
    text, _ = report.build_report(rows, PLAN)
    assert '## Reference options (secondary family)' in text and 'dc_gap_stages better by +2.' in text
