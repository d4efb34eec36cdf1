"""Scale-out helpers: the course's training loops on several processes with Hugging Face Accelerate.

The reward-model and PPO entry points (``rlhf_course.train_reward``, ``rlhf_course.train_ppo``)
run unchanged under ``accelerate launch`` on one GPU, on several GPUs with DDP, or with DeepSpeed
ZeRO-2 (configs in ``configs/accelerate/``; ``docs/cluster.md`` has the commands).  Nothing here
is a distributed engine of its own: every function is a thin, named wrapper around Accelerate
(Gugger et al., ``huggingface/accelerate``) and ``torch.distributed`` (DDP: Li et al. 2020,
"PyTorch Distributed: Experiences on Accelerating Data Parallel Training"; ZeRO: Rajbhandari et
al. 2020), so the training code reads the same with one process or many.

Every helper takes ``accelerator=None`` to mean "one plain process": then it does exactly what the
single-process code did before (same calls, same numbers), so notebooks are unaffected.

What "distributed" means for each loop:

* Reward model: the Hugging Face ``Trainer`` (and TRL's ``RewardTrainer``) is already
  Accelerate-aware: it shards the batches, wraps the model in DDP / DeepSpeed, and averages the
  logged loss across processes.  The script adds main-process-only evaluation and saving,
  step checkpoints (``checkpoint_every``) and ``resume_from`` (``trainer_checkpoint_args``).
* PPO (``rlhf_course.rl.ppo.train_ppo``): ``config.batch_size`` and ``config.mini_batch_size`` are
  *global*; each process generates and trains on its contiguous slice (``shard``), DDP averages
  the gradients, and everything that must agree across processes is computed from gathered
  values: advantage whitening statistics (``core.stats.masked_whiten``), reward scaling, the rollout metrics
  and hence the adaptive KL coefficient (``gather_rollout``).  Checkpoints hold the model,
  optimizer, every RNG and the loop counters (``save_checkpoint`` / ``load_checkpoint``).

When is a run on N processes *equal* to one process?  With the global batch kept equal, DDP's
gradient all-reduce averages the per-process mean losses; that equals the mean loss of one process
on the whole batch when each process's mini-batch carries the same number of loss terms (tokens),
nothing random differs between the layouts (dropout off, greedy or identical samples) and the
optimizer is the same.  Sampled responses differ (the random draws fall on different episodes), and
with variable response lengths each process's token-mean gets equal weight, as in DeepSpeed-Chat
and TRL; ``tests/test_distributed.py`` checks the equality in the settings where it must hold.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from rlhf_course.core.profiles import get_device

LOOP_STATE = "loop_state.pt"  # PPO counters, controllers and RNGs (written by the main process)
PLAIN_STATE = "training_state.pt"  # model + optimizer + torch RNG when no accelerator is used
RANKS_FILE = "ranks.json"  # what each process did: written by the main process after a run


# ============================================================================ 1. the accelerator


def launched_distributed() -> bool:
    """True inside ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(cpu: bool | None = None, **kwargs):
    """An ``Accelerator`` for a script, on the device ``profiles.get_device()`` picks (cuda, then mps,
    then cpu, or ``RLHF_DEVICE``; an unknown or absent device raises ``ProfileError``); without a GPU
    it runs on the CPU (gloo).

    ``accelerate launch`` passes its settings (processes, DeepSpeed, mixed precision) through the
    environment, so a plain ``Accelerator()`` picks them up; ``cpu=True`` forces the CPU.  A GPU
    index (``RLHF_DEVICE=cuda:1``) applies to a single process; launched processes take one GPU each.
    """
    from accelerate import Accelerator

    if cpu is None:
        device = get_device()
        cpu = device.type == "cpu"
        if device.type == "cuda" and device.index is not None and not launched_distributed():
            torch.cuda.set_device(device.index)
    return Accelerator(cpu=cpu, **kwargs)


def rank(accelerator=None) -> int:
    return 0 if accelerator is None else accelerator.process_index


def world_size(accelerator=None) -> int:
    return 1 if accelerator is None else accelerator.num_processes


def is_main(accelerator=None) -> bool:
    return accelerator is None or accelerator.is_main_process


def wait_for_everyone(accelerator=None) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def is_deepspeed(accelerator=None) -> bool:
    return accelerator is not None and accelerator.distributed_type.value == "DEEPSPEED"


