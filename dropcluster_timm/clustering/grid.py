""" Cluster maps on the grid: the regular grid partition, the grid's neighbour edges and connected components. """
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


# Edge costs are computed in chunks of this many (edge x feature) elements to bound memory.
CHUNK_ELEMENTS = 1 << 24


def grid_cluster_map(spatial: List[int], num_clusters: int, device: Optional[torch.device] = None) -> Tensor:
    """Regular partition of a grid into at most ``num_clusters`` near-cubic blocks.

    The block side is the smallest one whose block count fits in ``num_clusters``, so a target of
    ``ceil(H / s) * ceil(W / s)`` clusters gives exactly the non-overlapping s x s blocks. TorchScript
    friendly: the layers call it in ``forward`` before their first clustering.

    Returns:
        int64 labels of shape ``(1, *spatial)``.
    """
    n = 1
    for d in spatial:
        n *= d
    k = max(1, min(num_clusters, n))
    side = max(1, int(math.floor((n / k) ** (1.0 / len(spatial)))))
    while True:
        count = 1
        for d in spatial:
            count *= (d + side - 1) // side
        if count <= k:
            break
        side += 1
    labels = torch.zeros([1] * len(spatial), dtype=torch.long, device=device)
    for i, d in enumerate(spatial):
        blocks = (d + side - 1) // side
        shape = [1] * len(spatial)
        shape[i] = d
        labels = labels * blocks + (torch.arange(d, device=device) // side).view(shape)
    return labels.unsqueeze(0)


def grid_edges(spatial: Sequence[int], device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    """Pixel adjacency of a grid (2/4/6-connectivity) as ``(src, dst)`` flat indices, ``src < dst``.

    Edges are listed axis by axis in raster order of ``src``, so the costs of axis ``k`` equal a
    shifted difference along that axis flattened (see ``_grid_edge_sqdist``).
    """
    spatial = list(spatial)
    idx = torch.arange(math.prod(spatial), device=device).view(spatial)
    src, dst = [], []
    for axis in range(len(spatial)):
        src.append(idx.narrow(axis, 0, spatial[axis] - 1).reshape(-1))
        dst.append(idx.narrow(axis, 1, spatial[axis] - 1).reshape(-1))
    return torch.cat(src), torch.cat(dst)


def connected_components(labels: Tensor, spatial: Sequence[int]) -> Tensor:
    """Split every cluster of ``labels`` ``(G, N)`` into its grid-connected pieces.

    Returns compact int64 labels ``(G, N)``; a map whose clusters are all connected keeps its
    number of distinct labels.
    """
    G, N = labels.shape
    device = labels.device
    src, dst = grid_edges(spatial, device)
    offsets = torch.arange(G, device=device)[:, None] * N
    same = labels[:, src] == labels[:, dst]
    a = (src + offsets)[same]
    b = (dst + offsets)[same]
    comp = torch.arange(G * N, device=device)
    while True:
        nxt = comp.scatter_reduce(0, a, comp[b], 'amin').scatter_reduce(0, b, comp[a], 'amin')
        nxt = nxt[nxt]
        if torch.equal(nxt, comp):
            break
        comp = nxt
    is_rep = (comp == torch.arange(G * N, device=device)).view(G, N)
    local = torch.cumsum(is_rep.long(), 1) - 1
    return local.view(-1)[comp].view(G, N)


def generator_for(generator: Optional[torch.Generator], device) -> Optional[torch.Generator]:
    # torch samplers need a generator on the tensor's device; fall back to the global RNG otherwise.
    if generator is None:
        return None
    gen_dev = torch.device(generator.device)
    dev = torch.device(device) if device is not None else torch.device('cpu')
    if gen_dev.type != dev.type:
        raise ValueError(f'generator is on {gen_dev} but the activations are on {dev}')
    return generator
