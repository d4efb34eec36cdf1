"""Where the full profile reads hub models from: a local folder, the HF cache, the hub or a mirror (``core.hub``)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from huggingface_hub import constants

from rlhf_course.core import assets, hub
from rlhf_course.course import standins

GPT2_IMDB = "lvwerra/gpt2-imdb"


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty HF cache, offline, no local folders: the state of a fresh offline machine."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(hub.LOCAL_MODELS_VAR, raising=False)
    return tmp_path / "hub"


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (huggingface_hub reads HF_ENDPOINT and HF_HUB_CACHE at import)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RLHF_COURSE_NETWORK_GUARD": "1", **env})


def test_nothing_anywhere_says_the_three_ways_and_names_the_asset(empty_hf_cache):
    with pytest.raises(hub.HubAssetError) as caught:
        assets.load("gpt2-imdb")
    message = str(caught.value)
    assert GPT2_IMDB in message and "HF_HUB_OFFLINE=1" in message
    for way in (f"hf download {GPT2_IMDB}", "--local-dir model/gpt2-imdb", "HF_ENDPOINT=", hub.LOCAL_MODELS_VAR):
        assert way in message
    with pytest.raises(hub.HubAssetError, match="--repo-type dataset"):
        hub.resolve("Anthropic/hh-rlhf", "dataset")


@pytest.mark.parametrize("layout", ["model/gpt2-imdb", "model/lvwerra/gpt2-imdb"])
def test_a_pre_downloaded_folder_comes_first(layout, tmp_path, empty_hf_cache, monkeypatch):
    folder = tmp_path / layout
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv(hub.LOCAL_MODELS_VAR, os.pathsep.join([str(tmp_path / "elsewhere"), str(tmp_path / "model")]))
    assert hub.resolve(GPT2_IMDB) == str(folder)
    (folder / "config.json").unlink()  # an empty folder is no copy
    with pytest.raises(hub.HubAssetError):
        hub.resolve(GPT2_IMDB)


def test_the_hf_cache_is_read_offline_and_the_full_profile_loads_the_model(tmp_path):
    cache = tmp_path / "hub"
    standins.MODELS[GPT2_IMDB](standins.snapshot_folder(cache, GPT2_IMDB), width=32)
    result = run_python("from rlhf_course.core import assets, hub\n"
                        f"print(hub.resolve({GPT2_IMDB!r}))\n"
                        "print(type(assets.load('gpt2-imdb')).__name__)",
                        RLHF_PROFILE="full", HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    folder, model_class = result.stdout.split()[-2:]
    assert Path(folder).parent.parent == cache / "models--lvwerra--gpt2-imdb" and model_class == "GPT2Model"


class RecordingMirror(http.server.BaseHTTPRequestHandler):
    """A mirror on loopback that records every request and has nothing (404)."""

    paths: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's names)
        RecordingMirror.paths.append(self.path)
        self.send_error(404)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_hf_endpoint_sends_the_download_to_the_mirror(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingMirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_python("from rlhf_course.core import hub\n"
                            f"print('reachable', hub.hub_reachable()); print('resolved', hub.resolve({GPT2_IMDB!r}))\n"
                            "from transformers import AutoConfig\n"
                            f"AutoConfig.from_pretrained({GPT2_IMDB!r})",
                            HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_OFFLINE="0",
                            TRANSFORMERS_OFFLINE="0", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_ETAG_TIMEOUT="5")
    finally:
        server.shutdown()
    assert "reachable True" in result.stdout and f"resolved {GPT2_IMDB}" in result.stdout
    assert result.returncode != 0  # the mirror has nothing: the download fails there, not at huggingface.co
    assert any(GPT2_IMDB in path for path in RecordingMirror.paths), RecordingMirror.paths


def test_an_unanswering_endpoint_is_not_reachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert hub.hub_endpoint() == "http://127.0.0.1:9"
    assert not hub.hub_reachable(timeout=1.0)
    with pytest.raises(hub.HubAssetError, match="does not answer"):
        hub.resolve("nobody/nothing")