def prepare(accelerator, model, optimizer, micro_batch_size: int | None = None, max_grad_norm: float | None = None):
    """``accelerator.prepare(model, optimizer)``: DDP wrapping / DeepSpeed engine, device placement.

    DeepSpeed needs a micro-batch size and normally reads it from a prepared DataLoader; the PPO
    loop has none (its data is generated), so ``micro_batch_size`` (episodes per process per
    gradient step) is written into the DeepSpeed config here, and so is the clipping norm (the
    engine clips inside its step; 0 = off) unless the config file sets them.
    """
    if accelerator is None:
        return model, optimizer
    if is_deepspeed(accelerator):
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if micro_batch_size is not None and ds_config.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
        if ds_config.get("gradient_clipping") in (None, "auto"):
            ds_config["gradient_clipping"] = float(max_grad_norm or 0.0)
    return accelerator.prepare(model, optimizer)


def unwrap(model, accelerator=None):
    """The plain module inside a DDP wrapper or DeepSpeed engine (for ``generate`` and saving)."""
    return model if accelerator is None else accelerator.unwrap_model(model)


def backward(loss: torch.Tensor, accelerator=None) -> None:
    """``loss.backward()``; under Accelerate its ``backward`` (DeepSpeed must see the loss)."""
    if accelerator is None:
        loss.backward()
    else:
        accelerator.backward(loss)


def clip_grad_norm(model, max_norm: float | None, accelerator=None) -> torch.Tensor:
    """Global gradient clipping  [37 details].  After DDP's all-reduce the gradients, hence the
    norm, are the same on every process.  Under DeepSpeed the engine clips (``gradient_clipping``
    in the DeepSpeed config) and no norm is returned here: NaN is reported instead."""
    max_norm = max_norm or float("inf")
    if accelerator is None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    return torch.tensor(float("nan")) if norm is None else torch.as_tensor(norm)


# ============================================================================ 2. sharding and gathering


def per_process(count: int, accelerator=None, what: str = "batch_size") -> int:
    """``count // world_size``, refusing a global size that does not split evenly."""
    processes = world_size(accelerator)
    if count % processes:
        raise ValueError(f"{what}={count} does not split evenly over {processes} processes: choose a multiple "
                         f"of {processes} (each process takes {what} / {processes}).")
    return count // processes


def shard(items: list, accelerator=None, what: str = "batch_size") -> list:
    """This process's contiguous slice of a global batch (process 0 first, as ``gather`` returns it)."""
    size = per_process(len(items), accelerator, what)
    start = rank(accelerator) * size
    return items[start:start + size]


def _on_device(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    return tensor.to(accelerator.device)  # NCCL only moves GPU tensors; gloo is happy with either


def gather(tensor: torch.Tensor, accelerator=None, pad_dim: int | None = None, pad_value=0) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along dim 0 (process order), on the CPU.

    ``pad_dim``: pad that dimension to the widest process first (response widths differ).
    """
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    tensor = _on_device(tensor, accelerator)
    if pad_dim is not None:
        tensor = accelerator.pad_across_processes(tensor, dim=pad_dim, pad_index=pad_value)
    return accelerator.gather(tensor).cpu()


def sum_across(tensor: torch.Tensor, accelerator=None) -> torch.Tensor:
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(_on_device(tensor.clone(), accelerator), reduction="sum").cpu()


def mean_across(stats: dict, accelerator=None) -> dict:
    """Average a dict of floats over processes (each process's value weighted equally)."""
    if accelerator is None or accelerator.num_processes == 1 or not stats:
        return stats
    keys = sorted(stats)
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    values = sum_across(values, accelerator) / accelerator.num_processes
    return {**stats, **dict(zip(keys, values.tolist()))}


def gather_objects(item, accelerator=None) -> list:
    """A list with every process's ``item`` (any picklable object), in process order."""
    if accelerator is None or accelerator.num_processes == 1:
        return [item]
    from accelerate.utils import gather_object

    return gather_object([item])


# Per-episode fields of ppo.Rollout: (B,) score vectors and (B, R) token tensors, padded with 0.
_ROLLOUT_VECTORS = ("scores", "raw_scores")
_ROLLOUT_TOKENS = ("query_ids", "query_mask", "response_ids", "response_mask", "logprobs", "ref_logprobs",
                   "values", "rewards", "advantages", "returns")


def gather_rollout(rollout, accelerator=None):
    """The whole global batch of experience on every process (for metrics computed on all of it).

    Token tensors are right-padded with 0 to the widest process (masked positions are 0 already);
    left-padded queries are re-aligned by padding on the left.  Texts are gathered too.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return rollout
    changes = {name: gather(getattr(rollout, name), accelerator) for name in _ROLLOUT_VECTORS}
    for name in _ROLLOUT_TOKENS:
        tensor = getattr(rollout, name)
        if name.startswith("query"):  # left padded: pad on the left so the real tokens stay at the end
            tensor = _on_device(tensor, accelerator)
            tensor = accelerator.pad_across_processes(tensor, dim=1, pad_index=0, pad_first=True)
            changes[name] = accelerator.gather(tensor).cpu()
        else:
            changes[name] = gather(tensor, accelerator, pad_dim=1)
    for name in ("query_texts", "response_texts"):
        changes[name] = [text for texts in gather_objects(list(getattr(rollout, name)), accelerator) for text in texts]
    return dataclasses.replace(rollout, **changes)


# ============================================================================ 3. saving and checkpoints


def on_main(function, accelerator=None):
    """Run ``function()`` on the main process only, then let every process continue together."""
    result = function() if is_main(accelerator) else None
    wait_for_everyone(accelerator)
    return result


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_states() -> dict:
    """The global RNGs sampling draws from (torch CPU and CUDA)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder, model, optimizer, loop_state: dict, accelerator=None) -> Path:
    """Everything a run needs to continue exactly where it stopped.

    With an accelerator: ``accelerator.save_state`` (model, optimizer - sharded under DeepSpeed -
    and every process's RNGs, one file per process), plus ``loop_state`` (counters, controllers,
    the loop's own RNGs; the same on every process) from the main process.  Without one: the model,
    optimizer and torch RNG in one file.  ``loop_state.pt`` is written last, so a folder that has
    it is complete.
    """
    folder = Path(folder)
    if accelerator is None:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_states()},
                           folder / PLAIN_STATE)
    else:
        accelerator.save_state(str(folder), safe_serialization=False)  # tied GPT-2 weights: not safetensors
    if is_main(accelerator):
        _atomic_torch_save(loop_state, folder / LOOP_STATE)
    wait_for_everyone(accelerator)
    return folder


