"""PPO on a pretrained policy with LoRA: SmolLM2-135M (SFT) as actor, its own weights as reference.

The course's PPO (``rlhf_course.rl.ppo``) takes a ``PolicyWithValueHead`` and a ``reference``
module; this file builds both for a LoRA actor, without touching the PPO code:

* **Actor**: the SFT policy (``policy.smollm2_sft``: SmolLM2-135M-Instruct with its SFT adapter
  merged in) wrapped by PEFT with a *fresh* LoRA adapter (Hu et al. 2022), zero at the start (LoRA's
  B matrix starts at 0), so the actor starts exactly at the SFT policy.  Only the adapter and the
  value head are trained: ``train_ppo`` gives its optimizer the parameters that require a gradient.
* **Reference**: ``AdapterDisabledReference``, a view of the *same* module run inside PEFT's
  ``disable_adapter()`` context: the frozen SFT weights, with no second copy of the 540 MB model (the
  7M policy's ``frozen_reference`` deep-copies; at 135M on a laptop the copy is memory and cache
  traffic for nothing).  It is not a submodule of anything, so ``reference.parameters()`` is empty and
  ``reference.eval()`` never touches the actor.
* **Critic**: a value head (one linear layer, zero-initialised) on the actor's last hidden state,
  as for the 7M policy (``PolicyWithValueHead``), i.e. a *shared trunk*: the value loss
  (``vf_coef`` x) also moves the LoRA weights.  DeepSpeed-Chat trains a separate critic initialised
  from the reward model instead: that keeps value gradients out of the actor and starts the critic
  from a network that already reads sentiment.  Here the reward model is a MiniLM classifier with
  another tokenizer (WordPiece, not SmolLM2's BPE), so it cannot give a value per *policy* token
  without re-tokenising every prefix; ``ActorWithSeparateCritic`` is that layout with the critic
  started from the SFT policy instead (a second copy with its own adapter and value head).  The
  shared trunk is the default because a second 135M network adds a forward and a backward pass to
  every step on a CPU, where the update already dominates; sweep ``critic`` of
  ``rlhf_course.experiments`` measures the cost and the effect of both (notebook 07, section 7.7b).

``SMOLLM2_PPO_OVERRIDES`` are the laptop's *base recipe*, found by the short sweep of issue 14: every sweep of
``rlhf_course.experiments`` changes it one arm at a time (notebooks 08, 09).  Notebook 07 trains the base recipe
with ``NOTEBOOK_07_CHANGES`` (``notebook_07_config``), which sweep ``recipe`` chose.  ``heldout_evaluation``
measures what the sweeps report: proxy reward, the gold judge (VADER, never trained against), KL to the
reference per response and distinct-2, on held-out queries.
"""

from __future__ import annotations

import random

import torch
import torch.nn as nn

from rlhf_course.core.profiles import Profile
from rlhf_course.core.quiet import quiet_loading
from rlhf_course.policy.judge import mean_and_standard_error
from rlhf_course.policy.smollm2_sft import LLAMA_LINEAR_MODULES, causal_lm_lora_config
from rlhf_course.rl.ppo import PPOConfig, PolicyWithValueHead, forward_response, logprobs_of
from rlhf_course.rl.sampling import RewardFn, generate_batch

# The PPO adapter: rank 16 on the seven linear layers of every block (~4.9M trained parameters, 3.6%).
PPO_LORA = dict(r=16, alpha=32.0, target_modules=LLAMA_LINEAR_MODULES, top_layers=0)

# Laptop PPO settings for the pretrained policy (on top of PPOConfig's laptop profile), from three 25-step runs
# of issue 14 (held-out proxy gain / KL per response: lr 5e-4, beta 0.1: +1.13 / 5.2; lr 1e-3, beta 0.05: +1.48 /
# 12.5; lr 1e-3, beta 0.1: +1.40 / 8.5).  A pretrained LoRA actor needs a learning rate far above full
# fine-tuning's 1.41e-5 (LoRA's update starts at zero and is scaled by alpha / r); batches of 32 in 2 mini-batches;
# beta held fixed: with the seed's horizon the adaptive controller would move it by 0.06% per step (notebook 07).
SMOLLM2_PPO_OVERRIDES = dict(
    steps=25, batch_size=32, mini_batch_size=16, ppo_epochs=2, forward_batch_size=32, learning_rate=1e-3,
    init_kl_coef=0.1, adaptive_kl=False, max_grad_norm=1.0,
)


