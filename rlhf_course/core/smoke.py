"""Smoke mode: every full-profile code path, at sizes a CPU runs in seconds.

``RLHF_PROFILE=full RLHF_SMOKE=1`` runs the full profile's notebooks and scripts top to bottom with
the sizes below, against whatever models the hub rule finds (``rlhf_course.core.hub``): in the
tests, tiny randomly initialised stand-ins of the seeds' models under their real hub ids
(``rlhf_course.course.standins``).  Nothing it prints is a result: figures are recorded but not
checked against ranges, and no results file is written.  What differs from a real full run is all
here, so a reader can see it at a glance:

* every config's full-profile values, overridden by ``CONFIG_SIZES[<config class>]``;
* every notebook size chosen with ``profile.pick(laptop, full)``: the laptop value.
"""

from __future__ import annotations

import os

SMOKE_VAR = "RLHF_SMOKE"
TRUE_VALUES = ("1", "ON", "YES", "TRUE")

CONFIG_SIZES: dict[str, dict] = {
    # reward models on Qwen2 / Bloom stand-ins (notebooks 04, 05, 09's DPO pairs)
    "RewardTrainingConfig": dict(train_size=16, test_size=8, max_length=48, batch_size=4,
                                 gradient_accumulation_steps=1, epochs=1.0, logging_steps=1, held_out_pairs=8,
                                 held_out_every=2),
    # PPO on the gpt2-imdb stand-in (notebooks 07, 08, 09)
    "PPOConfig": dict(steps=2, batch_size=8, mini_batch_size=4, forward_batch_size=8, ppo_epochs=1),
    # DPO / RLOO / GRPO (notebook 09)
    "BeyondPPOConfig": dict(dpo_steps=2, dpo_batch_size=4),
}


def smoke_mode() -> bool:
    """True when ``RLHF_SMOKE`` is 1, true, yes or on (any case)."""
    return os.environ.get(SMOKE_VAR, "").strip().upper() in TRUE_VALUES


def config_sizes(config_class: type) -> dict:
    """The smoke sizes of ``config_class`` (empty for a config that keeps its full-profile values)."""
    return dict(CONFIG_SIZES.get(config_class.__name__, {}))
