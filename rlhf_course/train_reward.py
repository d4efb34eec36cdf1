"""Script entry point: train a LoRA reward model and evaluate it on held-out pairs.

    python -m rlhf_course.train_reward --profile laptop --language en --trainer trl --output-dir out/rm-en
    python -m rlhf_course.train_reward --profile full --language bilingual --base-model qwen2-0.5b ...
    accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml -m rlhf_course.train_reward --profile full ...
        (several GPUs: docs/cluster.md; --checkpoint-every N, --resume-from <output-dir>/trainer/checkpoint-N)

Notebooks 04 and 05 call the same ``train_and_evaluate(config, folder)`` (or ``cached_run``), so a
notebook run and a script run are one code path.  ``main(argv)`` only parses arguments into a
``RewardTrainingConfig`` (every field is a flag, ``rlhf_course.core.cli``) and a ``RewardScriptArgs``.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_course.reward import data
from rlhf_course.core import distributed
from rlhf_course.core.cli import parse_config, require_writable_folder
from rlhf_course.core.config import POSITIVE_INT, Check, check_fields
from rlhf_course.reward import evaluation as reward_eval
from rlhf_course.core.profiles import DEVICE_VAR, Profile, get_device, seed_everything
from rlhf_course.reward.training import (
    HeldOutCurve,
    RewardTrainingConfig,
    add_length_column,
    load_reward_base,
    load_reward_model,
    load_tokenizer,
    pairwise_trainer,
    quiet_loading,
    read_model_card,
    save_reward_model,
    trainable_parameters,
    training_log,
    trl_trainer,
)

TRAIN_LOG = "train_log.json"
HELD_OUT_LOG = "held_out_log.json"
TEST_SCORES = "test_scores.csv"


@dataclass
class RewardRun:
    """What a reward-model run left in ``folder``: the model, its training log (per logged step),
    its held-out learning curve (``held_out``: every ``config.held_out_every`` steps, when set) and
    its held-out figures (``metrics``)."""

    folder: Path
    config: RewardTrainingConfig
    metrics: dict
    log: list
    held_out: list = field(default_factory=list)

    @classmethod
    def from_folder(cls, folder) -> "RewardRun":
        folder = Path(folder)
        card = read_model_card(folder)
        config = RewardTrainingConfig(**{**card["config"], "lora_targets": tuple(card["config"]["lora_targets"] or ()) or None})
        logs = [json.loads((folder / name).read_text()) if (folder / name).exists() else []
                for name in (TRAIN_LOG, HELD_OUT_LOG)]
        return cls(folder, config, card["metrics"], *logs)

    def load(self):
        """``(model, tokenizer)``, ready to score text."""
        return load_reward_model(self.folder)

    def test_scores(self):
        import pandas as pd

        return pd.read_csv(self.folder / TEST_SCORES)


def train_and_evaluate(config: RewardTrainingConfig, output_dir, verbose: bool = True,
                       checkpoint_every: int | None = None, resume_from=None) -> RewardRun:
    """Load data and model, train with the chosen trainer, evaluate on the test pairs, save.

    Under ``accelerate launch`` the Trainer shards the batches (``batch_size`` is per process) and
    averages the logged loss; only the main process evaluates and saves.  ``checkpoint_every`` N
    steps writes ``output_dir/trainer/checkpoint-N``; ``resume_from`` one of them (or "latest") continues.
    """
    config.validate()  # before anything loads
    seed_everything(config.seed)
    output_dir = Path(output_dir)
    profile = Profile(config.profile)
    splits = data.preference_splits(config.language, config.train_size, config.test_size, profile=profile,
                                    seed=config.seed, verbose=verbose)
    train_frame, test_frame = splits.frames()
    tokenizer = load_tokenizer(config.base_model)
    model = load_reward_base(config.base_model, tokenizer, load_in_4bit=config.load_in_4bit, verbose=verbose)

    if config.trainer == "trl":
        from datasets import Dataset

        trainer = trl_trainer(model, tokenizer, Dataset.from_pandas(train_frame), config, output_dir / "trainer",
                              **distributed.trainer_checkpoint_args(checkpoint_every))
    elif config.trainer == "pairwise":
        with quiet_loading():
            tokenized, report = data.tokenize_pairs(train_frame, tokenizer, config.max_length)
            # Length-grouped batches waste less compute on padding; the length column is the fix for the
            # seed's group_by_length error (notebook 04, section 4.7).
            tokenized = add_length_column(tokenized)
        if verbose:
            print(f"{report}; {report.truncated} with a side cut at max_length={config.max_length}")
        trainer = pairwise_trainer(model, tokenizer, tokenized, config, output_dir / "trainer",
                                   train_sampling_strategy="group_by_length",
                                   **distributed.trainer_checkpoint_args(checkpoint_every))
    else:
        raise ValueError(f"trainer={config.trainer!r} is not known; use 'trl' or 'pairwise'")
    steps = distributed.make_step_counter()
    trainer.add_callback(steps)
    curve = None
    if config.held_out_every:
        curve = HeldOutCurve(tokenizer, HeldOutCurve.pick(test_frame, config.held_out_pairs), config.held_out_every,
                             config.max_length)
        trainer.add_callback(curve)
    verbose = verbose and trainer.is_world_process_zero()
    if verbose:
        trainable, total = trainable_parameters(trainer.model)
        print(f"{config.trainer} trainer | {config.base_model} | {len(train_frame)} training pairs | "
              f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume_from == "latest" else str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - started

    metrics = {}
    if trainer.is_world_process_zero():  # one process evaluates and writes; the others wait for it
        started = time.perf_counter()
        model = distributed.unwrap(trainer.model, trainer.accelerator)
        scored = reward_eval.score_pairs(model, tokenizer, test_frame, max_length=config.max_length)
        metrics = {**reward_eval.summary(scored), "train_seconds": round(train_seconds, 1),
                   "eval_seconds": round(time.perf_counter() - started, 1), "train_pairs": len(train_frame)}
        save_reward_model(model, tokenizer, output_dir, config, metrics)
        (output_dir / TRAIN_LOG).write_text(json.dumps(training_log(trainer), indent=1))
        if curve is not None:
            (output_dir / HELD_OUT_LOG).write_text(json.dumps(curve.log, indent=1))
        scored.to_csv(output_dir / TEST_SCORES, index=False)
        if verbose:
            print(reward_eval.deepspeed_log_line(scored))
    distributed.write_rank_report(output_dir, trainer.accelerator, steps=steps.steps)  # waits for the main process
    return RewardRun(output_dir, config, metrics, training_log(trainer), curve.log if curve is not None else [])


def cached_run(config: RewardTrainingConfig, name: str | None = None) -> RewardRun:
    """``train_and_evaluate`` once and keep the result in the course cache (``cache.cached_build``)."""
    from rlhf_course.core import cache

    name = name or f"reward-{config.language}-{config.trainer}-{config.base_model}-{config.profile}"
    digest = f"{zlib.crc32(json.dumps(config.to_dict(), sort_keys=True).encode()):08x}"
    # version 3: a pad token distinct from eos, no eos appended (TRL gets token ids): every model reads
    # the last token of prompt + reply; held-out learning curves
    folder = cache.cached_build(name, lambda tmp: train_and_evaluate(config, tmp), version=f"3-{digest}")
    return RewardRun.from_folder(folder)


@dataclass
class RewardScriptArgs:
    """The script's own options; every ``RewardTrainingConfig`` field is a flag too (``--profile`` is its ``profile``)."""

    output_dir: str | None = field(default=None, metadata={"help": "where to save; default: the course cache"})
    checkpoint_every: int | None = field(default=None, metadata={
        "help": "save a resumable checkpoint every N steps (needs --output-dir)"})
    resume_from: str | None = field(default=None, metadata={
        "help": "a <output-dir>/trainer/checkpoint-N folder, or 'latest' for the newest one"})

    field_checks = {
        "output_dir": Check(lambda v: v is None or (isinstance(v, str) and bool(v.strip())), "a folder name, or none"),
        "checkpoint_every": POSITIVE_INT.or_none("no checkpoints"),
        "resume_from": Check(lambda v: v in (None, "latest") or Path(v).is_dir(),
                             "an existing <output-dir>/trainer/checkpoint-N folder, latest, or none"),
    }

    def validate(self) -> None:
        check_fields(self)


