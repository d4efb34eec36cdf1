"""Helper package for the RLHF course notebooks.

One module per concept: ``profiles`` (laptop/full switch, device, seeding), ``assets`` (the
offline model and data registry), ``losses``, ``readout``, ``token_loss``, ``data``,
``reward_training``, ``sentiment``, ``sft``, ``ppo``, ``bench``.  Notebooks import from here and
never define a function another notebook needs.
"""

from rlhf_course.core import netguard as _netguard

__version__ = "0.1.0"

_netguard.install_if_requested()
