""" The cost of the layers' own schedule (re-clustering from the input every N training forwards),
measured side by side in one process, and what torch.compile makes of it.

    python -m benchmarks.bench_own_schedule [--model resnet50_dropcluster] [--img-size 128] [--batch 16]

1. Amortised cost: the median training step of a model that re-clusters every layer at every step
   against the same model that never does (same weights, stepping in turn); the difference spread
   over the default interval (``dc_recluster_every``), as a share of a plain step.
2. torch.compile: the graphs compiled over ``--compile-steps`` training steps of a compiled model that
   re-clusters every ``--compile-interval`` steps (a counting backend, so nothing is optimised), and
   ``torch._dynamo.explain`` at a step that re-clusters and at one that does not.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import timm
import dropcluster_timm  # noqa: F401  registers the models
from dropcluster_timm import dropcluster_layers
from dropcluster_timm.layers.options import layer_option


def _step(model, optimizer, x, y) -> float:
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def amortised_cost(name: str, img_size: int, batch: int, steps: int):
    """Median step time re-clustering at every step against never (the same weights, stepping in turn,
    so load on the machine falls on both alike); the difference is the cost of one re-clustering."""
    interval = layer_option('recluster_every').default
    torch.manual_seed(0)
    every = timm.create_model(name, num_classes=10, drop_cluster_rate=0.1, dc_recluster_every=1, dc_ramp_steps=0)
    never = timm.create_model(name, num_classes=10, drop_cluster_rate=0.1, dc_recluster_every=0, dc_ramp_steps=0)
    never.load_state_dict(every.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (every, never)]
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    every.train(), never.train()
    _step(every, opts[0], x, y), _step(never, opts[1], x, y)  # warm-up
    times = {'every': [], 'never': []}
    for _ in range(steps):
        times['every'].append(_step(every, opts[0], x, y))
        times['never'].append(_step(never, opts[1], x, y))
    plain, with_recluster = statistics.median(times['never']), statistics.median(times['every'])
    return dict(interval=interval, plain=plain, recluster=with_recluster,
                share=(with_recluster - plain) / interval / plain)


def compile_count(name: str, img_size: int, batch: int, steps: int, interval: int):
    """Graphs compiled at each of ``steps`` training steps, and what ``explain`` makes of the two kinds of step."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_cluster_rate=0.1, dc_recluster_every=interval, dc_ramp_steps=steps)
    compiled = torch.compile(model, backend=counting_backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    model.train()
    per_step = []
    for step in range(steps):
        _step(compiled, optimizer, x, y)
        per_step.append(len(graphs))
    layer = next(layer for _, layer in dropcluster_layers(model))
    explained = {}
    for kind in ('re-clustering', 'plain'):  # a fresh model clusters at its first step, not at its second
        torch._dynamo.reset()
        fresh = timm.create_model(name, num_classes=10, drop_cluster_rate=0.1, dc_recluster_every=interval).train()
        if kind == 'plain':
            fresh(x)
        e = torch._dynamo.explain(fresh)(x)
        explained[kind] = (e.graph_count, e.graph_break_count)
    return dict(first=per_step[0], second=per_step[1], total=per_step[-1], reclusterings=1 + (steps - 1) // interval,
                steps=layer.steps, explained=explained)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='resnet50_dropcluster', help='a *_dropcluster model')
    p.add_argument('--img-size', type=int, default=128, help='input size in pixels')
    p.add_argument('--batch', type=int, default=16, help='batch size')
    p.add_argument('--steps', type=int, default=10, help='timed steps per model (cost)')
    p.add_argument('--compile-steps', type=int, default=50, help='training steps of the compiled model')
    p.add_argument('--compile-interval', type=int, default=10, help='re-clustering interval of the compiled model')
    args = p.parse_args(argv)
    print(f'{args.model}, {args.img_size} px, batch {args.batch}, CPU ({torch.backends.cpu.get_cpu_capability()}, '
          f'{torch.get_num_threads()} threads)')
    c = amortised_cost(args.model, args.img_size, args.batch, args.steps)
    print(f"median training step {c['plain'] * 1e3:.0f} ms without re-clustering, {c['recluster'] * 1e3:.0f} ms "
          f"re-clustering every layer; amortised at the default interval of {c['interval']} steps: "
          f"{100 * c['share']:.3f}% of a step")
    k = compile_count(args.model, args.img_size, args.batch, args.compile_steps, args.compile_interval)
    print(f"torch.compile over {args.compile_steps} steps re-clustering every {args.compile_interval} "
          f"({k['reclusterings']} re-clusterings): {k['first']} graphs compiled at the first step, "
          f"{k['second'] - k['first']} at the second, {k['total'] - k['second']} after it")
    for kind, (count, breaks) in k['explained'].items():
        print(f'torch._dynamo.explain at a {kind} step: {count} graph(s), {breaks} graph break(s)')


if __name__ == '__main__':
    main()