# Notebook 07's recipe: the base recipe with the changes of sweep ``recipe``'s arm NOTEBOOK_07_ARM (notebook 07,
# section 7.7c, where its seeds are shown): a response cut at its budget still ends in EOS (OpenRLHF; 08's arm
# fake_eos), the learning rate decays linearly to 0 ([37 detail 4]; 08's arm lr_decay: KL -3.8 s.e.), and a weaker
# beta over 10 more steps spends on reward the KL budget that decay frees.  The arm was chosen on its seed 0 (07's
# run); its mean over seeds is the fair figure.  The sweeps keep the base recipe, so their logged runs stay comparable.
NOTEBOOK_07_CHANGES = dict(steps=35, fake_eos=True, lr_schedule="linear", init_kl_coef=0.07)
NOTEBOOK_07_ARM = "fake_eos+lr_decay+beta_0.07"  # its arm in sweep ``recipe`` (whose runs are 35 steps long)


def smollm2_ppo_config(profile: Profile | str | None = "laptop", **overrides) -> PPOConfig:
    """``PPOConfig`` for PPO on the SmolLM2 LoRA policy: the profile's values, then
    ``SMOLLM2_PPO_OVERRIDES`` (the base recipe), then ``overrides``."""
    return PPOConfig.for_profile(profile, **{**SMOLLM2_PPO_OVERRIDES, **overrides})


class AdapterDisabledReference(nn.Module):
    """The reference policy as a view of the actor: its forward runs the PEFT model with the adapter off.

    Called like a causal LM (``reference(input_ids=..., attention_mask=..., position_ids=...,
    logits_to_keep=...)``), as ``rl.ppo.forward_response`` calls the 7M policy's frozen copy.
    """

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)  # a view, not a submodule: no parameters here

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


def add_lora_adapter(lm: nn.Module, r: int = 16, alpha: float = 32.0, target_modules: str = LLAMA_LINEAR_MODULES,
                     top_layers: int = 0, seed: int = 0):
    """``lm`` wrapped by PEFT with a fresh LoRA adapter (B = 0: the wrapped model equals ``lm``); only
    the adapter requires a gradient.  ``top_layers`` > 0 adapts only the top blocks."""
    from peft import get_peft_model

    n_layers = getattr(lm.config, "num_hidden_layers", None)
    with torch.random.fork_rng():  # A's random init must not shift the caller's random draws
        torch.manual_seed(seed)
        with quiet_loading():
            return get_peft_model(lm, causal_lm_lora_config(r, alpha, target_modules, top_layers, n_layers))


def lora_policy_and_reference(lm: nn.Module, **lora) -> tuple[PolicyWithValueHead, AdapterDisabledReference]:
    """``(actor with value head, reference view)`` from a causal LM: LoRA actor, adapter-off reference."""
    peft_model = add_lora_adapter(lm, **{**PPO_LORA, **lora})
    return PolicyWithValueHead(peft_model), AdapterDisabledReference(peft_model)


