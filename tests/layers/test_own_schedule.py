""" The layers' own schedule: a *_dropcluster model trained by a loop that knows nothing of DropCluster
(a plain loop, timm's train.py, DDP, Accelerate) learns its cluster maps and ramps its rate, the same
on every rank, and keeps its step count through state_dict, safetensors and older checkpoints."""
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dropcluster_timm import DropCluster2d, dropcluster_layers
from dropcluster_timm.clustering.engine import grid_cluster_map
from run_helpers import ROOT, launch_two

WORKER = os.path.join(ROOT, 'tests', 'own_schedule_worker.py')


def _train(model, steps, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.randn(4, 3, size, size, generator=g)), torch.randint(0, 4, (4,), generator=g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_a_plain_loop_learns_the_maps_and_ramps_the_rate():
    torch.manual_seed(0)
    model = timm.create_model('resnet18_dropcluster', num_classes=4, drop_cluster_rate=0.2, dc_recluster_every=10,
                              dc_ramp_steps=20, dc_cluster_images=4, dc_num_clusters=4)
    layers = [layer for _, layer in dropcluster_layers(model)]
    assert all(layer.cluster_map.shape[1:] in ((14, 14), (7, 7)) for layer in layers)  # grids made for 224 px
    seen = []
    layers[0].register_forward_hook(lambda m, a, out: seen.append(float((out == 0).float().mean())) and None)
    rates = []
    for step in range(30):
        _train(model, 1, size=96, seed=step)
        rates.append(layers[0].own_rate())
    learned = []
    for layer in layers:  # per-channel maps at the training resolution (96 px: 6x6 and 3x3)
        assert layer.clustered and layer.steps == 30 and int(layer.num_steps) == 30
        spatial = list(layer.cluster_map.shape[1:])
        assert layer.cluster_map.shape[0] == layer.num_channels and spatial in ([6, 6], [3, 3])
        grid = grid_cluster_map(spatial, layer.target_clusters(spatial), torch.device('cpu'))
        learned.append(not torch.equal(layer.cluster_map, grid.expand_as(layer.cluster_map)))
    assert all(learned[:2])  # the 6x6 maps follow the activations, not the grid
    assert rates[:20] == pytest.approx([0.2 * (s + 1) / 20 for s in range(20)]) and rates[20:] == [0.2] * 10
    assert max(seen[:3]) < 0.1 and min(seen[-5:]) > 0.1  # the dropped share follows the ramp
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    layer = layers[0]
    ones = torch.ones(2, layer.num_channels, 6, 6)
    assert torch.equal(layer(ones), ones)  # identity in eval mode
    before = [layer.cluster_map.clone() for layer in layers]
    with torch.no_grad():
        model(x)
    assert all(layer.steps == 30 and torch.equal(b, layer.cluster_map) for b, layer in zip(before, layers))


def test_maps_given_by_update_clusters_are_kept_and_a_layer_alone_is_timms_dropblock():
    layer = DropCluster2d(drop_prob=0.3, block_size=2)
    assert (layer.recluster_every, layer.ramp_steps) == (0, 0)  # built alone: as timm's DropBlock2d
    ramp_only = DropCluster2d(drop_prob=0.3, block_size=2, ramp_steps=4).train()
    ramp_only.update_clusters(torch.randn(2, 4, 8, 8))
    maps = ramp_only.cluster_map.clone()
    for _ in range(6):  # a ramp without re-clustering
        ramp_only(torch.ones(2, 4, 8, 8))
    assert ramp_only.steps == 6 and ramp_only.own_rate() == pytest.approx(0.3) and torch.equal(maps, ramp_only.cluster_map)
    y = layer.train()(torch.ones(8, 4, 8, 8))
    assert 0.15 < float((y == 0).float().mean()) < 0.45 and layer.steps == 0
    model = timm.create_model('resnet18_dropcluster', num_classes=4, drop_cluster_rate=0.2, dc_recluster_every=50)
    from dropcluster_timm import update_clusters
    update_clusters(model, torch.randn(4, 3, 64, 64))
    maps = [layer.cluster_map.clone() for _, layer in dropcluster_layers(model)]
    _train(model, 3)
    assert all(torch.equal(m, layer.cluster_map) for m, (_, layer) in zip(maps, dropcluster_layers(model)))


def test_the_step_count_travels_in_state_dict_and_safetensors_and_old_checkpoints_load(tmp_path):
    # As timm's train.py builds it: its model arguments, --drop-block as the rate, --model-kwargs last.
    kwargs = dict(pretrained=False, in_chans=3, num_classes=4, drop_rate=None, drop_path_rate=0.05, drop_block_rate=0.2,
                  global_pool=None, bn_momentum=None, bn_eps=None, scriptable=False, checkpoint_path=None,
                  **dict(dc_recluster_every=4, dc_ramp_steps=10, dc_cluster_images=4))
    torch.manual_seed(0)
    model = timm.create_model('resnet18_dropcluster', **kwargs)
    _train(model, 6)
    torch.save(model.state_dict(), tmp_path / 'checkpoint.pth')  # as timm's train.py saves
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / 'model.safetensors'))
    for state in (torch.load(tmp_path / 'checkpoint.pth', weights_only=True), load_file(str(tmp_path / 'model.safetensors'))):
        resumed = timm.create_model('resnet18_dropcluster', **kwargs)
        resumed.load_state_dict(state)
        for (_, a), (_, b) in zip(dropcluster_layers(model), dropcluster_layers(resumed)):
            assert b.steps == 6 and b.clustered and torch.equal(a.cluster_map, b.cluster_map)
            assert b.own_rate() == pytest.approx(0.2 * 6 / 10)
        maps = [layer.cluster_map.clone() for _, layer in dropcluster_layers(resumed)]
        _train(resumed, 1)  # step 7: neither due nor first, so no re-clustering; the ramp goes on
        assert all(torch.equal(m, layer.cluster_map) for m, (_, layer) in zip(maps, dropcluster_layers(resumed)))
        assert all(layer.steps == 7 for _, layer in dropcluster_layers(resumed))
    old = {k: v for k, v in model.state_dict().items() if not k.endswith('.num_steps')}  # saved before the count
    fresh = timm.create_model('resnet18_dropcluster', **kwargs)
    fresh.load_state_dict(old)  # strict
    assert all(layer.steps == 0 for _, layer in dropcluster_layers(fresh))
    bad = dict(model.state_dict(), **{'layer3.0.drop_block.num_steps': torch.tensor(-3)})
    with pytest.raises(RuntimeError, match='num_steps: expected one integer count'):
        fresh.load_state_dict(bad)


