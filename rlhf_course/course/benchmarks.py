"""Benchmarks: measured figures, never pass/fail (``python -m rlhf_course.bench NAME``).

* ``token_loss``: the vectorised token-level pairwise loss against its per-pair reference loop.
* ``rollout``: batched, left-padded generation against the seed's one-query-at-a-time loop.
* ``ppo_step``: every phase of one PPO step (generate, score, policy and reference forward, update),
  each as a share of the machine's sgemm rate measured in the same run (MFU), at GPT-2-124M scale or on
  the pretrained SmolLM2-135M + LoRA policy (``--model smollm2-lora``).
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
from torch.overrides import TorchFunctionMode

from rlhf_course.core import assets
from rlhf_course.core.profiles import Profile, current_profile, get_device
from rlhf_course.reward import token_loss as tl
from rlhf_course.rl.ppo import PPOConfig, PolicyWithValueHead, frozen_reference, train_ppo
from rlhf_course.rl.sampling import generate_batch, left_pad, length_sampler, make_queries, review_texts

MODELS = ["sft", "gpt2", "tiny", "smollm2-sft", "smollm2-lora"]


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
    if name in ("smollm2-sft", "smollm2-lora"):  # the pretrained policy (SFT adapter merged); -lora: + a PPO adapter
        from rlhf_course.policy.smollm2_sft import load_smollm2_sft_policy

        lm, _ = load_smollm2_sft_policy()
        if name == "smollm2-sft":
            return lm, "SmolLM2-135M-Instruct + SFT adapter, merged (cached asset sft-smollm2-lora)"
        from rlhf_course.rl.lora_policy import add_lora_adapter

        return add_lora_adapter(lm), "SmolLM2-135M-Instruct SFT + a fresh PPO LoRA adapter (r 16, all linear layers)"
    raise ValueError(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}")


def _bench_tokenizer(name: str):
    return assets.smollm2_tokenizer() if name.startswith("smollm2") else assets.gpt2_tokenizer()


def benchmark_rollout(argv: list[str]) -> None:
    """Batched, left-padded generation vs the seed's one-query-at-a-time loop, same queries."""

    parser = argparse.ArgumentParser(prog="bench rollout")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", default="sft", choices=MODELS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-sequential", action="store_true", help="leave out the one-query-at-a-time loop")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device()
    torch.manual_seed(0)
    lm, described = _bench_model(args.model)
    lm = lm.to(device).eval()
    tokenizer = _bench_tokenizer(args.model)
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

    runs = [("batched, HF generate()", hf_generate_batched), ("batched, ppo.generate_batch", batched)]
    if not args.skip_sequential:
        runs.insert(0, ("one query at a time (seed loop)", one_at_a_time))
    with torch.no_grad():
        batched()  # warm-up
        timings = {}
        for _ in range(args.repeats):  # interleaved: a load spike on a shared machine hits every method
            for name, fn in runs:
                started = time.perf_counter()
                tokens = fn()
                seconds = time.perf_counter() - started
                if seconds < timings.get(name, (float("inf"), 0))[0]:
                    timings[name] = (seconds, tokens)
        for name, (best, tokens) in timings.items():
            print(f"{name:34s} {best:7.2f} s  ({tokens} response tokens)", flush=True)
    print(f"model: {described}; device {device}; {len(queries)} queries of 2-7 tokens, responses 4-15 tokens "
          f"(per-query budgets; the batched runs sample to the longest budget), torch threads {torch.get_num_threads()}")
    hf_batched, bat = timings["batched, HF generate()"][0], timings["batched, ppo.generate_batch"][0]
    if not args.skip_sequential:
        seq = timings["one query at a time (seed loop)"][0]
        print(f"speed-up vs one-at-a-time: HF generate() batched {seq / hf_batched:.1f}x, "
              f"ppo.generate_batch {seq / bat:.1f}x")
    print(f"ppo.generate_batch vs HF generate() batched: {hf_batched / bat:.2f}x")


