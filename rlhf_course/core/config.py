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

* Every field has a rule in the class's ``field_checks`` (``{"name other_name": Check}``, built
  from ``integer``, ``number``, ``one_of``, ...): ``validate()`` refuses a value that breaks its
  rule with one line naming the field, the value, what to use instead and the profiles' values; a
  class's own ``validate`` adds the relations between fields (``batch_size % mini_batch_size``).
  ``for_profile``, the scripts (before anything loads) and the training functions call it.

Constructing a config directly (``PPOConfig()``) gives the reference values, untouched and unchecked.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, ClassVar

from rlhf_course.core import smoke
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


# ----------------------------------------------------------------------------- rules for one field


@dataclasses.dataclass(frozen=True)
class Check:
    """A rule for one field: ``test(value)`` is True for a valid value; ``says`` what is valid."""

    test: Callable[[object], bool]
    says: str

    def or_none(self, meaning: str) -> "Check":
        """The same rule, or None (``meaning``: what None stands for, e.g. "all pairs")."""
        return Check(lambda value: value is None or self.test(value), f"{self.says}, or none ({meaning})")


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value, finite: bool = True) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
            and (math.isfinite(value) or not finite))


def integer(low: int | None = None, high: int | None = None, note: str = "") -> Check:
    """An integer (not a bool) in ``[low, high]`` (either end left open when None)."""
    says = ("an integer" + (f" in [{low}, {high}]" if low is not None and high is not None else
                            f" >= {low}" if low is not None else f" <= {high}" if high is not None else "")
            + (f" ({note})" if note else ""))
    return Check(lambda v: _is_integer(v) and (low is None or v >= low) and (high is None or v <= high), says)


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, finite: bool = True, note: str = "") -> Check:
    """A real number (int or float, not NaN, finite unless ``finite=False``) between ``low`` and ``high``;
    ``low_open``/``high_open`` exclude the end itself."""
    def test(v) -> bool:
        return (_is_number(v, finite) and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    if low is not None and high is not None:
        says = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        says = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        says = "a number" + (f" {'<' if high_open else '<='} {high:g}" if high is not None else "")
    return Check(test, says + (f" ({note})" if note else ""))


def one_of(choices, note: str = "") -> Check:
    choices = tuple(choices)
    return Check(lambda v: isinstance(v, str) and v in choices,
                 f"one of {', '.join(map(str, choices))}" + (f" ({note})" if note else ""))


def tuple_of(item: Check, what: str) -> Check:
    """A non-empty tuple (or list) whose every item passes ``item``."""
    return Check(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(item.test(x) for x in v),
                 f"one or more {what}, each {item.says}")


POSITIVE_INT = integer(1)          # sizes, steps, epochs: 0 would train on nothing
NON_NEGATIVE_INT = integer(0)
POSITIVE = number(0, low_open=True)  # learning rates, epsilons, temperatures of TRL
NON_NEGATIVE = number(0)           # coefficients where 0 switches a term off
FRACTION = number(0, 1)            # probabilities, discounts
SEED = integer(0, 2**32 - 1, note="NumPy's seed range")
FLAG = Check(lambda v: isinstance(v, bool), "True or False")
MAPPING = Check(lambda v: isinstance(v, dict), "a dict (JSON object on the command line)")


def check_fields(config) -> None:
    """Raise ``ValueError`` for the first field of ``config`` that breaks its rule in ``field_checks``."""
    for names, check in config.field_checks.items():
        for name in names.split():
            value = getattr(config, name)
            if not check.test(value):
                raise ValueError(f"{type(config).__name__}: {name}={value!r} is not valid; use {check.says}"
                                 f"{profile_values_text(type(config), name)}")


def profile_values_text(config_class, name: str) -> str:
    """``" (laptop: 55, full: 194)"``: the values the profiles give ``name`` (one when they agree)."""
    field = config_class.__dataclass_fields__[name]
    full = field.default_factory() if field.default is dataclasses.MISSING else field.default
    if not hasattr(config_class, "laptop_overrides"):  # a script's own options: one default
        return f" (default: {full!r})"
    laptop = config_class.laptop_overrides.get(name, full)
    return f" (laptop and full: {laptop!r})" if laptop == full else f" (laptop: {laptop!r}, full: {full!r})"


# ----------------------------------------------------------------------------- the mixin


class ProfileConfig:
    """Mixin of the course's config dataclasses: ``for_profile`` and ``validate``.

    A subclass sets ``laptop_overrides`` to its module's ``LAPTOP_OVERRIDES`` and ``field_checks`` to
    a rule for each of its fields (class variables, not fields: they add nothing to the dataclass's
    fields or repr).
    """

    laptop_overrides: ClassVar[dict] = {}
    field_checks: ClassVar[dict] = {}

    @classmethod
    def profile_values(cls, profile: Profile | str | None = None) -> dict:
        """The settings ``profile`` changes from the defaults (the reference values)."""
        profile = resolve_profile(profile)
        if profile.is_laptop:
            return dict(cls.laptop_overrides)
        return smoke.config_sizes(cls) if profile.smoke else {}

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
        """Raise ``ValueError``, one line, for a field that breaks its rule (``field_checks``); a subclass
        calls this first, then checks the relations between its fields."""
        check_fields(self)
