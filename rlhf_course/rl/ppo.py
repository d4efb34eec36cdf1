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
The prompts and the sampling loop live in ``rlhf_course.rl.sampling``, the masked statistics in
``rlhf_course.core.stats``, the scale-out wrappers in ``rlhf_course.core.distributed``; this file is
the algorithm alone.

The critic is a *value head on the policy* (one linear layer on the last hidden state, as TRL 0.x's
``AutoModelForCausalLMWithValueHead``): one forward pass gives both log-probs and values, which
halves the cost on a CPU.  DeepSpeed-Chat instead trains a separate critic initialised from the
reward model; that decouples the two losses (no value gradient reaches the policy's trunk) at the
price of a second network; ``rl.lora_policy.ActorWithSeparateCritic`` swaps it in behind the same
interface, and notebook 07 measures both.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from rlhf_course.core import distributed
from rlhf_course.core.config import (FLAG, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED,
                                     ProfileConfig, integer, number, one_of)
from rlhf_course.core.stats import RunningMoments, masked_mean, masked_var, masked_whiten
from rlhf_course.rl.sampling import MAX_TOP_K, RewardFn, generate_batch, with_fake_eos



# ============================================================================ 1. configuration


LR_SCHEDULES = {
    "constant": lambda step, steps: 1.0,
    "linear": lambda step, steps: max(0.0, 1.0 - step / steps),  # CleanRL anneals once per rollout  [37 detail 4]
}


def learning_rate_at(config: "PPOConfig", step: int) -> float:
    """The learning rate of PPO step ``step`` under ``config.lr_schedule`` (a pure function of the
    step, so a run resumed from a checkpoint continues the schedule exactly)."""
    return config.learning_rate * LR_SCHEDULES[config.lr_schedule](step, config.steps)


# The laptop profile's values (``PPOConfig.for_profile("laptop")``); the defaults are the seed's.
# A small policy trained from scratch is far from GPT-2's pretrained optimum, so it takes a much
# larger learning rate and a smaller KL coefficient (its sampling entropy is ~6 nats/token, so the
# few positive words it must learn to pick start out rare), and a half-size batch split into more
# mini-batches gets the reward up within a few CPU minutes.  Chosen by a sweep on the 2-core machine
# (40-80 steps each): lr 3e-4/beta 0.2 gained +0.5 in 60 steps, lr 1e-3 collapsed (value loss 16,
# KL 28), beta 0.1 at batch 32 gained +1.5 in 80 steps.
LAPTOP_OVERRIDES = dict(
    min_review_chars=150,  # laptop snippets are <= 255 chars: > 200 keeps only 638 of them
    steps=55, batch_size=64, mini_batch_size=16, learning_rate=5e-4, forward_batch_size=64,
    max_grad_norm=1.0, init_kl_coef=0.05,
)


@dataclass
class PPOConfig(ProfileConfig):
    """Every PPO setting in one place.  Defaults are the reference values, the seed's (TRL 0.x
    ``PPOConfig`` as used by the ``gpt2-sentiment`` notebook); ``PPOConfig.for_profile()`` swaps in
    the laptop values, ``LAPTOP_OVERRIDES`` (``rlhf_course.core.config``)."""

    laptop_overrides = LAPTOP_OVERRIDES
    field_checks = {
        "min_review_chars": NON_NEGATIVE_INT, "top_k": integer(0, MAX_TOP_K, note="0: off"),
        "query_min_tokens query_max_tokens response_min_tokens response_max_tokens": POSITIVE_INT,
        "top_p": number(0, 1, low_open=True, note="1: off"), "temperature": number(0, note="0: greedy decoding"),
        "steps batch_size mini_batch_size ppo_epochs forward_batch_size kl_horizon": POSITIVE_INT,
        "learning_rate adam_eps cliprange kl_target": POSITIVE, "max_grad_norm": POSITIVE.or_none("no clipping"),
        "lr_schedule": one_of(LR_SCHEDULES), "gamma lam": FRACTION, "vf_coef entropy_coef init_kl_coef": NON_NEGATIVE,
        "cliprange_value": number(0, low_open=True, finite=False, note="inf: no value clipping"), "seed": SEED,
        "force_max_length fake_eos adaptive_kl whiten_advantages scale_rewards": FLAG,
    }

    # --- data and sampling (the seed notebook)
    min_review_chars: int = field(default=200, metadata={
        "help": "keep reviews longer than this (seed: IMDB reviews > 200 chars)"})
    query_min_tokens: int = field(default=2, metadata={
        "help": "query length ~ LengthSampler(2, 8): uniform over [query_min_tokens, query_max_tokens)  [TRL0]"})
    query_max_tokens: int = field(default=8, metadata={"help": "upper end (excluded) of the query length"})
    response_min_tokens: int = field(default=4, metadata={
        "help": "response length budget ~ LengthSampler(4, 16): uniform over [response_min_tokens, response_max_tokens)  [TRL0]"})
    response_max_tokens: int = field(default=16, metadata={"help": "upper end (excluded) of the response length budget"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off; the seed samples purely, gen_kwargs)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1.0: off, as the seed)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (1.0, as the seed)"})
    force_max_length: bool = field(default=False, metadata={
        "help": "suppress EOS so every response runs to its budget (min_length = max_length)"})
    fake_eos: bool = field(default=False, metadata={
        "help": "a response cut at its budget gets EOS as its last token, in training rollouts only (OpenRLHF's vLLM rollout)"})
    # --- optimisation  [TRL0 defaults]
    steps: int = field(default=194, metadata={"help": "PPO steps (seed: 25,000 IMDB reviews / 128 = 194)"})
    batch_size: int = field(default=128, metadata={
        "help": "episodes (query+response) per PPO step, global over all processes"})
    mini_batch_size: int = field(default=128, metadata={"help": "episodes per gradient step, global over all processes"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each batch of experience"})
    learning_rate: float = field(default=1.41e-5, metadata={"help": "Adam learning rate  [TRL0]"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    max_grad_norm: float | None = field(default=None, metadata={
        "help": "global gradient clipping (None: off, the TRL0 default)  [37 detail 11]"})
    lr_schedule: str = field(default="constant", metadata={
        "help": "constant (TRL0) or linear: decay to 0 over `steps`  [37 detail 4]"})
    forward_batch_size: int = field(default=64, metadata={
        "help": "chunk size of the no-grad forward passes in make-experience"})
    # --- RL
    gamma: float = field(default=1.0, metadata={"help": "discount; 1.0: none inside a 4-16 token episode  [TRL0]"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda  [PPO][TRL0]"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip  [PPO]"})
    cliprange_value: float = field(default=0.2, metadata={
        "help": "value clip around the old values  [37 detail 9][TRL0]"})
    vf_coef: float = field(default=0.1, metadata={
        "help": "weight of the value loss: policy and critic share a trunk  [TRL0]"})
    entropy_coef: float = field(default=0.0, metadata={"help": "optional entropy bonus; 0 as in TRL0  [37 detail 10]"})
    init_kl_coef: float = field(default=0.2, metadata={"help": "beta of the per-token KL penalty  [Ziegler][TRL0]"})
    adaptive_kl: bool = field(default=True, metadata={"help": "adapt beta towards kl_target  [Ziegler]"})
    kl_target: float = field(default=6.0, metadata={"help": "target KL of the adaptive controller, nats per response  [TRL0]"})
    kl_horizon: int = field(default=10000, metadata={"help": "horizon of the adaptive KL controller  [Ziegler]"})
    whiten_advantages: bool = field(default=True, metadata={"help": "normalise advantages per batch  [37 detail 7]"})
    scale_rewards: bool = field(default=False, metadata={
        "help": "divide scores by their running std  [TRL0 use_score_scaling]; [37 cont. detail 8] divides by the std of a discounted return"})
    seed: int = field(default=0, metadata={"help": "seed of the query order, the sampling and the value head"})

    def validate(self) -> None:
        super().validate()  # one rule per field (field_checks), then the relations between fields
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"PPOConfig: batch_size={self.batch_size} must be a multiple of mini_batch_size="
                             f"{self.mini_batch_size}; use a mini_batch_size that divides it, e.g. "
                             f"{max(d for d in range(1, self.mini_batch_size) if self.batch_size % d == 0)}")
        for kind, low, high in (("query", self.query_min_tokens, self.query_max_tokens),
                                ("response", self.response_min_tokens, self.response_max_tokens)):
            if not low < high:  # the upper end is excluded: [low, high) must hold a length
                raise ValueError(f"PPOConfig: need 1 <= {kind}_min_tokens < {kind}_max_tokens (the maximum is excluded), "
                                 f"got {low} and {high}; e.g. {kind}_max_tokens={low + 1} or more")


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
    from rlhf_course.policy.sft import load_sft_policy

    lm, tokenizer = load_sft_policy(device)
    return PolicyWithValueHead(lm), frozen_reference(lm), tokenizer


# ============================================================================ 3. KL controllers


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


# ============================================================================ 4. make experience


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


class NonFiniteError(FloatingPointError):
    """A reward, log-prob, value or loss that is NaN or infinite: PPO stops before it reaches the weights."""


def check_finite(name: str, values: torch.Tensor, texts: list[str] | None = None, rows=None) -> None:
    """Raise ``NonFiniteError`` naming the episodes (batch positions) whose ``values`` are not finite.

    One NaN reward would otherwise flow into the whitened advantages of every episode and, through
    one optimizer step, turn every parameter into NaN.  ``rows`` maps local positions to batch positions.
    """
    finite = torch.isfinite(values)
    if finite.all():
        return
    bad = (~finite).reshape(len(values), -1).any(1).nonzero().flatten().tolist() if values.dim() else [0]
    positions = [int(rows[i]) for i in bad] if rows is not None else bad
    shown = "".join(f"\n  episode {p}: {texts[i]!r}" for p, i in list(zip(positions, bad))[:5]) if texts else ""
    raise NonFiniteError(f"{name} is NaN or infinite for {len(bad)} episode(s) at batch positions {positions[:20]}"
                         f"{shown}\nCheck the reward function on these texts (it must return finite scores).")


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
    whitening statistics are taken over every process's episodes (``rlhf_course.core.distributed``)."""
    policy.eval()
    query_ids, query_mask, response_ids, response_mask = generate_batch(policy.lm, queries, tokenizer, config, rng, device)
    if config.fake_eos:  # a training rollout's setting; evaluations sample with generate_batch alone, the policy's own text
        response_ids = with_fake_eos(response_ids, response_mask, tokenizer.eos_token_id)
    query_texts = tokenizer.batch_decode(query_ids.masked_fill(query_mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    response_texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(response_ids, response_mask)]
    texts = [q + r for q, r in zip(query_texts, response_texts)]
    raw_scores = torch.as_tensor(reward_fn(texts), dtype=torch.float).cpu()
    if raw_scores.shape != (len(queries),):
        raise ValueError(f"reward_fn returned shape {tuple(raw_scores.shape)}; expected one score per text ({len(queries)})")
    check_finite("the reward", raw_scores, texts)
    scores = raw_scores
    if score_moments is not None:  # [TRL0] reward scaling: divide by the running std, keep the mean
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
    for name, tensor in (("the policy's log-prob", logprobs), ("the reference's log-prob", ref_logprobs), ("the value", values)):
        check_finite(name, torch.where(response_mask.bool(), tensor, 0.0), texts)  # padding may hold anything
    mask = response_mask.float()
    rewards, _ = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    advantages, returns = compute_gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:  # [37 detail 7] after computing returns, so value targets keep their scale
        advantages = masked_whiten(advantages, mask, accelerator=accelerator)  # statistics over every process's tokens
    largest = int(raw_scores.abs().argmax())  # a huge but finite reward overflows the whitening statistics
    check_finite(f"the advantage (largest |reward| {raw_scores[largest].item():.3g}, at batch position {largest})",
                 advantages, texts)
    check_finite("the return", returns, texts)
    return Rollout(query_ids, query_mask, response_ids, response_mask, scores, raw_scores, logprobs * mask,
                   ref_logprobs * mask, values * mask, rewards, advantages, returns, query_texts, response_texts)


# ============================================================================ 5. losses


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
    # The clip acts where V left the band and the clipped term wins (rounding alone read ~0.1% at an infinite band).
    acts = ((values - old_values).abs() > cliprange_value) & ((clipped_values - returns) ** 2 > (values - returns) ** 2)
    clip_fraction = masked_mean(acts.float(), mask)
    return loss, clip_fraction.detach()


# ============================================================================ 6. one PPO step


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
            texts = [rollout.query_texts[i] + rollout.response_texts[i] for i in index] if rollout.response_texts else None
            check_finite("the PPO loss", loss.detach().expand(len(index)), texts, index)  # before the weights move
            if not distributed.is_deepspeed(accelerator):  # DeepSpeed clips inside its engine and reports no norm
                check_finite("the gradient norm", torch.as_tensor(grad_norm).detach().expand(len(index)), texts, index)
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


# ============================================================================ 7. the training loop


def train_ppo(config: PPOConfig, policy: PolicyWithValueHead, reference: nn.Module, tokenizer, reward_fn: RewardFn,
              queries: list[list[int]], callback: Callable[[int, dict, list[dict]], None] | None = None,
              progress: bool = True, device: torch.device | str = "cpu", accelerator=None,
              checkpoint_every: int | None = None, checkpoint_dir: Path | str | None = None,
              resume_from: Path | str | None = None) -> list[dict]:
    """Run ``config.steps`` PPO steps; return one metrics dict per step (also passed to ``callback``).

    ``callback(step, metrics, history)`` is called after every step (live plots, early stops: raise
    ``StopIteration`` in it to end the run).  Queries are cycled in order, reshuffled each epoch.

    Scale-out (``rlhf_course.core.distributed``; ``python -m rlhf_course.train_ppo`` under ``accelerate
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
        try:
            rollout = make_experience(model, reference, tokenizer, reward_fn, batch_queries, config,
                                      kl_controller.value, rng, score_moments, device, accelerator)
        except NonFiniteError as error:
            raise NonFiniteError(f"PPO step {step}, make experience: {error}\nNothing was updated at this step; "
                                 "the weights and any earlier checkpoint are as the last good step left them.") from None
        experience_seconds = time.time() - started
        metrics = {"step": step, **rollout_stats(distributed.gather_rollout(rollout, accelerator), kl_controller.value,
                                                 tokenizer.eos_token_id)}
        metrics["learning_rate"] = optimizer.param_groups[0]["lr"]
        try:
            metrics.update(ppo_update(policy, optimizer, rollout, config, generator, device, accelerator))
        except NonFiniteError as error:
            raise NonFiniteError(f"PPO step {step}, update: {error}\nThe optimizer did not step on it; earlier "
                                 "checkpoints are untouched (mini-batches before it in this step were applied).") from None
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


# ============================================================================ 8. saving


def save_history(history: list[dict], path: Path | str) -> None:
    Path(path).write_text(json.dumps(history, indent=1))
