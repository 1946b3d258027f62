""" The registered *_dropcluster models: registry, placement, cluster state, timm's model API,
pretrained tags through a real (offline) Hugging Face cache, model cards."""
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg

import dropcluster_timm  # noqa: F401  registers the models
from dropcluster_timm import dropcluster_layers, set_drop_prob, update_clusters
from dropcluster_timm.clustering import grid_cluster_map
from dropcluster_timm.model_card import (
    build_model_card, load_metrics, load_results_table, model_stats, render_model_card, write_model_cards)

VARIANTS = ['resnet18_dropcluster', 'resnet34_dropcluster', 'resnet50_dropcluster', 'resnet101_dropcluster',
            'resnet152_dropcluster', 'resnet50d_dropcluster']
BASES = {v: v[:-len('_dropcluster')] for v in VARIANTS}
REPO_ROOT = Path(__file__).resolve().parents[1]
# The CIFAR-10 study's table in the card of the model it trained (benchmarks/study_cifar10.py writes it).
STUDY_MODEL = 'resnet18_dropcluster'
STUDY_TABLE = REPO_ROOT / 'benchmarks' / 'results' / 'study_cifar10_card_table.json'
CARDS_COMMAND = f'dropcluster-timm cards --table {STUDY_MODEL}={STUDY_TABLE.relative_to(REPO_ROOT).as_posix()}'


def layer_shapes(model):
    return {name: tuple(layer.cluster_map.shape) for name, layer in dropcluster_layers(model)}


def test_registry():
    assert sorted(timm.list_models('*dropcluster*')) == sorted(VARIANTS)
    assert set(timm.list_models(module='resnet_dropcluster')) == set(VARIANTS)


@pytest.mark.parametrize('tag', timm.list_pretrained('*_dropcluster.*'))
def test_pretrained_tags_point_at_timm_weights(tag):
    """Every tag is a real timm ImageNet weight of the base ResNet, with the same data config."""
    arch, weights = tag.split('.', 1)
    ours = get_pretrained_cfg(tag)
    base = get_pretrained_cfg(f'{BASES[arch]}.{weights}')
    assert base is not None and base.hf_hub_id == f'timm/{BASES[arch]}.{weights}'
    assert ours.hf_hub_id == base.hf_hub_id
    for field in ('input_size', 'pool_size', 'mean', 'std', 'crop_pct', 'interpolation', 'num_classes',
                  'first_conv', 'classifier', 'license', 'test_input_size'):
        assert getattr(ours, field) == getattr(base, field), field


@pytest.mark.parametrize('variant', VARIANTS)
def test_structure_matches_timm_resnet(variant):
    """Same parameters as timm's ResNet (so its weights load), DropCluster in every block of stages 3-4."""
    model = timm.create_model(variant, device='meta')
    base = timm.create_model(BASES[variant], device='meta')
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in base.named_parameters()]
    names = [n for n, _ in dropcluster_layers(model)]
    expected = [f'layer{s}.{i}.drop_block' for s in (3, 4) for i in range(len(getattr(base, f'layer{s}')))]
    assert names == expected
    assert all(layer.drop_prob == 0.0 for _, layer in dropcluster_layers(model))
    # buffers follow the requested device, grids were built before the move
    assert {b.device.type for b in model.buffers()} == {'meta'}


def test_grid_buffers_sized_from_img_size():
    model = timm.create_model('resnet18_dropcluster')
    shapes = layer_shapes(model)
    assert shapes['layer3.0.drop_block'] == (1, 14, 14) and shapes['layer4.1.drop_block'] == (1, 7, 7)
    model = timm.create_model('resnet18_dropcluster', img_size=(96, 64), dc_stem=True, dc_stages=[2, 3, 4])
    shapes = layer_shapes(model)
    assert shapes['maxpool.drop_cluster'] == (1, 48, 32)
    assert shapes['layer2.0.drop_block'] == (1, 12, 8)
    assert shapes['layer3.0.drop_block'] == (1, 6, 4)
    assert shapes['layer4.0.drop_block'] == (1, 3, 2)
    # the pretrained tag's input size sizes the maps when img_size is not given (a3: 160)
    model = timm.create_model('resnet18_dropcluster.a3_in1k')
    assert layer_shapes(model)['layer4.0.drop_block'] == (1, 5, 5)
    # every map is the core's grid for the layer's cluster size (DropBlock's block: 5 in stage 3, 3 in stage 4)
    for name, layer in dropcluster_layers(timm.create_model('resnet18_dropcluster', img_size=224)):
        side = {'layer3': 5, 'layer4': 3}[name.split('.')[0]]
        assert layer.cluster_size == side * side
        size = list(layer.cluster_map.shape[1:])
        assert torch.equal(layer.cluster_map.long(), grid_cluster_map(size, layer.target_clusters(size)))
        assert layer.cluster_map.max() + 1 == layer.cluster_counts[0] > 1


