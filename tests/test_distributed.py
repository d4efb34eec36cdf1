"""Scale-out: the reward-model and PPO entry points under ``accelerate launch`` with two CPU processes.

What must hold, and why (see ``rlhf_course.core.distributed``):

* Two processes with the global batch kept equal give the single-process result: DDP averages
  the per-process mean losses, which equals the mean over the whole batch when each process's
  share carries as many loss terms and nothing random differs between the layouts.  So the runs
  compared here switch dropout off (reward model: LoRA dropout 0; PPO: dropout is always off),
  decode greedily with fixed-length responses (PPO: otherwise the random draws fall on different
  episodes) and use one mini-batch per PPO epoch (mini-batches are drawn per process).
* A run resumed from a mid-run checkpoint ends bit-for-bit where the uninterrupted run ends,
  sampling and dropout included (every RNG, the optimizer and the counters are restored).

``accelerate launch --cpu --num_processes 2`` starts ONE process in accelerate 1.15 (multi-CPU
needs MPI there), so two CPU processes are launched with ``--multi_gpu`` on a machine whose CUDA
is hidden (torchrun + gloo, Accelerate's MULTI_CPU).  Tiny models from configs, a few steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf_course.core import assets
from rlhf_course.core import distributed
from rlhf_course.rl import ppo
from rlhf_course import train_ppo
from rlhf_course import train_reward
from rlhf_course.rl import sampling
from rlhf_course.core import stats
from rlhf_course.course import memory

TIMINGS = {}  # printed at the end of the module (pytest -s) for the report


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine, spinning OpenMP threads slow tiny models 10x+."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if TIMINGS:
        print("\nscale-out test timings (s):", json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(module: str, args: list[str], label: str) -> str:
    """``accelerate launch`` two CPU processes (torchrun + gloo over loopback), offline."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RLHF_PROFILE": "laptop", "RLHF_COURSE_NETWORK_GUARD": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", module, *args]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    TIMINGS[label] = time.perf_counter() - started
    assert done.returncode == 0, f"{module} failed under accelerate launch:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[name].float() - second[name].float()).abs().max().item() for name in first)


def assert_histories_match(first: list[dict], second: list[dict], tolerance: float) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for key in a:
            if key.endswith("_seconds"):
                continue
            assert a[key] == pytest.approx(b[key], abs=tolerance, rel=tolerance), (a["step"], key, a[key], b[key])


def assert_both_ranks_took_part(ranks: list[dict], **expected_counts) -> None:
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["distributed_type"] == "MULTI_CPU" for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]
    for key, value in expected_counts.items():
        assert [r[key] for r in ranks] == [value, value], key


# ============================================================================ helpers on one process


class FakeAccelerator:
    """Just enough of an Accelerator for the pure helpers (rank and world size)."""

    def __init__(self, process_index, num_processes):
        self.process_index, self.num_processes = process_index, num_processes


def test_shard_gives_each_process_its_contiguous_slice_and_refuses_uneven_batches():
    batch = list(range(8))
    assert distributed.shard(batch) == batch
    assert distributed.shard(batch, FakeAccelerator(0, 2)) + distributed.shard(batch, FakeAccelerator(1, 2)) == batch
    assert distributed.shard(batch, FakeAccelerator(1, 4)) == [2, 3]
    with pytest.raises(ValueError, match="batch_size=8 does not split evenly over 3 processes"):
        distributed.shard(batch, FakeAccelerator(0, 3))


def test_helpers_without_an_accelerator_are_the_single_process_code():
    torch.manual_seed(0)
    values, mask = torch.randn(3, 5), (torch.rand(3, 5) > 0.3).float()
    assert torch.equal(stats.masked_whiten(values, mask, accelerator=FakeAccelerator(0, 1)), stats.masked_whiten(values, mask))
    logged = {"loss": 0.5}
    assert distributed.mean_across(logged) is logged
    assert distributed.gather(values) is values
    assert distributed.per_process(128) == 128
    assert distributed.trainer_checkpoint_args(None) == {}
    assert distributed.trainer_checkpoint_args(5)["save_steps"] == 5
    with pytest.raises(ValueError, match="positive number of steps"):
        distributed.trainer_checkpoint_args(-1)


def test_load_checkpoint_refuses_an_incomplete_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        distributed.load_checkpoint(tmp_path, None, None)


