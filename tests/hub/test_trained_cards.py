""" Cards and configs of trained weights: what a run's metrics put in README.md and config.json, and
what a push fills in."""
import json
import shutil

import pytest
import timm
import torch

from dropcluster_timm.hub import push, save_pretrained
from dropcluster_timm.hub.save import UPLOAD_FILES
from hub_helpers import RUN, TOKEN, assert_same_dropcluster


def _header(readme: str):
    from huggingface_hub import ModelCard
    return ModelCard(readme).data  # the Hub's own parser of the YAML header


def test_trained_card_usage_names_the_weights_and_push_fills_in_the_repo(trained, fake_hub, monkeypatch, tmp_path):
    """A trained card never loads the architecture's ImageNet tags; push writes the repo into a
    generated card (in the upload only), and uploads hand-written cards unchanged."""
    from dropcluster_timm.hub.model_card import CARD_MARKER
    calls, uploaded = fake_hub
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    out = save_pretrained(trained, tmp_path / 'out', metrics=RUN)
    card = (out / 'README.md').read_text()
    assert CARD_MARKER in card
    assert 'pip install dropcluster-timm' in card and 'import dropcluster_timm' in card
    assert "create_model('resnet18_dropcluster', pretrained=True)" not in card  # timm's ImageNet weights
    assert "create_model('local-dir:path/to/this/folder', pretrained=True)" in card and "'hf-hub:" not in card

    push(out, 'someorg/r18-dc')
    pushed = (uploaded / 'README.md').read_text()
    assert "create_model('hf-hub:someorg/r18-dc', pretrained=True)" in pushed and 'local-dir:' not in pushed
    assert (out / 'README.md').read_text() == card  # the folder stays as it was
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(UPLOAD_FILES)
    assert (uploaded / 'metrics.json').read_text() == (out / 'metrics.json').read_text()

    # a card generated for this repo already, and a hand-written card, go up byte for byte
    for text in (pushed, '# my own card\n\nLoad it with local-dir: please.\n'):
        (out / 'README.md').write_text(text)
        shutil.rmtree(uploaded)
        push(out, 'someorg/r18-dc')
        assert (uploaded / 'README.md').read_text() == text


def test_trained_card_header_dataset_model_index_base_model(trained, tmp_path):
    """datasets: only a Hub data set id (never a local path, never an untrained-on imagenet-1k);
    model-index from the run's accuracy; base_model of a fine-tune."""
    out = save_pretrained(trained, tmp_path / 'a', metrics=RUN, repo_id='someorg/r18-dc')
    readme = (out / 'README.md').read_text()
    data = _header(readme)
    assert data.datasets is None and 'datasets:' not in readme.split('---')[1]
    assert data.base_model is None and data.library_name == 'timm' and data.pipeline_tag == 'image-classification'
    assert data.license == 'apache-2.0' and 'dropcluster' in data.tags
    results = {r.metric_name: r for r in data.eval_results}
    assert set(results) == {'Top-1 accuracy', 'Top-5 accuracy'}
    top1 = results['Top-1 accuracy']
    assert (top1.task_type, top1.metric_type, top1.metric_value) == ('image-classification', 'accuracy', 0.555)
    assert (top1.dataset_type, top1.dataset_name, top1.dataset_split) == ('imagefolder', 'imagenette2', 'validation')
    assert results['Top-5 accuracy'].metric_value == 0.8025
    assert '/home/someone' not in readme and '/home/someone' not in (out / 'config.json').read_text()
    assert '| resnet18_dropcluster | imagenette2 | 64 | 55.500 | 80.250 |' in readme

    # no data set at all (a summary.csv run): no datasets:, no imagenet-1k
    out = save_pretrained(trained, tmp_path / 'b', metrics={'top1': 30.0})
    readme = (out / 'README.md').read_text()
    assert 'imagenet-1k' not in readme.split('---')[1].lower() and _header(readme).datasets is None

    # a Hub data set, a fine-tune of timm weights with their (kept) license
    tuned = timm.create_model('resnet18_dropcluster.tv_in1k', num_classes=10, img_size=64)
    metrics = dict(RUN, dataset='CIFAR-10', dataset_id='uoft-cs/cifar10', split='test',
                   base_model='timm/resnet18.tv_in1k', weights='raw')
    out = save_pretrained(tuned, tmp_path / 'c', metrics=metrics, repo_id='someorg/r18-dc-cifar')
    readme = (out / 'README.md').read_text()
    data = _header(readme)
    assert data.datasets == ['uoft-cs/cifar10'] and data.base_model == 'timm/resnet18.tv_in1k'
    assert data.license == 'bsd-3-clause'  # the terms of the weights it was fine-tuned from
    top1 = data.eval_results[0]
    assert (top1.dataset_type, top1.dataset_name, top1.dataset_split) == ('uoft-cs/cifar10', 'CIFAR-10', 'test')
    assert 'fine-tuned from timm/resnet18.tv_in1k on CIFAR-10' in readme
    assert 'These are the raw weights' in readme

    with pytest.raises(ValueError, match='dataset_id'):
        save_pretrained(trained, tmp_path / 'd', metrics=dict(RUN, dataset_id='/data/cifar10'))
    assert not (tmp_path / 'd').exists()  # checked before anything is written


