""" The registered *_dropcluster models: registry, placement, cluster state, timm's model API,
pretrained tags through a real (offline) Hugging Face cache. Their cards: test_model_card.py."""
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from timm.models import get_pretrained_cfg

import dropcluster_timm  # noqa: F401  registers the models
from dropcluster_timm import dropcluster_layers, set_drop_prob, update_clusters
from dropcluster_timm.clustering.engine import grid_cluster_map
from dropcluster_timm.layers.drop_cluster_modules import LAYER_BUFFERS
from dropcluster_timm.models.variants import load_architectures

VARIANTS = ['resnet18_dropcluster', 'resnet34_dropcluster', 'resnet50_dropcluster', 'resnet101_dropcluster',
            'resnet152_dropcluster', 'resnet50d_dropcluster']
BASES = {v: v[:-len('_dropcluster')] for v in VARIANTS}


def layer_shapes(model):
    return {name: tuple(layer.cluster_map.shape) for name, layer in dropcluster_layers(model)}


def test_registry():
    """A variant for every architecture of dropblock_architectures.json, under its family's module."""
    table = load_architectures()
    assert set(table) == {'resnet_dropcluster', 'byobnet_dropcluster'}
    for module, bases in table.items():
        assert set(timm.list_models(module=module)) == {f'{b}_dropcluster' for b in bases if timm.is_model(b)}
    assert len(table['resnet_dropcluster']) >= 100 and len(table['byobnet_dropcluster']) >= 60
    named = ['resnext50_32x4d', 'seresnet50', 'wide_resnet50_2', 'skresnet18', 'resnest14d', 'gernet_s',
             'resnet33ts', 'regnetz_b16'] + [BASES[v] for v in VARIANTS]
    assert set(f'{b}_dropcluster' for b in named) <= set(timm.list_models('*_dropcluster'))


@pytest.mark.parametrize('tag', timm.list_pretrained('*_dropcluster.*'))
def test_pretrained_tags_point_at_timm_weights(tag):
    """Every tag is a real timm ImageNet weight of the base ResNet, with the same data config."""
    arch, weights = tag.split('.', 1)
    ours = get_pretrained_cfg(tag)
    base = get_pretrained_cfg(f'{arch[:-len("_dropcluster")]}.{weights}')
    assert base is not None and base.hf_hub_id == f'timm/{arch[:-len("_dropcluster")]}.{weights}'
    assert ours.hf_hub_id == base.hf_hub_id
    for field in ('input_size', 'pool_size', 'mean', 'std', 'crop_pct', 'interpolation', 'num_classes',
                  'first_conv', 'classifier', 'license', 'test_input_size'):
        assert getattr(ours, field) == getattr(base, field), field


@pytest.mark.parametrize('variant', VARIANTS)
def test_structure_matches_timm_resnet(variant):
    """Same parameters as timm's ResNet (so its weights load), DropCluster in every block of stages 3-4."""
    model = timm.create_model(variant, device='meta')
    base = timm.create_model(BASES[variant], device='meta')
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in base.named_parameters()]
    names = [n for n, _ in dropcluster_layers(model)]
    expected = [f'layer{s}.{i}.drop_block' for s in (3, 4) for i in range(len(getattr(base, f'layer{s}')))]
    assert names == expected
    assert all(layer.drop_prob == 0.0 for _, layer in dropcluster_layers(model))
    # buffers follow the requested device, grids were built before the move
    assert {b.device.type for b in model.buffers()} == {'meta'}


def test_grid_buffers_sized_from_img_size():
    model = timm.create_model('resnet18_dropcluster')
    shapes = layer_shapes(model)
    assert shapes['layer3.0.drop_block'] == (1, 14, 14) and shapes['layer4.1.drop_block'] == (1, 7, 7)
    model = timm.create_model('resnet18_dropcluster', img_size=(96, 64), dc_stem=True, dc_stages=[2, 3, 4])
    shapes = layer_shapes(model)
    assert shapes['maxpool.drop_cluster'] == (1, 48, 32)
    assert shapes['layer2.0.drop_block'] == (1, 12, 8)
    assert shapes['layer3.0.drop_block'] == (1, 6, 4)
    assert shapes['layer4.0.drop_block'] == (1, 3, 2)
    # the pretrained tag's input size sizes the maps when img_size is not given (a3: 160)
    model = timm.create_model('resnet18_dropcluster.a3_in1k')
    assert layer_shapes(model)['layer4.0.drop_block'] == (1, 5, 5)
    # every map is the core's grid for the layer's cluster size (DropBlock's block: 5 in stage 3, 3 in stage 4)
    for name, layer in dropcluster_layers(timm.create_model('resnet18_dropcluster', img_size=224)):
        side = {'layer3': 5, 'layer4': 3}[name.split('.')[0]]
        assert layer.cluster_size == side * side
        size = list(layer.cluster_map.shape[1:])
        assert torch.equal(layer.cluster_map.long(), grid_cluster_map(size, layer.target_clusters(size)))
        assert layer.cluster_map.max() + 1 == layer.cluster_counts[0] > 1


