""" Hub format: save, reload through local-dir and a real (offline) HF cache, push with faked network calls."""
import json
import os
import shutil
import warnings

import pytest
import safetensors.torch
import timm
import torch

import dropcluster_timm  # noqa: F401  registers the models
from dropcluster_timm import dropcluster_layers, update_clusters
from dropcluster_timm.cli import main as cli_main
from dropcluster_timm.hub import push, save_pretrained
from dropcluster_timm.hub.save import UPLOAD_FILES
from hub_helpers import RUN, TOKEN, assert_no_token, assert_same_dropcluster


def test_save_writes_config_safetensors_card(trained, tmp_path):
    out = save_pretrained(trained, tmp_path / 'out')
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'cluster_maps.png', 'config.json', 'model.safetensors']
    assert (out / 'cluster_maps.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'  # a real picture of the 2-D maps
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'resnet18_dropcluster'
    args = config['model_args']
    assert args['drop_cluster_rate'] == 0.15  # the current rate, not the constructor's 0
    assert args['dc_stem'] is True and args['dc_stages'] == [3, 4] and args['dc_cluster_method'] == 'kmeans'
    assert args['img_size'] == [64, 64] and args['num_classes'] == 10
    tensors = safetensors.torch.load_file(str(out / 'model.safetensors'))
    for name, layer in dropcluster_layers(trained):
        assert torch.equal(tensors[f'{name}.cluster_map'], layer.cluster_map)
        assert torch.equal(tensors[f'{name}.cluster_counts'], layer.cluster_counts)
    assert tensors['layer3.0.drop_block.cluster_map'].shape == (256, 6, 5)
    card = (out / 'README.md').read_text()
    assert 'library_name: timm' in card and '# Model card for resnet18_dropcluster' in card
    assert 'Rate (drop_cluster_rate): 0.15' in card and 'stem' in card
    assert '## Cluster maps\n![cluster maps](cluster_maps.png)' in card


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


def test_hub_round_trip_of_per_channel_counts_and_undropped_maps(tmp_path, hf_cache):
    """Maps of different counts per channel and maps left undropped survive the Hub format."""
    model = timm.create_model('resnet18_dropcluster', num_classes=3, img_size=64, drop_cluster_rate=0.2,
                              dc_stem=True, dc_cluster_count='gap', dc_skip_unstructured=True,
                              dc_drop_mode='size', dc_batch_shared=True)
    torch.manual_seed(0)
    images = torch.randn(8, 3, 64, 64)
    images[:, :, 20:40] += 3.0  # a band: the stem's maps get structure, not every channel alike
    update_clusters(model, images, generator=torch.Generator().manual_seed(0))
    counts = torch.cat([layer.cluster_counts for _, layer in dropcluster_layers(model)])
    assert counts.unique().numel() > 2, 'expected several counts per layer'
    assert (counts == 0).any(), 'expected some maps left undropped'
    out = save_pretrained(model, tmp_path / 'out')
    hf_cache.add('someorg/r18-gap', {n: out / n for n in ('config.json', 'model.safetensors', 'README.md')})
    loaded = timm.create_model('hf-hub:someorg/r18-gap', pretrained=True)
    assert_same_dropcluster(model, loaded)
    x = torch.randn(2, 3, 64, 64)
    for m in (model, loaded):
        m.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(loaded(x), a)


def test_save_refuses_mixed_rates_and_wrappers(trained, tmp_path):
    next(iter(dropcluster_layers(trained)))[1].drop_prob = 0.3
    with pytest.raises(ValueError, match='set_drop_prob'):
        save_pretrained(trained, tmp_path / 'a')
    features = timm.create_model('resnet18_dropcluster', features_only=True)
    with pytest.raises(ValueError, match='features_only'):
        save_pretrained(features, tmp_path / 'b')


def test_push_model(trained, fake_hub, monkeypatch, capsys, tmp_path):
    calls, uploaded = fake_hub
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    metrics = tmp_path / 'metrics.json'
    metrics.write_text(json.dumps({'top1': 55.5, 'top5': 80.25, 'dataset': 'imagenette'}))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a new repo: nothing to say
        push(trained, 'someorg/r18-dc', private=True, revision='v1', metrics=metrics)
    assert calls['create_repo'] == dict(repo_id='someorg/r18-dc', private=True, token=TOKEN)
    assert calls['create_branch'] == dict(repo_id='someorg/r18-dc', branch='v1')
    assert calls['upload_folder']['revision'] == 'v1'
    calls['existing'] = {'someorg/r18-dc'}
    shutil.rmtree(uploaded)
    with pytest.warns(UserWarning, match='exists already: private=True is ignored'):
        push(trained, 'someorg/r18-dc', private=True, metrics=metrics)
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(UPLOAD_FILES)  # no pickle files
    tensors = safetensors.torch.load_file(str(uploaded / 'model.safetensors'))
    for name, layer in dropcluster_layers(trained):
        assert torch.equal(tensors[f'{name}.cluster_map'], layer.cluster_map)
    assert json.loads((uploaded / 'config.json').read_text())['model_args']['drop_cluster_rate'] == 0.15
    card = (uploaded / 'README.md').read_text()
    assert '| resnet18_dropcluster | imagenette |  | 55.500 | 80.250 |' in card
    assert "create_model('hf-hub:someorg/r18-dc', pretrained=True)" in card
    out = capsys.readouterr()
    assert_no_token(uploaded, out.out, out.err)


def test_push_errors(trained, tmp_path, monkeypatch, capsys):
    out = save_pretrained(trained, tmp_path / 'out')
    # no credentials: no token argument, no HF_TOKEN, an empty HF home
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr('huggingface_hub.constants.HF_TOKEN_PATH', str(tmp_path / 'no_token'))
    monkeypatch.setattr('huggingface_hub.constants.HF_STORED_TOKENS_PATH', str(tmp_path / 'no_tokens'))
    with pytest.raises(RuntimeError, match='No Hugging Face token'):
        push(out, 'someorg/r18-dc')
    assert cli_main(['push', str(out), '--repo-id', 'someorg/r18-dc']) == 2
    assert 'No Hugging Face token' in capsys.readouterr().err

    # no network: the Hub endpoint refuses connections
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    monkeypatch.setattr('huggingface_hub.constants.ENDPOINT', 'http://127.0.0.1:9')
    with pytest.raises(RuntimeError, match='Pushing to the Hugging Face Hub repo') as info:
        push(out, 'someorg/r18-dc')
    assert TOKEN not in str(info.value)

    with pytest.raises(ValueError, match='org/name'):
        push(out, 'no-org')
    for bad in ('a/b c', '../x', 'org/name\nmore'):  # huggingface_hub's own rules, before anything is sent
        with pytest.raises(ValueError, match='is not a valid Hub repo id'):
            push(out, bad)
        with pytest.raises(ValueError, match='is not a valid Hub repo id'):
            save_pretrained(trained, tmp_path / 'c', repo_id=bad)
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        push(tmp_path, 'someorg/r18-dc')
    with pytest.raises(SystemExit):
        cli_main(['push', str(out), '--repo-id', 'someorg/x', '--token', TOKEN])  # no token on the command line


def test_cluster_map_picture_only_with_2d_maps(tmp_path):
    """plot_cluster_maps lives in dropcluster_timm.hub.pictures; no maps, no picture, no image in the card."""
    from dropcluster_timm.hub.pictures import plot_cluster_maps
    model = timm.create_model('resnet18_dropcluster', num_classes=4, img_size=64)
    assert plot_cluster_maps(model, str(tmp_path / 'a.png'), channels=2) == str(tmp_path / 'a.png')
    assert (tmp_path / 'a.png').read_bytes()[:4] == b'\x89PNG'
    plain = timm.create_model('resnet18', num_classes=4)
    assert plot_cluster_maps(plain, str(tmp_path / 'b.png')) is None and not (tmp_path / 'b.png').exists()
    assert {'cluster_maps.png', 'metrics.json'} <= set(UPLOAD_FILES)


def test_push_reports_the_folder_before_the_token(tmp_path, monkeypatch, capsys):
    """A missing folder is the first error, and the no-token message suits the CLI (no token=...)."""
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr('huggingface_hub.constants.HF_TOKEN_PATH', str(tmp_path / 'no_token'))
    monkeypatch.setattr('huggingface_hub.constants.HF_STORED_TOKENS_PATH', str(tmp_path / 'no_tokens'))
    with pytest.raises(FileNotFoundError, match='no such folder'):
        push(tmp_path / 'missing', 'someorg/r18-dc')
    assert cli_main(['push', str(tmp_path / 'missing'), '--repo-id', 'someorg/r18-dc']) == 2  # input errors
    err = capsys.readouterr().err
    assert 'no such folder' in err and 'token' not in err.lower()

    model = timm.create_model('resnet18_dropcluster', num_classes=2, img_size=32)
    out = save_pretrained(model, tmp_path / 'out')
    assert cli_main(['push', str(out), '--repo-id', 'someorg/r18-dc']) == 2
    err = capsys.readouterr().err
    assert 'No Hugging Face token' in err and 'HF_TOKEN' in err and 'hf auth login' in err and 'token=' not in err


def test_saving_again_replaces_its_own_files_only(trained, tmp_path):
    """A second save into the folder replaces the files it writes (each renamed into place, no
    temporary folder left beside it), removes its own files the new save does not have, and
    leaves other files alone."""
    out = tmp_path / 'out'
    save_pretrained(trained, out, metrics={'top1': 50.0, 'top5': 90.0, 'epochs': 3})
    (out / 'notes.txt').write_text('mine')
    assert (out / 'metrics.json').is_file()
    plain = timm.create_model('resnet18', num_classes=10)
    save_pretrained(plain, out)
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors', 'notes.txt']
    assert (out / 'notes.txt').read_text() == 'mine'
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'resnet18'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']  # no staging folder left
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(reloaded.fc.weight, plain.fc.weight)


@pytest.mark.parametrize('variant, kwargs', [
    ('resnet18_dropcluster', dict(dc_stem=True, dc_stages=[2, 3, 4], replace_stem_pool=True, img_size=64)),
    ('gernet_s_dropcluster', dict(dc_num_clusters=3)),
])
def test_export_plain_loads_in_stock_timm_with_the_same_outputs(variant, kwargs, tmp_path):
    """The exported folder is the base architecture: a process that never imports dropcluster_timm
    loads it with timm alone and gets the DropCluster model's eval-mode outputs."""
    import subprocess
    import sys
    from dropcluster_timm.hub import export_plain
    torch.manual_seed(0)
    model = timm.create_model(variant, num_classes=6, drop_cluster_rate=0.1, **kwargs)
    update_clusters(model, torch.randn(2, 3, 64, 64))
    folder = save_pretrained(model, tmp_path / 'dc', metrics={'top1': 40.0, 'epochs': 2})
    plain = export_plain(folder, tmp_path / 'plain')
    config = json.loads((plain / 'config.json').read_text())
    base = variant[:-len('_dropcluster')]
    assert config['architecture'] == base and not any(k.startswith(('dc_', 'drop_cluster')) for k in config['model_args'])
    tensors = safetensors.torch.load_file(str(plain / 'model.safetensors'))
    assert not any('cluster' in k for k in tensors)
    assert json.loads((plain / 'metrics.json').read_text())['top1'] == 40.0
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / 'x.pt')
    with torch.no_grad():
        expected = model.eval()(x)
    code = ('import sys, timm, torch; '
            f'm = timm.create_model("local-dir:{plain}", pretrained=True).eval(); '
            f'y = m(torch.load("{tmp_path / "x.pt"}")); torch.save(y, "{tmp_path / "y.pt"}"); '
            'assert not any(n.startswith("dropcluster_timm") for n in sys.modules), "imported dropcluster_timm"; '
            'print(type(m).__name__)')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / 'y.pt'), expected)
    with pytest.raises(ValueError, match='not a registered'):
        export_plain(timm.create_model('resnet18'), tmp_path / 'x')


