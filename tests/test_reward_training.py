"""Tests for reward training: the j/k collator, the pairwise trainer, TRL's trainer, save/reload,
the group_by_length failure and its fix, and the script's argument parsing.  Tiny models from configs."""

import math

import pandas as pd
import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_course.core import assets
from rlhf_course.reward import data, preference_parsing
from rlhf_course.reward import evaluation as reward_eval
from rlhf_course.reward import training as reward_training
from rlhf_course import train_reward
from rlhf_course.reward.training import PairwiseRewardCollator, RewardTrainingConfig


@pytest.fixture(scope="module")
def tokenizer():
    return assets.gpt2_tokenizer()


def tiny_config(tokenizer):
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=tokenizer.pad_token_id, num_labels=1)


def tiny_reward_model(tokenizer):
    torch.manual_seed(0)
    return LlamaForSequenceClassification(tiny_config(tokenizer))


def frame():
    pairs = [preference_parsing.PreferencePair((("human", f"Question number {i}?"),), f"A helpful answer {i}.", "No.")
             for i in range(8)]
    return data.pairs_to_frame(pairs)


def config(**changes):
    settings = dict(batch_size=4, max_length=32, learning_rate=1e-2, lora_last_layers=1, logging_steps=1,
                    epochs=1)
    settings.update(changes)
    return RewardTrainingConfig.for_profile("laptop", **settings)