def test_stem_placement_after_act_before_pool():
    # dc_ramp_steps=0: the full rate at the first step (on the ramp it is 0.3 / 2000, and whether one of
    # the stem's 8,192 clusters drops then depends on the random state the test finds)
    model = timm.create_model('resnet18_dropcluster', dc_stem=True, drop_cluster_rate=0.3, img_size=64,
                              dc_ramp_steps=0).train()
    stem = model.maxpool.drop_cluster
    seen = {}
    stem.register_forward_hook(lambda m, a, o: seen.update(inp=a[0].detach().clone(), out=o.detach()))
    model.act1.register_forward_hook(lambda m, a, o: seen.update(act=o.detach().clone()))
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(seen['inp'], seen['act'])  # input of the stem DropCluster is act1's output
    dropped = (seen['out'] == 0) & (seen['inp'] != 0)
    assert dropped.any()  # and it drops in training
    # feature taps stay on act1, so the stem feature is the undropped activation
    assert model.feature_info[0]['module'] == 'act1'


def test_drop_in_train_identity_in_eval():
    torch.manual_seed(0)
    # zero_init_last=False: a fresh ResNet zeroes the last norm of each residual branch, which
    # would hide the drop in the branch
    model = timm.create_model('resnet18_dropcluster', drop_cluster_rate=0.5, num_classes=7, zero_init_last=False)
    x = torch.randn(2, 3, 64, 64)
    reference = timm.create_model('resnet18_dropcluster', num_classes=7, zero_init_last=False)
    reference.load_state_dict(model.state_dict())
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(x), reference(x))
    model.train()
    reference.train()
    assert not torch.allclose(model(x), reference(x))
    set_drop_prob(model, 0.0)
    torch.testing.assert_close(model(x), reference(x))


def test_model_kwargs_and_errors(caplog, monkeypatch):
    model = timm.create_model('resnet18_dropcluster', dc_num_clusters=4, dc_couple_channels=True,
                              dc_cluster_method='kmeans', drop_cluster_rate=0.2)
    for _, layer in dropcluster_layers(model):
        assert (layer.num_clusters, layer.couple_channels, layer.cluster_method, layer.drop_prob) == \
            (4, True, 'kmeans', 0.2)
        assert int(layer.cluster_counts[0]) <= 4
    # timm's train.py --drop-block: the rate of the DropCluster layers in the DropBlock slots, logged once
    caplog.set_level('INFO', logger='dropcluster_timm.models.variants')
    monkeypatch.setattr('dropcluster_timm.models.variants._SLOT_RATE_LOGGED', set())  # once per process
    for kwargs in (dict(drop_block_rate=0.15), dict(drop_block_rate=0.15, drop_cluster_rate=0.15)):
        assert {layer.drop_prob for _, layer in dropcluster_layers(timm.create_model('resnet18_dropcluster', **kwargs))} \
            == {0.15}
    assert [r.message for r in caplog.records if 'drop_block_rate' in r.message] == [
        'resnet18_dropcluster: drop_block_rate 0.15 is the rate of the DropCluster layers in its DropBlock slots']
    with pytest.raises(ValueError, match='drop_block_rate 0.1 and drop_cluster_rate 0.2 differ'):
        timm.create_model('resnet18_dropcluster', drop_block_rate=0.1, drop_cluster_rate=0.2)
    with pytest.raises(ValueError, match='dc_stages'):
        timm.create_model('resnet18_dropcluster', dc_stages=[5])
    with pytest.raises(ValueError, match='no DropCluster placement'):
        timm.create_model('resnet18_dropcluster', dc_stages=[])
    assert [n for n, _ in dropcluster_layers(timm.create_model('resnet18_dropcluster', dc_stages=[], dc_stem=True))] \
        == ['maxpool.drop_cluster']
    with pytest.raises(ValueError, match='img_size'):
        timm.create_model('resnet18_dropcluster', img_size=(0, 3))
    with pytest.raises(ValueError, match='drop_cluster_rate must be in'):
        timm.create_model('resnet18_dropcluster', drop_cluster_rate=1.0)
    with pytest.raises(TypeError):
        timm.create_model('resnet18_dropcluster', not_a_model_arg=1)