class ActorWithSeparateCritic(nn.Module):
    """The actor (a LoRA causal LM) and a critic of its own (another copy of the SFT model with its own
    LoRA adapter and value head), behind ``PolicyWithValueHead``'s interface, so ``rl.ppo`` runs unchanged.

    DeepSpeed-Chat's layout (actor and critic are two networks; there the critic starts from the reward
    model, here from the SFT policy, since the reward model reads another tokenizer): no value gradient
    reaches the actor, at the price of a second forward and backward pass through a 135M model.
    """

    def __init__(self, actor_lm: nn.Module, critic: PolicyWithValueHead):
        super().__init__()
        self.lm, self.critic = actor_lm, critic
        self.v_head = critic.v_head  # PolicyWithValueHead's attribute, for code that reads the value head

    def forward(self, input_ids, attention_mask, logits_to_keep: int):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         logits_to_keep=logits_to_keep).logits
        _, values = self.critic(input_ids, attention_mask, logits_to_keep)
        return logits, values

    def save(self, folder, tokenizer=None):
        """The actor's adapter in ``folder`` (as ``PolicyWithValueHead.save``), the critic in ``folder/critic``."""
        from pathlib import Path

        self.critic.save(Path(folder) / "critic")
        self.lm.save_pretrained(str(folder), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        return Path(folder)


CRITICS = ("shared", "separate")


def load_smollm2_policy_and_reference(device: torch.device | str = "cpu", critic: str = "shared", **lora):
    """``(policy, reference, tokenizer)`` for PPO on SmolLM2-135M: the SFT asset ("sft-smollm2-lora",
    built on first use) plus a fresh PPO adapter; a fresh start for one run.

    ``critic``: "shared" (a value head on the actor's trunk, the course's default) or "separate"
    (``ActorWithSeparateCritic``: a second copy of the SFT model with its own adapter)."""
    import copy

    from rlhf_course.policy.smollm2_sft import load_smollm2_sft_policy

    if critic not in CRITICS:
        raise ValueError(f"critic={critic!r}: choose one of {CRITICS}")
    lm, tokenizer = load_smollm2_sft_policy(device)
    critic_lm = copy.deepcopy(lm) if critic == "separate" else None  # before the actor's adapter wraps lm
    policy, reference = lora_policy_and_reference(lm, **lora)
    if critic_lm is not None:
        critic_model = PolicyWithValueHead(add_lora_adapter(critic_lm, **{**PPO_LORA, **lora, "seed": 1}))
        policy = ActorWithSeparateCritic(policy.lm, critic_model)
    return policy, reference, tokenizer


def load_ppo_start(profile: Profile | str | None = None, device: torch.device | str = "cpu"):
    """``(policy, reference, tokenizer, config)``: the profile's PPO starting point (notebook 07).
    ``train_ppo --policy smollm2-lora`` loads the same policy and reference, and takes the same recipe
    for every flag left at its profile value (``train_ppo.with_lora_recipe``).

    laptop: the SmolLM2-135M SFT policy with a fresh PPO LoRA adapter, the reference being the adapter
    switched off, and ``notebook_07_config``; full: the seed's ``lvwerra/gpt2-imdb`` fine-tuned in full,
    a frozen copy as reference, and ``PPOConfig``'s seed values (TRL 0.x ``gpt2-sentiment``).
    """
    from rlhf_course.core.profiles import current_profile
    from rlhf_course.rl.ppo import load_policy_and_reference

    profile = Profile(str(profile)) if profile is not None else current_profile()
    start = load_smollm2_policy_and_reference(device) if profile.is_laptop else load_policy_and_reference(device)
    return (*start, notebook_07_config(profile))


def ppo_start_config(profile: Profile | str | None = None) -> PPOConfig:
    """The base recipe the sweeps start from: ``smollm2_ppo_config`` on the laptop, the seed's values in full."""
    from rlhf_course.core.profiles import current_profile

    profile = Profile(str(profile)) if profile is not None else current_profile()
    return smollm2_ppo_config(profile) if profile.is_laptop else PPOConfig.for_profile(profile)


def notebook_07_config(profile: Profile | str | None = None) -> PPOConfig:
    """The ``PPOConfig`` of ``load_ppo_start`` (notebook 07): on the laptop the base recipe with
    ``NOTEBOOK_07_CHANGES``; in full the seed's values (its adaptive KL controller and 194 steps)."""
    from rlhf_course.core.profiles import current_profile

    profile = Profile(str(profile)) if profile is not None else current_profile()
    return smollm2_ppo_config(profile, **NOTEBOOK_07_CHANGES) if profile.is_laptop else PPOConfig.for_profile(profile)


def load_lora_ppo_policy(folder, device: torch.device | str = "cpu") -> PolicyWithValueHead:
    """A LoRA PPO policy saved by ``PolicyWithValueHead.save`` (the PPO adapter, ``value_head.pt``) put
    back on the SFT policy it was trained from (asset "sft-smollm2-lora")."""
    from pathlib import Path

    from peft import PeftModel

    from rlhf_course.core import cache
    from rlhf_course.policy.smollm2_sft import load_smollm2_sft_policy

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no adapter_config.json: pass a folder written by "
                                "PolicyWithValueHead.save for a LoRA policy (e.g. train_ppo --policy smollm2-lora)")
    lm, _ = load_smollm2_sft_policy(device)
    with cache.explain_load_errors(folder), quiet_loading():
        policy = PolicyWithValueHead(PeftModel.from_pretrained(lm, str(folder)).to(device))
        policy.v_head.load_state_dict(torch.load(folder / "value_head.pt", map_location=device))
    return policy


