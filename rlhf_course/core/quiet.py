"""Quiet model loading: one context manager for the noise transformers, datasets, PEFT and TRL print."""

from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def quiet_loading():
    """Load and wrap models without the noise: transformers' and datasets' progress bars, the
    transformers load report (terminal colour codes and the absolute cache path; ``load_reward_base``
    says what matters in one line), and the FutureWarning PEFT and TRL trigger by reading
    ``model.is_gradient_checkpointing`` (renamed ``is_activation_checkpointing`` in transformers 5.23).
    Everything is restored on exit."""
    import datasets
    from transformers.utils import logging as hf_logging

    verbosity, bars, data_bars = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                                  datasets.is_progress_bar_enabled())
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with without_checkpointing_rename_warning():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if data_bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def without_checkpointing_rename_warning():
    """Silence only the FutureWarnings of transformers 5.23's rename of gradient checkpointing to activation
    checkpointing that PEFT and TRL trigger: reading ``model.is_gradient_checkpointing`` while loading and
    training, and TRL's configs defaulting ``gradient_checkpointing=True``.  The course cannot act on them
    (its own configs use the new name); every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
