""" The study's statistics: paired differences by seed, Holm's correction and equivalence tests (TOST).

Runs are paired by seed across arms (same data, order, augmentation and initial weights), so every
comparison works on the per-seed differences: seed-to-seed variation, which is usually larger than
the effects studied, cancels out.
"""
import math
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np
from scipy import stats as _st

__all__ = ['mean_std', 'mean_ci', 'paired_difference', 'holm', 'tost']

_NAN = float('nan')


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); std 0.0 for one value, (nan, nan) for none."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return _NAN, _NAN
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float, float]:
    """Mean and its t interval (low, high); the interval is nan with fewer than two values."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return _NAN, _NAN, _NAN
    mean = float(x.mean())
    if x.size < 2:
        return mean, _NAN, _NAN
    half = float(_st.t.ppf(0.5 + confidence / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def _differences(a: Mapping[int, float], b: Mapping[int, float]) -> Tuple[list, np.ndarray]:
    """The seeds present in both and ``a[seed] - b[seed]`` for each, in seed order."""
    seeds = sorted(set(a) & set(b))
    return seeds, np.asarray([a[s] - b[s] for s in seeds], dtype=np.float64)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> Dict:
    """Mean of ``a - b`` over the seeds in both, with a t interval and a two-sided paired t-test.

    Returns n, mean, std (of the differences), ci_low, ci_high, t, p and seeds. With fewer than two
    pairs there is no variance estimate: the interval, t and p are nan. When every difference is the
    same the variance is zero: identical pairs give t = nan, p = 1.0 (no evidence of a difference);
    a constant non-zero shift gives t = +-inf, p = 0.0 and an interval of width zero.
    """
    seeds, d = _differences(a, b)
    n = len(d)
    out = dict(n=n, mean=_NAN, std=_NAN, ci_low=_NAN, ci_high=_NAN, t=_NAN, p=_NAN, seeds=seeds)
    if n == 0:
        return out
    mean = float(d.mean())
    out['mean'] = mean
    if n < 2:
        out['std'] = 0.0
        return out
    std = float(d.std(ddof=1))
    out['std'] = std
    if std == 0.0:
        out.update(ci_low=mean, ci_high=mean)
        if mean == 0.0:
            out.update(t=_NAN, p=1.0)
        else:
            out.update(t=math.copysign(math.inf, mean), p=0.0)
        return out
    se = std / math.sqrt(n)
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * se
    t = mean / se
    out.update(ci_low=mean - half, ci_high=mean + half, t=t, p=float(2 * _st.t.sf(abs(t), n - 1)))
    return out


def holm(pvalues: Mapping[str, float]) -> Dict[str, float]:
    """Holm-Bonferroni adjusted p-values, same keys: the i-th smallest of m p-values is multiplied by
    m - i + 1, made non-decreasing in rank order and capped at 1. nan values pass through and do not
    count towards m (a comparison that could not be tested is not part of the family)."""
    finite = sorted(((p, k) for k, p in pvalues.items() if not math.isnan(p)), key=lambda pk: pk[0])
    m = len(finite)
    out = {k: _NAN for k, p in pvalues.items() if math.isnan(p)}
    running = 0.0
    for i, (p, k) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))  # step-down: never below an earlier, smaller rank
        out[k] = running
    return {k: out[k] for k in pvalues}


def tost(a: Mapping[int, float], b: Mapping[int, float], margin: float = 0.5, alpha: float = 0.05) -> Dict:
    """Paired two one-sided tests for equivalence of ``a`` and ``b`` within +-``margin``.

    H0: mean(a - b) <= -margin or >= +margin. Returns n, mean, margin, p_lower (H0: mean <= -margin),
    p_upper (H0: mean >= margin), p (the larger), equivalent (p < alpha) and the (1 - 2 alpha)
    interval ci_low, ci_high (90% for alpha 0.05): equivalence holds exactly when that interval lies
    inside (-margin, margin). Fewer than two pairs: p nan, not equivalent.
    """
    seeds, d = _differences(a, b)
    n = len(d)
    pd = paired_difference(a, b, confidence=1 - 2 * alpha)
    out = dict(n=n, mean=pd['mean'], margin=margin, ci_low=pd['ci_low'], ci_high=pd['ci_high'],
               p_lower=_NAN, p_upper=_NAN, p=_NAN, equivalent=False)
    if n < 2:
        return out
    std = float(d.std(ddof=1))
    mean = float(d.mean())
    if std == 0.0:  # no noise: each one-sided null is rejected outright or not at all
        p_lower, p_upper = float(mean <= -margin), float(mean >= margin)
    else:
        se = std / math.sqrt(n)
        p_lower = float(_st.t.sf((mean + margin) / se, n - 1))
        p_upper = float(_st.t.cdf((mean - margin) / se, n - 1))
    p = max(p_lower, p_upper)
    out.update(p_lower=p_lower, p_upper=p_upper, p=p, equivalent=bool(p < alpha))
    return out
