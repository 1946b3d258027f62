""" Model cards: statistics and results as the card prints them, cards of the architectures, of trained
weights and of plain timm models, results tables as sections, the committed cards kept current."""
import json
from pathlib import Path

import pytest

import dropcluster_timm  # noqa: F401  registers the models
from dropcluster_timm.hub.model_card import CARD_MODELS, build_model_card, render_model_card, write_model_cards
from dropcluster_timm.hub.model_stats import format_stat, model_stats
from dropcluster_timm.hub.run_results import load_metrics, load_results_table

VARIANTS = ['resnet18_dropcluster', 'resnet34_dropcluster', 'resnet50_dropcluster', 'resnet101_dropcluster',
            'resnet152_dropcluster', 'resnet50d_dropcluster']
REPO_ROOT = Path(__file__).resolve().parents[2]
# The CIFAR-10 study's table in the card of the model family it trained (its report writes it).
STUDY_MODEL = 'resnet18_dropcluster'
STUDY_TABLE = REPO_ROOT / 'benchmarks' / 'results' / 'study_v5' / 'card_table.json'
CARDS_COMMAND = f'dropcluster-timm cards --overwrite --table {STUDY_MODEL}={STUDY_TABLE.relative_to(REPO_ROOT).as_posix()}'


def test_card_stats_keep_digits_at_small_sizes():
    """Cards print small statistics with three significant digits: GMACs at 32 px are not 0.0."""
    import re
    gmacs = model_stats('resnet18_dropcluster', img_size=(32, 32))['gmacs']
    assert 0.01 < gmacs < 0.1
    text = render_model_card('resnet18_dropcluster', metrics={'top1': 50.0, 'img_size': 32})
    printed = re.search(r'GMACs: (\S+)\n', text).group(1)
    assert float(printed) == pytest.approx(gmacs, rel=0.01) and 'Image size: 32 x 32' in text

    from dropcluster_timm.hub.model_card import format_stat
    assert [format_stat(v) for v in (25.557, 10.0, 4.1093, 1.8186, 0.037159, 0.00012345, 0.0)] == \
        ['25.6', '10.0', '4.11', '1.82', '0.0372', '0.000123', '0']


def _yaml_header(text):
    assert text.startswith('---\n')
    return text.split('---\n')[1]


def test_card_without_run():
    text = render_model_card('resnet50_dropcluster')
    header = _yaml_header(text)
    for line in ('library_name: timm', 'pipeline_tag: image-classification', 'license: apache-2.0',
                 '- dropcluster', 'datasets:\n- imagenet-1k'):
        assert line in header
    assert 'model-index' not in header and 'base_model' not in header  # no run, no results
    for needle in ('## Model Details', 'Params (M): 25.6', 'GMACs: 4.09', 'Activations (M): 11.1',
                   'Image size: 224 x 224', 'arxiv.org/abs/2002.02997', 'arxiv.org/abs/1810.12890',
                   'arxiv.org/abs/1512.03385', '## Model Usage', 'features_only=True', 'num_classes=0',
                   '## Citation', 'No DropCluster-trained weights are published yet', 'timm/resnet50.a1_in1k'):
        assert needle in text, needle
    usage = text.split('## Model Usage')[1].split('## Model Comparison')[0]
    assert usage.count('```python') == usage.count('import dropcluster_timm') == 4


def test_card_with_metrics_file(tmp_path):
    path = tmp_path / 'metrics.json'
    path.write_text(json.dumps({'top1': 71.234, 'top5': 90.5, 'dataset': 'ImageNet-1k', 'img_size': 224}))
    text = render_model_card('resnet18_dropcluster', metrics=load_metrics(path), repo_id='org/r18-dc')
    assert '| resnet18_dropcluster | ImageNet-1k | 224 | 71.234 | 90.500 |' in text
    assert 'No DropCluster-trained weights' not in text
    assert "timm.create_model('hf-hub:org/r18-dc', pretrained=True)" in text

    summary = tmp_path / 'summary.csv'  # timm train.py's summary
    summary.write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5\n0,6.9,6.8,10.5,30.1\n1,5.0,4.9,42.25,70.0\n2,4.9,5.1,40.0,69.0\n')
    assert load_metrics(summary).to_dict() == {'top1': 42.25, 'top5': 70.0, 'epoch': 1, 'epochs': 3}
    bad = tmp_path / 'bad.json'
    bad.write_text('{"acc": 3}')
    with pytest.raises(ValueError, match='top1'):
        load_metrics(bad)
    with pytest.raises(ValueError, match='unknown model'):
        build_model_card('resnet50_dropblock')


