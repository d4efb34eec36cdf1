"""Prompts and sampling for PPO on language models: the queries and the rollout's generation loop.

The seed's data (Ziegler et al. 2019 as TRL 0.x's ``gpt2-sentiment`` notebook packaged it): each
review is cut to a short prefix, the query, and the policy continues it with a sampled response.
Here the responses of a whole batch are sampled at once, with left padding and a KV cache.
"""

from __future__ import annotations

import random
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable

import torch

from rlhf_course.core.profiles import Profile, current_profile

if TYPE_CHECKING:  # for annotations only: ppo imports this module, not the other way round
    from rlhf_course.rl.ppo import PPOConfig

RewardFn = Callable[[list[str]], torch.Tensor]  # texts -> one score per text
# The largest top_k a config accepts: GPT-2's vocabulary, the policies' of both profiles (a larger k
# keeps every token, so it is not top-k at all).  A smaller vocabulary caps k at its own size.
MAX_TOP_K = 50_257


# ============================================================================ 1. queries


def length_sampler(low: int, high: int, rng: random.Random) -> int:
    """Uniform over ``[low, high)``, as TRL's ``LengthSampler`` (so 2-8 gives 2..7)."""
    return rng.randrange(low, high)


def review_texts(config: PPOConfig, profile: Profile | None = None) -> list[str]:
    """Reviews longer than ``config.min_review_chars``.

    Full: IMDB train reviews (the seed).  Laptop: Rotten Tomatoes critic snippets (fresh and
    rotten).  Plot summaries are left out: they are synopses, not opinions, and the SFT policy
    never saw them.
    """
    profile = profile or current_profile()
    if profile.is_full:
        from rlhf_course.core import assets

        texts = list(assets.load("imdb", split="train")["text"])
    else:
        from rlhf_course.core import assets

        texts = list(assets.rotten_tomatoes()["text"])
    texts = [" ".join(t.split()) for t in texts if len(t) > config.min_review_chars]
    if not texts:
        raise ValueError(f"No review is longer than min_review_chars={config.min_review_chars}; lower it.")
    return texts


def make_queries(texts: list[str], tokenizer, config: PPOConfig, seed: int | None = None) -> list[list[int]]:
    """Each review truncated to a sampled 2-7 token prefix: the prompts the policy continues."""
    rng = random.Random(config.seed if seed is None else seed)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids[: length_sampler(config.query_min_tokens, config.query_max_tokens, rng)] for ids in encoded]


def train_and_eval_queries(tokenizer, config: PPOConfig, n_eval: int = 64) -> tuple[list[list[int]], list[list[int]]]:
    """Shuffled training queries and a held-out set of ``n_eval`` for before/after comparisons."""
    texts = review_texts(config)
    random.Random(config.seed).shuffle(texts)
    if len(texts) <= n_eval:
        raise ValueError(f"only {len(texts)} reviews for n_eval={n_eval}; lower n_eval or min_review_chars")
    return make_queries(texts[n_eval:], tokenizer, config), make_queries(texts[:n_eval], tokenizer, config, seed=config.seed + 1)


# ============================================================================ 2. sampling


