"""Tests for rlhf_course.rl.tricks: the scaled reward of sweep ``critic_growth`` and the text statistics
of notebook 08 (the linear learning-rate schedule of PPO is tested in test_ppo.py)."""

import pytest
import torch

from rlhf_course.rl import tricks


def test_scaled_reward_multiplies_the_scores_and_returns_floats():
    scaled = tricks.ScaledReward(lambda texts: [float(len(t)) for t in texts], 5.0)
    rewards = scaled(["ab", "abcd"])
    assert rewards.dtype == torch.float and rewards.tolist() == [10.0, 20.0]


def test_repetition_stats_and_top_words():
    stats = tricks.repetition_stats(["great great", "great great", "a b c"])
    assert stats["unique_fraction"] == pytest.approx(2 / 3)
    assert stats["most_common"] == "great great" and stats["most_common_fraction"] == pytest.approx(2 / 3)
    # bigrams: (great,great) x2, (a,b), (b,c) -> 3 distinct of 4
    assert stats["distinct_2"] == pytest.approx(0.75)
    assert tricks.top_words(["Great, great!", "great film"], n=1) == [("great", 3)]
    assert tricks.top_words(["a film, a good film", "of the film"], n=2, min_chars=4) == [("film", 3), ("good", 1)]
    assert tricks.top_words(['serene.” serene." “Serene'], n=1, min_chars=4) == [("serene", 3)]
    with pytest.raises(ValueError):
        tricks.repetition_stats([])
