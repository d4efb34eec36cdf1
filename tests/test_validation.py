"""Settings are validated before any work starts (issue 17).

* Every field of every config dataclass has a rule (``field_checks``, ``rlhf_course.core.config``);
  ``validate()`` refuses a value out of range with one line naming the field and what to use.
* Every config the course builds today (notebooks, package, tests) still validates.
* Both scripts turn a bad setting, an unwritable output folder or an unknown ``RLHF_DEVICE`` into a
  usage error (exit 2) before anything loads: the loaders are replaced by functions that fail the test.
* ``get_device`` refuses a device the machine lacks; ``HF_HUB_OFFLINE`` is read as huggingface_hub reads it.
"""

import dataclasses
import math
import os
import sys

import pytest
import torch

from rlhf_course import train_ppo, train_reward
from rlhf_course.core import cli, hub, profiles
from rlhf_course.core.config import field_names
from rlhf_course.core.profiles import ENV_VAR, Profile, ProfileError
from rlhf_course.policy import sentiment, sft
from rlhf_course.policy.sentiment import ClassifierConfig
from rlhf_course.policy.sft import SFTConfig
from rlhf_course.reward import training as reward_training
from rlhf_course.reward.training import RewardTrainingConfig
from rlhf_course.rl import beyond_ppo, ppo
from rlhf_course.rl.beyond_ppo import BeyondPPOConfig
from rlhf_course.rl.ppo import PPOConfig

CONFIGS = [RewardTrainingConfig, PPOConfig, BeyondPPOConfig, SFTConfig, ClassifierConfig]
ALL_FIELDS = [(c, name) for c in CONFIGS for name in field_names(c)]
reward_train_and_evaluate = train_reward.train_and_evaluate  # the real ones, before `nothing_loads` replaces them
make_accelerator = train_ppo.distributed.make_accelerator
real_train_ppo = ppo.train_ppo


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in (ENV_VAR, profiles.DEVICE_VAR):
        monkeypatch.delenv(name, raising=False)


def refuses(config_class, match: str, **overrides) -> str:
    """The one-line error that the laptop config changed by ``overrides`` raises (``for_profile`` cannot
    take ``profile``, a field of ``RewardTrainingConfig``, so the change is made with ``replace``)."""
    config = dataclasses.replace(config_class.for_profile("laptop"), **overrides)
    with pytest.raises(ValueError, match=match) as error:
        config.validate()
    message = str(error.value)
    assert "\n" not in message, "the error is one line"
    return message


# ============================================================================ every field has a rule


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_exactly_one_rule(config_class):
    named = [name for names in config_class.field_checks for name in names.split()]
    assert sorted(named) == sorted(field_names(config_class)), "each field once in field_checks"


@pytest.mark.parametrize("config_class, name", ALL_FIELDS, ids=lambda x: getattr(x, "__name__", x))
def test_a_value_of_the_wrong_kind_is_refused_naming_the_field(config_class, name):
    message = refuses(config_class, f"{name}=", **{name: object()})
    assert message.startswith(f"{config_class.__name__}: {name}=") and "use " in message


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("profile", ["laptop", "full"])
def test_both_profiles_and_the_defaults_validate(config_class, profile, monkeypatch):
    config_class.for_profile(profile)
    config_class().validate()
    monkeypatch.setenv(ENV_VAR, profile)
    config_class.for_profile()


def test_an_unknown_profile_still_raises():
    for config_class in CONFIGS:
        with pytest.raises(ValueError, match="valid profiles: laptop, full"):
            config_class.for_profile("bogus")
    with pytest.raises(ValueError, match="profile='bogus'"):
        RewardTrainingConfig(profile="bogus").validate()


# ============================================================================ the values of the issue

