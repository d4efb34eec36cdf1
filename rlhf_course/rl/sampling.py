"""Prompts and sampling for PPO on language models: the queries and the rollout's generation loop.

The seed's data (Ziegler et al. 2019 as TRL 0.x's ``gpt2-sentiment`` notebook packaged it): each
review is cut to a short prefix, the query, and the policy continues it with a sampled response.
Here the responses of a whole batch are sampled at once, with left padding and a KV cache.
"""

from __future__ import annotations

import random
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


def sample_next_token(logits: torch.Tensor, config: PPOConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per row from ``logits`` (B, V), with optional temperature / top-k / top-p.

    The seed samples purely (top_k 0, top_p 1, temperature 1); temperature 0 means greedy decoding.  Sampling is by inverse CDF: one
    uniform number per row, located in the cumulative distribution.  That draws exactly from p and
    needs one random number per row instead of one per vocabulary entry, which makes it several times
    faster on a CPU than ``torch.multinomial`` over a 50,257-token vocabulary.
    """
    if config.temperature < 0:
        raise ValueError(f"temperature={config.temperature}: use 0 for greedy decoding or a positive value to sample.")
    if config.temperature == 0:  # greedy: the most likely token (dividing by 0 would pick the last index)
        return logits.float().argmax(-1)
    logits = logits.float() / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= config.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    cdf = logits.softmax(-1).double().cumsum(-1)  # float64: no drift over 50k terms
    uniform = torch.rand(len(cdf), 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    # right=True: the first index whose CDF exceeds u, so a zero-probability token is never chosen
    return torch.searchsorted(cdf, uniform, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)


@torch.no_grad()
def generate_batch(lm, queries: list[list[int]], tokenizer, config: PPOConfig, rng: random.Random,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per query, all queries at once (left padding), instead of the seed's
    one-query-at-a-time loop.  Each episode still gets its own sampled length budget: the batch
    runs to the longest budget and every response is then cut to its own (sampling token t does not
    depend on whether token t+1 will be kept, so this is the same distribution).

    The loop is written out (a KV cache, one token per step) rather than calling ``generate``: it
    is short, shows exactly what "stop at EOS" means, and samples faster on a CPU.
    Returns ``(query_ids, query_mask, response_ids, response_mask)``, all on the CPU.
    """
    budgets = torch.tensor([length_sampler(config.response_min_tokens, config.response_max_tokens, rng) for _ in queries])
    query_ids, query_mask = left_pad(queries, tokenizer.pad_token_id)
    max_new, eos_id = int(budgets.max()), tokenizer.eos_token_id
    generator = torch.Generator(device=device).manual_seed(rng.randrange(2**31))
    attention_mask = query_mask.to(device)
    input_ids = query_ids.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
    finished = torch.zeros(len(queries), dtype=torch.bool, device=device)
    cache, tokens = None, []
    for step in range(max_new):
        out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]
        if config.force_max_length:  # EOS gets probability 0: every response runs to its budget
            logits[:, eos_id] = float("-inf")
        token = sample_next_token(logits, config, generator)
        token = token.masked_fill(finished, tokenizer.pad_token_id)  # rows that already stopped only pad
        tokens.append(token)
        finished |= (token == eos_id) | (budgets.to(device) <= step + 1)
        if finished.all():  # every row has hit EOS or its budget: stop, never force the maximum length
            break
        input_ids = token[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        position_ids = position_ids[:, -1:] + 1
    response_ids = torch.stack(tokens, 1).cpu()
    eos = None if config.force_max_length else eos_id
    response_mask = response_mask_after_eos(response_ids, eos, budgets)
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return query_ids, query_mask, response_ids, response_mask




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
