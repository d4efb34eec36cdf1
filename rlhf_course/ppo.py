"""PPO for language models, from scratch, in one file you can read top to bottom.

TRL 1.16 ships no PPO trainer (the ``PPOTrainer.step(queries, responses, rewards)`` API ended in
0.11, and the later trainer left ``trl.experimental`` in 1.13), so the course owns this one.  It
follows the classic sentiment experiment of Ziegler et al. 2019 ("Fine-Tuning Language Models from
Human Preferences", the ``lm-human-preferences`` code) as TRL 0.x packaged it, and names in comments
where each detail comes from:

* [Ziegler]  Ziegler et al. 2019: per-token KL penalty to a frozen reference, adaptive KL controller.
* [37]       Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization"
             (ICLR blog track), and its sequel "The N Implementation Details of RLHF with PPO" (2023).
* [TRL0]     TRL 0.x ``PPOTrainer`` (0.4-0.11), whose defaults the seed notebook used.
* [DSChat]   DeepSpeed-Chat step 3 (``ppo_trainer.py``: ``compute_rewards``, ``get_advantages_and_returns``).
* [PPO]      Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; GAE from Schulman et
             al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation".

One PPO step = make experience (sample responses, score them, compute log-probs, values and
per-token rewards) -> advantages with GAE -> a few epochs of clipped policy and value updates.

The critic is a *value head on the policy* (one linear layer on the last hidden state, as TRL 0.x's
``AutoModelForCausalLMWithValueHead``): one forward pass gives both log-probs and values, which
halves the cost on a CPU.  DeepSpeed-Chat instead trains a separate critic initialised from the
reward model; that decouples the two losses (no value gradient reaches the policy's trunk) at the
price of a second network, and is a good exercise (``PolicyWithValueHead`` is the only thing to swap).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from rlhf_course import distributed
from rlhf_course.profiles import Profile, current_profile

RewardFn = Callable[[list[str]], torch.Tensor]


# ============================================================================ 1. configuration


LR_SCHEDULES = {
    "constant": lambda step, steps: 1.0,
    "linear": lambda step, steps: max(0.0, 1.0 - step / steps),  # CleanRL anneals once per rollout  [37 detail 4]
}


def learning_rate_at(config: "PPOConfig", step: int) -> float:
    """The learning rate of PPO step ``step`` under ``config.lr_schedule`` (a pure function of the
    step, so a run resumed from a checkpoint continues the schedule exactly)."""
    return config.learning_rate * LR_SCHEDULES[config.lr_schedule](step, config.steps)


@dataclass
class PPOConfig:
    """Every PPO setting in one place.  Defaults are the seed's (TRL 0.x ``PPOConfig`` as used by
    the ``gpt2-sentiment`` notebook); ``PPOConfig.for_profile()`` swaps in the laptop values."""

    # --- data and sampling (the seed notebook)
    min_review_chars: int = 200  # keep reviews longer than this (seed: IMDB reviews > 200 chars)
    query_min_tokens: int = 2  # query length ~ LengthSampler(2, 8): uniform over [2, 8)  [TRL0]
    query_max_tokens: int = 8
    response_min_tokens: int = 4  # response length budget ~ LengthSampler(4, 16)  [TRL0]
    response_max_tokens: int = 16
    top_k: int = 0  # pure sampling: no top-k, no nucleus, temperature 1 (seed's gen_kwargs)
    top_p: float = 1.0
    temperature: float = 1.0
    force_max_length: bool = False  # True: suppress EOS so every response runs to its budget
    # --- optimisation  [TRL0 defaults]
    steps: int = 194  # PPO steps (seed: 25,000 IMDB reviews / 128 = 194)
    batch_size: int = 128  # episodes (query+response) per PPO step
    mini_batch_size: int = 128  # episodes per gradient step
    ppo_epochs: int = 4  # passes over each batch of experience
    learning_rate: float = 1.41e-5
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None  # [37] global gradient clipping (TRL0 default: off)
    lr_schedule: str = "constant"  # "constant" (TRL0) or "linear": decay to 0 over `steps`  [37 detail 4]
    forward_batch_size: int = 64  # chunk size of the no-grad forward passes in make-experience
    # --- RL
    gamma: float = 1.0  # no discounting inside a 4-16 token episode  [TRL0]
    lam: float = 0.95  # GAE lambda  [PPO][TRL0]
    cliprange: float = 0.2  # policy ratio clip  [PPO]
    cliprange_value: float = 0.2  # value clip around the old values  [37 detail 9][TRL0]
    vf_coef: float = 0.1  # weight of the value loss: policy and critic share a trunk  [TRL0]
    entropy_coef: float = 0.0  # optional entropy bonus  [37 detail 10]; 0 as in TRL0
    init_kl_coef: float = 0.2  # beta of the per-token KL penalty  [Ziegler][TRL0]
    adaptive_kl: bool = True  # adapt beta towards a target KL  [Ziegler]
    kl_target: float = 6.0  # nats per response  [TRL0]
    kl_horizon: int = 10000  # [Ziegler]
    whiten_advantages: bool = True  # [37 detail 7] normalise advantages per batch
    scale_rewards: bool = False  # divide scores by their running std  [37 detail 5][TRL0 use_score_scaling]
    seed: int = 0

    @classmethod
    def for_profile(cls, profile: Profile | None = None, **overrides) -> "PPOConfig":
        """The seed's values in the full profile; CPU-sized values in the laptop profile.

        Laptop: a small policy trained from scratch is far from GPT-2's pretrained optimum, so it
        takes a much larger learning rate and a smaller KL coefficient (its sampling entropy is ~6
        nats/token, so the few positive words it must learn to pick start out rare), and a half-size
        batch split into more mini-batches gets the reward up within a few CPU minutes.  Chosen by
        a sweep on the 2-core machine (40-80 steps each): lr 3e-4/beta 0.2 gained +0.5 in 60 steps,
        lr 1e-3 collapsed (value loss 16, KL 28), beta 0.1 at batch 32 gained +1.5 in 80 steps.
        """
        profile = profile or current_profile()
        values = {} if profile.is_full else dict(
            min_review_chars=150,  # laptop snippets are <= 255 chars: > 200 keeps only 638 of them
            steps=55, batch_size=64, mini_batch_size=16, learning_rate=5e-4, forward_batch_size=64,
            max_grad_norm=1.0, init_kl_coef=0.05,
        )
        values.update(overrides)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; choose one of {sorted(LR_SCHEDULES)}")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of mini_batch_size={self.mini_batch_size}")
        if not 1 <= self.query_min_tokens < self.query_max_tokens:
            raise ValueError(f"need 1 <= query_min_tokens < query_max_tokens, got {self.query_min_tokens}, {self.query_max_tokens}")
        if not 1 <= self.response_min_tokens < self.response_max_tokens:
            raise ValueError(f"need 1 <= response_min_tokens < response_max_tokens, got "
                             f"{self.response_min_tokens}, {self.response_max_tokens}")


# ============================================================================ 2. models


class PolicyWithValueHead(nn.Module):
    """A causal LM (the actor) plus a scalar value head on its last hidden state (the critic).

    As TRL 0.x's ``AutoModelForCausalLMWithValueHead``.  Dropout is switched off for good: with
    dropout, log-probs computed at make-experience time and at update time differ even before any
    update, so the PPO ratio starts away from 1 ([37 N-details]; TRL's later trainers disable it).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        self.v_head = nn.Linear(hidden, 1)
        # Zero start: V = 0 everywhere, so the first advantages are the scores themselves (minus the
        # batch mean, after whitening) rather than scores plus the noise of a random value head.
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)
        self.v_head.to(next(lm.parameters()).device)
        disable_dropout(self)

    def forward(self, input_ids, attention_mask, logits_to_keep: int):
        """Logits and values at the last ``logits_to_keep`` positions only (responses sit at the end)."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True, logits_to_keep=logits_to_keep)
        hidden = out.hidden_states[-1][:, -logits_to_keep:]
        return out.logits, self.v_head(hidden).squeeze(-1)

    def save(self, folder: Path | str, tokenizer=None) -> Path:
        """``save_pretrained`` for the LM (loadable by any HF code) plus ``value_head.pt``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(str(folder), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        torch.save(self.v_head.state_dict(), folder / "value_head.pt")
        return folder

    @classmethod
    def load(cls, folder: Path | str, device: torch.device | str = "cpu") -> "PolicyWithValueHead":
        from transformers import AutoModelForCausalLM

        folder = Path(folder)
        policy = cls(AutoModelForCausalLM.from_pretrained(str(folder)).to(device))
        head = folder / "value_head.pt"
        if head.exists():
            policy.v_head.load_state_dict(torch.load(head, map_location=device))
        return policy


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def frozen_reference(lm: nn.Module) -> nn.Module:
    """A frozen copy of the starting policy: the anchor of the KL penalty  [Ziegler]."""
    reference = copy.deepcopy(lm).eval()
    disable_dropout(reference)
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference


def load_policy_and_reference(device: torch.device | str = "cpu"):
    """``(policy, reference, tokenizer)`` from the profile's SFT policy: a fresh start for one run."""
    from rlhf_course.sft import load_sft_policy

    lm, tokenizer = load_sft_policy(device)
    return PolicyWithValueHead(lm), frozen_reference(lm), tokenizer


# ============================================================================ 3. data


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
        from rlhf_course import assets

        texts = list(assets.load("imdb", split="train")["text"])
    else:
        from rlhf_course import assets

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


# ============================================================================ 4. masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:  # Bessel's correction, as TRL0's masked_var
        count = mask.sum()
        if count < 2:
            raise ValueError(f"whitening needs at least 2 unmasked values, got {int(count)}")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to zero mean, unit variance over unmasked entries only  [37 detail 7][TRL0]."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


class RunningMoments:
    """Running mean / std of the scores (Chan et al. parallel update), for reward scaling [37 detail 5]."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, values: torch.Tensor) -> None:
        batch_mean, batch_var, batch_count = values.mean().item(), values.var(unbiased=False).item(), values.numel()
        delta, total = batch_mean - self.mean, self.count + batch_count
        self.mean += delta * batch_count / total
        self.var = (self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)  [Ziegler, section 2.2]."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


# ============================================================================ 5. make experience


@dataclass
class Rollout:
    """One batch of experience.  Token tensors are (batch, response_length) and aligned: entry t
    holds what the policy knew *before* emitting response token t."""

    query_ids: torch.Tensor  # (B, Q) left-padded queries
    query_mask: torch.Tensor  # (B, Q)
    response_ids: torch.Tensor  # (B, R) right-padded responses
    response_mask: torch.Tensor  # (B, R) 1 up to and including EOS / the length budget
    scores: torch.Tensor  # (B,) reward-model scores (after optional scaling)
    raw_scores: torch.Tensor  # (B,) scores as the reward function returned them
    logprobs: torch.Tensor  # (B, R) log pi_old(token)
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(token)
    values: torch.Tensor  # (B, R) V_old(state)
    rewards: torch.Tensor  # (B, R) -beta * KL per token, + score at the last token
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)
    query_texts: list[str] = field(default_factory=list)
    response_texts: list[str] = field(default_factory=list)


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

    The seed samples purely (top_k 0, top_p 1, temperature 1).  Sampling is by inverse CDF: one
    uniform number per row, located in the cumulative distribution.  That draws exactly from p and
    needs one random number per row instead of one per vocabulary entry, which makes it several times
    faster on a CPU than ``torch.multinomial`` over a 50,257-token vocabulary.
    """
    logits = logits.float() / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
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


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) from logits (B, T, V) and tokens (B, T)."""
    return torch.gather(logits.float().log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution: logsumexp(z) - sum softmax(z) z."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


def forward_response(model, query_ids, query_mask, response_ids, response_mask, with_values: bool):
    """Logits (and values) for the positions that predict each response token.

    The sequence is [left-padded query | response]; the logit at position p predicts token p+1,
    so the R response tokens are predicted by the R positions ending one before the last.
    """
    input_ids = torch.cat([query_ids, response_ids], 1)
    attention_mask = torch.cat([query_mask, response_mask], 1)
    keep = response_ids.shape[1] + 1  # only the last R+1 positions need logits: saves the 50k-way head
    if with_values:
        logits, values = model(input_ids, attention_mask, logits_to_keep=keep)
        return logits[:, :-1], values[:, :-1]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=keep).logits
    return logits[:, :-1], None


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens  [PPO/GAE][TRL0][DSChat].

    delta_t = r_t + gamma V_{t+1} - V_t ;  A_t = delta_t + gamma lam A_{t+1}.
    Positions after the end of a response are masked to 0 first, so the last real token bootstraps
    from V = 0 (the episode ends there) and nothing leaks backwards from padding.
    Returns ``(advantages, returns)`` with returns = advantages + values (the value targets).
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    return advantages * mask, (advantages + values) * mask


def per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float):
    """r_t = -beta (log pi_old - log pi_ref) at every token, + the score at the last real token.

    [Ziegler] penalise the KL to the reference per token (the k1 estimator, TRL0 ``kl_penalty="kl"``);
    the reward model's score is a sparse, end-of-episode reward  [TRL0 compute_rewards][DSChat].
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1) - 1).clamp(min=0).long()  # index of the last real response token (EOS or budget end)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


