""" Cluster maps across the processes of a ``torch.distributed`` run: one rank clusters, every rank
ends with its maps, bit for bit (DDP's buffer broadcast cannot be relied on for that: it runs before
the forward in which a layer re-clusters, and it can be turned off)."""
from typing import Tuple

import torch

from .drop_cluster import LABEL_DTYPE

__all__ = ['distributed', 'broadcast_cluster_map', 'share_clusters']


def distributed() -> bool:
    """Whether a process group of more than one process is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def broadcast_cluster_map(layer: torch.nn.Module, shape: Tuple[int, ...], device: torch.device, src: int = 0) -> None:
    """Give every rank ``layer``'s maps and counts of rank ``src``; ``shape`` ``(M, *spatial)`` is that of
    the maps (every rank knows it from its own input). The counts travel too: a map counted 0 is left
    undropped (``skip_unstructured``)."""
    backend = str(torch.distributed.get_backend())
    if 'nccl' in backend and 'gloo' not in backend:
        if device.type != 'cuda':
            device = torch.device('cuda', torch.cuda.current_device())
    elif device.type != 'cuda' or 'nccl' not in backend:
        device = torch.device('cpu')
    here = torch.distributed.get_rank() == src
    if here:
        labels = layer.cluster_map.to(device=device, dtype=LABEL_DTYPE)
        counts = layer.cluster_counts.to(device=device, dtype=LABEL_DTYPE)
    else:
        labels = torch.empty(shape, dtype=LABEL_DTYPE, device=device)
        counts = torch.empty(shape[:1], dtype=LABEL_DTYPE, device=device)
    torch.distributed.broadcast(labels, src=src)
    torch.distributed.broadcast(counts, src=src)
    if not here:
        layer.set_cluster_map(labels, undropped=counts == 0)
        layer.clustered = True


def share_clusters(layer: torch.nn.Module, x: torch.Tensor, src: int = 0, **kwargs) -> None:
    """Re-cluster ``layer`` from its input ``x``: on rank ``src`` under ``torch.distributed``, whose maps
    every rank then takes (``broadcast_cluster_map``); here otherwise. ``kwargs`` go to ``update_clusters``.
    Every rank calls it at the same point."""
    if not distributed():
        layer.update_clusters(x, **kwargs)
        return
    if torch.distributed.get_rank() == src:
        layer.update_clusters(x, **kwargs)
    m = 1 if layer.couple_channels else x.shape[1]
    broadcast_cluster_map(layer, (m,) + tuple(x.shape[2:]), x.device, src=src)
    if layer.num_channels is None:
        layer.num_channels = int(x.shape[1])
