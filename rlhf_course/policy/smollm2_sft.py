"""The pretrained PPO starting policy: SmolLM2-135M-Instruct with a LoRA adapter fine-tuned on reviews.

``policy/sft.py`` trains a 7.2M-parameter GPT-2 from scratch (held-out perplexity in the hundreds:
review-flavoured word salad).  This module starts instead from a real pretrained model, the packaged
SmolLM2-135M-Instruct (Allal et al. 2025, a Llama-architecture model, 30 blocks, 576 wide, 134.5M
parameters with the tied 49,152-token embedding), and fine-tunes a LoRA adapter (Hu et al. 2022,
"LoRA: Low-Rank Adaptation of Large Language Models") on the same packaged review snippets
(``sft.review_snippets()``: Rotten Tomatoes critics, Pang & Lee, and the rated snippets of Hutto &
Gilbert 2014), so that it continues a review opening as a review and then stops.

Framing: plain continuation, no chat template, as the seed (``lvwerra/gpt2-imdb`` continues an IMDB
opening).  Each training sequence is one snippet, ``text + <|im_end|>``: no BOS (the SmolLM2
tokenizer adds none), the tokenizer's own EOS appended so the policy learns to end a review (PPO's
sampler stops at ``tokenizer.eos_token_id``, and SmolLM2 pads with the same token).  Sequences are
not packed: every snippet starts at position 0, as a PPO query does, and batches are grouped by
length so little is padding.  The loss covers every snippet token and the EOS.

The asset ("sft-smollm2-lora") holds only the adapter (a few MB), its tokenizer and
``sft_metrics.json`` (held-out perplexity of the base model and of the SFT model, samples of both).
``load_smollm2_sft_policy`` merges the adapter into the base weights: the result is a plain
``LlamaForCausalLM``, the SFT policy, on which PPO puts its own fresh LoRA adapter
(``rlhf_course.rl.lora_policy``), so that "adapter disabled" is exactly the SFT model, the reference.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf_course.core import assets
from rlhf_course.core import cache
from rlhf_course.core.quiet import quiet_loading
from rlhf_course.core.config import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED, ProfileConfig, integer
from rlhf_course.policy.sft import clipped_optimizer_step, review_snippets, warmup_cosine_schedule

SMOLLM2_SFT_ASSET = "sft-smollm2-lora"
SMOLLM2_SFT_VERSION = "1"
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # as packaged (GGUF, converted: assets.smollm2_path)
LLAMA_LINEAR_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SAMPLE_OPENINGS = ("This movie", "The film is", "A story about", "I expected", "Watching this", "The acting",
                   "An utterly", "Despite its")

# No laptop overrides: a laptop-only derived asset (sized for a few CPU minutes); the defaults are the laptop's.
LAPTOP_OVERRIDES: dict = {}


@dataclass
class SmolLM2SFTConfig(ProfileConfig):
    """LoRA fine-tuning of SmolLM2-135M-Instruct on review snippets, sized to build in a few CPU minutes.

    Laptop only (no reference values, ``LAPTOP_OVERRIDES`` is empty).  The fields are recorded in
    ``sft_metrics.json``.  Cost: about 6 x 134.5M FLOPs per trained token; 120 steps of 8 snippets
    (~27 tokens each) is ~26k tokens.
    """

    laptop_overrides = LAPTOP_OVERRIDES
    field_checks = {
        "lora_r batch_size steps held_out n_samples sample_tokens": POSITIVE_INT, "lora_alpha": POSITIVE,
        "lora_layers": NON_NEGATIVE_INT, "max_tokens": integer(2, note="a next-token loss needs 2 tokens"),
        "learning_rate": POSITIVE, "warmup_steps": NON_NEGATIVE_INT, "weight_decay": NON_NEGATIVE, "seed": SEED,
        "train_snippets": POSITIVE_INT.or_none("every snippet not held out"),
    }

    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale numerator (scale = alpha / r)"})
    target_modules: str = field(default=LLAMA_LINEAR_MODULES, metadata={
        "help": "comma-separated linear layers that get an adapter (all seven of a Llama block)"})
    lora_layers: int = field(default=0, metadata={"help": "adapt only the top N blocks (0: all 30)"})
    max_tokens: int = field(default=80, metadata={
        "help": "longest training sequence, EOS included (snippets: median 25, max 78 tokens)"})
    batch_size: int = field(default=8, metadata={"help": "snippets per optimiser step"})
    steps: int = field(default=120, metadata={"help": "optimiser steps (~1,000 snippets, ~26k tokens)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate of the adapter"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps before the cosine decay"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (0: as PEFT's examples)"})
    held_out: int = field(default=160, metadata={"help": "snippets kept aside for the held-out perplexity"})
    train_snippets: int | None = field(default=None, metadata={
        "help": "use only this many training snippets (tests: a tiny slice); None: all"})
    n_samples: int = field(default=8, metadata={"help": "openings continued by base and SFT model (metrics)"})
    sample_tokens: int = field(default=40, metadata={"help": "new tokens per sample"})
    seed: int = field(default=0, metadata={"help": "seed of the split, the adapter's initialisation, the batches"})

    def validate(self) -> None:
        super().validate()
        if self.warmup_steps > self.steps:
            raise ValueError(f"SmolLM2SFTConfig: warmup_steps={self.warmup_steps} is more than steps={self.steps}")
        if not [m for m in self.target_modules.split(",") if m.strip()]:
            raise ValueError("SmolLM2SFTConfig: target_modules names no module; e.g. " + LLAMA_LINEAR_MODULES)


def causal_lm_lora_config(r: int, alpha: float, target_modules: str, top_layers: int = 0, n_layers: int | None = None):
    """A PEFT ``LoraConfig`` for a causal LM: no dropout (PPO's ratio must start at 1), no bias."""
    from peft import LoraConfig

    layers = None
    if top_layers and n_layers is not None and top_layers < n_layers:
        layers = list(range(n_layers - top_layers, n_layers))
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=[m.strip() for m in target_modules.split(",") if m.strip()],
                      layers_to_transform=layers)


