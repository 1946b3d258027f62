""" The study's statistics, from scipy and statsmodels: paired differences by seed with t intervals,
Holm's correction over the primary family, and paired equivalence tests (TOST).

Runs are paired by seed across arms (same subset, batches, augmentation and initial weights), so every
comparison works on the per-seed differences: the seed-to-seed variation cancels out.
"""
import math
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import DescrStatsW, ttost_paired

__all__ = ['mean_std', 'paired_difference', 'holm', 'tost']

_NAN = float('nan')


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); std nan for one value, (nan, nan) for none."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return _NAN, _NAN
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else _NAN


def _pairs(a: Mapping[int, float], b: Mapping[int, float]) -> Tuple[List[int], np.ndarray, np.ndarray]:
    seeds = sorted(set(a) & set(b))
    return seeds, np.asarray([a[s] for s in seeds], dtype=np.float64), np.asarray([b[s] for s in seeds], dtype=np.float64)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], alpha: float = 0.05) -> Dict:
    """Mean of ``a[seed] - b[seed]`` over the seeds in both, its ``1 - alpha`` t interval and the
    two-sided paired t-test: ``{n, seeds, mean, std, ci_low, ci_high, t, p}`` (nan where undefined:
    fewer than two pairs, or differences without spread)."""
    seeds, x, y = _pairs(a, b)
    out = dict(n=len(seeds), seeds=seeds, mean=_NAN, std=_NAN, ci_low=_NAN, ci_high=_NAN, t=_NAN, p=_NAN)
    if not seeds:
        return out
    d = DescrStatsW(x - y)
    out['mean'] = float(d.mean)
    if len(seeds) < 2 or d.std == 0:
        return out
    low, high = d.tconfint_mean(alpha=alpha)
    t, p, _ = d.ttest_mean(0.0)
    out.update(std=float(np.std(x - y, ddof=1)), ci_low=float(low), ci_high=float(high),
               t=float(t), p=float(p))
    return out


def holm(pvalues: Mapping[str, float], alpha: float = 0.05) -> Dict[str, float]:
    """Holm-adjusted p-values of a family, same keys; untestable (nan) members stay nan and are not
    counted in the family."""
    keys = [k for k, p in pvalues.items() if not math.isnan(p)]
    out = {k: _NAN for k in pvalues}
    if keys:
        _, adjusted, _, _ = multipletests([pvalues[k] for k in keys], alpha=alpha, method='holm')
        out.update({k: float(p) for k, p in zip(keys, adjusted)})
    return out


def tost(a: Mapping[int, float], b: Mapping[int, float], margin: float, alpha: float = 0.05) -> Dict:
    """Paired equivalence of ``a`` and ``b`` within +-``margin`` (two one-sided t-tests):
    ``{n, margin, p, equivalent}``; equivalence holds exactly when the ``1 - 2 alpha`` interval of
    the mean difference lies inside (-margin, margin)."""
    seeds, x, y = _pairs(a, b)
    out = dict(n=len(seeds), margin=margin, p=_NAN, equivalent=False)
    if len(seeds) < 2 or np.std(x - y) == 0:
        return out
    p, _, _ = ttost_paired(x, y, -margin, margin)
    out.update(p=float(p), equivalent=bool(p < alpha))
    return out
