""" The study's choice rules, in code: the regime (where the positive control helps) and each arm's rate."""
from typing import Dict, List, Optional, Sequence

from .stats import paired_difference

__all__ = ['choose_regime', 'choose_rate', 'rows_of']


def rows_of(rows: List[Dict], **match) -> List[Dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def choose_regime(rows: List[Dict], regimes: Sequence[str], seeds: Sequence[int]) -> Optional[str]:
    """The regime where Cutout gains most over no regularisation in validation top-1, paired by seed,
    among those where the 95% interval of the gain lies above 0. ``None`` until every regime has
    every seed of both arms, or when the positive control helps nowhere (then no regulariser can be
    shown to help either, and the study says so instead of tuning)."""
    best, best_gain = None, None
    for regime in regimes:
        runs = {arm: {r['seed']: r['val_top1'] for r in rows_of(rows, phase='regime', regime=regime, arm=arm)}
                for arm in ('none', 'cutout')}
        if any(set(seeds) - set(runs[arm]) for arm in runs):
            return None
        diff = paired_difference(runs['cutout'], runs['none'])
        if diff['ci_low'] > 0 and (best_gain is None or diff['mean'] > best_gain):
            best, best_gain = regime, diff['mean']
    return best


def choose_rate(rows: List[Dict], arm: str, regime: str, rates: Sequence[float],
                seeds: Sequence[int]) -> Optional[float]:
    """The grid rate with the best mean validation top-1 over the tuning seeds (ties: the smaller
    rate); ``None`` until every (rate, seed) run exists."""
    means = {}
    for rate in rates:
        vals = {r['seed']: r['val_top1'] for r in rows_of(rows, phase='tune', regime=regime, arm=arm)
                if abs(r['rate'] - rate) < 1e-9}
        if set(seeds) - set(vals):
            return None
        means[rate] = sum(vals[s] for s in seeds) / len(seeds)
    return max(sorted(rates), key=lambda rate: (means[rate], -rate))
