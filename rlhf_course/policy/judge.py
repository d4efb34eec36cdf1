"""The gold judge: a second, independent measure of sentiment that PPO never optimises.

PPO maximises a *proxy* reward, the sentiment classifier of ``policy/sentiment.py`` (MiniLM
fine-tuned on Rotten Tomatoes fresh/rotten labels).  A policy pushed against one learned scorer finds
what that scorer over-rewards (Goodhart's law; Gao et al. 2023, "Scaling Laws for Reward Model
Overoptimization", measure it with a "gold" reward model the policy never sees).  A gain in the
proxy is only believable if a judge that was *not* optimised agrees.

The gold judge here is VADER (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for
Sentiment Analysis of Social Media Text", ICWSM): a human-rated sentiment lexicon plus five rules
(punctuation, capitals, degree modifiers, "but", negation), packaged offline
(``assets.vader_analyzer()``).  It shares no weights, training data or tokenizer with the proxy, is
never trained, and PPO never sees its scores.  Its score is the *compound* value, the normalised sum
of the valences of a text's words, in [-1, 1] (>= 0.05 is conventionally positive).

Report it before and after PPO with a standard error: ``paired_gain`` takes the per-query scores of
the same held-out queries before and after, and gives the mean difference with the standard error
of the paired differences (a gain below two standard errors is indistinguishable from sampling noise).
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf_course.core import assets


class GoldJudge:
    """``judge(texts) -> tensor``: VADER's compound score of each text, in [-1, 1] (Hutto & Gilbert 2014)."""

    __name__ = "vader_compound"

    def __init__(self):
        self.analyzer = assets.vader_analyzer()

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.analyzer.polarity_scores(text)["compound"] for text in texts], dtype=torch.float)


def mean_and_standard_error(values) -> tuple[float, float]:
    """``(mean, standard error of the mean)``: sample std / sqrt(n) (NaN for fewer than 2 values)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    se = values.std().item() / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return values.mean().item(), se


def paired_gain(before, after) -> dict:
    """Mean gain ``after - before`` over the same queries, its standard error and their ratio.

    ``{"before", "before_se", "after", "after_se", "gain", "gain_se", "gain_in_se"}``: the standard
    error of the gain is that of the per-query differences (paired), smaller than the two
    standard errors combined when a query's before and after scores are correlated.
    """
    before = torch.as_tensor(before, dtype=torch.float64).flatten()
    after = torch.as_tensor(after, dtype=torch.float64).flatten()
    if before.shape != after.shape:
        raise ValueError(f"paired_gain needs one before and one after score per query; got {len(before)} and {len(after)}")
    (b, b_se), (a, a_se), (gain, gain_se) = (mean_and_standard_error(x) for x in (before, after, after - before))
    return {"before": b, "before_se": b_se, "after": a, "after_se": a_se, "gain": gain, "gain_se": gain_se,
            "gain_in_se": gain / gain_se if gain_se > 0 else float("nan")}
