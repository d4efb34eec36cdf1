"""Beyond PPO: DPO, RLOO and GRPO through TRL 1.16, on the course's own tasks, measured side by side.

Three methods that replaced PPO in most RLHF practice after 2023, each one removing a moving part:

* DPO, Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
  Reward Model": no reward model and no sampling; a classification loss on preference pairs whose
  logit is the *implicit reward* ``beta * (log pi(y|x) - log pi_ref(y|x))``.
* RLOO, Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
  from Human Feedback in LLMs" (the leave-one-out baseline of Kool et al. 2019): no critic; each
  completion's baseline is the mean reward of the other completions of the same prompt.
* GRPO, Shao et al. 2024, "DeepSeekMath": no critic either; the advantage is the reward normalised
  within its group of completions, with PPO's clipped ratio kept.

The trainers are TRL's (``trl.DPOTrainer``, ``trl.RLOOTrainer``, ``trl.GRPOTrainer``); this module
holds what the course adds around them in notebook 09's first sections: CPU-safe configs, TRL's view of a
reward function, a memory monitor, and DPO on offline preference pairs with its implicit reward.  The
four-method comparison on the SmolLM2 policy is ``compare_methods``.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from rlhf_course.core.config import POSITIVE, POSITIVE_INT, SEED, ProfileConfig, integer
from rlhf_course.core.profiles import get_device, precision_flags
from rlhf_course.core.quiet import without_checkpointing_rename_warning

# ----------------------------------------------------------------------------- TRL configs


# No laptop overrides: these runs have no reference (full-profile) values, so the defaults are the
# laptop values in both profiles (the paper values are noted in the help of each field).
LAPTOP_OVERRIDES: dict = {}


@dataclass
class BeyondPPOConfig(ProfileConfig):
    """Hyper-parameters of notebook 09's DPO on offline preference pairs (9.4), one place to change them.

    Laptop values only: no reference values exist for this run, so the defaults are the laptop values,
    picked so it takes about a minute on a 2-core CPU, and ``LAPTOP_OVERRIDES`` is empty (``for_profile``
    gives the same config in both profiles).  The paper's values are noted in each field's help.  The
    four-method comparison of 9.5 takes its budget from the PPO recipe instead (``compare_methods``).
    """

    laptop_overrides = LAPTOP_OVERRIDES
    field_checks = {
        "seed": SEED, "dpo_beta dpo_learning_rate": POSITIVE, "dpo_steps dpo_batch_size": POSITIVE_INT,
        "dpo_max_length": integer(2),
    }

    seed: int = field(default=0, metadata={"help": "seed of the DPO run (TRL's seed)"})
    # DPO (Rafailov et al. 2023: beta 0.1, lr 1e-6, batch 64, on 1B+ pretrained models); the laptop
    # policy is a 7M model trained from scratch, which takes a far larger learning rate
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta (Rafailov et al. 2023: 0.1)"})
    dpo_learning_rate: float = field(default=5e-4, metadata={
        "help": "DPO learning rate (paper: 1e-6 on 1B+ pretrained models; the laptop policy is a 7M model "
                "trained from scratch, which takes a far larger one)"})
    dpo_steps: int = field(default=32, metadata={"help": "DPO steps: one epoch of the 256 English training pairs of notebook 04"})
    dpo_batch_size: int = field(default=8, metadata={"help": "DPO pairs per step (paper: 64)"})
    dpo_max_length: int = field(default=64, metadata={"help": "DPO prompt + reply tokens; the laptop pairs are short"})


def on_cpu() -> bool:
    """Whether TRL trains on the CPU: unless ``profiles.get_device`` picks a CUDA GPU (``RLHF_DEVICE``
    overrides; an absent device raises).  On Apple mps TRL stays on the CPU, as it always has here."""
    return get_device().type != "cuda"


def trl_args(config_class, output_dir: str | Path, **overrides):
    """A TRL config that constructs on a CPU-only machine and logs nowhere.

    * ``use_cpu=True`` and ``bf16=False`` on CPU: TRL configs default ``bf16=True``, and constructing
      one without a bf16-capable accelerator raises; on a GPU, bf16 or fp16 by what it supports
      (``profiles.precision_flags``).
    * ``report_to="none"``: no wandb/tensorboard autodetection.
    * ``activation_checkpointing=False``: TRL defaults (gradient) checkpointing to True, which saves
      memory on a GPU and costs a second forward pass, a bad trade on a CPU with small models.
      transformers 5.23 renamed ``gradient_checkpointing`` to ``activation_checkpointing``; the old
      name still works but warns, so we set the new one.
    * ``save_strategy="no"``: the course saves what it keeps itself.
    """
    cpu = on_cpu()
    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=cpu,
        **precision_flags(cpu),
        report_to="none",
        activation_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=False,
    )
    defaults.update(overrides)
    return config_class(**defaults)


# ----------------------------------------------------------------------------- reward function


def trl_reward_columns(trainer, prompts: Sequence[str], completions: Sequence[str]) -> pd.DataFrame:
    """Score ``prompts + completions`` with every reward function of a TRL RLOO/GRPO trainer,
    through TRL's own code path (``_calculate_rewards``), one column per function.

    Used to show the trap: a classifier passed as a model is scored by its logit 0.
    """
    inputs = [{"prompt": p} for p in prompts]
    completion_ids = [trainer.processing_class(c)["input_ids"] for c in completions]
    rewards = trainer._calculate_rewards(inputs, list(prompts), list(completions), completion_ids)
    return pd.DataFrame(rewards.cpu().numpy(), columns=trainer.reward_func_names)


# ----------------------------------------------------------------------------- models on disk


def save_for_trl(model: nn.Module, tokenizer, folder: str | Path) -> str:
    """Save a policy (and tokenizer) and return the path to hand to a TRL trainer.

    With a KL term (DPO always, RLOO/GRPO when ``beta > 0``) TRL builds the reference model by
    reloading ``model.config._name_or_path``. A model built in memory from a config has an empty
    ``_name_or_path``, so the reload fails (or, worse, finds a hub model of the same name): always
    train from a saved folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def require_saved_path(policy) -> str:
    """The saved folder of ``policy`` (a path, or a model loaded from one), or a clear error."""
    path = policy if isinstance(policy, (str, Path)) else getattr(policy.config, "_name_or_path", "")
    if not path or not (Path(path) / "config.json").exists():
        raise ValueError(
            f"The policy must be a saved folder with a config.json, got {path!r}. TRL reloads the "
            "reference model from model.config._name_or_path, which an in-memory model built from a "
            "config does not have. Call rlhf_course.rl.beyond_ppo.save_for_trl(model, tokenizer, folder) "
            "and pass the folder it returns."
        )
    return str(path)


