""" Deep copies of a DropCluster layer follow their original's maps until they get maps of their own.

timm's ``ModelEmaV3`` (``--model-ema`` of timm's train.py) deep-copies the model before training and
after every step copies each integer buffer of the model into its copy in place, which needs equal
shapes. A layer's maps change shape when it first clusters at the training resolution (a grid made for
224 px becomes a map at 128 px, one map becomes one per channel), so a copy that still holds the maps it
was made with takes its original's shape whenever its state is read (``state_dict``, which the EMA
update calls). A copy that clusters, is given maps (``set_cluster_map``) or loads a state dict keeps
its own maps from then on.
"""
import copy
import weakref
from typing import Any, Dict

__all__ = ['FollowsOriginalMaps']

# copy -> weak reference to the layer it was deep-copied from; neither is kept alive by this table.
_ORIGINALS: 'weakref.WeakKeyDictionary[Any, weakref.ref]' = weakref.WeakKeyDictionary()


class FollowsOriginalMaps:
    """Mixin of ``DropClusterNd``: deep copies follow the original's map shape (see the module)."""

    def __deepcopy__(self, memo: Dict[int, Any]):
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = copy.deepcopy(value, memo)
        _ORIGINALS[copied] = weakref.ref(self)
        return copied

    def forget_original(self) -> None:
        """Stop following: the layer's maps are its own from now on."""
        _ORIGINALS.pop(self, None)

    def follow_original(self) -> None:
        """Take the original's maps when their shape differs from this copy's."""
        ref = _ORIGINALS.get(self)
        original = ref() if ref is not None else None
        if original is None or original.cluster_map.shape == self.cluster_map.shape:
            return
        device = self.cluster_map.device
        self.cluster_map = original.cluster_map.detach().to(device=device, copy=True)
        self.cluster_counts = original.cluster_counts.detach().to(device=device, copy=True)
        for name in ('max_clusters', 'has_undropped', 'clustered', 'num_channels'):
            setattr(self, name, getattr(original, name))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.follow_original()
        super()._save_to_state_dict(destination, prefix, keep_vars)
