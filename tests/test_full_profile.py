"""The full profile, executed: every numbered notebook top to bottom against stand-in hub models.

The full profile's models and data come from the Hugging Face hub, which CI cannot reach.  These
tests build tiny random stand-ins under the real hub ids in a temporary HF cache
(``rlhf_course.course.standins``) and run each notebook with ``RLHF_PROFILE=full RLHF_SMOKE=1``
(sizes in ``rlhf_course.core.smoke``).  Outputs are not compared: every cell must run.
"""

from __future__ import annotations

import pytest

from rlhf_course.course import standins
from rlhf_course.course.runner import NOTEBOOKS, notebook_paths

pytestmark = pytest.mark.full_profile


@pytest.fixture(scope="module")
def standin_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("standin-hub")
    standins.build_standins(home / "hub")
    standins.share_base_assets(home)
    return home


@pytest.mark.parametrize("notebook", notebook_paths(), ids=lambda path: path.stem[:2])
def test_notebook_runs_in_the_full_profile(notebook, standin_home, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for name, value in standins.standin_environment(standin_home).items():
        monkeypatch.setenv(name, value)  # the kernel inherits this process's environment
    executed = nbformat.read(notebook, as_version=4)
    NotebookClient(executed, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [output for cell in executed.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors


def test_notebooks_build_their_configs_through_for_profile():
    """A config built as ``Config(...)`` skips its profile's values: the laptop overrides and, in smoke
    mode, the smoke sizes (09 once ran its full DPO / RLOO / GRPO budgets on the stand-ins that way)."""
    import re

    import nbformat

    from rlhf_course.core.config import ProfileConfig
    from rlhf_course.policy import sentiment, sft, smollm2_sft  # noqa: F401  (register the subclasses)
    from rlhf_course.reward import training  # noqa: F401
    from rlhf_course.rl import beyond_ppo, ppo, tricks  # noqa: F401

    def subclasses(cls):
        return {sub for direct in cls.__subclasses__() for sub in {direct} | subclasses(direct)}

    names = sorted(cls.__name__ for cls in subclasses(ProfileConfig))
    assert "BeyondPPOConfig" in names and "PPOConfig" in names
    direct_call = re.compile(r"\b(" + "|".join(names) + r")\((?!\))")  # Config() alone: the reference defaults, shown
    found = {}
    for notebook in notebook_paths():
        cells = nbformat.read(notebook, as_version=4).cells
        calls = [match.group(0) for cell in cells if cell.cell_type == "code"
                 for match in direct_call.finditer(cell.source)]
        if calls:
            found[notebook.name] = calls
    assert not found, f"build these with Config.for_profile(session.profile, ...): {found}"