class _PhaseClock:
    """Seconds (wall and process CPU) and tokens of the phases of PPO steps, read from forward hooks and
    a reward wrapper, so that ``train_ppo`` runs unchanged (same code, same numerics) while it is timed.

    CPU seconds matter on a shared machine: with one torch thread, a phase's CPU time is about what it
    would take on a quiet core, however long it waited for one (more threads add their spin-waiting)."""

    PHASES = ("generate", "score", "policy forward", "reference forward", "update")

    def __init__(self):
        self.seconds = {"wall": dict.fromkeys(self.PHASES, 0.0), "cpu": dict.fromkeys(self.PHASES, 0.0)}
        self.tokens = dict.fromkeys(self.PHASES, 0)
        self.episodes, self._open, self._update_started = 0, {}, None
        self._step_started, self._known = self._now(), {"wall": 0.0, "cpu": 0.0}

    @staticmethod
    def _now() -> dict:
        return {"wall": time.perf_counter(), "cpu": time.process_time()}

    def _add(self, phase: str, started: dict) -> None:
        now = self._now()
        for clock in ("wall", "cpu"):
            self.seconds[clock][phase] += now[clock] - started[clock]

    def watch(self, module: torch.nn.Module, phase: str, grad_phase: str | None = None) -> None:
        """Time ``module``'s no-grad forward passes as ``phase``; count the tokens of its forward passes
        with a gradient as ``grad_phase``, whose time runs from the first of them to the step's end."""
        def pre(mod, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if torch.is_grad_enabled() and grad_phase is not None and self._update_started is None:
                self._update_started = self._now()
            self._open[id(mod)] = (torch.is_grad_enabled(), self._now(), ids.numel())

        def post(mod, args, kwargs, output):
            grad, started, tokens = self._open.pop(id(mod))
            if not grad:
                self._add(phase, started)
                self.tokens[phase] += tokens
            elif grad_phase is not None:
                self.tokens[grad_phase] += tokens

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)

    def reward(self, reward_fn):
        def timed(texts):
            started = self._now()
            scores = reward_fn(texts)
            self._add("score", started)
            self.episodes += len(texts)
            return scores
        return timed

    def end_step(self) -> dict:
        """Close a step (``train_ppo``'s callback): the update ran from its first forward pass to here;
        generation is the rest of the step (sampling, and the small change: decoding texts, GAE)."""
        if self._update_started is not None:
            self._add("update", self._update_started)
            self._update_started = None
        now = self._now()
        for clock, seconds in self.seconds.items():
            known = sum(v for phase, v in seconds.items() if phase != "generate")
            seconds["generate"] += now[clock] - self._step_started[clock] - (known - self._known[clock])
            self._known[clock] = known
        self._step_started = now
        return {"seconds": {clock: dict(v) for clock, v in self.seconds.items()}, "tokens": dict(self.tokens),
                "episodes": self.episodes}

    def pause(self, work):
        """Run ``work()`` between two steps without counting its time in any phase; return its result."""
        result = work()
        self._step_started = self._now()
        return result


