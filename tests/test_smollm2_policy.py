"""The pretrained (SmolLM2 + LoRA) policy path: SFT builder, LoRA actor / adapter-off reference, sampling
with SmolLM2's tokenizer, the gold judge.  Tiny random Llama models with SmolLM2's vocabulary stand in
for the 135M model, so the file runs in seconds."""

import dataclasses
import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_course.core import assets
from rlhf_course.policy import judge
from rlhf_course.policy import smollm2_sft
from rlhf_course.rl import lora_policy
from rlhf_course.rl import ppo
from rlhf_course.rl import sampling

VOCAB = 49152  # SmolLM2's


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return assets.smollm2_tokenizer()


def length_reward(texts):
    return torch.tensor([len(t) / 50 for t in texts])


def config_for_tests(**overrides):
    return lora_policy.smollm2_ppo_config("laptop", **{**dict(steps=1, batch_size=8, mini_batch_size=4,
                                                                forward_batch_size=8, ppo_epochs=1), **overrides})


# ----------------------------------------------------------------------------- the tokenizer


def test_smollm2_tokenizer_pads_with_eos_and_adds_no_bos(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert tokenizer("A fine film.", add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id
    assert sampling.MAX_TOP_K >= len(tokenizer)


# ----------------------------------------------------------------------------- LoRA actor, reference view


def test_reference_with_the_adapter_disabled_gives_the_base_models_logits():
    lm = tiny_llama()
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        base_logits = lm(input_ids=ids).logits.clone()
    policy, reference = lora_policy.lora_policy_and_reference(lm)
    with torch.no_grad():
        assert torch.allclose(policy.lm(input_ids=ids).logits, base_logits, atol=1e-6)  # LoRA's B starts at 0
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # as if PPO had moved the adapter
        moved = policy.lm(input_ids=ids).logits
        referenced = reference(input_ids=ids).logits
    assert not torch.allclose(moved, base_logits, atol=1e-3)
    assert torch.allclose(referenced, base_logits, atol=1e-6)
    assert torch.allclose(policy.lm(input_ids=ids).logits, moved)  # the adapter is back on after the view


def test_reference_view_holds_no_parameters_and_never_switches_the_actors_mode():
    policy, reference = lora_policy.lora_policy_and_reference(tiny_llama())
    assert list(reference.parameters()) == [] and reference.state_dict() == {}
    policy.train()
    reference.eval()
    assert policy.lm.training


def test_only_lora_and_value_head_parameters_change_after_a_ppo_step(tokenizer):
    policy, reference = lora_policy.lora_policy_and_reference(tiny_llama())
    trained = set(lora_policy.trained_parameter_names(policy))
    assert trained and all("lora_" in name or name.startswith("v_head.") for name in trained)
    assert {"v_head.weight", "v_head.bias"} <= trained
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    config = config_for_tests()
    queries, _ = sampling.train_and_eval_queries(tokenizer, config, n_eval=8)
    history = ppo.train_ppo(config, policy, reference, tokenizer, length_reward, queries, progress=False)
    assert len(history) == 1 and history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # B = 0: actor == reference
    changed = {name for name, p in policy.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and changed <= trained
    assert any("lora_B" in name for name in changed) and "v_head.weight" in changed


# ----------------------------------------------------------------------------- sampling with SmolLM2's tokenizer


def test_left_padded_batch_generation_matches_one_query_at_a_time(tokenizer):
    lm = tiny_llama(layers=1)
    config = config_for_tests(temperature=0.0, force_max_length=True, response_min_tokens=5, response_max_tokens=6)
    queries = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in
               ("A", "The film is a quiet", "An utterly charming and")]
    _, query_mask, batched, _ = sampling.generate_batch(lm, queries, tokenizer, config, random.Random(0))
    assert query_mask[0].tolist()[:-1] == [0] * (query_mask.shape[1] - 1)  # left padding
    for row, query in enumerate(queries):
        _, _, alone, _ = sampling.generate_batch(lm, [query], tokenizer, config, random.Random(0))
        assert batched[row].tolist() == alone[0].tolist()  # position ids count real tokens only
        ids = torch.tensor([query])
        hf = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                         min_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
        assert hf[0, len(query):].tolist() == alone[0].tolist()


class EndsAfter(torch.nn.Module):
    """A causal LM that emits EOS as its ``n``-th token in ``rows`` (default all; its logits forced), for
    the stop tests; it records the batch size of every call."""

    def __init__(self, lm, eos_id, n, rows=None):
        super().__init__()
        self.lm, self.eos_id, self.n, self.rows, self.calls, self.batch_sizes = lm, eos_id, n, rows, 0, []

    def forward(self, **kwargs):
        out = self.lm(**kwargs)
        self.calls += 1
        self.batch_sizes.append(len(kwargs["input_ids"]))
        if self.calls == self.n:
            out.logits[self.rows if self.rows is not None else slice(None), -1, self.eos_id] = 1e4
        return out


def test_generation_with_the_smollm2_tokenizer_stops_at_eos(tokenizer):
    config = config_for_tests(response_min_tokens=10, response_max_tokens=11)
    queries = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("A fine", "The acting is")]
    lm = EndsAfter(tiny_llama(layers=1), tokenizer.eos_token_id, n=3)
    _, _, response_ids, response_mask = sampling.generate_batch(lm, queries, tokenizer, config, random.Random(0))
    assert lm.calls == 3  # every row finished: the loop stopped, not at the 10-token budget
    assert response_mask.sum(1).tolist() == [3, 3]
    assert response_ids[:, 2].tolist() == [tokenizer.eos_token_id] * 2


# ----------------------------------------------------------------------------- the SFT asset builder


def test_sampling_with_the_adapter_merged_matches_the_unmerged_actor_and_restores_its_weights(tokenizer):
    policy, reference = lora_policy.lora_policy_and_reference(tiny_llama(), r=4, alpha=8.0)
    with torch.no_grad():
        for name, parameter in policy.lm.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)  # a trained-looking adapter, not LoRA's zero start
    before = {name: p.detach().clone() for name, p in policy.lm.named_parameters()}
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        unmerged = policy.lm(input_ids=ids).logits
        with sampling.merged_lora(policy.lm):
            merged = policy.lm(input_ids=ids).logits
        assert torch.allclose(merged, unmerged, atol=1e-5)
    assert all(torch.equal(before[name], p) for name, p in policy.lm.named_parameters())  # bit for bit
    assert all(not m.merged and not m.disable_adapters for m in policy.lm.modules() if hasattr(m, "lora_A"))
    assert [n for n, p in policy.lm.named_parameters() if p.requires_grad] == [n for n in before if "lora_" in n]
    config = config_for_tests(temperature=0.0, force_max_length=True, response_min_tokens=5, response_max_tokens=6)
    queries = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("A fine", "The acting is")]
    _, _, sampled, _ = sampling.generate_batch(policy.lm, queries, tokenizer, config, random.Random(0))
    with torch.no_grad():  # greedy continuation computed with the adapter unmerged, token by token
        for row, query in enumerate(queries):
            ids = torch.tensor([query])
            for _ in range(5):
                ids = torch.cat([ids, policy.lm(input_ids=ids).logits[:, -1:].masked_fill(
                    torch.arange(VOCAB) == tokenizer.eos_token_id, float("-inf")).argmax(-1)], 1)
            assert sampled[row].tolist() == ids[0, len(query):].tolist()


