"""Named, resumable multi-seed sweeps of the course's PPO, logged to a long CSV the notebooks load.

    python -m rlhf_course.experiments critic --seeds 1            # notebook 07: shared vs separate critic
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

RESULTS = Path(__file__).resolve().parent.parent / "notebooks" / "results"
CSV_COLUMNS = ("sweep", "arm", "seed", "step", "metric", "value", "seconds", "machine", "commit", "profile")
DONE_METRIC = "run_seconds"  # the last row a run writes: its presence marks the run finished
HISTORY_METRICS = ("reward_mean", "kl", "value_loss", "return_mean", "return_var", "value_mean", "value_clip_fraction",
                   "clip_fraction", "approx_kl", "entropy", "grad_norm", "response_length", "eos_fraction",
                   "step_seconds")
HELDOUT_METRICS = {"proxy_reward": "proxy", "proxy_reward_se": "proxy_se", "gold_reward": "gold", "gold_reward_se": "gold_se",
                   "kl": "kl", "kl_se": "kl_se", "distinct_2": "distinct_2", "response_length": "length",
                   "eos_fraction": "eos_fraction"}


@dataclass
class Sweep:
    """Arms (name -> changes to the PPO recipe; the key "critic" picks the critic layout) run for
    ``steps`` PPO steps (None: the recipe's), held-out evaluation every ``eval_every`` steps."""

    name: str
    csv: str
    arms: dict[str, dict]
    steps: int | None = None
    eval_every: int = 5
    n_eval: int = 64
    about: str = ""
    notebook_runs: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return RESULTS / self.csv


SWEEPS = {
    "critic": Sweep(
        "critic", "07_critic.csv", {"shared": {}, "separate": {"critic": "separate"}}, steps=30,
        about="value head on the actor's trunk (TRL 0.x) vs a separate critic (DeepSpeed-Chat's layout), same recipe"),
    "tricks": Sweep(
        "tricks", "08_ppo_tricks.csv", {
            "base": {},
            "no_advantage_whitening": {"whiten_advantages": False},  # [37 detail 7]
            "reward_scaling": {"scale_rewards": True},  # [37 detail 5]
            "entropy_bonus": {"entropy_coef": 0.01},  # [37 detail 10]
            "tight_value_clip": {"cliprange_value": 0.02},  # 0.2 clipped 5.7% of value terms in sweep critic (shared)
            "no_value_clip": {"cliprange_value": float("inf")},
            "gamma_0.9": {"gamma": 0.9},  # DeepSpeed-Chat's fix for growing returns
            "lr_decay": {"lr_schedule": "linear"},  # [37 detail 4]
            "no_grad_clip": {"max_grad_norm": None},  # [37 detail 11]
            "force_max_length": {"force_max_length": True},  # EOS suppressed: every response runs to its budget
            "beta_0": {"init_kl_coef": 0.0},
        },
        about="the PPO tricks of notebook 08, one change each to the recipe of notebook 07 (issue 15)"),
    "overoptimisation": Sweep(
        "overoptimisation", "08_overoptimisation.csv",
        {f"beta_{beta:g}": {"init_kl_coef": beta} for beta in (0.0, 0.02, 0.05, 0.1)}, steps=60,
        about="proxy and gold reward against sqrt(KL) over long runs at several beta (Gao et al. 2023; issue 15)"),
}


# ============================================================================ one run


def run_rows(sweep: Sweep, arm: str, seed: int, profile: str = "laptop", device: str = "cpu",
             progress: bool = True) -> list[dict]:
    """Train one arm with one seed; return its rows (without the run-level columns)."""
    import torch

    from rlhf_course.policy import sentiment
    from rlhf_course.policy.judge import GoldJudge, paired_gain
    from rlhf_course.rl import lora_policy, ppo, sampling

    changes = dict(sweep.arms[arm])
    critic = changes.pop("critic", "shared")
    if profile == "laptop":
        policy, reference, tokenizer = lora_policy.load_smollm2_policy_and_reference(device, critic=critic)
    elif critic == "shared":
        policy, reference, tokenizer = ppo.load_policy_and_reference(device)
    else:
        raise ValueError(f"arm {arm!r}: a separate critic is built for the laptop's LoRA policy only")
    config = lora_policy.ppo_start_config(profile)
    steps = sweep.steps or config.steps
    config = dataclasses.replace(config, **changes, steps=steps, seed=seed)
    config.validate()
    reward_fn, judge = sentiment.sentiment_reward(device), GoldJudge()
    train_queries, eval_queries = sampling.train_and_eval_queries(
        tokenizer, dataclasses.replace(config, seed=0), n_eval=sweep.n_eval)  # the same prompts for every seed
    rows, start = [], {}

    def evaluate(step: int) -> None:
        result = lora_policy.heldout_evaluation(policy.lm, tokenizer, reward_fn, judge, eval_queries, config,
                                                reference, seed=1, device=device)
        rows.extend({"step": step, "metric": name, "value": float(result[key])} for name, key in HELDOUT_METRICS.items())
        start.setdefault("frame", result["frame"])
        for score in ("proxy", "gold"):  # gains over the same openings at step 0, with paired standard errors
            gain = paired_gain(start["frame"][score], result["frame"][score])
            rows.extend([{"step": step, "metric": f"{score}_gain", "value": float(gain["gain"])},
                         {"step": step, "metric": f"{score}_gain_se", "value": float(gain["gain_se"])}])

    def callback(step: int, metrics: dict, history: list) -> None:
        rows.extend({"step": step + 1, "metric": f"train_{name}", "value": float(metrics[name])}
                    for name in HISTORY_METRICS if name in metrics)
        if (step + 1) % sweep.eval_every == 0 or step + 1 == steps:
            evaluate(step + 1)

    torch.manual_seed(seed)
    evaluate(0)
    ppo.train_ppo(config, policy, reference, tokenizer, reward_fn, train_queries, callback=callback,
                  progress=progress, device=device)
    return rows


# ============================================================================ the CSV


def check_header(path: Path) -> None:
    """Refuse to read or extend a file that is not a sweep CSV (another table written at the same path)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open(newline="") as file:
        header = next(csv.reader(file), [])
    if tuple(header) != CSV_COLUMNS:
        raise ValueError(f"{path} is not a sweep CSV (its columns are {header[:6]}..., a sweep's are "
                         f"{', '.join(CSV_COLUMNS)}); move it aside or pass --csv with another path")


def finished_runs(path: Path) -> set[tuple[str, str, int]]:
    """(sweep, arm, seed) of every run that wrote its last row to ``path``."""
    check_header(path)
    if not path.exists() or path.stat().st_size == 0:
        return set()
    with path.open(newline="") as file:
        return {(r["sweep"], r["arm"], int(r["seed"])) for r in csv.DictReader(file) if r["metric"] == DONE_METRIC}


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``path`` (header first if the file is new), in one write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check_header(path)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
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
    done = finished_runs(path)
    for arm in arms or list(sweep.arms):
        for seed in seeds:
            if (sweep.name, arm, seed) in done:
                print(f"[{sweep.name}] {arm} seed {seed}: in {path.name} already, skipped", flush=True)
                continue
            print(f"[{sweep.name}] {arm} seed {seed} ...", flush=True)
            started = time.time()
            rows = run_rows(sweep, arm, seed, profile, device)
            seconds = round(time.time() - started, 1)
            rows.append({"step": rows[-1]["step"], "metric": DONE_METRIC, "value": seconds})
            common = {"sweep": sweep.name, "arm": arm, "seed": seed, "seconds": seconds, "machine": machine(),
                      "commit": git_commit(), "profile": profile}
            append_rows(path, [{**common, **row} for row in rows])
            print(f"[{sweep.name}] {arm} seed {seed}: {seconds:.0f} s, {len(rows)} rows -> {path}", flush=True)


# ============================================================================ reading a sweep


def load_sweep(name_or_path: str | Path):
    """The long CSV of a sweep (a name of ``SWEEPS`` or a path) as a pandas DataFrame."""
    import pandas as pd

    path = SWEEPS[name_or_path].path if name_or_path in SWEEPS else Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python -m rlhf_course.experiments "
                                f"{name_or_path if name_or_path in SWEEPS else 'SWEEP'}` to make it")
    return pd.read_csv(path)


def arm_summary(frame, metric: str, step: int | None = None, baseline: str | None = None):
    """Mean, standard error and 95% t-interval of ``metric`` per arm over seeds, at ``step`` (None: each
    run's last), and with ``baseline`` each arm's difference from it in standard errors."""
    import pandas as pd

    from rlhf_course.core.stats import student_t_quantile

    rows = frame[frame["metric"] == metric]
    if step is None:
        rows = rows[rows["step"] == rows.groupby(["arm", "seed"])["step"].transform("max")]
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