def test_stem_placement_after_act_before_pool():
    model = timm.create_model('resnet18_dropcluster', dc_stem=True, drop_cluster_prob=0.3, img_size=64).train()
    stem = model.maxpool.drop_cluster
    seen = {}
    stem.register_forward_hook(lambda m, a, o: seen.update(inp=a[0].detach().clone(), out=o.detach()))
    model.act1.register_forward_hook(lambda m, a, o: seen.update(act=o.detach().clone()))
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(seen['inp'], seen['act'])  # input of the stem DropCluster is act1's output
    dropped = (seen['out'] == 0) & (seen['inp'] != 0)
    assert dropped.any()  # and it drops in training
    # feature taps stay on act1, so the stem feature is the undropped activation
    assert model.feature_info[0]['module'] == 'act1'


def test_drop_in_train_identity_in_eval():
    torch.manual_seed(0)
    # zero_init_last=False: a fresh ResNet zeroes the last norm of each residual branch, which
    # would hide the drop in the branch
    model = timm.create_model('resnet18_dropcluster', drop_cluster_prob=0.5, num_classes=7, zero_init_last=False)
    x = torch.randn(2, 3, 64, 64)
    reference = timm.create_model('resnet18_dropcluster', num_classes=7, zero_init_last=False)
    reference.load_state_dict(model.state_dict())
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(x), reference(x))
    model.train()
    reference.train()
    assert not torch.allclose(model(x), reference(x))
    set_drop_prob(model, 0.0)
    torch.testing.assert_close(model(x), reference(x))


def test_model_kwargs_and_errors():
    model = timm.create_model('resnet18_dropcluster', dc_num_clusters=4, dc_couple_channels=True,
                              dc_cluster_method='kmeans', drop_cluster_prob=0.2)
    for _, layer in dropcluster_layers(model):
        assert (layer.num_clusters, layer.couple_channels, layer.cluster_method, layer.drop_prob) == (4, True, 'kmeans', 0.2)
        assert int(layer.cluster_counts[0]) <= 4
    with pytest.raises(ValueError, match='drop_cluster_prob'):
        timm.create_model('resnet18_dropcluster', drop_block_rate=0.1)
    with pytest.raises(ValueError, match='dc_stages'):
        timm.create_model('resnet18_dropcluster', dc_stages=[5])
    with pytest.raises(ValueError, match='no DropCluster placement'):
        timm.create_model('resnet18_dropcluster', dc_stages=[])
    assert [n for n, _ in dropcluster_layers(timm.create_model('resnet18_dropcluster', dc_stages=[], dc_stem=True))] \
        == ['maxpool.drop_cluster']
    with pytest.raises(ValueError, match='img_size'):
        timm.create_model('resnet18_dropcluster', img_size=(0, 3))
    with pytest.raises(ValueError, match='drop_prob'):
        timm.create_model('resnet18_dropcluster', drop_cluster_prob=1.0)
    with pytest.raises(TypeError):
        timm.create_model('resnet18_dropcluster', not_a_model_arg=1)


def test_timm_model_api():
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model('resnet18_dropcluster', num_classes=5, in_chans=3, dc_stem=True).eval()
    assert model(x).shape == (2, 5)
    final, intermediates = model.forward_intermediates(x)
    assert [t.shape[1] for t in intermediates] == [64, 64, 128, 256, 512]
    torch.testing.assert_close(final, model.forward_features(x))
    out = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), out)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)

    features = timm.create_model('resnet18_dropcluster', features_only=True, out_indices=(2, 3, 4)).eval()
    assert [f.shape[-1] for f in features(x)] == [8, 4, 2]
    assert len(list(dropcluster_layers(features))) == 4  # the layers live on in the feature wrapper

    gray = timm.create_model('resnet18_dropcluster', in_chans=1, num_classes=0).eval()
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 512)


def test_train_after_update_clusters_and_torchscript():
    torch.manual_seed(0)
    model = timm.create_model('resnet18_dropcluster', drop_cluster_prob=0.2, num_classes=4, img_size=64)
    x = torch.randn(4, 3, 64, 64)
    assert update_clusters(model, x) == 4
    assert layer_shapes(model)['layer3.0.drop_block'] == (256, 4, 4)  # per-channel maps
    model.train()
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    scripted = torch.jit.script(model)
    scripted.train()
    assert scripted(x).shape == (4, 4)
    scripted.eval()
    model.eval()
    torch.testing.assert_close(scripted(x), model(x))


