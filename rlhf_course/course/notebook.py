"""What every notebook's first code cell calls: seed, pick profile and device, print versions."""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass

import torch

from rlhf_course.core.profiles import Profile, current_profile, get_device, seed_everything

KEY_PACKAGES = ("torch", "transformers", "trl", "datasets", "peft", "accelerate", "matplotlib")
# GitHub owner/name that every "Open in Colab" badge opens (notebooks and README), the one place to
# change when forking: then run `python -m rlhf_course.course.badges` to rewrite the badges.
REPO = "rlhf-course/rlhf-course"


def package_versions(names=KEY_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass(frozen=True)
class Session:
    profile: Profile
    device: torch.device
    seed: int


def start(seed: int = 0, threads: int | None = None) -> Session:
    """Seed everything, choose the profile and device, and print one line of versions.

    Call it in the first code cell of every notebook so each runs alone in a fresh kernel.
    """
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    session = Session(profile=current_profile(), device=get_device(), seed=seed)
    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    print(f"profile={session.profile.label} device={session.device} seed={seed} | python {platform.python_version()}, {versions}")
    return session


def environment_check():
    """One row per requirement of the installed course: required spec, installed version, OK/FAIL."""
    import pandas as pd
    from packaging.requirements import Requirement

    rows = []
    for line in importlib.metadata.requires("rlhf-course") or []:
        requirement = Requirement(line)
        if requirement.marker is not None:
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        ok = installed is not None and requirement.specifier.contains(installed.split("+")[0], prereleases=True)
        rows.append({"package": requirement.name, "required": str(requirement.specifier),
                     "installed": installed or "missing", "status": "OK" if ok else "FAIL"})
    return pd.DataFrame(rows).set_index("package")
