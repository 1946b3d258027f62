import pytest
import timm
import torch
from timm.layers import DropBlock2d

from dropcluster_timm import (
    DropCluster2d, cluster_state, copy_cluster_state, dropcluster_layers, init_cluster_maps, set_drop_prob,
    update_clusters)
from dropcluster_timm.clustering.engine import grid_cluster_map


def _timm_resnet_with_dropcluster():
    """A real timm resnet18 whose DropBlock slots hold DropCluster layers."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=5, drop_block_rate=0.1)
    slots = [(name, m) for name, m in model.named_modules() if isinstance(m, DropBlock2d)]
    assert slots
    for name, _ in slots:
        parent_name, attr = name.rsplit('.', 1)
        setattr(model.get_submodule(parent_name), attr, DropCluster2d(0.1, block_size=3))
    return model


def test_update_clusters_reclusters_every_layer_and_restores_modes():
    model = _timm_resnet_with_dropcluster()
    model.train()
    model.layer1.eval()  # a mixed state must come back as it was
    bn = model.bn1
    stats = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    x = torch.randn(4, 3, 64, 64)
    n = update_clusters(model, x)
    layers = list(dropcluster_layers(model))
    assert n == len(layers) > 0
    for _, layer in layers:
        channels = layer.cluster_map.shape[0]
        assert channels > 1 and layer.cluster_counts.numel() == channels
        assert int(layer.cluster_counts.max()) <= layer.target_clusters(list(layer.cluster_map.shape[1:]))
    assert model.training and not model.layer1.training and model.layer1[0].bn1.training is False
    assert model.layer2.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    # The maps follow the data: another batch gives other maps.
    before = [layer.cluster_map.clone() for _, layer in layers]
    update_clusters(model, (torch.randn(4, 3, 64, 64) * 3,))
    assert any(not torch.equal(b, layer.cluster_map) for b, (_, layer) in zip(before, layers))


def test_update_clusters_restores_mode_on_error():
    model = _timm_resnet_with_dropcluster().train()
    with pytest.raises(RuntimeError):
        update_clusters(model, torch.randn(2, 5, 64, 64))  # wrong channel count
    assert all(m.training for m in model.modules())


def test_update_clusters_needs_layers():
    with pytest.raises(ValueError, match='no DropCluster layers'):
        update_clusters(torch.nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4))


def test_set_drop_prob():
    model = _timm_resnet_with_dropcluster()
    assert set_drop_prob(model, 0.25) == len(list(dropcluster_layers(model)))
    assert all(layer.drop_prob == 0.25 for _, layer in dropcluster_layers(model))
    with pytest.raises(ValueError, match='drop_prob'):
        set_drop_prob(model, 1.0)


def test_training_step_with_dropcluster_changes_output():
    model = _timm_resnet_with_dropcluster()
    update_clusters(model, torch.randn(4, 3, 64, 64))
    set_drop_prob(model, 0.3)
    model.train()
    x = torch.randn(4, 3, 64, 64)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and model.conv1.weight.grad is not None


def test_plain_ddp_wraps_dropcluster_buffers(tmp_path):
    # DDP broadcasts every buffer over the process group; the label dtype must be one gloo carries.
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), DropCluster2d(0.2, 3, feat_size=(8, 8)))
        ddp = torch.nn.parallel.DistributedDataParallel(net).train()
        ddp(torch.randn(2, 3, 8, 8)).sum().backward()
        update_clusters(ddp, torch.randn(4, 3, 8, 8))
        assert net[1].cluster_map.shape == (4, 8, 8)
        ddp(torch.randn(2, 3, 8, 8)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_set_drop_prob_ramps_timm_dropblock_only_when_asked():
    model = timm.create_model('resnet18', drop_block_rate=0.1, num_classes=2)
    blocks = [m for m in model.modules() if isinstance(m, DropBlock2d)]
    assert len(blocks) == 4  # stages 3 and 4, two blocks each
    assert set_drop_prob(model, 0.05) == 0 and {b.drop_prob for b in blocks} == {0.1}
    assert set_drop_prob(model, 0.05, drop_block=True) == 4 and {b.drop_prob for b in blocks} == {0.05}


def test_cluster_maps_update_in_place_when_shape_is_unchanged():
    layer = DropCluster2d(0.1, block_size=2, feat_size=(8, 8))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), layer)
    update_clusters(net, torch.randn(6, 3, 8, 8))  # grid (1, 8, 8) -> per channel (4, 8, 8): replaced
    buf_map, buf_counts = layer.cluster_map, layer.cluster_counts
    before = buf_map.clone()
    update_clusters(net, torch.randn(6, 3, 8, 8) * 5)
    assert layer.cluster_map is buf_map and layer.cluster_counts is buf_counts  # DDP's references stay valid
    assert not torch.equal(before, layer.cluster_map)
    # load_state_dict of same-shaped maps also copies in place
    layer.load_state_dict({'cluster_map': before, 'cluster_counts': before.flatten(1).amax(1) + 1})
    assert layer.cluster_map is buf_map and torch.equal(layer.cluster_map, before.to(buf_map.dtype))


def test_copy_cluster_state_follows_shape_changes():
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), DropCluster2d(0.1, block_size=2))
    b = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), DropCluster2d(0.1, block_size=2))
    update_clusters(a, torch.randn(6, 3, 8, 8))
    assert copy_cluster_state(a, b) == 1
    assert torch.equal(a[1].cluster_map, b[1].cluster_map) and b[1].max_clusters == a[1].max_clusters
    assert b[1].cluster_map.data_ptr() != a[1].cluster_map.data_ptr()  # a copy, not an alias
    before = b[1].cluster_map.clone()
    update_clusters(a, torch.randn(6, 3, 8, 8) * 3)
    assert torch.equal(b[1].cluster_map, before)


def test_init_cluster_maps_gives_empty_layers_their_grid_once():
    """Layers built without a feature size get the grid of the size their input has; layers that
    have a map keep it; train/eval modes are restored."""
    model = _timm_resnet_with_dropcluster().train()
    layers = [layer for _, layer in dropcluster_layers(model)]
    assert all(layer.cluster_map.numel() == 0 for layer in layers)
    assert init_cluster_maps(model, (3, 64, 64)) == len(layers)
    assert model.training and all(m.training for m in model.modules())
    for name, layer in dropcluster_layers(model):
        spatial = list(layer.cluster_map.shape[1:])
        assert layer.cluster_map.shape[0] == 1 and spatial in ([4, 4], [2, 2]), name  # stages 3 and 4 at 64 px
        assert torch.equal(layer.cluster_map, grid_cluster_map(spatial, layer.target_clusters(spatial)).int())
    before = cluster_state(model)
    assert init_cluster_maps(model, (3, 32, 32)) == 0  # nothing empty: nothing changes
    assert all(torch.equal(before[k], v) for k, v in cluster_state(model).items())
    # a re-clustered model is left alone too
    update_clusters(model, torch.randn(4, 3, 64, 64))
    after = cluster_state(model)
    assert init_cluster_maps(model, (3, 64, 64)) == 0
    assert all(torch.equal(after[k], v) for k, v in cluster_state(model).items())
    assert all(v.device.type == 'cpu' and v.dtype == torch.int32 for v in after.values())