@pytest.mark.parametrize('mode', ['ddp', 'ddp_no_bb', 'ddp_compiled', 'accelerate'])
def test_every_rank_holds_the_same_maps_after_training(tmp_path, mode):
    proc = launch_two([WORKER, str(tmp_path), mode])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    assert sorted(rank0) == sorted(rank1) and any(k.endswith('cluster_map') for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert all(int(v) == 10 for k, v in rank0.items() if k.endswith('num_steps'))
    maps = [v for k, v in rank0.items() if k.endswith('cluster_map')]
    assert all(m.shape[0] > 1 and m.shape[1:] in ((6, 6), (3, 3)) and len(m.unique()) == 4 for m in maps)  # learned


def test_the_guides_own_training_blocks_run_as_written(own_accelerator):
    text = open(os.path.join(ROOT, 'docs', 'training.md')).read()
    section = text.split('## Use it in your own training', 1)[1].split('\n## ', 1)[0]
    blocks = [b.split('```', 1)[0] for b in section.split('```python\n')[1:]]
    assert len(blocks) == 2  # a plain loop and Accelerate
    for block in blocks:
        scope = {}
        exec(compile(block, 'docs/training.md', 'exec'), scope)
        layers = [layer for _, layer in dropcluster_layers(scope['model'])]
        assert all(layer.steps == 5 and layer.clustered for layer in layers)


@pytest.mark.parametrize('force_cpu', [False, True])
def test_timms_model_ema_follows_the_maps_as_they_change_shape(tmp_path, force_cpu):
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    model = timm.create_model('resnet18_dropcluster', num_classes=4, drop_block_rate=0.2, dc_recluster_every=3,
                              dc_cluster_images=4)
    ema = ModelEmaV3(model, decay=0.9, device='cpu' if force_cpu else None)  # as timm's train.py: before training
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 8):  # 64 px: the maps made for 224 px become 4x4 and 2x2 maps, one per channel
        loss = F.cross_entropy(model(torch.randn(4, 3, 64, 64, generator=g)), torch.randint(0, 4, (4,), generator=g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step=step)
    state = ema.module.state_dict()
    for name, a in dropcluster_layers(model):  # the copy reports the model's maps
        assert a.cluster_map.shape[1:] in ((4, 4), (2, 2)) and torch.equal(a.cluster_map, state[name + '.cluster_map'])
        assert torch.equal(a.cluster_counts, state[name + '.cluster_counts']) and int(state[name + '.num_steps']) == 7
    torch.save(ema.module.state_dict(), tmp_path / 'ema.pth')  # timm's train.py saves the EMA's state dict
    reloaded = timm.create_model('resnet18_dropcluster', num_classes=4, drop_block_rate=0.2)
    reloaded.load_state_dict(torch.load(tmp_path / 'ema.pth', weights_only=True))
    assert all(torch.equal(a.cluster_map, b.cluster_map)
               for (_, a), (_, b) in zip(dropcluster_layers(model), dropcluster_layers(reloaded)))


def test_a_copy_that_trains_or_loads_keeps_its_own_maps():
    import copy
    model = timm.create_model('resnet18_dropcluster', num_classes=4, drop_block_rate=0.2, dc_recluster_every=3,
                              dc_cluster_images=4)
    student, teacher = copy.deepcopy(model), copy.deepcopy(model)
    teacher.load_state_dict(model.state_dict())  # given maps of its own
    _train(student, 2, size=96, seed=1)
    _train(model, 2, size=64)
    student.state_dict(), teacher.state_dict()  # where a following copy would take the model's maps
    for (_, a), (_, s), (_, t) in zip(*(dropcluster_layers(m) for m in (model, student, teacher))):
        assert a.cluster_map.shape[1:] in ((4, 4), (2, 2)) and s.cluster_map.shape[1:] in ((6, 6), (3, 3))
        assert t.cluster_map.shape[1:] in ((14, 14), (7, 7))


def test_reading_a_copys_state_changes_nothing():
    import copy
    model = timm.create_model('resnet18_dropcluster', num_classes=4, drop_block_rate=0.2, dc_recluster_every=3,
                              dc_cluster_images=4)
    ema = copy.deepcopy(model)
    _train(model, 2, size=64)  # the model's maps change shape, the copy's do not
    layers = [layer for _, layer in dropcluster_layers(ema)]
    before = [(layer.cluster_map, layer.cluster_map.clone(), layer.cluster_counts.clone()) for layer in layers]
    first, second = ema.state_dict(), ema.state_dict()
    for (name, a), layer, (buffer, labels, counts) in zip(dropcluster_layers(model), layers, before):
        assert layer.cluster_map is buffer and torch.equal(buffer, labels)  # the copy's own buffers are untouched
        assert torch.equal(layer.cluster_counts, counts) and layer.cluster_map.shape[1:] in ((14, 14), (7, 7))
        for state in (first, second):
            assert torch.equal(state[name + '.cluster_map'], a.cluster_map)
            assert state[name + '.cluster_map'].data_ptr() != a.cluster_map.data_ptr()  # a copy, not the model's
    import pickle
    again = pickle.loads(pickle.dumps(ema))  # the reference to the original does not travel
    assert all(layer.original() is None and layer.steps == 0 for _, layer in dropcluster_layers(again))
