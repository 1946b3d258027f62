""" The ``dropcluster-timm`` command line: push and cards (train and evaluate: test_train_runs.py, test_evaluate.py)."""
import json

import pytest
import timm
import torch

from dropcluster_timm.cli import main as cli_main
from dropcluster_timm.hub.model_card import CARD_MODELS
from dropcluster_timm.hub import save_pretrained
from hub_helpers import TOKEN, assert_no_token


def test_cli_push_folder(trained, fake_hub, monkeypatch, capsys, tmp_path):
    calls, uploaded = fake_hub
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    out = save_pretrained(trained, tmp_path / 'out')
    (out / 'README.md').unlink()  # the card is generated at push, from the run's summary.csv
    (out / 'summary.csv').write_text('epoch,eval_top1,eval_top5\n0,30.0,60.0\n1,33.5,61.0\n')
    torch.save(trained.state_dict(), out / 'pytorch_model.bin')  # a pickle file that must stay behind
    assert cli_main(['push', str(out), '--repo-id', 'someorg/r18-dc']) == 0
    assert calls['upload_folder']['revision'] is None and 'create_branch' not in calls
    assert sorted(p.name for p in uploaded.iterdir()) == ['README.md', 'cluster_maps.png', 'config.json',
                                                          'model.safetensors']
    assert '| resnet18_dropcluster |  |  | 33.500 | 61.000 |' in (uploaded / 'README.md').read_text()
    assert not (out / 'README.md').exists()  # the folder itself is left as it was
    captured = capsys.readouterr()
    assert 'someorg/r18-dc' in captured.out
    assert_no_token(uploaded, captured.out, captured.err)


def test_cli_cards(tmp_path, capsys):
    metrics = tmp_path / 'm.json'
    metrics.write_text(json.dumps({'top1': 60.0}))
    assert cli_main(['cards', '--out-dir', str(tmp_path / 'cards'), '--metrics', f'resnet18_dropcluster={metrics}']) == 0
    cards = sorted(p.name for p in (tmp_path / 'cards').iterdir())
    assert cards == sorted(f'{m}.md' for m in CARD_MODELS)
    assert '60.000' in (tmp_path / 'cards' / 'resnet18_dropcluster.md').read_text()
    assert 'No DropCluster-trained' in (tmp_path / 'cards' / 'resnet34_dropcluster.md').read_text()
    assert cli_main(['cards', '--metrics', 'nofile']) == 2

    table = tmp_path / 't.json'
    table.write_text(json.dumps({'title': 'My ablation', 'description': 'd', 'columns': ['arm', 'top-1'],
                                 'rows': [['a', 61.5]]}))
    argv = ['cards', '--out-dir', str(tmp_path / 'cards'), '--overwrite', '--table', f'resnet34_dropcluster={table}']
    assert cli_main(argv) == 0
    assert '### My ablation' in (tmp_path / 'cards' / 'resnet34_dropcluster.md').read_text()
    assert '| a | 61.5 |' in (tmp_path / 'cards' / 'resnet34_dropcluster.md').read_text()
    assert 'My ablation' not in (tmp_path / 'cards' / 'resnet18_dropcluster.md').read_text()
    capsys.readouterr()
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'title': 'x', 'description': 'd', 'columns': ['a'], 'rows': [[1, 2]]}))
    for item, error in ((f'resnet34_dropcluster={bad}', 'row 0 has 2 cells'), (str(table), 'expects MODEL=FILE'),
                        (f'resnet34_dropclustr={table}', 'without a card here: resnet34_dropclustr')):
        assert cli_main(['cards', '--out-dir', str(tmp_path / 'other'), '--table', item]) == 2
        assert (err := capsys.readouterr().err).startswith('error: ') and error in err, err
    assert not (tmp_path / 'other').exists()
    with pytest.raises(SystemExit):
        cli_main(['cards', '--study', 'x.json'])  # replaced by --table