def test_trained_config_describes_the_trained_weights(trained, tmp_path, hf_cache):
    """pretrained_cfg of trained weights drops the identity of timm's ImageNet tag, keeps the
    preprocessing, notes how they were trained, and still loads (local-dir and hf-hub)."""
    source = trained.pretrained_cfg
    assert source['tag'] == 'a1_in1k' and source['paper_ids'] and source['license']
    data_config = {'input_size': (3, 64, 64), 'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25), 'crop_pct': 1.0}
    out = save_pretrained(trained, tmp_path / 'out', metrics=RUN, data_config=data_config)
    cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    for key in ('tag', 'paper_ids', 'paper_name', 'origin_url', 'description', 'license'):
        assert key not in cfg, key
    assert cfg['input_size'] == [3, 64, 64] and cfg['mean'] == [0.5, 0.5, 0.5] and cfg['std'] == [0.25, 0.25, 0.25]
    assert cfg['crop_pct'] == 1.0 and cfg['num_classes'] == 10 and cfg['classifier'] == 'fc'
    assert cfg['interpolation'] == source['interpolation'] and cfg['first_conv'] == 'conv1'
    (notes,) = cfg['notes']
    assert 'ImageNet' not in notes and 'trained on imagenette2 for 10 epochs at 64 x 64 px' in notes
    assert 'trained with DropCluster (peak rate 0.15, clusters re-computed 4 times)' in notes
    assert 'EMA' in notes

    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert list(loaded.pretrained_cfg['notes']) == [notes] and 'tag' not in loaded.pretrained_cfg
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), trained(x))
    hf_cache.add('someorg/r18-trained', {n: out / n for n in ('config.json', 'model.safetensors')})
    from_hub = timm.create_model('hf-hub:someorg/r18-trained', pretrained=True).eval()
    assert_same_dropcluster(trained, from_hub)
    assert tuple(timm.data.resolve_model_data_config(from_hub)['mean']) == (0.5, 0.5, 0.5)

    # the weights of the architecture (no run): config as timm writes it
    plain_cfg = json.loads((save_pretrained(trained, tmp_path / 'arch') / 'config.json').read_text())['pretrained_cfg']
    assert plain_cfg['tag'] == 'a1_in1k'


def test_save_and_push_plain_timm_model(fake_hub, monkeypatch, tmp_path):
    """Any timm classifier saves, loads and pushes; its card claims no DropCluster."""
    calls, uploaded = fake_hub
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=3, drop_block_rate=0.1).eval()
    metrics = {'top1': 90.0, 'top5': 100.0, 'epochs': 5, 'img_size': 32, 'dataset': 'scikit-learn handwritten digits',
               'dataset_type': 'digits', 'split': 'validation', 'weights': 'raw', 'drop_block_rate': 0.1}
    out = save_pretrained(model, tmp_path / 'out', metrics=metrics)
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'metrics.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'resnet18' and 'drop_cluster_rate' not in config['model_args']
    card = (out / 'README.md').read_text()
    assert 'DropCluster:**' not in card and 'trained with DropCluster' not in card and 'cluster_maps' not in card
    assert 'Training with DropCluster' not in card and '- dropcluster' not in card.split('---')[1]
    assert 'no DropCluster layers and was trained with DropBlock (rate 0.1)' in card
    assert _header(card).eval_results[0].dataset_type == 'digits'
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))

    push(out, 'someorg/r18-plain')
    assert sorted(p.name for p in uploaded.iterdir()) == ['README.md', 'config.json', 'metrics.json', 'model.safetensors']
    assert "create_model('hf-hub:someorg/r18-plain', pretrained=True)" in (uploaded / 'README.md').read_text()

    # a DropCluster architecture without its cluster maps is still refused
    (out / 'config.json').write_text(json.dumps(dict(config, architecture='resnet18_dropcluster')))
    with pytest.raises(ValueError, match='no cluster maps'):
        push(out, 'someorg/r18-plain')


@pytest.mark.parametrize('run, expected, absent', [
    ({'peak_drop_rate': 0.2, 'reclusterings': 3}, 'trained with DropCluster (peak rate 0.2, clusters re-computed 3 times)',
     'never switched on'),
    ({'peak_drop_rate': 0.0, 'reclusterings': 0}, 'DropCluster layers were present but never switched on (rate 0 throughout)',
     'trained with DropCluster'),
    ({}, 'It has DropCluster structured dropout layers.', 'trained with DropCluster'),  # older metrics files
])
def test_card_says_what_the_run_did_with_dropcluster(trained, tmp_path, run, expected, absent):
    out = save_pretrained(trained, tmp_path / 'out', metrics={'top1': 40.0, 'dataset': 'imagenette', **run})
    card = (out / 'README.md').read_text()
    notes = json.loads((out / 'config.json').read_text())['pretrained_cfg']['notes'][0]
    assert expected in card and expected in notes
    assert absent not in card and absent not in notes


def test_card_of_ema_weights(trained, tmp_path):
    out = save_pretrained(trained, tmp_path / 'out', metrics=RUN)
    card = (out / 'README.md').read_text()
    assert 'These are the exponential-moving-average (EMA) weights of the run (decay 0.9998)' in card
    assert 'the results are those of the EMA weights' in card
    assert 'Weights:** exponential moving average (EMA), decay 0.9998' in card
