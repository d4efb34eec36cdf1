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
