"""Notebook 09's comparison: DPO, RLOO and GRPO (TRL 1.16's trainers) against the course's PPO, on one budget.

Every run starts from the same SFT policy (``load_start``: SmolLM2-135M with its review SFT adapter merged)
with a fresh LoRA adapter of PPO's shape (``lora_policy.PPO_LORA``, B = 0; A drawn with seed 0 by PPO and by TRL
at seed 0, with the run's seed by TRL at other seeds, as its trainers reseed before wrapping), trains on the same
prompts, and is measured the same way (``RunLog``): proxy reward, gold judge, KL to the reference and
distinct-2 on the same 64 held-out openings with the same sampling seed, and the run's peak memory and
training time.  The reference is always the adapter switched off: PPO's ``AdapterDisabledReference``, and
TRL's own ``disable_adapter()`` when it is given a ``peft_config`` (no second copy of the model).

* DPO, Rafailov et al. 2023, on on-policy pairs (Xu et al. 2024, "Is DPO Superior to PPO for LLM
  Alignment?"; Guo et al. 2024, online AI feedback): two completions per prompt sampled from the
  starting policy by PPO's sampler, ranked by the proxy reward, then one pass of ``trl.DPOTrainer``.
* RLOO, Ahmadian et al. 2024, and GRPO, Shao et al. 2024 (DeepSeekMath): ``trl.RLOOTrainer`` and
  ``trl.GRPOTrainer`` with groups of k = 4 completions per prompt, scored by the proxy reward.
* PPO: ``experiments.ppo_rows``, the tricks sweep's ``base`` arm, unchanged.

``python -m rlhf_course.experiments methods`` runs them (``experiments.method_rows``) into
``notebooks/results/09_beyond_ppo.csv``.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import tempfile
import time
from typing import TYPE_CHECKING, Callable

from rlhf_course.core.quiet import without_checkpointing_rename_warning  # light: warnings and contextlib only

if TYPE_CHECKING:  # annotations only: this module imports nothing heavy until a run starts
    from rlhf_course.rl.ppo import PPOConfig

METHODS = ("dpo", "rloo", "grpo", "ppo")
HELDOUT_METRICS = {"proxy_reward": "proxy", "proxy_reward_se": "proxy_se", "gold_reward": "gold", "gold_reward_se": "gold_se",
                   "kl": "kl", "kl_se": "kl_se", "distinct_2": "distinct_2", "response_length": "length",
                   "eos_fraction": "eos_fraction"}
COST_METRICS = ("peak_rss_mb", "train_seconds")  # and peak_cuda_mb on a GPU


# ============================================================================ the start and the budget


@dataclasses.dataclass
class MethodStart:
    """What every run starts from: the SFT policy (no adapter yet; a run wraps it, so load one per run), its
    tokenizer, the proxy reward (``texts -> scores``, the one trained against) and the gold judge."""

    lm: object
    tokenizer: object
    reward_fn: Callable
    judge: Callable


def load_start(profile: str = "laptop", device: str = "cpu") -> MethodStart:
    """The laptop's start: SmolLM2's SFT policy, the sentiment classifier's POSITIVE logit, VADER.
    Tests replace this function with one that returns tiny models."""
    from rlhf_course.policy import sentiment, smollm2_sft
    from rlhf_course.policy.judge import GoldJudge

    if str(profile) != "laptop":
        raise ValueError(f"profile {profile!r}: the methods comparison runs on the laptop's LoRA policy (SmolLM2) only")
    lm, tokenizer = smollm2_sft.load_smollm2_sft_policy(device)
    return MethodStart(lm, tokenizer, sentiment.sentiment_reward(device), GoldJudge())


@dataclasses.dataclass(frozen=True)
class MethodBudget:
    """One budget for every method, read off the PPO recipe (``MethodBudget.from_ppo``).

    * Sampled completions: PPO's ``steps x batch_size``.  RLOO and GRPO sample ``rounds`` rounds of
      ``prompts_per_round`` prompts x ``group_size`` completions; DPO samples 2 completions for each of
      ``pairs`` prompts, all before training.
    * Updates: gradient steps on ``mini_batch_size`` sequences, ``epochs`` passes over each round (PPO's
      ``ppo_epochs``, TRL's ``num_iterations``); DPO makes one pass over its pairs, ``mini_batch_size / 2``
      pairs a step.  Same learning rate and schedule, AdamW, gradient clipping, fp32.
    * ``beta``: PPO's ``init_kl_coef`` (held fixed), which each method applies through its own KL
      estimator: PPO a per-token KL penalty (log-ratio, k1) in the reward, RLOO TRL's sequence KL (k1
      summed over tokens) in the reward, GRPO a per-token k3 term (Schulman 2020) in the loss, and DPO
      the beta of its implicit reward ``beta log pi / pi_ref``.
    """

    rounds: int
    completions_per_round: int
    mini_batch_size: int
    epochs: int
    learning_rate: float
    lr_schedule: str
    beta: float
    max_grad_norm: float | None
    max_completion_length: int
    temperature: float = 1.0
    group_size: int = 4
    seed: int = 0

    @classmethod
    def from_ppo(cls, config: PPOConfig, group_size: int = 4) -> MethodBudget:
        if config.adaptive_kl or config.top_k or config.top_p < 1:
            raise ValueError("the comparison needs a PPO recipe with one fixed beta (adaptive_kl=False) that samples "
                             "purely (top_k 0, top_p 1)")
        if config.batch_size % group_size or config.batch_size % config.mini_batch_size or config.mini_batch_size % 2:
            raise ValueError(f"batch_size={config.batch_size} must split into groups of {group_size} completions and "
                             f"into mini-batches of mini_batch_size={config.mini_batch_size}, an even size (DPO: pairs)")
        return cls(rounds=config.steps, completions_per_round=config.batch_size, mini_batch_size=config.mini_batch_size,
                   epochs=config.ppo_epochs, learning_rate=config.learning_rate, lr_schedule=config.lr_schedule,
                   beta=config.init_kl_coef, max_grad_norm=config.max_grad_norm,
                   max_completion_length=config.response_max_tokens - 1,  # PPO's longest response budget
                   temperature=config.temperature, group_size=group_size, seed=config.seed)

    @property
    def completions(self) -> int:
        return self.rounds * self.completions_per_round

    @property
    def prompts_per_round(self) -> int:
        return self.completions_per_round // self.group_size

    @property
    def pairs(self) -> int:
        return self.completions // 2

    def gradient_steps_per_round(self, method: str) -> int:
        passes = 1 if method == "dpo" else self.epochs
        return passes * self.completions_per_round // self.mini_batch_size


# ============================================================================ measuring a run


class RunLog:
    """The rows of one run (dicts of ``step``, ``metric``, ``value``, as ``experiments`` writes them).

    ``evaluate(step, lm, reference)`` adds ``HELDOUT_METRICS`` on the held-out ``queries`` (same sampling
    seed at every step) and the paired gains of the proxy and gold scores over the first evaluation's;
    given a list, ``samples`` receives the responses at the steps ``samples_at`` picks.  ``measure(train)``
    runs ``train()`` and adds its cost.
    """

    def __init__(self, tokenizer, reward_fn, judge, queries, config: PPOConfig, device="cpu",
                 samples: list | None = None, samples_at: Callable[[int], bool] = lambda step: True):
        self.tokenizer, self.reward_fn, self.judge, self.queries = tokenizer, reward_fn, judge, queries
        self.config = config
        self.device, self.samples, self.samples_at = device, samples, samples_at
        self.rows: list[dict] = []
        self.eval_seconds = 0.0
        self._first_frame = None

    def add(self, step: int, metric: str, value: float) -> None:
        self.rows.append({"step": step, "metric": metric, "value": float(value)})

    def evaluate(self, step: int, lm, reference) -> None:
        from rlhf_course.policy.judge import paired_gain
        from rlhf_course.rl.lora_policy import heldout_evaluation

        started = time.perf_counter()
        result = heldout_evaluation(lm, self.tokenizer, self.reward_fn, self.judge, self.queries, self.config,
                                    reference, seed=1, device=self.device)
        for name, key in HELDOUT_METRICS.items():
            self.add(step, name, result[key])
        if self._first_frame is None:
            self._first_frame = result["frame"]
        if self.samples is not None and self.samples_at(step):
            columns = ["query", "response", "proxy", "gold", "kl", "length"]
            self.samples.extend({"step": step, **row} for row in result["frame"][columns].to_dict("records"))
        for score in ("proxy", "gold"):  # gains over the same openings at step 0, with paired standard errors
            gain = paired_gain(self._first_frame[score], result["frame"][score])
            self.add(step, f"{score}_gain", gain["gain"])
            self.add(step, f"{score}_gain_se", gain["gain_se"])
        self.eval_seconds += time.perf_counter() - started

    def measure(self, train: Callable[[], object]):
        """Run ``train()``; add the process's peak resident memory while it ran (``beyond_ppo.MemoryMonitor``;
        the whole process, so run one method per process for clean numbers), the GPU's peak on a GPU, and
        its wall time less the held-out evaluations it made, at the run's last step."""
        import torch

        from rlhf_course.rl.beyond_ppo import MemoryMonitor

        gc.collect()
        cuda = torch.cuda.is_available() and str(self.device).startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        evaluations_before, started = self.eval_seconds, time.perf_counter()
        with MemoryMonitor() as memory:
            result = train()
        seconds = time.perf_counter() - started - (self.eval_seconds - evaluations_before)
        last = max((row["step"] for row in self.rows), default=0)
        self.add(last, "peak_rss_mb", memory.peak_mb)
        if cuda:
            self.add(last, "peak_cuda_mb", torch.cuda.max_memory_allocated() / 2**20)
        self.add(last, "train_seconds", seconds)
        return result