def _sgemm_rates(n: int = 2048, repeats: int = 3) -> tuple[float, float]:
    """``(wall, CPU)`` GFLOP/s of ``torch.mm`` on n x n float32 at the current thread count: best of
    ``repeats`` (2 n^3 FLOPs each).  The CPU rate divides by process CPU seconds (all threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    wall = cpu = float("inf")
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        wall, cpu = min(wall, time.perf_counter() - started), min(cpu, time.process_time() - started_cpu)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / max(cpu, 1e-9) / 1e9


def benchmark_ppo_step(argv: list[str]) -> None:
    """Every phase of a PPO step, timed, and its MFU: the share of the machine's sgemm rate it reaches.

    The phases are timed inside ``train_ppo`` itself (forward hooks; the first step is a warm-up):
    generate (sampling, plus decoding texts and GAE), score (the reward), policy forward and reference
    forward (no gradient), update (``ppo_epochs`` of forward, backward and optimizer steps).  FLOPs count
    2N per token for a forward pass and 6N per token for a training pass, N being the policy's
    parameters without adapter or value head (LoRA or not: a LoRA backward computes no weight gradients
    for the frozen layers, so its true cost is nearer 4N and its update MFU is overstated up to 1.5x);
    generation counts the B (Q + R - 1) tokens its cached passes feed.  The yardstick is a ``torch.mm`` of
    2048 x 2048 float32 matrices at the run's thread count, sampled before, between and after the steps
    (mean of the samples, their range printed): a shared machine's rate drifts by a quarter within one run.
    Each MFU is given twice: by wall time, and by process CPU time against sgemm's CPU rate, which a
    busy machine distorts less (with ``--threads 1``).  ``--json`` ends with one line of JSON.
    """
    import json

    parser = argparse.ArgumentParser(prog="bench ppo_step")
    parser.add_argument("--batch", type=int, default=None, help="episodes per step (default 128 on GPU, 8 on CPU)")
    parser.add_argument("--mini-batch", type=int, default=None)
    parser.add_argument("--ppo-epochs", type=int, default=None, help="passes over each batch (default: PPOConfig's, 4)")
    parser.add_argument("--model", default="gpt2", choices=MODELS)
    parser.add_argument("--reward", default="length", choices=["length", "classifier"],
                        help="'classifier' scores with the sentiment reward model (seed-like); 'length' is free")
    parser.add_argument("--steps", type=int, default=2, help="steps to time (the first is a warm-up when >1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON: the figures")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device()
    batch = args.batch or (128 if device.type == "cuda" else 8)
    torch.manual_seed(0)
    lm, described = _bench_model(args.model)
    lm = lm.to(device)
    tokenizer = _bench_tokenizer(args.model)
    if args.reward == "classifier":
        from rlhf_course.policy.sentiment import sentiment_reward

        reward_fn = sentiment_reward(device)
    else:
        reward_fn = lambda texts: torch.tensor([len(t) / 50 for t in texts])  # noqa: E731 (free stand-in)
    epochs = {} if args.ppo_epochs is None else {"ppo_epochs": args.ppo_epochs}
    config = PPOConfig(batch_size=batch, mini_batch_size=args.mini_batch or batch, forward_batch_size=min(batch, 64),
                       steps=args.steps, min_review_chars=150, **epochs)
    queries = make_queries(review_texts(config, Profile("laptop")), tokenizer, config)
    if args.model == "smollm2-lora":  # LoRA actor; the reference is the same weights, adapter off
        from rlhf_course.rl.lora_policy import AdapterDisabledReference

        policy, reference = PolicyWithValueHead(lm), AdapterDisabledReference(lm)
    else:
        policy, reference = PolicyWithValueHead(lm), frozen_reference(lm)
    n_parameters = sum(p.numel() for name, p in lm.named_parameters() if "lora_" not in name)
    sgemm_samples = [_sgemm_rates()]
    clock = _PhaseClock()
    clock.watch(policy, "policy forward", grad_phase="update")
    clock.watch(reference, "reference forward")
    snapshots = []

    def between_steps(step, metrics, history):
        snapshots.append(clock.end_step())
        sgemm_samples.append(clock.pause(_sgemm_rates))

    history = train_ppo(config, policy, reference, tokenizer, clock.reward(reward_fn), queries, progress=False,
                        device=device, callback=between_steps)
    walls, cpus = [rate[0] for rate in sgemm_samples], [rate[1] for rate in sgemm_samples]
    sgemm = {"wall": sum(walls) / len(walls), "cpu": sum(cpus) / len(cpus)}
    warm = len(history) > 1
    first = snapshots[0] if warm else {"seconds": {c: dict.fromkeys(clock.PHASES, 0.0) for c in ("wall", "cpu")},
                                       "tokens": dict.fromkeys(clock.PHASES, 0), "episodes": 0}
    last, n = snapshots[-1], len(snapshots) - 1 if warm else len(snapshots)
    seconds = {c: {k: (last["seconds"][c][k] - first["seconds"][c][k]) / n for k in clock.PHASES} for c in sgemm}
    tokens = {k: (last["tokens"][k] - first["tokens"][k]) / n for k in clock.PHASES}
    episodes = (last["episodes"] - first["episodes"]) / n
    flops = {"generate": 2 * n_parameters * (tokens["policy forward"] - episodes), "score": 0.0,
             "policy forward": 2 * n_parameters * tokens["policy forward"],
             "reference forward": 2 * n_parameters * tokens["reference forward"],
             "update": 6 * n_parameters * tokens["update"]}
    step = {c: sum(seconds[c].values()) for c in sgemm}

    def mfu(phase_flops: float, secs: float, clock_name: str) -> float:
        return phase_flops / max(secs, 1e-9) / (sgemm[clock_name] * 1e9)

    print(f"model: {described}; N = {n_parameters / 1e6:.1f}M parameters; device {device}; torch threads "
          f"{torch.get_num_threads()}; {_machine_load()}")
    print(f"batch {batch} episodes, mini-batch {config.mini_batch_size}, {config.ppo_epochs} PPO epochs, "
          f"reward '{args.reward}', responses {config.response_min_tokens}-{config.response_max_tokens - 1} tokens")
    print(f"sgemm (2048^3 float32, {torch.get_num_threads()} threads): {sgemm['wall']:.1f} GFLOP/s by wall time "
          f"(mean of {len(walls)} samples before, between and after the steps, range {min(walls):.1f}-{max(walls):.1f}), "
          f"{sgemm['cpu']:.1f} GFLOP/s per CPU second")
    print(f"{'phase':18s} {'wall s':>7s} {'share':>6s} {'CPU s':>7s} {'GFLOP':>8s} {'MFU':>6s} {'MFU(CPU)':>9s}")
    for name in clock.PHASES:
        wall, cpu = seconds["wall"][name], seconds["cpu"][name]
        shown = (f"{mfu(flops[name], wall, 'wall'):6.1%} {mfu(flops[name], cpu, 'cpu'):9.1%}" if flops[name]
                 else f"{'-':>6s} {'-':>9s}")
        print(f"{name:18s} {wall:7.2f} {wall / step['wall']:6.1%} {cpu:7.2f} {flops[name] / 1e9:8.1f} {shown}")
    total = sum(flops.values())
    print(f"one PPO step: {step['wall']:.2f} s wall, {step['cpu']:.2f} CPU s; MFU {mfu(total, step['wall'], 'wall'):.1%} "
          f"(by CPU time {mfu(total, step['cpu'], 'cpu'):.1%}); mean of {n} timed step(s)"
          + (" after 1 warm-up" if warm else ""))
    if batch != 128 and not args.json:
        print(f"(the seed's 10.9 s/it is for batch 128 on a GPU; this run used batch {batch}: scale before comparing)")
    if args.json:
        print(json.dumps({
            "generate_mfu": round(mfu(flops["generate"], seconds["wall"]["generate"], "wall"), 4),
            "step_mfu": round(mfu(total, step["wall"], "wall"), 4), "sgemm_gflops": round(sgemm["wall"], 2),
            "sgemm_gflops_range": [round(min(walls), 2), round(max(walls), 2)],
            "seconds_per_step": round(step["wall"], 3), "cpu_seconds_per_step": round(step["cpu"], 3),
            "generate_mfu_cpu": round(mfu(flops["generate"], seconds["cpu"]["generate"], "cpu"), 4),
            "step_mfu_cpu": round(mfu(total, step["cpu"], "cpu"), 4), "sgemm_gflops_cpu": round(sgemm["cpu"], 2),
            "model": args.model, "parameters": n_parameters, "batch": batch, "mini_batch": config.mini_batch_size,
            "ppo_epochs": config.ppo_epochs, "threads": torch.get_num_threads(), "timed_steps": n,
            "phases": {name: {"seconds": round(seconds["wall"][name], 3), "cpu_seconds": round(seconds["cpu"][name], 3),
                              "share": round(seconds["wall"][name] / step["wall"], 4),
                              "mfu": round(mfu(flops[name], seconds["wall"][name], "wall"), 4) if flops[name] else None,
                              "mfu_cpu": round(mfu(flops[name], seconds["cpu"][name], "cpu"), 4) if flops[name] else None}
                       for name in clock.PHASES}}))


# ============================================================================ token-level loss


class TorchCallCounter(TorchFunctionMode):
    """Counts the calls into torch (functions, tensor methods and attributes) made inside a ``with`` block.

    Eager PyTorch pays a fixed dispatch cost per call, whatever the tensor's size: a per-pair loop makes
    many cheap calls, a vectorised version few expensive ones.  Only forward calls are seen (autograd's
    backward runs in C++)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def forward_torch_calls(loss_fn, inputs) -> int:
    """Number of torch calls one forward of ``loss_fn`` makes on ``inputs``."""
    with TorchCallCounter() as counter:
        loss_fn(**inputs)
    return counter.calls