@torch.no_grad()
def make_experience(policy: PolicyWithValueHead, reference: nn.Module, tokenizer, reward_fn: RewardFn,
                    queries: list[list[int]], config: PPOConfig, kl_coef: float, rng: random.Random,
                    score_moments: RunningMoments | None = None, device="cpu", accelerator=None) -> Rollout:
    """Sample, score, and compute everything the update needs, with no gradient.

    Under ``accelerate`` each process handles its share of the queries; the reward-scaling and
    whitening statistics are taken over every process's episodes (``rlhf_course.distributed``)."""
    policy.eval()
    query_ids, query_mask, response_ids, response_mask = generate_batch(policy.lm, queries, tokenizer, config, rng, device)
    query_texts = tokenizer.batch_decode(query_ids.masked_fill(query_mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    response_texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(response_ids, response_mask)]
    raw_scores = torch.as_tensor(reward_fn([q + r for q, r in zip(query_texts, response_texts)]), dtype=torch.float).cpu()
    if raw_scores.shape != (len(queries),):
        raise ValueError(f"reward_fn returned shape {tuple(raw_scores.shape)}; expected one score per text ({len(queries)})")
    scores = raw_scores
    if score_moments is not None:  # [37 detail 5] reward scaling: divide by the running std, keep the mean
        score_moments.update(distributed.gather(raw_scores, accelerator))
        scores = raw_scores / score_moments.std
    logprobs, ref_logprobs, values = [], [], []
    for chunk in torch.arange(len(queries)).split(config.forward_batch_size):  # bounded memory
        args = [t[chunk].to(device) for t in (query_ids, query_mask, response_ids, response_mask)]
        logits, value = forward_response(policy, *args, with_values=True)
        ref_logits, _ = forward_response(reference, *args, with_values=False)
        logprobs.append(logprobs_of(logits, args[2]).cpu())
        ref_logprobs.append(logprobs_of(ref_logits, args[2]).cpu())
        values.append(value.float().cpu())
    logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)
    mask = response_mask.float()
    rewards, _ = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    advantages, returns = compute_gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:  # [37 detail 7] after computing returns, so value targets keep their scale
        advantages = distributed.masked_whiten(advantages, mask, accelerator)  # = masked_whiten on one process
    return Rollout(query_ids, query_mask, response_ids, response_mask, scores, raw_scores, logprobs * mask,
                   ref_logprobs * mask, values * mask, rewards, advantages, returns, query_texts, response_texts)