# ============================================================================ DPO's data


def on_policy_pairs(lm, tokenizer, reward_fn, queries: list[list[int]], budget: MethodBudget, config: PPOConfig,
                    device="cpu"):
    """DPO's pairs from the policy itself: ``budget.pairs`` training prompts, 2 completions each sampled by PPO's
    sampler (``sampling.generate_batch``: its length budgets, pure sampling), both scored by the proxy reward;
    the higher is ``chosen``, ties are dropped.  Token ids as sampled, so DPO trains on exactly those tokens.
    Returns a ``datasets.Dataset``: prompt_ids, chosen_ids, rejected_ids, chosen_score, rejected_score."""
    import torch
    from datasets import Dataset

    from rlhf_course.rl.sampling import generate_batch

    if len(queries) < budget.pairs:
        raise ValueError(f"{len(queries)} training prompts for {budget.pairs} DPO pairs; lower the budget")
    rng = random.Random(budget.seed)
    prompts = [queries[i] for i in rng.sample(range(len(queries)), budget.pairs)]
    per_batch = budget.completions_per_round // 2  # a rollout's worth of completions per call, as PPO samples
    rows = []
    for first in range(0, len(prompts), per_batch):
        doubled = [query for query in prompts[first:first + per_batch] for _ in range(2)]
        _, _, response_ids, response_mask = generate_batch(lm, doubled, tokenizer, config, rng, device)
        responses = [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)]
        texts = [tokenizer.decode(q, skip_special_tokens=True) + tokenizer.decode(r, skip_special_tokens=True)
                 for q, r in zip(doubled, responses)]  # scored as PPO scores: query text + response text
        scores = torch.as_tensor(reward_fn(texts), dtype=torch.float).tolist()
        for i in range(0, len(doubled), 2):
            if scores[i] == scores[i + 1]:
                continue  # a tie says nothing about which is better
            chosen, rejected = (i, i + 1) if scores[i] > scores[i + 1] else (i + 1, i)
            rows.append({"prompt_ids": doubled[i], "chosen_ids": responses[chosen], "rejected_ids": responses[rejected],
                         "chosen_score": scores[chosen], "rejected_score": scores[rejected]})
    return Dataset.from_list(rows)


