"""Evaluating a reward model on held-out preference pairs, and what accuracy does not show.

* Pairwise accuracy and the mean chosen / rejected scores, printed in DeepSpeed-Chat step 2's
  evaluation log style (``chosen_last_scores (higher is better) : ...``).
* The reward margin ``r_chosen - r_rejected`` per pair (its histogram), accuracy by language and
  by source, the best and worst scored pairs.
* The "always prefer the longer answer" baseline: reward models are known to lean on length
  (Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations in RLHF"), so a
  model's accuracy means little until it beats what length alone gets.
* The seeds' full-profile reference figures, for a table beside the laptop figures.
"""

from __future__ import annotations

import pandas as pd
import torch

from rlhf_course.core.text import batched_forward

# Reference figures reported by the seeds (full profile, on the hub data sets): held-out accuracy,
# DeepSpeed-Chat step 2's mean chosen / rejected scores (its evaluation log), and ColossalAI's
# ``dist``, the mean margin r_chosen - r_rejected its reward-model trainer logs.  None: not reported.
SEED_REFERENCES = [
    {"run": "ColossalAI (Coati) bloom-560m reward model", "data": "Anthropic/hh-rlhf", "accuracy": 0.619,
     "chosen_mean": None, "rejected_mean": None, "margin_mean": 0.38},
    {"run": "DeepSpeed-Chat step 2 reward model", "data": "the seed's step-2 data (hh-rlhf family)", "accuracy": 0.79,
     "chosen_mean": 5.0, "rejected_mean": 0.7, "margin_mean": 4.3},
]
REFERENCE_COLUMNS = ["profile", "run", "data", "accuracy", "chosen_mean", "rejected_mean", "margin_mean"]


def score_texts(model, tokenizer, texts, batch_size: int = 32, max_length: int | None = None,
                progress: bool = False) -> torch.Tensor:
    """Scalar reward for each text, read at its last token (the tokenizer's padding side).

    The reward models of ``rlhf_course.reward.training`` are trained on ``prompt + reply`` with no
    eos appended and a pad token distinct from eos, so transformers' read-out ("the last id that is
    not the pad id") is the last real token, as in training.  A text longer than ``max_length``
    tokens is cut, as in training.
    """
    return batched_forward(model, tokenizer, texts, lambda out: out.logits.squeeze(-1).float(), batch_size, max_length,
                           progress)


def score_pairs(model, tokenizer, frame: pd.DataFrame, batch_size: int = 32, max_length: int | None = None,
                progress: bool = False) -> pd.DataFrame:
    """Score every pair of a ``prompt``/``chosen``/``rejected`` frame; adds rewards and the margin."""
    frame = pd.DataFrame(frame).reset_index(drop=True)
    texts = list(frame["prompt"] + frame["chosen"]) + list(frame["prompt"] + frame["rejected"])
    rewards = score_texts(model, tokenizer, texts, batch_size, max_length, progress).numpy()
    n = len(frame)
    scored = frame.copy()
    scored["chosen_reward"] = rewards[:n]
    scored["rejected_reward"] = rewards[n:]
    scored["margin"] = scored["chosen_reward"] - scored["rejected_reward"]
    scored["correct"] = scored["margin"] > 0
    return scored


def summary(scored: pd.DataFrame) -> dict:
    """Accuracy and the mean scores (the figures DeepSpeed-Chat logs after each epoch)."""
    return {
        "pairs": int(len(scored)),
        "accuracy": float(scored["correct"].mean()),
        "chosen_mean": float(scored["chosen_reward"].mean()),
        "rejected_mean": float(scored["rejected_reward"].mean()),
        "margin_mean": float(scored["margin"].mean()),
    }


def deepspeed_log_line(scored: pd.DataFrame, digits: int = 4) -> str:
    """One line in the style of DeepSpeed-Chat step 2's evaluation printout."""
    s = summary(scored)
    return (f"chosen_last_scores (higher is better) : {s['chosen_mean']:.{digits}f}, "
            f"rejected_last_scores (lower is better) : {s['rejected_mean']:.{digits}f}, "
            f"acc (higher is better) : {s['accuracy']:.{digits}f}")