BAD = [
    # train_reward: each of these "succeeded" with exit 0 or crashed deep inside torch / peft
    (RewardTrainingConfig, dict(train_size=-5), "train_size=-5 .*integer >= 1, or none"),
    (RewardTrainingConfig, dict(test_size=0), "test_size=0"),
    (RewardTrainingConfig, dict(epochs=-1), "epochs=-1 .*number > 0"),
    (RewardTrainingConfig, dict(epochs=0), "epochs=0 "),
    (RewardTrainingConfig, dict(batch_size=0), "batch_size=0"),
    (RewardTrainingConfig, dict(gradient_accumulation_steps=0), "gradient_accumulation_steps=0"),
    (RewardTrainingConfig, dict(max_length=0), "max_length=0"),
    (RewardTrainingConfig, dict(lora_r=0), "lora_r=0"),
    (RewardTrainingConfig, dict(lora_dropout=1.0), r"lora_dropout=1.0 .*\[0, 1\)"),
    (RewardTrainingConfig, dict(warmup_ratio=1.0), r"warmup_ratio=1.0 .*\[0, 1\)"),
    (RewardTrainingConfig, dict(learning_rate=-1e-4), "learning_rate=-0.0001"),
    (RewardTrainingConfig, dict(learning_rate=math.nan), "learning_rate=nan"),
    (RewardTrainingConfig, dict(trainer="bogus"), "trainer='bogus' .*trl, pairwise"),
    (RewardTrainingConfig, dict(language="fr"), "language='fr' .*en, zh, bilingual"),
    (RewardTrainingConfig, dict(lr_scheduler="cosine_with_min_lr"), "lr_scheduler="),
    (RewardTrainingConfig, dict(base_model="no/such-model"), "base_model=.*local model folder"),
    (RewardTrainingConfig, dict(lora_targets=()), "lora_targets=()"),
    (RewardTrainingConfig, dict(lora_last_layers=0), "lora_last_layers=0"),
    (RewardTrainingConfig, dict(logging_steps=0), "logging_steps=0"),
    (RewardTrainingConfig, dict(seed=-1), "seed=-1"),
    # train_ppo / PPOConfig
    (PPOConfig, dict(steps=0), "steps=0 .*integer >= 1 .*laptop: 55, full: 194"),
    (PPOConfig, dict(batch_size=0, mini_batch_size=0), "batch_size=0"),
    (PPOConfig, dict(mini_batch_size=0), "mini_batch_size=0"),
    (PPOConfig, dict(ppo_epochs=0), "ppo_epochs=0"),
    (PPOConfig, dict(forward_batch_size=0), "forward_batch_size=0"),
    (PPOConfig, dict(kl_target=0), "kl_target=0 .*number > 0"),
    (PPOConfig, dict(kl_horizon=0), "kl_horizon=0"),
    (PPOConfig, dict(top_k=100_000), r"top_k=100000 .*\[0, 50257\]"),
    (PPOConfig, dict(top_k=-1), "top_k=-1"),
    (PPOConfig, dict(top_p=0.0), r"top_p=0.0 .*\(0, 1\]"),
    (PPOConfig, dict(top_p=1.5), "top_p=1.5"),
    (PPOConfig, dict(temperature=-1.0), "temperature=-1.0 .*greedy"),
    (PPOConfig, dict(learning_rate=0.0), "learning_rate=0.0"),
    (PPOConfig, dict(adam_eps=0.0), "adam_eps=0.0"),
    (PPOConfig, dict(max_grad_norm=0.0), "max_grad_norm=0.0 .*or none"),
    (PPOConfig, dict(gamma=1.5), "gamma=1.5"),
    (PPOConfig, dict(lam=-0.1), "lam=-0.1"),
    (PPOConfig, dict(cliprange=0.0), "cliprange=0.0"),
    (PPOConfig, dict(cliprange_value=-1.0), "cliprange_value=-1.0"),
    (PPOConfig, dict(vf_coef=-0.1), "vf_coef=-0.1"),
    (PPOConfig, dict(init_kl_coef=-0.2), "init_kl_coef=-0.2"),
    (PPOConfig, dict(min_review_chars=-1), "min_review_chars=-1"),
    (PPOConfig, dict(lr_schedule="cosine"), "lr_schedule='cosine' .*constant, linear"),
    (PPOConfig, dict(adaptive_kl="no"), "adaptive_kl='no' .*True or False"),
    (PPOConfig, dict(steps=2.5), "steps=2.5 .*integer"),
    (PPOConfig, dict(batch_size=10, mini_batch_size=4), "multiple of mini_batch_size=4.*e.g. 2"),
    (PPOConfig, dict(batch_size=8, mini_batch_size=16), "multiple of mini_batch_size=16.*e.g. 8"),
    (PPOConfig, dict(query_min_tokens=8, query_max_tokens=8), "query_min_tokens < query_max_tokens"),
    (PPOConfig, dict(response_min_tokens=0), "response_min_tokens=0"),
    # the other configs
    (BeyondPPOConfig, dict(dpo_steps=0), "dpo_steps=0"),
    (BeyondPPOConfig, dict(dpo_max_length=1), "dpo_max_length=1"),
    (SFTConfig, dict(steps=0), "steps=0"),
    (SFTConfig, dict(block_size=1), "block_size=1"),
    (SFTConfig, dict(n_embd=130), "n_embd=130 must be a multiple of n_head=4"),
    (SFTConfig, dict(warmup_steps=300), "warmup_steps=300 is more than steps=200"),
    (ClassifierConfig, dict(warmup_steps=0), "warmup_steps=0"),  # the schedule divides by it
    (ClassifierConfig, dict(max_length=1000), r"max_length=1000 .*\[3, 512\]"),
    (ClassifierConfig, dict(held_out=0), "held_out=0"),
    (ClassifierConfig, dict(steps=10), "warmup_steps=24 is more than steps=10"),
]