@pytest.mark.parametrize('exchange', [True, False])  # Linux's atomic exchange, and the two-rename fallback
def test_a_save_replaces_the_folder_whole_or_not_at_all(trained, tmp_path, monkeypatch, exchange):
    from dropcluster_timm.hub import save as hub
    if not exchange:
        monkeypatch.setattr(hub, '_exchange', lambda a, b: False)
    out = tmp_path / 'out'
    save_pretrained(trained, out, metrics={'top1': 50.0, 'top5': 90.0, 'epochs': 3})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):  # dies after the weights and config are written, before the card
        raise KeyboardInterrupt
    monkeypatch.setattr(hub, 'render_model_card', crash)
    plain = timm.create_model('resnet18', num_classes=10)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(plain, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old folder, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']  # nothing staged is left
    monkeypatch.undo()
    if not exchange:
        monkeypatch.setattr(hub, '_exchange', lambda a, b: False)
    save_pretrained(plain, out)
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'resnet18'
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors as readable as the rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_a_crash_while_moving_files_leaves_a_folder_that_loads(trained, tmp_path, monkeypatch):
    """Dying between two renames (weights moved, config not yet) must not mix two saves."""
    from dropcluster_timm.hub import save as hub
    out = tmp_path / 'out'
    save_pretrained(trained, out)
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(hub.os, 'replace', dying_replace)
    plain = timm.create_model('resnet18', num_classes=10)
    try:
        save_pretrained(plain, out)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True)  # loads: old or new, not a mix
    arch = json.loads((out / 'config.json').read_text())['architecture']
    assert torch.equal(reloaded.fc.weight, (plain if arch == 'resnet18' else trained).fc.weight)


