""" Hub format: save, reload through local-dir and a real (offline) HF cache, push with faked network calls."""
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import HfApi

import dropcluster_timm  # noqa: F401  registers the models
from dropcluster_timm import dropcluster_layers, set_drop_prob, update_clusters
from dropcluster_timm.cli import main as cli_main
from dropcluster_timm.hub import UPLOAD_FILES, push, save_pretrained

TOKEN = 'hf_testtoken_do_not_leak_0123456789'


@pytest.fixture
def trained(tmp_path):
    """A resnet18_dropcluster with learned per-channel maps at another resolution and a changed rate."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18_dropcluster', num_classes=10, img_size=64, dc_stem=True,
                              dc_cluster_method='kmeans')
    update_clusters(model, torch.randn(4, 3, 96, 80))  # maps at 96 x 80, the model's grids are 64 x 64
    set_drop_prob(model, 0.15)
    return model.eval()


def assert_same_dropcluster(a, b):
    la, lb = list(dropcluster_layers(a)), list(dropcluster_layers(b))
    assert [n for n, _ in la] == [n for n, _ in lb]
    for (name, x), (_, y) in zip(la, lb):
        assert torch.equal(x.cluster_map, y.cluster_map), name
        assert torch.equal(x.cluster_counts, y.cluster_counts), name
        for attr in ('drop_prob', 'cluster_size', 'num_clusters', 'couple_channels', 'with_noise',
                     'cluster_method', 'max_clusters'):
            assert getattr(x, attr) == getattr(y, attr), (name, attr)


def test_save_writes_config_safetensors_card(trained, tmp_path):
    out = save_pretrained(trained, tmp_path / 'out')
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'resnet18_dropcluster'
    args = config['model_args']
    assert args['drop_cluster_prob'] == 0.15  # the current rate, not the constructor's 0
    assert args['dc_stem'] is True and args['dc_stages'] == [3, 4] and args['dc_cluster_method'] == 'kmeans'
    assert args['img_size'] == [64, 64] and args['num_classes'] == 10
    tensors = safetensors.torch.load_file(str(out / 'model.safetensors'))
    for name, layer in dropcluster_layers(trained):
        assert torch.equal(tensors[f'{name}.cluster_map'], layer.cluster_map)
        assert torch.equal(tensors[f'{name}.cluster_counts'], layer.cluster_counts)
    assert tensors['layer3.0.drop_block.cluster_map'].shape == (256, 6, 5)
    card = (out / 'README.md').read_text()
    assert 'library_name: timm' in card and '# Model card for resnet18_dropcluster' in card
    assert 'Rate (drop_cluster_prob): 0.15' in card and 'stem' in card


def test_local_dir_round_trip(trained, tmp_path):
    out = save_pretrained(trained, tmp_path / 'out')
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert_same_dropcluster(trained, loaded)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), trained(x))
    # timm's own save_for_hf records the DropCluster arguments too (they are model args of the model)
    timm.models.save_for_hf(trained, tmp_path / 'plain', safe_serialization=True)
    plain = json.loads((tmp_path / 'plain' / 'config.json').read_text())['model_args']
    assert plain['dc_stem'] is True and plain['dc_cluster_method'] == 'kmeans'


def test_hf_hub_round_trip_from_cache(trained, tmp_path, hf_cache):
    out = save_pretrained(trained, tmp_path / 'out')
    hf_cache.add('someorg/r18-dropcluster', {n: out / n for n in ('config.json', 'model.safetensors', 'README.md')})
    loaded = timm.create_model('hf-hub:someorg/r18-dropcluster', pretrained=True).eval()
    assert_same_dropcluster(trained, loaded)
    assert loaded.pretrained_cfg['hf_hub_id'] == 'someorg/r18-dropcluster'
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), trained(x))
    with pytest.raises(Exception):  # offline and not in the cache
        timm.create_model('hf-hub:someorg/missing', pretrained=True)


def test_save_refuses_mixed_rates_and_wrappers(trained, tmp_path):
    next(iter(dropcluster_layers(trained)))[1].drop_prob = 0.3
    with pytest.raises(ValueError, match='set_drop_prob'):
        save_pretrained(trained, tmp_path / 'a')
    features = timm.create_model('resnet18_dropcluster', features_only=True)
    with pytest.raises(ValueError, match='features_only'):
        save_pretrained(features, tmp_path / 'b')


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Replace only HfApi's network methods; upload_folder keeps a copy of what it would upload."""
    calls = {}
    uploaded = tmp_path / 'uploaded'

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls['create_repo'] = dict(repo_id=repo_id, private=private, token=self.token)
        return type('RepoUrl', (), {'repo_id': repo_id})()

    def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
        calls['create_branch'] = dict(repo_id=repo_id, branch=branch)

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, allow_patterns=None, **kwargs):
        calls['upload_folder'] = dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        uploaded.mkdir()
        for p in Path(folder_path).iterdir():
            if allow_patterns is None or p.name in allow_patterns:
                shutil.copyfile(p, uploaded / p.name)
        return type('CommitInfo', (), {'commit_url': f'https://huggingface.co/{repo_id}/commit/abc'})()

    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'create_branch', create_branch)
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    return calls, uploaded


