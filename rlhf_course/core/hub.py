"""Where a full-profile hub model or data set is read from: one rule, used by every loader.

The seeds' readers get their models three ways, and the course accepts all three, in this order:

1. **A local folder** made beforehand, as the PPO seed does (``huggingface-cli download
   lvwerra/gpt2-imdb --local-dir model/gpt2-imdb``, then ``from_pretrained("model/gpt2-imdb")``).
   ``RLHF_LOCAL_MODELS`` names the folder(s) that hold such copies (``os.pathsep``-separated); a copy
   is found as ``<folder>/<owner>/<name>`` or ``<folder>/<name>`` (``model/gpt2-imdb``).
2. **The Hugging Face cache** (``HF_HOME`` / ``HF_HUB_CACHE``), filled by ``hf download ID`` or an
   earlier run: read with ``local_files_only``, so it works under ``HF_HUB_OFFLINE=1``.
3. **The hub, or the mirror that ``HF_ENDPOINT`` names** (the seed sets ``HF_ENDPOINT`` to a mirror):
   the endpoint itself is asked whether it answers, not huggingface.co.

When none works, ``HubAssetError`` names the asset and gives the three ways with their commands.
``HF_ENDPOINT`` and ``HF_HOME`` are read by ``huggingface_hub`` when it is first imported: set them
before starting Python (or the notebook's kernel).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from rlhf_course.core.profiles import ProfileError

LOCAL_MODELS_VAR = "RLHF_LOCAL_MODELS"
DEFAULT_ENDPOINT = "https://huggingface.co"
TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # huggingface_hub's ENV_VARS_TRUE_VALUES, compared upper-cased
REPO_TYPES = ("model", "dataset")


class HubAssetError(ProfileError):
    """A hub model or data set was found in none of the three places; the message says how to get it."""


def hub_offline() -> bool:
    """True when offline mode is forced, read as huggingface_hub reads it: ``HF_HUB_OFFLINE`` (else
    ``TRANSFORMERS_OFFLINE``) is 1, true, yes or on, in any case; 0, false, no, off or unset is online."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in TRUE_VALUES


def hub_endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT`` (a mirror) or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when offline mode is not forced and the endpoint (``HF_ENDPOINT`` or the hub) accepts a connection."""
    if hub_offline():
        return False
    address = urlparse(hub_endpoint())
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        with socket.create_connection((address.hostname, port), timeout=timeout):
            return True
    except (OSError, RuntimeError):  # RuntimeError: the course's own network guard
        return False


def local_folder(hub_id: str) -> Path | None:
    """The pre-downloaded copy of ``hub_id`` under a folder of ``RLHF_LOCAL_MODELS``, if there is one."""
    owner_and_name = Path(*hub_id.split("/"))
    for root in filter(None, os.environ.get(LOCAL_MODELS_VAR, "").split(os.pathsep)):
        for candidate in (Path(root) / owner_and_name, Path(root) / owner_and_name.name):
            if candidate.is_dir() and any(candidate.iterdir()):
                return candidate
    return None


def cached_snapshot(hub_id: str, repo_type: str = "model") -> Path | None:
    """The Hugging Face cache's snapshot of ``hub_id`` (its ``main`` revision), without any network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, repo_type=repo_type, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def resolve(hub_id: str, repo_type: str = "model") -> str:
    """A folder (local copy, then the HF cache) or, when the endpoint answers, ``hub_id`` itself.

    Pass the result to ``from_pretrained`` or ``datasets.load_dataset``; it raises ``HubAssetError``
    with the three ways to get the asset when none of them has it.
    """
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type={repo_type!r}; use one of {REPO_TYPES}")
    found = local_folder(hub_id) or cached_snapshot(hub_id, repo_type)
    if found is not None:
        return str(found)
    if hub_reachable():
        return hub_id
    raise HubAssetError(missing_message(hub_id, repo_type))


def missing_message(hub_id: str, repo_type: str = "model") -> str:
    """What to do when ``hub_id`` is in no local folder, not in the HF cache, and the hub cannot be reached."""
    name = hub_id.split("/")[-1]
    type_flag = " --repo-type dataset" if repo_type == "dataset" else ""
    why = ("offline mode is on (HF_HUB_OFFLINE=1)" if hub_offline()
           else f"{hub_endpoint()} does not answer from here")
    return (
        f"The full profile needs the {repo_type} '{hub_id}': it is in no folder of {LOCAL_MODELS_VAR}, not in the "
        f"Hugging Face cache, and {why}. Three ways to provide it:\n"
        f"  1. download it into the cache on a machine with internet:  hf download {hub_id}{type_flag}\n"
        f"     (copy ~/.cache/huggingface over; HF_HUB_OFFLINE=1 then reads it from there)\n"
        f"  2. or into a folder of your own:  hf download {hub_id}{type_flag} --local-dir model/{name}\n"
        f"     then  export {LOCAL_MODELS_VAR}=$PWD/model\n"
        f"  3. or through a mirror:  export HF_ENDPOINT=https://your-mirror (before starting Python), "
        f"and unset HF_HUB_OFFLINE\n"
        f"Or run the offline course: export RLHF_PROFILE=laptop."
    )


def download(hub_id: str, repo_type: str = "model") -> Path:
    """A local folder holding ``hub_id``: the one ``resolve`` finds, or a snapshot fetched from the endpoint."""
    where = resolve(hub_id, repo_type)
    if where != hub_id:
        return Path(where)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(hub_id, repo_type=repo_type))


def load_hub_dataset(hub_id: str, **kwargs):
    """``datasets.load_dataset`` on the folder or id ``resolve`` gives (a folder: the files' own splits)."""
    from datasets import load_dataset

    return load_dataset(resolve(hub_id, "dataset"), **kwargs)
