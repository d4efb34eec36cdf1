"""Training a reward model with LoRA, two ways: TRL's ``RewardTrainer`` and the seed's own Trainer.

A reward model here is a causal LM with a scalar head, ``AutoModelForSequenceClassification(
num_labels=1)``: the head reads the hidden state of the last token of ``prompt + reply``, the
position that has attended to the whole text (InstructGPT, Ouyang et al. 2022, and DeepSpeed-Chat
step 2 read the last token too, there an appended end-of-text token).  transformers finds that
token as "the last id that is not ``pad_token_id``", so the pad token must differ from eos
(``load_tokenizer`` sees to it; SmolLM2 and GPT-2 ship with pad == eos, notebook 02's trap, which
skips a real final eos).  No eos is appended, in any trainer (TRL would append one to text, so it
gets token ids, ``tokenize_for_trl``) or in scoring (``rlhf_course.reward.evaluation.score_texts``):
on the laptop budget an appended eos is a position whose hidden state says little about the reply
(notebook 05, section 5.3).  It is trained on pairs with the pairwise loss
``-log sigma(r_chosen - r_rejected)`` (``rlhf_course.reward.losses.log_sig_loss``).

* The library way: ``trl.RewardTrainer`` (TRL 1.16) with a PEFT ``LoraConfig``.
* The hand-written way of the Qwen2 LoRA seed (itself following TRL's StackLLaMA reward script):
  a data set with ``input_ids_j``/``input_ids_k`` columns, ``PairwiseRewardCollator`` padding the
  j (chosen) and k (rejected) sides separately, and ``PairwiseRewardTrainer.compute_loss`` running
  the model twice and applying the pairwise loss.
* LoRA (Hu et al. 2021) through PEFT: r=4, alpha=32, dropout 0.1 on the q/k/v projections, with
  the freshly initialised ``score`` head trained in full (``modules_to_save``).  QLoRA-style 4-bit
  loading (Dettmers et al. 2023) only where CUDA and bitsandbytes exist.

``RewardTrainingConfig`` holds every hyper-parameter; ``rlhf_course.train_reward`` is the script.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from rlhf_course.reward.data import LANGUAGES
from rlhf_course.reward.losses import log_sig_loss
from rlhf_course.core.config import (FLAG, MAPPING, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, Check,
                                     ProfileConfig, integer, number, one_of, resolve_profile, tuple_of)
from rlhf_course.core import hub
from rlhf_course.core.profiles import PROFILES, get_device, half_dtype, precision_flags
from rlhf_course.core.quiet import quiet_loading

# Short names for the base models; the full-profile ones are the seeds' hub ids.
BASE_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (packaged, laptop)",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "bloom-560m": "bigscience/bloom-560m",
}
# LoRA target modules per architecture: Llama/Qwen2 have separate q/k/v projections, BLOOM a fused one.
LORA_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj"),
    "bloom": ("query_key_value",),
}
MODEL_CARD = "reward_model.json"


# The laptop profile's values (SmolLM2-135M, packaged pairs, a 2-core CPU): everything else is the reference.
LAPTOP_OVERRIDES = dict(
    profile="laptop", base_model="smollm2", train_size=256, test_size=128, max_length=96,
    gradient_accumulation_steps=1, learning_rate=1e-3, warmup_ratio=0.0, lora_last_layers=10,
    load_in_4bit=False, logging_steps=4, held_out_every=None,
)
# Laptop values that depend on the language, applied after LAPTOP_OVERRIDES (and before the settings
# you pass): what the bilingual model needs to learn Chinese on SmolLM2 (notebook 05, section 5.3).
# Measured: with the English recipe (128 pairs per language, one epoch) the held-out accuracy only
# creeps from 0.50 to 0.62 (Chinese 0.58) on the 2-core laptop: Chinese is costly for SmolLM2's
# English-centred tokenizer (notebook 05, section 5.2), so the bilingual run gets the English pairs of
# notebook 04 plus as many Chinese ones, two epochs, and held-out curves to show when it learns.
LAPTOP_LANGUAGE_OVERRIDES = {
    "bilingual": dict(train_size=256, test_size=128, epochs=2.0, held_out_every=16, held_out_pairs=128),
}
TRAINERS = ("trl", "pairwise")
# transformers' lr_scheduler_type values that need no extra arguments (cosine_with_min_lr needs a
# min_lr, reduce_lr_on_plateau an evaluation, ...): the ones a reward run can use as they are.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")


@dataclass
class RewardTrainingConfig(ProfileConfig):
    """Every setting of a reward-model run.

    Defaults are the reference values: the Qwen2-0.5B LoRA seed's (the full profile: hub model and
    data, 4-bit, a GPU).  ``LAPTOP_OVERRIDES`` holds the laptop values, which
    ``RewardTrainingConfig.for_profile("laptop")`` applies (``rlhf_course.core.config``).
    """

    laptop_overrides = LAPTOP_OVERRIDES
    field_checks = {
        "profile": one_of(PROFILES), "language": one_of(LANGUAGES), "trainer": one_of(TRAINERS),
        "base_model": Check(lambda name: isinstance(name, str) and (name in BASE_MODELS or Path(name).is_dir()),
                            f"one of {', '.join(BASE_MODELS)}, or the path of a local model folder"),
        "train_size": POSITIVE_INT.or_none("all pairs"), "test_size": POSITIVE_INT.or_none("all pairs"),
        # 8 tokens: the shortest prompt + reply that still says something; below it every pair is cut to noise
        "max_length": integer(8), "batch_size gradient_accumulation_steps lora_r logging_steps": POSITIVE_INT,
        # a fraction: transformers rounds the steps up, so any epochs > 0 trains at least one step
        "epochs": number(0, low_open=True, note="fractions train part of an epoch, at least one step"),
        "learning_rate lora_alpha": POSITIVE, "weight_decay": NON_NEGATIVE,
        # passed as warmup_steps: a float below 1 is a fraction of the steps, 1 or more a number of steps
        "warmup_ratio": number(0, 1, high_open=True), "lora_dropout": number(0, 1, high_open=True),
        "lr_scheduler": one_of(LR_SCHEDULERS),
        "lora_targets": tuple_of(Check(lambda v: isinstance(v, str) and bool(v), "a module name"),
                                 "module names").or_none("by architecture, LORA_TARGETS"),
        "lora_last_layers": POSITIVE_INT.or_none("all layers"), "load_in_4bit": FLAG, "seed": SEED,
        "held_out_every": POSITIVE_INT.or_none("only after training"), "held_out_pairs": POSITIVE_INT,
        "extra": MAPPING,
    }

    profile: str = field(default="full", metadata={"help": "laptop or full: which data and model world the run is in"})
    language: str = field(default="en", metadata={"help": "preference pairs: en | zh | bilingual"})
    trainer: str = field(default="trl", metadata={"help": "trl (TRL's RewardTrainer) | pairwise (the seed's own Trainer)"})
    base_model: str = field(default="qwen2-0.5b", metadata={
        "help": "smollm2 | qwen2-0.5b | bloom-560m, or the path of a local model folder"})
    train_size: int | None = field(default=None, metadata={"help": "training pairs per language (None: all)"})
    test_size: int | None = field(default=None, metadata={"help": "held-out pairs per language (None: all)"})
    max_length: int = field(default=512, metadata={"help": "tokens per prompt + reply"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training pairs"})
    batch_size: int = field(default=8, metadata={"help": "pairs per step, per process"})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "steps whose gradients are summed per update"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of the steps spent warming up the learning rate"})
    lr_scheduler: str = field(default="linear", metadata={"help": "transformers lr_scheduler_type, e.g. linear or cosine"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lora_r: int = field(default=4, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA input"})
    lora_targets: tuple[str, ...] | None = field(default=None, metadata={
        "help": "module names LoRA adapts (None: by architecture, LORA_TARGETS)"})
    lora_last_layers: int | None = field(default=None, metadata={
        "help": "LoRA only in the top N layers (None: all layers)"})
    load_in_4bit: bool = field(default=True, metadata={
        "help": "QLoRA-style 4-bit base weights (needs CUDA and bitsandbytes; skipped with a note otherwise)"})
    logging_steps: int = field(default=20, metadata={"help": "log loss and accuracy every N steps"})
    held_out_every: int | None = field(default=200, metadata={
        "help": "score held-out pairs every N steps, for learning curves (None: only after training; full: every "
                "200 of hh-rlhf's ~5k optimizer steps, the curve notebook 05 draws)"})
    held_out_pairs: int = field(default=64, metadata={
        "help": "held-out pairs scored for the learning curves (the first N of the test split, shared equally "
                "between its languages)"})
    seed: int = field(default=0, metadata={"help": "seed of the data split, the head's initialisation and the batches"})
    extra: dict = field(default_factory=dict, metadata={
        "help": "anything else, recorded with the model (JSON on the command line)"})

    @classmethod
    def for_profile(cls, profile=None, **overrides):
        """The defaults, then the profile's overrides (laptop: ``LAPTOP_OVERRIDES``, then
        ``LAPTOP_LANGUAGE_OVERRIDES`` of the language asked for), then ``overrides``; validated."""
        if resolve_profile(profile).is_laptop:
            language = overrides.get("language", cls.__dataclass_fields__["language"].default)
            overrides = {**LAPTOP_LANGUAGE_OVERRIDES.get(language, {}), **overrides}
        return super().for_profile(profile, **overrides)

    def validate(self) -> None:
        super().validate()  # one rule per field (field_checks); no relations between fields to check

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        return data


# ----------------------------------------------------------------------------- model and tokenizer


def can_load_in_4bit() -> tuple[bool, str]:
    """(possible, why not): 4-bit weights need a CUDA GPU and the bitsandbytes package."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU on this machine"
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "bitsandbytes is not installed (pip install bitsandbytes)"
    return True, ""