def test_finished_rows_leave_the_batch_and_the_others_continue_unchanged(tokenizer):
    lm = tiny_llama(layers=1)
    config = config_for_tests(temperature=0.0, response_min_tokens=8, response_max_tokens=9)
    queries = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("A", "The film is a quiet", "An utterly")]
    lm_ends_first_row = EndsAfter(lm, tokenizer.eos_token_id, n=2, rows=[0])
    _, _, batched, mask = sampling.generate_batch(lm_ends_first_row, queries, tokenizer, config, random.Random(0))
    assert mask.sum(1).tolist() == [2, 8, 8] and batched[0, 2:].eq(tokenizer.pad_token_id).all()
    assert lm_ends_first_row.batch_sizes == [3, 3] + [2] * 6  # row 0 dropped after its EOS
    for row in (1, 2):  # the rows left in the batch sample what they would have sampled alone
        _, _, alone, _ = sampling.generate_batch(lm, [queries[row]], tokenizer, config, random.Random(0))
        assert batched[row].tolist() == alone[0].tolist()


def test_inverse_cdf_sampling_across_blocks_never_draws_a_zero_probability_token():
    vocab = 3 * sampling.CDF_BLOCK + 17  # blocks plus a ragged end
    probs = torch.zeros(vocab)
    chosen = torch.tensor([0, sampling.CDF_BLOCK - 1, sampling.CDF_BLOCK, 2 * sampling.CDF_BLOCK + 5, vocab - 1])
    probs[chosen] = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    draws = sampling.inverse_cdf_sample(probs.expand(40000, vocab), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) <= set(chosen.tolist())
    frequencies = torch.bincount(draws, minlength=vocab)[chosen].float() / len(draws)
    assert torch.allclose(frequencies, probs[chosen], atol=0.01)


