"""Named, resumable multi-seed sweeps of the course's PPO, logged to a long CSV the notebooks load.

    python -m rlhf_course.experiments critic --seeds 1            # notebook 07: shared vs separate critic
    python -m rlhf_course.experiments methods                     # notebook 09: DPO, RLOO, GRPO and PPO
    python -m rlhf_course.experiments --list                      # every sweep, its arms and CSV

A *sweep* is a set of *arms* (named changes to the profile's PPO recipe, ``lora_policy.ppo_start_config``);
each arm runs once per seed.  A run trains from the same starting policy, evaluates on the same 64
held-out openings every ``eval_every`` steps (proxy reward, VADER gold judge, KL to the reference,
distinct-2), and appends its rows at the end, all at once: one row per (step, metric) with the
columns ``CSV_COLUMNS``.  A run already in the CSV is skipped, so an interrupted sweep resumes where
it stopped and a sweep can be extended with more seeds.  Hours-long sweeps run here, outside the
notebooks; the notebooks plot the CSV and re-run one arm and seed live to show that it reproduces.

Seeds change PPO's sampling and the order of the prompts (every run's actor starts at the SFT policy,
LoRA's B being zero); the held-out openings and their sampling seed stay fixed, so arms and seeds are
compared on the same prompts.

Sweep ``methods`` (notebook 09) compares training methods instead of PPO changes: DPO, RLOO and GRPO
through TRL (``rl.compare_methods``) and the course's PPO, on PPO's budget; its CSV names the arm column
``method`` (``Sweep.arm_column``), and ``load_sweep`` hands it back as ``arm``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_course.rl.compare_methods import HELDOUT_METRICS, METHODS  # noqa: F401 (the held-out metrics a run logs)

RESULTS = Path(__file__).resolve().parent.parent / "notebooks" / "results"
CSV_COLUMNS = ("sweep", "arm", "seed", "step", "metric", "value", "seconds", "machine", "commit", "profile")
DONE_METRIC = "run_seconds"  # the last row a run writes: its presence marks the run finished
HISTORY_METRICS = ("reward_mean", "kl", "value_loss", "return_mean", "return_var", "value_mean", "value_clip_fraction",
                   "clip_fraction", "approx_kl", "entropy", "grad_norm", "response_length", "eos_fraction",
                   "step_seconds")
SAMPLE_COLUMNS = ("sweep", "arm", "seed", "step", "query", "response", "proxy", "gold", "kl", "length", "profile")


NON_PPO_KEYS = ("critic", "reward_scale", "method")  # arm keys that pick a layout, a reward or a method, not PPOConfig fields


def ppo_changes(changes: dict) -> dict:
    """The ``PPOConfig`` fields an arm of ``SWEEPS`` changes (its other keys: ``NON_PPO_KEYS``)."""
    return {key: value for key, value in changes.items() if key not in NON_PPO_KEYS}


def columns_for(arm_column: str, columns: tuple[str, ...] = CSV_COLUMNS) -> tuple[str, ...]:
    """``columns`` with the arm's column named ``arm_column`` (sweep "methods" writes ``method``)."""
    return tuple(arm_column if column == "arm" else column for column in columns)


@dataclass
class Sweep:
    """Arms (name -> changes to the PPO recipe; the key "critic" picks the critic layout, "reward_scale" multiplies
    the reward PPO trains on, not the held-out proxy) run for
    ``steps`` PPO steps (None: the recipe's), held-out evaluation every ``eval_every`` steps.  The held-out
    responses, with their proxy and gold scores, go to ``samples_path``: at the first and last evaluation,
    or at every one with ``samples_every_eval`` (to read what the policy writes as the scores part ways).
    An arm ``{"method": name}`` trains another way than PPO (``method_rows``); ``arm_column`` names the CSV's
    arm column."""

    name: str
    csv: str
    arms: dict[str, dict]
    steps: int | None = None
    eval_every: int = 5
    n_eval: int = 64
    about: str = ""
    notebook_runs: dict = field(default_factory=dict)
    samples_every_eval: bool = False
    arm_column: str = "arm"

    @property
    def path(self) -> Path:
        return RESULTS / self.csv

    @property
    def columns(self) -> tuple[str, ...]:
        return columns_for(self.arm_column)

    @property
    def samples_path(self) -> Path:
        return samples_path(self.path)


