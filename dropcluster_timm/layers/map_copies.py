""" Deep copies of a DropCluster layer read as their original's maps until they get maps of their own.

timm's ``ModelEmaV3`` (``--model-ema`` of timm's train.py) deep-copies the model before training and
after every step copies each integer entry of the model's ``state_dict()`` into its copy's in place,
which needs equal shapes. A layer's maps change shape when it first clusters at the training
resolution (a grid made for 224 px becomes a map at 128 px, one map becomes one per channel), so a copy
that still holds the maps it was made with reports its original's maps, as copies, whenever its state
is read: the EMA update writes into those copies, a saved EMA carries the original's maps, and reading
the state changes nothing. A copy that clusters, is given maps (``set_cluster_map``) or loads a state
dict keeps its own maps from then on.
"""
import copy
import weakref
from typing import Any, Dict, Optional

__all__ = ['FollowsOriginalMaps']


class FollowsOriginalMaps:
    """Mixin of ``DropClusterNd``: deep copies report the original's maps (see the module)."""

    def __deepcopy__(self, memo: Dict[int, Any]):
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            if key != '_original':
                copied.__dict__[key] = copy.deepcopy(value, memo)
        copied.__dict__['_original'] = weakref.ref(self)  # never keeps the original alive
        return copied

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop('_original', None)  # a weak reference does not pickle
        return state

    def original(self) -> Optional[Any]:
        """The layer this one was deep-copied from while it follows it, else None."""
        ref = self.__dict__.get('_original')
        return ref() if ref is not None else None

    def forget_original(self) -> None:
        """Stop following: the layer's maps are its own from now on."""
        self.__dict__.pop('_original', None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        original = self.original()
        if original is None or original.cluster_map.shape == self.cluster_map.shape:
            return
        device = self.cluster_map.device
        for name in ('cluster_map', 'cluster_counts'):
            destination[prefix + name] = getattr(original, name).detach().to(device=device, copy=True)
