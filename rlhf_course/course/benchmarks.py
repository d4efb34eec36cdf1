"""Benchmarks: measured figures, never pass/fail (``python -m rlhf_course.bench NAME``).

* ``token_loss``: the vectorised token-level pairwise loss against its per-pair reference loop.
* ``rollout``: batched, left-padded generation against the seed's one-query-at-a-time loop.
* ``ppo_step``: every phase of one PPO step at GPT-2-124M scale.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from rlhf_course.core import assets
from rlhf_course.core.profiles import Profile, current_profile, get_device
from rlhf_course.reward import token_loss as tl
from rlhf_course.rl.ppo import PPOConfig, PolicyWithValueHead, frozen_reference, train_ppo
from rlhf_course.rl.sampling import generate_batch, left_pad, length_sampler, make_queries, review_texts



def _bench_model(name: str):
    """The policy a benchmark times: the cached laptop SFT policy, or a random GPT-2 of a given size."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if name == "sft":
        from rlhf_course.policy.sft import load_sft_policy

        lm, _ = load_sft_policy()
        return lm, "laptop SFT policy (cached asset)"
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config()), "GPT2Config() random weights (124M, GPT-2 small)"
    if name == "tiny":
        return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4)), "GPT2Config(4 layers, 128 wide) random weights"
    raise ValueError(f"unknown --model {name!r}; choose sft, gpt2 or tiny")


def benchmark_rollout(argv: list[str]) -> None:
    """Batched, left-padded generation vs the seed's one-query-at-a-time loop, same queries."""

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
        from rlhf_course.policy.sentiment import sentiment_reward

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


# ============================================================================ token-level loss


def _time_forward_backward(loss_fn, inputs, repeats: int) -> float:
    """Median seconds of one forward + backward of ``loss_fn`` on ``inputs``."""
    times = []
    for _ in range(repeats + 1):  # first call is a warm-up
        for key in ("chosen_values", "rejected_values"):
            inputs[key].grad = None
        start = time.perf_counter()
        loss_fn(**inputs).loss.backward()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return times[len(times) // 2]


def benchmark_token_loss(argv: list[str]) -> None:
    """Forward + backward time of the reference loop vs the vectorised loss, on CPU.

    Runs once per thread count in ``--threads`` (default: 1 and torch's default).  On a shared
    machine the multi-threaded figures are inflated by waiting for busy cores; 1 thread is steadier.
    """
    parser = argparse.ArgumentParser(prog="python -m rlhf_course.bench token_loss")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}", help="comma-separated torch thread counts")
    args = parser.parse_args(argv)
    inputs = tl.random_pair_batch(args.batch, args.length)
    reference = tl.token_level_pairwise_loss_reference(**inputs)
    vectorised = tl.token_level_pairwise_loss(**inputs)
    difference = (reference.loss - vectorised.loss).abs().item()
    print(
        f"token-level pairwise loss, forward+backward on CPU, batch {args.batch}, length {args.length}, "
        f"median of {args.repeats}; |loss difference| = {difference:.2e}"
    )
    default_threads = torch.get_num_threads()
    for threads in sorted({int(t) for t in str(args.threads).split(",") if t.strip()}):
        torch.set_num_threads(threads)
        reference_s = _time_forward_backward(tl.token_level_pairwise_loss_reference, inputs, args.repeats)
        vectorised_s = _time_forward_backward(tl.token_level_pairwise_loss, inputs, args.repeats)
        print(
            f"  threads={threads}: reference (per-pair loop) {reference_s * 1e3:8.2f} ms | "
            f"vectorised {vectorised_s * 1e3:7.2f} ms | speed-up {reference_s / vectorised_s:6.1f}x"
        )
    torch.set_num_threads(default_threads)
