"""Command lines generated from dataclasses: both training scripts parse their arguments with one call.

``parse_config(prog, description, script_class, config_class, argv)`` builds one
``transformers.HfArgumentParser`` from a script's own options (a small dataclass: output folder,
checkpoints, ...) and a config dataclass (``rlhf_course.core.config``), so every field is a flag,
spelled ``--batch-size`` or ``--batch_size``, with its field's help, and returns
``(script_args, config)``.

The profile is applied before the flags: ``config_class.for_profile(profile, **given)``, where
``given`` holds only the config flags present on the command line.  A flag overrides the profile's
value; a flag left out keeps the profile's value, not the dataclass default.  Config flags have no
argparse default (``argparse.SUPPRESS``), which is how the two cases are told apart; ``--help``
shows each one's laptop and full values instead.  ``none`` sets an optional field to None,
``--no-<flag>`` a boolean to False, and a tuple field takes several values.

Everything is checked before any model or data loads, and every problem is a usage error (exit 2)
with one line that says what is wrong: the config (``validate()``, ``rlhf_course.core.config``), the
script's own options (its ``validate()``), then the script's ``checks(script, config)`` on the
machine itself, such as ``require_writable_folder`` and the device (``RLHF_DEVICE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Callable

from rlhf_course.core.profiles import ENV_VAR, PROFILES, ProfileError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Script options show their defaults (except None, which says nothing); the description keeps
    its line breaks."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _none_or(kind):
    """``kind``, or None for the words none/null (an optional field set to None from the command line)."""
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names it in "invalid int value: 'x'"
    return parse


def _unpack(hint) -> tuple[object, bool]:
    """``(type without None, whether None is allowed)`` for a field's type hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def _is_tuple(hint) -> bool:
    return typing.get_origin(_unpack(hint)[0]) is tuple


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def build_parser(prog: str, description: str, script_class, config_class):
    """One ``HfArgumentParser`` for ``script_class``'s options and every ``config_class`` field."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((script_class, config_class), prog=prog, description=description,
                              formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(config_class)
    config_fields = {f.name: f for f in dataclasses.fields(config_class)}
    laptop = config_class.profile_values("laptop")
    negated = set()
    for action in parser._actions:
        if action.help:
            action.help = action.help.replace("%", "%%")  # argparse %-formats every help text
        if action.dest == "profile":
            action.choices, action.default = PROFILES, argparse.SUPPRESS
            action.help = (f"{action.help or 'the profile'}; default: ${ENV_VAR}, else laptop. The other "
                           "flags start from this profile's values")
            continue
        if action.dest not in config_fields:
            continue
        field = config_fields[action.dest]
        action.default = argparse.SUPPRESS  # absent from the namespace unless given: the profile's value stays
        if action.option_strings[0].startswith("--no_"):
            negated.add(field.name)
            action.help = f"set {field.name} to False"
            continue
        kind, optional = _unpack(hints[field.name])
        if _is_tuple(hints[field.name]):
            action.nargs, action.type = "+", typing.get_args(kind)[0]
        elif kind is dict:
            action.type = json.loads
        elif optional and kind in (int, float, str):
            action.type = _none_or(kind)
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        action.help = (f"{action.help} [laptop: {_shown(laptop.get(field.name, default))}; "
                       f"full: {_shown(default)}]")
    for name, hint in hints.items():  # --no-<flag> for every boolean, whatever its default
        if name in config_fields and _unpack(hint)[0] is bool and name not in negated:
            parser.add_argument(f"--no_{name}", f"--no-{name.replace('_', '-')}", action="store_false", dest=name,
                                default=argparse.SUPPRESS, help=f"set {name} to False")
    return parser


def require_writable_folder(folder, what: str = "--output-dir") -> Path:
    """Create ``folder`` and write and delete a probe file in it, so that a run whose results could
    not be saved fails before it trains, not after; ``OSError`` with one line naming ``what``."""
    folder = Path(folder)
    probe = folder / f".rlhf_course_write_probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OSError(f"{what} {folder} is not a folder this run can write to ({error.strerror or error}); "
                      f"pick one you can write to, or fix its permissions") from None
    return folder


def parse_config(prog: str, description: str, script_class, config_class, argv: list[str] | None = None,
                 checks: Callable[[object, object], None] | None = None):
    """``(script_class instance, config_class.for_profile(profile, **flags given))`` from ``argv``.

    The profile is the ``profile`` option of either dataclass (None: ``$RLHF_PROFILE``, else laptop).
    An invalid config (unknown profile, a value out of range, settings that do not fit together) or
    script option (``script.validate()``) exits with a usage error (exit 2).  ``checks(script,
    config)`` then checks the machine (output folder, device): a ``ValueError``, ``OSError`` or
    ``ProfileError`` it raises exits with code 2 and its one line.  Nothing has loaded yet.
    """
    parser = build_parser(prog, description, script_class, config_class)
    values = vars(parser.parse_args(argv))
    script = script_class(**{f.name: values[f.name] for f in dataclasses.fields(script_class) if f.name in values})
    hints = typing.get_type_hints(config_class)
    given = {f.name: values[f.name] for f in dataclasses.fields(config_class) if f.name in values}
    for name, value in given.items():
        if _is_tuple(hints[name]) and isinstance(value, list):
            given[name] = tuple(value)
    profile = given.pop("profile", getattr(script, "profile", None))
    try:
        config = config_class.for_profile(profile, **given)
        if hasattr(script, "validate"):
            script.validate()
    except (ValueError, ProfileError) as error:  # ProfileError: an unknown $RLHF_PROFILE
        parser.error(str(error))
    if checks is not None:
        try:
            checks(script, config)
        except (ValueError, OSError, ProfileError) as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
    return script, config
