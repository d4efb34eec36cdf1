"""Shared test set-up: offline mode and a guard that fails any test opening a network connection."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib  # noqa: E402
import pytest  # noqa: E402

matplotlib.use("Agg")  # unit tests draw off-screen; notebook kernels keep their inline backend

from rlhf_course.core import netguard  # noqa: E402


@pytest.fixture(autouse=True)
def _no_network():
    """Every test runs with non-loopback connections refused (loopback stays open for kernels)."""
    was_installed = netguard.is_installed()
    netguard.install()
    yield
    if not was_installed:
        netguard.uninstall()