@pytest.mark.parametrize("config_class, overrides, match", BAD,
                         ids=[f"{c.__name__}-{'-'.join(map(str, o.values()))}" for c, o, _ in BAD])
def test_values_that_make_no_sense_are_refused_with_what_to_use(config_class, overrides, match):
    refuses(config_class, match, **overrides)


def test_the_message_says_what_is_wrong_what_to_use_and_the_profiles_values():
    message = refuses(PPOConfig, "steps=0", steps=0)
    assert message == "PPOConfig: steps=0 is not valid; use an integer >= 1 (laptop: 55, full: 194)"


GOOD = [
    (PPOConfig, dict(temperature=0.0)),  # greedy decoding
    (PPOConfig, dict(top_k=50_257)), (PPOConfig, dict(top_k=0)), (PPOConfig, dict(top_p=1.0)),
    (PPOConfig, dict(cliprange_value=math.inf)),  # notebook 08: no value clipping
    (PPOConfig, dict(max_grad_norm=None)), (PPOConfig, dict(init_kl_coef=0.0, adaptive_kl=False)),
    (PPOConfig, dict(gamma=1.0, lam=0.0, entropy_coef=0.0, vf_coef=0.0)),
    (PPOConfig, dict(batch_size=8, mini_batch_size=8, steps=1)),
    (RewardTrainingConfig, dict(epochs=0.5)),  # transformers rounds the steps up: at least one
    (RewardTrainingConfig, dict(train_size=None, test_size=None, lora_last_layers=None, lora_targets=None)),
    (RewardTrainingConfig, dict(lora_targets=("q_proj", "v_proj"), lora_dropout=0.0, warmup_ratio=0.0)),
    (RewardTrainingConfig, dict(lr_scheduler="cosine", extra={"note": "x"})),
    (SFTConfig, dict(warmup_steps=0)), (SFTConfig, dict(warmup_steps=200)),
]


@pytest.mark.parametrize("config_class, overrides", GOOD, ids=[f"{c.__name__}-{o}" for c, o in GOOD])
def test_edge_values_that_work_are_accepted(config_class, overrides):
    config_class.for_profile("laptop", **overrides)


@pytest.mark.parametrize("profile", ["laptop", "full"])
def test_every_config_the_course_builds_today_validates(profile, monkeypatch, tmp_path):
    """The configs of the notebooks (04, 05, 06, 07, 08, 09), of the package and of the tests."""
    monkeypatch.setenv(ENV_VAR, profile)
    session = Profile(profile)
    RewardTrainingConfig.for_profile(session, language="en", trainer="trl")  # 04, 05, 09
    RewardTrainingConfig.for_profile(session, language="bilingual", trainer="pairwise", train_size=128, test_size=64)
    PPOConfig.for_profile()  # 06, 07
    PPOConfig.for_profile(session, min_review_chars=150)  # course/benchmarks.py
    from rlhf_course import experiments
    from rlhf_course.rl import lora_policy

    for sweep in experiments.SWEEPS.values():  # 07-09: every arm of every sweep, as run_rows builds it
        for changes in sweep.arms.values():
            dataclasses.replace(lora_policy.ppo_start_config(session), **experiments.ppo_changes(changes), seed=2).validate()
    notebook_09 = BeyondPPOConfig(seed=0)
    notebook_09.validate()
    # the tests' own configs
    for config in [
        PPOConfig(steps=3, batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3, scale_rewards=True,
                  max_grad_norm=1.0, min_review_chars=150),
        PPOConfig(steps=3, batch_size=4, mini_batch_size=2, ppo_epochs=1, forward_batch_size=4),
        PPOConfig(steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, forward_batch_size=2,
                  entropy_coef=0.01, scale_rewards=True, max_grad_norm=1.0),
        PPOConfig(batch_size=2, mini_batch_size=2, force_max_length=True), PPOConfig(top_k=1), PPOConfig(top_p=0.8),
        PPOConfig(steps=4, learning_rate=1e-3, lr_schedule="linear"),
        SFTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=4, steps=3, warmup_steps=1, held_out=50),
        ClassifierConfig(steps=1, batch_size=4, warmup_steps=1, held_out=16, max_length=16),
        BeyondPPOConfig(dpo_steps=2, dpo_batch_size=4, dpo_learning_rate=1e-3, dpo_max_length=32),
    ]:
        config.validate()
    RewardTrainingConfig.for_profile("laptop", batch_size=4, max_length=32, learning_rate=1e-2, lora_last_layers=1,
                                     logging_steps=1, epochs=1, base_model=str(tmp_path))