def test_memory_table_counts_the_full_profile_models_and_applies_the_formulas():
    rows = {(row["run"].split(",")[0], row["layout"]): row for row in memory.memory_table(world=4)}
    reward, ppo_ddp, ppo_zero2 = rows[("reward model", "ddp")], rows[("PPO", "ddp")], rows[("PPO", "zero2")]
    assert reward["parameters_m"] == pytest.approx(494.03, abs=0.01)  # Qwen2-0.5B + a 1-output score head
    assert 0.36 < reward["trained_m"] < 0.38  # LoRA r=4 on q/k/v of 24 layers + the score head
    assert ppo_ddp["parameters_m"] == pytest.approx(124.44, abs=0.01)  # GPT-2 small + value head
    assert ppo_zero2["train_state_gib"] == pytest.approx(ppo_ddp["train_state_gib"] * (2 + 14 / 4) / 16)
    assert rows[("PPO", "single")]["activations_gib"] == pytest.approx(4 * ppo_ddp["activations_gib"])


# ============================================================================ PPO


@pytest.fixture(scope="module")
def tiny_policy_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64)).save_pretrained(folder)
    assets.gpt2_tokenizer().save_pretrained(folder)
    return folder


def ppo_args(policy_folder, output_dir, *extra) -> list[str]:
    """Global batch 8, one mini-batch of 8, 2 PPO epochs; greedy (top_k=1), every response 4 tokens."""
    return ["--profile", "laptop", "--policy", str(policy_folder), "--reward", "length", "--output-dir", str(output_dir),
            "--steps", "3", "--batch-size", "8", "--mini-batch-size", "8", "--ppo-epochs", "2", "--top-k", "1",
            "--force-max-length", "--response-min-tokens", "4", "--response-max-tokens", "5", "--n-eval", "8",
            "--scale-rewards", "--cpu", *extra]


def final_policy(folder) -> dict:
    weights = load_file(Path(folder) / "policy" / "model.safetensors")
    weights.update({f"v_head.{k}": v for k, v in torch.load(Path(folder) / "policy" / "value_head.pt").items()})
    return weights


@pytest.fixture(scope="module")
def ppo_runs(tiny_policy_folder, tmp_path_factory):
    """The same PPO run on one process (in this process) and on two (accelerate launch)."""
    root = tmp_path_factory.mktemp("ppo")
    started = time.perf_counter()
    train_ppo.main(ppo_args(tiny_policy_folder, root / "one"))
    TIMINGS["ppo, 1 process, in-process"] = time.perf_counter() - started
    launch_two_processes("rlhf_course.train_ppo", ppo_args(tiny_policy_folder, root / "two", "--checkpoint-every", "2"),
                         "ppo, 2 processes")
    return root


def test_ppo_two_processes_equal_one_process(ppo_runs):
    one, two = ppo_runs / "one", ppo_runs / "two"
    ranks = distributed.read_rank_report(two)
    assert_both_ranks_took_part(ranks, episodes=3 * 4, steps=3)  # 3 steps x half of the global batch of 8
    # Sharding: the two processes scored disjoint halves of the same first batch the single process scored.
    single = distributed.read_rank_report(one)[0]["first_texts"]
    assert ranks[0]["first_texts"] + ranks[1]["first_texts"] == single
    assert set(ranks[0]["first_texts"]).isdisjoint(ranks[1]["first_texts"])
    history_one = json.loads((one / train_ppo.HISTORY).read_text())
    history_two = json.loads((two / train_ppo.HISTORY).read_text())
    assert_histories_match(history_one, history_two, tolerance=1e-4)
    assert max_difference(final_policy(one), final_policy(two)) < 1e-5
    start = load_file(tiny_policy_folder_of(ppo_runs) / "model.safetensors")
    trained = final_policy(one)
    assert max((trained[name] - start[name]).abs().max().item() for name in start) > 1e-4  # it did train


def tiny_policy_folder_of(root: Path) -> Path:
    return next(root.parent.glob("tiny_gpt2*"))


def test_ppo_resumed_under_two_processes_ends_where_the_uninterrupted_run_ends(ppo_runs, tiny_policy_folder):
    two, resumed = ppo_runs / "two", ppo_runs / "two-resumed"
    checkpoint = two / "checkpoints" / "step-2"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    launch_two_processes("rlhf_course.train_ppo", ppo_args(tiny_policy_folder, resumed, "--resume-from", str(checkpoint)),
                         "ppo, 2 processes, resumed")
    assert distributed.read_rank_report(resumed)[1]["episodes"] == 4  # one step left after step 2 of 3
    history, history_resumed = (json.loads((f / train_ppo.HISTORY).read_text()) for f in (two, resumed))
    assert_histories_match(history, history_resumed, tolerance=0)
    assert max_difference(final_policy(two), final_policy(resumed)) == 0


