""" Errors by cause: the user's input exits 2, the environment (network, disk, permissions) exits 1 with
what to do, a bug is a traceback; DROPCLUSTER_TIMM_TRACEBACK=1 shows the traceback behind a one-line
error."""
import errno

import pytest

from dropcluster_timm.cli import main as cli_main
from dropcluster_timm.errors import EnvironmentFailure, InputError, TrainingError, classify


def _err(capsys):
    return capsys.readouterr().err.strip().splitlines()


def test_a_model_that_is_not_cached_offline_is_the_environment_not_the_input(hf_cache, capsys, tmp_path):
    assert cli_main(['evaluate', 'hf-hub:someorg/not-cached', '--dataset', 'digits']) == 1
    err = _err(capsys)
    assert len(err) == 1 and err[0].startswith("error: cannot load 'hf-hub:someorg/not-cached'"), err
    assert 'HF_HUB_OFFLINE=1 reads only the cache' in err[0]
    assert cli_main(['train', '--model', 'hf-hub:someorg/not-cached', '--pretrained', '--output',
                     str(tmp_path / 'run'), '--epochs', '1']) == 1
    err = _err(capsys)
    assert len(err) == 1 and "cannot create model 'hf-hub:someorg/not-cached'" in err[0] and 'cache' in err[0], err
    # A name timm does not know stays the user's input.
    assert cli_main(['train', '--model', 'resnet18_dropclustr', '--output', str(tmp_path / 'run2')]) == 2


def test_the_traceback_switch_shows_what_is_behind_a_one_line_error(capsys, monkeypatch, tmp_path):
    argv = ['export-plain', str(tmp_path / 'missing'), str(tmp_path / 'plain')]
    assert cli_main(argv) == 2
    assert 'Traceback' not in capsys.readouterr().err
    monkeypatch.setenv('DROPCLUSTER_TIMM_TRACEBACK', '1')
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('Traceback (most recent call last):') and err.strip().splitlines()[-1].startswith('error: ')


def test_a_bug_is_a_traceback_not_a_one_line_error(monkeypatch):
    from dropcluster_timm import cli

    def broken(args):
        return {}['no such key']  # a bug in a subcommand

    monkeypatch.setitem(cli.COMMANDS, 'cards', broken)
    with pytest.raises(KeyError):
        cli_main(['cards'])


@pytest.mark.parametrize('error, kind, words', [
    (OSError(errno.ENOSPC, 'No space left on device'), EnvironmentFailure, 'free some disk space'),
    (PermissionError(errno.EACCES, 'Permission denied'), EnvironmentFailure, 'permissions'),
    (ConnectionError('connection refused'), EnvironmentFailure, 'network'),
    (FileNotFoundError(errno.ENOENT, 'No such file'), InputError, 'No such file'),
    (ValueError('bad value'), InputError, 'bad value'),
])
def test_classify(error, kind, words):
    out = classify(error, 'reading x')
    assert type(out) is kind and str(out).startswith('reading x: ') and words in str(out)
    assert TrainingError is InputError  # the former name still catches it
