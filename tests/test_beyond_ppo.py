"""Tests for rlhf_course.rl.beyond_ppo: the reward wrapper's label choice, the TRL trap it avoids, CPU-safe TRL
configs, the memory monitor, and a two-step DPO run with its implicit reward on tiny models built from configs
(the RLOO / GRPO / PPO comparison is tests/test_compare_methods.py)."""

import math
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from rlhf_course.policy.sentiment import SentimentReward, positive_label_index
from rlhf_course.rl import beyond_ppo as bp
from rlhf_course.core.assets import gpt2_tokenizer, minilm_tokenizer
from rlhf_course.core.quiet import without_checkpointing_rename_warning

TEXTS = ["a wonderful, moving film", "dull and far too long", "the actors", "I"]


def tiny_classifier(id2label):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=minilm_tokenizer().vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=2, id2label=id2label,
                        label2id={v: k for k, v in id2label.items()})
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def classifier():
    return tiny_classifier({0: "NEGATIVE", 1: "POSITIVE"})


@pytest.fixture(scope="module")
def reward_tokenizer():
    return minilm_tokenizer()


@pytest.fixture(scope="module")
def policy_tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def tiny_policy_path(tmp_path_factory, policy_tokenizer):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128,
                                       vocab_size=len(policy_tokenizer)))
    return bp.save_for_trl(model, policy_tokenizer, tmp_path_factory.mktemp("tiny_policy"))


def logits(classifier, tokenizer, texts, **kwargs):
    with torch.no_grad():
        return classifier(**tokenizer(texts, return_tensors="pt", padding=True, **kwargs)).logits


# ----------------------------------------------------------------------------- reward wrapper


def test_positive_label_index_reads_id2label():
    assert positive_label_index(tiny_classifier({0: "NEGATIVE", 1: "POSITIVE"})) == 1
    assert positive_label_index(tiny_classifier({0: "POSITIVE", 1: "NEGATIVE"})) == 0
    with pytest.raises(ValueError, match="positive_index"):
        positive_label_index(tiny_classifier({0: "LABEL_0", 1: "LABEL_1"}))


def test_wrapper_returns_the_positive_logit_not_the_first(classifier, reward_tokenizer):
    reward = SentimentReward(classifier, reward_tokenizer)
    scores = reward(prompts=TEXTS[:2], completions=[" indeed", " sadly"])
    expected = logits(classifier, reward_tokenizer, [TEXTS[0] + " indeed", TEXTS[1] + " sadly"])
    assert scores == pytest.approx(expected[:, 1].tolist(), abs=1e-5)
    assert scores != pytest.approx(expected[:, 0].tolist(), abs=1e-3)
    swapped = SentimentReward(classifier, reward_tokenizer, positive_index=0)
    assert swapped.score_texts(TEXTS).tolist() == pytest.approx(logits(classifier, reward_tokenizer, TEXTS)[:, 0].tolist(),
                                                       abs=1e-5)


def test_trl_scores_a_classifier_passed_directly_by_its_negative_logit(
        tmp_path, classifier, reward_tokenizer, policy_tokenizer, tiny_policy_path):
    """The trap, through TRL's own reward code: logit 0 of a NEGATIVE/POSITIVE model is NEGATIVE."""
    from trl import GRPOConfig, GRPOTrainer

    args = bp.trl_args(GRPOConfig, tmp_path, max_steps=1, per_device_train_batch_size=2, num_generations=2,
                       max_completion_length=4)
    wrapper = SentimentReward(classifier, reward_tokenizer)
    trainer = GRPOTrainer(model=tiny_policy_path, reward_funcs=[classifier, wrapper], args=args,
                          train_dataset=Dataset.from_dict({"prompt": TEXTS}), processing_class=policy_tokenizer,
                          reward_processing_classes=[reward_tokenizer, reward_tokenizer])
    prompts, completions = TEXTS[:2], [" great", " bad"]
    columns = bp.trl_reward_columns(trainer, prompts, completions)
    texts = [p + c for p, c in zip(prompts, completions)]
    direct = logits(classifier, reward_tokenizer, texts, add_special_tokens=False)  # as TRL tokenizes
    assert columns.iloc[:, 0].tolist() == pytest.approx(direct[:, 0].tolist(), abs=1e-5)  # NEGATIVE logit
    assert columns["positive_logit"].tolist() == pytest.approx(
        logits(classifier, reward_tokenizer, texts)[:, 1].tolist(), abs=1e-5)