def test_timm_model_api():
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model('resnet18_dropcluster', num_classes=5, in_chans=3, dc_stem=True).eval()
    assert model(x).shape == (2, 5)
    final, intermediates = model.forward_intermediates(x)
    assert [t.shape[1] for t in intermediates] == [64, 64, 128, 256, 512]
    torch.testing.assert_close(final, model.forward_features(x))
    out = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), out)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)

    features = timm.create_model('resnet18_dropcluster', features_only=True, out_indices=(2, 3, 4)).eval()
    assert [f.shape[-1] for f in features(x)] == [8, 4, 2]
    assert len(list(dropcluster_layers(features))) == 4  # the layers live on in the feature wrapper

    gray = timm.create_model('resnet18_dropcluster', in_chans=1, num_classes=0).eval()
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 512)


def test_train_after_update_clusters_and_torchscript():
    torch.manual_seed(0)
    model = timm.create_model('resnet18_dropcluster', drop_cluster_rate=0.2, num_classes=4, img_size=64)
    x = torch.randn(4, 3, 64, 64)
    assert update_clusters(model, x) == 4
    assert layer_shapes(model)['layer3.0.drop_block'] == (256, 4, 4)  # per-channel maps
    model.train()
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    scripted = torch.jit.script(model)
    scripted.train()
    assert scripted(x).shape == (4, 4)
    scripted.eval()
    model.eval()
    torch.testing.assert_close(scripted(x), model(x))


def _fake_timm_checkpoint(tmp_path, base: str) -> Path:
    """A real timm ResNet (random weights) saved as the Hub repo would hold it."""
    torch.manual_seed(1)
    model = timm.create_model(base)
    path = tmp_path / f'{base}.safetensors'
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def test_pretrained_tag_loads_timm_weights_from_hf_cache(tmp_path, hf_cache):
    """`resnet18_dropcluster.a1_in1k` reads timm/resnet18.a1_in1k from the cache, adds grid cluster maps."""
    ckpt = _fake_timm_checkpoint(tmp_path, 'resnet18')
    hf_cache.add('timm/resnet18.a1_in1k', {'model.safetensors': ckpt})
    source = safetensors.torch.load_file(str(ckpt))

    model = timm.create_model('resnet18_dropcluster.a1_in1k', pretrained=True, drop_cluster_rate=0.1)
    state = model.state_dict()
    for k, v in source.items():
        torch.testing.assert_close(state[k], v, msg=k)
    fresh = timm.create_model('resnet18_dropcluster.a1_in1k')
    for name, layer in dropcluster_layers(model):
        assert torch.equal(layer.cluster_map, fresh.get_submodule(name).cluster_map)
        assert layer.drop_prob == 0.1

    # timm's own adaptations still apply: new head, 1-channel stem, features_only
    adapted = timm.create_model('resnet18_dropcluster.a1_in1k', pretrained=True, num_classes=5, in_chans=1)
    torch.testing.assert_close(adapted.conv1.weight, source['conv1.weight'].sum(1, keepdim=True))
    assert adapted.fc.out_features == 5
    feats = timm.create_model('resnet18_dropcluster.a1_in1k', pretrained=True, features_only=True)
    assert len(feats(torch.randn(1, 3, 64, 64))) == 5

    # a weight that is not in the cache fails (offline), nothing is invented
    with pytest.raises(Exception):
        timm.create_model('resnet18_dropcluster.a2_in1k', pretrained=True)


def test_pretrained_stem_pool_with_params_is_remapped(tmp_path, hf_cache):
    """dc_stem with a conv stem pool (replace_stem_pool) moves maxpool.* to maxpool.pool.* on load."""
    torch.manual_seed(2)
    base = timm.create_model('resnet18', replace_stem_pool=True)
    path = tmp_path / 'r18.safetensors'
    safetensors.torch.save_file(base.state_dict(), str(path))
    hf_cache.add('timm/resnet18.a1_in1k', {'model.safetensors': path})
    model = timm.create_model('resnet18_dropcluster.a1_in1k', pretrained=True, replace_stem_pool=True, dc_stem=True)
    torch.testing.assert_close(model.maxpool.pool[0].weight, base.maxpool[0].weight)