def check_reward_setup(args: RewardScriptArgs, config: RewardTrainingConfig) -> None:
    """What the machine must offer before anything loads: the device (``RLHF_DEVICE``), a folder to save
    into, the checkpoint to resume."""
    device = get_device()  # an unknown or absent RLHF_DEVICE fails here, naming what this machine has
    if device.index is not None and not distributed.launched_distributed():
        raise ValueError(f"{DEVICE_VAR}={device}: transformers' Trainer trains on every GPU it sees, so one GPU is "
                         f"chosen by hiding the others: CUDA_VISIBLE_DEVICES={device.index} {DEVICE_VAR}=cuda")
    if not args.output_dir and (distributed.launched_distributed() or args.checkpoint_every or args.resume_from):
        raise ValueError("--output-dir is required with accelerate launch, --checkpoint-every or --resume-from "
                         "(the course cache is for single-process runs)")
    if args.output_dir:
        require_writable_folder(args.output_dir)
    else:
        from rlhf_course.core import cache

        try:
            folder = cache.cache_dir()
        except OSError as error:
            raise OSError(f"the course cache cannot be created ({error}); set ${cache.CACHE_ENV} to a folder "
                          "you can write to, or pass --output-dir") from None
        require_writable_folder(folder, f"the course cache (${cache.CACHE_ENV})")
    if args.resume_from == "latest" and not list(Path(args.output_dir, "trainer").glob("checkpoint-*")):
        raise ValueError(f"--resume-from latest: no checkpoint-N folder under {Path(args.output_dir, 'trainer')}")


def parse_reward_args(argv: list[str] | None = None, checks=None) -> tuple[RewardScriptArgs, RewardTrainingConfig]:
    """``(script options, config)``: the profile's values, then the flags given (``rlhf_course.core.cli``);
    ``checks(args, config)`` (``main``'s: ``check_reward_setup``) checks the machine too."""
    return parse_config("python -m rlhf_course.train_reward", __doc__.split("\n")[0], RewardScriptArgs,
                        RewardTrainingConfig, argv, checks=checks)


def main(argv: list[str] | None = None) -> RewardRun:
    """Parse and check ``argv`` (a usage error, exit 2, before anything loads), then run the config
    (into ``--output-dir``, or cached)."""
    args, config = parse_reward_args(sys.argv[1:] if argv is None else argv, checks=check_reward_setup)
    result = (train_and_evaluate(config, args.output_dir, checkpoint_every=args.checkpoint_every,
                                 resume_from=args.resume_from)
              if args.output_dir else cached_run(config))
    if result.metrics:  # empty on all but the main process under accelerate launch
        where = args.output_dir or f"<course cache>/{result.folder.name}"  # no absolute cache path printed
        print(json.dumps({"folder": where, **result.metrics}, indent=1))
    return result


if __name__ == "__main__":
    main()