def base_model_source(name: str) -> str:
    """A local folder (laptop) or hub id (full) for a short base-model name, or a local folder."""
    if Path(name).is_dir():
        return str(name)
    if name == "smollm2":
        from rlhf_course.core import assets

        return str(assets.smollm2_path())
    if name not in BASE_MODELS:
        raise ValueError(f"base_model={name!r} is not known; use one of {sorted(BASE_MODELS)} "
                         "or the path of a local model folder")
    return hub.resolve(BASE_MODELS[name])


PAD_TOKEN = "<|pad|>"  # added only when the tokenizer has no special token to spare


def give_distinct_pad_token(tokenizer) -> str:
    """Make ``tokenizer.pad_token`` differ from its eos token; returns what was done, in words.

    transformers' ``*ForSequenceClassification`` reads the last position whose id is not
    ``pad_token_id``.  With pad == eos (SmolLM2-Instruct's ``<|im_end|>``, GPT-2's ``<|endoftext|>``)
    a text that ends with a real eos (TRL appends one; a chat template closes every turn with one)
    is read one token early: the eos counts as padding (notebook 02, "the pad == eos trap").  With a
    pad of its own, the rule finds the last real token, what the attention mask says.  The pad is
    the unknown token when it is a distinct special token (SmolLM2's ``<|endoftext|>``, which never
    occurs in text), else a new ``<|pad|>`` token (``load_reward_base`` then grows the embedding
    table by one row; padding is never attended to).
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return f"pad token {tokenizer.pad_token!r} differs from eos: kept"
    before = tokenizer.pad_token
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return f"pad token {before!r} was eos: now {tokenizer.pad_token!r} (id {tokenizer.pad_token_id})"


def load_tokenizer(name: str):
    """The base model's tokenizer, right-padded, with a pad token distinct from eos (``give_distinct_pad_token``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_source(name))
    give_distinct_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def load_reward_base(name: str, tokenizer, load_in_4bit: bool = False, verbose: bool = True):
    """``AutoModelForSequenceClassification(num_labels=1)`` on the base LM, ``pad_token_id`` set.

    The head reads the last token that is not ``pad_token_id``: without it set, a batch of more
    than one sequence fails; ``tokenizer`` must come from ``load_tokenizer`` (pad != eos), so that
    the token read is the last real token of each text.
    """
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": 1, "dtype": torch.float32}
    if load_in_4bit:
        possible, why_not = can_load_in_4bit()
        if possible:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=half_dtype())
            kwargs["dtype"] = half_dtype()
        else:
            load_in_4bit = False
            if verbose:
                print(f"Note: 4-bit loading skipped ({why_not}); loading full-precision weights instead.")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("the pad token equals eos (or is missing): a text ending with eos would be read one token "
                         "early; load the tokenizer with load_tokenizer (or call give_distinct_pad_token)")
    with quiet_loading():
        model = AutoModelForSequenceClassification.from_pretrained(base_model_source(name), **kwargs)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # a <|pad|> token was added
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # padding is never attended to
    model.config.pad_token_id = tokenizer.pad_token_id
    if verbose:
        print(f"{model.__class__.__name__} from {name}: the score head ({model.score.in_features} -> 1) is new, "
              f"initialised at random (the checkpoint has no such weights); pad {tokenizer.pad_token!r} "
              f"!= eos {tokenizer.eos_token!r}, so the head reads each text's last real token")
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model


