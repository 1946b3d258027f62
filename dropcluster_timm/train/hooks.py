""" Optional methods join training through hooks: the loop and the trainer call every hook at a few
points and carry no branch of their own for any method."""
from typing import Any, Callable, Dict, List, Tuple

import torch.nn as nn

from ..hub.run_results import RunResults
from .config import TrainConfig

__all__ = ['TrainHook', 'build_hooks']


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


def build_hooks(cfg: TrainConfig, model: nn.Module) -> List[TrainHook]:
    """The hooks of the optional methods ``cfg`` switches on, set up on ``model`` before training."""
    hooks: List[TrainHook] = []
    if cfg.edropout.enabled:
        from ..edropout.hook import EDropoutHook  # the opt-in part is imported only when used
        hooks.append(EDropoutHook(cfg, model))
    return hooks