def test_ppo_resume_on_one_process_restores_sampling_exactly(tiny_policy_folder, tmp_path):
    """The notebook path (no accelerator): real sampling, variable lengths, reward scaling, 2 mini-batches."""
    tokenizer = assets.gpt2_tokenizer()
    config = ppo.PPOConfig(steps=3, batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3,
                           scale_rewards=True, max_grad_norm=1.0, min_review_chars=150)
    queries = sampling.make_queries(sampling.review_texts(config)[:32], tokenizer, config)

    def run(**kwargs):
        torch.manual_seed(0)
        lm = GPT2LMHeadModel.from_pretrained(str(tiny_policy_folder))
        policy = ppo.PolicyWithValueHead(lm)
        history = ppo.train_ppo(config, policy, ppo.frozen_reference(lm), tokenizer, train_ppo.length_reward, queries,
                                progress=False, **kwargs)
        return history, {k: v.clone() for k, v in policy.state_dict().items()}

    started = time.perf_counter()
    history, weights = run(checkpoint_every=2, checkpoint_dir=tmp_path)
    torch.manual_seed(123)  # whatever the global RNG holds now, the checkpoint's state wins
    resumed_history, resumed_weights = run(resume_from=tmp_path / "step-2")
    TIMINGS["ppo resume, 1 process, notebook path"] = time.perf_counter() - started
    assert_histories_match(history, resumed_history, tolerance=0)
    assert max_difference(weights, resumed_weights) == 0
    assert distributed.latest_checkpoint(tmp_path) == tmp_path / "step-2"


# ============================================================================ reward model


@pytest.fixture(scope="module")
def tiny_base_model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = assets.gpt2_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 bos_token_id=tokenizer.bos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reward_args(base_folder, output_dir, batch_size: int, *extra) -> list[str]:
    """16 training pairs; ``batch_size`` pairs per process.  LoRA dropout off: its masks differ per process."""
    return ["--profile", "laptop", "--base-model", str(base_folder), "--output-dir", str(output_dir),
            "--train-size", "16", "--test-size", "8", "--max-length", "48", "--lora-last-layers", "1",
            "--lora-dropout", "0", "--learning-rate", "0.01", "--logging-steps", "1", "--batch-size", str(batch_size),
            *extra]


def test_reward_training_two_processes_equal_one_process(tiny_base_model_folder, tmp_path):
    """TRL's RewardTrainer (the default): 2 processes x 2 pairs = 1 process x 4 pairs per step."""
    started = time.perf_counter()
    train_reward.main(reward_args(tiny_base_model_folder, tmp_path / "one", 4))
    TIMINGS["reward, 1 process, in-process"] = time.perf_counter() - started
    launch_two_processes("rlhf_course.train_reward", reward_args(tiny_base_model_folder, tmp_path / "two", 2),
                         "reward, 2 processes")
    one, two = (train_reward.RewardRun.from_folder(tmp_path / name) for name in ("one", "two"))
    steps = len(one.log)
    assert steps >= 2
    assert_both_ranks_took_part(distributed.read_rank_report(tmp_path / "two"), steps=steps)
    for a, b in zip(one.log, two.log):  # the logged loss is already averaged over the processes
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
    adapter = "adapter_model.safetensors"
    assert max_difference(load_file(one.folder / adapter), load_file(two.folder / adapter)) < 1e-5
    assert one.metrics["accuracy"] == two.metrics["accuracy"]  # evaluated once, by the main process


def test_reward_training_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tiny_base_model_folder, tmp_path):
    """The seed's pairwise Trainer with LoRA dropout ON: the restored RNG must replay the same masks."""
    args = ["--trainer", "pairwise", "--lora-dropout", "0.1"]
    started = time.perf_counter()
    full = train_reward.main(reward_args(tiny_base_model_folder, tmp_path / "full", 4, *args, "--checkpoint-every", "2"))
    checkpoint = tmp_path / "full" / "trainer" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "rng_state.pth").exists()
    resumed = train_reward.main(reward_args(tiny_base_model_folder, tmp_path / "resumed", 4, *args,
                                            "--resume-from", str(checkpoint)))
    TIMINGS["reward resume, 1 process"] = time.perf_counter() - started
    adapter = "adapter_model.safetensors"
    assert max_difference(load_file(full.folder / adapter), load_file(resumed.folder / adapter)) == 0
    assert full.log[-1]["loss"] == resumed.log[-1]["loss"] and full.log[-1]["step"] == resumed.log[-1]["step"]