def samples_path(path: Path) -> Path:
    """Where the held-out samples of the sweep CSV at ``path`` go: ``<stem>_samples.csv`` beside it."""
    return path.with_name(f"{path.stem}_samples.csv")


SWEEPS = {
    "critic": Sweep(
        "critic", "07_critic.csv", {"shared": {}, "separate": {"critic": "separate"}}, steps=30,
        about="value head on the actor's trunk (TRL 0.x) vs a separate critic (DeepSpeed-Chat's layout), same recipe"),
    "tricks": Sweep(
        "tricks", "08_ppo_tricks_sweep.csv", {
            "base": {},
            "no_advantage_whitening": {"whiten_advantages": False},  # [37 detail 7]
            "reward_scaling": {"scale_rewards": True},  # [37, continuous-action detail 8][TRL0]
            "entropy_bonus": {"entropy_coef": 0.01},  # [37 detail 10]
            "tight_value_clip": {"cliprange_value": 0.02},  # 0.2 clipped 5.7% of value terms in sweep critic (shared)
            "no_value_clip": {"cliprange_value": float("inf")},
            "gamma_0.9": {"gamma": 0.9},  # DeepSpeed-Chat's fix for growing returns
            "lr_decay": {"lr_schedule": "linear"},  # [37 detail 4]
            "no_grad_clip": {"max_grad_norm": None},  # [37 detail 11]
            "force_max_length": {"force_max_length": True},  # EOS suppressed: every response runs to its budget
            "fake_eos": {"fake_eos": True},  # a response cut at its budget ends in EOS anyway (OpenRLHF)
            "beta_0": {"init_kl_coef": 0.0},
        },
        about="the PPO tricks of notebook 08, one change each to the base recipe of notebook 07 (issue 15)"),
    "critic_growth": Sweep(
        "critic_growth", "08_critic_growth.csv", {
            "scaled_rm": {"reward_scale": 5.0},
            "scaled_rm+reward_scaling": {"reward_scale": 5.0, "scale_rewards": True},
            "scaled_rm+gamma_0.9": {"reward_scale": 5.0, "gamma": 0.9},
        }, steps=40,
        about="DeepSpeed-Chat's growing critic loss: the classifier's logits x5 (the same preferences on a larger "
              "scale) over a longer run, and its two fixes, reward scaling and gamma < 1 (issue 15)"),
    "overoptimisation": Sweep(
        "overoptimisation", "08_overoptimisation.csv",
        {f"beta_{beta:g}": {"init_kl_coef": beta} for beta in (0.0, 0.02, 0.05, 0.1)}, steps=60,
        about="proxy and gold reward against sqrt(KL) over long runs at several beta (Gao et al. 2023; issue 15)",
        samples_every_eval=True),
    "recipe": Sweep(
        "recipe", "07_recipe.csv", {
            "fake_eos": {"fake_eos": True},  # 08's fake_eos arm, run 10 steps longer
            "fake_eos+lr_decay": {"fake_eos": True, "lr_schedule": "linear"},  # [37 detail 4]: lr to 0 over the run
            "fake_eos+lr_decay+beta_0.05": {"fake_eos": True, "lr_schedule": "linear", "init_kl_coef": 0.05},
            "fake_eos+lr_decay+beta_0.07": {"fake_eos": True, "lr_schedule": "linear", "init_kl_coef": 0.07},
        }, steps=35,
        about="notebook 07's base recipe with fake EOS (08's best arm on the gold judge) over 35 steps, then a learning "
              "rate decayed to 0, then a weaker beta: toward a proxy gain >= 1.5 at KL <= 10 nats (issue 14)"),
    "methods": Sweep(
        "methods", "09_beyond_ppo.csv", {method: {"method": method} for method in METHODS}, arm_column="method",
        about="DPO (on-policy pairs), RLOO and GRPO through TRL against the course's PPO (the tricks sweep's base arm) "
              "on PPO's budget: prompts, sampled completions, learning rate, beta, LoRA adapter (issue 15)"),
}


