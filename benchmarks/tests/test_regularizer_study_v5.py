""" Study v5's harness: the candidates dose Cutout as its paper does (16 px) without the random crop,
the gate goes on into the five arms and the second rate after a pass, and the report takes the
second rate into its family."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.regularizer_study import gate as G
from benchmarks.regularizer_study import protocols as P
from benchmarks.regularizer_study import report as R
from benchmarks.regularizer_study import run as RUN
from benchmarks.regularizer_study.arms import ARMS
from benchmarks.regularizer_study.data import augment
from benchmarks.regularizer_study.rows import append_row, read_rows

REPO = Path(__file__).resolve().parents[2]


def test_v5_candidates_are_the_v3_protocol_with_the_papers_square_and_no_crop():
    assert [c['name'] for c in P.V5_CANDIDATES] == ['v5_flip2k', 'v5_noaug2k']
    for c, aug in zip(P.V5_CANDIDATES, ('flip', 'none')):
        assert c['augment'] == aug and c['cutout_size'] == 16
        assert {k: v for k, v in c.items() if k not in ('name', 'augment', 'cutout_size', 'est_minutes')} == \
            {k: v for k, v in P.CPU.items() if k not in ('name', 'augment', 'cutout_size')}
        second = P.CONFIGS[f"{c['name']}_rate0.2"]
        assert second == dict(c, name=second['name'], drop_rate=0.2)
        assert RUN.parse_args(['--config', second['name'], '--arm', 'dropcluster', '--seed', '0']).config == second['name']
    assert P.CPU['augment'] == 'crop_flip' and all(c['augment'] == 'crop_flip' for c in P.V4_CANDIDATES)


def test_augmentations_flip_only_or_nothing_and_draw_the_same_in_every_arm():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    plain = x.float() / 255.0
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), 'none'), plain)
    flipped = augment(x, torch.Generator().manual_seed(0), 'flip')
    same = (flipped == plain).flatten(1).all(1)
    mirrored = (flipped == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54  # each image whole, about half mirrored
    assert torch.equal(flipped, augment(x, torch.Generator().manual_seed(0), 'flip'))  # the stream decides
    cropped = augment(x, torch.Generator().manual_seed(0), 'crop_flip')
    assert not bool(((cropped == plain) | (cropped == plain.flip(-1))).flatten(1).all(1).all())
    with pytest.raises(ValueError, match='unknown augmentation'):
        augment(x, torch.Generator(), 'rotate')


def _gate_rows(config, gains):
    rows = []
    for seed, gain in enumerate(gains):
        for arm, top1 in (('none', 50.0 + 0.1 * seed), ('cutout', 50.0 + 0.1 * seed + gain)):
            rows.append(dict(config=config, arm=arm, seed=seed, top1=top1, train_top1=100.0, total_time_s=300.0,
                             cpu_capability='AVX512'))
    return rows


def test_after_a_pass_the_driver_runs_the_five_arms_and_the_second_rate_seed_by_seed():
    first = P.V5_CANDIDATES[0]['name']
    assert G.next_study_job([], set(), P.V5_CANDIDATES, 16) is None  # no pass yet
    rows = _gate_rows(first, [3.9, 3.7, 1.5, 1.9, 2.5, 3.0])
    assert [e['decision'] for e in G.gate_status(rows, P.V5_CANDIDATES)] == ['pass', 'not run']
    # A later candidate's runs started while the pass was in flight: kept, and not needed.
    later = _gate_rows(P.V5_CANDIDATES[1]['name'], [0.5])
    summary = G.gate_summary(G.gate_status(rows + later, P.V5_CANDIDATES), 'v5')
    assert [c['decision'] for c in summary['candidates']] == ['pass', 'not needed']
    assert '`v5_noaug2k` not needed after the pass (1 seed: +0.50)' in G.gate_statement(summary)
    assert G.next_gate_job(rows, set(), P.V5_CANDIDATES) is None
    order = []
    running = set()
    while True:
        job = G.next_study_job(rows, running, P.V5_CANDIDATES, 2)
        if job is None:
            break
        order.append((job['config'], job['arm'], job['seed']))
        running.add(order[-1])
    second = f'{first}_rate0.2'
    expected = [(first, a, s) for s in (0, 1) for a in ('dropblock', 'dropcluster', 'dropcluster_grid')]
    expected = expected[:3] + [(second, 'dropblock', 0), (second, 'dropcluster', 0)] + expected[3:] + \
        [(second, 'dropblock', 1), (second, 'dropcluster', 1)]
    assert order == expected  # the gate's none and cutout rows are the study's own


def test_v5_gate_without_a_pass_names_the_next_regime(tmp_path):
    rows = [r for c in P.V5_CANDIDATES for r in _gate_rows(c['name'], [0.1, -0.2, 0.3, 0.0])]
    for row in rows:
        append_row(tmp_path, row)
    G.write_gate(tmp_path, 'v5')
    summary = json.loads((tmp_path / 'gate.json').read_text())
    assert summary['study'] == 'v5' and summary['outcome'] == 'none passed'
    statement = G.gate_statement(summary)
    assert 'the next regime is the GPU protocol' in statement and 'v3 study stays' not in statement
    assert (tmp_path / 'gate.md').read_text().startswith('# Study v5: the gate')
    assert G.gate_headline(summary) == ('none of its 2 candidate regimes passed (Cutout - none between +0.05 and '
                                        '+0.05 points of test top-1)')


def _study_rows(config, shift_dc_second=0.0, seeds=8):
    rng = np.random.default_rng(1)
    rows = []
    for seed in range(seeds):
        base = 50 + rng.normal(0, 1.0)
        value = {'none': base, 'cutout': base + 3.0, 'dropblock': base + 1.0, 'dropcluster': base + 1.0,
                 'dropcluster_grid': base + 1.0}
        for arm, v in value.items():
            rows.append(dict(config=config, arm=arm, seed=seed, top1=v + rng.normal(0, 0.05), mca=v - 5,
                             train_top1=100.0, dropped_fraction=0.1 if arm.startswith('drop') else 0.0,
                             deterministic=True, device='cpu', commit='abc'))
        for arm, v in (('dropblock', base + 1.0), ('dropcluster', base + 1.0 + shift_dc_second)):
            rows.append(dict(config=f'{config}_rate0.2', arm=arm, seed=seed, top1=v + rng.normal(0, 0.05), mca=v - 5,
                             train_top1=100.0, dropped_fraction=0.2, deterministic=True, device='cpu', commit='abc'))
    return rows


def test_the_report_adds_the_second_rate_to_the_family(tmp_path):
    s = R.summarise(_study_rows('v5_flip2k', shift_dc_second=2.0), 'v5_flip2k')
    assert [a['arm'] for a in s['arms']] == list(ARMS) + ['dropblock @ 0.2', 'dropcluster @ 0.2']
    assert len(s['primary']) == 6 and len(s['complete_seeds']) == 8
    second = s['primary'][4]
    assert second['arm'] == 'dropcluster @ 0.2' and second['mean'] == pytest.approx(2.0, abs=0.1)
    assert second['verdict'] == 'dropcluster @ 0.2 better than dropblock @ 0.2'
    assert 'Holm over the six' in R.render(s)
    assert ', where Cutout beats no regulariser (+' in R.headline(s) and 'could not show' not in R.headline(s)
    # Without rows at the second rate the family is v3's four.
    v3 = R.summarise([r for r in _study_rows('v5_flip2k') if r['config'] == 'v5_flip2k'], 'v5_flip2k')
    assert len(v3['primary']) == 4 and 'Holm over the four' in R.render(v3)


def test_committed_v5_gate_is_current_and_quoted_by_the_readme_and_guide():
    folder = REPO / 'benchmarks' / 'results' / 'study_v5'
    committed = json.loads((folder / 'gate.json').read_text())
    status = G.gate_status(read_rows(folder), P.V5_CANDIDATES)
    stale = 'stale: run `python -m benchmarks.regularizer_study.gate --study v5 --results benchmarks/results/study_v5 ' \
            '--report-only`'
    assert committed == json.loads(json.dumps(G.gate_summary(status, 'v5'))), stale
    assert (folder / 'gate.md').read_text() == G.render_gate(status, 'v5'), stale
    statement, headline = G.gate_statement(committed), G.gate_headline(committed)
    guide = ' '.join((REPO / 'docs' / 'benchmarks.md').read_text().split())
    assert statement in guide, f'docs/benchmarks.md does not quote the gate: {statement}'
    assert headline in ' '.join((REPO / 'README.md').read_text().split()), f'README.md does not quote: {headline}'


def test_committed_v5_report_is_that_of_the_committed_rows():
    folder = REPO / 'benchmarks' / 'results' / 'study_v5'
    summary = R.summarise(read_rows(folder), 'v5_flip2k')
    stale = 'stale: run `python -m benchmarks.regularizer_study.report benchmarks/results/study_v5 --config v5_flip2k`'
    assert json.loads((folder / 'summary.json').read_text()) == json.loads(json.dumps(summary)), stale
    assert (folder / 'report.md').read_text() == R.render(summary), stale
    table = R.card_table(summary, 'benchmarks/results/study_v5')
    assert json.loads((folder / 'card_table.json').read_text()) == json.loads(json.dumps(table)), stale


def test_the_readme_carries_the_answer_of_the_committed_files():
    from benchmarks.regularizer_study.answer import answer_paragraph, answer_table
    table, paragraph = answer_table(), answer_paragraph()
    readme = (REPO / 'README.md').read_text()
    assert table in readme, f'README.md does not carry the answer table; it is:\n{table}'
    for name in ('README.md', 'docs/benchmarks.md'):
        text = ' '.join((REPO / name).read_text().split())
        assert paragraph in text, f'{name} does not carry the answer; it is:\n{paragraph}'
    assert '| v3: crop + flip, 2,000 images | Cutout 8 px - none (control) | 16 |' in table  # the control is shown


def test_the_driver_goes_on_from_a_passed_gate_into_the_study(cifar_cache, tmp_path):
    """End to end with ``--study-seeds``: the folder holds six passing gate pairs (stand-ins, so that the
    pass does not hang on what tiny runs happen to give); the real driver then runs the study's missing
    runs, two at a time: the three drop arms at seed 0 and DropBlock and DropCluster at the second rate,
    rewrites the gate files, and a second call finds nothing left to run."""
    for row in _gate_rows('tiny', [3.0, 2.5, 3.5, 2.8, 3.1, 2.9]):
        append_row(tmp_path, row)
    args = ['--study', 'tiny', '--results', str(tmp_path), '--workers', '2', '--study-seeds', '1',
            '--cache-dir', str(cifar_cache)]
    assert G.main(args) == 0
    ran = [r for r in read_rows(tmp_path) if 'command' in r]
    assert sorted((r['config'], r['arm'], r['seed']) for r in ran) == \
        [('tiny', 'dropblock', 0), ('tiny', 'dropcluster', 0), ('tiny', 'dropcluster_grid', 0),
         ('tiny_rate0.2', 'dropblock', 0), ('tiny_rate0.2', 'dropcluster', 0)]
    assert all(r['command'][r['command'].index('--config') + 1] == r['config'] for r in ran)
    rate = {(r['config'], r['arm']): r['dropped_fraction'] for r in ran}
    assert all(rate[('tiny_rate0.2', arm)] > rate[('tiny', arm)] > 0 for arm in ('dropblock', 'dropcluster')), rate
    gate = json.loads((tmp_path / 'gate.json').read_text())
    assert gate['study'] == 'tiny' and gate['outcome'] == 'pass'
    assert 'The gate passed at `tiny`' in (tmp_path / 'gate.md').read_text()
    assert G.main(args) == 0 and len(read_rows(tmp_path)) == 12 + 5  # nothing left to run


def _study_folder(root, shift_dc_second):
    folder = root / 'study_v5'
    for row in _study_rows('v5_flip2k', shift_dc_second=shift_dc_second, seeds=16):
        append_row(folder, dict(row, mca=row['top1'] - 5, total_time_s=300.0, cpu_capability='AVX512'))
    G.write_gate(folder, 'v5')
    return folder


@pytest.mark.parametrize('shift, verdict', [(2.0, 'DropCluster beats DropBlock in 2 and loses to it in 0 of their 4 '
                                                 'comparisons.'),
                                            (0.0, 'DropCluster and DropBlock are equivalent here within +-0.3 points.')])
def test_the_answer_paragraph_gives_the_verdict_only_when_every_seed_is_in(tmp_path, shift, verdict):
    from benchmarks.regularizer_study.answer import answer_paragraph, answer_table
    folder = _study_folder(tmp_path, shift)
    assert 'no verdict before all 16 seeds' in answer_paragraph(tmp_path)  # the gate alone: no summary yet
    assert R.main([str(folder), '--config', 'v5_flip2k']) == 0
    text = answer_paragraph(tmp_path)
    assert text.startswith('In `v5_flip2k` (7 arms at 16 paired seeds), Cutout beats no regulariser by +2.9')
    assert text.endswith("points of test top-1, against Cutout's " + text.split('regulariser by ')[1][:5] + '.')
    assert verdict in text and '\n' not in text
    if shift:
        assert 'a difference in 2 (dropcluster @ 0.2 better than dropblock @ 0.2 in test top-1, +' in text
    assert '| Cutout 16 px - none (control, all seeds) | 16 | +2.9' in answer_table(tmp_path)
    s = json.loads((folder / 'summary.json').read_text())
    json.dump(dict(s, complete_seeds=s['complete_seeds'][:15]), (folder / 'summary.json').open('w'))
    assert 'no verdict before all 16 seeds' in answer_paragraph(tmp_path)