# ============================================================================ 6. losses


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float):
    """PPO-clip: max(-A r, -A clip(r, 1-eps, 1+eps)), averaged over real tokens  [PPO eq. 7].

    Returns ``(loss, clip_fraction, approx_kl)``; approx_kl = mean 0.5 (log r)^2  [37][TRL0].
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def clipped_value_loss(values, old_values, returns, mask, cliprange_value: float):
    """0.5 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-eps)  [37 detail 9][TRL0]."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    clip_fraction = masked_mean(((clipped_values - returns) ** 2 > (values - returns) ** 2).float(), mask)
    return loss, clip_fraction.detach()


# ============================================================================ 7. one PPO step


def ppo_update(policy: PolicyWithValueHead, optimizer, rollout: Rollout, config: PPOConfig, generator: torch.Generator,
               device="cpu", accelerator=None) -> dict:
    """``ppo_epochs`` passes over the rollout in shuffled mini-batches  [PPO][37 detail 6].

    Under ``accelerate`` the rollout is this process's share and so is each mini-batch
    (``mini_batch_size`` / processes); DDP averages the gradients, the stats are averaged too."""
    policy.train()
    disable_dropout(policy)
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clip_fraction", "value_clip_fraction", "approx_kl", "grad_norm")}
    batch = len(rollout.scores)
    mini_batch = distributed.per_process(config.mini_batch_size, accelerator, "mini_batch_size")  # this process's share
    for _ in range(config.ppo_epochs):
        for index in torch.randperm(batch, generator=generator).split(mini_batch):
            query_ids, query_mask, response_ids, response_mask = (
                t[index].to(device) for t in (rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask))
            mask = response_mask.float()
            logits, values = forward_response(policy, query_ids, query_mask, response_ids, response_mask, with_values=True)
            logprobs = logprobs_of(logits, response_ids)
            policy_loss, clip_fraction, approx_kl = clipped_policy_loss(
                logprobs, rollout.logprobs[index].to(device), rollout.advantages[index].to(device), mask, config.cliprange)
            value_loss, value_clip_fraction = clipped_value_loss(
                values.float(), rollout.values[index].to(device), rollout.returns[index].to(device), mask, config.cliprange_value)
            if config.entropy_coef > 0:  # [37 detail 10] entropy bonus: keeps exploring
                entropy = masked_mean(entropy_of(logits), mask)
            else:  # still logged, but kept out of the graph (a 50k-wide softmax is not free)
                with torch.no_grad():
                    entropy = masked_mean(entropy_of(logits), mask)
            loss = policy_loss + config.vf_coef * value_loss - config.entropy_coef * entropy  # [PPO eq. 9]
            optimizer.zero_grad(set_to_none=True)
            distributed.backward(loss, accelerator)  # loss.backward(), or accelerate's (DDP all-reduce, DeepSpeed)
            grad_norm = distributed.clip_grad_norm(policy, config.max_grad_norm, accelerator)
            optimizer.step()
            for key, value in (("policy_loss", policy_loss), ("value_loss", value_loss), ("entropy", entropy),
                               ("clip_fraction", clip_fraction), ("value_clip_fraction", value_clip_fraction),
                               ("approx_kl", approx_kl), ("grad_norm", grad_norm)):
                stats[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
    policy.eval()
    return distributed.mean_across({key: sum(v) / len(v) for key, v in stats.items()}, accelerator)


def rollout_stats(rollout: Rollout, kl_coef: float, eos_id: int | None = None) -> dict:
    """Per-batch means for the logs.  ``eos_fraction``: share of responses whose last kept token is
    EOS, i.e. that the policy ended itself rather than running out of its length budget."""
    mask = rollout.response_mask.float()
    lengths = rollout.response_mask.sum(1)
    last_tokens = rollout.response_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    kl_per_episode = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(1)  # nats per response
    return {
        "reward_mean": rollout.raw_scores.mean().item(),
        "reward_std": rollout.raw_scores.std().item() if len(rollout.raw_scores) > 1 else 0.0,
        "kl": kl_per_episode.mean().item(),
        "kl_coef": kl_coef,
        "non_score_reward": (-kl_coef * kl_per_episode).mean().item(),
        "response_length": mask.sum(1).mean().item(),
        "eos_fraction": ((last_tokens == eos_id) & (lengths > 0)).float().mean().item() if eos_id is not None else float("nan"),
        "value_mean": masked_mean(rollout.values, mask).item(),
        "return_mean": masked_mean(rollout.returns, mask).item(),
        "return_var": masked_var(rollout.returns, mask).item() if mask.sum() > 1 else 0.0,
    }


# ============================================================================ 8. the training loop


def train_ppo(config: PPOConfig, policy: PolicyWithValueHead, reference: nn.Module, tokenizer, reward_fn: RewardFn,
              queries: list[list[int]], callback: Callable[[int, dict, list[dict]], None] | None = None,
              progress: bool = True, device: torch.device | str = "cpu", accelerator=None,
              checkpoint_every: int | None = None, checkpoint_dir: Path | str | None = None,
              resume_from: Path | str | None = None) -> list[dict]:
    """Run ``config.steps`` PPO steps; return one metrics dict per step (also passed to ``callback``).

    ``callback(step, metrics, history)`` is called after every step (live plots, early stops: raise
    ``StopIteration`` in it to end the run).  Queries are cycled in order, reshuffled each epoch.

    Scale-out (``rlhf_course.distributed``; ``python -m rlhf_course.train_ppo`` under ``accelerate
    launch``): pass the ``accelerator``; ``batch_size`` and ``mini_batch_size`` stay global and each
    process takes its slice.  ``checkpoint_every`` N steps writes ``checkpoint_dir/step-N`` (model,
    optimizer, RNGs, counters); ``resume_from`` such a folder continues the run exactly.
    """
    from tqdm.auto import tqdm

    config.validate()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate,
                                  eps=config.adam_eps, weight_decay=0.0)  # TRL0 uses Adam, no decay
    kl_controller = (AdaptiveKLController(config.init_kl_coef, config.kl_target, config.kl_horizon)
                     if config.adaptive_kl else FixedKLController(config.init_kl_coef))
    score_moments = RunningMoments() if config.scale_rewards else None
    order, cursor, history, first_step = list(range(len(queries))), len(queries), [], 0
    if len(queries) < config.batch_size:
        raise ValueError(f"{len(queries)} queries is fewer than batch_size={config.batch_size}")
    if checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir to write step-N folders into")
    micro_batch = distributed.per_process(config.mini_batch_size, accelerator, "mini_batch_size")
    distributed.per_process(config.batch_size, accelerator, "batch_size")
    policy, optimizer = distributed.prepare(accelerator, policy, optimizer, micro_batch, config.max_grad_norm)  # DDP / DeepSpeed
    model = distributed.unwrap(policy, accelerator)  # the plain module, for generation
    if resume_from is not None:  # model, optimizer and RNGs in place; the loop's own state returned
        state = distributed.load_checkpoint(resume_from, policy, optimizer, accelerator)
        first_step, order, cursor, history = state["step"], state["order"], state["cursor"], state["history"]
        rng.setstate(state["rng"])
        generator.set_state(state["generator"])
        kl_controller.value = state["kl_coef"]
        if score_moments is not None:
            score_moments.__dict__.update(state["score_moments"])
    bar = tqdm(range(first_step, config.steps), desc="PPO", disable=not progress or not distributed.is_main(accelerator))
    for step in bar:
        if cursor + config.batch_size > len(order):  # new epoch over the prompts
            rng.shuffle(order)
            cursor = 0
        batch_queries = distributed.shard([queries[i] for i in order[cursor:cursor + config.batch_size]], accelerator)
        cursor += config.batch_size
        for group in optimizer.param_groups:  # [37 detail 4] the schedule is a function of the step alone
            group["lr"] = learning_rate_at(config, step)
        started = time.time()
        rollout = make_experience(model, reference, tokenizer, reward_fn, batch_queries, config,
                                  kl_controller.value, rng, score_moments, device, accelerator)
        experience_seconds = time.time() - started
        metrics = {"step": step, **rollout_stats(distributed.gather_rollout(rollout, accelerator), kl_controller.value,
                                                 tokenizer.eos_token_id)}
        metrics["learning_rate"] = optimizer.param_groups[0]["lr"]
        metrics.update(ppo_update(policy, optimizer, rollout, config, generator, device, accelerator))
        kl_controller.update(metrics["kl"], config.batch_size)  # [Ziegler] adapt beta after each batch
        metrics["experience_seconds"] = experience_seconds
        metrics["step_seconds"] = time.time() - started
        history.append(metrics)
        if checkpoint_every and (step + 1) % checkpoint_every == 0:  # everything needed to continue exactly
            state = {"step": step + 1, "order": order, "cursor": cursor, "history": history, "rng": rng.getstate(),
                     "generator": generator.get_state(), "kl_coef": kl_controller.value,
                     "score_moments": dict(score_moments.__dict__) if score_moments is not None else None}
            distributed.save_checkpoint(Path(checkpoint_dir) / f"step-{step + 1}", policy, optimizer, state, accelerator)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", kl=f"{metrics['kl']:.2f}")
        if callback is not None:
            try:
                callback(step, metrics, history)
            except StopIteration:
                break
    return history