# ============================================================================ one run


def run_rows(sweep: Sweep, arm: str, seed: int, profile: str = "laptop", device: str = "cpu",
             progress: bool = True, steps: int | None = None, heldout: bool = True,
             samples: list[dict] | None = None) -> list[dict]:
    """Train one arm with one seed; return its rows (without the run-level columns).

    ``steps`` cuts the run short and ``heldout=False`` skips the held-out evaluations (``replay`` uses both):
    PPO seeds itself when it starts, so the training rows of the first steps do not depend on either.
    Given a list, ``samples`` receives one dict per held-out response at the evaluations ``Sweep`` says.
    An arm that names a ``method`` runs through ``method_rows``.
    """
    from rlhf_course.policy import sentiment
    from rlhf_course.policy.judge import GoldJudge
    from rlhf_course.rl import lora_policy, ppo

    changes = sweep.arms[arm]
    if "method" in changes:
        return method_rows(sweep, arm, seed, profile, device, progress, samples, steps, heldout)
    critic, reward_scale = changes.get("critic", "shared"), changes.get("reward_scale", 1.0)
    if profile == "laptop":
        policy, reference, tokenizer = lora_policy.load_smollm2_policy_and_reference(device, critic=critic)
    elif critic == "shared":
        policy, reference, tokenizer = ppo.load_policy_and_reference(device)
    else:
        raise ValueError(f"arm {arm!r}: a separate critic is built for the laptop's LoRA policy only")
    config = lora_policy.ppo_start_config(profile)
    steps = steps or sweep.steps or config.steps
    config = dataclasses.replace(config, **ppo_changes(changes), steps=steps, seed=seed)
    config.validate()
    reward_fn, judge = sentiment.sentiment_reward(device), GoldJudge()
    return ppo_rows(sweep, config, policy, reference, tokenizer, reward_fn, judge, reward_scale, progress, heldout,
                    samples, device)


def ppo_rows(sweep: Sweep, config, policy, reference, tokenizer, reward_fn, judge, reward_scale: float = 1.0,
             progress: bool = True, heldout: bool = True, samples: list[dict] | None = None, device: str = "cpu",
             measure: bool = False) -> list[dict]:
    """``run_rows`` once the policy, its reference and the reward are loaded: PPO with ``config``, training rows
    every step, held-out evaluations (``compare_methods.RunLog``) at step 0 and every ``sweep.eval_every`` steps;
    with ``measure``, the cost of the training (``RunLog.measure``) at the end."""
    import torch

    from rlhf_course.rl import ppo, sampling, tricks
    from rlhf_course.rl.compare_methods import RunLog

    steps = config.steps
    train_queries, eval_queries = sampling.train_and_eval_queries(
        tokenizer, dataclasses.replace(config, seed=0), n_eval=sweep.n_eval)  # the same prompts for every seed
    log = RunLog(tokenizer, reward_fn, judge, eval_queries, config, device, samples,
                 samples_at=lambda step: sweep.samples_every_eval or step in (0, steps))

    def callback(step: int, metrics: dict, history: list) -> None:
        on_classifier_scale = {"reward_mean": reward_scale}  # comparable across arms; returns and values stay scaled
        for name in HISTORY_METRICS:
            if name in metrics:
                log.add(step + 1, f"train_{name}", float(metrics[name]) / on_classifier_scale.get(name, 1.0))
        if heldout and ((step + 1) % sweep.eval_every == 0 or step + 1 == steps):
            log.evaluate(step + 1, policy.lm, reference)

    torch.manual_seed(config.seed)
    if heldout:
        log.evaluate(0, policy.lm, reference)
    train_reward = tricks.ScaledReward(reward_fn, reward_scale) if reward_scale != 1.0 else reward_fn

    def train():
        return ppo.train_ppo(config, policy, reference, tokenizer, train_reward, train_queries, callback=callback,
                             progress=progress, device=device)

    if measure:
        log.measure(train)
    else:
        train()
    return log.rows