# ============================================================================ the TRL trainers


def trl_reward(reward_fn: Callable) -> Callable:
    """The proxy reward as TRL's RLOO/GRPO call it: ``f(prompts, completions, **kwargs) -> list[float]``."""

    def proxy_reward(prompts, completions, **kwargs):
        return [float(score) for score in reward_fn([p + c for p, c in zip(prompts, completions, strict=True)])]

    return proxy_reward


def trl_config(method: str, budget: MethodBudget, output_dir, progress: bool = True):
    """The TRL config of ``method`` ("dpo", "rloo", "grpo") on ``budget`` (``beyond_ppo.trl_args``: CPU-safe,
    logs nowhere); fp32 and PPO's AdamW settings, TRL's defaults for everything else."""
    import trl

    from rlhf_course.rl.beyond_ppo import trl_args

    common = dict(seed=budget.seed, learning_rate=budget.learning_rate, lr_scheduler_type=budget.lr_schedule,
                  beta=budget.beta, max_grad_norm=budget.max_grad_norm or 0.0, weight_decay=0.0, adam_epsilon=1e-8,
                  bf16=False, fp16=False, disable_tqdm=not progress)
    if method == "dpo":
        return trl_args(trl.DPOConfig, output_dir, num_train_epochs=1, per_device_train_batch_size=budget.mini_batch_size // 2,
                        **common)
    config_class = {"rloo": trl.RLOOConfig, "grpo": trl.GRPOConfig}[method]
    steps_per_round = budget.completions_per_round // budget.mini_batch_size
    return trl_args(config_class, output_dir, per_device_train_batch_size=budget.mini_batch_size,
                    steps_per_generation=steps_per_round,  # one round sampled at once, cut in mini-batches
                    num_iterations=budget.epochs, num_generations=budget.group_size,
                    max_steps=budget.rounds * budget.gradient_steps_per_round(method),
                    max_completion_length=budget.max_completion_length, temperature=budget.temperature,
                    top_k=0, top_p=1.0, **common)