def trained_parameter_names(policy: nn.Module) -> list[str]:
    """Names of the parameters PPO's optimizer moves (those that require a gradient)."""
    return [name for name, parameter in policy.named_parameters() if parameter.requires_grad]


@torch.no_grad()
def heldout_evaluation(lm: nn.Module, tokenizer, reward_fn: RewardFn, judge, queries: list[list[int]],
                       config: PPOConfig, reference: nn.Module | None = None, seed: int = 0,
                       device: torch.device | str = "cpu", batch_size: int = 32) -> dict:
    """Sample one response per held-out query and measure it.

    Returns ``{"frame", "proxy", "proxy_se", "gold", "gold_se", "distinct_2", "length", "eos_fraction",
    "kl", "kl_se"}``: the proxy reward (``reward_fn``, the one PPO maximises), the gold judge
    (``judge(texts)``, e.g. ``policy.judge.GoldJudge``), distinct-2 of the responses (Li et al. 2016),
    and, given the ``reference``, the KL to it per response (sum over tokens of log pi - log pi_ref on
    the sampled tokens, the k1 estimate PPO penalises).  ``frame`` holds one row per query (paired
    before/after differences: ``policy.judge.paired_gain``).  The same ``seed`` gives the same
    sampling noise before and after training.
    """
    import pandas as pd

    from rlhf_course.rl.tricks import repetition_stats

    rng, was_training = random.Random(seed), lm.training
    lm.eval()
    rows = []
    torch.manual_seed(seed)
    for start in range(0, len(queries), batch_size):
        query_ids, query_mask, response_ids, response_mask = generate_batch(
            lm, queries[start:start + batch_size], tokenizer, config, rng, device)
        query_texts = tokenizer.batch_decode(query_ids.masked_fill(query_mask == 0, tokenizer.pad_token_id),
                                             skip_special_tokens=True)
        response_texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                          for ids, m in zip(response_ids, response_mask)]
        lengths = response_mask.sum(1)
        last = response_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
        kl = torch.full((len(query_texts),), float("nan"))
        if reference is not None:
            args = [t.to(device) for t in (query_ids, query_mask, response_ids, response_mask)]
            position_ids = (torch.cat(args[1::2], 1).cumsum(-1) - 1).clamp(min=0)
            logits = lm(input_ids=torch.cat(args[0::2], 1), attention_mask=torch.cat(args[1::2], 1),
                        position_ids=position_ids, logits_to_keep=response_ids.shape[1] + 1).logits[:, :-1]
            ref_logits, _ = forward_response(reference, *args, with_values=False)
            mask = args[3].float()
            kl = ((logprobs_of(logits, args[2]) - logprobs_of(ref_logits, args[2])) * mask).sum(1).cpu()
        rows += [{"query": q, "response": r, "length": int(n), "ended": bool(t == tokenizer.eos_token_id),
                  "kl": float(k)} for q, r, n, t, k in zip(query_texts, response_texts, lengths, last, kl)]
    frame = pd.DataFrame(rows)
    texts = [q + r for q, r in zip(frame["query"], frame["response"])]
    frame["proxy"] = torch.as_tensor(reward_fn(texts)).float().numpy()
    frame["gold"] = torch.as_tensor(judge(texts)).float().numpy()
    lm.train(was_training)
    proxy, proxy_se = mean_and_standard_error(frame["proxy"])
    gold, gold_se = mean_and_standard_error(frame["gold"])
    kl_mean, kl_se = mean_and_standard_error(frame["kl"])
    return {"frame": frame, "proxy": proxy, "proxy_se": proxy_se, "gold": gold, "gold_se": gold_se,
            "distinct_2": repetition_stats(list(frame["response"]))["distinct_2"], "length": frame["length"].mean(),
            "eos_fraction": frame["ended"].mean(), "kl": kl_mean, "kl_se": kl_se}