def method_rows(sweep: Sweep, arm: str, seed: int, profile: str = "laptop", device: str = "cpu",
                progress: bool = True, samples: list[dict] | None = None, steps: int | None = None,
                heldout: bool = True) -> list[dict]:
    """One run of an arm that names a method (sweep "methods", notebook 09), from ``compare_methods.load_start``
    and the PPO recipe with ``seed``: DPO, RLOO or GRPO through TRL (``compare_methods.trl_method_rows``), or
    PPO by ``ppo_rows`` exactly as the tricks sweep's ``base`` arm runs; each with its cost at the end.
    ``steps`` and ``heldout`` as in ``run_rows`` (a replay's short run), except for DPO."""
    from rlhf_course.rl import compare_methods, lora_policy

    method = sweep.arms[arm]["method"]
    if method == "dpo" and (steps is not None or not heldout):
        raise ValueError("DPO samples all its pairs before it trains: a shorter run trains on other pairs, so its "
                         "first steps cannot replay a logged run's; replay rloo, grpo or ppo")
    config = lora_policy.ppo_start_config(profile)
    config = dataclasses.replace(config, steps=steps or sweep.steps or config.steps, seed=seed)
    config.validate()
    start = compare_methods.load_start(profile, device)
    if method != "ppo":
        return compare_methods.trl_method_rows(method, start, config, sweep.n_eval, sweep.eval_every, samples,
                                               progress, device, heldout=heldout)
    policy, reference = lora_policy.lora_policy_and_reference(start.lm)  # as load_smollm2_policy_and_reference
    return ppo_rows(sweep, config, policy, reference, start.tokenizer, start.reward_fn, start.judge,
                    progress=progress, heldout=heldout, samples=samples, device=device, measure=heldout)


def replay(sweep: Sweep, frame, arm: str, seed: int, steps: int = 2, profile: str = "laptop", device: str = "cpu",
           metrics: tuple[str, ...] = ("train_reward_mean", "train_kl", "train_value_loss", "train_entropy")):
    """Re-run the first ``steps`` PPO steps of a logged run and set its training metrics beside the logged ones.

    The notebooks call this to show that a committed CSV came from the code they import: on the machine and
    thread count that logged the run the numbers are identical; on another CPU the last bits of the float
    arithmetic differ, sampled tokens can differ, and the replay drifts by about the step-to-step noise.
    ``steps`` must stay below the run's first held-out evaluation, which reseeds the sampler mid-run.
    """
    import pandas as pd

    if not 1 <= steps < sweep.eval_every:
        raise ValueError(f"steps={steps}: replay 1 to {sweep.eval_every - 1} steps (the run's first held-out "
                         f"evaluation at step {sweep.eval_every} reseeds the sampler, which a replay skips)")
    logged = frame[(frame["arm"] == arm) & (frame["seed"] == seed) & (frame["profile"] == profile)
                   & frame["metric"].isin(metrics) & frame["step"].between(1, steps)]
    if logged.empty:
        raise ValueError(f"no logged {profile}-profile rows for arm {arm!r}, seed {seed}, steps 1-{steps}: "
                         f"run `python -m rlhf_course.experiments {sweep.name} --arms {arm}` first")
    rows = [row for row in run_rows(sweep, arm, seed, profile, device, steps=steps, heldout=False)
            if row["metric"] in metrics]
    replayed = pd.DataFrame(rows).rename(columns={"value": "replayed"})
    table = replayed.merge(logged[["step", "metric", "value"]].rename(columns={"value": "logged"}), on=["step", "metric"])
    table["difference"] = table["replayed"] - table["logged"]
    return table.set_index(["step", "metric"]).sort_index()


# ============================================================================ the CSV