def test_cli_export_plain_and_push_plain(trained, fake_hub, monkeypatch, capsys, tmp_path):
    calls, uploaded = fake_hub
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    out = save_pretrained(trained, tmp_path / 'out')
    assert cli_main(['export-plain', str(out), str(tmp_path / 'plain')]) == 0
    assert json.loads((tmp_path / 'plain' / 'config.json').read_text())['architecture'] == 'resnet18'
    assert cli_main(['push', str(out), '--repo-id', 'someorg/r18-plain', '--push-plain']) == 0
    config = json.loads((uploaded / 'config.json').read_text())
    assert config['architecture'] == 'resnet18' and sorted(p.name for p in uploaded.iterdir()) == \
        ['README.md', 'config.json', 'model.safetensors']
    assert "create_model('hf-hub:someorg/r18-plain', pretrained=True)" in (uploaded / 'README.md').read_text()
    assert 'import dropcluster_timm' not in (uploaded / 'README.md').read_text()
    assert cli_main(['export-plain', str(tmp_path / 'nope'), str(tmp_path / 'x')]) == 2  # an input error
    assert 'no such folder' in capsys.readouterr().err
    before = (out / 'config.json').read_text()
    for target in (out, tmp_path):  # the source itself, or a folder above it
        assert cli_main(['export-plain', str(out), str(target), '--overwrite']) == 2
        assert 'which this command reads' in capsys.readouterr().err
    assert (out / 'config.json').read_text() == before


