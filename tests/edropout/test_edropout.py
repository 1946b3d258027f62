""" EDropout: the functional core and layer, the energy search, batched energies (one process and two
over gloo), and channel pruning to a smaller timm model that saves and loads (offline HF cache)."""
import os
import socket

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import dropcluster_timm.edropout  # noqa: F401  registers the *_slim models
from dropcluster_timm.edropout.layers import (
    EDropCluster2d, EDropout2d, add_edropout, drop_cluster_state, edropout, edropout_layers, edropout_state,
    edropout_step, make_search,
    set_edropout_state, state_energies)
from dropcluster_timm.edropout.energy_search import EnergySearch
from dropcluster_timm.hub import save_pretrained
from dropcluster_timm.edropout.prune import edropout_keep, magnitude_keep, prune_channels


def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norms and running statistics, as after training (timm zero-inits the last norm of
    each block, which would make every block's inner channels irrelevant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _model(name='resnet18', seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kwargs)
    add_edropout(model)
    return _trained_like(model, seed)


# --- functional core and layer


def test_edropout_zeroes_the_off_channels_of_every_sample():
    x = torch.randn(4, 3, 5, 5)
    state = torch.tensor([True, False, True])
    out = edropout(x, state)
    assert torch.equal(out[:, 1], torch.zeros(4, 5, 5))
    assert torch.equal(out[:, [0, 2]], x[:, [0, 2]])


def test_edropout_applies_one_state_per_batch_slice():
    x = torch.randn(6, 2, 3, 3)
    states = torch.tensor([[True, True], [False, True], [True, False]])
    out = edropout(x, states)
    for s in range(3):
        assert torch.equal(out[2 * s:2 * s + 2], edropout(x[2 * s:2 * s + 2], states[s]))


@pytest.mark.parametrize('x, state, words', [
    (torch.randn(2, 3, 4, 4), torch.ones(4, dtype=torch.bool), '3 channels'),
    (torch.randn(5, 2, 4, 4), torch.ones(2, 2, dtype=torch.bool), 'equal slices'),
])
def test_edropout_bad_shapes_fail_clearly(x, state, words):
    with pytest.raises(ValueError, match=words):
        edropout(x, state)


def test_layer_masks_in_eval_mode_too_and_keeps_state_in_state_dict():
    layer = EDropout2d(4)
    layer.keep_state.copy_(torch.tensor([True, False, False, True]))
    layer.eval()
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(layer(x)[:, 1:3], torch.zeros(2, 2, 3, 3))
    assert torch.equal(layer.state_dict()['keep_state'], torch.tensor([True, False, False, True]))


def test_add_edropout_fills_every_block_slot_of_basic_and_bottleneck_resnets():
    for name, widths in (('resnet18', [64, 64, 128, 128, 256, 256, 512, 512]),
                         ('resnet26', [64, 64, 128, 128, 256, 256, 512, 512])):
        model = timm.create_model(name, num_classes=10)
        names = add_edropout(model)
        assert [n for n, _ in edropout_layers(model)] == names
        assert [layer.num_channels for _, layer in edropout_layers(model)] == widths


def test_add_edropout_refuses_slots_holding_dropblock():
    model = timm.create_model('resnet18', num_classes=10, drop_block_rate=0.1)
    with pytest.raises(ValueError, match='holds DropBlock2d'):
        add_edropout(model)


# --- the energy search


def test_search_is_deterministic_for_a_seed_and_differs_across_seeds():
    a, b, c = (EnergySearch([8, 8], seed=s) for s in (3, 3, 4))
    assert torch.equal(a.proposals(), b.proposals())
    assert not torch.equal(a.proposals(), c.proposals())
    energies = torch.arange(16.0)
    a.update(energies), b.update(energies)
    assert torch.equal(a.population, b.population) and torch.equal(a.proposals(), b.proposals())


def test_search_minimises_an_energy():
    target = torch.rand(60, generator=torch.Generator().manual_seed(5)) < 0.5
    search = EnergySearch([20, 20, 20], seed=0, converge_steps=0)
    start = min(int((p ^ target).sum()) for p in search.population)
    for _ in range(200):
        search.update((search.proposals() ^ target).sum(1).float())
    assert start >= 15 and int((search.best_state ^ target).sum()) <= 8


def test_trial_replaces_member_only_when_strictly_lower():
    search = EnergySearch([6], num_states=4, seed=1)
    proposals = search.proposals()
    energies = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 1.0, float('nan'), 2.0])
    search.update(energies)
    assert torch.equal(search.population[0], proposals[4])  # lower: replaced
    for j in (1, 2, 3):  # equal, non-finite, higher: kept
        assert torch.equal(search.population[j], proposals[j])
    assert torch.equal(search.best_state, proposals[4]) and search.energies[0] == 0.5


