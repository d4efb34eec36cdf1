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

``SentimentReward`` is the function every RL notebook uses: ``reward(texts) -> tensor`` of POSITIVE
logits, one per text.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_course.core import assets
from rlhf_course.core.profiles import current_profile, require_hub
from rlhf_course.policy.sft import clipped_optimizer_step

FULL_PROFILE_CLASSIFIER = "lvwerra/distilbert-imdb"
CLASSIFIER_ASSET = "sentiment-classifier"
CLASSIFIER_VERSION = "2"
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


@dataclass
class ClassifierConfig:
    """Fine-tuning schedule of the laptop classifier (a few CPU minutes)."""

    max_length: int = 48  # Rotten Tomatoes snippets are at most 255 characters (~45 tokens)
    batch_size: int = 32
    steps: int = 240  # ~7,700 snippets, two-thirds of an epoch: a few CPU minutes
    learning_rate: float = 1e-4  # encoder; BERT fine-tuning uses 2e-5..5e-5 for 3 epochs, higher for one short pass
    head_learning_rate: float = 3e-3  # the fresh 2-way head: a higher rate lets its logits reach a useful scale
    warmup_steps: int = 24
    held_out: int = 1000
    seed: int = 0


def labelled_snippets(seed: int = 0, held_out: int = 1000):
    """Balanced-split Rotten Tomatoes snippets: ``(train_texts, train_labels, test_texts, test_labels)``."""
    data = assets.rotten_tomatoes().shuffle(seed=seed)
    texts, labels = list(data["text"]), list(data["label"])
    if held_out >= len(texts):
        raise ValueError(f"held_out={held_out} leaves no training data ({len(texts)} snippets)")
    return texts[held_out:], labels[held_out:], texts[:held_out], labels[:held_out]


@torch.no_grad()
def accuracy(model, tokenizer, texts: list[str], labels: list[int], max_length: int = 48, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        predictions = model(**batch).logits.argmax(-1)
        correct += (predictions == torch.tensor(labels[start:start + batch_size])).sum().item()
    return correct / len(texts)


def train_sentiment_classifier(folder: Path, config: ClassifierConfig | None = None, progress: bool = True) -> dict:
    """Fine-tune MiniLM-L6 on Rotten Tomatoes; save model, tokenizer and ``classifier_metrics.json``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification

    config = config or ClassifierConfig()
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
        require_hub(f"the sentiment classifier '{FULL_PROFILE_CLASSIFIER}'")
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(FULL_PROFILE_CLASSIFIER))
    return assets.cached_build(CLASSIFIER_ASSET, lambda folder: train_sentiment_classifier(folder),
                               version=CLASSIFIER_VERSION)


def classifier_metrics() -> dict | None:
    """The laptop classifier's training metrics, held-out accuracy included (None in full profile)."""
    path = sentiment_classifier_path() / "classifier_metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


class SentimentReward:
    """``reward(texts) -> torch.Tensor``: the POSITIVE logit of each text (the seed's PPO reward).

    Equivalent to the seed's ``pipeline("sentiment-analysis", top_k=None, function_to_apply="none")``
    followed by picking the POSITIVE score, but batched straight through the model.
    """

    def __init__(self, path: Path | str | None = None, device: torch.device | str = "cpu",
                 batch_size: int = 64, max_length: int = 128):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = str(path or sentiment_classifier_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        label2id = {str(k).upper(): v for k, v in self.model.config.label2id.items()}
        if "POSITIVE" not in label2id:
            raise ValueError(f"The classifier at {path} has labels {self.model.config.label2id}; "
                             "the reward needs one named POSITIVE (set config.label2id).")
        self.positive_index = int(label2id["POSITIVE"])
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("SentimentReward expects a list of texts, got one string; wrap it in a list.")
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            scores.append(self.model(**batch).logits[:, self.positive_index].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """P(POSITIVE) for each text, for tables a reader can interpret."""
        with torch.no_grad():
            out = []
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                out.append(self.model(**batch).logits.softmax(-1)[:, self.positive_index].cpu())
        return torch.cat(out) if out else torch.zeros(0)


def sentiment_reward(device: torch.device | str = "cpu") -> SentimentReward:
    """The profile's reward function (laptop: built on first use; full: lvwerra/distilbert-imdb)."""
    return SentimentReward(sentiment_classifier_path(), device=device)