def check_header(path: Path, columns: tuple[str, ...] = CSV_COLUMNS) -> None:
    """Refuse to read or extend a file that is not a sweep CSV with ``columns`` (another table written at the same
    path, or a sweep that names its arm column otherwise)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open(newline="") as file:
        header = next(csv.reader(file), [])
    if tuple(header) != columns:
        raise ValueError(f"{path} is not a sweep CSV (its columns are {header[:6]}..., a sweep's are "
                         f"{', '.join(columns)}); move it aside or pass --csv with another path")


def finished_runs(path: Path, arm_column: str = "arm") -> set[tuple[str, str, int]]:
    """(sweep, arm, seed) of every run that wrote its last row to ``path`` (arms in column ``arm_column``)."""
    check_header(path, columns_for(arm_column))
    if not path.exists() or path.stat().st_size == 0:
        return set()
    with path.open(newline="") as file:
        return {(r["sweep"], r[arm_column], int(r["seed"])) for r in csv.DictReader(file) if r["metric"] == DONE_METRIC}


def append_rows(path: Path, rows: list[dict], columns: tuple[str, ...] = CSV_COLUMNS) -> None:
    """Append ``rows`` to ``path`` (header first if the file is new), in one write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check_header(path, columns)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_sweep(sweep: Sweep, seeds: list[int], arms: list[str] | None = None, profile: str = "laptop",
              device: str = "cpu", path: Path | None = None) -> None:
    """Run every (arm, seed) of ``sweep`` not yet in its CSV, appending each run's rows when it ends."""
    from rlhf_course.course.figures import machine

    path = path or sweep.path
    unknown = sorted(set(arms or []) - set(sweep.arms))
    if unknown:
        raise SystemExit(f"sweep {sweep.name!r} has no arm {unknown}; its arms: {', '.join(sweep.arms)}")
    done = finished_runs(path, sweep.arm_column)
    for arm in arms or list(sweep.arms):
        for seed in seeds:
            if (sweep.name, arm, seed) in done:
                print(f"[{sweep.name}] {arm} seed {seed}: in {path.name} already, skipped", flush=True)
                continue
            print(f"[{sweep.name}] {arm} seed {seed} ...", flush=True)
            started, samples = time.time(), []
            rows = run_rows(sweep, arm, seed, profile, device, samples=samples)
            seconds = round(time.time() - started, 1)
            rows.append({"step": rows[-1]["step"], "metric": DONE_METRIC, "value": seconds})
            common = {"sweep": sweep.name, sweep.arm_column: arm, "seed": seed, "seconds": seconds, "machine": machine(),
                      "commit": git_commit(), "profile": profile}
            append_rows(path, [{**common, **row} for row in rows], sweep.columns)
            if samples:  # after the run's rows: a run counts as finished only once they are written
                run = {key: common[key] for key in ("sweep", sweep.arm_column, "seed", "profile")}
                append_rows(samples_path(path), [{**run, **sample} for sample in samples],
                            columns_for(sweep.arm_column, SAMPLE_COLUMNS))
            print(f"[{sweep.name}] {arm} seed {seed}: {seconds:.0f} s, {len(rows)} rows -> {path}", flush=True)


# ============================================================================ reading a sweep


def load_sweep(name_or_path: str | Path):
    """The long CSV of a sweep (a name of ``SWEEPS`` or a path) as a pandas DataFrame.

    A CSV whose arm column is named ``method`` (sweep "methods", notebook 09) comes back with that column
    renamed ``arm``, so ``arm_summary``, ``arm_table``, ``plot_arms`` and ``replay`` read every sweep alike."""
    import pandas as pd

    path = SWEEPS[name_or_path].path if name_or_path in SWEEPS else Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python -m rlhf_course.experiments "
                                f"{name_or_path if name_or_path in SWEEPS else 'SWEEP'}` to make it")
    return pd.read_csv(path).rename(columns={"method": "arm"})


