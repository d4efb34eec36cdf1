"""Token-level pairwise ("divergence") reward loss, as in trlx / DeepSpeed-Chat / LLaMA-Factory.

A causal reward model emits one value per token.  For a chosen/rejected pair that shares a prompt,
the values before the first differing token are identical (same prefix, causal attention), so the
loss compares the two sequences token by token from the *divergence index* onwards:

    lengths      = number of real tokens (right-padded attention masks)
    div          = first position where the (unpadded) ids differ
    if none:       end = chosen length, div = end - 1          (identical pair: compare last token)
    else:          end = max(chosen length, rejected length)
    loss_i       = mean over t in [div, end) of -log sigma(v_chosen[t] - v_rejected[t])
    loss         = mean over pairs
    score        = value at the last real token

Lineage: the trlx summarize-RLHF reward model (CarperAI), DeepSpeed-Chat's ``RewardModel.forward``
(step 2; arXiv 2308.01320) and LLaMA-Factory's ``PairwiseTrainer`` in its 2023 releases, whose
identical-pair rule (end = chosen length, div = end - 1) is the one used here (DeepSpeed-Chat ends
that window at the padded length instead).  The seeds
``assert divergence_ind > 0``; here a pair that shares no prefix uses the same formula with div = 0
(see notebook 03 for why the guard existed).  Note the range ``[div, end)`` runs to the *longer*
sequence, so it includes padding positions of the shorter one: that is the seeds' behaviour, kept.

``token_level_pairwise_loss_reference`` is the per-pair Python loop; ``token_level_pairwise_loss`` is
the same computation with no loop over the batch.  ``benchmark`` times both (``python -m
rlhf_course.bench token_loss``).  ``movie_preference_pairs`` builds shared-prefix pairs from real
Rotten Tomatoes snippets for notebook 03.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rlhf_course.core.text import padding_side

__all__ = [
    "TokenLossOutput",
    "token_level_pairwise_loss_reference",
    "token_level_pairwise_loss",
    "divergence_windows",
    "movie_preference_pairs",
    "tokenize_pair_tensors",
    "trim_padding",
]


@dataclass
class TokenLossOutput:
    loss: torch.Tensor  # scalar
    chosen_scores: torch.Tensor  # (batch,) value at the chosen sequence's last real token
    rejected_scores: torch.Tensor  # (batch,)


def _validate(chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask, rejected_mask):
    """Shapes must agree, the batch must not be empty and masks must be right-padded (1...1 0...0) with at
    least one real token.  Returns ``(chosen_lengths, rejected_lengths)``, the real tokens per row."""
    shape = chosen_values.shape
    named = {
        "chosen_values": chosen_values,
        "rejected_values": rejected_values,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "chosen_mask": chosen_mask,
        "rejected_mask": rejected_mask,
    }
    for name, tensor in named.items():
        if tensor.dim() != 2 or tensor.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}; every input must be (batch, seq_len) = {tuple(shape)}. "
                "Pad chosen and rejected to the same length (DeepSpeed-Chat concatenates them in one batch)."
            )
    if shape[0] == 0:
        raise ValueError(
            f"got an empty batch: inputs of shape {tuple(shape)}. The loss is a mean over pairs; pass at least one pair."
        )
    return tuple(_mask_lengths(name, named[name]) for name in ("chosen_mask", "rejected_mask"))


def _mask_lengths(name: str, mask: torch.Tensor) -> torch.Tensor:
    """Real tokens per row of a mask that must be right-padded 0/1 with at least one real token.

    Fast check, exact for any integer mask: values in {0, 1}, and the positions of the ones, weighted
    by the strictly decreasing ``seq_len - t``, sum to the weight of the first ``length`` positions
    (which only the first ``length`` positions reach).  A mask that fails it goes to the explicit check
    below, which names the first bad row.
    """
    mask = mask.long()
    seq_len = mask.shape[1]
    positions = torch.arange(seq_len, device=mask.device)
    weights = torch.stack([torch.ones_like(positions), seq_len - positions], dim=1).double()
    lengths, weighted = (mask.double() @ weights).unbind(1)  # exact: integers far below 2**53
    low, high = mask.aminmax()
    first_positions = lengths * seq_len - lengths * (lengths - 1) / 2
    if low >= 0 and high <= 1 and bool(lengths.all()) and torch.equal(weighted, first_positions):
        return lengths.long()
    lengths = mask.sum(dim=1)
    if (lengths == 0).any():
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"{name} row {row} has no real token; drop empty sequences before the loss.")
    right_padded = (positions[None, :] < lengths[:, None]).long()
    row = int((mask != right_padded).any(dim=1).nonzero()[0])
    raise ValueError(
        f"{name} row {row} is not right-padded (real tokens first, then padding): "
        f"{mask[row].tolist()}. This loss finds lengths and the divergence index from the left, so "
        "tokenize with tokenizer.padding_side = 'right'."
    )


def _real_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ids with every padded position set to -1, so what fills the padding never counts as a difference."""
    return torch.where(mask.bool(), ids, torch.full_like(ids, -1))


