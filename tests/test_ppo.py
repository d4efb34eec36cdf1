"""PPO pieces against hand-computed values, plus a 2-step smoke run on a tiny GPT-2."""

import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_course.core import assets
from rlhf_course.core.profiles import Profile
from rlhf_course.rl import ppo
from rlhf_course.rl import sampling
from rlhf_course.core import stats

EOS = 50256


def tiny_lm(seed=0, n_embd=32):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=n_embd, n_head=2, n_positions=64)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return assets.gpt2_tokenizer()


def test_gae_matches_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = ppo.compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    # t=2: 1 - 0.7 = 0.3 ; t=1: (0.7 - 0.6) + 0.95*0.3 = 0.385 ; t=0: (0.6 - 0.5) + 0.95*0.385 = 0.46575
    assert torch.allclose(advantages, torch.tensor([[0.46575, 0.385, 0.3]]))
    assert torch.allclose(returns, torch.tensor([[0.96575, 0.985, 1.0]]))


def test_gae_with_discount_and_padding_ignores_positions_after_the_end():
    rewards = torch.tensor([[0.0, 2.0, 99.0]])
    values = torch.tensor([[1.0, 0.5, 42.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=1 is the last real token: 2 + 0.9*0 - 0.5 = 1.5 ; t=0: 0 + 0.9*0.5 - 1 + 0.9*0.5*1.5 = 0.125
    assert torch.allclose(advantages, torch.tensor([[0.125, 1.5, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[1.125, 2.0, 0.0]]))


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = ppo.per_token_rewards(torch.tensor([3.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 3.0, 0.0], [0.0, 0.1, 0.2 - 1.0]]))


def test_clipped_policy_loss_is_pessimistic():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 1.5]])).requires_grad_()
    mask = torch.ones(1, 2)
    # positive advantage: ratio 1.5 is clipped to 1.2 and the gradient vanishes
    loss, clip_fraction, _ = ppo.clipped_policy_loss(new, old, torch.tensor([[1.0, 1.0]]), mask, 0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert clip_fraction.item() == 1.0
    loss.backward()
    assert torch.all(new.grad == 0)
    # negative advantage: the unclipped (worse) term 1.5 wins and keeps its gradient
    new.grad = None
    loss, clip_fraction, _ = ppo.clipped_policy_loss(new, old, torch.tensor([[-2.0, -2.0]]), mask, 0.2)
    assert loss.item() == pytest.approx(3.0)
    assert clip_fraction.item() == 0.0
    loss.backward()
    assert torch.all(new.grad != 0)


def test_clipped_policy_loss_ignores_masked_tokens():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.0, 5.0]])
    loss, _, approx_kl = ppo.clipped_policy_loss(new, old, torch.tensor([[1.0, 100.0]]), torch.tensor([[1.0, 0.0]]), 0.2)
    assert loss.item() == pytest.approx(-1.0)
    assert approx_kl.item() == pytest.approx(0.0)


def test_clipped_value_loss():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    loss, clip_fraction = ppo.clipped_value_loss(new, old, returns, torch.ones(1, 2), 0.2)
    # token 0: unclipped error 0, clipped value 0.2 -> error 0.64 (max wins); token 1: 0.81 both ways
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert clip_fraction.item() == pytest.approx(0.5)


def test_value_clip_fraction_is_zero_without_a_clip_range():
    # 08's no_value_clip arm logged a clip fraction of ~0.1%: V_old + (V - V_old) differs from V in the last bit,
    # and the comparison of the two squared errors counted that rounding as a clip.
    generator = torch.Generator().manual_seed(0)
    old, new, returns = (torch.randn(64, 16, generator=generator) * 3 for _ in range(3))
    _, no_clip = ppo.clipped_value_loss(new, old, returns, torch.ones(64, 16), float("inf"))
    assert no_clip.item() == 0.0
    _, wide = ppo.clipped_value_loss(old + 1e-3 * new, old, returns, torch.ones(64, 16), 0.2)  # inside the band
    assert wide.item() == 0.0


