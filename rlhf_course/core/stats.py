"""Masked statistics over padded token tensors, and running moments of a stream of scores.

Whitening follows TRL 0.x (``masked_whiten`` / ``masked_var`` with Bessel's correction) and "The 37
Implementation Details of PPO" (Huang et al. 2022, detail 7); under ``accelerate`` the mean and
variance are taken over the tokens of every process, so the result does not depend on how a batch
was split.  ``RunningMoments`` is Chan et al.'s parallel update, used for reward scaling (detail 5).
"""

from __future__ import annotations

import math

import torch

from rlhf_course.core.distributed import sum_across


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:  # Bessel's correction, as TRL0's masked_var
        count = mask.sum()
        if count < 2:
            raise ValueError(f"whitening needs at least 2 unmasked values, got {int(count)}")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, accelerator=None) -> torch.Tensor:
    """Normalise to zero mean, unit variance over unmasked entries only  [37 detail 7][TRL0].

    With an ``accelerator`` of several processes, the mean and (unbiased) variance are over the
    tokens of *all* processes: whitening each process's slice by its own statistics (as TRL 0.x
    did) would make the update depend on how the batch was split.
    """
    if accelerator is None or accelerator.num_processes == 1:
        mean, variance = masked_mean(values, mask), masked_var(values, mask)
    else:
        totals = sum_across(torch.stack([(values * mask).sum(), mask.sum()]).double(), accelerator)
        count = totals[1]
        if count < 2:
            raise ValueError(f"whitening needs at least 2 unmasked values across processes, got {int(count)}")
        mean = (totals[0] / count).to(values.dtype)
        squares = sum_across((((values - mean) ** 2) * mask).sum().double().reshape(1), accelerator)[0]
        variance = (squares / count * count / (count - 1)).to(values.dtype)  # Bessel, as masked_var
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


class RunningMoments:
    """Running mean / std of the scores (Chan et al. parallel update), for reward scaling (TRL 0.x's use_score_scaling)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, values: torch.Tensor) -> None:
        batch_mean, batch_var, batch_count = values.mean().item(), values.var(unbiased=False).item(), values.numel()
        delta, total = batch_mean - self.mean, self.count + batch_count
        self.mean += delta * batch_count / total
        self.var = (self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))


def student_t_cdf(x: float, df: float, intervals: int = 2000) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom: its density integrated with Simpson's rule
    (SciPy is not a dependency of the course)."""
    import math

    if df <= 0:
        raise ValueError(f"need df > 0, got {df}")
    if x < 0:
        return 1.0 - student_t_cdf(-x, df, intervals)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / intervals  # symmetric: 0.5 + the integral from 0 to x
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    return 0.5 + h / 3 * (density(0.0) + inner + density(x))


def student_t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (for 95% intervals over a
    few seeds: 4.30 for 3 seeds, 1.96 as df grows), by bisection on ``student_t_cdf``."""
    if not 0 < probability < 1 or df <= 0:
        raise ValueError(f"need 0 < probability < 1 and df > 0, got {probability} and {df}")
    if probability < 0.5:
        return -student_t_quantile(1 - probability, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < probability:
        high *= 2
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(middle, df) < probability else (low, middle)
    return (low + high) / 2


def welch_df(se_a: float, n_a: int, se_b: float, n_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom of a difference of two means with standard errors ``se_a``,
    ``se_b`` over ``n_a``, ``n_b`` samples (Welch 1947); NaN where a side has one sample or neither spreads."""
    se_sq = se_a ** 2 + se_b ** 2
    if min(n_a, n_b) < 2 or not se_sq > 0:
        return float("nan")
    return se_sq ** 2 / (se_a ** 4 / (n_a - 1) + se_b ** 4 / (n_b - 1))
