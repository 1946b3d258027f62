""" benchmarks/regularizer_study: matched arms, deterministic paired runs, resumable phases, choice rules.
The real CIFAR-10 --quick pipeline is a slow test that skips where the data is absent."""
import json
from pathlib import Path

import pytest
import torch

from benchmarks.regularizer_study import arms as A
from benchmarks.regularizer_study import protocol, run
from benchmarks.regularizer_study.data import augment, cutout
from run_helpers import tiny_cifar_cache

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'

CFG = dict(run.QUICK)


@pytest.fixture(scope='module')
def calibration():
    """DropBlock calibration tables for the quick model, with few draws (the runner uses more)."""
    cache = {}
    for block, feat in ((5, (8, 8)), (3, (8, 8)), (7, (32, 32))):
        cache[(block, feat)] = A.calibrate_dropblock(block, feat, draws=6)
    return cache


@pytest.mark.parametrize('rate', [0.1, 0.25])
def test_matched_arms_drop_the_target_fraction_and_timm_dropblock_does_not(calibration, rate):
    x = torch.randn(32, 3, 64, 64)
    measured = {}
    for arm in A.REGULARISED:
        model = A.build_model(arm, CFG, calibration)
        A.set_rate(model, rate)
        fractions = A.measure_dropped_fraction(model, x, draws=6)
        assert fractions, arm
        measured[arm] = fractions
        if arm == 'dc_hopkins_stages':  # maps without structure stay undropped: at most the rate
            assert all(f <= rate * 1.25 for f in fractions.values()), (arm, fractions)
        elif arm != 'dropblock_timm':
            for name, f in fractions.items():
                assert f == pytest.approx(rate, abs=0.25 * rate), (arm, name, f)
    # timm's DropBlock (gamma_scale 0.25 in stage 3) drops clearly less than its nominal rate there
    stage3 = [f for n, f in measured['dropblock_timm'].items() if n.startswith('layer3')]
    assert max(stage3) < 0.85 * rate
    # placements: stem arms regularise only the stem slot, stage arms only stages 3-4
    assert set(measured['dc_stem']) == {'maxpool.drop_cluster'} and set(measured['dropblock_stem']) == {'maxpool.drop_block'}
    assert {n.split('.')[0] for n in measured['dropblock_matched']} == {'layer3', 'layer4'}
    assert set(measured['dropblock_matched']) == set(measured['dc_grid_stages'])


def test_arms_share_initial_weights_per_seed(calibration):
    params = {}
    for arm in A.ALL_ARMS:
        torch.manual_seed(7)
        model = A.build_model(arm, CFG, calibration)
        params[arm] = {k: v for k, v in model.state_dict().items() if k.endswith(('weight', 'bias'))}
    ref = params['none']
    for arm, p in params.items():
        assert p.keys() == ref.keys() and all(torch.equal(p[k], ref[k]) for k in ref), arm


