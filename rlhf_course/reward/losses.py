"""Reward-model losses: pairwise, K-wise, centring and point-wise.

Every function takes reward tensors (one scalar per response, shape ``(batch,)`` unless stated)
and returns a scalar loss that can be back-propagated.

Sources
-------
* Pairwise Bradley-Terry loss ``-log sigma(r_chosen - r_rejected)`` and the K-wise version averaged
  over the C(K, 2) comparisons of one prompt: InstructGPT, Ouyang et al. 2022, arXiv 2203.02155
  (section 3.5, equation 1).
* The same loss written ``log(1 + exp(r_rejected - r_chosen))``: Anthropic's helpful/harmless
  preference models, Bai et al. 2022, arXiv 2204.05862; it is ColossalAI's ``LogExpLoss``.
* A margin inside the sigmoid, larger when annotators were more sure: Llama 2, Touvron et al. 2023,
  arXiv 2307.09288 (section 3.2.2); TRL's ``RewardTrainer`` reads it from a ``margin`` column.
* Reward centring, an auxiliary ``mean((r_chosen + r_rejected)^2)`` term that keeps rewards near 0:
  Eisenstein et al. 2023, arXiv 2312.09244; TRL's ``center_rewards_coefficient``.
* Multi-objective regression, one head per aspect, missing labels masked: ArmoRM, Wang et al. 2024,
  arXiv 2406.12845.

Numerics: ``-log(sigmoid(x))`` evaluated literally underflows ``sigmoid(x)`` to 0 for very negative
``x`` (about -88 in fp32, -17 in fp16) and returns ``inf`` with a ``NaN`` gradient.  The stable forms
below use ``F.logsigmoid`` / ``F.softplus``, which never form ``sigmoid(x)`` first.
``naive_log_sig_loss`` keeps the unstable form on purpose, for notebook 01 to show the failure.

Checks: the reward functions raise ``ValueError`` when the rewards (or the margin) they are given contain
NaN or +-inf, which only a diverged or overflowed reward model produces; ``check_finite=False`` skips that
check (the naive loss *returning* inf from finite rewards is not affected).  A margin is ``None``, a number
or a tensor of the rewards' shape, nothing that would broadcast into a different shape.
``pairwise_accuracy`` always refuses NaN: a NaN reward is neither higher nor lower.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "log_sig_loss",
    "log_exp_loss",
    "naive_log_sig_loss",
    "pairwise_accuracy",
    "kwise_ranking_loss",
    "kwise_pairs",
    "reward_centering_loss",
    "two_class_ce_loss",
    "regression_loss",
    "multi_objective_regression_loss",
    "standardize_per_rater",
]


def _check_pair(chosen: torch.Tensor, rejected: torch.Tensor, check_finite: bool = True) -> None:
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen rewards have shape {tuple(chosen.shape)} but rejected rewards have shape "
            f"{tuple(rejected.shape)}; pass one reward per pair on each side (same shape)."
        )
    if chosen.numel() == 0:
        raise ValueError("got an empty batch of rewards; pass at least one chosen/rejected pair.")
    if check_finite:
        _check_finite(**{"chosen rewards": chosen, "rejected rewards": rejected})


def _check_finite(**named: torch.Tensor) -> None:
    """Raise on NaN or +-inf in any of the named tensors, saying where and how many."""
    for label, tensor in named.items():
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        bad = ~finite
        first = tuple(int(i) for i in bad.nonzero()[0])
        first = first[0] if len(first) == 1 else first
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        raise ValueError(
            f"{label} must be finite, got {nan} NaN and {inf} inf among {tensor.numel()} values (first at index "
            f"{first}: {tensor[bad][0].item()}). A reward model emitting these has diverged or overflowed (fp16?); "
            "check its outputs, or pass check_finite=False to compute anyway."
        )


def _margin_like(margin, reference: torch.Tensor, check_finite: bool = True) -> torch.Tensor | float:
    """``margin`` as something to subtract from the rewards: None -> 0, a number, or a tensor of their shape."""
    if margin is None:
        return 0.0
    if isinstance(margin, (int, float)) and not isinstance(margin, bool):
        value = float(margin)
        if check_finite and not math.isfinite(value):
            raise ValueError(f"margin is {value}; pass a finite margin, or check_finite=False to compute anyway.")
        return value
    margin = torch.as_tensor(margin)
    if margin.dim() != 0 and margin.shape != reference.shape:
        raise ValueError(
            f"margin has shape {tuple(margin.shape)} but the rewards have shape {tuple(reference.shape)}; pass a "
            "scalar or one margin per pair (the rewards' shape): a broadcast would compare every pair's rewards "
            "with every other pair's margin."
        )
    if check_finite:
        _check_finite(margin=margin)
    return margin.to(dtype=reference.dtype, device=reference.device)


def log_sig_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin=None, check_finite: bool = True) -> torch.Tensor:
    """Mean of ``-log sigma(r_chosen - r_rejected - margin)`` (InstructGPT; margin as in Llama 2).

    ``margin`` may be ``None``, a number, or a tensor of the rewards' shape (or a 0-d tensor).  Stable at
    any margin and in fp32/fp16/bf16: ``F.logsigmoid`` never forms ``sigmoid(x)``, so it cannot underflow.
    NaN/inf rewards or margins raise ``ValueError`` unless ``check_finite=False``.
    """
    _check_pair(chosen, rejected, check_finite)
    difference = chosen - rejected - _margin_like(margin, chosen, check_finite)
    return -F.logsigmoid(difference).mean()


def log_exp_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin=None, check_finite: bool = True) -> torch.Tensor:
    """Mean of ``log(1 + exp(r_rejected - r_chosen + margin))`` (Anthropic, arXiv 2204.05862).

    Algebraically identical to :func:`log_sig_loss`: ``-log sigma(x) = log(1 + exp(-x))``.
    ``F.softplus`` switches to the identity for large arguments, so ``exp`` never overflows.
    ``margin`` and ``check_finite`` as in :func:`log_sig_loss`.
    """
    _check_pair(chosen, rejected, check_finite)
    difference = chosen - rejected - _margin_like(margin, chosen, check_finite)
    return F.softplus(-difference).mean()


def naive_log_sig_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin=None,
                       check_finite: bool = True) -> torch.Tensor:
    """The UNSTABLE literal form ``-log(sigmoid(x)).mean()`` found in one seed.  Do not train with it.

    ``sigmoid(x)`` underflows to exactly 0 once ``x`` is very negative, ``log(0) = -inf``, the loss
    is ``inf`` and its gradient ``NaN`` (0 * inf in the backward pass).  Kept for notebook 01.
    ``check_finite`` checks the *inputs* only: finite rewards that make this loss inf are the point.
    """
    _check_pair(chosen, rejected, check_finite)
    difference = chosen - rejected - _margin_like(margin, chosen, check_finite)
    return -torch.log(torch.sigmoid(difference)).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, check_finite: bool = True) -> float:
    """Fraction of pairs where the chosen response gets the strictly higher reward.

    NaN rewards always raise ``ValueError`` (a NaN is neither higher nor lower, so it would count as a
    loss without a word); +-inf raise too unless ``check_finite=False`` (they still compare).
    """
    _check_pair(chosen, rejected, check_finite)
    if not check_finite:
        _check_not_nan(chosen=chosen, rejected=rejected)
    return (chosen > rejected).float().mean().item()


def _check_not_nan(**named: torch.Tensor) -> None:
    for name, tensor in named.items():
        if bool(torch.isnan(tensor).any()):
            first = int(torch.isnan(tensor.reshape(-1)).nonzero()[0])
            raise ValueError(
                f"{name} rewards contain {int(torch.isnan(tensor).sum())} NaN (first at flat index {first}); "
                "a NaN reward has no order, so there is no accuracy to report."
            )


def kwise_pairs(ranks: Sequence[int] | torch.Tensor) -> list[tuple[int, int]]:
    """All (better, worse) index pairs of one ranked list; ``ranks[i]`` = 0 is best, ties skipped."""
    ranks = [int(r) for r in ranks]
    return [
        (i, j) if ranks[i] < ranks[j] else (j, i)
        for i, j in itertools.combinations(range(len(ranks)), 2)
        if ranks[i] != ranks[j]
    ]


def kwise_ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor | None = None,
                       check_finite: bool = True) -> torch.Tensor:
    """InstructGPT's K-wise loss: ``-1/C(K,2) * sum over pairs of log sigma(r_better - r_worse)``.

    ``rewards``: ``(batch, K)``, the rewards of K responses to one prompt per row.
    ``ranks``: ``(batch, K)`` integer ranks, 0 = best; ``None`` means each row is already ordered
    best to worst.  Equal ranks (ties) give no comparison.  Each prompt's comparisons are averaged
    first and then averaged over prompts: InstructGPT puts all C(K,2) comparisons of one prompt in
    one batch element, because treating them as independent samples over-fits (section 3.5).
    NaN/inf rewards raise ``ValueError`` unless ``check_finite=False``.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"rewards must have shape (batch, K) with K >= 2 responses per prompt, got {tuple(rewards.shape)}."
        )
    if check_finite:
        _check_finite(**{"rewards": rewards})
    batch, k = rewards.shape
    if ranks is None:
        ranks = torch.arange(k, device=rewards.device).expand(batch, k)
    if ranks.shape != rewards.shape:
        raise ValueError(f"ranks shape {tuple(ranks.shape)} must equal rewards shape {tuple(rewards.shape)}.")
    first, second = torch.triu_indices(k, k, offset=1, device=rewards.device)
    # For every unordered pair (i, j): sign = +1 if i ranks better, -1 if j does, 0 for a tie.
    sign = torch.sign(ranks[:, second] - ranks[:, first]).to(rewards.dtype)
    difference = sign * (rewards[:, first] - rewards[:, second])
    valid = sign != 0
    per_pair = -F.logsigmoid(difference) * valid
    pairs_per_prompt = valid.sum(dim=1)
    if (pairs_per_prompt == 0).any():
        row = int((pairs_per_prompt == 0).nonzero()[0])
        raise ValueError(f"prompt {row} has all responses tied (ranks {ranks[row].tolist()}): no comparison to learn from.")
    return (per_pair.sum(dim=1) / pairs_per_prompt).mean()