# ============================================================================ the scripts: exit 2, nothing loaded


def fail_if_called(name):
    def loader(*args, **kwargs):
        raise AssertionError(f"{name} was called: the check must come before anything loads")
    return loader


@pytest.fixture
def nothing_loads(monkeypatch):
    """Every loader of both scripts fails the test if it is reached."""
    for module, name in [(train_reward.data, "preference_splits"), (train_reward, "load_tokenizer"),
                         (train_reward, "load_reward_base"), (train_reward, "train_and_evaluate"),
                         (train_reward, "cached_run"), (train_ppo, "load_policy"), (train_ppo, "load_reward"),
                         (train_ppo.sampling, "train_and_eval_queries"), (train_ppo.ppo, "train_ppo"),
                         (train_ppo.distributed, "make_accelerator"), (ppo, "load_policy_and_reference")]:
        monkeypatch.setattr(module, name, fail_if_called(name))


def usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m rlhf_course.train_")
    return error


REWARD_BAD = [["--train-size", "-5"], ["--epochs", "-1"], ["--epochs", "0"], ["--test-size", "0"],
              ["--batch-size", "0"], ["--max-length", "0"], ["--lora-r", "0"], ["--trainer", "bogus"],
              ["--learning-rate", "0"], ["--warmup-ratio", "1.5"], ["--checkpoint-every", "0"]]
PPO_BAD = [["--steps", "0"], ["--batch-size", "0"], ["--mini-batch-size", "0"], ["--kl-target", "0"],
           ["--top-k", "100000"], ["--temperature", "-1"], ["--top-p", "0"], ["--max-grad-norm", "0"],
           ["--n-eval", "0"], ["--checkpoint-every", "0"], ["--policy", "/no/such/policy"],
           ["--resume-from", "/no/such/checkpoint"]]


@pytest.mark.parametrize("argv", REWARD_BAD, ids=" ".join)
def test_train_reward_refuses_bad_settings_before_loading(argv, tmp_path, nothing_loads, capsys):
    flag = argv[0][2:].replace("-", "_")
    assert f"{flag}=" in usage_error(train_reward.main, [*argv, "--output-dir", str(tmp_path / "out")], capsys)


@pytest.mark.parametrize("argv", PPO_BAD, ids=" ".join)
def test_train_ppo_refuses_bad_settings_before_loading(argv, tmp_path, nothing_loads, capsys):
    flag = argv[0][2:].replace("-", "_")
    assert f"{flag}=" in usage_error(train_ppo.main, [*argv, "--output-dir", str(tmp_path / "out")], capsys)


