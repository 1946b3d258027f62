""" A ``*_dropcluster`` model under torch.compile, driving its own layers against the same model driven by
the training recipe, measured side by side in one process.

    python -m benchmarks.bench_compile [--model resnet18_dropcluster] [--img-size 64] [--batch 16] [--device cpu]

Both models hold the same weights and maps. The self-driving one counts its steps, ramps its rate
(``dc_ramp_steps``) and would re-cluster every ``dc_recluster_every`` steps (the first step, its
initial clustering, is part of its compile time); the recipe-driven one has its own schedule off
(``disable_own_schedule``), is clustered once by ``update_clusters`` and drops at a fixed rate, as
``dropcluster-timm train`` runs it after the warm-up. Printed: the compile time of each (its first
steps, less as many steady steps, with inductor's caches off), the median compiled and eager training
steps (interleaved, so load on the machine falls on both alike) and their ratios.
"""
import argparse
import copy
import time

import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn.functional as F

import timm
import dropcluster_timm  # noqa: F401  registers the models
from dropcluster_timm import disable_own_schedule, update_clusters

from .timing import synchronize, time_interleaved


def _stepper(model, device, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def _models(name: str, device: torch.device, x: torch.Tensor):
    torch.manual_seed(0)
    own = timm.create_model(name, num_classes=10, drop_cluster_rate=0.1).to(device).train()
    recipe = copy.deepcopy(own)
    disable_own_schedule(recipe)
    update_clusters(recipe, x[:32])
    return {'self-driving': own, 'recipe': recipe}


def _compile_seconds(step, device, calls: int) -> float:
    synchronize(device)
    t = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='resnet18_dropcluster', help='a *_dropcluster model')
    p.add_argument('--img-size', type=int, default=64, help='input size in pixels')
    p.add_argument('--batch', type=int, default=16, help='batch size')
    p.add_argument('--steps', type=int, default=15, help='timed steps per model and mode (medians)')
    p.add_argument('--device', default='cpu', help='cpu or cuda')
    p.add_argument('--backend', default='inductor', help='torch.compile backend')
    args = p.parse_args(argv)
    # Compile times from scratch: no graph from an earlier run's cache.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Build, compile and time both models; print the figures."""
    device = torch.device(args.device)
    where = (f'CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)'
             if device.type == 'cpu' else torch.cuda.get_device_name(device))
    print(f'{args.model}, {args.img_size} px, batch {args.batch}, {where}, torch {torch.__version__}, '
          f'backend {args.backend}')
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    eager = _models(args.model, device, x)
    eager_steps = {name: _stepper(m, device, x, y) for name, m in eager.items()}
    eager_times = time_interleaved(eager_steps, device, args.steps)

    torch._dynamo.reset()
    models = _models(args.model, device, x)
    compiled = {name: _stepper(torch.compile(m, backend=args.backend), device, x, y) for name, m in models.items()}
    # The self-driving model compiles twice: its first step (the variant that clusters) and its second
    # (the one every step that does not re-cluster runs); the recipe's first step is its only compile.
    # It compiles first, so kernels both share are compiled on its clock, not the recipe's.
    first_calls = {'self-driving': 2, 'recipe': 1}
    raw = {name: _compile_seconds(step, device, first_calls[name]) for name, step in compiled.items()}
    times = time_interleaved(compiled, device, args.steps)
    compile_s = {name: raw[name] - first_calls[name] * times[name] for name in raw}

    for name in compiled:
        print(f'{name:>12}: compile {compile_s[name]:6.1f} s, compiled step {times[name] * 1e3:7.1f} ms, '
              f'eager step {eager_times[name] * 1e3:7.1f} ms')
    print(f"self-driving / recipe: compiled step {times['self-driving'] / times['recipe']:.3f}x, "
          f"eager step {eager_times['self-driving'] / eager_times['recipe']:.3f}x, "
          f"compile time {compile_s['self-driving'] / compile_s['recipe']:.2f}x")


if __name__ == '__main__':
    main()