def test_every_group_keeps_a_unit():
    search = EnergySearch([1, 1, 3], keep_prob=0.01, seed=0)
    for _ in range(5):
        props = search.proposals()
        for piece in torch.split(props, [1, 1, 3], dim=1):
            assert piece.any(dim=1).all()
        search.update(torch.rand(props.shape[0]))


def test_search_converges_when_the_best_state_stops_changing():
    search = EnergySearch([5], seed=0, converge_steps=3)
    # the first member always wins: the best state never changes after the first step
    steps = 0
    while not search.converged:
        search.update(torch.cat([torch.tensor([0.0]), torch.ones(15)]))
        steps += 1
    assert steps == 4 and search.step == 4
    with pytest.raises(RuntimeError, match='converged'):
        search.proposals()


def test_search_state_dict_resumes_exactly():
    a = EnergySearch([4, 4], seed=7)
    for i in range(3):
        a.update(torch.rand(16, generator=torch.Generator().manual_seed(i)))
    b = EnergySearch([4, 4], seed=0)
    b.load_state_dict(a.state_dict())
    for i in range(3, 6):
        e = torch.rand(16, generator=torch.Generator().manual_seed(i))
        a.update(e), b.update(e)
    assert torch.equal(a.population, b.population) and torch.equal(a.best_state, b.best_state)
    with pytest.raises(ValueError, match='groups'):
        EnergySearch([4, 5]).load_state_dict(a.state_dict())


@pytest.mark.parametrize('kwargs, words', [
    (dict(group_sizes=[4], num_states=3), 'num_states'), (dict(group_sizes=[]), 'group_sizes'),
    (dict(group_sizes=[4], keep_prob=0.0), 'keep_prob'), (dict(group_sizes=[4], mutation=2.0), 'mutation'),
])
def test_search_bad_settings_fail_clearly(kwargs, words):
    with pytest.raises(ValueError, match=words):
        EnergySearch(**kwargs)


# --- energies on a model


def test_batched_energies_equal_one_forward_per_state():
    model = _model()
    model.train()  # state_energies evaluates in eval mode and restores the mode
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    search = make_search(model, seed=0)
    states = search.proposals()
    energies = state_energies(model, states, x, y)
    assert model.training and all(layer.candidates is None for _, layer in edropout_layers(model))
    model.eval()
    with torch.no_grad():
        for i in (0, 5, 15):
            set_edropout_state(model, states[i])
            assert torch.allclose(energies[i], F.cross_entropy(model(x), y), atol=1e-5)
    assert energies.unique().numel() > 1  # the states matter