# ============================================================================ 9. evaluation, saving, plots


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


def save_history(history: list[dict], path: Path | str) -> None:
    Path(path).write_text(json.dumps(history, indent=1))


class LivePlot:
    """A ``train_ppo`` callback that redraws reward, KL and losses in place while training runs.

    Uses an IPython display handle, so the figure updates inside the notebook cell (and the last
    version is what an executed notebook keeps); outside IPython it draws once at the end.
    """

    PANELS = (("reward_mean", "mean reward (POSITIVE logit)"), ("kl", "KL to reference (nats / response)"),
              ("policy_loss", "policy loss"), ("value_loss", "value loss"))

    def __init__(self, every: int = 1, panels=PANELS):
        import matplotlib.pyplot as plt

        self.every, self.panels = every, panels
        self.figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
        self.axes = list(axes) if len(panels) > 1 else [axes]
        plt.close(self.figure)  # shown through the display handle only
        self.handle = None
        try:
            from IPython.display import display

            self.handle = display(self.figure, display_id=True)
        except Exception:  # not in IPython: nothing to update live
            self.handle = None

    def __call__(self, step: int, metrics: dict, history: list[dict]) -> None:
        if step % self.every:
            return
        self.draw(history)

    def draw(self, history: list[dict]) -> None:
        steps = [h["step"] for h in history]
        for axis, (key, title) in zip(self.axes, self.panels):
            axis.clear()
            axis.plot(steps, [h[key] for h in history], marker=".")
            axis.set_title(title, fontsize=10)
            axis.set_xlabel("PPO step")
        self.figure.tight_layout()
        if self.handle is not None:
            self.handle.update(self.figure)