def left_pad(queries: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch queries of different lengths, padded on the LEFT so every response starts at the same
    column and generation appends to the real last token of each query."""
    width = max(len(q) for q in queries)
    ids = torch.full((len(queries), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(queries), width), dtype=torch.long)
    for row, query in enumerate(queries):
        if not query:
            raise ValueError(f"query {row} is empty; every query needs at least one token")
        ids[row, width - len(query):] = torch.tensor(query)
        mask[row, width - len(query):] = 1
    return ids, mask


def response_mask_after_eos(response_ids: torch.Tensor, eos_id: int | None, budgets: torch.Tensor | None = None) -> torch.Tensor:
    """1 for tokens up to and including the first EOS (and within each row's length budget), 0 after.

    GPT-2 pads with its EOS token, so "after the first EOS" - not "equal to pad" - is the test.
    """
    length = response_ids.shape[1]
    positions = torch.arange(length, device=response_ids.device).expand_as(response_ids)
    mask = torch.ones_like(response_ids, dtype=torch.long)
    if eos_id is not None:
        is_eos = response_ids == eos_id
        first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), torch.full_like(is_eos[:, 0], length, dtype=torch.long))
        mask = (positions <= first_eos[:, None]).long()
    if budgets is not None:  # the per-episode response length sampled from [4, 16)
        mask = mask * (positions < budgets[:, None].to(response_ids.device)).long()
    return mask


# Inverse-CDF sampling in two levels: blocks of this many tokens, then the tokens of the chosen block.
CDF_BLOCK = 256


def sample_next_token(logits: torch.Tensor, config: PPOConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per row from ``logits`` (B, V), with optional temperature / top-k / top-p.

    The seed samples purely (top_k 0, top_p 1, temperature 1); temperature 0 means greedy decoding.
    Sampling is by inverse CDF: one uniform number per row, located in the cumulative distribution
    (``inverse_cdf_sample``).  That draws exactly from p and needs one random number per row instead
    of one per vocabulary entry, which on a CPU is several times faster than ``torch.multinomial``
    over a 50k-token vocabulary.
    """
    if config.temperature < 0:
        raise ValueError(f"temperature={config.temperature}: use 0 for greedy decoding or a positive value to sample.")
    if config.temperature == 0:  # greedy: the most likely token (dividing by 0 would pick the last index)
        return logits.argmax(-1)
    logits = logits.float()
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= config.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return inverse_cdf_sample(logits.softmax(-1), generator)


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` (B, V) from one uniform number per row.

    A float64 cumulative sum over all V = 49,152 entries is exact enough but was a fifth of the
    sampling loop's time on a CPU, so it is done in two levels: the cumulative mass of blocks of
    ``CDF_BLOCK`` tokens locates the block, then the cumulative mass inside that one block locates the
    token.  ``right=True`` takes the first index whose CDF exceeds u, so a token of probability 0
    (masked by top-k or top-p) is never chosen.
    """
    rows, vocab = probs.shape
    blocks = torch.nn.functional.pad(probs, (0, -vocab % CDF_BLOCK)).view(rows, -1, CDF_BLOCK)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # (B, V / CDF_BLOCK); a float32 sum of 256 is exact enough
    uniform = torch.rand(rows, 1, generator=generator, device=probs.device, dtype=torch.float64) * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, uniform, right=True).clamp(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(uniform))
    inside_cdf = blocks[torch.arange(rows, device=probs.device), block.squeeze(1)].double().cumsum(-1)
    block_mass = block_cdf.gather(1, block) - before
    # u's place inside its block, rescaled to the block's own cumulative sum (the two sums round differently)
    offset = ((uniform - before) / block_mass.clamp(min=1e-300) * inside_cdf[:, -1:]).clamp(max=inside_cdf[:, -1:])
    within = torch.searchsorted(inside_cdf, offset, right=True).clamp(max=CDF_BLOCK - 1)
    token = block * CDF_BLOCK + within
    return token.squeeze(1).clamp(max=vocab - 1)


@contextmanager
def merged_lora(lm):
    """Run ``lm`` (a PEFT model with an active LoRA adapter) with the adapter merged into its weights.

    Token-by-token sampling calls every adapted linear layer once per token; unmerged, each call adds
    LoRA's two small matmuls (x A, then B), i.e. three matrix products instead of one, and on a CPU
    those small calls cost more than their FLOPs.  Merged (W + s B A, Hu et al. 2022, section 4.1),
    generation runs at the base model's speed.  Each base layer gets a merged weight tensor for the
    duration and its own tensor back afterwards, untouched (merging in place and unmerging would
    leave rounding in the weights that the adapter-off reference reads).  Anything else (a plain LM,
    an adapter switched off or already merged) runs as it is.
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no PEFT: nothing to merge
        yield lm
        return
    layers = [m for m in lm.modules() if isinstance(m, LoraLayer)] if isinstance(lm, PeftModel) else []
    if not layers or any(m.merged or m.disable_adapters for m in layers):
        yield lm
        return
    with torch.no_grad():
        merged = [merged_weight(layer) for layer in layers]
    originals = [layer.get_base_layer().weight.data for layer in layers]
    trainable = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]  # enable_adapters resets them
    try:
        for layer, weight in zip(layers, merged):
            layer.enable_adapters(False)  # the LoRA branch off (as PEFT's disable_adapter): W + s B A holds it
            layer.get_base_layer().weight.data = weight
        yield lm
    finally:
        for layer, weight in zip(layers, originals):
            layer.get_base_layer().weight.data = weight
            layer.enable_adapters(True)
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)


# Each LoRA layer's merged weight is written into the same buffer at every rollout: allocating 0.4 GB
# afresh each time cost more in page faults than the merge itself (2-core CPU).
_merged_weight_buffers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def merged_weight(layer) -> torch.Tensor:
    """W + scaling B A for a PEFT LoRA layer's active adapters, in a buffer kept for the layer (W is left
    as it is).  One fused ``addmm_`` per adapter: several times faster on a CPU than PEFT's
    ``get_delta_weight`` then add."""
    weight = layer.get_base_layer().weight
    buffer = _merged_weight_buffers.get(layer)
    if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype or buffer.device != weight.device:
        buffer = _merged_weight_buffers[layer] = torch.empty_like(weight, requires_grad=False)
    buffer.copy_(weight)
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if getattr(layer, "fan_in_fan_out", False):  # GPT-2's Conv1D stores W transposed: PEFT's own delta
            buffer += layer.get_delta_weight(name)
        else:
            buffer.addmm_(layer.lora_B[name].weight, layer.lora_A[name].weight, alpha=layer.scaling[name])
    return buffer


@contextmanager
def contiguous_head_input(lm):
    """Make the LM head's input contiguous while sampling.

    With ``logits_to_keep=1`` the first (prompt) step hands the head the last column of a (B, T, d)
    hidden state, a strided view; ``F.linear`` then runs a batched matrix-vector product that reads the
    49,152 x 576 head once per row (B times 113 MB) instead of once, which cost more than all the
    later steps' heads together (measured with ``torch.profiler``, 2-core CPU).
    """
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate_batch(lm, queries: list[list[int]], tokenizer, config: PPOConfig, rng: random.Random,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per query, all queries at once (left padding), instead of the seed's
    one-query-at-a-time loop.  Each episode still gets its own sampled length budget: the batch
    runs to the longest budget and every response is then cut to its own (sampling token t does not
    depend on whether token t+1 will be kept, so this is the same distribution).

    The loop is written out (a KV cache, one token per step) rather than calling ``generate``: it
    is short, shows exactly what "stop at EOS" means, and samples faster on a CPU.  A LoRA actor
    samples with its adapter merged into the weights (``merged_lora``).
    Returns ``(query_ids, query_mask, response_ids, response_mask)``, all on the CPU.
    """
    budgets = torch.tensor([length_sampler(config.response_min_tokens, config.response_max_tokens, rng) for _ in queries])
    query_ids, query_mask = left_pad(queries, tokenizer.pad_token_id)
    max_new, eos_id = int(budgets.max()), tokenizer.eos_token_id
    generator = torch.Generator(device=device).manual_seed(rng.randrange(2**31))
    attention_mask = query_mask.to(device)
    input_ids = query_ids.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
    tokens = torch.full((len(queries), max_new), tokenizer.pad_token_id, dtype=torch.long)
    active = torch.arange(len(queries))  # rows still sampling; a finished row leaves the batch and the KV cache
    finished = torch.zeros(len(queries), dtype=torch.bool)
    with merged_lora(lm), contiguous_head_input(lm):  # a LoRA actor samples at the base model's speed
        cache = None
        for step in range(max_new):
            out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits[:, -1]
            if config.force_max_length:  # EOS gets probability 0: every response runs to its budget
                logits[:, eos_id] = float("-inf")
            token = sample_next_token(logits, config, generator)
            tokens[active, step] = token.cpu().masked_fill(finished[active], tokenizer.pad_token_id)
            finished[active] |= (token.cpu() == eos_id) | (budgets[active] <= step + 1)
            if finished.all():  # every row has hit EOS or its budget: stop, never force the maximum length
                break
            if finished[active].any() and hasattr(cache, "batch_select_indices"):  # no compute on finished rows
                keep = (~finished[active]).nonzero().squeeze(1)
                active = active[keep]
                keep = keep.to(device)
                cache.batch_select_indices(keep)
                token, attention_mask, position_ids = token[keep], attention_mask[keep], position_ids[keep]
            input_ids = token[:, None]
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
            position_ids = position_ids[:, -1:] + 1
    response_ids = tokens[:, :step + 1]
    eos = None if config.force_max_length else eos_id
    response_mask = response_mask_after_eos(response_ids, eos, budgets)
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return query_ids, query_mask, response_ids, response_mask


def with_fake_eos(response_ids: torch.Tensor, response_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Replace the last kept token of each response that does not end in ``eos_id`` with ``eos_id``.

    OpenRLHF's vLLM rollout does this to responses that hit the token limit (OpenRLHF issue #238): its reward
    models read the score at the EOS token, so every scored sequence must end in one.  The replaced token was
    never sampled by the policy, so PPO trains on one off-policy token per such response, and the text the
    reward model sees loses its last token.  ``ppo.make_experience`` applies it to training rollouts when
    ``PPOConfig.fake_eos`` is on; ``generate_batch`` never does, so evaluations see the policy's own text.
    """
    lengths = response_mask.sum(1)
    rows = torch.arange(len(response_ids))
    last = (lengths - 1).clamp(min=0)
    missing = (lengths > 0) & (response_ids[rows, last] != eos_id)
    response_ids = response_ids.clone()
    response_ids[rows[missing], last[missing]] = eos_id
    return response_ids


@torch.no_grad()
def sample_and_score(lm, tokenizer, reward_fn: RewardFn, queries: list[list[int]], config: PPOConfig,
                     seed: int = 0, device="cpu"):
    """Responses to ``queries`` with their rewards, as a pandas DataFrame (for before/after tables)."""
    import pandas as pd

    torch.manual_seed(seed)
    query_ids, query_mask, response_ids, response_mask = generate_batch(lm, queries, tokenizer, config, random.Random(seed), device)
    query_texts = tokenizer.batch_decode(query_ids.masked_fill(query_mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    response_texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(response_ids, response_mask)]
    rewards = torch.as_tensor(reward_fn([q + r for q, r in zip(query_texts, response_texts)])).float()
    return pd.DataFrame({"query": query_texts, "response": response_texts, "reward": rewards.numpy(),
                         "length": response_mask.sum(1).numpy()})
