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
the same computation with no loop over the batch: the same values (to rounding) and the same gradients
(bit for bit in fp32/fp64; fp16/bf16 are accumulated in fp32), whatever sits outside the windows: NaN or
inf in the padding never reaches its arithmetic.  Both raise ``ValueError`` on an empty batch.
``python -m rlhf_course.bench token_loss`` times both.  ``movie_preference_pairs`` builds shared-prefix
pairs from real Rotten Tomatoes snippets for notebook 03.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_course.core.text import padding_side
from rlhf_course.reward.readout import gather_at

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
    """Shapes must agree, the batch must not be empty, and masks must be right-padded (1...1 0...0) with at
    least one real token.  Returns ``(chosen_lengths, rejected_lengths)``: real tokens per row (int64)."""
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
            f"got an empty batch (inputs of shape {tuple(shape)}): the loss is a mean over pairs, so pass at least one "
            "chosen/rejected pair."
        )
    if shape[1] == 0:
        raise ValueError(
            f"got sequences of length 0 (inputs of shape {tuple(shape)}): every pair needs at least one real token."
        )
    lengths = _right_padded_lengths(chosen_mask, rejected_mask)
    if lengths is None:  # one of them is not a right-padded 0/1 mask: find which, and say so
        return _mask_lengths("chosen_mask", chosen_mask), _mask_lengths("rejected_mask", rejected_mask)
    return lengths[0], lengths[1]


def _right_padded_lengths(*masks: torch.Tensor) -> torch.Tensor | None:
    """Real tokens per row of each mask, stacked ``(len(masks), batch)``; ``None`` unless every mask is
    right-padded 0/1 with a real token in every row.

    Fast check (a few reductions over all masks at once, no comparison against a rebuilt mask): the values
    lie in [0, 1], every row has a one, and the positions of a row's mass sum to ``0 + 1 + ... + (length - 1)``,
    which only the first ``length`` positions filled with ones do (any other arrangement of that mass sums to
    more).  The position sums are one matrix-vector product in floating point, exact because every partial
    sum is an integer below 2**24 (float32, rows up to 4096 positions) or 2**53 (float64, longer rows);
    integer reductions cost about twice as much on a CPU, and at 64 x 512 each call costs more than its
    arithmetic, hence one pass over both masks.
    """
    seq_len = masks[0].shape[1]
    exact = torch.float32 if seq_len <= 4096 else torch.float64
    ones = torch.empty((len(masks), *masks[0].shape), device=masks[0].device, dtype=exact)
    for copy, mask in zip(ones, masks):
        copy.copy_(mask)
    low, high = ones.aminmax()
    if not (low.item() >= 0 and high.item() <= 1):
        return None
    lengths = ones.sum(dim=2)
    position_sums = ones @ torch.arange(seq_len, device=ones.device, dtype=exact)
    if lengths.min().item() >= 1 and torch.equal(position_sums * 2, lengths * (lengths - 1)):
        return lengths.long()
    return None