# ----------------------------------------------------------------------------- measuring a run


class MemoryMonitor:
    """Peak resident memory (RSS) of this process while a block runs, sampled every ``interval`` s.

    psutil (installed with Jupyter's kernel) gives the RSS; without it, the stdlib
    ``resource.getrusage`` high-water mark is used, which cannot be reset, so it is only an upper
    bound for everything the process did before too. ``tracemalloc`` is of no use here: it sees
    Python allocations only, not torch's tensor memory.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_mb() -> float:
        try:
            import psutil

            return psutil.Process(os.getpid()).memory_info().rss / 2**20
        except ImportError:
            import resource
            import sys

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self):
        self.start_mb = self.peak_mb = self.rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())

    @property
    def added_mb(self) -> float:
        return self.peak_mb - self.start_mb


def trainer_networks(trainer) -> dict[str, nn.Module]:
    """The networks a TRL trainer keeps in memory while it trains, by role."""
    held = {"policy": trainer.model}
    if getattr(trainer, "ref_model", None) is not None:
        held["reference"] = trainer.ref_model
    for reward in getattr(trainer, "reward_funcs", []):
        module = reward if isinstance(reward, nn.Module) else getattr(reward, "model", None)
        if isinstance(module, nn.Module):
            held["reward model"] = module
    return held


TRAINED_ROLES = ("policy", "critic (value head)")


def state_megabytes(networks: dict[str, nn.Module], trained: Sequence[str] = TRAINED_ROLES) -> float:
    """Memory of the training *state*, computed rather than measured: every held network's weights,
    plus a gradient and AdamW's two moment estimates (4 + 8 bytes) per parameter of the networks
    being trained. Activations and the generation cache come on top (the measured RSS shows them)."""
    seen, total = set(), 0
    for role, module in networks.items():
        for parameter in module.parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            total += parameter.numel() * parameter.element_size()
            if role in trained and parameter.requires_grad:
                total += parameter.numel() * (4 + 8)
    return total / 2**20


@dataclass
class MethodRun:
    """What one training run produced: the trained policy and its measured costs."""

    method: str
    model: nn.Module
    history: pd.DataFrame  # one row per logged step
    wall_s: float  # building the trainer (loading the reference...) + training
    cpu_s: float  # CPU time of this process over the same span (unaffected by other programs' load)
    peak_rss_mb: float
    added_rss_mb: float
    state_mb: float
    models: list[str] = field(default_factory=list)


def measured_run(method: str, build: Callable[[], object], train: Callable[[object], pd.DataFrame],
                 networks: Callable[[object], dict[str, nn.Module]]) -> MethodRun:
    """Build a trainer, train it, and measure wall time and resident memory around both."""
    gc.collect()
    with MemoryMonitor() as memory:
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer = build()
        history = train(trainer)
        wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    held = networks(trainer)
    return MethodRun(method, held["policy"], history, wall_s, cpu_s, memory.peak_mb, memory.added_mb,
                     state_megabytes(held), list(held))


def _quiet_progress(trainer, method: str) -> None:
    """Swap the Trainer's progress bar (which also prints every log dict) for one that shows the
    latest loss and reward in its postfix and prints nothing else."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(method)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs:
                shown = {k: f"{logs[k]:.3g}" for k in ("loss", "reward", "kl") if k in logs}
                self.training_bar.set_postfix(shown, refresh=False)

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgress())


