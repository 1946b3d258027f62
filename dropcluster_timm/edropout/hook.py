""" EDropout in training: the energy search evolves every few batches, the published model is the
pruned one (per-channel states), and the search is saved with every checkpoint."""
from typing import Any, Callable, Dict, Tuple

import torch.nn as nn

from ..errors import InputError, first_line
from ..hub.run_results import RunResults
from ..train.config import TrainConfig
from ..train.hooks import TrainHook, register_hook
from .layers import add_edropout, edropout_step, make_search, set_edropout_state
from .prune import prune_channels

__all__ = ['EDropoutHook']


class EDropoutHook(TrainHook):
    """EDropout layers in ``model``'s drop_block slots and their energy search; checks before any
    training that the trained model can be pruned and saved."""

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        ed = cfg.edropout
        try:
            add_edropout(model, ed.stages, unit=ed.unit)
            self.search = make_search(model, num_states=ed.candidates, keep_prob=ed.keep_prob,
                                      converge_steps=ed.converge_steps, seed=cfg.optim.seed)
            if ed.unit == 'channel':
                prune_channels(model)
        except ValueError as e:
            raise InputError(f'--edropout with {cfg.model.name}: {first_line(e)}') from e
        self.pruning = ed.unit == 'channel'
        self.interval = ed.interval
        self.images = ed.images_per_state(cfg.optim.batch_size)
        self._pruned = None

    def __str__(self) -> str:
        return f'EDropout: {self.search}'

    def run_state(self) -> Dict[str, Any]:
        return {'search': self.search}

    def after_resume(self, model: nn.Module) -> None:
        set_edropout_state(model, self.search.best_state)  # per-cluster states are not in the weights

    def before_step(self, accelerator, model, images, targets, loss_fn, state) -> None:
        if not self.search.converged and state.global_step % self.interval == 0:
            with accelerator.autocast():
                edropout_step(model, self.search, images[:self.images], targets[:self.images], loss_fn)

    def after_eval(self, evaluate: Callable[[nn.Module], Dict[str, float]], model: nn.Module) -> Dict[str, Any]:
        row = {}
        if self.pruning:  # the published model is the pruned one: evaluate it too
            self._pruned = prune_channels(model)
            row.update({'pruned_' + k: v for k, v in evaluate(self._pruned).items()})
        row.update(edropout_kept=self.search.kept_fraction(), edropout_converged=self.search.converged)
        return row

    def publish(self, model: nn.Module, row: Dict[str, Any], results: RunResults) -> Tuple[nn.Module, RunResults]:
        if not self.pruning:
            return model, results
        return self._pruned, results.replace(
            pruned_from=model.pretrained_cfg['architecture'], pruning_method='edropout',
            top1_before_pruning=results.top1, top1=row['pruned_top1'], top5=row['pruned_top5'],
            eval_loss=row['pruned_eval_loss'], kept_channels=self.search.kept_fraction(),
            edropout_steps=self.search.step)


register_hook('edropout', EDropoutHook)
