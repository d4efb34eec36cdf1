"""PPO tricks and failure modes, as small experiments you can rerun (notebook 08).

Each "trick" of PPO for language models is one switch of ``rlhf_course.rl.ppo.PPOConfig``; this
module runs the same short PPO job with one switch changed, summarises every run in one row of a
results table, writes that table to CSV, and draws the comparison plots.  The anecdotes it turns
into measurements come from:

* [DSChat]  DeepSpeed-Chat step 3 (Yao et al. 2023, arXiv 2308.01320; ``ppo_trainer.py`` and the
            step-3 README's "instability of RLHF training" notes): responses generated with
            ``min_length = max_length``, a separate critic, reward clipping, EMA of the actor.
* [37]      Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization"
            (ICLR blog track): reward scaling (detail 5), advantage normalisation (7), value
            clipping (9), entropy bonus (10), global gradient clipping (11), learning-rate
            annealing (4); and "The N Implementation Details of RLHF with PPO" (Huang et al. 2023).
* [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences": the KL
            penalty to the reference policy, without which the policy games the reward model.
* [Gao]     Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization": reward vs KL.

Learning-rate decay is ``PPOConfig.lr_schedule="linear"``, so every run goes through
``rlhf_course.rl.ppo.train_ppo`` itself.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import nn

from rlhf_course.rl import ppo
from rlhf_course.rl.ppo import PPOConfig, PolicyWithValueHead, RewardFn
from rlhf_course.core.config import FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, ProfileConfig, tuple_of
from rlhf_course.core.profiles import Profile
from rlhf_course.core.smoke import smoke_mode
from rlhf_course.rl import sampling

# ============================================================================ 1. experiments


# The laptop profile's values of the long beta=0 run (notebook 07's laptop step size, CPU-sized batches).
LAPTOP_OVERRIDES = dict(
    long_run_learning_rate=5e-4, long_run_steps=40, long_run_batch_size=32, long_run_mini_batch_size=8,
    long_run_forward_batch_size=32,
)


@dataclass
class TricksConfig(ProfileConfig):
    """The numbers notebook 08's experiments set: the sweep values and the long beta=0 run.

    Defaults are the reference values (the full profile's long run is the seed's PPO: lr 1.41e-5,
    batches of 128); ``LAPTOP_OVERRIDES`` holds the laptop's (``rlhf_course.core.config``).  The
    base run's ``PPOConfig`` is the notebook's own.  ``Experiment`` is not a config: it names one run
    and the ``PPOConfig`` fields that run changes.
    """

    laptop_overrides = LAPTOP_OVERRIDES
    field_checks = {
        "kl_coefs": tuple_of(NON_NEGATIVE, "KL coefficients"), "gamma": FRACTION, "reward_scale": POSITIVE,
        "entropy_coef": NON_NEGATIVE, "long_run_learning_rate": POSITIVE,
        "long_run_steps long_run_batch_size long_run_mini_batch_size long_run_forward_batch_size": POSITIVE_INT,
        "long_run_ppo_epochs": POSITIVE_INT,
    }

    kl_coefs: tuple[float, ...] = field(default=(0.0, 0.05, 0.5), metadata={
        "help": "init_kl_coef of each run of the KL sweep (section 8.5; the base run's is 0.2)  [Ziegler][Gao]"})
    gamma: float = field(default=0.5, metadata={
        "help": "discount of the small-gamma remedy for a reward model on a larger scale (8.1)"})
    reward_scale: float = field(default=5.0, metadata={
        "help": "factor on the reward model's scores in the critic-loss runs (8.1)  [37 detail 5]"})
    entropy_coef: float = field(default=0.01, metadata={"help": "entropy bonus of section 8.3  [37 detail 10]"})
    long_run_learning_rate: float = field(default=1.41e-5, metadata={
        "help": "learning rate of the long beta=0 run: notebook 07's (the seed's in the full profile)"})
    long_run_steps: int = field(default=200, metadata={
        "help": "PPO steps of the long beta=0 run: enough to find the strings the classifier likes best"})
    long_run_batch_size: int = field(default=128, metadata={"help": "episodes per PPO step of the long beta=0 run"})
    long_run_mini_batch_size: int = field(default=32, metadata={"help": "episodes per gradient step of the long beta=0 run"})
    long_run_forward_batch_size: int = field(default=64, metadata={
        "help": "chunk size of the no-grad forward passes of the long beta=0 run"})
    long_run_ppo_epochs: int = field(default=4, metadata={"help": "passes over each batch of the long beta=0 run"})

    def validate(self) -> None:
        super().validate()  # one rule per field (field_checks), then the relation between them
        if self.long_run_batch_size % self.long_run_mini_batch_size:
            raise ValueError(f"TricksConfig: long_run_batch_size={self.long_run_batch_size} must be a multiple of "
                             f"long_run_mini_batch_size={self.long_run_mini_batch_size}; use a mini-batch size "
                             "that divides it")


@dataclass(frozen=True)
class Experiment:
    """One run: a name, the section it belongs to, and what it changes from the base config.

    ``overrides`` are ``PPOConfig`` fields (e.g. ``{"lr_schedule": "linear"}``); ``reward_scale``
    multiplies the reward model's scores (a reward model whose logits live on a larger scale).
    """

    name: str
    group: str
    setting: str  # what a reader sees in the table, e.g. "entropy_coef=0.01"
    overrides: dict = field(default_factory=dict)
    reward_scale: float = 1.0

    def config(self, base: PPOConfig) -> PPOConfig:
        unknown = set(self.overrides) - set(PPOConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"experiment {self.name!r} overrides {sorted(unknown)}, which are not PPOConfig "
                             f"fields; choose from {sorted(PPOConfig.__dataclass_fields__)}")
        config = replace(base, **self.overrides)
        config.validate()
        return config


def notebook_experiments(kl_coefs: Sequence[float] | None = None, gamma: float | None = None,
                         reward_scale: float | None = None, config: TricksConfig | None = None) -> list[Experiment]:
    """The runs of notebook 08, in the order of its sections (the base run is shared by all).

    The numbers come from ``config`` (default: ``TricksConfig.for_profile()``); ``kl_coefs``,
    ``gamma`` and ``reward_scale`` override its fields of the same names.
    """
    changes = {k: v for k, v in dict(kl_coefs=kl_coefs, gamma=gamma, reward_scale=reward_scale).items() if v is not None}
    config = replace(config or TricksConfig.for_profile(), **changes)
    config.validate()
    kl_coefs, gamma, reward_scale, entropy = config.kl_coefs, config.gamma, config.reward_scale, config.entropy_coef
    runs = [
        Experiment("base", "base", "base (EOS stop, whitened advantages, value clip 0.2, grad clip 1.0, "
                   "constant LR, fixed KL coef)"),
        # 8.1 critic loss: a reward model on a larger scale, then the two remedies  [37 detail 5]
        Experiment("scaled_rm", "critic", f"reward x{reward_scale:g}", reward_scale=reward_scale),
        Experiment("scaled_rm+reward_scaling", "critic", f"reward x{reward_scale:g}, scale_rewards=True",
                   {"scale_rewards": True}, reward_scale=reward_scale),
        Experiment("scaled_rm+small_gamma", "critic", f"reward x{reward_scale:g}, gamma={gamma:g}",
                   {"gamma": gamma}, reward_scale=reward_scale),
        # 8.2 advantage normalisation  [37 detail 7]
        Experiment("no_adv_whitening", "advantage", "whiten_advantages=False", {"whiten_advantages": False}),
        # 8.3 entropy bonus  [37 detail 10]
        Experiment(f"entropy_{entropy:g}", "entropy", f"entropy_coef={entropy:g}", {"entropy_coef": entropy}),
        # 8.4 min_length = max_length  [DSChat]
        Experiment("force_max_length", "length", "force_max_length=True (min_length = max_length)",
                   {"force_max_length": True}),
    ]
    # 8.5 KL coefficient sweep  [Ziegler][Gao]
    runs += [Experiment(f"kl_{coef:g}", "kl", f"init_kl_coef={coef:g}", {"init_kl_coef": coef}) for coef in kl_coefs]
    # 8.6 the three guards  [37 details 4, 9, 11]
    runs += [
        Experiment("no_value_clip", "guards", "cliprange_value=inf (no value clipping)",
                   {"cliprange_value": math.inf}),
        Experiment("no_grad_clip", "guards", "max_grad_norm=None (no gradient clipping)", {"max_grad_norm": None}),
        Experiment("lr_decay", "guards", "lr_schedule=linear (learning rate decays to 0)",
                   {"lr_schedule": "linear"}),
    ]
    return runs


def long_run_without_kl(profile: Profile | str | None = None, config: TricksConfig | None = None) -> Experiment:
    """Notebook 08's closing run: no KL penalty at all, notebook 07's step size, and enough steps
    for the policy to find the strings the classifier likes best  [Ziegler][Gao].

    Its sizes are ``config``'s ``long_run_*`` fields (default: ``TricksConfig.for_profile(profile)``).
    """
    config = config or TricksConfig.for_profile(profile)
    config.validate()
    return Experiment(
        "kl_0_long", "kl",
        f"init_kl_coef=0, lr as notebook 07, {config.long_run_steps} x {config.long_run_batch_size} episodes",
        {"init_kl_coef": 0.0, "adaptive_kl": False, "ppo_epochs": config.long_run_ppo_epochs,
         "learning_rate": config.long_run_learning_rate, "steps": config.long_run_steps,
         "batch_size": config.long_run_batch_size, "mini_batch_size": config.long_run_mini_batch_size,
         "forward_batch_size": config.long_run_forward_batch_size})


# ============================================================================ 2. running one experiment


class ScaledReward:
    """``reward_fn`` times a constant: the same preferences on a different logit scale."""

    def __init__(self, reward_fn: RewardFn, scale: float):
        self.reward_fn, self.scale = reward_fn, scale

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.as_tensor(self.reward_fn(texts), dtype=torch.float) * self.scale


@dataclass
class TrickRun:
    """What one experiment produced: its config, per-step history, and held-out samples after training."""

    experiment: Experiment
    config: PPOConfig
    history: pd.DataFrame  # one row per PPO step (ppo.train_ppo's metrics)
    samples: pd.DataFrame  # query, response, reward (unscaled), length on the held-out queries
    seconds: float


def run_experiment(experiment: Experiment, base: PPOConfig, start_lm: nn.Module, reference: nn.Module, tokenizer,
                   reward_fn: RewardFn, queries: list[list[int]], eval_queries: list[list[int]],
                   device: torch.device | str = "cpu", progress: bool = False) -> TrickRun:
    """Train a fresh copy of ``start_lm`` with the experiment's config; score held-out samples after.

    ``reference`` is shared between runs (it is frozen); the policy and its value head are new each
    time and seeded from the config, so runs differ only in what the experiment changes.
    """
    config = experiment.config(base)
    torch.manual_seed(config.seed)  # the value head's initial weights
    policy = PolicyWithValueHead(copy.deepcopy(start_lm)).to(device)
    train_reward = ScaledReward(reward_fn, experiment.reward_scale) if experiment.reward_scale != 1.0 else reward_fn
    started = time.time()
    history = ppo.train_ppo(config, policy, reference, tokenizer, train_reward, queries, progress=progress,
                            device=device)
    history = pd.DataFrame(history)
    if experiment.reward_scale != 1.0:  # report rewards on the reward model's own scale, comparable across runs
        history["reward_mean"] = history["reward_mean"] / experiment.reward_scale
        history["reward_std"] = history["reward_std"] / experiment.reward_scale
    samples = sampling.sample_and_score(policy.lm, tokenizer, reward_fn, eval_queries, config, seed=config.seed + 1,
                                   device=device)
    return TrickRun(experiment, config, history, samples, time.time() - started)


def run_experiments(experiments: Sequence[Experiment], base: PPOConfig, start_lm, reference, tokenizer, reward_fn,
                    queries, eval_queries, device="cpu", progress: bool = True) -> dict[str, TrickRun]:
    """Run every experiment (one progress bar over runs); results keyed by experiment name."""
    from tqdm.auto import tqdm

    names = [e.name for e in experiments]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"experiment names must be unique; repeated: {duplicates}")
    results = {}
    bar = tqdm(experiments, desc="experiments", disable=not progress)
    for experiment in bar:
        bar.set_postfix(run=experiment.name)
        results[experiment.name] = run_experiment(experiment, base, start_lm, reference, tokenizer, reward_fn,
                                                  queries, eval_queries, device)
    return results


# ============================================================================ 3. text statistics


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
    words = (w.strip(".,!?;:\"'").lower() for t in texts for w in t.split())
    return Counter(w for w in words if len(w) >= max(min_chars, 1)).most_common(n)


# ============================================================================ 4. results table and CSV


RESULT_COLUMNS = (
    "experiment", "group", "setting", "seed", "steps",
    "reward_first", "reward_final", "eval_reward", "kl_final",
    "value_loss_first", "value_loss_final", "value_loss_peak", "return_var_final",
    "entropy_final", "response_length", "eos_fraction", "grad_norm_peak", "approx_kl_final",
    "unique_fraction", "distinct_2", "seconds",
)


def final_mean(series: pd.Series, fraction: float = 0.25) -> float:
    """Mean over the last ``fraction`` of the steps (at least one): a less noisy 'final' value."""
    if len(series) == 0:
        raise ValueError("cannot summarise an empty history")
    tail = max(1, int(round(len(series) * fraction)))
    return float(series.iloc[-tail:].mean())


def summarise(result: TrickRun) -> dict:
    """One results-table row for a run (``RESULT_COLUMNS``); 'final' = mean of the last quarter of steps."""
    history, samples = result.history, result.samples
    first = max(1, int(round(len(history) * 0.25)))
    variety = repetition_stats(samples["response"])
    return {
        "experiment": result.experiment.name,
        "group": result.experiment.group,
        "setting": result.experiment.setting,
        "seed": result.config.seed,
        "steps": len(history),
        "reward_first": float(history["reward_mean"].iloc[:first].mean()),
        "reward_final": final_mean(history["reward_mean"]),
        "eval_reward": float(samples["reward"].mean()),
        "kl_final": final_mean(history["kl"]),
        "value_loss_first": float(history["value_loss"].iloc[:first].mean()),
        "value_loss_final": final_mean(history["value_loss"]),
        "value_loss_peak": float(history["value_loss"].max()),
        "return_var_final": final_mean(history["return_var"]),
        "entropy_final": final_mean(history["entropy"]),
        "response_length": float(samples["length"].mean()),
        "eos_fraction": final_mean(history["eos_fraction"]),
        "grad_norm_peak": float(history["grad_norm"].max()),
        "approx_kl_final": final_mean(history["approx_kl"]),
        "unique_fraction": variety["unique_fraction"],
        "distinct_2": variety["distinct_2"],
        "seconds": result.seconds,
    }


def results_table(results: dict[str, TrickRun] | Sequence[TrickRun]) -> pd.DataFrame:
    """All runs, one row each, indexed by experiment name, columns ``RESULT_COLUMNS``."""
    runs = list(results.values()) if isinstance(results, dict) else list(results)
    if not runs:
        raise ValueError("no runs to tabulate")
    return pd.DataFrame([summarise(r) for r in runs], columns=list(RESULT_COLUMNS)).set_index("experiment")


def write_results_csv(table: pd.DataFrame, path: Path | str, decimals: int = 4) -> Path:
    """Write the results table (floats rounded) to ``path``, creating folders; returns the path.

    Checks the table first: it must have every ``RESULT_COLUMNS`` column, at least one row, unique
    experiment names and finite rewards, so an instructor never gets a half-empty file.
    """
    table = table.reset_index() if table.index.name == "experiment" else table.copy()
    missing = [c for c in RESULT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"results table lacks columns {missing}; build it with ppo_tricks.results_table()")
    if table.empty:
        raise ValueError("results table has no rows: run at least one experiment before writing the CSV")
    repeated = sorted(table["experiment"][table["experiment"].duplicated()].unique())
    if repeated:
        raise ValueError(f"experiment names repeat in the results table: {repeated}")
    bad = table.loc[~table["reward_final"].apply(lambda v: isinstance(v, (int, float)) and math.isfinite(v)), "experiment"]
    if len(bad):
        raise ValueError(f"runs {list(bad)} have a non-finite reward_final: the run diverged or never ran")
    path = Path(path)
    if smoke_mode():  # stand-in models: their numbers are no results
        print(f"smoke run: {path} not written")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    table[list(RESULT_COLUMNS)].round(decimals).to_csv(path, index=False)
    return path


def read_results_csv(path: Path | str) -> pd.DataFrame:
    """The CSV written by ``write_results_csv``, indexed by experiment (for instructors' slides)."""
    table = pd.read_csv(path)
    missing = [c for c in RESULT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}: not a results file written by write_results_csv")
    return table.set_index("experiment")


# ============================================================================ 5. plots


def plot_curves(results: dict[str, TrickRun], names: Sequence[str], metric: str, ax=None, title: str | None = None,
                labels: dict[str, str] | None = None, logy: bool = False):
    """``metric`` per PPO step for the named runs on one axis."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    for name in names:
        if name not in results:
            raise KeyError(f"no run named {name!r}; runs are {sorted(results)}")
        history = results[name].history
        if metric not in history:
            raise KeyError(f"metric {metric!r} not in the history; choose from {sorted(history.columns)}")
        ax.plot(history["step"], history[metric], marker=".", label=(labels or {}).get(name, name))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("PPO step")
    ax.set_title(title or metric, fontsize=10)
    ax.legend(fontsize=8)
    return ax


def plot_panels(results: dict[str, TrickRun], names: Sequence[str], metrics: Sequence[tuple[str, str]],
                labels: dict[str, str] | None = None, logy: Sequence[str] = (), suptitle: str | None = None):
    """One row of panels, one per ``(metric, title)``, comparing the named runs."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(4.3 * len(metrics), 3.2), squeeze=False)
    for ax, (metric, title) in zip(axes[0], metrics):
        plot_curves(results, names, metric, ax=ax, title=title, labels=labels, logy=metric in logy)
    if suptitle:
        figure.suptitle(suptitle, fontsize=11)
    figure.tight_layout()
    return figure


def plot_kl_frontier(table: pd.DataFrame, names: Sequence[str], coefficients: Sequence[float], ax=None):
    """Final reward against final KL for the KL-coefficient sweep (the reward-vs-KL frontier  [Gao])."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    rows = table.loc[list(names)]
    ax.plot(rows["kl_final"], rows["reward_final"], "o-")
    for (name, row), coefficient in zip(rows.iterrows(), coefficients):
        ax.annotate(f"beta={coefficient:g}", (row["kl_final"], row["reward_final"]), textcoords="offset points",
                    xytext=(5, -10), fontsize=8)
    ax.set_xlabel("KL to reference (nats / response, last quarter of steps)")
    ax.set_ylabel("reward (last quarter of steps)")
    ax.set_title("reward vs KL: the KL-coefficient frontier", fontsize=10)
    return ax


# ============================================================================ 6. words from numbers


def change_text(before: float, after: float, decimals: int = 3) -> str:
    """'from 1.234 to 0.456 (-63%)': a measured change, for conclusions rendered from computed values."""
    text = f"from {before:.{decimals}f} to {after:.{decimals}f}"
    if before != 0 and math.isfinite(before) and math.isfinite(after):
        text += f" ({(after - before) / abs(before):+.0%})"
    return text


def compare_word(before: float, after: float, noise: float, higher: str = "higher", lower: str = "lower",
                 same: str = "about the same") -> str:
    """``higher``/``lower`` when ``after`` differs from ``before`` by more than ``noise``, else ``same``.

    ``noise`` is the yardstick a difference must beat, e.g. the gap between two seeds of the base run.
    """
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite, non-negative yardstick, got {noise}")
    if after > before + noise:
        return higher
    if after < before - noise:
        return lower
    return same


def final_reward_standard_error(result: TrickRun, fraction: float = 0.25) -> float:
    """Standard error of the 'final' mean reward: per-step reward std over sqrt(episodes averaged)."""
    history = result.history
    tail = max(1, int(round(len(history) * fraction)))
    variance = float((history["reward_std"].iloc[-tail:] ** 2).mean())
    return math.sqrt(variance / (tail * result.config.batch_size))


def noise_yardstick(result: TrickRun, other_seed: TrickRun) -> float:
    """How far apart two final rewards must be before one short run can call them different.

    The larger of (a) the gap between two seeds of the same configuration and (b) two standard
    errors of a difference of two final means (2 * sqrt(2) * SE of one run's final mean).
    """
    seed_gap = abs(final_mean(result.history["reward_mean"]) - final_mean(other_seed.history["reward_mean"]))
    return max(seed_gap, 2 * math.sqrt(2) * final_reward_standard_error(result))
