""" Results of a run and results tables: model statistics counted, malformed tables refused naming the
file and the fault."""
import pytest
import timm
import torch
import torch.nn as nn

import dropcluster_timm  # noqa: F401  registers the models
from dropcluster_timm.run_results import load_results_table, model_stats


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
