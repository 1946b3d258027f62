""" Each private timm name behind ``dropcluster_timm.timm_compat`` still does what this package needs of it,
on the installed timm; and ``python -m dropcluster_timm.models`` writes where it is told."""
import dataclasses
import json

import pytest
import timm
import torch.nn as nn
from timm.models import get_model_args

import dropcluster_timm  # noqa: F401
from dropcluster_timm import timm_compat
from dropcluster_timm.models import __main__ as models_main
from dropcluster_timm.models import variants


def test_tested_timm_version_is_installed():
    # CI installs a tested timm: a newer one must be added to TESTED_TIMM after this suite passes on it
    assert timm.__version__ in timm_compat.TESTED_TIMM


def test_update_model_args_is_recorded_for_config_json():
    model = timm.create_model('resnet18', num_classes=3)
    timm_compat.update_model_args(model, block_widths={'layer1.0': 7})
    assert get_model_args(model)['block_widths'] == {'layer1.0': 7}
    assert get_model_args(model)['num_classes'] == 3


def test_adapt_model_from_string_rebuilds_with_new_widths():
    model = timm.create_model('resnet18', num_classes=3)
    shapes = {n: list(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))}
    shapes['layer1.0.conv1'][0] = shapes['layer1.0.bn1'][0] = shapes['layer1.0.conv2'][1] = 5
    spec = '***'.join(f'{n}.weight:[{", ".join(map(str, s))}]' for n, s in shapes.items())
    slim = timm_compat.adapt_model_from_string(model, spec)
    assert slim.layer1[0].conv1.out_channels == 5 and slim.layer1[0].conv2.in_channels == 5
    assert slim.layer1[1].conv1.out_channels == model.layer1[1].conv1.out_channels


def test_readme_body_drops_timm_header_and_keeps_sections():
    card = dict(description='A test model.', details={'Model Type': 'Image classification'})
    body = timm_compat.readme_body(card, 'resnet18_dropcluster')
    assert not body.startswith('---') and '\n---\n' not in body[:200]
    assert '# Model card for resnet18_dropcluster' in body and 'A test model.' in body
    assert '## Model Details' in body and 'Image classification' in body


def test_readme_body_refuses_an_unexpected_layout(monkeypatch):
    monkeypatch.setattr(timm_compat, '_generate_readme', lambda *a, **k: '# no header here\n')
    with pytest.raises(RuntimeError, match='YAML header'):
        timm_compat.readme_body({}, 'resnet18_dropcluster')


def test_models_main_writes_where_it_is_told(tmp_path, monkeypatch, capsys):
    # one small timm module keeps the scan short; the full scan is what refreshes the shipped file
    byob = next(f for f in variants.FAMILIES if f.module == 'byobnet_dropcluster')
    monkeypatch.setattr(variants, 'FAMILIES', [dataclasses.replace(byob, timm_modules=('mobilevit',))])
    monkeypatch.setattr(models_main, 'FAMILIES', variants.FAMILIES)
    out = tmp_path / 'architectures.json'
    assert models_main.main([str(out)]) == 0
    table = json.loads(out.read_text())
    with open(variants.ARCHITECTURES_FILE) as f:
        shipped = json.load(f)['byobnet_dropcluster']
    assert set(table) == {'byobnet_dropcluster'} and table['byobnet_dropcluster']
    assert all(shipped[name] == n for name, n in table['byobnet_dropcluster'].items())
    assert models_main.main([]) == 0  # no OUT: printed, nothing written
    assert json.loads(capsys.readouterr().out) == table
    with pytest.raises(SystemExit):
        models_main.main([str(tmp_path / 'missing' / 'a.json')])