@pytest.mark.parametrize('flag', ['--cluster-method', '--clip-mode'])  # a layer option, a training option
def test_an_argument_error_is_one_line(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(['train', flag, 'nope'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count('\n') == 1
    assert f"argument {flag}: invalid choice: 'nope'" in err and '--help' in err


def test_every_flag_of_every_subcommand_has_help_text():
    from dropcluster_timm.cli import build_parser
    _, subcommands = build_parser()
    assert set(subcommands) == {'train', 'evaluate', 'push', 'export-plain', 'cards'}
    for name, sub in subcommands.items():
        missing = [a.option_strings or a.dest for a in sub._actions if not a.help]
        assert not missing, f'{name}: flags without help text: {missing}'


@pytest.mark.parametrize('content, words', [({'top1': 1000.0}, '"top1" must be in [0, 100]'),
                                            ({'top1': 50.0, 'top5': -5.0}, '"top5" must be in [0, 100]')])
def test_cli_cards_refuses_results_out_of_range(tmp_path, capsys, content, words):
    metrics = tmp_path / 'm.json'
    metrics.write_text(json.dumps(content))
    assert cli_main(['cards', '--out-dir', str(tmp_path / 'cards'), '--metrics', f'resnet18_dropcluster={metrics}']) == 2
    assert words in capsys.readouterr().err and not (tmp_path / 'cards').exists()


def test_cli_cards_refuses_a_model_without_a_card(tmp_path, capsys):
    metrics = tmp_path / 'm.json'
    metrics.write_text(json.dumps({'top1': 60.0}))
    assert cli_main(['cards', '--out-dir', str(tmp_path / 'cards'), '--metrics', f'resnet81_dropcluster={metrics}']) == 2
    assert 'results for model(s) without a card here: resnet81_dropcluster' in capsys.readouterr().err


def _one_line_error(capsys, words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'error: ' in err[0] and all(w in err[0] for w in words), err


def test_cli_export_plain_never_replaces_a_folder_unless_asked(trained, tmp_path, capsys):
    src = save_pretrained(trained, tmp_path / 'src')
    run_root = tmp_path / 'run'
    run_root.mkdir()
    (run_root / 'metrics.json').write_text('[]')
    (run_root / 'run.json').write_text('{}')
    existing = save_pretrained(trained, tmp_path / 'existing')
    for dst, what in ((run_root, 'a run folder'), (existing, 'a model folder')):
        before = sorted((p.name, p.read_bytes()) for p in dst.iterdir())
        assert cli_main(['export-plain', str(src), str(dst)]) == 2
        _one_line_error(capsys, [f'{dst} exists ({what})', '--overwrite'])
        assert sorted((p.name, p.read_bytes()) for p in dst.iterdir()) == before
    assert cli_main(['export-plain', str(src), str(existing), '--overwrite']) == 0
    assert json.loads((existing / 'config.json').read_text())['architecture'] == 'resnet18'


def test_cli_export_plain_of_invalid_cluster_labels_is_one_line(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    src = save_pretrained(trained, tmp_path / 'src')
    weights = load_file(str(src / 'model.safetensors'))
    key = next(k for k in weights if k.endswith('cluster_map'))
    weights[key].view(-1)[0] = 999
    save_file(weights, str(src / 'model.safetensors'), metadata={'format': 'pt'})
    assert cli_main(['export-plain', str(src), str(tmp_path / 'plain')]) == 2
    _one_line_error(capsys, [key, 'labels up to 999'])
    assert not (tmp_path / 'plain').exists()


def test_weights_with_nan_are_refused_at_a_local_dir_load_naming_the_tensor(trained, tmp_path, capsys):
    import timm
    from safetensors.torch import load_file, save_file
    src = save_pretrained(trained, tmp_path / 'src')
    weights = load_file(str(src / 'model.safetensors'))
    weights['layer1.0.conv1.weight'][0, 0, 0, 0] = float('inf')
    save_file(weights, str(src / 'model.safetensors'), metadata={'format': 'pt'})
    with pytest.raises(ValueError, match='NaN or inf values in layer1.0.conv1.weight'):
        timm.create_model(f'local-dir:{src}', pretrained=True)
    assert cli_main(['evaluate', str(src), '--dataset', 'digits']) == 2
    _one_line_error(capsys, ['NaN or inf values in layer1.0.conv1.weight'])


@pytest.mark.parametrize('target, words', [('folder', ['is a folder']), ('missing/x.json', ['does not exist']),
                                           ('taken.json', ['exists', '--overwrite'])])
def test_cli_evaluate_checks_its_json_destination_before_evaluating(trained, tmp_path, capsys, monkeypatch,
                                                                    target, words):
    import dropcluster_timm.evaluation.evaluate as E
    monkeypatch.setattr(E, 'evaluate_checkpoint', lambda *a, **k: pytest.fail('evaluated before the check'))
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'taken.json').write_text('{"top1": 1}')
    assert cli_main(['evaluate', str(tmp_path / 'src'), '--json', str(tmp_path / target)]) == 2
    _one_line_error(capsys, words)
    assert (tmp_path / 'taken.json').read_text() == '{"top1": 1}' and not list(tmp_path.rglob('*.tmp'))


def test_cli_evaluate_json_with_overwrite(trained, tmp_path, capsys):
    src = save_pretrained(trained, tmp_path / 'src')
    (tmp_path / 'r.json').write_text('{}')
    assert cli_main(['evaluate', str(src), '--dataset', 'digits', '--img-size', '32', '--json', str(tmp_path / 'r.json'),
                     '--overwrite']) == 0
    assert 'top1' in json.loads((tmp_path / 'r.json').read_text())


@pytest.mark.parametrize('argv, code, words', [
    (['train', '--no-such-flag'], 2, ['unrecognized arguments: --no-such-flag']),  # usage (argparse)
    (['train', '--data-dir', '{tmp}/missing', '--output', '{tmp}/run'], 2, ['{tmp}/missing']),
    (['evaluate', '{tmp}/missing'], 2, ['is not a model folder']),
    (['push', '{tmp}/missing', '--repo-id', 'someorg/name'], 2, ['no such folder']),
    (['push', '{model}', '--repo-id', 'no-org'], 2, ['--repo-id', 'org/name']),
    (['push', '{model}', '--repo-id', 'someorg/name'], 1, ['Pushing to the Hugging Face Hub repo']),  # the Hub fails
    (['export-plain', '{tmp}/missing', '{tmp}/plain'], 2, ['no such folder']),
    (['export-plain', '{model}', '{model}'], 2, ['which this command reads']),
    (['cards', '--metrics', 'nofile'], 2, ['expects MODEL=FILE']),
    (['cards', '--out-dir', '{model}/config.json'], 2, ['config.json']),
])
def test_one_error_policy_for_every_subcommand(argv, code, words, tmp_path, monkeypatch, capsys):
    """Input and usage errors exit 2, a failure while working exits 1; one line either way."""
    model = save_pretrained(timm.create_model('resnet18_dropcluster', num_classes=2, img_size=32), tmp_path / 'model')
    monkeypatch.setenv('HF_TOKEN', 'hf_' + 'x' * 34)
    monkeypatch.setattr('huggingface_hub.constants.ENDPOINT', 'http://127.0.0.1:9')  # the Hub refuses connections
    fill = lambda text: text.format(tmp=tmp_path, model=model)  # noqa: E731
    capsys.readouterr()
    try:
        status = cli_main([fill(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert status == code and len(err) == 1 and 'error: ' in err[0], err
    assert all(fill(w) in err[0] for w in words), err