def test_edropout_step_applies_the_best_state():
    model = _model()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    search = make_search(model, seed=0, converge_steps=2)
    while edropout_step(model, search, x, y):
        assert torch.equal(edropout_state(model), search.best_state)
    assert search.converged and not edropout_step(model, search, x, y)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _dist_energies(rank, port, x, y, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = _model()
        search = make_search(model, seed=0)
        energies = state_energies(model, search.proposals(), x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
        edropout_step(model, search, x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
        out[rank] = (energies, search.best_state.clone())
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_over_gloo_agree_on_energies_and_state():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = mp.Manager().dict()
    mp.spawn(_dist_energies, args=(_free_port(), x, y, out), nprocs=2)
    (e0, s0), (e1, s1) = out[0], out[1]
    assert torch.equal(e0, e1) and torch.equal(s0, s1)
    # the average over the processes' halves is the energy of the whole batch
    model = _model()
    search = make_search(model, seed=0)
    assert torch.allclose(e0, state_energies(model, search.proposals(), x, y), atol=1e-5)


# --- pruning


@pytest.mark.parametrize('name', ['resnet18', 'resnet26'])
def test_pruned_model_is_smaller_with_the_same_outputs(name):
    model = _model(name)
    search = make_search(model, seed=3)  # a random state with about half the channels
    set_edropout_state(model, search.population[1])
    pruned = prune_channels(model).eval()
    assert type(pruned) is type(model) and not any(True for _ in edropout_layers(pruned))
    assert pruned.pretrained_cfg['architecture'] == f'{name}_slim'
    assert sum(p.numel() for p in pruned.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-5)
    widths = pruned._model_args['block_widths']
    assert widths == {k: int(v.sum()) for k, v in edropout_keep(model).items()}


def test_magnitude_pruning_keeps_the_largest_filters():
    model = timm.create_model('resnet18', num_classes=10).eval()
    keep = magnitude_keep(model, {'layer1.0': 5, 'layer3.1': 7})
    norms = model.layer1[0].conv1.weight.abs().flatten(1).sum(1)
    assert int(keep['layer1.0'].sum()) == 5 and norms[keep['layer1.0']].min() >= norms[~keep['layer1.0']].max()
    pruned = prune_channels(model, keep)
    assert pruned.layer1[0].conv1.out_channels == 5 and pruned.layer3[1].conv2.in_channels == 7
    assert pruned.layer2[0].conv1.out_channels == 128  # blocks not named keep their width


def test_pruned_folder_loads_from_an_offline_hf_cache(tmp_path, hf_cache):
    model = _model()
    set_edropout_state(model, make_search(model, seed=1).population[2])
    pruned = prune_channels(model).eval()
    folder = save_pretrained(pruned, tmp_path / 'slim')
    hf_cache.add('org/slim', {f: folder / f for f in ('config.json', 'model.safetensors', 'README.md')})
    loaded = timm.create_model('hf-hub:org/slim', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert loaded.layer1[0].conv1.out_channels == pruned.layer1[0].conv1.out_channels < 64


@pytest.mark.parametrize('name, words', [('resnext26ts', 'layer1'), ('resnext50_32x4d', 'grouped conv'),
                                         ('resnetblur18', 'anti-aliasing')])
def test_pruning_refuses_what_it_cannot_rebuild(name, words):
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=10)
    with pytest.raises(ValueError, match=words):
        if hasattr(model, 'layer1'):
            prune_channels(model, {'layer1.0': torch.ones(model.layer1[0].conv1.out_channels, dtype=torch.bool)})
        else:
            add_edropout(model)


def test_pruning_bad_keep_fails_clearly():
    model = timm.create_model('resnet18', num_classes=10)
    with pytest.raises(ValueError, match='non-empty'):
        prune_channels(model, {'layer1.0': torch.zeros(64, dtype=torch.bool)})
    with pytest.raises(ValueError, match='does not have'):
        prune_channels(model, {'layer9.0': torch.ones(64, dtype=torch.bool)})
    with pytest.raises(ValueError, match='no per-channel EDropout layers'):
        prune_channels(model)


# --- per-cluster EDropout (the variant of DropCluster's random drop)


def _cluster_model(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model('resnet18_dropcluster', num_classes=10, drop_cluster_rate=0.1, img_size=32,
                              dc_stem=True, dc_cluster_size=16)
    add_edropout(model, unit='cluster')
    return _trained_like(model, seed)


def test_drop_cluster_state_zeroes_the_off_clusters_and_rescales():
    x = torch.randn(4, 2, 4, 4)
    cluster_map = torch.arange(4).repeat_interleave(4).view(1, 4, 4)  # 4 row clusters
    state = torch.tensor([[[True, False, True, True], [False, False, True, True]],
                          [[True, True, True, True], [True, True, True, False]]])
    out = drop_cluster_state(x, cluster_map, state)
    kept = [12 + 8, 16 + 12]  # kept elements of each state over both maps
    for s in range(2):
        for c in range(2):
            rows = state[s, c]
            expect = x[2 * s:2 * s + 2, c] * rows.float().view(4, 1) * (32 / kept[s])
            assert torch.allclose(out[2 * s:2 * s + 2, c], expect)


def test_cluster_layer_acts_in_training_only_and_keeps_no_state_in_checkpoints():
    model = _cluster_model()
    name, layer = next(edropout_layers(model))
    assert isinstance(layer, EDropCluster2d) and layer.units_per_map == 16 and layer.num_maps == 64
    state = torch.rand(layer.num_units, generator=torch.Generator().manual_seed(0)) < 0.5
    layer.keep_state.copy_(state)
    x = torch.randn(2, 64, 16, 16)
    layer.eval()
    assert torch.equal(layer(x), x)
    layer.train()
    assert torch.equal(layer(x), drop_cluster_state(x, layer.cluster_map, state.view(1, 64, 16)))
    # a checkpoint of the model is a DropCluster checkpoint: the base model loads it strictly
    plain = timm.create_model('resnet18_dropcluster', num_classes=10, drop_cluster_rate=0.1, img_size=32,
                              dc_stem=True, dc_cluster_size=16)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.get_submodule(name).cluster_map, layer.cluster_map)


def test_cluster_energies_equal_one_forward_per_state():
    model = _cluster_model()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    search = make_search(model, seed=0)
    assert search.group_sizes[:3] == [16, 16, 16]  # one group per map of the stem layer
    states = search.proposals()
    energies = state_energies(model, states, x, y)
    model.train()
    for m in model.modules():  # train mode for the EDropCluster layers only: BatchNorm as in the energies
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        for i in (0, 9):
            set_edropout_state(model, states[i])
            assert torch.allclose(energies[i], F.cross_entropy(model(x), y), atol=1e-5)
    assert energies.unique().numel() > 1


def test_cluster_unit_needs_dropcluster_layers_with_a_fixed_count():
    with pytest.raises(ValueError, match='no DropCluster2d layers'):
        add_edropout(timm.create_model('resnet18', num_classes=10), unit='cluster')
    model = timm.create_model('resnet18_dropcluster', num_classes=10, img_size=64, dc_cluster_count='gap')
    with pytest.raises(ValueError, match="cluster_count='fixed'"):
        add_edropout(model, unit='cluster')
    with pytest.raises(ValueError, match='unknown EDropout unit'):
        add_edropout(model, unit='pixel')


# Every 5th base by default; all of them with `-m slow`.
@pytest.mark.parametrize('stride', [5, pytest.param(1, marks=pytest.mark.slow)], ids=['sample', 'all'])
def test_every_slim_architecture_can_be_pruned_and_rebuilt(stride):
    from dropcluster_timm.edropout.resnet_slim import slim_bases
    from dropcluster_timm.edropout.prune import block_parts, prunable_blocks
    bases = slim_bases()
    assert 'resnet50' in bases and not any('resnext' in b or 'blur' in b for b in bases)
    for base in bases[::stride]:
        with torch.device('meta'):
            model = timm.create_model(base)
        name, _ = prunable_blocks(model)[0]  # raises for a structure pruning cannot rebuild
        with torch.device('meta'):
            slim = timm.create_model(f'{base}_slim', block_widths={name: 3})
        producer, norm, consumer = block_parts(slim.get_submodule(name))
        assert producer.out_channels == norm.num_features == consumer.in_channels == 3, base
        assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters()), base


def test_slim_model_works_with_timm_features_and_torchscript():
    widths = {'layer1.0': 5, 'layer4.1': 100}
    model = timm.create_model('resnet18_slim', block_widths=widths, num_classes=10).eval()
    assert model.layer1[0].conv1.out_channels == 5 and model.layer4[1].conv2.in_channels == 100
    x = torch.randn(1, 3, 64, 64)
    features = timm.create_model('resnet18_slim', block_widths=widths, features_only=True).eval()
    assert [f.shape[1] for f in features(x)] == features.feature_info.channels() == [64, 64, 128, 256, 512]
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(model)(x), model(x))
