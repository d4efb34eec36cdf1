"""The laptop SFT policy builder, on a tiny configuration."""

import json

import pytest
import torch

from rlhf_course.core import assets
from rlhf_course.policy import sft


def test_review_snippets_are_distinct_and_clean():
    texts = sft.review_snippets()
    assert len(texts) > 10_000
    assert len(set(texts)) == len(texts)
    assert all(len(t) >= 20 and "  " not in t for t in texts[:500])


def test_pack_blocks_ends_every_snippet_with_eos():
    tokenizer = assets.gpt2_tokenizer()
    blocks = sft.pack_blocks(["A fine film.", "Dull."] * 10, tokenizer, block_size=8)
    assert blocks.shape[1] == 8
    flat = blocks.flatten().tolist()
    assert flat.count(tokenizer.eos_token_id) >= 10
    with pytest.raises(ValueError, match="fewer than one block"):
        sft.pack_blocks(["Hi"], tokenizer, block_size=64)


def test_train_sft_policy_tiny_run_saves_a_loadable_gpt2(tmp_path):
    from transformers import AutoModelForCausalLM

    config = sft.SFTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=4, steps=3, warmup_steps=1,
                           held_out=50)
    metrics = sft.train_sft_policy(tmp_path, config, progress=False)
    assert len(metrics["losses"]) == 3 and all(l == l for l in metrics["losses"])  # finite, not NaN
    assert metrics["held_out_loss"] < 11.5  # random 50k-way guess is ~10.8
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert model.config.model_type == "gpt2" and model.config.vocab_size == 50257
    assert json.loads((tmp_path / "sft_metrics.json").read_text())["config"]["n_embd"] == 32
    out = model.generate(torch.tensor([[464, 3807]]), max_new_tokens=3, do_sample=False, pad_token_id=50256)
    assert out.shape == (1, 5)
