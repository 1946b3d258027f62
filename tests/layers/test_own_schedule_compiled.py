""" The layers' own schedule under torch.compile: every step that does not re-cluster runs one graph with
the drop inside it, re-clustering steps break the graph only where it is due, and nothing recompiles
once the first two steps have compiled."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import dropcluster_timm.layers.layer_schedule as layer_schedule
from dropcluster_timm import DropCluster2d
from dropcluster_timm import dropcluster_layers


def _model(**kwargs):
    torch.manual_seed(0)
    options = dict(dc_recluster_every=10, dc_ramp_steps=20, dc_cluster_images=4)
    options.update(kwargs)
    return timm.create_model('resnet18_dropcluster', num_classes=4, drop_cluster_rate=0.2, **options).train()


def _step(model, optimizer, g, size=64):
    x, y = torch.randn(4, 3, size, size, generator=g), torch.randint(0, 4, (4,), generator=g)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _count_reclusterings(monkeypatch):
    steps = []
    share = layer_schedule.share_clusters

    def counting(layer, x, **kwargs):
        steps.append(layer.steps + 1)  # the step being taken
        share(layer, x, **kwargs)
    monkeypatch.setattr(layer_schedule, 'share_clusters', counting)
    return steps


def test_a_step_is_one_graph_with_the_drop_inside_whether_it_reclusters_or_not():
    model = _model()
    x = torch.randn(4, 3, 64, 64)
    layers = [layer for _, layer in dropcluster_layers(model)]
    for step, due in ((1, True), (2, False)):  # the first step clusters, the second does not
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        targets = [str(node.target) for node in explained.graphs[0].graph.nodes
                   if node.op in ('call_function', 'call_method')]
        assert sum('advance_schedule' in t for t in targets) == len(layers)
        assert sum('recluster' in t for t in targets) == (len(layers) if due else 0)
        assert sum('rand' in t for t in targets) == len(layers)  # the drop runs in the graph
        assert all(layer.steps == step and int(layer.num_steps) == step and layer.clustered for layer in layers)


def test_compiled_steps_recluster_when_due_and_compile_nothing_after_the_second(monkeypatch):
    reclustered = _count_reclusterings(monkeypatch)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    layers = [layer for _, layer in dropcluster_layers(model)]
    compiled_by_step = []
    for _ in range(25):
        _step(compiled, optimizer, g)
        compiled_by_step.append(len(graphs))
    assert compiled_by_step[1:] == [compiled_by_step[1]] * 24  # every step after the second reuses a graph
    assert sorted(set(reclustered)) == [1, 11, 21] and len(reclustered) == 3 * len(layers)
    assert all(layer.steps == 25 and int(layer.num_steps) == 25 and layer.clustered for layer in layers)


def test_a_compiled_model_resumes_its_count_and_copies_count_alone(monkeypatch):
    reclustered = _count_reclusterings(monkeypatch)
    model = _model(dc_recluster_every=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='eager')
    for _ in range(5):
        _step(compiled, optimizer, g)
    layers = len(list(dropcluster_layers(model)))
    assert sorted(set(reclustered)) == [1, 5]
    ema = copy.deepcopy(model)  # its own schedule: counting it leaves the model's alone
    ema(torch.randn(2, 3, 64, 64))
    assert [layer.steps for _, layer in dropcluster_layers(ema)] == [6] * layers
    resumed = _model(dc_recluster_every=4)
    resumed.load_state_dict(model.state_dict())
    compiled = torch.compile(resumed, backend='eager')
    del reclustered[:]
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.01)
    for _ in range(4):  # steps 6 to 8 keep the maps, step 9 re-clusters
        _step(compiled, optimizer, g)
    assert reclustered == [9] * layers
    assert all(a.steps == 5 and b.steps == 9 and int(b.num_steps) == 9
               for (_, a), (_, b) in zip(dropcluster_layers(model), dropcluster_layers(resumed)))


@pytest.mark.parametrize('ramp_steps', [0, 20])
def test_a_compiled_layer_matches_the_eager_rate(ramp_steps):
    """The compiled rate is the eager ramp's rate, as a tensor (the random draws differ)."""
    layer = DropCluster2d(drop_prob=0.4, block_size=1, recluster_every=100, ramp_steps=ramp_steps).train()
    layer.update_clusters(torch.randn(2, 2, 16, 16))
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend='eager')
    x = torch.ones(64, 2, 16, 16)
    for step in range(1, 11):
        share = float((compiled(x) == 0).float().mean())
        assert share == pytest.approx(layer.own_rate(step), abs=0.03)
    assert layer.steps == 10 and int(layer.num_steps) == 10


def test_fullgraph_compiles_the_steps_that_recluster_and_the_others(monkeypatch):
    reclustered = _count_reclusterings(monkeypatch)
    model = _model(dc_recluster_every=2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='eager', fullgraph=True)  # a graph break would raise
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        _step(compiled, optimizer, g, size=32)
    assert sorted(set(reclustered)) == [1, 3]