def test_encode_snippets_ends_each_snippet_with_eos_and_pad_batch_masks_padding(tokenizer):
    sequences = smollm2_sft.encode_snippets(["A fine film.", "Dull."], tokenizer, max_tokens=80)
    assert all(s[-1] == tokenizer.eos_token_id for s in sequences)
    cut = smollm2_sft.encode_snippets(["word " * 50], tokenizer, max_tokens=10)[0]
    assert len(cut) == 10 and cut[-1] != tokenizer.eos_token_id  # a cut snippet does not teach stopping
    ids, mask, labels = smollm2_sft.pad_batch(sequences, tokenizer.pad_token_id)
    assert mask.sum().item() == sum(len(s) for s in sequences)
    assert (labels[mask == 0] == -100).all() and (labels[mask == 1] == ids[mask == 1]).all()


def test_length_grouped_batches_cover_every_snippet_once():
    sequences = [[0] * n for n in torch.randint(1, 50, (100,)).tolist()]
    batches = smollm2_sft.length_grouped_batches(sequences, 8, torch.Generator().manual_seed(0), group=4)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(100))


def test_sft_builder_runs_on_a_tiny_slice_and_its_adapter_merges(tmp_path, tokenizer):
    config = smollm2_sft.SmolLM2SFTConfig(steps=2, warmup_steps=1, batch_size=4, held_out=8, train_snippets=24,
                                          n_samples=2, sample_tokens=4)
    metrics = smollm2_sft.train_smollm2_sft(tmp_path, config, progress=False, base=tiny_llama(), tokenizer=tokenizer)
    assert len(metrics["losses"]) == 2 and all(loss == loss for loss in metrics["losses"])
    assert metrics["train_snippets"] == 24 and metrics["held_out_snippets"] == 8
    for key in ("perplexity", "text_perplexity", "eos_nll", "samples"):
        assert key in metrics["base"] and key in metrics["sft"]
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    assert json.loads((tmp_path / "sft_metrics.json").read_text())["config"]["steps"] == 2
    merged = smollm2_sft.merge_sft_adapter(tiny_llama(), tmp_path)
    assert type(merged).__name__ == "LlamaForCausalLM"
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)


def test_sft_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="warmup_steps"):
        smollm2_sft.SmolLM2SFTConfig(steps=5, warmup_steps=6).validate()
    with pytest.raises(ValueError, match="lora_r"):
        smollm2_sft.SmolLM2SFTConfig(lora_r=0).validate()


# ----------------------------------------------------------------------------- the gold judge


def test_gold_judge_scores_sentiment_and_paired_gain_uses_differences():
    scores = judge.GoldJudge()(["A wonderful, moving film.", "A dull, awful mess.", "The film is ninety minutes."])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0
    gain = judge.paired_gain([0.0, 0.1, 0.2, 0.3], [0.1, 0.3, 0.3, 0.5])
    assert gain["gain"] == pytest.approx(0.15)
    assert gain["gain_se"] == pytest.approx(torch.tensor([0.1, 0.2, 0.1, 0.2]).std().item() / 2)
    with pytest.raises(ValueError, match="one before and one after"):
        judge.paired_gain([0.0], [0.0, 1.0])


def test_heldout_evaluation_reports_proxy_gold_kl_and_diversity(tokenizer):
    policy, reference = lora_policy.lora_policy_and_reference(tiny_llama(layers=1))
    config = config_for_tests()
    _, eval_queries = sampling.train_and_eval_queries(tokenizer, config, n_eval=6)
    result = lora_policy.heldout_evaluation(policy.lm, tokenizer, length_reward, judge.GoldJudge(), eval_queries,
                                            config, reference=reference, batch_size=4)
    assert len(result["frame"]) == 6 and result["kl"] == pytest.approx(0.0, abs=1e-4)
    assert 0 <= result["distinct_2"] <= 1 and result["proxy"] > 0


