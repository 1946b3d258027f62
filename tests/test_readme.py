""" The README's Python block runs as written, after its quickstart's main job (scaled down)."""
import os

import torch
from safetensors.torch import load_file

from dropcluster_timm import dropcluster_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readmes_use_block_runs_after_the_main_job(tmp_path, monkeypatch):
    from dropcluster_timm.train import parse_train_args, train
    text = open(os.path.join(ROOT, 'README.md')).read()
    main_job = '-m dropcluster_timm train --output output/digits'
    assert main_job in text  # the quickstart's main job, which the Use block loads
    blocks = [b.split('```', 1)[0] for b in text.split('```python\n')[1:]]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    train(parse_train_args(main_job.split()[3:] + ['--epochs', '1', '--train-batches-per-epoch', '2']))
    scope = {}
    exec(compile(blocks[0], 'README.md', 'exec'), scope)
    layers = [layer for _, layer in dropcluster_layers(scope['model'])]
    assert layers and all(layer.clustered and layer.drop_prob == 0.05 for layer in layers)
    assert scope['y'].shape == scope['x'].shape and not torch.equal(scope['y'], scope['x'])
    # The main job's model is loaded with its trained weights and maps (buffers), not a fresh architecture.
    saved = load_file(os.path.join('output', 'digits', 'best', 'model.safetensors'))
    loaded = scope['trained'].state_dict()
    assert set(saved) == set(loaded)
    different = [k for k in saved if not torch.equal(saved[k], loaded[k])]
    assert not different, f'{len(different)} tensors differ from model.safetensors, e.g. {different[:3]}'
