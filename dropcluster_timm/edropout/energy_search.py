""" Energy-based search over binary unit states (EDropout's energy model).

EDropout (Salehinejad & Valaee, https://arxiv.org/abs/2006.04270) keeps a small population of binary
state vectors (1: a unit is kept, 0: dropped), gives each the energy "loss of the network with that
state on the current batch", and evolves the population toward low energy; training uses the best
state, and the units it turns off at the end are pruned.

``EnergySearch`` is the population and its evolution, nothing else: it proposes states, takes their
energies and keeps the best. It knows no model (``dropcluster_timm.edropout.layers`` measures the
energies). Our evolution is binary differential evolution, the operator family of the paper (its
code is a NumPy proof of concept we did not copy):

* trial state of member ``j``: ``s_a XOR (flip AND (s_b XOR s_c))`` for three other members
  ``a, b, c``, where ``flip`` is Bernoulli(``mutation``), then a per-unit crossover with ``s_j`` at
  rate ``crossover`` (one unit always from the mutant, so a trial differs where it can);
* each member and its trial are scored on the same batch, and the trial replaces the member when its
  energy is strictly lower (paired comparison: the batch's difficulty cancels);
* every group of units (a layer) keeps at least one unit, so a pruned layer never has zero channels;
* the search has converged, and stops, once the best state has stayed the same for
  ``converge_steps`` evolution steps (the paper's early state convergence, 100 steps).

Every random draw comes from a generator seeded by ``(seed, step)`` on the CPU, so the search is
deterministic for a seed, identical on every process of a distributed run (given the same energies,
which ``edropout`` averages over processes) and resumes exactly from its ``state_dict``.
"""
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

__all__ = ['EnergySearch']


