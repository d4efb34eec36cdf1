"""Tests for rlhf_course.rl.tricks: the results table and CSV writer, the text statistics, and
experiment runs end to end on a tiny GPT-2 built from a config (with a cheap stand-in reward)."""

import math

import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_course.core import assets
from rlhf_course.rl import ppo
from rlhf_course.rl import tricks
from rlhf_course.core.profiles import Profile
from rlhf_course.rl import sampling

TEXTS = ["a wonderful, moving film about love", "dull and far too long for its own good",
         "the actors are great in this one", "I could not stop laughing at the jokes",
         "an awful mess of a movie", "beautifully shot and well acted throughout"]


def letter_reward(texts):
    """Cheap reward: the share of the letter 'e' (the tests need a signal, not a classifier)."""
    return torch.tensor([t.count("e") / max(len(t), 1) * 10 for t in texts])


@pytest.fixture(scope="module")
def tokenizer():
    return assets.gpt2_tokenizer()


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64)).eval()


@pytest.fixture(scope="module")
def tiny_config():
    return ppo.PPOConfig(steps=3, batch_size=4, mini_batch_size=2, ppo_epochs=1, forward_batch_size=4,
                         learning_rate=1e-3, response_min_tokens=2, response_max_tokens=6, adaptive_kl=False,
                         max_grad_norm=1.0)


@pytest.fixture(scope="module")
def queries(tokenizer, tiny_config):
    return sampling.make_queries(TEXTS, tokenizer, tiny_config)


def test_experiment_config_applies_overrides_and_rejects_unknown_fields(tiny_config):
    config = tricks.Experiment("e", "g", "gamma", {"gamma": 0.5}).config(tiny_config)
    assert config.gamma == 0.5 and tiny_config.gamma == 1.0  # the base config is not mutated
    with pytest.raises(ValueError, match="not PPOConfig"):
        tricks.Experiment("bad", "g", "typo", {"gama": 0.5}).config(tiny_config)


def test_notebook_experiments_have_unique_names_and_valid_overrides(tiny_config):
    experiments = tricks.notebook_experiments()
    names = [e.name for e in experiments]
    assert len(names) == len(set(names)) and "base" in names
    for experiment in experiments:
        experiment.config(tiny_config)  # raises on a bad field
    for profile in ("laptop", "full"):
        long_run = tricks.long_run_without_kl(Profile(profile)).config(tiny_config)
        assert long_run.init_kl_coef == 0.0 and not long_run.adaptive_kl and long_run.steps > tiny_config.steps


def test_linear_lr_schedule_goes_from_the_rate_to_zero(tiny_config):
    linear = ppo.PPOConfig(steps=4, learning_rate=1e-3, lr_schedule="linear")
    assert [ppo.learning_rate_at(linear, s) for s in range(5)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])
    assert ppo.learning_rate_at(tiny_config, 2) == tiny_config.learning_rate  # constant by default (TRL0)
    with pytest.raises(ValueError, match="lr_schedule"):
        ppo.PPOConfig(lr_schedule="cosine").validate()


def test_repetition_stats_and_top_words():
    stats = tricks.repetition_stats(["great great", "great great", "a b c"])
    assert stats["unique_fraction"] == pytest.approx(2 / 3)
    assert stats["most_common"] == "great great" and stats["most_common_fraction"] == pytest.approx(2 / 3)
    # bigrams: (great,great) x2, (a,b), (b,c) -> 3 distinct of 4
    assert stats["distinct_2"] == pytest.approx(0.75)
    assert tricks.top_words(["Great, great!", "great film"], n=1) == [("great", 3)]
    assert tricks.top_words(["a film, a good film", "of the film"], n=2, min_chars=4) == [("film", 3), ("good", 1)]
    with pytest.raises(ValueError):
        tricks.repetition_stats([])