def reward_centering_loss(chosen: torch.Tensor, rejected: torch.Tensor, coefficient: float = 0.01,
                          check_finite: bool = True) -> torch.Tensor:
    """Auxiliary term ``coefficient * mean((r_chosen + r_rejected)^2)`` (Eisenstein et al. 2023; TRL).

    The pairwise loss only sees differences, so adding a constant to every reward changes nothing
    and rewards can drift; this term pins the mean reward of each pair near 0.
    NaN/inf rewards raise ``ValueError`` unless ``check_finite=False``.
    """
    _check_pair(chosen, rejected, check_finite)
    return coefficient * ((chosen + rejected) ** 2).mean()


def two_class_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Point-wise accept/reject classification: cross-entropy on ``(batch, 2)`` last-token logits.

    The reward is then ``logit[accept] - logit[reject]`` (equivalently ``log p(accept) - log p(reject)``).
    """
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"logits must have shape (batch, 2) [reject, accept], got {tuple(logits.shape)}.")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},) with values 0/1, got {tuple(labels.shape)}.")
    return F.cross_entropy(logits, labels.long())


def regression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Point-wise scalar regression: mean squared error against a rated score."""
    if predicted.shape != target.shape:
        raise ValueError(f"predicted shape {tuple(predicted.shape)} differs from target shape {tuple(target.shape)}.")
    return F.mse_loss(predicted, target.to(predicted.dtype))