# ----- every architecture with DropBlock slots (generated variants)

# One of each block type users asked for; the whole list runs in `.ci/timm_model_tests.sh --all`.
FAMILY_MODELS = ['resnext50_32x4d', 'seresnet50', 'wide_resnet50_2', 'skresnet18', 'resnest14d', 'res2net50_14w_8s',
                 'gernet_s', 'resnet33ts', 'regnetz_b16', 'mobilevit_xxs']


# Every 8th architecture by default (about 15 s on 2 cores); all of them (2 minutes) with `-m slow`.
@pytest.mark.parametrize('stride', [8, pytest.param(1, marks=pytest.mark.slow)], ids=['sample', 'all'])
def test_every_listed_architecture_has_its_slots_as_dropcluster_layers(stride):
    """Built on the meta device: as many DropCluster layers as timm's model has DropBlock slots."""
    table = load_architectures()
    listed = [(base, slots) for bases in table.values() for base, slots in bases.items()]
    assert len(listed) > 100
    for base, slots in listed[::stride]:
        if timm.is_model(base):
            model = timm.create_model(f'{base}_dropcluster', device='meta')
            assert sum(1 for _ in dropcluster_layers(model)) == slots, base


@pytest.mark.parametrize('base', FAMILY_MODELS)
def test_variant_is_the_base_with_dropcluster_in_the_slots(base):
    """Same parameters and buffers as timm's model (its weights load strictly), the layers' channel
    counts and grid maps fit the activations they see, and eval outputs equal the base's."""
    torch.manual_seed(0)
    model = timm.create_model(f'{base}_dropcluster', drop_cluster_rate=0.2, dc_ramp_steps=0).eval()
    plain = timm.create_model(base).eval()
    state = {k: v for k, v in model.state_dict().items() if k.rpartition('.')[2] not in LAYER_BUFFERS}
    plain.load_state_dict(state)  # strict
    seen = {}
    layers = list(dropcluster_layers(model))
    for name, layer in layers:
        layer.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, tuple(a[0].shape[1:])) and None)
    size = model.pretrained_cfg['input_size'][-2:]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
    for name, layer in layers:
        assert (layer.num_channels,) + tuple(layer.cluster_map.shape[1:]) == seen[name], name
        assert layer.drop_prob == 0.2 and layer.gamma_scale == 1.0
    changed = []
    for _, layer in layers:
        layer.register_forward_hook(lambda m, a, out: changed.append(not torch.equal(a[0], out)) and None)
    with torch.no_grad():
        model.train()(x)
    assert any(changed)  # and it drops in training


def test_byobnet_variant_round_trips_through_local_dir(tmp_path):
    from dropcluster_timm.hub import save_pretrained
    model = timm.create_model('gernet_s_dropcluster', num_classes=4, dc_num_clusters=3, dc_cluster_method='kmeans')
    update_clusters(model, torch.randn(2, 3, 64, 64))
    set_drop_prob(model, 0.15)
    save_pretrained(model, tmp_path / 'g')
    again = timm.create_model(f'local-dir:{tmp_path / "g"}', pretrained=True)
    assert again.pretrained_cfg['architecture'] == 'gernet_s_dropcluster'
    for (name, a), (_, b) in zip(dropcluster_layers(model), dropcluster_layers(again)):
        assert torch.equal(a.cluster_map, b.cluster_map), name
        assert (b.drop_prob, b.num_clusters, b.cluster_method) == (0.15, 3, 'kmeans')


def test_byobnet_tag_loads_timm_weights_from_hf_cache(tmp_path, hf_cache):
    tag = next(t for t in timm.list_pretrained('regnetz_b16_dropcluster.*'))
    weights = tag.split('.', 1)[1]
    ckpt = _fake_timm_checkpoint(tmp_path, 'regnetz_b16')
    hf_cache.add(f'timm/regnetz_b16.{weights}', {'model.safetensors': ckpt})
    model = timm.create_model(tag, pretrained=True)
    source = safetensors.torch.load_file(str(ckpt))
    state = model.state_dict()
    for k, v in source.items():
        torch.testing.assert_close(state[k], v, msg=k)
    assert all(layer.cluster_map.numel() > 0 for _, layer in dropcluster_layers(model))
    feats = timm.create_model(tag, pretrained=True, features_only=True)  # byobnet's flatten_sequential
    assert len(feats(torch.randn(1, 3, 64, 64))) == len(feats.feature_info)