def _train_trl(trainer) -> pd.DataFrame:
    trainer.train()
    return pd.DataFrame([row for row in trainer.state.log_history if "loss" in row]).set_index("step")


def _run_trl(method: str, build: Callable[[], object]) -> MethodRun:
    def build_quietly():
        trainer = build()
        _quiet_progress(trainer, method)
        return trainer

    with without_checkpointing_rename_warning():  # TRL reads the renamed attribute while building and training
        return measured_run(method, build_quietly, _train_trl, trainer_networks)


# ----------------------------------------------------------------------------- DPO on offline pairs (9.4)


def train_dpo(policy, tokenizer, pairs, config: BeyondPPOConfig, output_dir: str | Path) -> MethodRun:
    """DPO with TRL on ``pairs`` (columns ``prompt``, ``chosen``, ``rejected``)."""
    config.validate()  # before TRL loads anything
    from trl import DPOConfig, DPOTrainer

    args = trl_args(DPOConfig, output_dir, seed=config.seed, beta=config.dpo_beta,
                    learning_rate=config.dpo_learning_rate, max_steps=config.dpo_steps,
                    per_device_train_batch_size=config.dpo_batch_size, max_length=config.dpo_max_length)
    path = require_saved_path(policy)
    return _run_trl("DPO", lambda: DPOTrainer(model=path, args=args, train_dataset=pairs,
                                              processing_class=tokenizer))


# ----------------------------------------------------------------------------- DPO's implicit reward


def completion_logprobs(model: nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                        pad_id: int) -> torch.Tensor:
    """Summed log-probability of each completion given its prompt, shape (batch,).

    Sequences are right-padded ``prompt + completion``; only completion tokens are summed.
    """
    device = next(model.parameters()).device
    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids, dtype=torch.float)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = 1
    input_ids, attention, completion_mask = input_ids.to(device), attention.to(device), completion_mask.to(device)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1).cpu()


def _tokenize_pairs(tokenizer, prompts, completions, add_eos: bool):
    eos = [tokenizer.eos_token_id] if add_eos else []
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + eos for c in completions]
    return prompt_ids, completion_ids


def implicit_rewards(policy: nn.Module, reference: nn.Module, tokenizer, pairs, beta: float,
                     batch_size: int = 8, max_length: int | None = None) -> pd.DataFrame:
    """DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` of each chosen and rejected
    completion (Rafailov et al. 2023, eq. 5), one row per pair.

    Completions get an EOS token appended, as ``DPOTrainer`` does when it prepares a text data set;
    ``max_length`` truncates prompt + completion from the end, like its ``keep_start`` mode.
    """
    rows = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        row = {}
        for side in ("chosen", "rejected"):
            prompt_ids, completion_ids = _tokenize_pairs(tokenizer, batch["prompt"], batch[side], add_eos=True)
            if max_length:
                completion_ids = [c[: max(1, max_length - len(p))] for p, c in zip(prompt_ids, completion_ids)]
                prompt_ids = [p[: max_length - 1] for p in prompt_ids]
            pad = tokenizer.pad_token_id
            logp = completion_logprobs(policy, prompt_ids, completion_ids, pad)
            ref_logp = completion_logprobs(reference, prompt_ids, completion_ids, pad)
            row[side] = (beta * (logp - ref_logp)).tolist()
        rows += [{"chosen_reward": c, "rejected_reward": r} for c, r in zip(row["chosen"], row["rejected"])]
    frame = pd.DataFrame(rows)
    frame["margin"] = frame["chosen_reward"] - frame["rejected_reward"]
    return frame