def multi_objective_regression_loss(
    predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE per aspect for a ``(batch, aspects)`` head, ignoring missing labels (ArmoRM-style).

    ``mask``: ``(batch, aspects)`` booleans, False where an aspect was not rated (default: all rated;
    NaN targets are also treated as missing).  Returns ``(loss, per_aspect_loss)``: the loss is the
    mean over rated entries; ``per_aspect_loss`` is NaN for an aspect with no rating in the batch.
    """
    if predicted.shape != target.shape or predicted.dim() != 2:
        raise ValueError(
            f"predicted and target must both be (batch, aspects); got {tuple(predicted.shape)} and {tuple(target.shape)}."
        )
    rated = ~torch.isnan(target)
    if mask is not None:
        rated = rated & mask.bool()
    if not rated.any():
        raise ValueError("no aspect is rated in this batch (mask all False or targets all NaN).")
    target = torch.where(rated, target, torch.zeros_like(target)).to(predicted.dtype)
    squared = (predicted - target) ** 2 * rated
    counts = rated.sum(dim=0)
    per_aspect = squared.sum(dim=0) / counts.clamp(min=1)
    per_aspect = torch.where(counts > 0, per_aspect, torch.full_like(per_aspect, float("nan")))
    return squared.sum() / rated.sum(), per_aspect


def standardize_per_rater(scores: torch.Tensor, rater_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Z-score each rater's scores separately, so raters who use different parts of the scale agree.

    Rater A giving 0.8 vs 0.7 and rater B giving 0.6 vs 0.5 express the same preference; pooled raw
    scores would instead say A's responses are all better than B's.  Pairwise losses within one rater
    avoid the problem; for point-wise regression, standardising per rater is the usual fix.
    """
    if scores.shape != rater_ids.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and rater_ids {tuple(rater_ids.shape)} must have the same shape.")
    out = torch.empty_like(scores, dtype=torch.float32)
    for rater in torch.unique(rater_ids):
        rows = rater_ids == rater
        values = scores[rows].float()
        spread = values.std(unbiased=False) if values.numel() > 1 else values.new_tensor(0.0)
        out[rows] = (values - values.mean()) / (spread + eps)
    return out