def token_level_pairwise_loss_reference(
    chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask, rejected_mask
) -> TokenLossOutput:
    """The per-pair loop, as the trlx / DeepSpeed-Chat reward models write it (one pair at a time)."""
    _validate(chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask, rejected_mask)
    losses, chosen_scores, rejected_scores = [], [], []
    for i in range(chosen_values.shape[0]):
        chosen_length = int(chosen_mask[i].sum())
        rejected_length = int(rejected_mask[i].sum())
        differs = (_real_ids(chosen_ids[i], chosen_mask[i]) != _real_ids(rejected_ids[i], rejected_mask[i])).nonzero()
        if len(differs) == 0:  # identical pair: compare the last real token only
            end = chosen_length
            divergence = end - 1
        else:
            end = max(chosen_length, rejected_length)
            divergence = int(differs[0])  # may be 0: no shared prefix (the seeds assert > 0 here)
        chosen_window = chosen_values[i, divergence:end]
        rejected_window = rejected_values[i, divergence:end]
        losses.append(-F.logsigmoid(chosen_window - rejected_window).mean())
        chosen_scores.append(chosen_values[i, chosen_length - 1])
        rejected_scores.append(rejected_values[i, rejected_length - 1])
    return TokenLossOutput(
        loss=torch.stack(losses).mean(),
        chosen_scores=torch.stack(chosen_scores),
        rejected_scores=torch.stack(rejected_scores),
    )


def divergence_windows(chosen_ids, rejected_ids, chosen_mask, rejected_mask):
    """Per pair: ``(divergence_index, end_index, window_mask)`` with no Python loop over the batch."""
    chosen_lengths = chosen_mask.long().sum(dim=1)
    rejected_lengths = rejected_mask.long().sum(dim=1)
    differs = _real_ids(chosen_ids, chosen_mask) != _real_ids(rejected_ids, rejected_mask)
    has_divergence = differs.any(dim=1)
    first_difference = differs.int().argmax(dim=1)  # argmax returns the first maximal position
    return _window(has_divergence, first_difference, chosen_lengths, rejected_lengths, chosen_ids.shape[1])


def _window(has_divergence, first_difference, chosen_lengths, rejected_lengths, seq_len: int):
    end = torch.where(has_divergence, torch.maximum(chosen_lengths, rejected_lengths), chosen_lengths)
    divergence = torch.where(has_divergence, first_difference, chosen_lengths - 1)
    positions = torch.arange(seq_len, device=end.device)[None, :]
    window = (positions >= divergence[:, None]) & (positions < end[:, None])
    return divergence, end, window