def load_checkpoint(folder, model, optimizer, accelerator=None) -> dict:
    """Restore model, optimizer and RNGs in place from ``save_checkpoint``; return the loop state."""
    folder = Path(folder)
    if not (folder / LOOP_STATE).exists():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint ({LOOP_STATE} is missing): "
                                "pass a folder written by save_checkpoint, e.g. <output-dir>/checkpoints/step-4")
    if accelerator is None:
        if not (folder / PLAIN_STATE).exists():
            raise FileNotFoundError(f"{folder} was written under `accelerate launch` ({PLAIN_STATE} is missing): "
                                    "resume it under accelerate with the same number of processes")
        state = torch.load(folder / PLAIN_STATE, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_states(state["rng"])
    else:
        saved_processes = len(list(folder.glob("random_states_*.pkl")))
        if saved_processes and saved_processes != accelerator.num_processes:
            raise ValueError(f"{folder} was written by {saved_processes} processes; resume it with "
                             f"--num_processes {saved_processes} (this run has {accelerator.num_processes})")
        accelerator.load_state(str(folder))
    return torch.load(folder / LOOP_STATE, weights_only=False)


def latest_checkpoint(folder) -> Path | None:
    """The newest complete ``step-N`` checkpoint under ``folder`` (None when there is none)."""
    steps = sorted((int(p.name.split("-")[1]), p) for p in Path(folder).glob("step-*") if (p / LOOP_STATE).exists())
    return steps[-1][1] if steps else None


# ============================================================================ 4. Trainer runs (reward model)


def trainer_checkpoint_args(checkpoint_every: int | None) -> dict:
    """``TrainingArguments`` overrides for a checkpoint every N optimizer steps (none when None).

    Each ``checkpoint-N`` folder holds model, optimizer, scheduler, trainer state and every
    process's RNG; ``trainer.train(resume_from_checkpoint=folder)`` continues from it and skips the
    batches already seen, so the resumed run ends where an uninterrupted one does.
    """
    if not checkpoint_every:
        return {}
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be a positive number of steps")
    return dict(save_strategy="steps", save_steps=checkpoint_every, save_only_model=False)


def describe_process(accelerator=None, **counts) -> dict:
    """Who this process is (rank, pid, device) and what it did (``counts``): for ``ranks.json``."""
    return {"rank": rank(accelerator), "world_size": world_size(accelerator), "pid": os.getpid(),
            "device": str(accelerator.device) if accelerator is not None else "cpu",
            "distributed_type": accelerator.distributed_type.value if accelerator is not None else "NO", **counts}


def write_rank_report(folder, accelerator=None, **counts) -> list[dict]:
    """Gather ``describe_process`` from every process; the main process writes ``ranks.json``.

    Collective: every process must call it.  Tests read the file to check all ranks took part.
    """
    reports = gather_objects(describe_process(accelerator, **counts), accelerator)
    if is_main(accelerator):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RANKS_FILE).write_text(json.dumps(reports, indent=1))
    wait_for_everyone(accelerator)
    return reports


def read_rank_report(folder) -> list[dict]:
    path = Path(folder) / RANKS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run did not finish (write_rank_report is its last step)")
    return json.loads(path.read_text())


def make_step_counter():
    """A ``TrainerCallback`` counting the optimizer steps this process took (``.steps``)."""
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        def __init__(self):
            self.steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    return StepCounter()
