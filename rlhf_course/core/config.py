"""One convention for every config dataclass of the course (CleanRL's and TRL's).

* The dataclass holds every hyper-parameter, one field each, with its **reference values** as the
  defaults: the seed's / the full profile's.  Each field carries a one-line help,
  ``field(default=..., metadata={"help": "..."})``, which the scripts' ``--help`` shows
  (``rlhf_course.core.cli``).
* The laptop values are a module-level dict of overrides next to the class, ``LAPTOP_OVERRIDES``;
  a config with no reference values (laptop-only derived assets, notebook 09's runs) keeps its
  laptop values as the defaults, says so in its docstring, and has an empty dict.
* ``Config.for_profile(profile=None, **overrides)`` applies the profile's overrides, then yours,
  and validates: ``profile`` is a ``Profile``, a profile name or None (``$RLHF_PROFILE``, default
  laptop); an unknown profile name or an unknown setting raises ``ValueError`` naming the choices.

Constructing a config directly (``PPOConfig()``) gives the reference values, untouched.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from rlhf_course.core.profiles import PROFILES, Profile, current_profile


def resolve_profile(profile: Profile | str | None = None) -> Profile:
    """``profile`` as a ``Profile``: a name or ``Profile`` is checked, None reads ``$RLHF_PROFILE``."""
    if profile is None:
        return current_profile()
    name = profile.name if isinstance(profile, Profile) else profile
    if not isinstance(name, str) or name.strip().lower() not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    return Profile(name.strip().lower())


def field_names(config_class) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class)]


def field_help(config_class) -> dict[str, str]:
    """``{field name: its one-line help}`` (empty string where a field has none)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config_class)}


class ProfileConfig:
    """Mixin of the course's config dataclasses: ``for_profile`` and ``validate``.

    A subclass sets ``laptop_overrides`` to its module's ``LAPTOP_OVERRIDES`` (a class variable, not a
    field: it adds nothing to the dataclass's fields or repr).
    """

    laptop_overrides: ClassVar[dict] = {}

    @classmethod
    def profile_values(cls, profile: Profile | str | None = None) -> dict:
        """The settings ``profile`` changes from the defaults (the reference values)."""
        return {} if resolve_profile(profile).is_full else dict(cls.laptop_overrides)

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None, **overrides):
        """The defaults, then ``profile``'s overrides (laptop: ``LAPTOP_OVERRIDES``), then ``overrides``; validated."""
        values = cls.profile_values(profile)
        unknown = set(overrides) - set(field_names(cls))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} settings: {sorted(unknown)}; "
                             f"the settings are {field_names(cls)}")
        values.update(overrides)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot work together (nothing to check by default)."""