def load_samples(name_or_path: str | Path):
    """The held-out responses a sweep logged (``Sweep.samples_path``) as a DataFrame: one row per response,
    with its run (arm, seed), step, proxy and gold scores, KL and length in tokens (``method`` read as ``arm``)."""
    import pandas as pd

    path = SWEEPS[name_or_path].samples_path if name_or_path in SWEEPS else samples_path(Path(name_or_path))
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the sweep's runs logged no samples yet (runs made before "
                                "samples were logged have none); run the sweep to add some")
    with path.open(newline="") as file:
        arm_column = "method" if "method" in next(csv.reader(file), []) else "arm"
    check_header(path, columns_for(arm_column, SAMPLE_COLUMNS))
    # Texts stay texts (an empty response, or one that reads "NA", must not become NaN); scores may be NaN.
    numbers = {column: ["nan", ""] for column in ("proxy", "gold", "kl", "length")}
    frame = pd.read_csv(path, keep_default_na=False, na_values=numbers, dtype={"query": str, "response": str})
    return frame.rename(columns={"method": "arm"})


def arm_summary(frame, metric: str, step: int | None = None, baseline: str | None = None, last_steps: int = 1):
    """Mean, standard error and 95% t-interval of ``metric`` per arm over seeds, at ``step`` (None: each
    run's last), and with ``baseline`` each arm's difference from it in standard errors.

    ``last_steps`` > 1 first averages each run over its last ``last_steps`` logged steps (with ``step`` None):
    a training metric is logged every step and one step's value is a noisy draw; a run's average is steadier.
    """
    import pandas as pd

    from rlhf_course.core.stats import student_t_quantile

    if last_steps < 1 or (step is not None and last_steps != 1):
        raise ValueError(f"last_steps={last_steps}: use 1 or more, and 1 with a given step")
    rows = frame[frame["metric"] == metric]
    if step is None:
        from_last = rows.groupby(["arm", "seed"])["step"].rank(method="first", ascending=False)
        rows = rows[from_last <= last_steps].groupby(["arm", "seed"], as_index=False)["value"].mean()
    else:
        rows = rows[rows["step"] == step]
    if rows.empty:
        raise ValueError(f"no rows for metric {metric!r} at step {step}; metrics: {sorted(frame['metric'].unique())}")
    grouped = rows.groupby("arm")["value"]
    summary = pd.DataFrame({"seeds": grouped.count(), "mean": grouped.mean(), "sd": grouped.std(ddof=1)})
    summary["se"] = summary["sd"] / summary["seeds"] ** 0.5
    half = summary["se"] * summary["seeds"].map(lambda n: student_t_quantile(0.975, n - 1) if n > 1 else float("nan"))
    summary["ci95_low"], summary["ci95_high"] = summary["mean"] - half, summary["mean"] + half
    if baseline is not None:
        base = summary.loc[baseline]
        difference = summary["mean"] - base["mean"]
        summary["difference"] = difference
        summary["difference_in_se"] = difference / (summary["se"] ** 2 + base["se"] ** 2) ** 0.5
    return summary


def pairwise_differences(frame, metric: str, arms: list[str] | None = None, step: int | None = None):
    """Every pair of arms (the higher mean first) on ``metric`` at ``step`` (None: each run's last): the
    difference of the means, its standard error, and Welch's t-test at the 5% level (Welch 1947: unequal
    variances, Welch-Satterthwaite degrees of freedom), so that a ranking says which gaps its seeds resolve.
    ``beyond_95`` is left empty for a pair where an arm has one seed (no spread to test against)."""
    import itertools

    import pandas as pd

    from rlhf_course.core.stats import student_t_quantile, welch_df

    summary = arm_summary(frame, metric, step)
    summary = summary.loc[[arm for arm in (arms or summary.index) if arm in summary.index]]
    rows = []
    for a, b in itertools.combinations(summary.sort_values("mean", ascending=False).index, 2):
        (n_a, se_a), (n_b, se_b) = summary.loc[a, ["seeds", "se"]], summary.loc[b, ["seeds", "se"]]
        se = (se_a ** 2 + se_b ** 2) ** 0.5
        df = welch_df(se_a, n_a, se_b, n_b)
        t95 = student_t_quantile(0.975, df) if df == df else float("nan")
        difference = summary.loc[a, "mean"] - summary.loc[b, "mean"]
        rows.append({"higher": a, "lower": b, "difference": difference, "se": se, "difference_in_se": difference / se,
                     "welch_df": df, "t95": t95, "beyond_95": (difference / se > t95) if df == df else None})
    return pd.DataFrame(rows)