def _checked_windows(chosen_ids, rejected_ids, chosen_mask, rejected_mask, chosen_lengths, rejected_lengths):
    """``divergence_windows`` for masks that ``_validate`` accepted, with fewer passes over the batch.

    A right-padded pair agrees on its padding (both -1), so the first difference is either a differing id
    before the shorter length, or the shorter length itself when the lengths differ.  That holds when no
    real id is -1 (which ``_real_ids`` could not tell from padding); with negative ids, the general path.
    """
    if bool(chosen_ids.min() < 0) or bool(rejected_ids.min() < 0):
        return divergence_windows(chosen_ids, rejected_ids, chosen_mask, rejected_mask)
    has_difference, first_difference = (chosen_ids != rejected_ids).max(dim=1)  # index of the first True
    shorter = torch.minimum(chosen_lengths, rejected_lengths)
    in_both = has_difference & (first_difference < shorter)
    has_divergence = in_both | (chosen_lengths != rejected_lengths)
    first_difference = torch.where(in_both, first_difference, shorter)
    return _window(has_divergence, first_difference, chosen_lengths, rejected_lengths, chosen_ids.shape[1])


class _WindowSums(torch.autograd.Function):
    """Per pair, the sum over its window of ``-log sigma(chosen - rejected)``, accumulated in ``accumulate``.

    Forward values and gradients are bit for bit those of the autograd graph of
    ``torch.where(window, -F.logsigmoid(torch.where(window, chosen - rejected, 0)), 0).sum(1, dtype=accumulate)``:
    the difference is masked *before* the arithmetic, so whatever sits outside the window (NaN, inf in
    padding) gets a zero gradient, as in the reference loop that slices the window out.  Written as a
    Function only to skip the graph's intermediate masking passes in the backward.
    """

    @staticmethod
    def forward(ctx, chosen_values, rejected_values, window, accumulate):
        difference = torch.where(window, chosen_values - rejected_values, 0)
        log_sigma, buffer = torch.ops.aten.log_sigmoid_forward(difference)  # what F.logsigmoid computes
        ctx.save_for_backward(difference, buffer, window)
        return torch.where(window, -log_sigma, 0).sum(dim=1, dtype=accumulate)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums):
        difference, buffer, window = ctx.saved_tensors
        upstream = (-grad_sums.to(difference.dtype))[:, None].expand_as(difference)
        grad = torch.where(window, torch.ops.aten.log_sigmoid_backward(upstream, difference, buffer), 0)
        return grad, -grad, None, None


def token_level_pairwise_loss(
    chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask, rejected_mask
) -> TokenLossOutput:
    """Vectorised token-level pairwise loss: same inputs, results and gradients as the reference loop."""
    chosen_lengths, rejected_lengths = _validate(
        chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask, rejected_mask
    )
    divergence, end, window = _checked_windows(
        chosen_ids, rejected_ids, chosen_mask, rejected_mask, chosen_lengths, rejected_lengths
    )
    # Accumulate in at least fp32: an fp16 sum of many large terms overflows where a mean would not.
    accumulate = torch.promote_types(torch.promote_types(chosen_values.dtype, rejected_values.dtype), torch.float32)
    per_pair = _WindowSums.apply(chosen_values, rejected_values, window, accumulate) / (end - divergence).to(accumulate)
    return TokenLossOutput(
        loss=per_pair.mean().to(chosen_values.dtype),
        chosen_scores=chosen_values.gather(1, (chosen_lengths - 1)[:, None]).squeeze(1),
        rejected_scores=rejected_values.gather(1, (rejected_lengths - 1)[:, None]).squeeze(1),
    )


# ----------------------------------------------------------------------------- data for notebook 03