def test_a_bad_setting_exits_2_in_a_fresh_process_and_writes_nothing(tmp_path):
    """The whole command, as a user runs it (before: no step trained, the untrained policy saved, exit 0)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "rlhf_course.train_ppo", "--steps", "0", "--output-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "steps=0 is not valid" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_the_scripts_own_rules_cover_every_option():
    for script_class in (train_reward.RewardScriptArgs, train_ppo.PPOScriptArgs):
        named = [name for names in script_class.field_checks for name in names.split()]
        assert sorted(named) == sorted(field_names(script_class))


def test_train_reward_without_output_dir_where_one_is_needed_is_a_usage_error(nothing_loads, capsys):
    assert "--output-dir is required" in usage_error(train_reward.main, ["--checkpoint-every", "2"], capsys)


def test_resume_from_latest_without_a_checkpoint_is_a_usage_error(tmp_path, nothing_loads, capsys):
    out = str(tmp_path / "out")
    assert "no complete checkpoint" in usage_error(train_ppo.main, ["--output-dir", out, "--resume-from", "latest"],
                                                   capsys)
    assert "no checkpoint-N folder" in usage_error(train_reward.main, ["--output-dir", out, "--resume-from",
                                                                       "latest"], capsys)


def test_an_unknown_rlhf_profile_is_a_usage_error_not_a_traceback(monkeypatch, tmp_path, nothing_loads, capsys):
    monkeypatch.setenv(ENV_VAR, "laptp")
    assert "RLHF_PROFILE='laptp'" in usage_error(train_ppo.main, ["--output-dir", str(tmp_path)], capsys)


# ============================================================================ the output folder


def unwritable_folders(tmp_path) -> list:
    """A folder below a file (cannot be created, even by root) and, when not root, a read-only folder."""
    below_a_file = tmp_path / "a-file"
    below_a_file.write_text("x")
    folders = [below_a_file / "out"]
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        read_only = tmp_path / "read-only"
        read_only.mkdir()
        read_only.chmod(0o500)
        folders += [read_only, read_only / "out"]
    return folders


def test_require_writable_folder_creates_the_folder_and_leaves_no_probe(tmp_path):
    folder = cli.require_writable_folder(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []
    for bad in unwritable_folders(tmp_path):
        with pytest.raises(OSError, match=f"--output-dir {bad} is not a folder this run can write to"):
            cli.require_writable_folder(bad)


@pytest.mark.parametrize("main", [train_reward.main, train_ppo.main], ids=["train_reward", "train_ppo"])
def test_an_unwritable_output_folder_fails_before_training(main, tmp_path, nothing_loads, capsys):
    for bad in unwritable_folders(tmp_path):
        error = usage_error(main, ["--output-dir", str(bad)], capsys)
        assert f"--output-dir {bad} is not a folder this run can write to" in error


def test_train_reward_checks_the_course_cache_when_it_saves_there(monkeypatch, tmp_path, nothing_loads, capsys):
    below_a_file = tmp_path / "a-file"
    below_a_file.write_text("x")
    monkeypatch.setenv("RLHF_COURSE_CACHE", str(below_a_file / "cache"))
    assert "RLHF_COURSE_CACHE" in usage_error(train_reward.main, [], capsys)


# ============================================================================ the device


def machine(monkeypatch, cuda: int = 0, mps: bool = False):
    """Pretend this machine has ``cuda`` GPUs and/or mps."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


def test_get_device_refuses_a_device_the_machine_lacks(monkeypatch):
    machine(monkeypatch)
    for value in ("cuda", "cuda:0", "mps", "gpu", "tpu"):
        monkeypatch.setenv("RLHF_DEVICE", value)
        with pytest.raises(ProfileError, match=f"RLHF_DEVICE='{value}' is not a device of this machine; "
                                               "available: cpu\\. Set RLHF_DEVICE"):
            profiles.get_device()
    with pytest.raises(ProfileError, match="prefer='cuda'"):
        profiles.get_device("cuda")
    for value in ("cpu", " CPU "):
        monkeypatch.setenv("RLHF_DEVICE", value)
        assert profiles.get_device() == torch.device("cpu")
    monkeypatch.delenv("RLHF_DEVICE")
    assert profiles.get_device() == torch.device("cpu")


def test_get_device_names_the_gpus_that_exist(monkeypatch):
    machine(monkeypatch, cuda=2, mps=True)
    assert profiles.available_devices() == ["cpu", "cuda", "cuda:0", "cuda:1", "mps"]
    monkeypatch.setenv("RLHF_DEVICE", "cuda:1")
    assert profiles.get_device() == torch.device("cuda:1")
    monkeypatch.setenv("RLHF_DEVICE", "cuda:2")
    with pytest.raises(ProfileError, match="available: cpu, cuda, cuda:0, cuda:1, mps"):
        profiles.get_device()
    monkeypatch.delenv("RLHF_DEVICE")
    assert profiles.get_device() == torch.device("cuda")