def test_card_for_a_plain_timm_architecture():
    """Weights of a timm model without DropCluster layers: no DropCluster claims, tags or usage."""
    text = render_model_card('resnet18', model_args={'num_classes': 3})
    header = _yaml_header(text)
    assert 'dropcluster' not in header and 'datasets:' not in header and 'library_name: timm' in header
    body = text.split('---\n', 2)[2]
    assert 'without DropCluster layers' in body and 'No results of a training run' in body
    for needle in ('DropCluster:**', 'No DropCluster-trained', 'Pretrained tags', 'import dropcluster_timm',
                   'Training with DropCluster', 'chen2020dropcluster'):
        assert needle not in body, needle
    assert "create_model('resnet18', pretrained=True)" in body and 'pip install timm' in body
    assert 'Params (M): 11.2' in body  # 3 classes: 11.18 M
    trained = render_model_card('resnet18', metrics={'top1': 70.0, 'dataset': 'flowers'}, repo_id='org/r18-flowers')
    assert 'trained with DropCluster' not in trained and 'It has no DropCluster layers.' in trained
    assert "create_model('hf-hub:org/r18-flowers', pretrained=True)" in trained


def test_committed_model_cards_are_current(tmp_path):
    """model_cards/ holds the cards of CARD_MODELS, as the generator writes them today."""
    written = write_model_cards(tmp_path, tables={STUDY_MODEL: [load_results_table(STUDY_TABLE)]})
    assert sorted(p.name for p in written) == sorted(f'{v}.md' for v in CARD_MODELS)
    committed = REPO_ROOT / 'model_cards'
    assert sorted(p.name for p in committed.glob('*.md')) == sorted(p.name for p in written)
    for p in written:
        assert (committed / p.name).read_text() == p.read_text(), f'{p.name} is stale: run `{CARDS_COMMAND}`'


def test_card_of_the_study_model_carries_the_study_table(tmp_path):
    """The committed study table (benchmarks/results/study_v5/card_table.json) becomes a section of
    the card it is given to, with every arm's figures of the committed summary, and only there."""
    table = load_results_table(STUDY_TABLE)
    written = {p.stem: p.read_text() for p in write_model_cards(tmp_path, tables={STUDY_MODEL: [table]})}
    text = written[STUDY_MODEL]
    assert '### CIFAR-10 study: DropCluster against matched DropBlock' in text
    assert 'No DropCluster-trained weights are published yet' in text
    summary = json.loads((STUDY_TABLE.parent / 'summary.json').read_text())
    for a in summary['arms']:
        assert f"| {a['arm']} | {a['n']} | {a['top1']:.2f} +- {a['top1_std']:.2f} | {a['mca']:.2f} +- {a['mca_std']:.2f} |" \
            in text, a
    assert all('CIFAR-10 study' not in t for name, t in written.items() if name != STUDY_MODEL)


def test_results_table_renders_title_description_columns_rows_notes():
    """Any results table becomes a '### title' section of the comparison: description, a markdown table
    (numbers as written, numeric columns right-aligned, pipes escaped), notes; several in order."""
    table = {'title': 'Fine-tuning on flowers', 'description': 'Five runs *per* arm.',
             'columns': ['arm', 'epochs', 'top-1 (%)'],
             'rows': [['plain | baseline', 10, 90.25], ['DropCluster', 10, 0.1 + 0.2], ['DropBlock', 20, 0.0]],
             'notes': 'Seed 0 only.'}
    second = {'title': 'Second', 'description': 'Other.', 'columns': ['a'], 'rows': [['x']], 'align': ['center']}
    text = render_model_card('resnet34_dropcluster', tables=[table, second])
    comparison = text.split('## Model Comparison\n')[1].split('## Citation')[0]
    assert comparison.startswith('No DropCluster-trained weights are published yet')
    section = ('### Fine-tuning on flowers\n\nFive runs *per* arm.\n\n'
               '| arm | epochs | top-1 (%) |\n|---|---:|---:|\n'
               '| plain \\| baseline | 10 | 90.25 |\n| DropCluster | 10 | 0.3 |\n| DropBlock | 20 | 0 |\n'
               '\nSeed 0 only.\n'
               '\n### Second\n\nOther.\n\n| a |\n|:---:|\n| x |\n')
    assert section in comparison
    assert 'Fine-tuning on flowers' not in render_model_card('resnet34_dropcluster')


def test_results_tables_are_checked_where_they_enter(tmp_path):
    """A missing file, a malformed table given in code, tables for a model without a card: all refused."""
    with pytest.raises(FileNotFoundError, match='results table not found'):
        load_results_table(tmp_path / 'absent.json')
    with pytest.raises(ValueError, match='missing key'):
        build_model_card('resnet18_dropcluster', tables=[{'title': 't'}])
    with pytest.raises(ValueError, match='resnet18_dropclustr'):
        write_model_cards(tmp_path, tables={'resnet18_dropclustr': []})
    assert not list(tmp_path.iterdir())  # refused before any card is written


