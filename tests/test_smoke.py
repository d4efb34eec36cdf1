"""Smoke mode, the stand-ins it runs on, and the full-profile fixes that running it found."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_course.core import profiles, smoke
from rlhf_course.core.profiles import Profile, ProfileError
from rlhf_course.course import standins
from rlhf_course.course.figures import Figures
from rlhf_course.reward import evaluation, training
from rlhf_course.reward.training import RewardTrainingConfig
from rlhf_course.rl.ppo import PPOConfig


@pytest.fixture
def smoke_run(monkeypatch):
    monkeypatch.setenv("RLHF_PROFILE", "full")
    monkeypatch.setenv(smoke.SMOKE_VAR, "1")


def test_smoke_sizes_replace_the_full_values_and_nothing_else(smoke_run):
    full = RewardTrainingConfig()
    smoked = RewardTrainingConfig.for_profile()
    assert smoked.train_size == smoke.CONFIG_SIZES["RewardTrainingConfig"]["train_size"]
    assert (smoked.base_model, smoked.learning_rate, smoked.load_in_4bit) == (full.base_model, full.learning_rate, True)
    assert PPOConfig.for_profile().steps == smoke.CONFIG_SIZES["PPOConfig"]["steps"]
    assert PPOConfig.for_profile(steps=5).steps == 5  # a setting passed by hand still wins
    assert PPOConfig.for_profile("laptop").steps == 55


def test_every_smoke_size_names_a_real_field_and_passes_validation():
    from rlhf_course.rl.beyond_ppo import BeyondPPOConfig

    classes = {cls.__name__: cls for cls in (RewardTrainingConfig, PPOConfig, BeyondPPOConfig)}
    assert set(smoke.CONFIG_SIZES) == set(classes)
    for name, sizes in smoke.CONFIG_SIZES.items():
        classes[name](**sizes).validate()


def test_pick_takes_the_laptop_size_in_a_smoke_run(smoke_run):
    profile = profiles.current_profile()
    assert profile.is_full and profile.smoke and profile.label == "full (smoke)" and str(profile) == "full"
    assert profile.pick(8, 128) == 8
    assert Profile("full", smoke=False).pick(8, 128) == 128


@pytest.mark.parametrize("value, on", [("1", True), ("yes", True), ("0", False), ("", False), ("off", False)])
def test_smoke_switch_values(value, on, monkeypatch):
    monkeypatch.setenv(smoke.SMOKE_VAR, value)
    assert smoke.smoke_mode() is on


def test_smoke_with_the_laptop_profile_is_refused(monkeypatch):
    monkeypatch.setenv("RLHF_PROFILE", "laptop")
    monkeypatch.setenv(smoke.SMOKE_VAR, "1")
    with pytest.raises(ProfileError, match="RLHF_PROFILE=full"):
        profiles.current_profile()


def test_a_smoke_run_records_figures_but_checks_and_writes_nothing(smoke_run, tmp_path, capsys):
    figures = Figures("99_smoke", folder=tmp_path)
    assert figures.expect("accuracy", 0.1, laptop=(0.6, 0.9), full=(0.6, 0.9)) == 0.1  # outside: not checked
    assert figures["accuracy"] == 0.1 and figures.values["accuracy"]["expected"] == [0.6, 0.9]
    assert "not checked" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_precision_follows_the_device(monkeypatch):
    assert profiles.precision_flags(use_cpu=True) == {"bf16": False, "fp16": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16_capable, expected in ((True, {"bf16": True, "fp16": False}), (False, {"bf16": False, "fp16": True})):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_capable)
        assert profiles.precision_flags(use_cpu=False) == expected
        assert profiles.half_dtype() == (torch.bfloat16 if bf16_capable else torch.float16)
    assert profiles.precision_flags(use_cpu=True) == {"bf16": False, "fp16": False}


def test_one_epoch_counts_gradient_accumulation():
    full = RewardTrainingConfig()  # batch 8 x accumulation 4: 32 pairs per optimizer step
    assert training.optimizer_steps_per_epoch(160_000, full) == 160_000 // 32
    assert training.optimizer_steps_per_epoch(5, full) == 1
    assert training.layers_text(None) == "all" and training.layers_text([20, 21, 29]) == "20..29"


def test_the_reference_table_says_which_profile_ran():
    table = evaluation.reference_table([{"run": "r", "data": "d", "accuracy": 0.6}], profile="full")
    assert table.profile.iloc[0] == "full (this run)" and "full (seed's report)" in set(table.profile)


def test_standins_have_the_real_layout_label_maps_and_schemas(tmp_path):
    home = tmp_path / "hub"
    standins.MODELS["lvwerra/distilbert-imdb"](standins.snapshot_folder(home, "lvwerra/distilbert-imdb"), width=16)
    standins.DATASETS["dikw/hh_rlhf_cn"](standins.snapshot_folder(home, "dikw/hh_rlhf_cn", "dataset"))
    repo = home / "models--lvwerra--distilbert-imdb"
    commit = (repo / "refs" / "main").read_text()
    config = json.loads((repo / "snapshots" / commit / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["id2label"] == {"0": "NEGATIVE", "1": "POSITIVE"}
    data = home / "datasets--dikw--hh_rlhf_cn" / "snapshots"
    files = sorted(p.name for p in data.glob("*/*.jsonl"))
    assert files == ["hh_rlhf_test.jsonl", "hh_rlhf_train.jsonl"]
    record = json.loads(next(data.glob("*/hh_rlhf_train.jsonl")).read_text(encoding="utf-8").splitlines()[0])
    assert set(record) == {"context", "chosen", "rejected"} and record["context"][0]["role"] == "human"