# ----------------------------------------------------------------------------- models on disk, configs


def test_in_memory_policy_is_refused_with_instructions(policy_tokenizer, tiny_policy_path):
    in_memory = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(policy_tokenizer)))
    with pytest.raises(ValueError, match="save_for_trl"):
        bp.require_saved_path(in_memory)
    assert bp.require_saved_path(tiny_policy_path) == tiny_policy_path
    assert bp.require_saved_path(GPT2LMHeadModel.from_pretrained(tiny_policy_path)) == tiny_policy_path


def test_trl_args_are_cpu_safe(tmp_path):
    from trl import DPOConfig

    args = bp.trl_args(DPOConfig, tmp_path)
    if not torch.cuda.is_available():
        assert args.use_cpu and not args.bf16
    assert args.report_to in ("none", [], ["none"]) and not args.activation_checkpointing


def test_trl_follows_rlhf_device(monkeypatch):
    # Before: TRL trained on any GPU present, whatever RLHF_DEVICE said, and RLHF_DEVICE=cuda on a CPU ran on the CPU.
    from rlhf_course.core.profiles import ProfileError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("RLHF_DEVICE", "cpu")
    assert bp.on_cpu()
    monkeypatch.delenv("RLHF_DEVICE")
    assert not bp.on_cpu()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("RLHF_DEVICE", "cuda")
    with pytest.raises(ProfileError, match="RLHF_DEVICE='cuda' is not a device of this machine"):
        bp.on_cpu()


# ----------------------------------------------------------------------------- two-step runs


def changed(before: dict, model) -> bool:
    return any(not torch.equal(before[name], p.detach()) for name, p in model.named_parameters())


def initial_params(path):
    return {n: p.detach().clone() for n, p in GPT2LMHeadModel.from_pretrained(path).named_parameters()}


SMOKE = bp.BeyondPPOConfig(dpo_steps=2, dpo_batch_size=4, dpo_learning_rate=1e-3, dpo_max_length=32)


def test_dpo_two_steps(tmp_path, policy_tokenizer, tiny_policy_path):
    pairs = Dataset.from_dict({"prompt": ["Question: hi\n\nAnswer:"] * 4,
                               "chosen": [" hello, how can I help?"] * 4, "rejected": [" go away"] * 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = bp.train_dpo(tiny_policy_path, policy_tokenizer, pairs, SMOKE, tmp_path)
    # TRL reads model.is_gradient_checkpointing (renamed in transformers 5.23): notebook 09 showed the warning.
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert len(result.history) == 2 and result.history["loss"].map(math.isfinite).all()
    assert changed(initial_params(tiny_policy_path), result.model)
    assert result.models == ["policy", "reference"] and result.wall_s > 0 and result.peak_rss_mb > 0
    assert result.state_mb > 0
    reference = GPT2LMHeadModel.from_pretrained(tiny_policy_path)
    rewards = bp.implicit_rewards(result.model, reference, policy_tokenizer, pairs, beta=SMOKE.dpo_beta)
    assert (rewards["margin"] > 0).all()  # two steps on the same pair at lr 1e-3 prefer the chosen answer
    unchanged = bp.implicit_rewards(reference, reference, policy_tokenizer, pairs, beta=0.1)
    assert unchanged[["chosen_reward", "rejected_reward"]].abs().max().max() < 1e-6


def test_memory_monitor_keeps_the_peak_seen_while_the_block_runs(monkeypatch):
    readings = iter([100.0, 180.0, 250.0, 120.0] + [110.0] * 10_000)
    monkeypatch.setattr(bp.MemoryMonitor, "rss_mb", staticmethod(lambda: next(readings)))
    with bp.MemoryMonitor(interval=0.001) as memory:
        import time

        time.sleep(0.05)
    assert memory.start_mb == 100.0 and memory.peak_mb == 250.0 and memory.added_mb == 150.0


def test_memory_monitor_reads_this_process_rss():
    assert bp.MemoryMonitor.rss_mb() > 10


def test_only_the_checkpointing_rename_warning_is_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with without_checkpointing_rename_warning():
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            warnings.warn("`something_else` is deprecated.", FutureWarning)
            warnings.warn("`is_gradient_checkpointing` is deprecated.", UserWarning)  # another category: shown
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated.", "`is_gradient_checkpointing` is deprecated."]