def build_trainer(method: str, start: MethodStart, budget: MethodBudget, dataset, output_dir, progress: bool = True):
    """TRL's trainer for ``method`` on ``start.lm``, given ``lora_policy.PPO_LORA`` as a ``peft_config``: TRL wraps
    the model itself and, with no ``ref_model``, computes the reference with the adapter disabled."""
    import torch
    import trl

    from rlhf_course.policy.smollm2_sft import causal_lm_lora_config
    from rlhf_course.rl.lora_policy import PPO_LORA

    lora = causal_lm_lora_config(PPO_LORA["r"], PPO_LORA["alpha"], PPO_LORA["target_modules"], PPO_LORA["top_layers"],
                                 start.lm.config.num_hidden_layers)
    args = trl_config(method, budget, output_dir, progress)
    torch.manual_seed(0)  # LoRA's A as add_lora_adapter draws PPO's, unless TRL reseeds first (it does: args.seed)
    if method == "dpo":
        return _dpo_on_token_ids()(model=start.lm, args=args, train_dataset=dataset, processing_class=start.tokenizer,
                                   peft_config=lora)
    trainer_class = {"rloo": trl.RLOOTrainer, "grpo": trl.GRPOTrainer}[method]
    return trainer_class(model=start.lm, reward_funcs=trl_reward(start.reward_fn), args=args, train_dataset=dataset,
                         processing_class=start.tokenizer, peft_config=lora)


