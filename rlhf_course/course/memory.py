"""GPU memory per process for the full profile's runs, by layout (one GPU, DDP, DeepSpeed ZeRO-2).

The table of ``docs/cluster.md``: ``python -m rlhf_course.course.memory memory --gpus 4``.  Byte
counts per parameter follow Rajbhandari et al. 2020 (ZeRO), activations Korthikanti et al. 2022.
"""

from __future__ import annotations

import torch

# ============================================================================ 5. memory per GPU (docs/cluster.md)

# Bytes per parameter of model state (weights + gradients + Adam's two moments), per GPU:
#   * frozen, fp32 / bf16 / NF4 4-bit: 4 / 2 / 0.5625 (4 bits + one fp32 absmax per 64-weight block, QLoRA)
#   * trained, fp32 or bf16 mixed precision (accelerate/torch autocast keeps fp32 master weights):
#     4 weight + 4 grad + 8 Adam (m, v) = 16, on every GPU under DDP
#   * trained, DeepSpeed ZeRO-2 bf16 (Rajbhandari et al. 2020): 2 (bf16 weight, replicated)
#     + (2 bf16 grad + 4 fp32 master + 8 Adam) / N (sharded over the N GPUs) = 2 + 14 / N
# Activations kept for the backward pass (Korthikanti et al. 2022, 16-bit, SDPA/flash attention so
# no s x s score matrices): about 34 * h bytes per token per layer; PPO adds its fp32 logits
# (tokens x vocab x 4 bytes, three live copies: logits, log-softmax, softmax for the entropy).
GIB = 1024**3
NF4_BYTES = 0.5 + 4 / 64


def state_bytes_per_parameter(layout: str, world: int = 1) -> float:
    """Weights + grads + Adam bytes per *trained* parameter on one GPU (see the table above)."""
    if layout in ("fp32", "ddp", "single"):
        return 16.0
    if layout == "zero2":
        return 2 + 14 / world
    raise ValueError(f"layout={layout!r}: use 'single', 'ddp' or 'zero2'")


def _count_on_meta(build) -> dict:
    """Parameter counts of a model built from its config on the meta device (no weights, no download)."""
    with torch.device("meta"):
        model = build()
    linear_in_layers = sum(m.weight.numel() for name, m in model.named_modules()
                           if isinstance(m, torch.nn.Linear) and (".layers." in name or ".h." in name))
    return {"model": model, "total": sum(p.numel() for p in model.parameters()), "layer_linear": linear_in_layers}


def full_profile_models() -> dict:
    """The full profile's models, counted from their published configurations."""
    from transformers import (DistilBertConfig, DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                              Qwen2Config, Qwen2ForSequenceClassification)

    qwen = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, num_labels=1)
    return {
        "qwen2-0.5b reward model": {**_count_on_meta(lambda: Qwen2ForSequenceClassification(qwen)),
                                    "hidden": 896, "layers": 24},
        "gpt2-imdb policy": {**_count_on_meta(lambda: GPT2LMHeadModel(GPT2Config())), "hidden": 768, "layers": 12,
                             "vocab": 50257},
        "distilbert-imdb reward": _count_on_meta(lambda: DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))),
    }


def lora_parameters(model, targets, r: int, extra_modules=("score",)) -> int:
    """LoRA adds r * (in + out) per targeted Linear (Hu et al. 2021); ``extra_modules`` train in full."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name.split(".")[-1] in targets:
                count += r * (module.in_features + module.out_features)
            if name.split(".")[-1] in extra_modules:
                count += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    return count


def memory_table(world: int = 4) -> list[dict]:
    """GiB per GPU for the full-profile runs, by layout; what ``docs/cluster.md`` prints."""
    from rlhf_course.rl.ppo import PPOConfig
    from rlhf_course.reward.training import LORA_TARGETS, RewardTrainingConfig

    models = full_profile_models()
    rows = []
    # Reward model: QLoRA (4-bit frozen layers, bf16 embeddings, fp32 LoRA + score head), per GPU batch of pairs.
    rm, rm_config = models["qwen2-0.5b reward model"], RewardTrainingConfig.for_profile("full")
    trained = lora_parameters(rm["model"], LORA_TARGETS["qwen2"], rm_config.lora_r)
    frozen = NF4_BYTES * rm["layer_linear"] + 2 * (rm["total"] - rm["layer_linear"])
    tokens = 2 * rm_config.batch_size * rm_config.max_length  # chosen + rejected, padded to max_length (worst case)
    activations = 34 * rm["hidden"] * rm["layers"] * tokens
    for layout in ("single", "ddp", "zero2"):
        state = trained * state_bytes_per_parameter(layout, world)
        rows.append({"run": "reward model, Qwen2-0.5B QLoRA r=4", "layout": layout, "gpus": 1 if layout == "single" else world,
                     "parameters_m": rm["total"] / 1e6, "trained_m": trained / 1e6, "weights_gib": frozen / GIB,
                     "train_state_gib": state / GIB, "activations_gib": activations / GIB,
                     "per_gpu_batch": f"{rm_config.batch_size} pairs x {rm_config.max_length} tokens"})
    # PPO: full fine-tuning of GPT-2 + value head (its weights are in the training state); frozen fp32
    # reference policy and distilbert classifier ("weights"); the seed's batch sizes (PPOConfig defaults).
    policy, classifier, ppo_config = models["gpt2-imdb policy"], models["distilbert-imdb reward"], PPOConfig()
    trained = policy["total"] + policy["hidden"] + 1  # + value head
    frozen = 4 * (policy["total"] + classifier["total"])  # reference policy and classifier, fp32
    sequence = ppo_config.query_max_tokens - 1 + ppo_config.response_max_tokens - 1
    for layout in ("single", "ddp", "zero2"):
        gpus = 1 if layout == "single" else world
        episodes = ppo_config.mini_batch_size // gpus  # global mini-batch split over the GPUs
        activations = (34 * policy["hidden"] * policy["layers"] * episodes * sequence
                       + 3 * 4 * episodes * (ppo_config.response_max_tokens - 1) * policy["vocab"])
        rows.append({"run": "PPO, gpt2-imdb full fine-tune", "layout": layout, "gpus": gpus,
                     "parameters_m": trained / 1e6, "trained_m": trained / 1e6, "weights_gib": frozen / GIB,
                     "train_state_gib": trained * state_bytes_per_parameter(layout, world) / GIB,
                     "activations_gib": activations / GIB, "per_gpu_batch": f"{episodes} episodes x {sequence} tokens"})
    for row in rows:
        row["total_gib"] = row["weights_gib"] + row["train_state_gib"] + row["activations_gib"]
    return rows


def main(argv: list[str] | None = None) -> None:
    """``python -m rlhf_course.course.memory memory [--gpus N]``: the memory table of docs/cluster.md."""
    import argparse

    import pandas as pd

    parser = argparse.ArgumentParser(prog="python -m rlhf_course.course.memory")
    parser.add_argument("what", choices=["memory"])
    parser.add_argument("--gpus", type=int, default=4)
    args = parser.parse_args(argv)
    table = pd.DataFrame(memory_table(args.gpus)).round(3)
    print(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))


def _has_tabulate() -> bool:
    import importlib.util

    return importlib.util.find_spec("tabulate") is not None


if __name__ == "__main__":
    main()
