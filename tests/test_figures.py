"""Tests for rlhf_course.course.figures: a figure outside its range stops the notebook, and every
figure is recorded in the notebook's results file with the profile, machine and versions."""

import json
import math

import pytest

from rlhf_course.core.profiles import Profile
from rlhf_course.course.figures import FigureOutOfRange, Figures, read_results


def test_expect_records_the_figure_with_its_range(tmp_path, capsys):
    figures = Figures("05_reward_model_chinese_bilingual", Profile("laptop"), tmp_path)
    assert figures.expect("accuracy", 0.84, laptop=(0.8, 1.0), full=(0.6, 1.0)) == 0.84
    assert "accuracy = 0.840  (expected 0.8 to 1, laptop profile)" in capsys.readouterr().out
    record = read_results("05_reward_model_chinese_bilingual.ipynb", tmp_path)
    assert record["notebook"] == "05_reward_model_chinese_bilingual" and record["profile"] == "laptop"
    assert record["figures"]["accuracy"] == {"value": 0.84, "expected": [0.8, 1.0]}
    assert record["machine"] and "torch" in record["versions"]


def test_a_figure_outside_its_range_raises_naming_figure_value_and_range(tmp_path):
    figures = Figures("nb", Profile("laptop"), tmp_path)
    with pytest.raises(FigureOutOfRange, match=r"'loss' = 0\.700 is outside its expected laptop-profile range \[0, 0\.55\]"):
        figures.expect("loss", 0.7, laptop=(0.0, 0.55))
    with pytest.raises(FigureOutOfRange, match="= nan is outside"):
        figures.expect("loss", math.nan, laptop=(0.0, 0.55))
    assert "loss" not in figures.values


def test_the_full_profile_uses_its_own_range_and_says_when_it_has_none(tmp_path, capsys):
    figures = Figures("nb", Profile("full"), tmp_path)
    figures.expect("gain", 3.0, laptop=(0.0, 1.0), full=(1.0, 5.0))
    figures.expect("seconds", 12.0, laptop=(0.0, 60.0))
    out = capsys.readouterr().out
    assert "no range for this profile" in out
    assert json.loads((tmp_path / "nb.json").read_text())["figures"]["seconds"]["expected"] is None
    with pytest.raises(ValueError, match="low > high"):
        figures.expect("bad", 1.0, full=(2.0, 1.0))