def test_collator_pads_chosen_and_rejected_sides_separately(tokenizer):
    features = [
        {"input_ids_j": [1, 2, 3], "attention_mask_j": [1, 1, 1], "input_ids_k": [4], "attention_mask_k": [1],
         "length": 3, "language": "en"},
        {"input_ids_j": [5], "attention_mask_j": [1], "input_ids_k": [6, 7], "attention_mask_k": [1, 1],
         "length": 2, "language": "zh"},
    ]
    batch = PairwiseRewardCollator(tokenizer)(features)
    pad = tokenizer.pad_token_id
    assert batch["input_ids_j"].tolist() == [[1, 2, 3], [5, pad, pad]]
    assert batch["attention_mask_j"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids_k"].tolist() == [[4, pad], [6, 7]]
    assert batch["attention_mask_k"].tolist() == [[1, 0], [1, 1]]
    assert set(batch) == {"input_ids_j", "attention_mask_j", "input_ids_k", "attention_mask_k", "return_loss"}


def _changed(before, model):
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {n for n in before if not torch.equal(before[n], after[n])}


def test_pairwise_trainer_two_steps_change_lora_and_head_with_finite_loss(tokenizer, tmp_path):
    tokenized, report = data.tokenize_pairs(frame(), tokenizer, max_length=32)
    assert report.kept == 8
    trainer = reward_training.pairwise_trainer(tiny_reward_model(tokenizer), tokenizer, tokenized, config(),
                                               tmp_path, max_steps=2, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in before) and any("score" in n for n in before)
    assert not any("layers.0." in n and "lora" in n for n in before)  # lora_last_layers=1: top layer only
    trainer.train()
    changed = _changed(before, trainer.model)
    assert any("lora_B" in n for n in changed) and any("score" in n for n in changed)
    losses = [entry["loss"] for entry in reward_training.training_log(trainer)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_pairwise_loss_equals_log_sigmoid_of_the_reward_difference(tokenizer, tmp_path):
    tokenized, _ = data.tokenize_pairs(frame(), tokenizer, max_length=32)
    trainer = reward_training.pairwise_trainer(tiny_reward_model(tokenizer), tokenizer, tokenized, config(),
                                               tmp_path, disable_tqdm=True)
    batch = PairwiseRewardCollator(tokenizer)([tokenized[i] for i in range(4)])
    trainer.model.eval()
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    difference = outputs["rewards_j"] - outputs["rewards_k"]
    assert torch.allclose(loss, -torch.nn.functional.logsigmoid(difference).mean())


def test_group_by_length_fails_on_pairwise_data_and_a_length_column_fixes_it(tokenizer, tmp_path):
    tokenized, _ = data.tokenize_pairs(frame(), tokenizer, max_length=32)
    with pytest.raises(TypeError, match="group_by_length"):  # transformers 5 renamed the argument
        reward_training.pairwise_training_args(config(), tmp_path, group_by_length=True)
    trainer = reward_training.pairwise_trainer(tiny_reward_model(tokenizer), tokenizer, tokenized, config(),
                                               tmp_path, train_sampling_strategy="group_by_length")
    with pytest.raises(ValueError, match="input_ids"):
        trainer.get_train_dataloader()
    trainer.train_dataset = reward_training.add_length_column(tokenized)
    assert trainer.train_dataset["length"] == [max(len(j), len(k)) for j, k in
                                               zip(tokenized["input_ids_j"], tokenized["input_ids_k"])]
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids_j"].shape[0] == 4


def test_trl_trainer_two_steps_and_save_reload_scores_the_same(tokenizer, tmp_path):
    base_dir = tmp_path / "tiny-base"
    LlamaForCausalLM(tiny_config(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    cfg = config(base_model=str(base_dir))
    tokenizer_local = reward_training.load_tokenizer(cfg.base_model)
    model = reward_training.load_reward_base(cfg.base_model, tokenizer_local)
    trainer = reward_training.trl_trainer(model, tokenizer_local, Dataset.from_pandas(frame()), cfg,
                                          tmp_path / "run", max_steps=2, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any("lora_B" in n for n in _changed(before, trainer.model))
    log = reward_training.training_log(trainer)
    assert len(log) == 2 and all(math.isfinite(e["loss"]) for e in log) and "accuracy" in log[0]
    texts = list(frame()["prompt"] + frame()["chosen"])
    expected = reward_eval.score_texts(trainer.model, tokenizer_local, texts)
    folder = reward_training.save_reward_model(trainer.model, tokenizer_local, tmp_path / "saved", cfg, {"x": 1})
    reloaded, reloaded_tokenizer = reward_training.load_reward_model(folder)
    assert torch.allclose(reward_eval.score_texts(reloaded, reloaded_tokenizer, texts), expected, atol=1e-5)
    assert reward_training.read_model_card(folder)["metrics"] == {"x": 1}


def test_lora_config_targets_and_4bit_skip_note(tokenizer, capsys):
    cfg = RewardTrainingConfig()
    lora = reward_training.lora_config(cfg, tiny_reward_model(tokenizer))
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj"}
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (4, 32, 0.1) and "score" in lora.modules_to_save
    possible, why_not = reward_training.can_load_in_4bit()
    if not possible:
        assert why_not
    with pytest.raises(ValueError, match="unknown RewardTrainingConfig"):
        RewardTrainingConfig.for_profile("laptop", lora_rank=8)


def test_script_arguments_become_the_config():
    args, cfg = train_reward.parse_reward_args(["--profile", "laptop", "--language", "zh", "--trainer", "pairwise",
                                                "--learning-rate", "1e-4", "--lora-last-layers", "none",
                                                "--lora-targets", "q_proj", "v_proj", "--no-load-in-4bit",
                                                "--output-dir", "x"])
    assert (cfg.language, cfg.trainer, cfg.learning_rate, cfg.lora_last_layers) == ("zh", "pairwise", 1e-4, None)
    assert cfg.lora_targets == ("q_proj", "v_proj") and cfg.load_in_4bit is False and args.output_dir == "x"
    _, full = train_reward.parse_reward_args(["--profile", "full"])
    assert full.base_model == "qwen2-0.5b" and full.load_in_4bit and full.train_size is None


def test_evaluation_figures_on_a_hand_made_score_table(tokenizer):
    scored = pd.DataFrame({"prompt": ["p"] * 4, "chosen": ["long answer", "a", "bb", "c"],
                           "rejected": ["x", "longer one", "cc", "dd"], "language": ["en", "en", "zh", "zh"],
                           "chosen_reward": [2.0, 0.0, 1.0, -1.0], "rejected_reward": [1.0, 1.0, 0.0, 0.0]})
    scored["margin"] = scored["chosen_reward"] - scored["rejected_reward"]
    scored["correct"] = scored["margin"] > 0
    assert reward_eval.summary(scored)["accuracy"] == 0.5
    assert reward_eval.deepspeed_log_line(scored) == (
        "chosen_last_scores (higher is better) : 0.5000, rejected_last_scores (lower is better) : 0.5000, "
        "acc (higher is better) : 0.5000")
    baseline = reward_eval.longer_answer_baseline(scored)
    assert baseline["accuracy"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    by_language = reward_eval.accuracy_by(scored)
    assert by_language.loc["en", "accuracy"] == 0.5 and by_language.loc["zh", "pairs"] == 2
    assert by_language.loc["en", "standard_error"] == pytest.approx((0.5 * 0.5 / 2) ** 0.5)
    table = reward_eval.best_and_worst(scored, k=1)
    assert list(table["which"]) == ["best", "worst"] and table["margin"].tolist() == [1.0, -1.0]
    reference = reward_eval.reference_table([{"run": "x", "data": "y", "accuracy": 0.7}])
    assert reference["accuracy"].tolist() == [0.7, 0.619, 0.79]


@pytest.mark.parametrize("trainer_name", ["pairwise", "trl"])
def test_script_run_end_to_end_on_a_tiny_model(tokenizer, tmp_path, trainer_name):
    base_dir = tmp_path / "tiny-base"
    LlamaForCausalLM(tiny_config(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    result = train_reward.main(["--profile", "laptop", "--language", "bilingual", "--trainer", trainer_name,
                                "--base-model", str(base_dir), "--train-size", "8", "--test-size", "4",
                                "--batch-size", "4", "--lora-last-layers", "1", "--output-dir", str(tmp_path / "run")])
    assert result.metrics["pairs"] == 8 and result.metrics["train_pairs"] == 16
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and len(result.log) >= 1
    reread = train_reward.RewardRun.from_folder(tmp_path / "run")
    assert reread.config == result.config and reread.metrics == result.metrics
    scores = reread.test_scores()
    assert set(scores.language) == {"en", "zh"} and len(scores) == 8
    model, model_tokenizer = reread.load()
    again = reward_eval.score_pairs(model, model_tokenizer, scores[["prompt", "chosen", "rejected"]])
    assert abs(again.chosen_reward.values - scores.chosen_reward.values).max() < 1e-4


def test_pad_token_differs_from_eos_and_the_score_is_read_at_the_last_real_token(tokenizer, tmp_path):
    """GPT-2 (like SmolLM2) pads with its eos, so transformers' read-out ("last id that is not pad")
    skips a final eos; ``load_tokenizer`` gives it a pad of its own, and the read-out is the last
    real token, what the attention mask says."""
    base_dir = _tiny_base(tokenizer, tmp_path)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap, as shipped
    fixed = reward_training.load_tokenizer(base_dir)
    assert fixed.pad_token_id != fixed.eos_token_id and fixed.padding_side == "right"
    model = reward_training.load_reward_base(base_dir, fixed, verbose=False).eval()
    assert model.config.pad_token_id == fixed.pad_token_id
    texts = ["A short one.", "A somewhat longer text, to pad the other one."]
    for tok, ending in ((fixed, ""), (fixed, fixed.eos_token)):
        batch = tok([t + ending for t in texts], padding=True, return_tensors="pt")
        last = batch["attention_mask"].sum(1) - 1  # right padding: the last real token
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
            at_last = model.score(out.hidden_states[-1][torch.arange(2), last]).squeeze(-1)
        assert torch.allclose(out.logits.squeeze(-1), at_last, atol=1e-6)
    assert torch.allclose(reward_eval.score_texts(model, fixed, texts), model(**fixed(texts, padding=True,
                          return_tensors="pt")).logits.squeeze(-1).detach(), atol=1e-5)
    trapped = tokenizer([t + tokenizer.eos_token for t in texts], padding=True, return_tensors="pt")
    read = (torch.arange(trapped["input_ids"].shape[1]) * (trapped["input_ids"] != tokenizer.pad_token_id)).argmax(1)
    assert (read == trapped["attention_mask"].sum(1) - 2).all()  # one token early: the eos taken for padding
    with pytest.raises(ValueError, match="pad token equals eos"):
        reward_training.load_reward_base(base_dir, tokenizer, verbose=False)


def test_trl_gets_token_ids_without_eos_and_the_held_out_curve_logs_each_step(tokenizer, tmp_path):
    ids = reward_training.tokenize_for_trl(Dataset.from_pandas(frame()), tokenizer)
    assert set(ids.column_names) == {"chosen_ids", "rejected_ids"}
    first = frame().iloc[0]
    assert ids[0]["chosen_ids"] == tokenizer(first.prompt + first.chosen)["input_ids"]
    assert tokenizer.eos_token_id not in ids[0]["chosen_ids"]
    result = train_reward.train_and_evaluate(config(base_model=_tiny_base(tokenizer, tmp_path), language="bilingual",
                                                    train_size=8, test_size=4, held_out_every=1, held_out_pairs=6,
                                                    trainer="pairwise"), tmp_path / "run", verbose=False)
    steps = [row["step"] for row in result.held_out]
    assert steps == list(range(len(result.log) + 1))  # before the first step, then after each
    assert {"held_out_loss", "held_out_accuracy", "held_out_accuracy_en", "held_out_accuracy_zh"} <= set(
        result.held_out[0])
    assert train_reward.RewardRun.from_folder(tmp_path / "run").held_out == result.held_out


def _tiny_base(tokenizer, tmp_path):
    base_dir = tmp_path / "tiny-base"
    if not base_dir.exists():
        LlamaForCausalLM(tiny_config(tokenizer)).save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    return str(base_dir)


def test_held_out_curve_shares_its_pairs_between_languages():
    import pandas as pd

    from rlhf_course.reward.training import HeldOutCurve

    frame = pd.DataFrame({"language": ["en"] * 6 + ["zh"] * 6, "prompt": [f"p{i}" for i in range(12)]})
    picked = HeldOutCurve.pick(frame, 4)
    assert picked["language"].tolist() == ["en", "en", "zh", "zh"] and picked["prompt"].tolist() == ["p0", "p1", "p6", "p7"]
    assert HeldOutCurve.pick(frame[frame.language == "en"], 4)["prompt"].tolist() == ["p0", "p1", "p2", "p3"]


def test_char_ngram_naive_bayes_scores_by_hand_and_refuses_other_labels():
    score = reward_eval.char_ngram_naive_bayes(["很好", "很差", "好", "差"], [1, 0, 1, 0])
    # vocabulary {很, 好, 差, 很好, 很差}: 5; label 1 counts 很 1, 好 2, 很好 1 (4 grams + 5), label 0 the mirror image
    assert score("好") == pytest.approx(math.log(3 / 9) - math.log(1 / 9))
    assert score("差") == pytest.approx(-score("好")) and score("很") == pytest.approx(0.0)
    assert score("好") > 0 > score("差")
    with pytest.raises(ValueError, match="labels must be 0 or 1, got 2"):
        reward_eval.char_ngram_naive_bayes(["好"], [2])
