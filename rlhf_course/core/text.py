"""Text in, tensors out: the tokenizer's padding side, and the batched tokenise-forward-collect loop.

Every scorer in the course (the reward model's ``score_texts``, the sentiment reward, the
classifier's accuracy) runs the same loop: cut the texts into batches, tokenise each with padding,
run the model without gradients on the model's device, keep one tensor per batch on the CPU.  It
is written once, here.  Which side the padding goes on matters (notebook 02): right padding for a
reward model that reads its last real token, left padding for generation; ``padding_side``
switches it for one block and always restores the tokenizer's own setting.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch

PADDING_SIDES = ("left", "right")


@contextmanager
def padding_side(tokenizer, side: str):
    """``with padding_side(tokenizer, "left"): ...`` pads on ``side`` inside the block only."""
    if side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}.")
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = previous


def model_device(model) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


@torch.no_grad()
def batched_forward(model, tokenizer, texts: Sequence[str], read: Callable[[object], torch.Tensor],
                    batch_size: int = 32, max_length: int | None = None, progress: bool = False,
                    description: str = "scoring") -> torch.Tensor:
    """``read(model(**batch))`` for every batch of ``texts``, concatenated on the CPU.

    Each batch is padded to its own longest text (on the tokenizer's padding side) and truncated to
    ``max_length`` tokens when one is given.  ``read`` picks what to keep from the model's output,
    e.g. ``lambda out: out.logits.squeeze(-1)`` for a reward model's scalar score.
    """
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got one string; wrap it in a list.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    model.eval()
    device = model_device(model)
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=description, leave=False)
    pieces = []
    for start in starts:
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=max_length is not None,
                          max_length=max_length, return_tensors="pt").to(device)
        pieces.append(read(model(**batch)).cpu())
    return torch.cat(pieces) if pieces else torch.empty(0)
