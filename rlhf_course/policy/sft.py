"""The PPO starting policy: a GPT-2-architecture language model of movie reviews.

The classic sentiment experiment (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"; TRL's ``gpt2-sentiment`` example) starts PPO from ``lvwerra/gpt2-imdb``: GPT-2
fine-tuned for one epoch on IMDB reviews, i.e. a *supervised fine-tuned* (SFT) policy that already
writes in the domain.  The full profile loads that model from the hub.

GPT-2's weights are not available offline, so the laptop profile trains a small stand-in from
scratch: a ``GPT2Config`` model (4 layers, 128 wide, 7.2M parameters, most of them the
tied 50,257-token embedding) with the *real* GPT-2 tokenizer, on the movie
review snippets that ship with the course (Rotten Tomatoes critics, Pang & Lee, plus the rated
snippets of Hutto & Gilbert 2014).  Each snippet ends with ``<|endoftext|>``, so the policy learns
to finish a review, which is what lets PPO responses stop at EOS instead of running to the maximum
length.  Sequences are packed into fixed blocks, as in Hugging Face's ``run_clm`` recipe.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf_course.core import assets, cache, hub
from rlhf_course.core.config import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED, ProfileConfig, integer
from rlhf_course.core.profiles import current_profile

FULL_PROFILE_POLICY = "lvwerra/gpt2-imdb"
SFT_ASSET = "sft-policy"
SFT_VERSION = "1"


# No laptop overrides: the SFT policy is trained in the laptop profile only (the full profile
# downloads lvwerra/gpt2-imdb), so there are no reference values and the defaults are the laptop's.
LAPTOP_OVERRIDES: dict = {}


@dataclass
class SFTConfig(ProfileConfig):
    """Size and schedule of the laptop SFT policy (chosen to train in a few CPU minutes).

    Laptop only: a derived asset the full profile never builds (it downloads ``lvwerra/gpt2-imdb``),
    so there are no reference values; the defaults are the laptop values and ``LAPTOP_OVERRIDES``
    is empty.  The fields are recorded in ``sft_metrics.json``.
    """

    laptop_overrides = LAPTOP_OVERRIDES
    field_checks = {
        "n_layer n_embd n_head batch_size steps held_out": POSITIVE_INT, "seed": SEED,
        "block_size": integer(2, note="a next-token loss needs 2 tokens"), "learning_rate": POSITIVE,
        "warmup_steps": NON_NEGATIVE_INT, "weight_decay": NON_NEGATIVE,
    }

    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_embd: int = field(default=128, metadata={
        "help": "width; the 50,257-way output layer dominates the cost: width 128 keeps it CPU-sized"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    block_size: int = field(default=64, metadata={
        "help": "tokens per packed training sequence; snippets average ~25 tokens"})
    batch_size: int = field(default=16, metadata={"help": "packed sequences per step"})
    steps: int = field(default=200, metadata={
        "help": "optimiser steps: ~200k tokens, a third of an epoch, enough to write review-like text"})
    learning_rate: float = field(default=2e-3, metadata={
        "help": "peak AdamW learning rate: small models trained from scratch tolerate a high rate"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps before the cosine decay"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    held_out: int = field(default=500, metadata={"help": "snippets kept aside to report held-out loss / perplexity"})
    seed: int = field(default=0, metadata={"help": "seed of the snippet order, the initialisation and the batches"})

    def validate(self) -> None:
        super().validate()  # one rule per field (field_checks), then the relations between them
        if self.n_embd % self.n_head:
            raise ValueError(f"SFTConfig: n_embd={self.n_embd} must be a multiple of n_head={self.n_head} (each head "
                             "gets n_embd / n_head dimensions); e.g. n_embd=128, n_head=4")
        if self.warmup_steps > self.steps:
            raise ValueError(f"SFTConfig: warmup_steps={self.warmup_steps} is more than steps={self.steps}; "
                             f"use at most {self.steps} (the default is 20 of 200)")


def review_snippets() -> list[str]:
    """Every distinct movie-review snippet available offline (critic snippets + rated snippets)."""
    texts = list(assets.rotten_tomatoes()["text"]) + list(assets.rated_movie_snippets()["text"])
    seen, unique = set(), []
    for text in texts:
        text = " ".join(text.split())
        if len(text) >= 20 and text not in seen:
            seen.add(text)
            unique.append(text)
    return unique


def pack_blocks(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Tokenise ``text<|endoftext|>`` for every snippet, concatenate, cut into equal blocks."""
    ids: list[int] = []
    for encoded in tokenizer(texts)["input_ids"]:
        ids.extend(encoded + [tokenizer.eos_token_id])
    usable = len(ids) // block_size * block_size
    if usable == 0:
        raise ValueError(f"{len(texts)} texts give only {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[:usable]).view(-1, block_size)


def small_gpt2_config(config: SFTConfig, vocab_size: int = 50257):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=max(128, config.block_size),  # room for PPO's query (<=8) + response (<=16)
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        bos_token_id=50256,
        eos_token_id=50256,
    )


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch_size)]
    model.train()
    return float(sum(losses) / max(len(losses), 1))