def test_augment_and_cutout_on_the_batch_device():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (8, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    c = cutout(torch.zeros(64, 3, 32, 32), 16, torch.Generator().manual_seed(1), fill=1.0)
    area = c[:, 0].sum((1, 2))
    assert area.max() == 256 and area.min() >= 64  # a 16x16 square, clipped at the border down to 8x8


def _job(tmp_path, calibration, **kw):
    cfg = dict(CFG, val_images=100, test_images=100, corruption_images=20, cluster_images=16)
    job = dict(phase='final', regime='n200_e2', arm='dc_stem', rate=0.2, seed=3, config=cfg, device='cpu',
               threads=1, calibration=calibration, cache=str(tmp_path / 'cifar10_uint8.pt'))
    tiny_cifar_cache(tmp_path, n_train=400, n_test=100)
    job.update(kw)
    job['key'] = f"{job['phase']}/{job['arm']}/{job['seed']}"
    return job


def test_run_is_deterministic_and_records_the_protocol(tmp_path, calibration):
    job = _job(tmp_path, calibration)
    a, b = run.run_one(job), run.run_one(job)
    timing = ('train_time_s', 'images_per_s', 'total_time_s')
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert a['deterministic'] and a['reclusters'] >= 1 and a['train_size'] == 200 and a['epochs'] == 2
    assert a['test_images'] == 100 and a['corruption_images'] == 20 and len(a['corruptions']) == 8
    assert set(a['dropped_fraction']) == {'maxpool.drop_cluster'}
    other = run.run_one(dict(job, seed=4, key='other'))
    assert other['val_top1'] != a['val_top1'] or other['final_loss'] != a['final_loss']  # the seed matters


def _row(phase, regime, arm, seed, val, rate=None):
    return dict(key=f'{phase}/{regime}/{arm}/{rate}/{seed}', phase=phase, regime=regime, arm=arm, seed=seed,
                rate=rate, val_top1=val)


def test_choice_rules():
    seeds = [0, 1, 2]
    rows = [_row('regime', 'n1_e1', 'none', s, 50 + s) for s in seeds]
    rows += [_row('regime', 'n1_e1', 'cutout', s, 50 + s + d) for s, d in zip(seeds, (0.4, -0.3, 0.1))]  # no gain
    assert protocol.choose_regime(rows, ['n1_e1'], seeds) is None
    rows += [_row('regime', 'n2_e1', 'none', s, 40 + s) for s in seeds]
    assert protocol.choose_regime(rows, ['n1_e1', 'n2_e1'], seeds) is None  # cutout runs of n2_e1 missing
    rows += [_row('regime', 'n2_e1', 'cutout', s, 42 + s + 0.1 * s) for s in seeds]  # a clear gain
    assert protocol.choose_regime(rows, ['n1_e1', 'n2_e1'], seeds) == 'n2_e1'
    tune = [_row('tune', 'n2_e1', 'dc_stem', s, v, rate) for rate, vals in ((0.1, (60, 62)), (0.2, (61, 61)),
                                                                            (0.3, (59, 60))) for s, v in zip((0, 1), vals)]
    assert protocol.choose_rate(tune, 'dc_stem', 'n2_e1', [0.1, 0.2, 0.3], [0, 1]) == 0.1  # tie: smaller rate
    assert protocol.choose_rate(tune[:-1], 'dc_stem', 'n2_e1', [0.1, 0.2, 0.3], [0, 1]) is None


def test_jobs_resume_and_need_earlier_choices(tmp_path):
    plan = {'config': CFG, 'chosen_regime': None, 'chosen_rates': {}}
    regime_jobs = run.make_jobs('regime', plan, [])
    assert len(regime_jobs) == len(CFG['regimes']) * 2 * len(CFG['regime_seeds'])
    done = [dict(j) for j in regime_jobs[:3]]
    assert len(run.make_jobs('regime', plan, done)) == len(regime_jobs) - 3
    with pytest.raises(RuntimeError, match='no regime chosen'):
        run.make_jobs('tune', plan, [])
    plan['chosen_regime'] = CFG['regimes'][0]
    base = [a for a in A.ARMS if a in A.REGULARISED]
    assert len(run.make_jobs('tune', plan, [])) == len(base) * len(CFG['rates']) * len(CFG['tune_seeds'])
    with pytest.raises(RuntimeError, match='no rate chosen'):
        run.make_jobs('final', plan, [])
    plan['chosen_rates'] = {arm: 0.1 for arm in base}
    final = run.make_jobs('final', plan, [])
    assert len(final) == len(A.ARMS) * len(CFG['final_seeds'])
    # option arms join the tune and final phases of the folder that was given them
    with_options = dict(plan, option_arms=['dc_gap_stages', 'dc_softreset_stages'])
    tune = run.make_jobs('tune', with_options, [])
    assert sorted({j['arm'] for j in tune} - set(base)) == ['dc_gap_stages', 'dc_softreset_stages']
    with pytest.raises(RuntimeError, match='dc_gap_stages'):
        run.make_jobs('final', with_options, [])
    only = dict(with_options, options_only=True, forced_regime=CFG['regimes'][0])
    assert run.make_jobs('regime', only, []) == []
    assert {j['arm'] for j in run.make_jobs('tune', only, [])} == {'dc_stages', 'dc_gap_stages', 'dc_softreset_stages'}
    with pytest.raises(RuntimeError, match='--regime'):
        run.make_jobs('regime', dict(only, forced_regime=None), [])
    assert [j['seed'] for j in final[:len(A.ARMS)]] == [CFG['final_seeds'][0]] * len(A.ARMS)  # whole pairs first
    # results from several machines merge: runs*.jsonl, unique keys
    (tmp_path / 'runs.jsonl').write_text(json.dumps(dict(final[0], val_top1=1.0)) + '\n')
    (tmp_path / 'runs_gpu2.jsonl').write_text(json.dumps(dict(final[0], val_top1=1.0)) + '\n'
                                              + json.dumps(dict(final[1], val_top1=2.0)) + '\n')
    assert len(run.read_rows(tmp_path)) == 2
    (tmp_path / 'runs_bad.jsonl').write_text('{not json\n')
    with pytest.raises(ValueError, match='runs_bad.jsonl:1'):
        run.read_rows(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.exists(), reason=f'CIFAR-10 archive not found at {CIFAR}')
def test_quick_pipeline_on_cifar10(tmp_path):
    """--quick on the real CIFAR-10: every phase, a resumed second command, and the report."""
    from benchmarks.regularizer_study import report
    results = tmp_path / 'results'
    argv = ['--quick', '--results', str(results), '--cache-dir', str(tmp_path / 'cache'), '--parallel', '2',
            '--regime', 'n200_e2', '--budget-minutes', '60']  # at 2 epochs Cutout need not help: the regime is forced for the pipeline
    assert run.main(argv + ['--max-runs', '3']) == 0  # a first chunk
    assert len(run.read_rows(results)) == 3
    assert run.main(argv) == 0  # resumes and finishes every phase
    plan = json.loads((results / 'plan.json').read_text())
    rows = run.read_rows(results)
    assert {r['phase'] for r in rows} == {'regime', 'tune', 'final'}
    assert set(plan['chosen_rates']) == set(A.REGULARISED)
    assert len([r for r in rows if r['phase'] == 'final']) == len(A.ARMS) * len(run.QUICK['final_seeds'])
    markdown, table = report.build_report(report.load_rows(results), plan)
    assert 'regime' in markdown.lower() and table['columns']


def test_option_arms_run_their_option(tmp_path, calibration, monkeypatch):
    """The BRB arm soft-resets before every re-clustering but the first; the ramp arm uses its shape."""
    resets = []
    monkeypatch.setattr(run, 'soft_reset', lambda model, opt, factor, seed: resets.append((factor, seed)))
    cfg = dict(CFG, val_images=100, test_images=100, corruption_images=20, cluster_images=16, reclusters=2)
    row = run.run_one(_job(tmp_path, calibration, arm='dc_softreset_stages', phase='tune', regime='n200_e3',
                           config=cfg))
    assert row['reclusters'] >= 2 and len(resets) == row['reclusters'] - 1 and resets[0][0] == 0.9
    assert A.schedule_shape('dc_expramp_stages') == 'exponential' and A.schedule_shape('dc_stages') == 'linear'
    model = A.build_model('dc_gmm_stages', CFG)
    from dropcluster_timm import dropcluster_layers
    assert {layer.cluster_method for _, layer in dropcluster_layers(model)} == {'gmm'}
