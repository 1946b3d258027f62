""" The DropCluster recipe of a run: the drop-rate ramp stepped every batch, periodic re-clustering
and BRB soft resets, in one place, so that ``train_timm.py`` and the studies train the same thing.

    recipe = DropClusterRecipe(cfg.resolved().dropcluster, steps_per_epoch, seed=cfg.optim.seed)
    for epoch in range(epochs):
        recipe.begin_epoch(epoch, model, optimizer, recluster=lambda seed: update_clusters(model, images(seed)))
        for i, batch in enumerate(loader):
            recipe.step(model, epoch + i / len(loader))
            ...  # forward, backward, optimizer step

Order at the start of an epoch: a soft reset when one is due, then re-clustering when the schedule
says so or right after a soft reset (the activations changed). Both are seeded from ``(seed, epoch)``,
so every process of a distributed run does the same.
"""
import math
from functools import partial
from typing import Callable, Dict, List, Optional

import torch.nn as nn

from ..errors import InputError
from ..layers.model_helpers import set_drop_prob
from ..layers.schedules import DropClusterSchedule
from .sections import DropClusterConfig
from .soft_reset import soft_reset

__all__ = ['DropClusterRecipe', 'make_schedule', 'schedule_warnings']


def make_schedule(cfg: DropClusterConfig, steps_per_epoch: int, target: Optional[float] = None) -> DropClusterSchedule:
    """The drop-rate ramp; ``target`` replaces ``--drop-cluster`` (a DropBlock baseline's rate).
    ``cfg`` gives its start, warm-up and re-clustering interval (``cfg.resolved(epochs)`` fills in the
    unset ones as ``train`` does)."""
    unset = [name for name in ('start_epoch', 'warmup_epochs', 'update_freq') if getattr(cfg, name) is None]
    if unset:
        raise InputError(f'DropClusterConfig.{unset[0]} is None (a share of the epochs): give it, or use '
                            'cfg.resolved(epochs)')
    return DropClusterSchedule(
        target=cfg.rate if target is None else target,
        start_epoch=cfg.start_epoch,
        warmup_epochs=cfg.warmup_epochs,
        shape=cfg.shape,
        update_freq=cfg.update_freq,
        gamma=cfg.gamma,
        milestones=cfg.milestones,
        steps_per_epoch=steps_per_epoch,
    )


def schedule_warnings(schedule: DropClusterSchedule, num_epochs: int) -> List[str]:
    """What a run of ``num_epochs`` epochs with ``schedule`` will not do that a user may expect."""
    if schedule.target == 0.0:
        return ['--drop-cluster is 0: the DropCluster layers stay off for the whole run']
    warnings = []
    peak = schedule.peak_rate(num_epochs)
    if peak == 0.0:
        warnings.append(f'DropCluster never switches on: the rate stays 0 for all {num_epochs} epochs '
                        f'(--drop-cluster-start {schedule.start_epoch:g} >= --epochs {num_epochs})')
    elif peak < schedule.target - 1e-12:
        warnings.append(f'the drop rate reaches only {peak:.4f} of --drop-cluster {schedule.target:g} by the last '
                        f'epoch (--drop-cluster-start {schedule.start_epoch:g} + --drop-cluster-warmup '
                        f'{schedule.warmup_epochs:g} > --epochs {num_epochs})')
    if peak > 0.0 and not schedule.update_epochs(num_epochs):
        when = ('--drop-cluster-update-freq is 0' if schedule.update_freq == 0 else
                f're-clustering starts epochs from {math.ceil(schedule.start_epoch)} (--drop-cluster-start '
                f'{schedule.start_epoch:g}, rounded up) and the run has {num_epochs}')
        warnings.append(f'the clusters are never re-computed ({when}): the layers keep their grid maps')
    return warnings


class DropClusterRecipe:
    """What DropCluster adds to a training loop, driven by a ``DropClusterConfig``.

    Args:
        cfg: the ramp, re-clustering and soft-reset settings.
        steps_per_epoch: batches per epoch.
        seed: the run's seed; soft resets and re-clustering use ``seed * 1000 + epoch``.
        target: the rate to ramp to instead of ``cfg.rate`` (a DropBlock baseline's rate).
        clustered: whether the model has DropCluster layers to re-cluster.
        set_rate: puts a rate into the model's layers (default: ``set_drop_prob`` on DropCluster
            layers, and on timm's DropBlock layers too with ``drop_block=True``).
        drop_block: see ``set_rate``.

    The position lives in ``schedule`` (checkpoint it with the run).
    """

    def __init__(
            self,
            cfg: DropClusterConfig,
            steps_per_epoch: int,
            seed: int = 0,
            target: Optional[float] = None,
            clustered: bool = True,
            set_rate: Optional[Callable[[nn.Module, float], object]] = None,
            drop_block: bool = False,
    ):
        self.cfg = cfg
        self.schedule = make_schedule(cfg, steps_per_epoch, target)
        self.seed = int(seed)
        self.clustered = clustered
        self.set_rate = set_rate or partial(set_drop_prob, drop_block=drop_block)

    def epoch_seed(self, epoch: int) -> int:
        return self.seed * 1000 + epoch

    def soft_reset_due(self, epoch: int) -> bool:
        interval = self.cfg.soft_reset_interval
        return bool(interval) and epoch > 0 and epoch % interval == 0

    def begin_epoch(self, epoch: int, model: nn.Module, optimizer, recluster: Callable[[int], None],
                    resuming: bool = False) -> Dict[str, bool]:
        """At the start of ``epoch``: soft reset ``model`` (and forget ``optimizer``'s state of the
        reset weights) when due, then ``recluster(seed)`` when due. Nothing when ``resuming`` inside
        the epoch (it was done before the interruption). Returns ``{'soft_reset', 'reclustered'}``."""
        if resuming:
            return {'soft_reset': False, 'reclustered': False}
        reset = self.soft_reset_due(epoch)
        if reset:
            soft_reset(model, optimizer, self.cfg.soft_reset_factor, self.cfg.soft_reset_scope,
                       seed=self.epoch_seed(epoch))
        reclustered = self.clustered and (self.schedule.is_update_epoch(epoch) or reset)
        if reclustered:
            recluster(self.epoch_seed(epoch))
        return {'soft_reset': reset, 'reclustered': reclustered}

    def step(self, model: nn.Module, epoch: float) -> float:
        """Advance the ramp to fractional ``epoch``, put the rate into ``model``'s layers, return it."""
        rate = self.schedule.step(epoch)
        self.set_rate(model, rate)
        return rate

    def __repr__(self) -> str:
        return f'DropClusterRecipe({self.schedule}, soft_reset_interval={self.cfg.soft_reset_interval})'