def warmup_cosine_schedule(optimizer, warmup_steps: int, steps: int, floor: float = 0.1):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``floor`` times the peak learning
    rate at ``steps`` (the GPT-2 / nanoGPT schedule), as a ``LambdaLR``."""

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def clipped_optimizer_step(loss, model, optimizer, scheduler, max_grad_norm: float = 1.0) -> None:
    """backward, clip the global gradient norm, step optimizer and LR schedule, clear the gradients.

    The supervised loop shared by the SFT policy and the sentiment classifier (nanoGPT / HF ``Trainer`` order).
    """
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_sft_policy(folder: Path, config: SFTConfig | None = None, progress: bool = True) -> dict:
    """Train the laptop SFT policy and save model, tokenizer and ``sft_metrics.json`` to ``folder``."""
    from tqdm.auto import tqdm
    from transformers import GPT2LMHeadModel

    config = config or SFTConfig()
    config.validate()
    torch.manual_seed(config.seed)
    tokenizer = assets.gpt2_tokenizer()
    texts = review_snippets()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(config.seed)).tolist()
    texts = [texts[i] for i in order]
    train_blocks = pack_blocks(texts[config.held_out:], tokenizer, config.block_size)
    held_out_blocks = pack_blocks(texts[: config.held_out], tokenizer, config.block_size)
    model = GPT2LMHeadModel(small_gpt2_config(config, len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    scheduler = warmup_cosine_schedule(optimizer, config.warmup_steps, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    started, losses = time.time(), []
    bar = tqdm(range(config.steps), desc="SFT policy", disable=not progress)
    for step in bar:
        batch = train_blocks[torch.randint(len(train_blocks), (config.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        clipped_optimizer_step(loss, model, optimizer, scheduler)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    held_out_loss = mean_loss(model, held_out_blocks)
    metrics = {
        "config": asdict(config),
        "train_snippets": len(texts) - config.held_out,
        "train_tokens": int(train_blocks.numel()),
        "tokens_seen": config.steps * config.batch_size * config.block_size,
        "final_train_loss": float(sum(losses[-20:]) / len(losses[-20:])),
        "held_out_loss": held_out_loss,
        "held_out_perplexity": math.exp(held_out_loss),
        "train_seconds": time.time() - started,
        "losses": losses,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (Path(folder) / "sft_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(
        f"SFT policy: {metrics['parameters'] / 1e6:.1f}M parameters, {config.steps} steps, "
        f"held-out loss {held_out_loss:.3f} (perplexity {metrics['held_out_perplexity']:.0f})",
        flush=True,
    )
    return metrics


def sft_policy_path() -> Path:
    """Folder of the PPO starting policy: built on first use (laptop) or ``lvwerra/gpt2-imdb`` (full)."""
    if current_profile().is_full:
        return Path(hub.download(FULL_PROFILE_POLICY))
    return cache.cached_build(SFT_ASSET, lambda folder: train_sft_policy(folder), version=SFT_VERSION)


def sft_metrics() -> dict | None:
    """The laptop SFT policy's training metrics (None in the full profile)."""
    path = sft_policy_path() / "sft_metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def load_sft_policy(device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` for the PPO starting policy; the tokenizer is GPT-2's, pad = eos."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(sft_policy_path())).to(device)
    return model, assets.gpt2_tokenizer()