def test_train_ppo_uses_rlhf_device(monkeypatch, tmp_path, nothing_loads, capsys):
    machine(monkeypatch)
    monkeypatch.setenv("RLHF_DEVICE", "cuda")
    error = usage_error(train_ppo.main, ["--output-dir", str(tmp_path / "out")], capsys)
    assert "RLHF_DEVICE='cuda' is not a device of this machine; available: cpu" in error
    train_ppo.parse_ppo_args(["--output-dir", str(tmp_path / "out"), "--cpu"], checks=train_ppo.check_ppo_setup)

    import accelerate

    made = []
    monkeypatch.setattr(accelerate, "Accelerator", lambda cpu, **kwargs: made.append(cpu))
    machine(monkeypatch, cuda=1)
    monkeypatch.setenv("RLHF_DEVICE", " CPU")  # read as get_device reads it (before: only exactly "cpu")
    make_accelerator()
    monkeypatch.delenv("RLHF_DEVICE")
    make_accelerator()
    assert made == [True, False]



def test_train_reward_uses_rlhf_device(monkeypatch, tmp_path, nothing_loads, capsys):
    # Probe of issue 17 (stop 31): RLHF_DEVICE=cuda on a CPU machine trained on the CPU and exited 0, and
    # RLHF_DEVICE=cpu could not keep the Trainer off a GPU: train_reward never read it.
    machine(monkeypatch)
    monkeypatch.setenv("RLHF_DEVICE", "cuda")
    error = usage_error(train_reward.main, ["--output-dir", str(tmp_path / "out")], capsys)
    assert "RLHF_DEVICE='cuda' is not a device of this machine; available: cpu" in error
    machine(monkeypatch, cuda=2)
    monkeypatch.setenv("RLHF_DEVICE", "cuda:1")
    error = usage_error(train_reward.main, ["--output-dir", str(tmp_path / "out")], capsys)
    assert "CUDA_VISIBLE_DEVICES=1 RLHF_DEVICE=cuda" in error
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    config = RewardTrainingConfig.for_profile("laptop")
    monkeypatch.setenv("RLHF_DEVICE", " CPU")
    assert reward_training._common_args(config, tmp_path)["use_cpu"] is True
    monkeypatch.delenv("RLHF_DEVICE")
    assert reward_training._common_args(config, tmp_path)["use_cpu"] is False

# ============================================================================ HF_HUB_OFFLINE


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("On", True),
                                            ("0", False), ("false", False), ("False", False), ("no", False),
                                            ("off", False), ("", False), (None, False)])
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(value, offline, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.hub_offline() is offline
    assert constants._is_true(os.environ.get("HF_HUB_OFFLINE")) is offline  # the same reading as the hub's
    connected = []
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: connected.append(a) or Connection())
    assert hub.hub_reachable() is (not offline)
    assert len(connected) == (0 if offline else 1)


def test_transformers_offline_counts_when_hf_hub_offline_is_unset(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub.hub_offline()


class Connection:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ============================================================================ the training functions validate too


def test_the_training_functions_refuse_a_bad_config_before_touching_anything(tmp_path, nothing_loads):
    with pytest.raises(ValueError, match="steps=0"):
        real_train_ppo(PPOConfig(steps=0), None, None, None, None, [])
    with pytest.raises(ValueError, match="kl_target=0"):
        real_train_ppo(PPOConfig(kl_target=0.0), None, None, None, None, [])
    with pytest.raises(ValueError, match="epochs=-1"):
        reward_train_and_evaluate(RewardTrainingConfig(epochs=-1), tmp_path)
    with pytest.raises(ValueError, match="steps=0"):
        sft.train_sft_policy(tmp_path, SFTConfig(steps=0), progress=False)
    with pytest.raises(ValueError, match="warmup_steps=0"):
        sentiment.train_sentiment_classifier(tmp_path, ClassifierConfig(warmup_steps=0), progress=False)
    with pytest.raises(ValueError, match="dpo_steps=0"):
        beyond_ppo.train_dpo(None, None, None, BeyondPPOConfig(dpo_steps=0), tmp_path)
    assert list(tmp_path.iterdir()) == []



def test_reward_training_config_fields_match_the_lr_schedulers_of_transformers():
    from transformers import SchedulerType

    assert set(reward_training.LR_SCHEDULERS) <= {s.value for s in SchedulerType}


def test_configs_are_plain_dataclasses_still():
    for config_class in CONFIGS:
        assert "field_checks" not in {f.name for f in dataclasses.fields(config_class)}