def lora_config(config: RewardTrainingConfig, model):
    """PEFT LoRA on q/k/v (per architecture) with the ``score`` head trained in full."""
    from peft import LoraConfig, TaskType

    model_type = model.config.model_type
    targets = config.lora_targets or LORA_TARGETS.get(model_type)
    if targets is None:
        raise ValueError(f"no default LoRA targets for model type {model_type!r}; set lora_targets")
    layers = None
    if config.lora_last_layers is not None:
        n_layers = model.config.num_hidden_layers
        layers = list(range(max(0, n_layers - config.lora_last_layers), n_layers))
    return LoraConfig(
        task_type=TaskType.SEQ_CLS, r=config.lora_r, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout, target_modules=list(targets),
        layers_to_transform=layers,  # laptop: only the top layers, so backprop stops there
        modules_to_save=["score"],  # the new scalar head is trained in full, not through LoRA
    )


def layers_text(layers) -> str:
    """``"20..29"`` for LoRA's ``layers_to_transform``, ``"all"`` when it is None (every layer adapted)."""
    return "all" if layers is None else f"{layers[0]}..{layers[-1]}"


def optimizer_steps_per_epoch(pairs: int, config: RewardTrainingConfig) -> int:
    """Optimizer steps in one epoch of ``pairs``: each step takes ``batch_size x gradient_accumulation_steps``
    pairs (what ``max_steps`` counts in transformers' Trainer); at least one."""
    return max(1, pairs // (config.batch_size * config.gradient_accumulation_steps))


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the hand-written way


@dataclass
class PairwiseRewardCollator:
    """Pads the chosen (j) and rejected (k) sides separately, as the seed's collator did.

    Each feature holds ``input_ids_j``, ``attention_mask_j``, ``input_ids_k``, ``attention_mask_k``;
    any other column (``length``, ``language``) is ignored.
    """

    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        batch = {}
        for side in ("j", "k"):
            padded = self.tokenizer.pad(
                [{"input_ids": f[f"input_ids_{side}"], "attention_mask": f[f"attention_mask_{side}"]}
                 for f in features],
                padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
            batch[f"input_ids_{side}"] = padded["input_ids"]
            batch[f"attention_mask_{side}"] = padded["attention_mask"]
        batch["return_loss"] = True
        return batch


class PairwiseRewardTrainer(Trainer):
    """The seed's Trainer subclass: two forward passes, then the pairwise log-sigmoid loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards_j = model(input_ids=inputs["input_ids_j"], attention_mask=inputs["attention_mask_j"]).logits
        rewards_k = model(input_ids=inputs["input_ids_k"], attention_mask=inputs["attention_mask_k"]).logits
        loss = log_sig_loss(rewards_j.squeeze(-1), rewards_k.squeeze(-1))
        if return_outputs:
            return loss, {"rewards_j": rewards_j, "rewards_k": rewards_k}
        return loss


def add_length_column(dataset, name: str = "length"):
    """The ``group_by_length`` fix: give the length grouper a precomputed length per pair.

    Transformers' ``LengthGroupedSampler`` measures ``input_ids`` unless the data set has a
    ``length`` column (``TrainingArguments.length_column_name``); pairwise data has no
    ``input_ids``, only ``input_ids_j``/``input_ids_k``, so it cannot measure anything.
    """
    with quiet_loading():  # no progress bar for a map over a few hundred rows
        return dataset.map(lambda row: {name: max(len(row["input_ids_j"]), len(row["input_ids_k"]))})


def _common_args(config: RewardTrainingConfig, output_dir) -> dict:
    # A CUDA GPU if get_device picks one (RLHF_DEVICE=cpu keeps the Trainer off it; an absent device raises);
    # on Apple mps the Trainer stays on the CPU, as it always has here (its mps path is untested).
    cpu = get_device().type != "cuda"
    return dict(
        output_dir=str(output_dir), seed=config.seed, data_seed=config.seed,
        num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate, warmup_steps=config.warmup_ratio,  # a float < 1 is a fraction of the steps
        lr_scheduler_type=config.lr_scheduler, weight_decay=config.weight_decay,
        logging_steps=config.logging_steps, save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=cpu, **precision_flags(cpu), activation_checkpointing=False,
        dataloader_num_workers=0,
    )


def pairwise_training_args(config: RewardTrainingConfig, output_dir, **overrides) -> TrainingArguments:
    """TrainingArguments for ``PairwiseRewardTrainer``.

    ``remove_unused_columns=False``: otherwise the Trainer drops every column that is not an
    argument of ``model.forward`` - all four j/k columns - and the batches arrive empty.
    """
    args = _common_args(config, output_dir)
    args.update(remove_unused_columns=False, label_names=[])
    args.update(overrides)
    return TrainingArguments(**args)


def pairwise_trainer(model, tokenizer, train_dataset, config: RewardTrainingConfig, output_dir,
                     **overrides) -> PairwiseRewardTrainer:
    """The hand-written way: a LoRA model (wrapped here) and a j/k-tokenised data set."""
    from peft import PeftModel, get_peft_model

    with quiet_loading():
        if not isinstance(model, PeftModel):
            model = get_peft_model(model, lora_config(config, model))
        return PairwiseRewardTrainer(
            model=model, args=pairwise_training_args(config, output_dir, **overrides),
            train_dataset=train_dataset, data_collator=PairwiseRewardCollator(tokenizer),
            processing_class=tokenizer)


# ----------------------------------------------------------------------------- the library way


def trl_reward_config(config: RewardTrainingConfig, output_dir, **overrides):
    """TRL ``RewardConfig``; ``disable_dropout=False`` keeps LoRA's dropout of 0.1 (TRL's default
    would zero every dropout module, LoRA's included)."""
    from trl import RewardConfig

    args = _common_args(config, output_dir)
    args.update(max_length=config.max_length, disable_dropout=False)
    args.update(overrides)
    return RewardConfig(**args)


def tokenize_for_trl(dataset, tokenizer):
    """``chosen_ids``/``rejected_ids``: ``prompt + chosen`` and ``prompt + rejected`` as token ids, no eos.

    Given text, TRL's ``RewardTrainer`` appends eos to every reply; given these columns it uses the
    ids as they are.  The course's reward models are read at the last token of prompt + reply, the
    same position in every trainer and in ``evaluation.score_texts`` (notebook 04, section 4.4).
    """
    def tokenize(row):
        return {side + "_ids": tokenizer(row["prompt"] + row[side])["input_ids"] for side in ("chosen", "rejected")}

    with quiet_loading():
        return dataset.map(tokenize, remove_columns=dataset.column_names)


def trl_trainer(model, tokenizer, train_dataset, config: RewardTrainingConfig, output_dir, **overrides):
    """The library way: TRL's RewardTrainer on a ``prompt``/``chosen``/``rejected`` data set.

    The text is tokenised here without eos (``tokenize_for_trl``); TRL drops pairs longer than
    ``max_length``, pads, and wraps the model with ``peft_config``.
    """
    from trl import RewardTrainer

    with quiet_loading():
        return RewardTrainer(
            model=model, args=trl_reward_config(config, output_dir, **overrides),
            train_dataset=tokenize_for_trl(train_dataset, tokenizer), processing_class=tokenizer,
            peft_config=lora_config(config, model))


def training_log(trainer) -> list[dict]:
    """The loss/accuracy lines the Trainer logged, without the final summary line."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


class HeldOutCurve(TrainerCallback):
    """Held-out pairwise loss and accuracy during training: before the first step, every ``every``
    steps and after the last, on the pairs of ``frame`` (``prompt``/``chosen``/``rejected``, and
    ``language`` for an accuracy per language).  Rows go to ``self.log``; only the main process
    scores (no collective calls, so the other processes simply go on)."""

    def __init__(self, tokenizer, frame, every: int, max_length: int | None = None, batch_size: int = 32):
        self.tokenizer, self.frame, self.every = tokenizer, frame, every
        self.max_length, self.batch_size = max_length, batch_size
        self.log: list[dict] = []

    @staticmethod
    def pick(test_frame, pairs: int):
        """The first ``pairs`` held-out pairs, shared equally between the languages of ``test_frame``
        (the first ones of each), so a bilingual curve is not one language's curve."""
        if "language" not in test_frame or test_frame["language"].nunique() < 2:
            return test_frame.head(pairs)
        per_language = max(1, pairs // test_frame["language"].nunique())
        return test_frame.groupby("language", sort=False).head(per_language)

    def _score(self, model, step: int) -> None:
        from rlhf_course.reward.evaluation import score_pairs

        was_training = model.training
        scored = score_pairs(model, self.tokenizer, self.frame, self.batch_size, self.max_length)
        if was_training:
            model.train()
        margin = torch.tensor(scored["margin"].to_numpy())
        row = {"step": step, "held_out_loss": float(-torch.nn.functional.logsigmoid(margin).mean()),
               "held_out_accuracy": float(scored["correct"].mean())}
        if "language" in scored and scored["language"].nunique() > 1:
            row.update({f"held_out_accuracy_{language}": float(group.mean())
                        for language, group in scored.groupby("language")["correct"]})
        self.log.append(row)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and state.global_step == 0:
            self._score(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and (state.global_step % self.every == 0
                                            or state.global_step == state.max_steps):
            self._score(model, state.global_step)


# ----------------------------------------------------------------------------- save and reload


def save_reward_model(model, tokenizer, folder, config: RewardTrainingConfig, metrics: dict | None = None):
    """Save the LoRA adapter and score head (a few MB), the tokenizer, and a small model card."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    card = {"base_model": config.base_model, "config": config.to_dict(), "metrics": metrics or {}}
    (folder / MODEL_CARD).write_text(json.dumps(card, indent=2, ensure_ascii=False))
    return folder


def read_model_card(folder) -> dict:
    path = Path(folder) / MODEL_CARD
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {folder} was not written by save_reward_model")
    return json.loads(path.read_text())


def load_reward_model(folder, merge: bool = True):
    """Reload a saved reward model: base model + adapter (+ score head), merged for fast scoring.

    Returns ``(model, tokenizer)`` with the model in eval mode.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    card = read_model_card(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    give_distinct_pad_token(tokenizer)  # saved by save_reward_model with its distinct pad: kept
    tokenizer.padding_side = "right"
    base = load_reward_base(card["base_model"], tokenizer, load_in_4bit=False, verbose=False)
    with quiet_loading():
        model = PeftModel.from_pretrained(base, str(folder))
    if merge:
        model = model.merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
