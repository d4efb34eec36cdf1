"""Where a reward model's scalar comes from: read-outs over per-token hidden states or values.

A transformer gives one hidden vector per token; a reward model must reduce the sequence to one
number.  The seeds do it in different ways, and the choice changes the scores:

* **Last real token** of a causal LM (InstructGPT-style reward models, TRL / transformers
  ``*ForSequenceClassification``).  Where "last" is depends on the padding side, and on how the
  padding is found: from the attention mask (always right) or from the ids (``ids != pad_id``, the
  transformers rule; ``first pad`` position, the DeepSpeed-Chat rule).  When ``pad_token == eos_token``
  (GPT-2, SmolLM2's ``<|im_end|>``) real end-of-turn tokens look like padding: the mask can no
  longer be inferred from the ids.
* **Mean of per-token values**: ColossalAI's ``RewardModel`` returns ``values[:, :-1].mean(dim=1)``
  (all positions but the last, padding included), so a response's score depends on how much padding
  its batch needed.  ``masked_mean_readout`` is the padding-aware version.
* **CLS or mean pooling** of a bidirectional encoder (BERT-family reward and classifier models;
  PairRM, Jiang et al. 2023, arXiv 2306.02561, also reads special-token embeddings of a DeBERTa
  encoder).
* **A linear value head of width 1** initialised with ``std = 1 / (hidden + 1)``, as ColossalAI's
  BLOOM reward model (``BLOOMRM``) does, so the untrained scores start near 0.

``linear_probe`` fits a ridge-regression head in closed form, to compare read-outs on real ratings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf_course.core import text

__all__ = [
    "last_token_index_from_mask",
    "last_token_index_right_padded",
    "last_non_pad_index_from_ids",
    "first_pad_index_from_ids",
    "attention_mask_from_ids",
    "gather_at",
    "last_token_readout",
    "colossalai_mean_readout",
    "masked_mean_readout",
    "cls_pool",
    "mean_pool",
    "value_head",
    "encode",
    "Encoded",
    "linear_probe",
    "pearson",
    "spearman",
]


# ----------------------------------------------------------------------------- where is the last token?


def _check_2d(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be (batch, seq_len), got shape {tuple(tensor.shape)}.")


def last_token_index_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last 1 in each row: correct for right *and* left padding."""
    _check_2d("attention_mask", attention_mask)
    mask = attention_mask.long()
    if (mask.sum(dim=1) == 0).any():
        row = int((mask.sum(dim=1) == 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has no real token; drop empty texts before scoring.")
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask).argmax(dim=1)


def last_token_index_right_padded(attention_mask: torch.Tensor) -> torch.Tensor:
    """The common shortcut ``mask.sum(1) - 1``: right for right padding, WRONG for left padding."""
    _check_2d("attention_mask", attention_mask)
    return attention_mask.long().sum(dim=1) - 1


def last_non_pad_index_from_ids(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The transformers ``*ForSequenceClassification`` rule: last position whose id is not the pad id.

    Works for both padding sides, but when ``pad == eos`` a sequence that *ends* with its real eos is
    read one token early (the eos is taken for padding).
    """
    _check_2d("input_ids", input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(dim=1)


def first_pad_index_from_ids(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The DeepSpeed-Chat / trlx rule: the token before the FIRST pad id (or the last position).

    With ``pad == eos`` and a chat template that closes every turn with eos, this stops at the end of
    the first turn (often a fixed system prompt), so every conversation reads the same position.
    """
    _check_2d("input_ids", input_ids)
    is_pad = input_ids == pad_token_id
    first_pad = torch.where(is_pad.any(dim=1), is_pad.int().argmax(dim=1), torch.full_like(is_pad[:, 0], input_ids.shape[1], dtype=torch.long))
    return (first_pad - 1).clamp(min=0)


def attention_mask_from_ids(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """``ids != pad_id``: what older code does when no mask is passed.  Wrong whenever pad == eos."""
    _check_2d("input_ids", input_ids)
    return (input_ids != pad_token_id).long()


def gather_at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b]]`` for ``(batch, seq_len)`` or ``(batch, seq_len, hidden)`` tensors."""
    batch = torch.arange(values.shape[0], device=values.device)
    return values[batch, index]


# ----------------------------------------------------------------------------- read-outs


def last_token_readout(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Value (or hidden state) at the last real token, found from the mask (any padding side)."""
    return gather_at(values, last_token_index_from_mask(attention_mask))


def colossalai_mean_readout(values: torch.Tensor) -> torch.Tensor:
    """ColossalAI ``RewardModel``: ``values[:, :-1].mean(dim=1)``; padding positions are included."""
    _check_2d("values", values)
    return values[:, :-1].mean(dim=1)


def masked_mean_readout(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token values over real tokens only: unchanged by how much padding a batch has."""
    _check_2d("values", values)
    mask = attention_mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def cls_pool(hidden_states: torch.Tensor) -> torch.Tensor:
    """Encoder read-out: the hidden state of the first ([CLS]) token, ``(batch, hidden)``."""
    return hidden_states[:, 0]


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Encoder read-out: mean of the hidden states of real tokens (sentence-transformers pooling)."""
    mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def value_head(hidden_size: int, seed: int | None = None) -> nn.Linear:
    """Linear head of width 1, weight ~ N(0, std = 1/(hidden+1)) as in ColossalAI's BLOOM reward model.

    Only the weight is re-initialised (the bias keeps ``nn.Linear``'s default), as there.  With
    ``seed`` the initial weights are reproducible without touching the global random state.
    """
    head = nn.Linear(hidden_size, 1)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / (hidden_size + 1))
    return head


# ----------------------------------------------------------------------------- running a real model


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (batch, seq_len)
    attention_mask: torch.Tensor  # (batch, seq_len)
    hidden_states: torch.Tensor  # (batch, seq_len, hidden), last layer


@torch.no_grad()
def encode(model, tokenizer, texts: list[str], padding_side: str = "right", batch_size: int = 32,
           attention_mask_from_pad_id: bool = False, add_special_tokens: bool = True) -> Encoded:
    """Run ``model`` (a causal LM or an encoder) and return its last-layer hidden states.

    ``padding_side`` sets where padding goes.  ``attention_mask_from_pad_id=True`` reproduces the
    trap: the mask is rebuilt as ``ids != pad_id`` instead of taken from the tokenizer.
    Batches are padded to the longest text of the *whole* list, so every text has one fixed layout.
    """
    if not texts:
        raise ValueError("no texts to encode.")
    with text.padding_side(tokenizer, padding_side):
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if attention_mask_from_pad_id:
        mask = attention_mask_from_ids(ids, tokenizer.pad_token_id)
    causal = hasattr(model, "lm_head")  # a *ForCausalLM: run its backbone, skip the LM head
    backbone = model.get_decoder() if causal else model
    device = next(model.parameters()).device
    states = []
    for start in range(0, len(texts), batch_size):
        piece = slice(start, start + batch_size)
        kwargs = {"input_ids": ids[piece], "attention_mask": mask[piece]}
        if padding_side == "left" and causal:  # positions must start at the first real token
            kwargs["position_ids"] = (mask[piece].long().cumsum(dim=1) - 1).clamp(min=0)
        kwargs = {name: tensor.to(device) for name, tensor in kwargs.items()}  # on the model's device, back on the CPU
        states.append(backbone(**kwargs).last_hidden_state.cpu())
    return Encoded(ids, mask, torch.cat(states))


# ----------------------------------------------------------------------------- comparing read-outs


def linear_probe(train_features: torch.Tensor, train_targets: torch.Tensor, test_features: torch.Tensor,
                 alphas=(0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5), folds: int = 5) -> tuple[torch.Tensor, float]:
    """Ridge regression head (closed form), ridge strength picked by ``folds``-fold cross-validation.

    Features are standardised with the training statistics.  Returns ``(test_predictions, alpha)``.
    """
    if train_features.shape[0] != train_targets.shape[0]:
        raise ValueError(f"{train_features.shape[0]} training feature rows but {train_targets.shape[0]} targets.")
    x = train_features.double()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
    x = (x - mean) / std
    y = train_targets.double()

    def fit(features, targets, alpha):
        gram = features.T @ features + alpha * torch.eye(features.shape[1], dtype=features.dtype)
        weight = torch.linalg.solve(gram, features.T @ (targets - targets.mean()))
        return weight, targets.mean()

    fold_of = torch.arange(x.shape[0]) % folds
    errors = []
    for alpha in alphas:
        error = 0.0
        for fold in range(folds):
            held = fold_of == fold
            weight, bias = fit(x[~held], y[~held], alpha)
            error += ((x[held] @ weight + bias - y[held]) ** 2).sum().item()
        errors.append(error)
    best = alphas[min(range(len(alphas)), key=errors.__getitem__)]
    weight, bias = fit(x, y, best)
    test = (test_features.double() - mean) / std
    return (test @ weight + bias).float(), float(best)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return float("nan") if denominator == 0 else (a @ b).item() / denominator


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (Spearman), ties given their average rank."""
    import pandas as pd

    rank = lambda t: torch.tensor(pd.Series(t.double().flatten().numpy()).rank().to_numpy())  # noqa: E731
    return pearson(rank(a), rank(b))
