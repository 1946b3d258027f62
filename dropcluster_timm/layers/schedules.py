""" DropCluster drop-rate schedule: start late, ramp up, re-cluster every few epochs.

The reference recipe (DropCluster, arXiv 2002.02997): no dropping until epoch ``start_epoch``, then
the rate rises from 0 to ``target`` over ``warmup_epochs`` epochs, updated every batch; the clusters
are re-computed every ``update_freq`` epochs from a no-grad forward over training data.

Shapes of the ramp: ``linear``, ``cosine`` and ``step`` rise from 0 to the target over the warm-up;
``exponential`` and ``multistep`` are the reference implementation's multiplicative shapes turned into
ramps that end at the target: the rate is ``target * gamma ** j``, ``j`` the warm-up epochs still to
come (``exponential``) or the ``milestones`` not yet reached (``multistep``).
"""
import math
from typing import Any, Dict, List, Optional, Sequence

__all__ = ['DropClusterSchedule', 'SCHEDULE_SHAPES']

SCHEDULE_SHAPES = ('linear', 'cosine', 'step', 'exponential', 'multistep')


class DropClusterSchedule:
    """Drop rate as a function of the (fractional) epoch, stepped once per batch.

    Args:
        target: the rate reached after warmup, in [0, 1).
        start_epoch: first epoch with a non-zero rate (and the first re-clustering).
        warmup_epochs: epochs over which the rate ramps from 0 to ``target``; 0 jumps straight there.
        shape: ``'linear'``, ``'cosine'`` (half-cosine ease-in/out) or ``'step'`` (a staircase that
            rises at the start of each warmup epoch: ``target / warmup_epochs`` at ``start_epoch``,
            ``target`` from ``start_epoch + warmup_epochs - 1`` on), ``'exponential'`` (the rate is
            multiplied by ``1 / gamma`` at the start of each warmup epoch: ``target * gamma ** j`` with
            ``j`` the warmup epochs still to come) or ``'multistep'`` (from ``start_epoch`` on,
            ``target * gamma ** j`` with ``j`` the ``milestones`` not yet reached; no warmup).
        update_freq: re-cluster at epochs ``start_epoch + k * update_freq`` (k >= 0); 0 never
            re-clusters (the layers keep their grid maps).
        steps_per_epoch: batches per epoch, for ``step()`` without an argument.
        gamma: the factor of ``'exponential'`` and ``'multistep'``, in (0, 1].
        milestones: the epochs at which ``'multistep'`` multiplies the rate by ``1 / gamma``.

    The state (``state_dict``) is the position: the fractional epoch of the last step and the rate.
    """

    def __init__(
            self,
            target: float = 0.1,
            start_epoch: float = 20,
            warmup_epochs: float = 10,
            shape: str = 'linear',
            update_freq: int = 10,
            steps_per_epoch: int = 1,
            gamma: float = 0.5,
            milestones: Sequence[float] = (),
    ):
        if not 0.0 <= target < 1.0:
            raise ValueError(f'drop rate target must be in [0, 1), got {target}')
        if start_epoch < 0 or warmup_epochs < 0:
            raise ValueError(f'start_epoch and warmup_epochs must be >= 0, got {start_epoch}, {warmup_epochs}')
        if shape not in SCHEDULE_SHAPES:
            raise ValueError(f'unknown schedule shape {shape!r}, expected one of {SCHEDULE_SHAPES}')
        if update_freq < 0:
            raise ValueError(f'update_freq must be >= 0, got {update_freq}')
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f'gamma must be in (0, 1], got {gamma}')
        milestones = sorted(float(m) for m in milestones)
        if shape == 'multistep' and not milestones:
            raise ValueError("shape 'multistep' needs milestones (the epochs where the rate rises)")
        if steps_per_epoch < 1:
            raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}')
        self.target = float(target)
        self.start_epoch = float(start_epoch)
        self.warmup_epochs = float(warmup_epochs)
        self.shape = shape
        self.update_freq = int(update_freq)
        self.steps_per_epoch = int(steps_per_epoch)
        self.gamma = float(gamma)
        self.milestones = milestones
        self.epoch = 0.0  # fractional epoch of the last step
        self.num_steps = 0  # batches stepped
        self.rate = self.rate_at(0.0)

    def rate_at(self, epoch: float) -> float:
        """The drop rate at fractional epoch ``epoch`` (epoch 3.5: half-way through the 4th epoch)."""
        if self.target == 0.0 or epoch < self.start_epoch:
            return 0.0
        if self.shape == 'multistep':
            return self.target * self.gamma ** sum(1 for m in self.milestones if epoch < m)
        if self.warmup_epochs == 0:
            return self.target
        if self.shape == 'exponential':
            ahead = math.ceil(self.warmup_epochs) - 1 - math.floor(epoch - self.start_epoch)
            return self.target * self.gamma ** max(ahead, 0)
        progress = (epoch - self.start_epoch) / self.warmup_epochs
        if self.shape == 'step':
            progress = math.floor(epoch - self.start_epoch + 1) / self.warmup_epochs
        progress = min(max(progress, 0.0), 1.0)
        if self.shape == 'cosine':
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.target * progress

    def step(self, epoch: Optional[float] = None) -> float:
        """Advance to fractional ``epoch`` (default: one batch on) and return the new rate."""
        if epoch is None:
            self.num_steps += 1
            self.epoch = self.num_steps / self.steps_per_epoch  # no drift from summing fractions
        else:
            self.epoch = float(epoch)
            self.num_steps = int(round(self.epoch * self.steps_per_epoch))
        self.rate = self.rate_at(self.epoch)
        return self.rate

    def is_update_epoch(self, epoch: int) -> bool:
        """Whether the clusters are re-computed at the start of (integer) ``epoch``."""
        if self.target == 0.0 or self.update_freq == 0 or epoch < self.start_epoch:
            return False
        return (epoch - math.ceil(self.start_epoch)) % self.update_freq == 0

    def peak_rate(self, num_epochs: int) -> float:
        """The highest rate a run of ``num_epochs`` epochs reaches, stepped once per batch.

        Every shape rises monotonically, so that is the rate of the last batch.
        """
        if num_epochs <= 0:
            return 0.0
        return self.rate_at(num_epochs - 1 + (self.steps_per_epoch - 1) / self.steps_per_epoch)

    def update_epochs(self, num_epochs: int) -> List[int]:
        """The epochs of a ``num_epochs``-epoch run that start with a re-clustering."""
        return [e for e in range(num_epochs) if self.is_update_epoch(e)]

    def state_dict(self) -> Dict[str, Any]:
        return {
            'target': self.target, 'start_epoch': self.start_epoch, 'warmup_epochs': self.warmup_epochs,
            'shape': self.shape, 'update_freq': self.update_freq, 'steps_per_epoch': self.steps_per_epoch,
            'gamma': self.gamma, 'milestones': list(self.milestones),
            'epoch': self.epoch, 'num_steps': self.num_steps, 'rate': self.rate,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        for key, value in state_dict.items():
            if not hasattr(self, key):
                raise KeyError(f'unexpected DropClusterSchedule state {key!r}')
            setattr(self, key, value)

    def __repr__(self) -> str:
        return (f'DropClusterSchedule(target={self.target}, start_epoch={self.start_epoch}, '
                f'warmup_epochs={self.warmup_epochs}, shape={self.shape!r}, update_freq={self.update_freq}, '
                f'epoch={self.epoch:.3f}, rate={self.rate:.4f})')