def test_the_card_of_a_save_is_the_card_push_renders_from_the_folder(trained, tmp_path):
    """save_pretrained renders the card from memory, push from the written files: the two agree, and
    the model's own pretrained_cfg is left as it was."""
    from dropcluster_timm.hub.save import folder_card
    own = dict(trained.pretrained_cfg)
    for name, metrics in (('a', RUN), ('b', None)):
        out = save_pretrained(trained, tmp_path / name, metrics=metrics, repo_id='someorg/r18-dc')
        assert (out / 'README.md').read_text() == folder_card(out, 'someorg/r18-dc')
    assert trained.pretrained_cfg == own
    notes = json.loads((tmp_path / 'a' / 'config.json').read_text())['pretrained_cfg']['notes']
    assert 'imagenette2' in notes[0] and 'tag' not in json.loads((tmp_path / 'a' / 'config.json').read_text())['pretrained_cfg']


def test_copy_model_folder_is_the_folder_of_that_save(trained, tmp_path):
    """The trainer's best/ is a copy of last/ of its epoch; a later save of last/ leaves it alone."""
    from dropcluster_timm.hub import copy_model_folder
    last = save_pretrained(trained, tmp_path / 'last', metrics=RUN)
    (tmp_path / 'best').mkdir()
    (tmp_path / 'best' / 'notes.txt').write_text('mine')  # a user's file in the target stays
    best = copy_model_folder(last, tmp_path / 'best')
    files = {p.name: p.read_bytes() for p in last.iterdir()}
    assert {p.name: p.read_bytes() for p in best.iterdir() if p.name != 'notes.txt'} == files
    assert (best / 'notes.txt').read_text() == 'mine'
    save_pretrained(trained, last, metrics=dict(RUN, top1=12.5))
    assert json.loads((best / 'metrics.json').read_text())['top1'] == RUN['top1']
    assert json.loads((last / 'metrics.json').read_text())['top1'] == 12.5
    reloaded = timm.create_model(f'local-dir:{best}', pretrained=True)
    assert torch.equal(reloaded.state_dict()['layer3.0.drop_block.cluster_map'],
                       trained.state_dict()['layer3.0.drop_block.cluster_map'])


def test_save_pretrained_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    import subprocess
    import sys
    code = ("import matplotlib, sys, timm, dropcluster_timm; matplotlib.use('pdf'); "
            "from dropcluster_timm import save_pretrained; "
            "m = timm.create_model('resnet18_dropcluster', num_classes=4, img_size=64); "
            f"out = save_pretrained(m, {str(tmp_path / 'out')!r}); "
            "assert (out / 'cluster_maps.png').is_file(); "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['pdf', 'False']  # the backend as the caller set it, no pyplot state