def _forward_backward_seconds(loss_fn, inputs) -> float:
    """Seconds of one forward + backward of ``loss_fn`` on ``inputs``."""
    for key in ("chosen_values", "rejected_values"):
        inputs[key].grad = None
    start = time.perf_counter()
    loss_fn(**inputs).loss.backward()
    return time.perf_counter() - start


def _median_interleaved(functions: dict, inputs, repeats: int) -> dict:
    """Median seconds of each function, timed in alternation (a load spike on a shared machine hits both)."""
    for fn in functions.values():  # warm-up
        _forward_backward_seconds(fn, inputs)
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            times[name].append(_forward_backward_seconds(fn, inputs))
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def _machine_load() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return f"{os.cpu_count()} cores"
    busy = " (busy: other jobs compete for the cores, figures vary)" if load > 1.0 else ""
    return f"load average {load:.1f} on {os.cpu_count()} cores{busy}"


def benchmark_token_loss(argv: list[str]) -> None:
    """Forward + backward time of the reference loop vs the vectorised loss, on CPU.

    Runs once per thread count in ``--threads`` (default: 1 and torch's default); the two losses are timed
    in alternation and the machine's load average is printed with the figures.  On a shared machine the
    multi-threaded figures are inflated by waiting for busy cores; 1 thread is steadier.
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
    values = (inputs["chosen_values"], inputs["rejected_values"])
    gradients = zip(torch.autograd.grad(reference.loss, values), torch.autograd.grad(vectorised.loss, values))
    gradient_difference = max((a - b).abs().max().item() for a, b in gradients)
    print(
        f"token-level pairwise loss, forward+backward on CPU, batch {args.batch}, length {args.length}, "
        f"median of {args.repeats}; |loss difference| = {difference:.2e}, max |gradient difference| = "
        f"{gradient_difference:.2e}; {_machine_load()}"
    )
    functions = {"reference": tl.token_level_pairwise_loss_reference, "vectorised": tl.token_level_pairwise_loss}
    calls = {name: forward_torch_calls(fn, inputs) for name, fn in functions.items()}
    print(
        f"  torch calls per forward: reference {calls['reference']}, vectorised {calls['vectorised']} "
        f"({calls['reference'] / calls['vectorised']:.1f}x fewer)"
    )
    default_threads = torch.get_num_threads()
    for threads in sorted({int(t) for t in str(args.threads).split(",") if t.strip()}):
        torch.set_num_threads(threads)
        seconds = _median_interleaved(functions, inputs, args.repeats)
        reference_s, vectorised_s = seconds["reference"], seconds["vectorised"]
        per_call = {name: seconds[name] / calls[name] * 1e6 for name in functions}
        print(
            f"  threads={threads}: reference (per-pair loop) {reference_s * 1e3:8.2f} ms | "
            f"vectorised {vectorised_s * 1e3:7.2f} ms | speed-up {reference_s / vectorised_s:6.1f}x"
        )
        print(
            f"    forward+backward time per forward call: reference {per_call['reference']:.1f} us, vectorised "
            f"{per_call['vectorised']:.1f} us ({per_call['vectorised'] / per_call['reference']:.1f}x): the speed-up is "
            "the call ratio divided by this cost ratio, which depends on the CPU"
        )
    torch.set_num_threads(default_threads)
