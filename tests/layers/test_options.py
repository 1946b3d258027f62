""" Each DropCluster layer option is declared once (``layers.options``) and read everywhere it appears:
the layer's defaults, the model arguments, the train flags and config, and the model card."""
import inspect

import pytest

import dropcluster_timm  # noqa: F401
from dropcluster_timm import DropCluster2d, dropcluster_layers
from dropcluster_timm.hub.model_card import build_model_card
from dropcluster_timm.layers.options import LAYER_OPTIONS, layer_option, option_defaults
from dropcluster_timm.models import DROPCLUSTER_ARGS
from dropcluster_timm.train import parse_train_args
from dropcluster_timm.train.builders import build_model
from dropcluster_timm.train.config import ModelConfig
from dropcluster_timm.errors import InputError


def test_layer_defaults_and_model_arguments_come_from_the_options():
    signature = inspect.signature(DropCluster2d)
    for option in LAYER_OPTIONS:
        if option.name != 'block_size':  # the model's default is the slot's own block size, the layer's 7
            assert signature.parameters[option.name].default == option.alone_default, option.name
        assert DROPCLUSTER_ARGS[option.model_arg] == option.default
    assert set(DROPCLUSTER_ARGS) == {'drop_cluster_rate'} | {o.model_arg for o in LAYER_OPTIONS}


@pytest.mark.parametrize('option', [o for o in LAYER_OPTIONS if o.flag], ids=lambda o: o.name)
def test_each_flag_reaches_the_layers_of_the_built_model(option):
    value = {int: 5, bool: True, str: option.choices[-1] if option.choices else None}[option.type]
    if option.name == 'max_cluster_size':
        value = 64
    argv = ['--model', 'resnet18_dropcluster', option.flag] + ([] if option.type is bool else [str(value)])
    cfg = parse_train_args(argv)
    assert cfg.model.layer_options[option.name] == value
    model = build_model(cfg.model, 4, (32, 32))
    layers = [layer for _, layer in dropcluster_layers(model)]
    assert layers and all(getattr(layer, option.name) == value for layer in layers)


def test_unset_flags_leave_the_model_defaults():
    cfg = parse_train_args(['--data-dir', 'data', '--model', 'resnet18_dropcluster'])  # not the digits' defaults
    assert cfg.model.layer_options == {}
    layer = next(layer for _, layer in dropcluster_layers(build_model(cfg.model, 4, (32, 32))))
    for name, default in option_defaults().items():
        if name in ('recluster_every', 'ramp_steps'):  # the run's recipe drives the layers: one mechanism
            assert getattr(layer, name) == 0, name
        elif default is not None:
            assert getattr(layer, name) == default, name


def test_an_unknown_option_and_a_bad_size_are_refused():
    with pytest.raises(InputError, match="no DropCluster layer option 'cluster_sise'"):
        build_model(ModelConfig('resnet18_dropcluster', layer_options={'cluster_sise': 9}), 4)
    with pytest.raises(InputError, match='--num-clusters must be >= 1, got 0'):
        parse_train_args(['--num-clusters', '0']).check()
    assert layer_option('drop_mode').flag == '--cluster-drop-mode'


def _bad_values():
    """A value each checked option refuses, and the pairs of options checked together."""
    for option in LAYER_OPTIONS:
        if option.minimum is not None:
            yield {option.name: option.minimum - 1}, option
        if option.choices:
            yield {option.name: 'nope'}, option
    yield {'min_cluster_size': 9, 'max_cluster_size': 3}, layer_option('min_cluster_size')
    yield {'cluster_count': 'gap', 'cluster_method': 'grid'}, layer_option('cluster_count')


@pytest.mark.parametrize('values, option', list(_bad_values()), ids=lambda v: str(v) if isinstance(v, dict) else '')
def test_each_check_is_declared_once_and_the_layer_and_the_training_config_run_it_alike(values, option):
    with pytest.raises(ValueError) as layer_error:
        DropCluster2d(**values)
    cfg = parse_train_args([])
    cfg.model.layer_options.update(values)
    with pytest.raises(InputError) as config_error:
        cfg.check()
    label = option.flag or option.model_arg
    # One message, naming the layer argument or the flag (or model argument) that was given.
    assert str(layer_error.value).startswith(f'{option.name} ')
    assert str(config_error.value) == str(layer_error.value).replace(option.name, label).replace(
        'max_cluster_size', layer_option('max_cluster_size').flag).replace(
        'cluster_method', layer_option('cluster_method').flag)


def test_the_card_names_every_option_set_away_from_its_default():
    args = {o.model_arg: ({bool: True, str: (o.choices or ('x',))[-1]}[o.type]) for o in LAYER_OPTIONS if o.card}
    details = build_model_card('resnet18_dropcluster', model_args=dict(args, drop_cluster_rate=0.1))
    text = repr(details)
    for option in LAYER_OPTIONS:
        if option.card:
            assert option.card.format(value=args[option.model_arg]) in text, option.name
    plain = repr(build_model_card('resnet18_dropcluster', model_args={'drop_cluster_rate': 0.1}))
    assert not any(o.card in plain for o in LAYER_OPTIONS if o.card and '{value}' not in o.card)
