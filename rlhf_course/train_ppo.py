"""Script entry point: PPO on the sentiment task, on one process or many (``accelerate launch``).

    python -m rlhf_course.train_ppo --profile laptop --output-dir out/ppo
    accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml -m rlhf_course.train_ppo \\
        --profile full --output-dir out/ppo --checkpoint-every 20
    accelerate launch ... -m rlhf_course.train_ppo ... --resume-from latest   (after an interruption)

The training itself is ``rlhf_course.rl.ppo.train_ppo``, the function notebook 07 calls; this script
only builds its inputs (policy, frozen reference, reward, queries), hands it an ``Accelerator`` and
writes the results from the main process: ``policy/`` (the trained LM + value head),
``history.json`` (one metrics line per step, averaged over all processes), ``ranks.json`` (what
each process did) and ``checkpoints/step-N/``.  ``batch_size`` and ``mini_batch_size`` are global:
the same numbers give the same update on 1 or N processes (``rlhf_course.core.distributed``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_course.core import distributed
from rlhf_course.core import netguard
from rlhf_course.core.cli import parse_config, require_writable_folder
from rlhf_course.core.config import FLAG, POSITIVE_INT, Check, check_fields, one_of
from rlhf_course.rl import ppo
from rlhf_course.core.profiles import ENV_VAR, PROFILES, get_device, seed_everything
from rlhf_course.rl import sampling

REWARDS = ("sentiment", "length")
SMOLLM2_LORA = "smollm2-lora"  # --policy: the pretrained SmolLM2-135M SFT policy with a PPO LoRA adapter
HISTORY = "history.json"


class RecordingReward:
    """Wraps a reward function and records what this process scored (episode count, first batch).

    ``ranks.json`` keeps the record of every process, so a test can check that each process
    scored its own share of every global batch.
    """

    def __init__(self, reward_fn):
        self.reward_fn, self.episodes, self.first_texts = reward_fn, 0, None

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.first_texts is None:
            self.first_texts = list(texts)
        self.episodes += len(texts)
        return self.reward_fn(texts)


def length_reward(texts: list[str]) -> torch.Tensor:
    """Characters / 50: a free, deterministic stand-in reward for timing runs and tests."""
    return torch.tensor([len(text) / 50 for text in texts], dtype=torch.float)


def load_reward(name: str, device) -> object:
    if name == "sentiment":
        from rlhf_course.policy.sentiment import sentiment_reward

        return sentiment_reward(device)  # the profile's classifier: POSITIVE logit (notebook 06)
    if name == "length":
        return length_reward
    raise ValueError(f"--reward {name!r} is not known; choose one of {REWARDS}")


def load_policy(path: str | None, device):
    """``(policy with value head, frozen reference, tokenizer)``: the profile's SFT policy (notebook 06),
    ``smollm2-lora`` (SmolLM2-135M SFT + a PPO LoRA adapter; the reference is the adapter switched off,
    ``rlhf_course.rl.lora_policy``) or any causal LM folder with its tokenizer (``--policy``)."""
    if path is None:
        return ppo.load_policy_and_reference(device)
    if path == SMOLLM2_LORA:
        from rlhf_course.rl.lora_policy import load_smollm2_policy_and_reference

        return load_smollm2_policy_and_reference(device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--policy {path} is not a folder; pass a folder written by save_pretrained "
                                "(model and tokenizer), or leave it out to use the profile's SFT policy")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(path).to(device)
    return ppo.PolicyWithValueHead(lm), ppo.frozen_reference(lm), tokenizer


@dataclass
class PPOScriptArgs:
    """The script's own options; every ``PPOConfig`` field is a flag too, e.g. ``--batch-size 64``."""

    output_dir: str = field(metadata={"help": "where policy/, history.json and checkpoints/ go"})
    profile: str | None = field(default=None, metadata={
        "help": "laptop (small SFT policy, packaged reviews, CPU) or full (gpt2-imdb, IMDB, GPU)"})
    policy: str | None = field(default=None, metadata={
        "help": f"a causal LM folder, or {SMOLLM2_LORA} (SmolLM2-135M SFT + LoRA; its laptop settings: "
                "notebook 07's, rlhf_course.rl.lora_policy.notebook_07_config; policy/ then holds the adapter) "
                "(default: the profile's SFT policy)"})
    reward: str = field(default="sentiment", metadata={
        "help": "sentiment: the profile's classifier; length: a free stand-in for tests", "choices": REWARDS})
    n_eval: int = field(default=64, metadata={"help": "queries held out of training (as notebook 07)"})
    checkpoint_every: int | None = field(default=None, metadata={"help": "write checkpoints/step-N every N steps"})
    resume_from: str | None = field(default=None, metadata={
        "help": "a checkpoints/step-N folder, or 'latest' for the newest one under --output-dir"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even when a GPU exists"})

    field_checks = {
        "output_dir": Check(lambda v: isinstance(v, str) and bool(v.strip()), "a folder name"),
        "profile": one_of(PROFILES).or_none(f"${ENV_VAR}, else laptop"), "reward": one_of(REWARDS),
        "policy": Check(lambda v: v == SMOLLM2_LORA or Path(v).is_dir(),
                        f"a folder written by save_pretrained (model and tokenizer), or {SMOLLM2_LORA}"
                        ).or_none("the profile's SFT policy"),
        "n_eval": POSITIVE_INT, "checkpoint_every": POSITIVE_INT.or_none("no checkpoints"),
        "resume_from": Check(lambda v: v in (None, "latest") or Path(v).is_dir(),
                             "an existing checkpoints/step-N folder, latest, or none"),
        "cpu": FLAG,
    }

    def validate(self) -> None:
        check_fields(self)


def with_lora_recipe(config: ppo.PPOConfig, profile: str) -> ppo.PPOConfig:
    """``config`` with notebook 07's SmolLM2 LoRA recipe (``lora_policy.SMOLLM2_PPO_OVERRIDES`` and
    ``NOTEBOOK_07_CHANGES``) on every field the command line left at the profile's value:
    ``--policy smollm2-lora --steps 5`` keeps its 5 steps.  A flag given with the profile's own value cannot be told
    from no flag, so it takes the recipe's value (``--no-fake-eos`` keeps fake EOS on): change such a setting
    in Python, ``dataclasses.replace(lora_policy.notebook_07_config(), fake_eos=False)``."""
    from rlhf_course.rl.lora_policy import NOTEBOOK_07_CHANGES, SMOLLM2_PPO_OVERRIDES

    profile_values = ppo.PPOConfig.for_profile(profile)
    recipe = {**SMOLLM2_PPO_OVERRIDES, **NOTEBOOK_07_CHANGES}
    config = dataclasses.replace(config, **{name: value for name, value in recipe.items()
                                            if getattr(config, name) == getattr(profile_values, name)})
    config.validate()
    return config


def check_ppo_setup(args: PPOScriptArgs, config: ppo.PPOConfig) -> None:
    """What the machine must offer before anything loads: the device (``RLHF_DEVICE``), a writable
    ``--output-dir`` (else every step would train and the policy be lost at the end), the checkpoint."""
    if not args.cpu:
        get_device()  # an unknown or absent RLHF_DEVICE fails here, naming what this machine has
    require_writable_folder(args.output_dir)
    if args.resume_from == "latest" and distributed.latest_checkpoint(Path(args.output_dir, "checkpoints")) is None:
        raise ValueError(f"--resume-from latest: no complete checkpoint under {Path(args.output_dir, 'checkpoints')}")


def parse_ppo_args(argv: list[str] | None = None, checks=None) -> tuple[PPOScriptArgs, ppo.PPOConfig]:
    """``(script options, config)``: the profile's values, then the flags given (``rlhf_course.core.cli``);
    ``checks(args, config)`` (``main``'s: ``check_ppo_setup``) checks the machine too."""
    return parse_config("python -m rlhf_course.train_ppo", __doc__.split("\n")[0], PPOScriptArgs, ppo.PPOConfig, argv,
                        checks=checks)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse and check ``argv`` (a usage error, exit 2, before anything loads), train with
    ``ppo.train_ppo`` on every process, save from the main process."""
    netguard.install_if_requested()  # RLHF_COURSE_NETWORK_GUARD=1: offline runs fail fast on any download
    args, config = parse_ppo_args(sys.argv[1:] if argv is None else argv, checks=check_ppo_setup)
    if args.profile:
        os.environ[ENV_VAR] = args.profile  # the asset loaders read the profile from here
    args.profile = args.profile or os.environ.get(ENV_VAR, "laptop")
    if args.policy == SMOLLM2_LORA:
        config = with_lora_recipe(config, args.profile)
    accelerator = distributed.make_accelerator(cpu=True if args.cpu else None)
    output_dir = Path(args.output_dir)
    resume_from = args.resume_from
    if resume_from == "latest":
        resume_from = distributed.latest_checkpoint(output_dir / "checkpoints")
        if resume_from is None:
            raise FileNotFoundError(f"--resume-from latest: no complete checkpoint under {output_dir / 'checkpoints'}")

    seed_everything(config.seed)  # the value head's initial weights: the same on 1 or N processes
    with accelerator.main_process_first():  # laptop assets are built once, by the main process
        policy, reference, tokenizer = load_policy(args.policy, accelerator.device)
        reward_fn = RecordingReward(load_reward(args.reward, accelerator.device))
        train_queries, _ = sampling.train_and_eval_queries(tokenizer, config, n_eval=args.n_eval)
    if distributed.is_main(accelerator):
        print(f"PPO | profile {args.profile} | {distributed.world_size(accelerator)} process(es), "
              f"{accelerator.distributed_type.value} on {accelerator.device} | global batch {config.batch_size}, "
              f"mini-batch {config.mini_batch_size} | {config.steps} steps | {len(train_queries)} queries", flush=True)

    history = ppo.train_ppo(config, policy, reference, tokenizer, reward_fn, train_queries, device=accelerator.device,
                            accelerator=accelerator, checkpoint_every=args.checkpoint_every,
                            checkpoint_dir=output_dir / "checkpoints", resume_from=resume_from)

    def save():
        output_dir.mkdir(parents=True, exist_ok=True)
        policy.save(output_dir / "policy", tokenizer)  # the unwrapped module: DDP trained it in place
        ppo.save_history(history, output_dir / HISTORY)
        (output_dir / "ppo_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))

    distributed.on_main(save, accelerator)
    distributed.write_rank_report(output_dir, accelerator, episodes=reward_fn.episodes,
                                  first_texts=reward_fn.first_texts, steps=len(history))
    if distributed.is_main(accelerator) and history:
        last = history[-1]
        print(json.dumps({"folder": str(output_dir), "steps": len(history), "reward_mean": round(last["reward_mean"], 4),
                          "kl": round(last["kl"], 4)}), flush=True)
    accelerator.end_training()
    return history


if __name__ == "__main__":
    main()
