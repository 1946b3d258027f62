""" The study's report: the primary family from paired rows, checked against scipy, and a statement
that follows the numbers."""
import json

import numpy as np
import pytest
from scipy import stats

from benchmarks.regularizer_study import report as R
from benchmarks.regularizer_study.rows import append_row
from benchmarks.regularizer_study.stats import holm, paired_difference, tost


def _rows(shift_dc=1.0, shift_grid=0.0, shift_cutout=0.0, seeds=16):
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(seeds):
        base = 60 + rng.normal(0, 1.0)  # seed-to-seed spread, cancelled by pairing
        value = {'none': base, 'dropblock': base, 'cutout': base + shift_cutout}
        value['dropcluster_grid'] = base + shift_dc - shift_grid
        value['dropcluster'] = base + shift_dc
        for arm, v in value.items():
            noise = rng.normal(0, 0.1)
            rows.append(dict(config='cpu', arm=arm, seed=seed, top1=v + noise, mca=v - 10 + noise, train_top1=99.0,
                             dropped_fraction=0.1 if arm.startswith('drop') else 0.0, deterministic=True,
                             device='cpu', commit='abc'))
    return rows


def test_paired_statistics_agree_with_scipy():
    rng = np.random.default_rng(1)
    a = {s: float(v) for s, v in enumerate(rng.normal(1, 1, 12))}
    b = {s: float(v) for s, v in enumerate(rng.normal(0, 1, 12))}
    d = paired_difference(a, b)
    ref = stats.ttest_rel(list(a.values()), list(b.values()))
    assert d['p'] == pytest.approx(ref.pvalue) and d['n'] == 12
    low, high = ref.confidence_interval(0.95)
    assert (d['ci_low'], d['ci_high']) == pytest.approx((low, high))
    assert holm({'x': 0.01, 'y': 0.04, 'z': 0.03}) == pytest.approx({'x': 0.03, 'y': 0.06, 'z': 0.06})
    same = {s: v + 0.01 * (-1) ** s for s, v in b.items()}
    assert tost(same, b, 0.3)['equivalent'] and not tost(a, b, 0.3)['equivalent']


def test_a_real_difference_and_a_real_equivalence_are_told_apart():
    s = R.summarise(_rows(shift_dc=1.0, shift_grid=0.0, shift_cutout=1.5))
    verdict = {c['name']: c['verdict'] for c in s['primary']}
    assert verdict['dropcluster_vs_dropblock_top1'] == 'dropcluster better than dropblock'
    assert verdict['learned_vs_grid_top1'].startswith('equivalent within +-0.3')
    assert all(c['p_holm'] >= c['p'] for c in s['primary'])
    text = R.render(s)
    assert 'The regime responds to regularisation' in text and '16 seeds complete in all 5 arms' in text


def test_when_cutout_does_not_help_the_statement_says_what_equivalence_means():
    s = R.summarise(_rows(shift_dc=0.0, shift_cutout=-1.0))
    text = '\n'.join(R.statement(s))
    assert 'does not beat no regulariser' in text and 'no difference in this regime' in text
    few = R.summarise(_rows(seeds=1))
    assert all(c['verdict'] == 'not enough seeds' for c in few['primary'])


def test_main_writes_report_and_summary(tmp_path, capsys):
    for row in _rows(seeds=4):
        append_row(tmp_path, row)
    assert R.main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['seeds_per_arm'] == {arm: 4 for arm in R.ARMS}
    assert (tmp_path / 'report.md').read_text().startswith('# Regulariser study')
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert R.main([str(empty)]) == 2 and 'no result rows yet' in capsys.readouterr().err


def test_card_table_is_a_valid_results_table_that_follows_the_rows(tmp_path):
    """card_table.json goes into the resnet18_dropcluster card: the hub's checker accepts it, and its
    figures and statement are those of the rows."""
    from dropcluster_timm.hub.run_results import format_results_table, load_results_table
    for row in _rows(shift_dc=1.0, shift_cutout=1.5, seeds=5):
        append_row(tmp_path, row)
    assert R.main([str(tmp_path)]) == 0
    table = load_results_table(tmp_path / 'card_table.json')  # checked as the card reads it
    summary = json.loads((tmp_path / 'summary.json').read_text())
    dc_db = next(r for r in table['rows'] if r[0] == 'dropcluster - dropblock (test top-1)')
    assert dc_db[1] == 5 and dc_db[2].startswith(f"{summary['primary'][0]['mean']:+.2f} [")
    assert 'The regime responds to regularisation' in table['notes'] and '- ' not in table['notes'][:2]
    assert '| dropcluster | 5 |' in format_results_table(table)


def test_committed_card_table_is_that_of_the_committed_rows():
    """The card's table is regenerated with the report: a stale one fails here."""
    from benchmarks.regularizer_study.rows import read_rows
    from pathlib import Path
    folder = Path(__file__).resolve().parents[2] / 'benchmarks' / 'results' / 'study_v3'
    committed = json.loads((folder / 'card_table.json').read_text())
    assert committed == json.loads(json.dumps(R.card_table(R.summarise(read_rows(folder))))), \
        'stale: run `python -m benchmarks.regularizer_study.report benchmarks/results/study_v3`'


def test_readme_and_guide_quote_the_committed_summary():
    """The README gives the committed report's headline and the benchmarks guide all its figures."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    summary = json.loads((root / 'benchmarks' / 'results' / 'study_v3' / 'summary.json').read_text())
    readme = ' '.join((root / 'README.md').read_text().split())
    guide = ' '.join((root / 'docs' / 'benchmarks.md').read_text().split())
    assert R.headline(summary) in readme, f'README.md does not quote the v3 headline: {R.headline(summary)}'
    assert f"at {len(summary['complete_seeds'])} seeds" in guide
    for c in summary['primary'] + summary['control'][:1]:
        figures = (f"{c['mean']:+.2f}", f"{c['ci_low']:.2f} to {c['ci_high']:.2f}")
        assert all(f in guide for f in figures), f"docs/benchmarks.md does not quote {c['name']} {figures}"


def test_each_drop_arm_is_set_against_no_regulariser_outside_the_family():
    """Whether the drop arms regularise at all: paired differences to ``none``, reported but neither
    corrected nor part of the verdicts (the family stays the primary comparisons)."""
    s = R.summarise(_rows(shift_dc=1.0, shift_grid=0.5, shift_cutout=1.5))
    by = {c['arm']: c for c in s['versus_none']}
    assert sorted(by) == ['dropblock', 'dropcluster', 'dropcluster_grid']
    assert by['dropcluster']['mean'] == pytest.approx(1.0, abs=0.1) and by['dropblock']['mean'] == pytest.approx(0, abs=0.1)
    assert by['dropcluster_grid']['mean'] == pytest.approx(0.5, abs=0.1) and by['dropcluster']['ci_low'] > 0
    assert len(s['primary']) == 4  # not added to the Holm family
    text = R.render(s)
    assert '| dropcluster - none | test top-1 | 16 | +' in text.split('Each drop arm against no regulariser')[1]
    assert 'Against no regulariser (test top-1 points' in '\n'.join(R.statement(s))