def _fake_timm_checkpoint(tmp_path, base: str) -> Path:
    """A real timm ResNet (random weights) saved as the Hub repo would hold it."""
    torch.manual_seed(1)
    model = timm.create_model(base)
    path = tmp_path / f'{base}.safetensors'
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def test_pretrained_tag_loads_timm_weights_from_hf_cache(tmp_path, hf_cache):
    """`resnet18_dropcluster.a1_in1k` reads timm/resnet18.a1_in1k from the cache, adds grid cluster maps."""
    ckpt = _fake_timm_checkpoint(tmp_path, 'resnet18')
    hf_cache.add('timm/resnet18.a1_in1k', {'model.safetensors': ckpt})
    source = safetensors.torch.load_file(str(ckpt))

    model = timm.create_model('resnet18_dropcluster.a1_in1k', pretrained=True, drop_cluster_prob=0.1)
    state = model.state_dict()
    for k, v in source.items():
        torch.testing.assert_close(state[k], v, msg=k)
    fresh = timm.create_model('resnet18_dropcluster.a1_in1k')
    for name, layer in dropcluster_layers(model):
        assert torch.equal(layer.cluster_map, fresh.get_submodule(name).cluster_map)
        assert layer.drop_prob == 0.1

    # timm's own adaptations still apply: new head, 1-channel stem, features_only
    adapted = timm.create_model('resnet18_dropcluster.a1_in1k', pretrained=True, num_classes=5, in_chans=1)
    torch.testing.assert_close(adapted.conv1.weight, source['conv1.weight'].sum(1, keepdim=True))
    assert adapted.fc.out_features == 5
    feats = timm.create_model('resnet18_dropcluster.a1_in1k', pretrained=True, features_only=True)
    assert len(feats(torch.randn(1, 3, 64, 64))) == 5

    # a weight that is not in the cache fails (offline), nothing is invented
    with pytest.raises(Exception):
        timm.create_model('resnet18_dropcluster.a2_in1k', pretrained=True)


def test_pretrained_stem_pool_with_params_is_remapped(tmp_path, hf_cache):
    """dc_stem with a conv stem pool (replace_stem_pool) moves maxpool.* to maxpool.pool.* on load."""
    torch.manual_seed(2)
    base = timm.create_model('resnet18', replace_stem_pool=True)
    path = tmp_path / 'r18.safetensors'
    safetensors.torch.save_file(base.state_dict(), str(path))
    hf_cache.add('timm/resnet18.a1_in1k', {'model.safetensors': path})
    model = timm.create_model('resnet18_dropcluster.a1_in1k', pretrained=True, replace_stem_pool=True, dc_stem=True)
    torch.testing.assert_close(model.maxpool.pool[0].weight, base.maxpool[0].weight)


# ----- model cards

def test_model_stats_counted():
    """GMACs from FlopCounterMode equal the MACs of every conv / linear counted from their shapes."""
    model = timm.create_model('resnet18_dropcluster').eval()
    macs, acts = [], []

    def hook(m, a, o):
        macs.append(o.numel() * m.weight[0].numel())
        acts.append(o.numel())

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    stats = model_stats('resnet18_dropcluster')
    assert stats['gmacs'] == pytest.approx(sum(macs) / 1e9, rel=1e-6)
    assert stats['activations_m'] == pytest.approx(sum(acts) / 1e6)
    assert stats['params_m'] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert model_stats('resnet18_dropcluster', img_size=(112, 112))['gmacs'] < stats['gmacs'] / 3
    # the model's own input size by default (img_size of a DropCluster model), any timm architecture
    assert model_stats('resnet18_dropcluster', model_args={'img_size': [32, 32]})['img_size'] == (32, 32)
    plain = model_stats('resnet18', img_size=32, model_args={'num_classes': 3})
    assert plain['img_size'] == (32, 32) and plain['gmacs'] == pytest.approx(stats['gmacs'] * (32 / 224) ** 2, rel=0.05)
    assert plain['params_m'] == pytest.approx(sum(p.numel() for p in timm.create_model('resnet18', num_classes=3).parameters()) / 1e6)