def movie_preference_pairs(max_pairs: int = 2000, seed: int = 0, max_words: int = 40) -> list[dict]:
    """Shared-prefix preference pairs from real Rotten Tomatoes critic snippets.

    For a movie with both kinds of review: ``prompt`` = ``"Critic review of <movie>:"``, ``chosen`` =
    one of its *fresh* (positive) snippets, ``rejected`` = one of its *rotten* snippets.  The prompt is
    the shared prefix; the continuations differ, so the divergence index is where the response starts
    (or earlier, when both snippets happen to start with the same word).  Snippets longer than
    ``max_words`` words are skipped.  Returns dicts with ``prompt``, ``chosen``, ``rejected``,
    ``movie``; pairs are spread over movies (round-robin) and shuffled with ``seed``.
    """
    from rlhf_course.core.assets import rotten_tomatoes

    frame = rotten_tomatoes().to_pandas()
    frame = frame[frame["text"].str.split().str.len() <= max_words]
    rng = random.Random(seed)
    per_movie = []
    for movie, group in sorted(frame.groupby("movie"), key=lambda item: item[0]):
        fresh = group.loc[group["label"] == 1, "text"].tolist()
        rotten = group.loc[group["label"] == 0, "text"].tolist()
        rng.shuffle(fresh)
        rng.shuffle(rotten)
        pairs = [
            {"prompt": f"Critic review of {movie.replace('_', ' ').title()}:", "chosen": " " + good, "rejected": " " + bad, "movie": movie}
            for good, bad in zip(fresh, rotten)
            if good != bad
        ]
        if pairs:
            per_movie.append(pairs)
    if not per_movie:
        raise ValueError("no movie has both a fresh and a rotten snippet under max_words; raise max_words.")
    ordered, depth = [], 0
    while len(ordered) < max_pairs and any(depth < len(p) for p in per_movie):
        ordered.extend(p[depth] for p in per_movie if depth < len(p))
        depth += 1
    ordered = ordered[:max_pairs]
    rng.shuffle(ordered)
    return ordered


def tokenize_pair_tensors(pairs: list[dict], tokenizer, max_length: int = 64) -> dict[str, torch.Tensor]:
    """Tokenize ``prompt + chosen`` and ``prompt + rejected``, right-padded to one common length.

    Returns the four id/mask tensors the token-level loss takes (``chosen_ids``, ``rejected_ids``,
    ``chosen_mask``, ``rejected_mask``), each ``(pairs, seq_len)``.  Texts longer than
    ``max_length`` tokens are truncated on the right (the shared prompt stays intact).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token first.")
    missing = [i for i, p in enumerate(pairs) if not {"prompt", "chosen", "rejected"} <= set(p)]
    if missing:
        raise ValueError(f"pair {missing[0]} lacks one of the fields prompt/chosen/rejected: {sorted(pairs[missing[0]])}")
    with padding_side(tokenizer, "right"):
        encoded = {
            side: tokenizer([p["prompt"] + p[side] for p in pairs], padding="longest", truncation=True,
                            max_length=max_length, return_tensors="pt")
            for side in ("chosen", "rejected")
        }
    length = max(e["input_ids"].shape[1] for e in encoded.values())
    out = {}
    for side, e in encoded.items():
        extra = length - e["input_ids"].shape[1]
        out[f"{side}_ids"] = F.pad(e["input_ids"], (0, extra), value=tokenizer.pad_token_id)
        out[f"{side}_mask"] = F.pad(e["attention_mask"], (0, extra), value=0)
    return out


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the columns that are padding in every row of both sides (saves compute per batch)."""
    length = int(torch.maximum(batch["chosen_mask"].sum(dim=1), batch["rejected_mask"].sum(dim=1)).max())
    return {key: value[:, :length] for key, value in batch.items()}


# ----------------------------------------------------------------------------- benchmark


def random_pair_batch(batch: int, length: int, vocab: int = 50_000, seed: int = 0, requires_grad: bool = True):
    """Random right-padded pairs with shared prefixes, as a dict of the six loss inputs."""
    generator = torch.Generator().manual_seed(seed)
    chosen_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    rejected_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    prefix = torch.randint(1, length // 2, (batch,), generator=generator)
    positions = torch.arange(length)[None, :]
    shared = positions < prefix[:, None]
    rejected_ids = torch.where(shared, chosen_ids, rejected_ids)
    chosen_lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    rejected_lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    chosen_mask = (positions < chosen_lengths[:, None]).long()
    rejected_mask = (positions < rejected_lengths[:, None]).long()
    return {
        "chosen_values": torch.randn(batch, length, generator=generator).requires_grad_(requires_grad),
        "rejected_values": torch.randn(batch, length, generator=generator).requires_grad_(requires_grad),
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "chosen_mask": chosen_mask,
        "rejected_mask": rejected_mask,
    }