def test_card_names_the_clustering_options_that_differ_from_the_defaults():
    plain = render_model_card('resnet18_dropcluster', model_args={'dc_cluster_method': 'rena'})
    assert 'Clustering:' not in plain
    text = render_model_card('resnet18_dropcluster', model_args={
        'dc_cluster_method': 'kmedoids', 'dc_cluster_count': 'gap', 'dc_skip_unstructured': True,
        'dc_drop_mode': 'size', 'dc_batch_shared': True})
    line = next(line for line in text.splitlines() if 'Clustering:' in line)
    for part in ('method kmedoids', 'gap statistic', 'undropped', 'size-dependent', 'one mask per batch'):
        assert part in line, line


def test_card_of_pruned_weights_gives_measured_sizes_and_accuracies_before_and_after():
    widths = {'layer1.0': 20, 'layer4.1': 100}
    metrics = {'top1': 61.5, 'top1_before_pruning': 61.5, 'pruned_from': 'resnet18', 'pruning_method': 'edropout',
               'kept_channels': 0.5, 'edropout_steps': 120, 'img_size': 32, 'dataset': 'CIFAR-10'}
    card = build_model_card('resnet18_slim', metrics=metrics, model_args={'num_classes': 10, 'block_widths': widths})
    pruning = card['details']['Pruning']
    before = model_stats('resnet18', img_size=32, model_args={'num_classes': 10})
    after = model_stats('resnet18_slim', img_size=32, model_args={'num_classes': 10, 'block_widths': widths})
    assert after['params_m'] < before['params_m']
    assert pruning['Params (M), before -> after'] == f"{format_stat(before['params_m'])} -> {format_stat(after['params_m'])}"
    assert pruning['Top-1, before -> after'] == '61.50 -> 61.50' and pruning['Prunable channels kept'] == '50.0%'
    assert 'EDropout' in pruning['Method'] and 'pruned from `resnet18` with EDropout' in card['description']
    text = render_model_card('resnet18_slim', metrics=metrics, model_args={'num_classes': 10, 'block_widths': widths})
    assert 'import dropcluster_timm.edropout  # registers the *_slim' in text and 'timm alone loads it' not in text


@pytest.mark.parametrize('bad, words', [({'pruning_method': 'random'}, 'pruning_method'),
                                        ({'kept_channels': 1.5}, 'kept_channels'),
                                        ({'edropout_steps': -1}, 'edropout_steps'),
                                        ({'epochs': 2.5}, 'epochs'),
                                        ({'top_1': 50.0}, 'unknown key.*top_1'),
                                        ({'dataset': 3}, '"dataset" must be a string'),
                                        ({'top1': 1000.0}, '"top1" must be in \\[0, 100\\]'),
                                        ({'top5': -5.0}, '"top5" must be in \\[0, 100\\]'),
                                        ({'top5': 40.0}, '"top5" .* cannot be below "top1"'),
                                        ({'peak_drop_rate': 1.5}, '"peak_drop_rate" must be in'),
                                        ({'epoch': 12, 'epochs': 12}, '"epoch" 12 .* must be below "epochs" 12')])
def test_run_results_are_checked_when_built(bad, words, tmp_path):
    from dropcluster_timm.hub.run_results import RunResults
    with pytest.raises(ValueError, match=words):
        RunResults.from_dict({'top1': 50.0, **bad})
    path = tmp_path / 'metrics.json'  # a file names itself in the message
    path.write_text(json.dumps({'top1': 50.0, **bad}))
    with pytest.raises(ValueError, match=f'metrics.json: .*{words}'):
        load_metrics(path)
    if 'top_1' not in bad:  # a typed object is checked as it is changed, too
        with pytest.raises(ValueError, match=words):
            RunResults(top1=50.0).replace(**bad)


@pytest.mark.parametrize('run, expected', [
    ({'epoch': 5, 'epochs': 12, 'peak_drop_rate': 0.1, 'reclusterings': 1},
     "trained on digits for 6 of the run's 12 epochs. It was trained with DropCluster (peak rate 0.1, clusters "
     're-computed 1 time).'),
    ({'epoch': 11, 'epochs': 12}, 'trained on digits for 12 epochs.'),
])
def test_card_says_which_epoch_of_how_many_its_weights_come_from(run, expected):
    from dropcluster_timm.hub.card_text import training_notes
    from dropcluster_timm.hub.run_results import RunResults
    assert expected in training_notes('resnet18_dropcluster', RunResults(top1=50.0, dataset='digits', **run), True)