def test_run_experiment_end_to_end_with_lr_decay_and_reward_scale(tiny_lm, tokenizer, queries, tiny_config, tmp_path):
    reference = ppo.frozen_reference(tiny_lm)
    experiments = [
        tricks.Experiment("base", "base", "base"),
        tricks.Experiment("decay", "guards", "lr decay", {"lr_schedule": "linear"}),
        tricks.Experiment("scaled", "critic", "x5, scaled", {"scale_rewards": True}, reward_scale=5.0),
    ]
    before = [p.detach().clone() for p in tiny_lm.parameters()]
    results = tricks.run_experiments(experiments, tiny_config, tiny_lm, reference, tokenizer, letter_reward,
                                     queries, queries[:3], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_lm.parameters()))  # the start policy is copied
    decay = results["decay"].history
    assert list(decay["learning_rate"]) == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    assert len(results["scaled"].samples) == 3
    # the scaled run's reported rewards are back on the reward function's own scale (<= 10 here)
    assert results["scaled"].history["reward_mean"].abs().max() <= 10.0

    table = tricks.results_table(results)
    assert list(table.index) == ["base", "decay", "scaled"]
    assert list(table.columns) == list(tricks.RESULT_COLUMNS[1:])
    assert table.loc["base", "steps"] == tiny_config.steps
    assert all(math.isfinite(v) for v in table["value_loss_final"])
    assert (table["response_length"] >= 1).all() and (table["response_length"] <= 5).all()

    path = tricks.write_results_csv(table, tmp_path / "nested" / "results.csv")
    back = tricks.read_results_csv(path)
    assert list(back.index) == ["base", "decay", "scaled"]
    assert back.loc["decay", "reward_final"] == pytest.approx(table.loc["decay", "reward_final"], abs=1e-4)
    assert back.loc["scaled", "setting"] == "x5, scaled"


def row(name, reward=1.0):
    values = {c: 0.0 for c in tricks.RESULT_COLUMNS}
    values.update(experiment=name, group="g", setting="s", seed=0, steps=1, reward_final=reward)
    return values


def test_write_results_csv_rounds_and_refuses_bad_tables(tmp_path):
    table = pd.DataFrame([row("a", 1.234567), row("b", 2.0)])
    path = tricks.write_results_csv(table, tmp_path / "r.csv", decimals=3)
    assert pd.read_csv(path)["reward_final"].tolist() == [1.235, 2.0]
    with pytest.raises(ValueError, match="lacks columns"):
        tricks.write_results_csv(table.drop(columns=["kl_final"]), tmp_path / "x.csv")
    with pytest.raises(ValueError, match="no rows"):
        tricks.write_results_csv(table.iloc[:0], tmp_path / "x.csv")
    with pytest.raises(ValueError, match="repeat"):
        tricks.write_results_csv(pd.DataFrame([row("a"), row("a")]), tmp_path / "x.csv")
    with pytest.raises(ValueError, match="non-finite"):
        tricks.write_results_csv(pd.DataFrame([row("a", float("nan"))]), tmp_path / "x.csv")
    with pytest.raises(ValueError, match="lacks columns"):
        pd.DataFrame({"x": [1]}).to_csv(tmp_path / "other.csv", index=False)
        tricks.read_results_csv(tmp_path / "other.csv")


def test_change_text_and_compare_word():
    assert tricks.change_text(2.0, 1.0) == "from 2.000 to 1.000 (-50%)"
    assert tricks.change_text(0.0, 1.0, decimals=1) == "from 0.0 to 1.0"
    assert tricks.compare_word(1.0, 1.5, noise=0.2) == "higher"
    assert tricks.compare_word(1.0, 0.5, noise=0.2) == "lower"
    assert tricks.compare_word(1.0, 1.1, noise=0.2) == "about the same"
    with pytest.raises(ValueError):
        tricks.compare_word(1.0, 1.1, noise=-1)


def test_noise_yardstick_is_at_least_two_standard_errors_and_the_seed_gap(tiny_config):
    def fake(rewards, std):
        history = pd.DataFrame({"reward_mean": rewards, "reward_std": [std] * len(rewards)})
        return tricks.TrickRun(tricks.Experiment("x", "g", "s"), tiny_config, history, pd.DataFrame(), 0.0)

    a, b = fake([0.0, 0.0, 0.0, 1.0], 2.0), fake([0.0, 0.0, 0.0, 0.0], 2.0)
    se = 2.0 / math.sqrt(1 * tiny_config.batch_size)  # last quarter = 1 step of batch_size episodes
    assert tricks.final_reward_standard_error(a) == pytest.approx(se)
    assert tricks.noise_yardstick(a, b) == pytest.approx(max(1.0, 2 * math.sqrt(2) * se))