def arm_table(frame, metrics: dict[str, str], step: int | None = None, baseline: str = "base", last_steps: int = 1):
    """One row per arm, for display: the seeds, then per metric its mean with the 95% interval over seeds and
    the difference from ``baseline`` in standard errors (blank where an arm or the baseline has one seed).
    ``last_steps`` as in ``arm_summary``, for the metrics whose name starts with ``train_``."""
    import pandas as pd

    table = {}
    for metric, label in metrics.items():
        window = last_steps if metric.startswith("train_") else 1
        summary = arm_summary(frame, metric, step, baseline if baseline in set(frame["arm"]) else None, window)
        table["seeds"] = summary["seeds"]
        table[label] = [f"{row.mean:.3g} [{row.ci95_low:.3g}, {row.ci95_high:.3g}]" if row.seeds > 1
                        else f"{row.mean:.3g} (one seed)" for row in summary.itertuples()]
        if "difference_in_se" in summary:
            table[f"{label} vs {baseline}, s.e."] = summary["difference_in_se"].round(1)
    return pd.DataFrame(table, index=summary.index)


def welch_test(row, base) -> tuple[float, float]:
    """``(degrees of freedom, 95% threshold in standard errors)`` of Welch's t-test for the difference of two rows
    of ``arm_summary`` (Welch 1947); both NaN where a row has one seed or neither spreads."""
    from rlhf_course.core.stats import student_t_quantile, welch_df

    df = welch_df(row["se"], row["seeds"], base["se"], base["seeds"])
    return df, (student_t_quantile(0.975, df) if df == df else float("nan"))


def effect_text(frame, arm: str, metric: str, label: str, baseline: str = "base", last_steps: int = 1,
                digits: int = 3) -> str:
    """One line for a notebook's conclusion: ``arm``'s mean of ``metric`` with its 95% interval, the baseline's
    mean, the difference and how many standard errors it is (``arm_summary``), and whether that passes 2 s.e. and
    Welch's 95% threshold (``welch_test``)."""
    summary = arm_summary(frame[frame["arm"].isin([arm, baseline])], metric, baseline=baseline, last_steps=last_steps)
    if arm not in summary.index:
        raise ValueError(f"no {metric!r} rows for arm {arm!r}: arms with rows are {', '.join(summary.index)}")
    row, base = summary.loc[arm], summary.loc[baseline]
    shown = f"{row['mean']:.{digits}g}" + (f" [{row.ci95_low:.{digits}g}, {row.ci95_high:.{digits}g}]" if row.seeds > 1 else "")
    if row.seeds < 2 or base.seeds < 2:
        return f"{label} {shown} against {base['mean']:.{digits}g} for `{baseline}` (one seed: no interval yet)"
    df, t95 = welch_test(row, base)
    size = abs(row.difference_in_se)
    if df != df:  # neither arm spreads
        verdict = "no spread in either arm"
    elif size > t95:
        verdict = f"beyond Welch's 95% threshold of {t95:.1f}"
    else:
        verdict = f"beyond 2 s.e. but within Welch's 95% threshold of {t95:.1f}" if size > 2 else "within 2 s.e."
    return (f"{label} {shown} against {base['mean']:.{digits}g} for `{baseline}` ({row.difference:+.{digits}g}, "
            f"{row.difference_in_se:+.1f} s.e., {verdict})")