class EnergySearch:
    """A population of binary states over ``sum(group_sizes)`` units, evolved toward low energy.

    Args:
        group_sizes: units per group (e.g. channels per layer); each group keeps at least one unit.
        num_states: population size (the paper's candidates, 8); at least 4 for the mutation.
        keep_prob: probability that a unit is on in the initial population.
        converge_steps: evolution steps without a change of the best state after which the search
            stops (0: never).
        mutation: probability of each differing unit of ``s_b``, ``s_c`` flipping the base state.
        crossover: share of a trial's units taken from its mutant rather than its parent.
        seed: seed of every draw.
    """

    def __init__(self, group_sizes: Sequence[int], num_states: int = 8, keep_prob: float = 0.5,
                 converge_steps: int = 100, mutation: float = 0.5, crossover: float = 0.5, seed: int = 0):
        group_sizes = [int(g) for g in group_sizes]
        if not group_sizes or min(group_sizes) < 1:
            raise ValueError(f'group_sizes must be a non-empty list of positive unit counts, got {group_sizes}')
        if num_states < 4:
            raise ValueError(f'num_states must be >= 4 (the mutation mixes three other states), got {num_states}')
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f'keep_prob must be in (0, 1], got {keep_prob}')
        for name, value in (('mutation', mutation), ('crossover', crossover)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f'{name} must be in [0, 1], got {value}')
        if converge_steps < 0:
            raise ValueError(f'converge_steps must be >= 0, got {converge_steps}')
        self.group_sizes = group_sizes
        self.num_states = int(num_states)
        self.keep_prob = float(keep_prob)
        self.converge_steps = int(converge_steps)
        self.mutation = float(mutation)
        self.crossover = float(crossover)
        self.seed = int(seed)
        self.num_units = sum(group_sizes)
        self._group = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
        self.step = 0  # evolution steps done
        self.unchanged_steps = 0  # steps the best state has stayed the same
        self.converged = False
        g = self._generator(-1)
        self.population = self._fill_empty_groups(
            torch.rand(self.num_states, self.num_units, generator=g) < self.keep_prob, g)
        self.energies = torch.full((self.num_states,), float('inf'))
        self.best_state = self.population[0].clone()
        self._proposed = None  # (step, proposals): what update() scores, drawn once per step

    def _generator(self, step: int) -> torch.Generator:
        # One stream per (seed, step): resuming needs no generator state, and processes agree.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step + 1) % (2 ** 63))

    def _fill_empty_groups(self, states: Tensor, g: torch.Generator) -> Tensor:
        """Turn on one random unit of every group a state has switched off entirely."""
        kept = torch.zeros(states.shape[0], len(self.group_sizes), dtype=torch.long)
        kept.index_add_(1, self._group, states.long())
        rows, groups = torch.nonzero(kept == 0, as_tuple=True)
        if rows.numel():
            starts = torch.tensor([0] + self.group_sizes[:-1]).cumsum(0)
            sizes = torch.tensor(self.group_sizes)
            pick = starts[groups] + (torch.rand(rows.numel(), generator=g) * sizes[groups]).long()
            states = states.clone()
            states[rows, pick] = True
        return states

    def proposals(self) -> Tensor:
        """The states to score this step: ``(2 * num_states, num_units)`` bool, the population then
        each member's trial state. Deterministic for (seed, step)."""
        if self.converged:
            raise RuntimeError('the search has converged: use best_state')
        if self._proposed is not None and self._proposed[0] == self.step:
            return self._proposed[1]
        g = self._generator(self.step)
        s, d = self.num_states, self.num_units
        # a, b, c: three distinct members other than j (a random permutation of the others per j)
        others = torch.rand(s, s, generator=g)
        others.fill_diagonal_(2.0)
        abc = others.argsort(dim=1)[:, :3]
        pa, pb, pc = (self.population[abc[:, i]] for i in range(3))
        flip = torch.rand(s, d, generator=g) < self.mutation
        mutant = pa ^ (flip & (pb ^ pc))
        take = torch.rand(s, d, generator=g) < self.crossover
        take[torch.arange(s), torch.randint(d, (s,), generator=g)] = True
        trials = self._fill_empty_groups(torch.where(take, mutant, self.population), g)
        self._proposed = (self.step, torch.cat([self.population, trials]))
        return self._proposed[1]

    def update(self, energies: Tensor) -> Tensor:
        """Take the energies of ``proposals()`` (same order) and evolve; returns the best state.

        A trial replaces its member when strictly lower; the best member is the lowest (first on
        ties). Non-finite energies (a diverged forward) lose every comparison."""
        energies = torch.as_tensor(energies, dtype=torch.float64).detach().cpu().flatten()
        if energies.numel() != 2 * self.num_states:
            raise ValueError(f'expected {2 * self.num_states} energies (population, then trials), '
                             f'got {energies.numel()}')
        energies = torch.where(torch.isfinite(energies), energies, torch.full_like(energies, float('inf')))
        proposals = self.proposals()
        parent, trial = energies[:self.num_states], energies[self.num_states:]
        better = trial < parent
        self.population = torch.where(better[:, None], proposals[self.num_states:], proposals[:self.num_states])
        self.energies = torch.where(better, trial, parent).float()
        best = self.population[int(torch.argmin(self.energies))].clone()
        # before the first step the best state is only the first draw, not a scored one
        same = self.step > 0 and torch.equal(best, self.best_state)
        self.unchanged_steps = self.unchanged_steps + 1 if same else 0
        self.best_state = best
        self.step += 1
        if self.converge_steps and self.unchanged_steps >= self.converge_steps:
            self.converged = True
        return self.best_state

    def group_states(self, state: Optional[Tensor] = None) -> list:
        """``state`` (default: the best) split into the groups' pieces."""
        state = self.best_state if state is None else state
        return list(torch.split(state, self.group_sizes))

    def kept_fraction(self) -> float:
        """Share of units the best state keeps."""
        return float(self.best_state.float().mean())

    def state_dict(self) -> Dict[str, Any]:
        return {
            'group_sizes': list(self.group_sizes), 'num_states': self.num_states, 'seed': self.seed,
            'step': self.step, 'unchanged_steps': self.unchanged_steps, 'converged': self.converged,
            'population': self.population.clone(), 'energies': self.energies.clone(),
            'best_state': self.best_state.clone(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if list(state['group_sizes']) != self.group_sizes or int(state['num_states']) != self.num_states:
            raise ValueError(f'checkpoint of a search over groups {list(state["group_sizes"])} with '
                             f'{state["num_states"]} states; this one has {self.group_sizes} and {self.num_states}')
        self.seed = int(state['seed'])
        self.step = int(state['step'])
        self.unchanged_steps = int(state['unchanged_steps'])
        self.converged = bool(state['converged'])
        self.population = state['population'].to(torch.bool).cpu().clone()
        self.energies = state['energies'].float().cpu().clone()
        self.best_state = state['best_state'].to(torch.bool).cpu().clone()
        self._proposed = None

    def __repr__(self) -> str:
        return (f'EnergySearch(units={self.num_units}, groups={len(self.group_sizes)}, states={self.num_states}, '
                f'step={self.step}, kept={self.kept_fraction():.3f}, converged={self.converged})')