def longer_answer_baseline(frame: pd.DataFrame, tokenizer=None) -> dict:
    """Accuracy of "prefer the longer reply" (in tokens if a tokenizer is given, else characters).

    Ties (equal length) count as half right, as a coin flip would.
    """
    if tokenizer is not None:
        length = lambda texts: pd.Series([len(tokenizer(t)["input_ids"]) for t in texts])  # noqa: E731
    else:
        length = lambda texts: pd.Series([len(t) for t in texts])  # noqa: E731
    chosen, rejected = length(list(frame["chosen"])), length(list(frame["rejected"]))
    longer = (chosen > rejected).astype(float) + 0.5 * (chosen == rejected).astype(float)
    return {"accuracy": float(longer.mean()), "chosen_longer": float((chosen > rejected).mean()),
            "ties": float((chosen == rejected).mean())}


def char_ngram_naive_bayes(texts, labels, n: int = 2):
    """A multinomial naive Bayes over character 1..n-grams (add-one smoothing) for labels 1 / 0.

    Returns ``score(text)``, the log-odds of label 1 up to a constant.  A model-free yardstick for short
    Chinese text, where single characters and character pairs carry most of the sentiment (no word
    segmentation needed): notebook 05 uses it to ask how far any model can go on the review labels.
    """
    import math
    from collections import Counter

    def grams(text):
        return [text[i:i + k] for k in range(1, n + 1) for i in range(len(text) - k + 1)]

    counts = {0: Counter(), 1: Counter()}
    for text, label in zip(texts, labels):
        if label not in counts:
            raise ValueError(f"labels must be 0 or 1, got {label!r} for {text!r}")
        counts[label].update(grams(text))
    vocabulary = len(counts[0].keys() | counts[1].keys())
    totals = {label: sum(c.values()) + vocabulary for label, c in counts.items()}

    def score(text: str) -> float:
        return sum(math.log((counts[1][g] + 1) / totals[1]) - math.log((counts[0][g] + 1) / totals[0]) for g in grams(text))

    return score


def accuracy_by(scored: pd.DataFrame, column: str = "language") -> pd.DataFrame:
    """Accuracy, its standard error sqrt(p (1 - p) / n), pair count and mean margin per value of ``column``."""
    grouped = scored.groupby(column)
    pairs, accuracy = grouped.size(), grouped["correct"].mean()
    return pd.DataFrame({"pairs": pairs, "accuracy": accuracy,
                         "standard_error": (accuracy * (1 - accuracy) / pairs) ** 0.5,
                         "margin_mean": grouped["margin"].mean()})


def best_and_worst(scored: pd.DataFrame, k: int = 3, width: int = 70) -> pd.DataFrame:
    """The ``k`` pairs with the largest and the ``k`` with the smallest (most wrong) margin."""
    ordered = scored.sort_values("margin", ascending=False)
    picked = pd.concat([ordered.head(k).assign(which="best"), ordered.tail(k).assign(which="worst")])

    def short(text):
        text = " ".join(str(text).split())
        return text if len(text) <= width else text[: width - 1] + "…"

    return pd.DataFrame({
        "which": picked["which"], "prompt": picked["prompt"].map(short),
        "chosen": picked["chosen"].map(short), "rejected": picked["rejected"].map(short),
        "margin": picked["margin"].round(3),
    }).reset_index(drop=True)


def reference_table(this_run_rows: list[dict], profile: str = "laptop") -> pd.DataFrame:
    """This run's figures (computed now, in ``profile``) beside the seeds' full-profile references.

    Columns ``REFERENCE_COLUMNS``: accuracy, mean chosen and rejected score (DeepSpeed-Chat's log) and
    the mean margin (ColossalAI's ``dist``); a figure a row does not have is left empty.
    """
    rows = [{"profile": f"{profile} (this run)", **row} for row in this_run_rows]
    rows += [{"profile": "full (seed's report)", **row} for row in SEED_REFERENCES]
    return pd.DataFrame(rows, columns=REFERENCE_COLUMNS)


def plot_margins(scored_by_name: dict, ax=None, bins: int = 30):
    """Histogram of ``r_chosen - r_rejected`` per model; right of zero is a correct ranking."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    for name, scored in scored_by_name.items():
        ax.hist(scored["margin"], bins=bins, alpha=0.55, label=f"{name} (acc {scored['correct'].mean():.2f})")
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlabel("reward margin  r(chosen) - r(rejected)")
    ax.set_ylabel("pairs")
    ax.legend()
    return ax
