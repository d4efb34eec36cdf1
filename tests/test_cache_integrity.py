"""The derived-asset cache (``cache_module.cached_build``): checksums, safe names, no silent deletions.

Every test builds toy assets in a temporary cache (``RLHF_COURSE_CACHE``), never the real one.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf_course.core import assets
from rlhf_course.core import cache as cache_module

WEIGHTS = "model.safetensors"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache_module.CACHE_ENV, str(folder))
    monkeypatch.delenv(cache_module.VERIFY_ENV, raising=False)
    return folder


class Builder:
    """A toy model build: a 256 KB safetensors file plus a small config, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, folder):
        self.calls += 1
        save_file({"weight": torch.ones(256, 256)}, str(folder / WEIGHTS))
        (folder / "config.json").write_text('{"hidden": 256}')
        (folder / "sub").mkdir()
        (folder / "sub" / "tokenizer.json").write_text("{}")


def overwrite_middle(path, size=4096):
    """The tester's probe: 4 KB of 0xFF bytes (float32 NaNs) written over the middle of a file."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(b"\xff" * size)


def forge_recorded_sha(folder, relative):
    """Damage that leaves every size and time as recorded (bit rot): only a full check sees it."""
    manifest = json.loads((folder / cache_module.MANIFEST).read_text())
    manifest["files"][relative]["sha256"] = "0" * 64
    (folder / cache_module.MANIFEST).write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- A: integrity


def test_manifest_is_written_in_the_temporary_folder_before_the_rename(cache, monkeypatch):
    renamed = []
    real_replace = os.replace

    def spy(source, target):
        if str(target).endswith("toy-v1"):
            renamed.append(((cache / os.path.basename(source) / cache_module.MANIFEST).exists(),
                            os.path.basename(source)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", spy)
    folder = cache_module.cached_build("toy", Builder())
    assert renamed and renamed[0][0] and renamed[0][1].startswith(".tmp-toy-v1-")
    manifest = json.loads((folder / cache_module.MANIFEST).read_text())
    assert manifest["asset"] == "toy" and manifest["version"] == "1"
    assert sorted(manifest["files"]) == ["config.json", WEIGHTS, "sub/tokenizer.json"]
    entry = manifest["files"][WEIGHTS]
    assert entry["size"] == (folder / WEIGHTS).stat().st_size
    assert entry["sha256"] == cache_module._sha256(folder / WEIGHTS)


def test_weights_overwritten_in_place_are_refused_not_loaded_as_nan(cache):
    build = Builder()
    folder = cache_module.cached_build("toy", build)
    overwrite_middle(folder / WEIGHTS)
    assert torch.isnan(load_file(str(folder / WEIGHTS))["weight"]).any()  # the probe: NaN weights
    with pytest.raises(cache_module.AssetError) as raised:
        cache_module.cached_build("toy", build)
    message = str(raised.value)
    assert "'toy'" in message and str(folder) in message and WEIGHTS in message
    assert f"rm -r '{folder}'" in message  # how to rebuild
    assert build.calls == 1  # refused, not silently rebuilt


def test_truncated_weights_name_the_asset_the_file_and_the_fix(cache):
    build = Builder()
    folder = cache_module.cached_build("toy", build)
    with open(folder / WEIGHTS, "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(cache_module.AssetError, match=rf"'toy'.*{WEIGHTS} has 1,000 bytes") as raised:
        cache_module.cached_build("toy", build)
    assert str(folder) in str(raised.value) and "rebuilt on first use" in str(raised.value)


def test_a_missing_file_is_refused(cache):
    folder = cache_module.cached_build("toy", Builder())
    (folder / "sub" / "tokenizer.json").unlink()
    with pytest.raises(cache_module.AssetError, match="sub/tokenizer.json is missing"):
        cache_module.cached_build("toy", Builder())


def test_full_sha256_check_on_request(cache, monkeypatch):
    build = Builder()
    folder = cache_module.cached_build("toy", build)
    forge_recorded_sha(folder, WEIGHTS)
    assert cache_module.cached_build("toy", build) == folder  # sizes and times match: the cheap check passes
    with pytest.raises(cache_module.AssetError, match=WEIGHTS):
        cache_module.cached_build("toy", build, verify=True)
    with pytest.raises(cache_module.AssetError, match=WEIGHTS):
        cache_module.verify_asset("toy")
    with pytest.raises(cache_module.AssetError, match=WEIGHTS):
        cache_module.verify_asset(folder)
    monkeypatch.setenv(cache_module.VERIFY_ENV, "1")
    with pytest.raises(cache_module.AssetError, match=WEIGHTS):
        cache_module.cached_build("toy", build)
    assert build.calls == 1


def test_verify_asset_passes_intact_copies_and_says_when_nothing_is_built(cache):
    folder = cache_module.cached_build("toy", Builder(), version="3")
    assert cache_module.verify_asset("toy") == [folder]
    assert cache_module.verify_asset("toy", version="3") == [folder]
    with pytest.raises(cache_module.AssetError, match="No built copy of 'other'"):
        cache_module.verify_asset("other")


def test_an_intact_load_hashes_nothing_and_a_touched_file_is_hashed_once(cache, monkeypatch):
    folder = cache_module.cached_build("toy", Builder())
    hashed = []
    real = cache_module._sha256
    monkeypatch.setattr(cache_module, "_sha256", lambda path: hashed.append(path.name) or real(path))
    cache_module.cached_build("toy", Builder())
    assert hashed == []  # the everyday load: one stat per file
    os.utime(folder / WEIGHTS)  # same bytes, new time (a copy, a touch)
    cache_module.cached_build("toy", Builder())
    assert hashed == [WEIGHTS]
    cache_module._HASHED.clear()
    cache_module.cached_build("toy", Builder())
    assert hashed == [WEIGHTS]  # the manifest recorded the new time


def test_unreadable_manifest_is_reported(cache):
    folder = cache_module.cached_build("toy", Builder())
    (folder / cache_module.MANIFEST).write_text("{not json")
    with pytest.raises(cache_module.AssetError, match="checksum list .* is unreadable"):
        cache_module.cached_build("toy", Builder())


def test_a_complete_folder_from_before_manifests_is_accepted_and_recorded(cache, capsys):
    build = Builder()
    folder = cache_module.cached_build("toy", build)
    (folder / cache_module.MANIFEST).unlink()  # as an older release left it: marker, no manifest
    capsys.readouterr()
    assert cache_module.cached_build("toy", build) == folder and build.calls == 1
    assert "Recorded the checksums" in capsys.readouterr().err
    manifest = json.loads((folder / cache_module.MANIFEST).read_text())
    assert WEIGHTS in manifest["files"] and "note" in manifest
    overwrite_middle(folder / WEIGHTS)  # from now on it is protected like a new build
    with pytest.raises(cache_module.AssetError, match=WEIGHTS):
        cache_module.cached_build("toy", build)


def test_rebuild_replaces_a_damaged_registered_asset(cache, monkeypatch):
    build = Builder()
    monkeypatch.setitem(assets.REGISTRY, "toy", assets.Asset(
        "toy", "derived", "laptop", "a test", "none", "1 MB", "toy", lambda: cache_module.cached_build("toy", build)))
    folder = cache_module.cached_build("toy", build)
    overwrite_middle(folder / WEIGHTS)
    with pytest.raises(cache_module.AssetError) as raised:
        cache_module.cached_build("toy", build)
    assert "assets.rebuild('toy')" in str(raised.value)
    assert assets.rebuild("toy") == folder and build.calls == 2
    assert cache_module.verify_asset("toy") == [folder]
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.setitem(assets.REGISTRY, "packaged", assets.Asset(
        "packaged", "tokenizer", "laptop", "a package", "none", "1 MB", "not cached", lambda: "loaded"))
    with pytest.raises(cache_module.AssetError, match="nothing to rebuild"):
        assets.rebuild("packaged")


def test_explain_load_errors_names_the_damaged_file(cache):
    folder = cache_module.cached_build("toy", Builder())
    with pytest.raises(ValueError, match="not the cache"):  # an intact folder: the real error stays
        with assets.explain_load_errors(folder):
            raise ValueError("not the cache")
    forge_recorded_sha(folder, WEIGHTS)
    with pytest.raises(cache_module.AssetError, match=WEIGHTS) as raised:
        with assets.explain_load_errors(folder):
            raise RuntimeError("header too large")  # what safetensors says about a damaged file
    assert isinstance(raised.value.__cause__, RuntimeError)


# ----------------------------------------------------------------------------- B: names, moves, temp folders


@pytest.mark.parametrize("name", ["", "../victim", "a/b", "..", "a\\b", ".hidden", "a..b", "/abs"])
def test_unsafe_asset_names_are_refused_before_touching_anything(cache, name):
    victim = cache.parent / "victim-v1"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")

    def broken(folder):
        raise RuntimeError("build failed")

    with pytest.raises(Exception) as raised:
        cache_module.cached_build(name, broken)
    assert (victim / "precious.txt").read_text() == "keep me"  # before: '../victim' deleted it
    assert isinstance(raised.value, ValueError)
    assert "not allowed" in str(raised.value) or "non-empty" in str(raised.value)


def test_unsafe_versions_are_refused(cache):
    with pytest.raises(ValueError, match="asset version"):
        cache_module.cached_build("toy", Builder(), version="1/../../x")


def test_existing_cache_folder_names_are_unchanged(cache):
    assert cache_module.asset_folder("smollm2-135m-instruct", "1") == cache / "smollm2-135m-instruct-v1"
    assert cache_module.asset_folder("reward-en-trl-smollm2-laptop", "2-0a1b2c3d").name == \
        "reward-en-trl-smollm2-laptop-v2-0a1b2c3d"
    assert cache_module.cached_build("sft-policy", Builder()) == cache / "sft-policy-v1"


def test_a_folder_without_the_marker_is_moved_aside_not_deleted(cache, capsys):
    hand_copy = cache / "toy-v1"
    hand_copy.mkdir(parents=True)
    (hand_copy / WEIGHTS).write_bytes(b"517 MB of copied weights")
    build = Builder()
    folder = cache_module.cached_build("toy", build)
    assert folder == hand_copy and build.calls == 1 and (folder / cache_module.COMPLETE_MARKER).exists()
    aside = [p for p in cache.iterdir() if p.name.startswith("toy-v1.incomplete-")]
    assert len(aside) == 1 and (aside[0] / WEIGHTS).read_bytes() == b"517 MB of copied weights"
    err = capsys.readouterr().err
    assert "Moved it aside" in err and str(aside[0]) in err and "nothing was deleted" in err


def _dead_pid():
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def test_temp_folder_of_a_killed_build_is_removed_when_the_asset_builds(cache, capsys):
    script = (
        "import os, signal\n"
        "from rlhf_course.core import cache\n"
        "def build(folder):\n"
        "    (folder / 'half.bin').write_bytes(b'x' * 100000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # the kernel dies mid-build\n"
        "cache.cached_build('toy', build)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True)
    assert killed.returncode == -9
    left = [p for p in cache.iterdir() if p.name.startswith(".tmp-toy-v1-")]
    assert len(left) == 1 and (left[0] / "half.bin").exists()
    folder = cache_module.cached_build("toy", Builder())
    assert not left[0].exists() and (folder / WEIGHTS).exists()
    assert "left by interrupted builds" in capsys.readouterr().err


def test_stale_temp_folders_are_removed_when_the_asset_loads(cache):
    cache_module.cached_build("toy", Builder())
    dead, alive = _dead_pid(), os.getppid()
    dead_tmp = cache / (cache_module._temp_prefix("toy", "1", pid=dead) + "abcd1234")
    live_tmp = cache / (cache_module._temp_prefix("toy", "1", pid=alive) + "abcd1234")
    own_tmp = cache / (cache_module._temp_prefix("toy", "1") + "abcd1234")
    old_style_fresh = cache / ".tmp-toy-v1-n3mnatjn"  # an older release's name: judged by age
    old_style_stale = cache / ".tmp-toy-v1-q8w2e4r6"
    other_asset = cache / (cache_module._temp_prefix("other", "1", pid=dead) + "abcd1234")
    for folder in (dead_tmp, live_tmp, own_tmp, old_style_fresh, old_style_stale, other_asset):
        folder.mkdir()
        (folder / "half.bin").write_bytes(b"x")
    long_ago = time.time() - cache_module.STALE_TEMP_SECONDS - 60
    os.utime(old_style_stale, (long_ago, long_ago))
    cache_module.cached_build("toy", Builder())  # a load: the asset is complete
    assert not dead_tmp.exists() and not old_style_stale.exists()
    assert live_tmp.exists() and own_tmp.exists() and old_style_fresh.exists()
    assert other_asset.exists()  # only this asset's folders are judged
