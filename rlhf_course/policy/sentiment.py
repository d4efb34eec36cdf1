"""The PPO reward: a sentiment classifier whose POSITIVE logit scores a text.

In the classic experiment (Ziegler et al. 2019; TRL's ``gpt2-sentiment`` example) the reward is the
raw POSITIVE logit of ``lvwerra/distilbert-imdb``, read through
``pipeline("sentiment-analysis", top_k=None, function_to_apply="none")`` (no softmax, so the
reward is unbounded and keeps a gradient signal when the classifier is already confident).  The
full profile does exactly that.

DistilBERT is not available offline, so the laptop profile fine-tunes the packaged all-MiniLM-L6-v2
encoder (Wang et al. 2020, MiniLM) as a 2-class sequence classifier on the labelled Rotten Tomatoes
critic snippets (Pang & Lee 2005; fresh = POSITIVE, rotten = NEGATIVE), keeps a held-out split and
stores its accuracy next to the model.

``SentimentReward`` is the reward every RL notebook uses: ``reward(texts) -> tensor`` of POSITIVE
logits, one per text, and TRL's ``reward(prompts=..., completions=...)`` for RLOO and GRPO.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from rlhf_course.core import assets, cache, hub
from rlhf_course.core.config import POSITIVE, POSITIVE_INT, SEED, ProfileConfig, integer
from rlhf_course.core.profiles import current_profile
from rlhf_course.core.text import batched_forward
from rlhf_course.policy.sft import clipped_optimizer_step

FULL_PROFILE_CLASSIFIER = "lvwerra/distilbert-imdb"
CLASSIFIER_ASSET = "sentiment-classifier"
CLASSIFIER_VERSION = "2"
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


# No laptop overrides: the classifier is fine-tuned in the laptop profile only (the full profile
# downloads lvwerra/distilbert-imdb), so there are no reference values and the defaults are the laptop's.
LAPTOP_OVERRIDES: dict = {}


@dataclass
class ClassifierConfig(ProfileConfig):
    """Fine-tuning schedule of the laptop classifier (a few CPU minutes).

    Laptop only: a derived asset the full profile never builds (it downloads
    ``lvwerra/distilbert-imdb``), so there are no reference values; the defaults are the laptop
    values and ``LAPTOP_OVERRIDES`` is empty.  The fields are recorded in ``classifier_metrics.json``.
    """

    laptop_overrides = LAPTOP_OVERRIDES
    field_checks = {
        # [CLS] + [SEP] take 2 tokens; MiniLM-L6 has 512 positions
        "max_length": integer(3, 512), "batch_size steps held_out": POSITIVE_INT, "seed": SEED,
        "learning_rate head_learning_rate": POSITIVE, "warmup_steps": POSITIVE_INT,  # the schedule divides by it
    }

    max_length: int = field(default=48, metadata={
        "help": "tokens per snippet: Rotten Tomatoes snippets are at most 255 characters (~45 tokens)"})
    batch_size: int = field(default=32, metadata={"help": "snippets per step"})
    steps: int = field(default=240, metadata={
        "help": "optimiser steps: ~7,700 snippets, two-thirds of an epoch, a few CPU minutes"})
    learning_rate: float = field(default=1e-4, metadata={
        "help": "encoder learning rate; BERT fine-tuning uses 2e-5..5e-5 for 3 epochs, higher for one short pass"})
    head_learning_rate: float = field(default=3e-3, metadata={
        "help": "the fresh 2-way head's learning rate: a higher rate lets its logits reach a useful scale"})
    warmup_steps: int = field(default=24, metadata={"help": "linear warm-up steps"})
    held_out: int = field(default=1000, metadata={"help": "snippets kept aside to report held-out accuracy"})
    seed: int = field(default=0, metadata={"help": "seed of the split, the head's initialisation and the batches"})

    def validate(self) -> None:
        super().validate()  # one rule per field (field_checks), then the relation between them
        if self.warmup_steps > self.steps:
            raise ValueError(f"ClassifierConfig: warmup_steps={self.warmup_steps} is more than steps={self.steps}; "
                             f"use at most {self.steps} (the default is 24 of 240)")


def labelled_snippets(seed: int = 0, held_out: int = 1000):
    """Balanced-split Rotten Tomatoes snippets: ``(train_texts, train_labels, test_texts, test_labels)``."""
    data = assets.rotten_tomatoes().shuffle(seed=seed)
    texts, labels = list(data["text"]), list(data["label"])
    if held_out >= len(texts):
        raise ValueError(f"held_out={held_out} leaves no training data ({len(texts)} snippets)")
    return texts[held_out:], labels[held_out:], texts[:held_out], labels[:held_out]


def accuracy(model, tokenizer, texts: list[str], labels: list[int], max_length: int = 48, batch_size: int = 64) -> float:
    """Share of ``texts`` whose most likely class is its label (on the model's own device)."""
    predictions = batched_forward(model, tokenizer, texts, lambda out: out.logits.argmax(-1), batch_size, max_length)
    return (predictions == torch.tensor(labels)).sum().item() / len(texts)


def train_sentiment_classifier(folder: Path, config: ClassifierConfig | None = None, progress: bool = True) -> dict:
    """Fine-tune MiniLM-L6 on Rotten Tomatoes; save model, tokenizer and ``classifier_metrics.json``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification

    config = config or ClassifierConfig()
    config.validate()
    torch.manual_seed(config.seed)
    tokenizer = assets.minilm_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(
        str(assets.minilm_path()), num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    train_texts, train_labels, test_texts, test_labels = labelled_snippets(config.seed, config.held_out)
    # Differential learning rates (Howard & Ruder 2018, ULMFiT): the new head learns fast, the encoder gently.
    # Without it, a short fine-tune leaves the POSITIVE logit within about +-1.5, a cramped reward scale for PPO.
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    optimizer = torch.optim.AdamW([{"params": body, "lr": config.learning_rate},
                                   {"params": head, "lr": config.head_learning_rate}], weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / config.warmup_steps, max(0.0, (config.steps - s) / max(1, config.steps - config.warmup_steps)))
    )
    generator = torch.Generator().manual_seed(config.seed)
    started, losses = time.time(), []
    model.train()
    for step in (bar := tqdm(range(config.steps), desc="sentiment classifier", disable=not progress)):
        index = torch.randint(len(train_texts), (config.batch_size,), generator=generator).tolist()
        batch = tokenizer([train_texts[i] for i in index], padding=True, truncation=True,
                          max_length=config.max_length, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor([train_labels[i] for i in index])).loss
        clipped_optimizer_step(loss, model, optimizer, scheduler)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    held_out_accuracy = accuracy(model, tokenizer, test_texts, test_labels, config.max_length)
    majority = max(sum(test_labels), len(test_labels) - sum(test_labels)) / len(test_labels)
    metrics = {
        "config": asdict(config),
        "train_examples": len(train_texts),
        "held_out_examples": len(test_texts),
        "held_out_accuracy": held_out_accuracy,
        "majority_class_accuracy": majority,
        "train_seconds": time.time() - started,
        "losses": losses,
    }
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (Path(folder) / "classifier_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"Sentiment classifier: held-out accuracy {held_out_accuracy:.3f} on {len(test_texts)} snippets "
          f"(majority class {majority:.3f})", flush=True)
    return metrics


def sentiment_classifier_path() -> Path:
    """Folder of the reward classifier: built on first use (laptop) or ``lvwerra/distilbert-imdb`` (full)."""
    if current_profile().is_full:
        return Path(hub.download(FULL_PROFILE_CLASSIFIER))
    return cache.cached_build(CLASSIFIER_ASSET, lambda folder: train_sentiment_classifier(folder),
                               version=CLASSIFIER_VERSION)


def classifier_metrics() -> dict | None:
    """The laptop classifier's training metrics, held-out accuracy included (None in full profile)."""
    path = sentiment_classifier_path() / "classifier_metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def positive_label_index(classifier) -> int:
    """Index of the label named POSITIVE (any case) in ``classifier.config.id2label``; fails loudly.

    Passing a 2-class sentiment model straight to TRL's RLOO/GRPO as ``reward_funcs`` makes TRL read
    ``logits[:, 0]``, which for these models is the NEGATIVE class (notebook 09 shows the trap).
    """
    id2label = getattr(getattr(classifier, "config", None), "id2label", None) or {}
    matches = [int(i) for i, name in id2label.items() if str(name).upper() == "POSITIVE"]
    if len(matches) != 1:
        raise ValueError(
            f"Cannot tell which logit is POSITIVE from id2label={id2label}. Name the labels in the "
            "classifier's config (e.g. {0: 'NEGATIVE', 1: 'POSITIVE'}) or pass positive_index=..."
        )
    return matches[0]


class SentimentReward:
    """The POSITIVE logit of a sentiment classifier: the reward of the seed's PPO and of TRL's RLOO/GRPO.

    ``reward(texts) -> torch.Tensor``, one score per text, as the course's PPO calls it.  This equals
    the seed's ``pipeline("sentiment-analysis", top_k=None, function_to_apply="none")`` followed by
    picking the POSITIVE score, batched straight through the model.  TRL calls a reward function as
    ``reward(prompts=..., completions=..., **columns)`` and wants a list of floats; the same object
    answers that call too, scoring prompt + completion together as the classifier saw whole snippets.

    ``source`` is a folder (loaded with its tokenizer) or a loaded classifier, then with ``tokenizer``.
    """

    __name__ = "positive_logit"  # TRL logs rewards under the callable's name

    def __init__(self, source, tokenizer=None, device: torch.device | str | None = None,
                 positive_index: int | None = None, batch_size: int = 64, max_length: int = 128):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(source, (str, Path)):
            self.tokenizer = AutoTokenizer.from_pretrained(str(source))
            self.model = AutoModelForSequenceClassification.from_pretrained(str(source)).to(device or "cpu")
        elif tokenizer is None:
            raise ValueError("SentimentReward(model, tokenizer): a loaded classifier needs its tokenizer.")
        else:
            self.model, self.tokenizer = source.to(device) if device is not None else source, tokenizer
        self.model.eval()
        self.positive_index = positive_label_index(self.model) if positive_index is None else positive_index
        self.batch_size, self.max_length = batch_size, max_length

    def score_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """The POSITIVE logit of each text, a float tensor on the CPU."""
        return batched_forward(self.model, self.tokenizer, texts, lambda out: out.logits[:, self.positive_index].float(),
                               self.batch_size, self.max_length)

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """P(POSITIVE) for each text, for tables a reader can interpret."""
        return batched_forward(self.model, self.tokenizer, texts, lambda out: out.logits.softmax(-1)[:, self.positive_index],
                               self.batch_size, self.max_length)

    def __call__(self, texts: Sequence[str] | None = None, *, prompts: Sequence[str] | None = None,
                 completions: Sequence[str] | None = None, **_columns):
        if completions is not None:  # TRL's reward-function call: a list of floats
            return self.score_texts([p + c for p, c in zip(prompts, completions, strict=True)]).tolist()
        if texts is None:
            raise TypeError("call reward(texts), or reward(prompts=..., completions=...) as TRL does.")
        return self.score_texts(texts)


def sentiment_reward(device: torch.device | str = "cpu") -> SentimentReward:
    """The profile's reward function (laptop: built on first use; full: lvwerra/distilbert-imdb)."""
    return SentimentReward(sentiment_classifier_path(), device=device)
