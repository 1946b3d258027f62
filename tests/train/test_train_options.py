""" Every training option is declared once (a field of a config section): the flags, the typed config,
its checks and args.yaml all come from that declaration, with one set of defaults."""
import copy
import io
import typing
from contextlib import redirect_stdout

import pytest
import yaml

from dropcluster_timm.errors import InputError
from dropcluster_timm.train import DataConfig, TrainConfig, embedded_config, parse_train_args
from dropcluster_timm.train.args import add_train_arguments, ShortErrorParser
from dropcluster_timm.train.options import Bound, iter_options

OPTIONS = [opt for opt in iter_options(TrainConfig) if opt.flag]
DATA = '/data/somewhere'


def _sample(opt):
    """A value away from the option's default, and the command-line words that give it."""
    choices, tp = opt.meta['choices'], opt.type
    if tp is bool:
        return (not opt.default), []
    if typing.get_origin(tp) is dict:
        return {'alpha': 1, 'beta': 'x'}, ['alpha=1', 'beta=x']
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        element = args[0]
        n = 2 if origin is list or args[-1] is Ellipsis else len(args)
        values = list(choices[-n:]) if choices else [element(3 + i) for i in range(n)]
        return origin(values), [str(v) for v in values]
    if choices:
        value = next(c for c in reversed(choices) if c != opt.default)
    else:
        value = {int: 7, float: 0.375, str: 'some-value'}[tp]
    return value, [str(value)]


def test_the_command_line_builds_the_python_config():
    """One set of defaults: no arguments runs embedded_config(), --data-dir D runs TrainConfig() with
    that folder, as does the positional DATA_DIR; a plain model on the digits gets no DropCluster
    model arguments."""
    assert parse_train_args([]) == embedded_config()
    assert parse_train_args(['--data-dir', DATA]) == TrainConfig(data=DataConfig(data_dir=DATA))
    assert parse_train_args([DATA]) == TrainConfig(data=DataConfig(data_dir=DATA))
    assert parse_train_args(['--model', 'resnet18']) == embedded_config('resnet18')
    plain = embedded_config('resnet18')
    assert plain.model.kwargs == {} and plain.model.layer_options == {} and plain.optim.epochs == 12
    assert parse_train_args(['--dataset', 'torch/cifar10']).data.dataset == 'torch/cifar10'
    assert parse_train_args(['--dataset', 'torch/cifar10']).optim.epochs == TrainConfig().optim.epochs
    # the same config resolves the same: the run's length sets the DropCluster ramp
    assert parse_train_args([]).resolved() == embedded_config().resolved()
    assert embedded_config().resolved().dropcluster.start_epoch == 3  # 25% of 12 epochs
    assert TrainConfig().resolved().dropcluster.start_epoch == 60  # 20% of timm's 300


@pytest.mark.parametrize('opt', OPTIONS, ids=lambda o: o.path)
def test_each_flag_sets_its_field_and_only_it(opt):
    value, words = _sample(opt)
    argv = [] if opt.path == 'data.data_dir' else ['--data-dir', DATA]
    if opt.path == 'data.data_dir':
        value, words = DATA, [DATA]
    cfg = parse_train_args(argv + [opt.flag] + words)
    expected = TrainConfig(data=DataConfig(data_dir=DATA))
    expected.set(opt.path, value)
    assert cfg.get(opt.path) == value and type(cfg.get(opt.path)) is type(value)
    assert cfg == expected


def test_help_shows_every_flag_with_its_help_and_both_defaults():
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        add_train_arguments(ShortErrorParser(prog='train')).parse_args(['--help'])
    text = ''.join(out.getvalue().split())  # argparse wraps lines, also at hyphens

    def shown(words):
        return ''.join(words.split()) in text

    for opt in OPTIONS:
        assert shown(opt.flag) and shown(opt.meta['help']), opt.flag
    # defaults that differ on the digits are stated from the one declaration and the overlay
    assert shown('epochs to train (default 300; 12 on the digits)')
    assert shown('first epoch with a non-zero rate (default 20% of --epochs; 25% of --epochs on the digits)')
    assert shown('learning rate (default --lr-base scaled by the global batch size; 0.002 on the digits)')


@pytest.mark.parametrize('argv', [[], ['--data-dir', DATA, '--model', 'resnet34', '--epochs', '7', '--no-progress',
                                       '--cluster-size', '9', '--scale', '0.5', '1', '--model-kwargs', 'dc_stem=True',
                                       '--device', 'cpu', '--log-wandb', '--experiment', 'x']])
def test_args_yaml_runs_the_same_config_again(argv, tmp_path):
    cfg = parse_train_args(argv).resolved()
    path = tmp_path / 'args.yaml'
    path.write_text(yaml.safe_dump(cfg.to_args()))
    again = parse_train_args(['-c', str(path)])
    assert again == cfg


@pytest.mark.parametrize('opt', [o for o in iter_options(TrainConfig) if o.meta['bound'] or o.meta['choices']],
                         ids=lambda o: o.path)
def test_each_checked_option_is_checked_in_a_python_config(opt):
    bound: Bound = opt.meta['bound']
    if opt.meta['choices']:
        bad = 'no-such-choice' if opt.type is str else 99
    elif bound.low is not None:
        bad = bound.low - (0 if bound.low_open else 1)
    else:
        bad = bound.high + 1
    if typing.get_origin(opt.type) in (list, tuple):
        bad = opt.type.__origin__([bad] * (len(typing.get_args(opt.type)) if typing.get_origin(opt.type) is tuple
                                           and typing.get_args(opt.type)[-1] is not Ellipsis else 1))
    cfg = TrainConfig(data=DataConfig(data_dir=DATA))
    cfg.check()
    cfg.set(opt.path, bad)
    with pytest.raises(InputError) as e:
        cfg.check()
    assert str(e.value).startswith(opt.label + ' must be'), str(e.value)


def test_a_python_config_without_data_is_refused_and_the_caller_keeps_its_config():
    with pytest.raises(InputError, match='no data set: give --data-dir'):
        TrainConfig().check()
    cfg = TrainConfig(data=DataConfig(data_dir=DATA))
    before = copy.deepcopy(cfg)
    cfg.resolved()
    assert cfg == before and cfg.dropcluster.start_epoch is None


def test_the_guides_config_block_runs_as_written():
    import os
    text = open(os.path.join(os.path.dirname(__file__), '..', '..', 'docs', 'training.md')).read()
    blocks = [b.split('```', 1)[0] for b in text.split('```python\n')[1:] if 'embedded_config' in b]
    assert len(blocks) == 1
    scope = {}
    exec(compile(blocks[0], 'docs/training.md', 'exec'), scope)
    assert scope['cfg'].optim.epochs == 100 and scope['cfg'].data.data_dir == '/data/mydata'