def encode_snippets(texts: list[str], tokenizer, max_tokens: int) -> list[list[int]]:
    """``text + EOS`` token ids for each snippet (no BOS); a snippet cut at ``max_tokens`` gets no EOS."""
    eos = tokenizer.eos_token_id
    sequences = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = ids + [eos]
        sequences.append(ids[:max_tokens])
    return sequences


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``; labels are -100 on padding (no loss there)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def length_grouped_batches(sequences: list[list[int]], batch_size: int, generator: torch.Generator,
                           group: int = 16) -> list[list[int]]:
    """One epoch of batches (indices): shuffled, sorted by length within chunks of ``group`` batches,
    then the batches shuffled (HF ``group_by_length``): random batches, little padding."""
    order = torch.randperm(len(sequences), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), batch_size * group):
        chunk = sorted(order[start:start + batch_size * group], key=lambda i: len(sequences[i]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


@torch.no_grad()
def heldout_nll(model, sequences: list[list[int]], pad_id: int, eos_id: int, batch_size: int = 16) -> dict:
    """Token-level negative log-likelihood on ``sequences``: all tokens, text tokens only, the EOS alone.

    Returns ``{"loss", "perplexity", "text_perplexity", "eos_nll", "tokens"}``; ``perplexity`` counts
    the EOS target too (how well the model knows where a review ends), ``text_perplexity`` does not.
    """
    was_training = model.training
    model.eval()
    total = text_total = eos_total = 0.0
    count = text_count = eos_count = 0
    for start in range(0, len(sequences), batch_size):
        ids, mask, labels = pad_batch(sequences[start:start + batch_size], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        real, is_eos = targets != -100, targets == eos_id
        total += nll[real].sum().item()
        count += int(real.sum())
        text_total += nll[real & ~is_eos].sum().item()
        text_count += int((real & ~is_eos).sum())
        eos_total += nll[is_eos].sum().item()
        eos_count += int(is_eos.sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "text_perplexity": math.exp(text_total / max(text_count, 1)),
            "eos_nll": eos_total / max(eos_count, 1), "tokens": count}


@torch.no_grad()
def sample_continuations(model, tokenizer, openings, max_new_tokens: int, seed: int = 0) -> list[dict]:
    """Sampled continuations (temperature 1, no top-k/top-p, as PPO samples) of each opening, all at
    once (left padding), with whether the model ended the text itself (EOS) within ``max_new_tokens``."""
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(opening, add_special_tokens=False)["input_ids"] for opening in openings]
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([[eos] * (width - len(e)) + e for e in encoded])  # left padding: all continue at one column
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
    results = []
    for opening, row in zip(openings, out[:, width:].tolist()):
        ended = eos in row
        new = row[:row.index(eos) + 1] if ended else row
        text = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True)
        results.append({"opening": opening, "continuation": text, "ended_with_eos": ended, "tokens": len(new)})
    model.train(was_training)
    return results


def train_smollm2_sft(folder: Path, config: SmolLM2SFTConfig | None = None, progress: bool = True,
                      base=None, tokenizer=None) -> dict:
    """Fine-tune a LoRA adapter on the review snippets; save adapter, tokenizer and ``sft_metrics.json``.

    ``base``/``tokenizer`` default to the packaged SmolLM2-135M-Instruct (tests pass a tiny Llama).
    The held-out perplexity and samples are taken before training (the base model) and after it.
    """
    from peft import get_peft_model
    from tqdm.auto import tqdm

    config = config or SmolLM2SFTConfig()
    config.validate()
    started = time.time()
    torch.manual_seed(config.seed)
    tokenizer = tokenizer or assets.smollm2_tokenizer()
    base = base if base is not None else assets.smollm2_causal_lm()
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    n_parameters = sum(p.numel() for p in base.parameters())
    texts = review_snippets()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(config.seed)).tolist()
    texts = [texts[i] for i in order]
    held_out_texts, train_texts = texts[:config.held_out], texts[config.held_out:]
    if config.train_snippets is not None:
        train_texts = train_texts[:config.train_snippets]
    held_out = encode_snippets(held_out_texts, tokenizer, config.max_tokens)
    train = encode_snippets(train_texts, tokenizer, config.max_tokens)
    openings = (list(SAMPLE_OPENINGS) * (config.n_samples // len(SAMPLE_OPENINGS) + 1))[:config.n_samples]

    base_heldout = heldout_nll(base, held_out, pad_id, eos_id)
    base_samples = sample_continuations(base, tokenizer, openings, config.sample_tokens, config.seed)
    with quiet_loading():
        model = get_peft_model(base, causal_lm_lora_config(config.lora_r, config.lora_alpha, config.target_modules,
                                                           config.lora_layers, base.config.num_hidden_layers))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)

    scheduler = warmup_cosine_schedule(optimizer, config.warmup_steps, config.steps)  # decays to 10% of the peak
    generator = torch.Generator().manual_seed(config.seed)
    batches: list[list[int]] = []
    losses, tokens_seen, train_started = [], 0, time.time()
    model.train()
    bar = tqdm(range(config.steps), desc="SFT SmolLM2 + LoRA", disable=not progress)
    for step in bar:
        if not batches:
            batches = length_grouped_batches(train, config.batch_size, generator)
        ids, mask, labels = pad_batch([train[i] for i in batches.pop()], pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        clipped_optimizer_step(loss, model, optimizer, scheduler)
        losses.append(loss.item())
        tokens_seen += int(mask.sum())
        if step % 5 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.time() - train_started
    sft_heldout = heldout_nll(model, held_out, pad_id, eos_id)
    sft_samples = sample_continuations(model, tokenizer, openings, config.sample_tokens, config.seed)
    metrics = {
        "config": asdict(config),
        "base_model": BASE_MODEL_NAME,
        "parameters": n_parameters,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "train_snippets": len(train),
        "held_out_snippets": len(held_out),
        "tokens_seen": tokens_seen,
        "losses": losses,
        "final_train_loss": float(sum(losses[-10:]) / len(losses[-10:])),
        "base": {**base_heldout, "samples": base_samples},
        "sft": {**sft_heldout, "samples": sft_samples},
        "train_seconds": train_seconds,
        "tokens_per_second": tokens_seen / max(train_seconds, 1e-9),
        "build_seconds": time.time() - started,
        "torch_threads": torch.get_num_threads(),
    }
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME
    model.save_pretrained(str(folder), save_embedding_layers=False)  # the adapter only (adapter_model.safetensors + adapter_config.json)
    (Path(folder) / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    tokenizer.save_pretrained(str(folder))
    (Path(folder) / "sft_metrics.json").write_text(json.dumps(metrics, indent=1))
    ended = sum(s["ended_with_eos"] for s in sft_samples), sum(s["ended_with_eos"] for s in base_samples)
    print(f"SFT SmolLM2 + LoRA: {metrics['trainable_parameters'] / 1e6:.2f}M trained parameters, {config.steps} steps, "
          f"{tokens_seen} tokens; held-out perplexity {base_heldout['perplexity']:.1f} (base) -> "
          f"{sft_heldout['perplexity']:.1f} (SFT); samples ending with EOS {ended[1]}/{len(openings)} -> "
          f"{ended[0]}/{len(openings)}", flush=True)
    return metrics


def smollm2_sft_path() -> Path:
    """Folder of the SmolLM2 SFT adapter (asset "sft-smollm2-lora"): built on first use (a few CPU minutes)."""
    return cache.cached_build(SMOLLM2_SFT_ASSET, lambda folder: train_smollm2_sft(folder), version=SMOLLM2_SFT_VERSION)


def smollm2_sft_metrics() -> dict:
    """``sft_metrics.json`` of the SmolLM2 SFT asset: held-out perplexity and samples, base vs SFT."""
    return json.loads((smollm2_sft_path() / "sft_metrics.json").read_text())


def merge_sft_adapter(base, folder: Path | str):
    """``base`` with the SFT adapter in ``folder`` merged into its weights: a plain causal LM again."""
    from peft import PeftModel

    with cache.explain_load_errors(folder), quiet_loading():
        return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()


def load_smollm2_sft_policy(device: torch.device | str = "cpu"):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct with the SFT adapter merged in (pad = eos = <|im_end|>)."""
    folder = smollm2_sft_path()
    model = merge_sft_adapter(assets.smollm2_causal_lm(), folder).to(device).eval()
    return model, assets.smollm2_tokenizer()


def load_ppo_sft_policy(device: torch.device | str = "cpu", profile=None):
    """``(model, tokenizer)``: the SFT policy that PPO starts from in notebooks 06-09, by profile.

    laptop: SmolLM2-135M-Instruct with the review SFT adapter merged (asset "sft-smollm2-lora");
    full: the seed's ``lvwerra/gpt2-imdb`` (``policy.sft.load_sft_policy``).  ``policy.sft``'s laptop policy,
    the 7.2M GPT-2 trained from scratch, remains for notebook 09's first TRL runs (9.2-9.4).
    """
    from rlhf_course.core.profiles import current_profile
    from rlhf_course.policy.sft import load_sft_policy

    profile = profile or current_profile()
    return load_smollm2_sft_policy(device) if str(profile) == "laptop" else load_sft_policy(device)