def _mask_lengths(name: str, mask: torch.Tensor) -> torch.Tensor:
    """Real tokens per row of ``mask``; raises unless it is right-padded 0/1 with a real token in every row,
    naming the first bad row."""
    lengths = _right_padded_lengths(mask)
    if lengths is not None:
        return lengths[0]
    values = mask.to(torch.float64)  # not .long(): a fraction such as 0.5 must not truncate to a valid 0
    lengths = values.sum(dim=1)
    if (lengths == 0).any():
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"{name} row {row} has no real token; drop empty sequences before the loss.")
    positions = torch.arange(mask.shape[1], device=mask.device)
    right_padded = (positions[None, :] < lengths[:, None]).to(torch.float64)
    bad_rows = (values != right_padded).any(dim=1).nonzero()
    row = int(bad_rows[0]) if len(bad_rows) else 0
    raise ValueError(
        f"{name} row {row} is not right-padded (real tokens first, then padding) with 0/1 values: "
        f"{mask[row].tolist()}. This loss finds lengths and the divergence index from the left, so "
        "tokenize with tokenizer.padding_side = 'right' and pass the tokenizer's attention_mask."
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
    end = torch.where(has_divergence, torch.maximum(chosen_lengths, rejected_lengths), chosen_lengths)
    divergence = torch.where(has_divergence, first_difference, chosen_lengths - 1)
    positions = torch.arange(chosen_ids.shape[1], device=chosen_ids.device)[None, :]
    window = (positions >= divergence[:, None]) & (positions < end[:, None])
    return divergence, end, window


def _checked_windows(chosen_ids, rejected_ids, chosen_mask, rejected_mask, chosen_lengths, rejected_lengths):
    """``(divergence_index, end_index)`` of ``divergence_windows`` for masks ``_validate`` accepted (right-padded),
    in fewer passes over the batch.

    With right padding, the first position where the real ids differ is the first differing id before the
    shorter length; failing that, the shorter length itself when the lengths differ (a token against
    padding); failing that (identical pair), the last token: the minimum of the three.  This relies on no
    real id being -1, the value ``_real_ids`` gives padding; negative ids take the general path.
    """
    if min(chosen_ids.min().item(), rejected_ids.min().item()) < 0:
        return divergence_windows(chosen_ids, rejected_ids, chosen_mask, rejected_mask)[:2]
    seq_len = chosen_ids.shape[1]
    has_difference, first_difference = (chosen_ids != rejected_ids).max(dim=1)  # max: index of the first True
    end = torch.maximum(chosen_lengths, rejected_lengths)
    divergence = torch.minimum(
        torch.where(has_difference, first_difference, seq_len),
        torch.minimum(torch.minimum(chosen_lengths, rejected_lengths), end - 1),
    )
    return divergence, end


def _negative_window_weights(divergence, end, width, seq_len: int, dtype) -> torch.Tensor:
    """-1.0 at the positions ``divergence <= t < end`` (``width = end - divergence``) of each row, 0.0 elsewhere.

    For integers, ``divergence <= t < end`` is ``|2t - (divergence + end - 1)| < end - divergence``, and the
    left side is then at most ``end - divergence - 1``: so ``clamp(|2t - centre| - width, -1, 0)`` is the
    window, negated, in four float operations that a CPU vectorises (two comparisons, an ``and`` and a cast
    to float take about 2.5x longer at 64 x 512).  Negated because the loss is ``-log sigma``: the sign rides
    on the weights instead of costing an operation (and a backward step) of its own; negation is exact.
    Exact while positions fit a float32 mantissa (below 2**23 tokens).
    """
    twice_positions = torch.arange(0, 2 * seq_len, 2, device=divergence.device, dtype=torch.float32)
    centre = (divergence + end - 1).unsqueeze(1)
    weights = (twice_positions - centre).abs_().sub_(width.unsqueeze(1)).clamp_(-1, 0)
    return weights if dtype == torch.float32 else weights.to(dtype)


def token_level_pairwise_loss(
    chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask, rejected_mask
) -> TokenLossOutput:
    """Vectorised token-level pairwise loss: same inputs, results and gradients as the reference loop."""
    chosen_lengths, rejected_lengths = _validate(
        chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask, rejected_mask
    )
    divergence, end = _checked_windows(
        chosen_ids, rejected_ids, chosen_mask, rejected_mask, chosen_lengths, rejected_lengths
    )
    count = end - divergence
    # Accumulate in at least fp32: an fp16 sum of many large terms overflows where a mean would not.
    dtype = chosen_values.dtype
    accumulate = torch.promote_types(dtype, torch.float32)
    # Fast form: log sigma(difference) is kept (negated) in the window by multiplying with -1 and dropped
    # elsewhere by multiplying with 0.  Every term is >= 0, so when each pair's sum is finite and positive, nothing outside
    # the window was NaN or -inf (0 * NaN = NaN would show) and the sums are exactly those of the masked form.
    negative_window = _negative_window_weights(divergence, end, count, chosen_values.shape[1], dtype)
    difference = chosen_values - rejected_values
    sums = (F.logsigmoid(difference) * negative_window).sum(dim=1, dtype=accumulate)
    loss = (sums / count).mean()
    low, high = sums.aminmax()
    if not (low.item() > 0 and high.item() < math.inf):
        # Masked form: the difference is replaced by 0 outside the window *before* the arithmetic, so a NaN or
        # inf there (padding, say) gets a zero gradient, as in the loop, which slices the window out.
        window = negative_window.bool()
        sums = torch.where(window, -F.logsigmoid(torch.where(window, difference, 0)), 0).sum(dim=1, dtype=accumulate)
        loss = (sums / count).mean()
    return TokenLossOutput(
        loss=loss if accumulate == dtype else loss.to(dtype),  # the loss was accumulated in at least fp32
        chosen_scores=gather_at(chosen_values, chosen_lengths - 1),
        rejected_scores=gather_at(rejected_values, rejected_lengths - 1),
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
