""" Optional methods join training through hooks: the loop and the trainer call every hook at a few
points and carry no branch of their own for any method."""
import importlib
from typing import Any, Callable, Dict, List, Tuple

import torch.nn as nn

from ..hub.run_results import RunResults
from .config import TrainConfig

__all__ = ['TrainHook', 'build_hooks', 'register_hook', 'HOOK_MODULES']


class TrainHook:
    """A method that joins training. Every point does nothing here; a method overrides those it needs."""

    def run_state(self) -> Dict[str, Any]:
        """Objects with ``state_dict`` / ``load_state_dict`` saved in every checkpoint as run state."""
        return {}

    def after_resume(self, model: nn.Module) -> None:
        """After a checkpoint's weights and run state are loaded."""

    def before_step(self, accelerator, model: nn.Module, images, targets, loss_fn, state) -> None:
        """Before each training step (after mixup), on the unwrapped model."""

    def after_eval(self, evaluate: Callable[[nn.Module], Dict[str, float]], model: nn.Module) -> Dict[str, Any]:
        """Entries for the epoch's row after an evaluation; ``model`` holds the weights to publish."""
        return {}

    def publish(self, model: nn.Module, row: Dict[str, Any], results: RunResults) -> Tuple[nn.Module, RunResults]:
        """The model to save in place of ``model`` after an evaluation (``row``), and its results."""
        return model, results


# The optional methods: the config section that switches one on, and the module that registers its
# hook when imported. Only a method that is switched on is imported, so training without it never
# loads its package (nor the models that package registers).
HOOK_MODULES = {'edropout': 'dropcluster_timm.edropout.hook'}
_HOOKS: Dict[str, Callable[[TrainConfig, nn.Module], TrainHook]] = {}


def register_hook(name: str, factory: Callable[[TrainConfig, nn.Module], TrainHook]) -> None:
    """Make ``factory(cfg, model)`` the hook of the method whose config section is ``name``."""
    _HOOKS[name] = factory


def build_hooks(cfg: TrainConfig, model: nn.Module) -> List[TrainHook]:
    """The hooks of the optional methods ``cfg`` switches on, set up on ``model`` before training."""
    hooks: List[TrainHook] = []
    for name, module in HOOK_MODULES.items():
        if getattr(cfg, name).enabled:
            if name not in _HOOKS:
                importlib.import_module(module)  # registers the hook
            hooks.append(_HOOKS[name](cfg, model))
    return hooks