def _assert_no_token(path: Path, *texts):
    for p in path.rglob('*'):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    for t in texts:
        assert TOKEN not in t


def test_push_model(trained, fake_hub, monkeypatch, capsys, tmp_path):
    calls, uploaded = fake_hub
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    metrics = tmp_path / 'metrics.json'
    metrics.write_text(json.dumps({'top1': 55.5, 'top5': 80.25, 'dataset': 'imagenette'}))
    push(trained, 'someorg/r18-dc', private=True, revision='v1', metrics=metrics)
    assert calls['create_repo'] == dict(repo_id='someorg/r18-dc', private=True, token=TOKEN)
    assert calls['create_branch'] == dict(repo_id='someorg/r18-dc', branch='v1')
    assert calls['upload_folder']['revision'] == 'v1'
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(UPLOAD_FILES)  # no pickle files
    tensors = safetensors.torch.load_file(str(uploaded / 'model.safetensors'))
    for name, layer in dropcluster_layers(trained):
        assert torch.equal(tensors[f'{name}.cluster_map'], layer.cluster_map)
    assert json.loads((uploaded / 'config.json').read_text())['model_args']['drop_cluster_prob'] == 0.15
    card = (uploaded / 'README.md').read_text()
    assert '| resnet18_dropcluster | imagenette |  | 55.500 | 80.250 |' in card
    assert "create_model('hf-hub:someorg/r18-dc', pretrained=True)" in card
    out = capsys.readouterr()
    _assert_no_token(uploaded, out.out, out.err)


def test_cli_push_folder(trained, fake_hub, monkeypatch, capsys, tmp_path):
    calls, uploaded = fake_hub
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    out = save_pretrained(trained, tmp_path / 'out')
    (out / 'README.md').unlink()  # the card is generated at push, from the run's summary.csv
    (out / 'summary.csv').write_text('epoch,eval_top1,eval_top5\n0,30.0,60.0\n1,33.5,61.0\n')
    torch.save(trained.state_dict(), out / 'pytorch_model.bin')  # a pickle file that must stay behind
    assert cli_main(['push', str(out), '--repo-id', 'someorg/r18-dc']) == 0
    assert calls['upload_folder']['revision'] is None and 'create_branch' not in calls
    assert sorted(p.name for p in uploaded.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert '| resnet18_dropcluster |  |  | 33.500 | 61.000 |' in (uploaded / 'README.md').read_text()
    assert not (out / 'README.md').exists()  # the folder itself is left as it was
    captured = capsys.readouterr()
    assert 'someorg/r18-dc' in captured.out
    _assert_no_token(uploaded, captured.out, captured.err)


def test_push_errors(trained, tmp_path, monkeypatch, capsys):
    out = save_pretrained(trained, tmp_path / 'out')
    # no credentials: no token argument, no HF_TOKEN, an empty HF home
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr('huggingface_hub.constants.HF_TOKEN_PATH', str(tmp_path / 'no_token'))
    monkeypatch.setattr('huggingface_hub.constants.HF_STORED_TOKENS_PATH', str(tmp_path / 'no_tokens'))
    with pytest.raises(RuntimeError, match='No Hugging Face token'):
        push(out, 'someorg/r18-dc')
    assert cli_main(['push', str(out), '--repo-id', 'someorg/r18-dc']) == 1
    assert 'No Hugging Face token' in capsys.readouterr().err

    # no network: the Hub endpoint refuses connections
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    monkeypatch.setattr('huggingface_hub.constants.ENDPOINT', 'http://127.0.0.1:9')
    with pytest.raises(RuntimeError, match='Pushing to the Hugging Face Hub repo') as info:
        push(out, 'someorg/r18-dc')
    assert TOKEN not in str(info.value)

    with pytest.raises(ValueError, match='org/name'):
        push(out, 'no-org')
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        push(tmp_path, 'someorg/r18-dc')
    with pytest.raises(SystemExit):
        cli_main(['push', str(out), '--repo-id', 'someorg/x', '--token', TOKEN])  # no token on the command line


def test_cli_cards(tmp_path, capsys):
    metrics = tmp_path / 'm.json'
    metrics.write_text(json.dumps({'top1': 60.0}))
    assert cli_main(['cards', '--out-dir', str(tmp_path / 'cards'), '--metrics', f'resnet18_dropcluster={metrics}']) == 0
    cards = sorted(p.name for p in (tmp_path / 'cards').iterdir())
    assert cards == sorted(f'{m}.md' for m in timm.list_models('*_dropcluster'))
    assert '60.000' in (tmp_path / 'cards' / 'resnet18_dropcluster.md').read_text()
    assert 'No DropCluster-trained' in (tmp_path / 'cards' / 'resnet34_dropcluster.md').read_text()
    assert cli_main(['cards', '--metrics', 'nofile']) == 2
