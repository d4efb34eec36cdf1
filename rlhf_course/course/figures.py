"""Figures that cannot drift: every number a notebook states is computed, checked and recorded.

A notebook never writes a result into its prose by hand.  It calls ``figures.expect(name, value,
laptop=(lo, hi), full=(lo, hi))``: the figure is printed with the range a learner should expect in
the current profile, a value outside that range stops the notebook with an error naming figure,
value and range, and the figure is recorded in ``notebooks/results/<notebook>.json``::

    {"notebook", "profile", "machine", "versions", "figures": {name: {"value", "expected": [lo, hi]}}}

Ranges are what a learner on another machine can expect (seed and machine variation, not the last
bits of one run), set from measured runs.  Text that states a figure is rendered from the value
(``figures.say("... {accuracy:.2f} ...", accuracy=...)``), so prose and output cannot disagree.
nbval replays the notebooks with only the cells that do not depend on trained weights' last bits
marked ``# NBVAL_CHECK_OUTPUT``; model-dependent figures are checked here instead.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from rlhf_course.core.profiles import current_profile
from rlhf_course.core.smoke import smoke_mode
from rlhf_course.course.notebook import package_versions

RESULTS_ENV = "RLHF_COURSE_RESULTS"
REPOSITORY_RESULTS = Path(__file__).resolve().parents[2] / "notebooks" / "results"


class FigureOutOfRange(AssertionError):
    """A computed figure fell outside the range its notebook states for the profile."""


def results_dir() -> Path:
    """``$RLHF_COURSE_RESULTS``, else the repository's ``notebooks/results``, else ``./results``."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    return REPOSITORY_RESULTS if REPOSITORY_RESULTS.parent.is_dir() else Path.cwd() / "results"


def machine() -> str:
    """The machine in words: CPU model, core count, and the GPU if torch sees one."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}{gpu}"


def _check_range(name: str, expected) -> tuple[float, float] | None:
    if expected is None:
        return None
    low, high = expected
    if not low <= high:
        raise ValueError(f"figure {name!r}: expected range ({low}, {high}) has low > high")
    return float(low), float(high)


class Figures:
    """The figures of one notebook: ``expect`` checks and records, ``write`` saves the results file."""

    def __init__(self, notebook: str, profile=None, folder: Path | str | None = None):
        self.notebook = Path(notebook).stem
        profile = profile or current_profile()
        self.profile = str(profile)
        self.smoke = smoke_mode()  # a smoke run (stand-in models) records figures but checks and writes nothing
        self.path = Path(folder or results_dir()) / f"{self.notebook}.json"
        self.values: dict[str, dict] = {}

    def expect(self, name: str, value, laptop=None, full=None, digits: int = 3, quiet: bool = False):
        """Check ``value`` against this profile's range, record it, print one line; return ``value``.

        ``laptop`` / ``full`` are ``(low, high)``, inclusive.  A profile without a range records the
        value and says so; a NaN or a value outside the range raises ``FigureOutOfRange``.
        """
        expected = _check_range(name, laptop if self.profile == "laptop" else full)
        number = float(value)
        if self.smoke:
            self.values[name] = {"value": number, "expected": list(expected) if expected else None}
            if not quiet:
                print(f"{name} = {number:.{digits}g}  (smoke run: stand-in models, not checked)")
            return value
        shown = f"{number:.{digits}f}" if abs(number) < 1e5 else f"{number:.4g}"
        if math.isnan(number) or (expected is not None and not expected[0] <= number <= expected[1]):
            raise FigureOutOfRange(
                f"{self.notebook}: figure {name!r} = {shown} is outside its expected {self.profile}-profile range "
                f"[{expected[0]:g}, {expected[1]:g}]. Something changed in the data, the code or the settings: "
                "rerun the notebook from the top in a fresh kernel; if it persists, report it with the results file."
                if expected is not None else f"{self.notebook}: figure {name!r} is NaN")
        self.values[name] = {"value": number, "expected": list(expected) if expected else None}
        if not quiet:
            where = f"expected {expected[0]:g} to {expected[1]:g}" if expected else "no range for this profile"
            print(f"{name} = {shown}  ({where}, {self.profile} profile)")
        self.write()
        return value

    def __getitem__(self, name: str) -> float:
        return self.values[name]["value"]

    def write(self) -> Path:
        """Write ``notebooks/results/<notebook>.json`` (atomically) with every figure recorded so far."""
        record = {"notebook": self.notebook, "profile": self.profile, "machine": machine(),
                  "versions": package_versions(), "figures": self.values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
        os.replace(temporary, self.path)
        return self.path

    def say(self, template: str, **values) -> None:
        """Render ``template.format(**values)`` as Markdown: prose whose numbers were computed."""
        text = template.format(**values)
        try:
            from IPython.display import Markdown, display

            display(Markdown(text))
        except ImportError:
            print(text)


def read_results(notebook: str, folder: Path | str | None = None) -> dict:
    """The results file a notebook wrote (for notebook 00's overview and for tests)."""
    path = Path(folder or results_dir()) / f"{Path(notebook).stem}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run notebook {Path(notebook).stem} first.")
    return json.loads(path.read_text())
