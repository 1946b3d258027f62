""" Pictures of the DropCluster state of a model (matplotlib, optional)."""
from typing import Optional

import torch.nn as nn

from timm.utils import unwrap_model

from ..layers.model_helpers import dropcluster_layers

__all__ = ['plot_cluster_maps']


def plot_cluster_maps(model: nn.Module, path: str, channels: int = 4) -> Optional[str]:
    """A PNG of the cluster maps of the first ``channels`` maps of each DropCluster layer.

    Returns ``path``, or None (nothing written) when the model has no layer with 2-D maps or
    matplotlib is not installed.
    """
    layers = [(n, l) for n, l in dropcluster_layers(unwrap_model(model)) if l.cluster_map.numel() > 0 and l.cluster_map.dim() == 3]
    if not layers:
        return None
    try:  # the object API: no pyplot state, and the caller's backend (a notebook's, say) stays as it is
        from matplotlib.figure import Figure
    except ImportError:
        return None  # optional: pip install matplotlib (or dropcluster-timm[train])
    cols = min(channels, max(l.cluster_map.shape[0] for _, l in layers))
    fig = Figure(figsize=(2 * cols, 2 * len(layers)))
    axes = fig.subplots(len(layers), cols, squeeze=False)
    for r, (name, layer) in enumerate(layers):
        maps = layer.cluster_map.detach().cpu().long()
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < maps.shape[0]:
                ax.imshow(maps[c].numpy() % 20, cmap='tab20', vmin=0, vmax=19, interpolation='nearest')
                ax.set_title(f'{name} [{c}]', fontsize=7)
            else:
                ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=80)  # a Figure of its own draws with Agg, whatever pyplot's backend is
    return path