# ============================================================================ 10. benchmarks


def _bench_model(name: str):
    """The policy a benchmark times: the cached laptop SFT policy, or a random GPT-2 of a given size."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if name == "sft":
        from rlhf_course.sft import load_sft_policy

        lm, _ = load_sft_policy()
        return lm, "laptop SFT policy (cached asset)"
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config()), "GPT2Config() random weights (124M, GPT-2 small)"
    if name == "tiny":
        return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4)), "GPT2Config(4 layers, 128 wide) random weights"
    raise ValueError(f"unknown --model {name!r}; choose sft, gpt2 or tiny")


def benchmark_rollout(argv: list[str]) -> None:
    """Batched, left-padded generation vs the seed's one-query-at-a-time loop, same queries."""
    import argparse

    from rlhf_course import assets
    from rlhf_course.profiles import get_device

    parser = argparse.ArgumentParser(prog="bench rollout")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", default="sft", choices=["sft", "gpt2", "tiny"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    device = get_device()
    torch.manual_seed(0)
    lm, described = _bench_model(args.model)
    lm = lm.to(device).eval()
    tokenizer = assets.gpt2_tokenizer()
    config = PPOConfig.for_profile(current_profile(), min_review_chars=150)
    texts = review_texts(config, Profile("laptop"))[: args.batch]
    queries = make_queries(texts, tokenizer, config)
    budgets = [length_sampler(config.response_min_tokens, config.response_max_tokens, random.Random(i)) for i in range(len(queries))]

    def one_at_a_time():
        generated = 0
        for query, budget in zip(queries, budgets):  # the seed's loop: one generate() call per query
            ids = torch.tensor([query], device=device)
            out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                              max_new_tokens=budget, pad_token_id=tokenizer.eos_token_id)
            generated += out.shape[1] - ids.shape[1]
        return generated

    def hf_generate_batched():
        ids, mask = left_pad(queries, tokenizer.pad_token_id)
        out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, top_k=0, top_p=1.0,
                          max_new_tokens=max(budgets), pad_token_id=tokenizer.eos_token_id)
        return int((out[:, ids.shape[1]:] != tokenizer.eos_token_id).sum())

    def batched():
        _, _, _, mask = generate_batch(lm, queries, tokenizer, config, random.Random(0), device)
        return int(mask.sum())

    with torch.no_grad():
        batched()  # warm-up
        timings = {}
        for name, fn in (("one query at a time (seed loop)", one_at_a_time),
                         ("batched, HF generate()", hf_generate_batched),
                         ("batched, ppo.generate_batch", batched)):
            best, tokens = float("inf"), 0
            for _ in range(args.repeats):
                started = time.perf_counter()
                tokens = fn()
                best = min(best, time.perf_counter() - started)
            timings[name] = best
            print(f"{name:34s} {best:7.2f} s  ({tokens} response tokens)", flush=True)
    seq, hf_batched, bat = timings.values()
    print(f"model: {described}; device {device}; {len(queries)} queries of 2-7 tokens, responses 4-15 tokens "
          f"(per-query budgets; the batched runs sample to the longest budget), torch threads {torch.get_num_threads()}")
    print(f"speed-up vs one-at-a-time: HF generate() batched {seq / hf_batched:.1f}x, "
          f"ppo.generate_batch {seq / bat:.1f}x")