def _panel_grid(panels: int, panel_height: float):
    """A figure of ``panels`` panels, three to a row, the unused places of the last row hidden."""
    import matplotlib.pyplot as plt

    columns = min(3, panels)
    rows_of_panels = -(-panels // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4.6 * columns, panel_height * rows_of_panels), squeeze=False)
    for axis in axes.flat[panels:]:
        axis.set_visible(False)
    return fig, axes


def plot_arms(frame, metrics: dict[str, str], step: int | None = None, arms: list[str] | None = None):
    """One panel per metric (three to a row): each seed's value as a dot and the mean with its 95% interval as a
    bar, per arm."""
    import matplotlib.pyplot as plt

    fig, axes = _panel_grid(len(metrics), panel_height=3.6)
    for axis, (metric, label) in zip(axes.flat, metrics.items()):
        summary = arm_summary(frame, metric, step)
        order = [arm for arm in (arms or summary.index) if arm in summary.index]
        rows = frame[frame["metric"] == metric]
        last = rows.groupby(["arm", "seed"])["step"].transform("max")  # each run's last step, as arm_summary
        rows = rows[rows["step"] == (step if step is not None else last)]
        for x, arm in enumerate(order):
            values = rows[rows["arm"] == arm]["value"]
            axis.plot([x] * len(values), values, "o", color="grey", alpha=0.6, markersize=4)
            mean, low, high = summary.loc[arm, ["mean", "ci95_low", "ci95_high"]]
            if summary.loc[arm, "seeds"] > 1:
                axis.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="s", color="C0", capsize=4)
            else:
                axis.plot(x, mean, "s", color="C0", fillstyle="none")
        axis.set_xticks(range(len(order)), order, rotation=45, ha="right")
        axis.set_title(label)
        axis.grid(axis="y", alpha=0.3)
    fig.suptitle("per arm: seeds (dots), mean and 95% t-interval (squares, bars; open square: one seed)")
    fig.tight_layout()
    return fig


def plot_metric_curves(frame, metrics: dict[str, str], arms: list[str] | None = None):
    """One panel per metric (three to a row), the metric against the step for each arm: every seed as a thin
    line, the mean over seeds as a thick one with its 95% t-interval shaded where an arm has several seeds."""
    import matplotlib.pyplot as plt

    from rlhf_course.core.stats import student_t_quantile

    arms = [arm for arm in (arms or frame["arm"].unique()) if arm in set(frame["arm"])]
    fig, axes = _panel_grid(len(metrics), panel_height=3.4)
    for axis, (metric, label) in zip(axes.flat, metrics.items()):
        for color, arm in enumerate(arms):
            rows = frame[(frame["arm"] == arm) & (frame["metric"] == metric)]
            if rows.empty:
                continue
            runs = rows.pivot_table(index="step", columns="seed", values="value")
            axis.plot(runs.index, runs.to_numpy(), color=f"C{color}", alpha=0.25, lw=0.8)
            mean, n = runs.mean(axis=1), runs.count(axis=1)
            axis.plot(mean.index, mean, color=f"C{color}", lw=2, label=f"{arm} ({runs.shape[1]} seed"
                      f"{'s' if runs.shape[1] > 1 else ''})")
            half = runs.std(axis=1, ddof=1) / n ** 0.5 * n.map(lambda k: student_t_quantile(0.975, k - 1) if k > 1 else 0)
            axis.fill_between(mean.index, mean - half, mean + half, color=f"C{color}", alpha=0.15)
        axis.set(title=label, xlabel="step")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


# ============================================================================ command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_course.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="?", choices=sorted(SWEEPS), help="the sweep to run")
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0..K-1 (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="start the seeds here (default 0)")
    parser.add_argument("--arms", nargs="+", help="only these arms (default: all)")
    parser.add_argument("--csv", type=Path, help="write here instead of notebooks/results/<sweep csv>")
    parser.add_argument("--list", action="store_true", help="list the sweeps and exit")
    args = parser.parse_args(argv)
    if args.list or args.sweep is None:
        for sweep in SWEEPS.values():
            print(f"{sweep.name}: {sweep.about}\n  arms: {', '.join(sweep.arms)}\n  csv: {sweep.path}")
        return
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give at least 1")
    from rlhf_course.core.profiles import current_profile
    from rlhf_course.course.notebook import get_device

    profile = current_profile()
    run_sweep(SWEEPS[args.sweep], list(range(args.first_seed, args.first_seed + args.seeds)), args.arms,
              str(profile), str(get_device()), args.csv)


if __name__ == "__main__":
    main(sys.argv[1:])
