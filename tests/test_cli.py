"""The config convention (``rlhf_course.core.config``) and the scripts' generated command lines
(``rlhf_course.core.cli``): reference defaults, laptop overrides, ``for_profile``, every field a
flag with its help, and the profile applied before the flags."""

import dataclasses
import json
import zlib

import pytest

from rlhf_course import train_ppo, train_reward
from rlhf_course.core import cli
from rlhf_course.core.config import field_help
from rlhf_course.core.profiles import ENV_VAR, PROFILES, Profile
from rlhf_course.policy.sentiment import ClassifierConfig
from rlhf_course.policy.sft import SFTConfig
from rlhf_course.reward import training as reward_training
from rlhf_course.reward.training import RewardTrainingConfig
from rlhf_course.rl import beyond_ppo
from rlhf_course.rl.ppo import PPOConfig

CONFIGS = [RewardTrainingConfig, PPOConfig, beyond_ppo.BeyondPPOConfig, SFTConfig, ClassifierConfig]
SCRIPTS = [(train_reward.parse_reward_args, RewardTrainingConfig, []),
           (train_ppo.parse_ppo_args, PPOConfig, ["--output-dir", "out"])]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.fixture(autouse=True)
def _laptop_by_default(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


# ============================================================================ the convention


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_a_one_line_help(config_class):
    helps = field_help(config_class)
    assert set(helps) == {f.name for f in dataclasses.fields(config_class)}
    missing = [name for name, text in helps.items() if not text.strip()]
    assert not missing, f"{config_class.__name__} fields without a help: {missing}"
    assert all("\n" not in text for text in helps.values())


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_defaults_are_the_reference_and_laptop_overrides_name_real_fields(config_class):
    names = {f.name for f in dataclasses.fields(config_class)}
    assert set(config_class.laptop_overrides) <= names
    assert config_class.for_profile("full") == config_class()
    assert config_class.for_profile(Profile("laptop")) == config_class(**config_class.laptop_overrides)


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_an_unknown_profile_name_raises_naming_the_valid_profiles(config_class):
    with pytest.raises(ValueError, match="bogus") as error:
        config_class.for_profile("bogus")
    assert all(name in str(error.value) for name in PROFILES)
    with pytest.raises(ValueError, match="valid profiles"):
        config_class.for_profile(Profile("bogus"))


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_an_unknown_override_raises_naming_it(config_class):
    with pytest.raises(ValueError, match=f"unknown {config_class.__name__} settings: \\['no_such_setting'\\]"):
        config_class.for_profile("laptop", no_such_setting=1)


def test_for_profile_validates_and_reads_the_environment(monkeypatch):
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOConfig.for_profile("laptop", batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match="trainer"):
        RewardTrainingConfig.for_profile("laptop", trainer="bogus")
    with pytest.raises(ValueError, match="dpo_batch_size"):
        beyond_ppo.BeyondPPOConfig.for_profile(dpo_batch_size=0)
    monkeypatch.setenv(ENV_VAR, "full")
    assert PPOConfig.for_profile() == PPOConfig()
    assert RewardTrainingConfig.for_profile().profile == "full"


def test_laptop_values_are_the_ones_the_notebooks_and_caches_were_built_with():
    laptop = RewardTrainingConfig.for_profile("laptop", language="en", trainer="trl")
    assert (laptop.base_model, laptop.train_size, laptop.test_size, laptop.max_length, laptop.learning_rate,
            laptop.lora_last_layers, laptop.load_in_4bit, laptop.logging_steps) == ("smollm2", 256, 128, 96, 1e-3,
                                                                                    10, False, 4)
    # train_reward.cached_run keys its cache on this digest: a change here rebuilds notebooks 04, 05 and 09's model
    # (6953f479: the held_out_every / held_out_pairs fields were added; cached_run's version is 3)
    digest = f"{zlib.crc32(json.dumps(laptop.to_dict(), sort_keys=True).encode()):08x}"
    assert digest == "6953f479"
    full = RewardTrainingConfig.for_profile("full")
    assert (full.base_model, full.max_length, full.gradient_accumulation_steps, full.load_in_4bit) == (
        "qwen2-0.5b", 512, 4, True)
    assert reward_training.LAPTOP_OVERRIDES["profile"] == "laptop" and RewardTrainingConfig().profile == "full"
    ppo_laptop = PPOConfig.for_profile("laptop")
    assert (ppo_laptop.steps, ppo_laptop.batch_size, ppo_laptop.mini_batch_size, ppo_laptop.learning_rate,
            ppo_laptop.init_kl_coef) == (55, 64, 16, 5e-4, 0.05)


# ============================================================================ the command lines


@pytest.mark.parametrize("parse, config_class, required", SCRIPTS, ids=["train_reward", "train_ppo"])
def test_each_script_parser_exposes_every_config_field_with_its_help(parse, config_class, required, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    squeezed = "".join(text.split())  # argparse wraps the help lines, at spaces and hyphens
    for field in dataclasses.fields(config_class):
        assert flag(field.name) in text, f"{flag(field.name)} is not in --help"
        assert "".join(field.metadata["help"].split()) in squeezed, f"the help of {field.name} is not in --help"
        if field.type in (bool, "bool"):
            assert "--no-" + field.name.replace("_", "-") in text


@pytest.mark.parametrize("parse, config_class, required", SCRIPTS, ids=["train_reward", "train_ppo"])
def test_a_flag_overrides_the_profile_and_the_others_keep_the_profile_value(parse, config_class, required):
    _, config = parse(["--profile", "laptop", "--batch-size", "32", "--mini_batch_size", "8", *required]
                      if config_class is PPOConfig else ["--profile", "laptop", "--batch-size", "3", *required])
    expected = ({"batch_size": 32, "mini_batch_size": 8} if config_class is PPOConfig else {"batch_size": 3})
    assert config == config_class.for_profile("laptop", **expected)
    reference = config_class()
    kept = [name for name, value in config_class.laptop_overrides.items()
            if name not in expected and value != getattr(reference, name)]
    assert kept, "the test needs a laptop value that differs from the reference"
    for name in kept:  # unspecified flags: the laptop value, not the dataclass default
        assert getattr(config, name) == config_class.laptop_overrides[name] != getattr(reference, name)
    _, plain = parse(required)  # no --profile: $RLHF_PROFILE, unset here, so laptop
    assert plain == config_class.for_profile("laptop")
    _, full = parse(["--profile", "full", *required])
    assert full == config_class()


def test_reward_script_options_none_tuples_booleans_and_json(monkeypatch):
    args, config = train_reward.parse_reward_args([
        "--profile", "laptop", "--train-size", "none", "--lora-targets", "q_proj", "v_proj", "--load-in-4bit",
        "--extra", '{"note": "x"}', "--output-dir", "o", "--checkpoint-every", "5", "--resume-from", "latest"])
    assert config.train_size is None and config.test_size == 128
    assert config.lora_targets == ("q_proj", "v_proj") and config.load_in_4bit is True
    assert config.extra == {"note": "x"} and config.profile == "laptop"
    assert (args.output_dir, args.checkpoint_every, args.resume_from) == ("o", 5, "latest")
    monkeypatch.setenv(ENV_VAR, "full")
    _, full = train_reward.parse_reward_args(["--no-load-in-4bit"])
    assert full.profile == "full" and full.load_in_4bit is False and full.max_length == 512


def test_ppo_script_options_and_booleans():
    args, config = train_ppo.parse_ppo_args([
        "--profile", "laptop", "--output-dir", "o", "--reward", "length", "--n-eval", "8", "--cpu",
        "--force-max-length", "--no-adaptive-kl", "--max-grad-norm", "none", "--checkpoint-every", "2"])
    assert (args.profile, args.output_dir, args.reward, args.n_eval, args.cpu, args.checkpoint_every,
            args.resume_from, args.policy) == ("laptop", "o", "length", 8, True, 2, None, None)
    assert config.force_max_length is True and config.adaptive_kl is False and config.max_grad_norm is None
    assert config.steps == 55  # the laptop value


@pytest.mark.parametrize("argv", [["--profile", "bogus"], ["--batch-size", "10", "--mini-batch-size", "4"],
                                  ["--reward", "bogus"], ["--no-such-flag", "1"], []])
def test_ppo_script_rejects_bad_command_lines_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_ppo.parse_ppo_args(argv + (["--output-dir", "o"] if argv else []))
    assert exit_.value.code == 2 and "usage:" in capsys.readouterr().err


def test_the_parser_is_one_hf_argument_parser():
    from transformers import HfArgumentParser

    parser = cli.build_parser("prog", "description", train_ppo.PPOScriptArgs, PPOConfig)
    assert isinstance(parser, HfArgumentParser)
    spellings = {option for action in parser._actions for option in action.option_strings}
    assert {"--batch-size", "--batch_size", "--output-dir", "--output_dir", "--no-scale-rewards"} <= spellings


def test_train_ppo_with_the_smollm2_lora_policy_takes_its_recipe_unless_a_flag_says_otherwise(tmp_path):
    from rlhf_course.rl.lora_policy import SMOLLM2_PPO_OVERRIDES

    _, config = train_ppo.parse_ppo_args(["--output-dir", str(tmp_path), "--policy", "smollm2-lora", "--steps", "5"])
    config = train_ppo.with_lora_recipe(config, "laptop")
    assert config.steps == 5  # given on the command line
    assert config.learning_rate == SMOLLM2_PPO_OVERRIDES["learning_rate"]
    assert config.batch_size == SMOLLM2_PPO_OVERRIDES["batch_size"]
    # notebook 07's changes to the base recipe come with it, unless a flag says otherwise
    assert config.fake_eos and config.lr_schedule == "linear"
    _, config = train_ppo.parse_ppo_args(["--output-dir", str(tmp_path), "--policy", "smollm2-lora", "--init-kl-coef", "0.3"])
    assert train_ppo.with_lora_recipe(config, "laptop").init_kl_coef == 0.3