def test_evaluations_measure_the_policys_own_text_whatever_the_rollout_setting(tokenizer):
    # Notebook 07 trains with fake_eos (a rollout setting) and evaluates with its config: a response cut at its budget
    # must stay as the policy wrote it there (with fake EOS its last token would be EOS, scored and counted in KL).
    policy, reference = lora_policy.lora_policy_and_reference(tiny_llama(layers=1))
    config = config_for_tests()
    _, eval_queries = sampling.train_and_eval_queries(tokenizer, config, n_eval=6)
    results = [lora_policy.heldout_evaluation(policy.lm, tokenizer, length_reward, judge.GoldJudge(), eval_queries,
                                              dataclasses.replace(config, fake_eos=fake), reference=reference,
                                              batch_size=4, seed=3)["frame"] for fake in (False, True)]
    assert results[0].response.tolist() == results[1].response.tolist()
    assert results[0].ended.tolist() == results[1].ended.tolist() and not results[0].ended.all()  # some were cut
    assert results[0].kl.tolist() == results[1].kl.tolist()
    tables = [sampling.sample_and_score(policy.lm, tokenizer, length_reward, eval_queries, dataclasses.replace(
        config, fake_eos=fake), seed=3) for fake in (False, True)]
    assert tables[0].response.tolist() == tables[1].response.tolist()


# ----------------------------------------------------------------------------- the profile's starting point, save / reload


def test_ppo_start_config_is_the_lora_recipe_on_the_laptop_and_the_seeds_values_in_full():
    laptop, full = lora_policy.ppo_start_config("laptop"), lora_policy.ppo_start_config("full")
    for name, value in lora_policy.SMOLLM2_PPO_OVERRIDES.items():
        assert getattr(laptop, name) == value
    assert full.learning_rate == ppo.PPOConfig().learning_rate and full.batch_size == ppo.PPOConfig().batch_size


def test_notebook_07_recipe_is_the_base_recipe_with_its_changes_and_the_logged_recipe_arm():
    # Notebook 07 checks its run against the logged run of sweep `recipe`: that arm must be 07's recipe exactly.
    from rlhf_course import experiments

    base, recipe = lora_policy.ppo_start_config("laptop"), lora_policy.notebook_07_config("laptop")
    changed = {name for name in ppo.PPOConfig.__dataclass_fields__ if getattr(base, name) != getattr(recipe, name)}
    assert changed == set(lora_policy.NOTEBOOK_07_CHANGES)
    sweep = experiments.SWEEPS["recipe"]
    arm = {**experiments.ppo_changes(sweep.arms[lora_policy.NOTEBOOK_07_ARM]), "steps": sweep.steps}
    assert arm == lora_policy.NOTEBOOK_07_CHANGES
    assert lora_policy.notebook_07_config("full") == lora_policy.ppo_start_config("full")  # the seed's recipe in full


def test_a_saved_lora_ppo_policy_reloads_onto_the_sft_policy(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(smollm2_sft, "load_smollm2_sft_policy", lambda device="cpu": (tiny_llama(), tokenizer))
    policy, _ = lora_policy.lora_policy_and_reference(tiny_llama())
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name or name.startswith("v_head."):
                parameter.normal_(0, 0.5)  # as if PPO had trained them
    policy.save(tmp_path / "policy", tokenizer)
    assert (tmp_path / "policy" / "adapter_config.json").is_file()  # the adapter only, not the 135M weights
    reloaded = lora_policy.load_lora_ppo_policy(tmp_path / "policy")
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids, torch.ones_like(ids), 6)[0], policy(ids, torch.ones_like(ids), 6)[0], atol=1e-5)
        assert torch.allclose(reloaded(ids, torch.ones_like(ids), 6)[1], policy(ids, torch.ones_like(ids), 6)[1], atol=1e-5)


def test_reloading_a_folder_without_an_adapter_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora_policy.load_lora_ppo_policy(tmp_path)