def benchmark_ppo_step(argv: list[str]) -> None:
    """Seconds for one full PPO step (make experience + ppo_epochs of updates) at GPT-2-124M scale."""
    import argparse

    from rlhf_course import assets
    from rlhf_course.profiles import get_device

    parser = argparse.ArgumentParser(prog="bench ppo_step")
    parser.add_argument("--batch", type=int, default=None, help="episodes per step (default 128 on GPU, 8 on CPU)")
    parser.add_argument("--mini-batch", type=int, default=None)
    parser.add_argument("--model", default="gpt2", choices=["sft", "gpt2", "tiny"])
    parser.add_argument("--reward", default="length", choices=["length", "classifier"],
                        help="'classifier' scores with the sentiment reward model (seed-like); 'length' is free")
    parser.add_argument("--steps", type=int, default=2, help="steps to time (the first is a warm-up when >1)")
    args = parser.parse_args(argv)
    device = get_device()
    batch = args.batch or (128 if device.type == "cuda" else 8)
    torch.manual_seed(0)
    lm, described = _bench_model(args.model)
    lm = lm.to(device)
    tokenizer = assets.gpt2_tokenizer()
    if args.reward == "classifier":
        from rlhf_course.sentiment import sentiment_reward

        reward_fn = sentiment_reward(device)
    else:
        reward_fn = lambda texts: torch.tensor([len(t) / 50 for t in texts])  # noqa: E731 (free stand-in)
    config = PPOConfig(batch_size=batch, mini_batch_size=args.mini_batch or batch, forward_batch_size=min(batch, 64),
                       steps=args.steps, min_review_chars=150)
    queries = make_queries(review_texts(config, Profile("laptop")), tokenizer, config)
    policy, reference = PolicyWithValueHead(lm), frozen_reference(lm)
    history = train_ppo(config, policy, reference, tokenizer, reward_fn, queries, progress=False, device=device)
    timed = history[1:] if len(history) > 1 else history
    seconds = sum(h["step_seconds"] for h in timed) / len(timed)
    experience = sum(h["experience_seconds"] for h in timed) / len(timed)
    print(f"model: {described}; device {device}; torch threads {torch.get_num_threads()}")
    print(f"batch {batch} episodes, mini-batch {config.mini_batch_size}, {config.ppo_epochs} PPO epochs, "
          f"reward '{args.reward}', responses {config.response_min_tokens}-{config.response_max_tokens - 1} tokens")
    print(f"one PPO step: {seconds:.2f} s (make-experience {experience:.2f} s, update {seconds - experience:.2f} s), "
          f"mean of {len(timed)} timed step(s)" + (" after 1 warm-up" if len(history) > 1 else ""))
    if batch != 128:
        print(f"(the seed's 10.9 s/it is for batch 128 on a GPU; this run used batch {batch}: scale before comparing)")


def config_dict(config: PPOConfig) -> dict:
    return asdict(config)