def test_card_stats_keep_digits_at_small_sizes():
    """Cards print small statistics with three significant digits: GMACs at 32 px are not 0.0."""
    import re
    gmacs = model_stats('resnet18_dropcluster', img_size=(32, 32))['gmacs']
    assert 0.01 < gmacs < 0.1
    text = render_model_card('resnet18_dropcluster', metrics={'top1': 50.0, 'img_size': 32})
    printed = re.search(r'GMACs: (\S+)\n', text).group(1)
    assert float(printed) == pytest.approx(gmacs, rel=0.01) and 'Image size: 32 x 32' in text

    from dropcluster_timm.model_card import format_stat
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
    assert load_metrics(summary) == {'top1': 42.25, 'top5': 70.0, 'epoch': 1, 'epochs': 3}
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
    """model_cards/ holds one card per registered variant, as the generator writes them today."""
    written = write_model_cards(tmp_path, tables={STUDY_MODEL: [load_results_table(STUDY_TABLE)]})
    assert sorted(p.name for p in written) == sorted(f'{v}.md' for v in VARIANTS)
    committed = REPO_ROOT / 'model_cards'
    assert sorted(p.name for p in committed.glob('*.md')) == sorted(p.name for p in written)
    for p in written:
        assert (committed / p.name).read_text() == p.read_text(), f'{p.name} is stale: run `{CARDS_COMMAND}`'


def test_card_of_the_study_model_carries_the_study_table(tmp_path):
    """The committed study table (benchmarks/results/study_cifar10_card_table.json) becomes a section
    of the card it is given to, with every arm's figures of the committed results, and only there."""
    table = load_results_table(STUDY_TABLE)
    written = {p.stem: p.read_text() for p in write_model_cards(tmp_path, tables={STUDY_MODEL: [table]})}
    text = written[STUDY_MODEL]
    assert '### CIFAR-10 study (from-scratch runs; no weights published)' in text
    assert 'No DropCluster-trained weights are published yet' in text
    assert '| train images | regulariser | rate | test top-1 (%) | mCA (%) |\n|---:|---|---:|---:|---:|' in text
    results = json.loads((STUDY_TABLE.parent / 'study_cifar10.json').read_text())
    for e in results['summary']:
        assert (f"| {e['size']} | " in text and f"{e['test_top1']:.2f} +- {e['test_top1_std']:.2f}" in text
                and f"{e['mean_corruption_top1']:.2f} +- {e['mean_corruption_top1_std']:.2f}" in text), e
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


@pytest.mark.parametrize('content, message', [
    ('[1, 2]', 'expected a JSON object'),
    ('{"title": "t", "columns": ["a"], "rows": []}', 'missing key.* description'),
    ('{"title": "t", "description": "d", "columns": ["a", "b"], "rows": [[1, 2], [3]]}',
     'row 1 has 1 cells, expected one per column \\(2\\)'),
    ('{"title": "t", "description": "d", "columns": ["a"], "rows": [[1]], "note": "x"}', 'unknown key.* note'),
    ('{"title": "t", "description": "d", "columns": [], "rows": []}', '"columns" must be a non-empty list'),
    ('{"title": "t", "description": "d", "columns": ["a"], "rows": [[{"x": 1}]]}', 'row 0: cells must be'),
    ('{"title": "t", "description": "d", "columns": ["a"], "rows": [[true]]}', 'row 0: cells must be'),
    ('{"title": "t", "description": "d", "columns": ["a"], "rows": [[1]], "align": ["up"]}', '"align" must'),
    ('{"title": "", "description": "d", "columns": ["a"], "rows": []}', '"title" must be one non-empty line'),
    ('{"title": "t", "description": "d", "columns": ["a"], "rows": [[1]], "notes": 3}',
     '"notes" must be a string'),
    ('{"title": "t",', 'not valid JSON'),
])
def test_malformed_results_table_fails_naming_file_and_fault(tmp_path, content, message):
    path = tmp_path / 'my_table.json'
    path.write_text(content)
    with pytest.raises(ValueError, match=f'my_table.json: .*{message}'):
        load_results_table(path)


def test_results_tables_are_checked_where_they_enter(tmp_path):
    """A missing file, a malformed table given in code, tables for a model without a card: all refused."""
    with pytest.raises(FileNotFoundError, match='results table not found'):
        load_results_table(tmp_path / 'absent.json')
    with pytest.raises(ValueError, match='missing key'):
        build_model_card('resnet18_dropcluster', tables=[{'title': 't'}])
    with pytest.raises(ValueError, match='resnet18_dropclustr'):
        write_model_cards(tmp_path, tables={'resnet18_dropclustr': []})
    assert not list(tmp_path.iterdir())  # refused before any card is written