def test_masked_whiten():
    values = torch.tensor([[1.0, 2.0, 3.0, 1000.0], [4.0, 5.0, 0.0, -1000.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    whitened = stats.masked_whiten(values, mask)
    real = whitened[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(whitened[~mask.bool()] == 0)
    with pytest.raises(ValueError, match="at least 2"):
        stats.masked_whiten(values, torch.zeros_like(mask).index_fill_(1, torch.tensor([0]), 0))


def test_response_mask_stops_after_first_eos_and_budget():
    ids = torch.tensor([[5, EOS, EOS, 7], [5, 6, 7, 8], [EOS, 1, 2, 3]])
    assert sampling.response_mask_after_eos(ids, EOS).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    budgets = torch.tensor([4, 3, 4])
    assert sampling.response_mask_after_eos(ids, EOS, budgets).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]
    assert sampling.response_mask_after_eos(ids, None, budgets).tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]


def eos_loving_lm():
    """A tiny GPT-2 whose every next-token distribution puts almost all mass on EOS."""
    lm = tiny_lm()
    with torch.no_grad():
        lm.transformer.ln_f.weight.zero_()
        lm.transformer.ln_f.bias.fill_(1.0)
        lm.transformer.wte.weight[EOS].fill_(10.0)  # tied head: EOS logit = 10 * 32
    return lm


def test_generation_stops_at_eos_unless_forced(tokenizer):
    lm = eos_loving_lm()
    queries = [[464, 3807], [40, 1842, 428, 3807, 13]]
    config = ppo.PPOConfig(batch_size=2, mini_batch_size=2)
    _, _, response_ids, mask = sampling.generate_batch(lm, queries, tokenizer, config, random.Random(0))
    assert mask.sum(1).tolist() == [1, 1]  # EOS at once, and it is the only trained token
    forced = ppo.PPOConfig(batch_size=2, mini_batch_size=2, force_max_length=True)
    _, _, response_ids, mask = sampling.generate_batch(lm, queries, tokenizer, forced, random.Random(0))
    budgets = [sampling.length_sampler(4, 16, r) for r in [random.Random(0)] for _ in range(2)]
    assert mask.sum(1).tolist() == budgets
    assert not (response_ids[mask.bool()] == EOS).any()
    faked = ppo.PPOConfig(batch_size=2, mini_batch_size=2, forward_batch_size=2, force_max_length=True, fake_eos=True)
    _, _, unfaked, _ = sampling.generate_batch(lm, queries, tokenizer, faked, random.Random(0))
    assert torch.equal(unfaked, response_ids)  # the sampler writes the policy's own text; fake EOS is the rollout's
    rollout = ppo.make_experience(ppo.PolicyWithValueHead(lm), ppo.frozen_reference(lm), tokenizer,
                                  lambda texts: torch.zeros(len(texts)), queries, faked, kl_coef=0.1, rng=random.Random(0))
    faked_ids, faked_mask = rollout.response_ids, rollout.response_mask
    assert torch.equal(faked_mask, mask)  # same lengths: the last kept token becomes EOS, nothing is added
    last = mask.sum(1) - 1
    assert faked_ids[torch.arange(2), last].tolist() == [EOS, EOS]
    before_last = mask.bool() & (torch.arange(mask.shape[1])[None, :] < last[:, None])
    assert torch.equal(faked_ids[before_last], response_ids[before_last])


def test_fake_eos_leaves_responses_that_end_in_eos_and_empty_ones_alone():
    ids = torch.tensor([[5, 6, EOS, 0], [5, 6, 7, 8], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    faked = sampling.with_fake_eos(ids, mask, EOS)
    assert faked.tolist() == [[5, 6, EOS, 0], [5, 6, 7, EOS], [0, 0, 0, 0]]
    assert ids[1, 3] == 8  # the input is not modified


def test_left_padded_logprobs_match_unpadded(tokenizer):
    policy = ppo.PolicyWithValueHead(tiny_lm())
    queries = [[464, 3807], [40, 1842, 428, 3807, 13]]
    query_ids, query_mask = sampling.left_pad(queries, EOS)
    response_ids = torch.tensor([[318, 922, 13], [318, 257, 13]])
    response_mask = torch.ones_like(response_ids)
    with torch.no_grad():
        logits, values = ppo.forward_response(policy, query_ids, query_mask, response_ids, response_mask, with_values=True)
        batched = ppo.logprobs_of(logits, response_ids)
        for row, query in enumerate(queries):
            ids = torch.tensor([query + response_ids[row].tolist()])
            alone = policy.lm(input_ids=ids).logits[:, len(query) - 1:-1]
            assert torch.allclose(batched[row], ppo.logprobs_of(alone, response_ids[row:row + 1])[0], atol=1e-5)
    assert values.shape == response_ids.shape


def test_two_ppo_steps_change_the_parameters(tokenizer):
    lm = tiny_lm()
    policy, reference = ppo.PolicyWithValueHead(lm), ppo.frozen_reference(lm)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    config = ppo.PPOConfig(steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3,
                           forward_batch_size=2, entropy_coef=0.01, scale_rewards=True, max_grad_norm=1.0)
    queries = sampling.make_queries(["A gripping film about love", "Dull and far too long", "The cast is superb",
                                "I left halfway through"], tokenizer, config)
    seen = []
    history = ppo.train_ppo(config, policy, reference, tokenizer, lambda texts: torch.tensor([len(t) / 10 for t in texts]),
                            queries, callback=lambda step, metrics, history: seen.append(step), progress=False)
    assert seen == [0, 1] and len(history) == 2
    for key in ("reward_mean", "kl", "policy_loss", "value_loss", "entropy", "response_length", "return_mean"):
        assert all(torch.isfinite(torch.tensor(h[key])) for h in history), key
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    assert "v_head.weight" in changed and any(n.startswith("lm.transformer.h.0") for n in changed)
    for name, p in reference.named_parameters():  # the reference stays frozen at the start point
        assert torch.equal(p, before["lm." + name]), name
    assert all(not p.requires_grad for p in reference.parameters())


def test_policy_save_and_load_round_trip(tmp_path, tokenizer):
    policy = ppo.PolicyWithValueHead(tiny_lm())
    policy.save(tmp_path / "tuned", tokenizer)
    loaded = ppo.PolicyWithValueHead.load(tmp_path / "tuned")
    for (name, a), (_, b) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_config_validation_names_the_setting():
    with pytest.raises(ValueError, match="mini_batch_size"):
        ppo.PPOConfig(batch_size=10, mini_batch_size=4).validate()
    laptop = ppo.PPOConfig.for_profile("laptop")
    full = ppo.PPOConfig.for_profile(Profile("full"))
    assert full.learning_rate == 1.41e-5 and full.batch_size == 128
    assert laptop.batch_size < full.batch_size


def test_linear_lr_schedule_goes_from_the_rate_to_zero():
    linear = ppo.PPOConfig(steps=4, learning_rate=1e-3, lr_schedule="linear")
    assert [ppo.learning_rate_at(linear, s) for s in range(5)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])
    constant = ppo.PPOConfig(steps=4, learning_rate=1e-3)
    assert ppo.learning_rate_at(constant, 2) == constant.learning_rate  # constant by default (TRL0)
    with pytest.raises(ValueError, match="lr_schedule"):
        ppo.PPOConfig(lr_schedule="cosine").validate()


def test_sample_next_token_draws_from_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(20000, 3)
    config = ppo.PPOConfig()
    draws = sampling.sample_next_token(logits, config, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(frequencies, probs, atol=0.015)
    greedy = sampling.sample_next_token(logits[:100], ppo.PPOConfig(top_k=1), torch.Generator().manual_seed(0))
    assert torch.all(greedy == 0)
    nucleus = sampling.sample_next_token(logits[:2000], ppo.PPOConfig(top_p=0.8), torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {0, 1}


def test_eos_fraction_counts_responses_the_policy_ended_itself():
    eos, pad = 9, 9  # GPT-2 pads with its EOS token
    response_ids = torch.tensor([[5, 6, eos, pad],   # ended by EOS after 2 tokens
                                 [5, 6, 7, 8],       # ran to the full width
                                 [5, 6, pad, pad]])  # cut by a length budget of 2, no EOS
    mask = sampling.response_mask_after_eos(response_ids, eos, budgets=torch.tensor([4, 4, 2]))
    zeros = torch.zeros(3, 4)
    experience = ppo.Rollout(response_ids[:, :1], torch.ones(3, 1), response_ids, mask, torch.zeros(3), torch.zeros(3),
                             zeros, zeros, zeros, zeros, zeros, zeros)
    stats = ppo.rollout_stats(experience, kl_coef=0.1, eos_id=eos)
    assert stats["eos_fraction"] == pytest.approx(1 / 3)  # not 2/3: the budget-cut row did not stop itself
    assert stats["response_length"] == pytest.approx((3 + 4 + 2) / 3)


# ----------------------------------------------------------------------------- bad input (issue 17)


def test_temperature_zero_is_greedy_and_negative_is_refused():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, -1.0, 0.0, 2.9]])
    assert rollout_tokens(logits, ppo.PPOConfig(temperature=0.0)).tolist() == [1, 0]
    with pytest.raises(ValueError, match="temperature=-1"):
        rollout_tokens(logits, ppo.PPOConfig(temperature=-1.0))


def rollout_tokens(logits, config):
    return sampling.sample_next_token(logits, config, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_a_non_finite_or_huge_reward_stops_ppo_before_any_weight_changes(tokenizer, bad):
    lm = tiny_lm()
    policy, reference = ppo.PolicyWithValueHead(lm), ppo.frozen_reference(lm)
    config = ppo.PPOConfig(steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=1, forward_batch_size=2)
    queries = sampling.make_queries(["A gripping film about love", "Dull and far too long", "The cast is superb",
                                     "I left halfway through"], tokenizer, config)
    before = [p.detach().clone() for p in policy.parameters()]

    def bad_reward(texts):
        return torch.tensor([bad] + [1.0] * (len(texts) - 1))

    with pytest.raises(ppo.NonFiniteError, match=r"PPO step 0") as error:
        ppo.train_ppo(config, policy, reference, tokenizer, bad_reward, queries, progress=False)
    assert "episode 0:" in str(error.value)  # the offending text is shown
    assert all(torch.equal(b, p) for b, p in zip(before, policy.parameters()))


def test_ppo_step_benchmark_samples_the_sgemm_rate_between_steps(capsys, monkeypatch):
    # Issue 14: a machine's sgemm rate drifted by a quarter within one run, so the yardstick is sampled
    # before, between and after the timed steps (3 samples for 2 steps) and its range is reported.
    import functools
    import json

    from rlhf_course.course import benchmarks

    monkeypatch.setattr(benchmarks, "_sgemm_rates", functools.partial(benchmarks._sgemm_rates, n=256))  # cheap yardstick
    benchmarks.benchmark_ppo_step(["--model", "tiny", "--batch", "4", "--steps", "2", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    low, high = figures["sgemm_gflops_range"]
    assert 0 < low <= figures["sgemm_gflops"] <= high
    assert "mean of 3 samples before, between and after the steps" in "\n".join(lines)
    assert figures["timed_steps"] == 1 and 0 < figures["step_mfu"] and figures["seconds_per_step"] > 0
    assert set(figures["phases"]) == {"generate", "score", "policy forward", "reference forward", "update"}
