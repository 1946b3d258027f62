""" A DropCluster layer's maps as state: installing them (``set_cluster_map``), loading them from a
state dict, and the host copies of their counts that size a forward's draw without a device sync.

Loaded maps come from files from outside, so every value is checked and a misfit is reported under
the layer's key at load, not at the first training forward. Buffers are replaced only when their
shape or dtype changes: wrappers that cache buffer references (DDP's buffer broadcast) stay valid.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .drop_cluster import LABEL_DTYPE, cluster_values_error

__all__ = ['ClusterMapState']


class ClusterMapState:
    """Mixin of ``DropClusterNd``: its ``cluster_map`` and ``cluster_counts`` buffers, checked as they
    are set or loaded, and their host copies ``max_clusters``, ``has_undropped``, ``draw_clusters``."""

    def _map_count_error(self, shape: Tuple[int, ...]) -> Optional[str]:
        """Why maps of ``shape`` ``(M, *spatial)`` do not fit this layer, or ``None`` if they do."""
        m = shape[0]
        if self.couple_channels:
            if m == 1:
                return None
            return (f'{m} maps of shape {tuple(shape)} do not fit this layer, which takes one map '
                    f'(its channels are coupled)')
        if self.num_channels is None or m in (1, self.num_channels):
            return None
        return (f'{m} maps of shape {tuple(shape)} do not fit this layer, which takes 1 map or '
                f'{self.num_channels} (one per channel of its {self.num_channels}-channel input)')

    def _note_counts(self, counts: Tensor, spatial: List[int], has_maps: bool) -> None:
        """The host copies of ``counts``; ``draw_clusters`` is as many as any re-clustering at this size
        makes, so that re-clustering does not change what a compiled graph draws."""
        known = counts.numel() > 0 and not counts.is_meta
        self.max_clusters = max(1, int(counts.max())) if known else 0
        self.has_undropped = bool((counts == 0).any()) if known else False
        self.draw_clusters = max(self.max_clusters, self.cluster_bound(spatial)) if has_maps else 0

    @torch.no_grad()
    def set_cluster_map(self, cluster_map: Tensor, undropped: Optional[Tensor] = None) -> None:
        """Install label maps ``(M, *spatial)``, M = 1 or the channel count (1 if coupled).

        ``undropped``: ``(M,)`` bool, maps to leave undropped; they are stored as one cluster with a
        count of 0.
        """
        if cluster_map.is_floating_point() or cluster_map.dim() != self.spatial_dims + 1:
            raise ValueError(f'cluster_map must hold integer labels of shape (M, *spatial) with '
                             f'{self.spatial_dims} spatial dims, got {cluster_map.dtype} {tuple(cluster_map.shape)}')
        if cluster_map.numel() == 0 or int(cluster_map.min()) < 0:
            raise ValueError('cluster_map must be non-empty with labels >= 0')
        error = self._map_count_error(tuple(cluster_map.shape))
        if error is not None:
            raise ValueError('cluster_map: ' + error)
        self.forget_original()  # a deep copy (an EMA) stops following its original's maps
        if undropped is not None:
            undropped = undropped.to(device=cluster_map.device, dtype=torch.bool)
            if undropped.shape != cluster_map.shape[:1]:
                raise ValueError(f'undropped must hold one flag per map ({cluster_map.shape[0]}), '
                                 f'got shape {tuple(undropped.shape)}')
            cluster_map = cluster_map.masked_fill(undropped.view([-1] + [1] * self.spatial_dims), 0)
        counts = cluster_map.flatten(1).amax(dim=1) + 1
        if undropped is not None:
            counts = counts.masked_fill(undropped, 0)
        device = self.cluster_map.device
        if self.cluster_map.shape == cluster_map.shape and self.cluster_map.dtype == LABEL_DTYPE \
                and self.cluster_counts.dtype == LABEL_DTYPE:
            self.cluster_map.copy_(cluster_map)
            self.cluster_counts.copy_(counts)
        else:
            # copy=True: never alias the caller's tensor (another model's buffer, say), which a later
            # in-place update would change too.
            self.cluster_map = cluster_map.to(device=device, dtype=LABEL_DTYPE, copy=True).contiguous()
            self.cluster_counts = counts.to(device=device, dtype=LABEL_DTYPE)
        self._note_counts(counts, list(cluster_map.shape[1:]), has_maps=True)

    def load_maps(self, state_dict: Dict[str, Any], prefix: str, error_msgs: List[str]) -> bool:
        """Check the maps of ``state_dict`` under ``prefix`` and make the buffers ready to take them
        (the module's default load then copies them in). False, with the reason in ``error_msgs``,
        when they do not fit; True when they do or are absent."""
        incoming = state_dict.get(prefix + 'cluster_map')
        counts = state_dict.get(prefix + 'cluster_counts')
        if incoming is None or counts is None:
            return True
        if incoming.dim() != self.spatial_dims + 1 or incoming.is_floating_point():
            error_msgs.append(f'{prefix}cluster_map: expected integer labels with {self.spatial_dims} spatial '
                              f'dims, got {incoming.dtype} {tuple(incoming.shape)}')
            return False
        # An empty map is the state of a layer not yet clustered.
        error = self._map_count_error(tuple(incoming.shape)) if incoming.numel() else None
        if error is not None:
            error_msgs.append(f'{prefix}cluster_map: {error}')
            return False
        if counts.dim() != 1 or counts.shape[0] != incoming.shape[0]:
            error_msgs.append(f'{prefix}cluster_counts: shape {tuple(counts.shape)} does not match the '
                              f'{incoming.shape[0]} maps of cluster_map {tuple(incoming.shape)}, '
                              f'expected one count per map')
            return False
        error = cluster_values_error(incoming, counts)
        if error is not None:  # the values must be what set_cluster_map makes
            error_msgs.append(f'{prefix}{error}')
            return False
        # Maps differ in shape between checkpoints (other resolutions, per-channel vs grid): adopt the
        # incoming shapes instead of failing on a size mismatch.
        device = self.cluster_map.device
        if self.cluster_map.shape != incoming.shape or self.cluster_map.dtype != incoming.dtype:
            self.cluster_map = torch.empty(incoming.shape, dtype=incoming.dtype, device=device)
        if self.cluster_counts.shape != counts.shape or self.cluster_counts.dtype != counts.dtype:
            self.cluster_counts = torch.empty(counts.shape, dtype=counts.dtype, device=device)
        self._note_counts(counts, list(incoming.shape[1:]), has_maps=incoming.numel() > 0)
        if counts.numel() > 0 and not counts.is_meta and not incoming.is_meta:
            # Maps from data (not a grid) are kept at the first training step.
            grid = self.grid_map(list(incoming.shape[1:]), incoming.device).to(incoming.dtype)
            self.clustered = self.steps > 0 or incoming.shape[0] != 1 or not torch.equal(incoming, grid)
        return True
