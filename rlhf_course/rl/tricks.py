"""The helpers of notebook 08's sweeps: a reward on a larger scale, and what a policy's text looks like.

The sweeps themselves (``tricks``, ``critic_growth``, ``overoptimisation``) are
``rlhf_course.experiments``; this module holds the pieces they and the notebook use:

* ``ScaledReward``: the reward model's scores times a constant, the same preferences on a larger
  logit scale.  Sweep ``critic_growth`` trains on it to look for the critic loss that grows over a
  run [DSChat], and tries its two fixes, reward scaling (TRL 0.x's ``use_score_scaling``; [37]'s
  continuous-action detail 8 divides by the std of a discounted return instead) and a discount gamma < 1.
* ``repetition_stats`` and ``top_words``: how varied a set of responses is (distinct-2 after Li et
  al. 2016) and the words it uses most, which show a policy that drifts far from its reference
  repeating the few strings the reward model likes best [Ziegler][Gao].

References:

* [DSChat]  DeepSpeed-Chat step 3 (Yao et al. 2023, arXiv 2308.01320; the step-3 README's
            "instability of RLHF training" notes).
* [37]      Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization"
            (ICLR blog track).
* [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences": the KL
            penalty to the reference policy, without which the policy games the reward model.
* [Gao]     Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization": reward vs KL.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from rlhf_course.rl.ppo import RewardFn

# ============================================================================ 1. a reward on a larger scale


class ScaledReward:
    """``reward_fn`` times a constant: the same preferences on a different logit scale."""

    def __init__(self, reward_fn: RewardFn, scale: float):
        self.reward_fn, self.scale = reward_fn, scale

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.as_tensor(self.reward_fn(texts), dtype=torch.float) * self.scale


# ============================================================================ 2. text statistics


def repetition_stats(texts: Sequence[str]) -> dict:
    """How varied a set of responses is: unique fraction, distinct-2 (Li et al. 2016), most common one."""
    texts = [t.strip() for t in texts]
    if not texts:
        raise ValueError("repetition_stats needs at least one text")
    bigrams = [tuple(words[i:i + 2]) for words in (t.split() for t in texts) for i in range(max(len(words) - 1, 0))]
    most_common, count = Counter(texts).most_common(1)[0]
    return {
        "unique_fraction": len(set(texts)) / len(texts),
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "most_common": most_common,
        "most_common_fraction": count / len(texts),
    }


def top_words(texts: Sequence[str], n: int = 8, min_chars: int = 1) -> list[tuple[str, int]]:
    """The ``n`` most frequent lower-cased words of at least ``min_chars`` characters (4 skips "the", "of",
    "and"): a degenerate policy repeats a few 'magic' words."""
    words = (w.strip(".,!?;:\"'“”‘’-").lower() for t in texts for w in t.split())  # straight and curly quotes
    return Counter(w for w in words if len(w) >= max(min_chars, 1)).most_common(n)