def _dpo_on_token_ids():
    """``trl.DPOTrainer`` on pairs already tokenized: TRL 1.16 re-tokenizes text pairs and appends an EOS to every
    completion, which a response cut at its length budget never sampled."""
    from trl import DPOTrainer

    class DPOTrainerOnTokenIds(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # prompt_ids, chosen_ids, rejected_ids, as sampled

    return DPOTrainerOnTokenIds


def _evaluation_callback(log: RunLog, model, reference, every_rounds: int, steps_per_round: int, last_round: int):
    """Held-out evaluation every ``every_rounds`` rounds of gradient steps and at the end, step = round."""
    import torch
    from transformers import TrainerCallback

    class HeldOutEvaluation(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                step = last_round
            elif state.global_step % (every_rounds * steps_per_round) == 0:
                step = state.global_step // steps_per_round
            else:
                return
            with torch.random.fork_rng():  # the evaluation reseeds; TRL's sampling must not notice
                log.evaluate(step, model, reference)

    return HeldOutEvaluation()


# TRL's logged training metrics -> the sweep's names (means over the round's gradient steps).  TRL's KL is nats
# per token (PPO's ``train_kl`` is per response), hence its own name.
TRL_TRAIN_METRICS = {"reward": "train_reward_mean", "kl": "train_kl_per_token", "entropy": "train_entropy",
                     "completions/mean_length": "train_response_length", "loss": "train_loss",
                     "rewards/accuracies": "train_dpo_accuracy", "rewards/margins": "train_dpo_margin"}


def _training_log_callback(log: RunLog, steps_per_round: int):
    """Adds ``TRL_TRAIN_METRICS`` to ``log`` once per round (step = round), the mean of what TRL logged in it
    (``logging_steps=1``; RLOO and GRPO log the reward once, on the gradient step that sampled the round)."""
    from transformers import TrainerCallback

    class TrainingLog(TrainerCallback):
        def __init__(self):
            self.logged: dict[str, list[float]] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key, name in TRL_TRAIN_METRICS.items():
                if logs and key in logs:
                    self.logged.setdefault(name, []).append(float(logs[key]))
            if state.global_step % steps_per_round == 0 or state.global_step == state.max_steps:
                round_ = -(-state.global_step // steps_per_round)
                for name, values in self.logged.items():
                    log.add(round_, name, sum(values) / len(values))
                self.logged = {}

    return TrainingLog()


def trl_method_rows(method: str, start: MethodStart, config: PPOConfig, n_eval: int = 64, eval_every: int = 5,
                    samples: list | None = None, progress: bool = True, device="cpu", heldout: bool = True) -> list[dict]:
    """One run of DPO, RLOO or GRPO on the budget of the PPO recipe ``config`` (its steps and seed included): the
    training metrics TRL logs, once per round (``TRL_TRAIN_METRICS``), the rows of its held-out evaluations at
    step 0, every ``eval_every`` rounds and at the end (the step is the round: ``completions_per_round`` sampled
    completions, or for DPO consumed), then its cost.  Samples at the first and last evaluation.  The cost counts
    DPO's sampling and TRL building its trainer.  ``heldout=False`` skips the evaluations (a replay's short run:
    with a constant learning rate its first rounds do not depend on ``config.steps``)."""
    import torch

    from rlhf_course.rl.lora_policy import AdapterDisabledReference
    from rlhf_course.rl.sampling import train_and_eval_queries

    if method not in ("dpo", "rloo", "grpo"):
        raise ValueError(f"method {method!r}: choose dpo, rloo or grpo (PPO runs through experiments.ppo_rows)")
    budget = MethodBudget.from_ppo(config)
    train_queries, eval_queries = train_and_eval_queries(start.tokenizer, dataclasses.replace(config, seed=0), n_eval=n_eval)
    log = RunLog(start.tokenizer, start.reward_fn, start.judge, eval_queries, config, device, samples,
                 samples_at=lambda step: step in (0, budget.rounds))

    def train() -> None:
        from datasets import Dataset

        if method == "dpo":
            dataset = on_policy_pairs(start.lm, start.tokenizer, start.reward_fn, train_queries, budget, config, device)
        else:  # TRL tokenizes the prompt text again (SmolLM2 adds no BOS)
            dataset = Dataset.from_dict({"prompt": start.tokenizer.batch_decode(train_queries, skip_special_tokens=True)})
        with tempfile.TemporaryDirectory() as output_dir, without_checkpointing_rename_warning():
            trainer = build_trainer(method, start, budget, dataset, output_dir, progress)
            steps_per_round = budget.gradient_steps_per_round(method)
            trainer.add_callback(_training_log_callback(log, steps_per_round))
            if heldout:
                reference = AdapterDisabledReference(trainer.model)
                with torch.random.fork_rng():
                    log.evaluate(0, trainer.model, reference)
                trainer.add_callback(_evaluation_callback(log, trainer.model, reference, eval_every, steps_per_round,
                                                          budget.rounds))
            trainer.train()

    log.measure(train)
    return log.rows
