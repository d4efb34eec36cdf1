"""The Colab badges of every notebook and of README's table come from one setting, ``REPO``."""

import json
import shutil

import pytest

from rlhf_course.course import badges
from rlhf_course.course.notebook import REPO

NOTEBOOKS = badges.course_notebooks()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 10


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_badge_matches_repo(path):
    first = json.loads(path.read_text(encoding="utf-8"))["cells"][0]
    found = badges.BADGE_PATTERN.findall("".join(first["source"]))
    assert found == [badges.colab_badge(path.name)], (
        f"{path.name}: the first cell's badge is {found}, expected one pointing at {REPO}; "
        "run `python -m rlhf_course.course.badges`"
    )


def test_readme_table_matches_repo():
    text = badges.README.read_text(encoding="utf-8")
    assert badges.render_readme(text, NOTEBOOKS) == text, (
        "README's Colab table differs from REPO or from the notebooks; run `python -m rlhf_course.course.badges`"
    )
    for path in NOTEBOOKS:
        assert f"| {path.name[:2]} " in text and badges.colab_badge(path.name) in text


def test_nothing_is_stale():
    assert badges.stale_files() == {}


def test_a_fork_rewrites_only_the_badges_and_install_cells(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for path in NOTEBOOKS[:2]:
        shutil.copy(path, folder / path.name)
    extra = json.loads(NOTEBOOKS[0].read_text(encoding="utf-8"))
    extra["cells"][0]["source"] = ["# 99 · A new notebook\n", "\n", "Text."]
    (folder / "99_new.ipynb").write_text(json.dumps(extra, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(badges.README.read_text(encoding="utf-8"), encoding="utf-8")

    stale = badges.stale_files(folder, readme, repo="someone/fork")
    assert set(stale) == {*folder.iterdir(), readme}
    for path in NOTEBOOKS[:2]:
        old, new = path.read_text(encoding="utf-8"), stale[folder / path.name]
        assert new == (old.replace(f"github/{REPO}/blob", "github/someone/fork/blob")
                       .replace(f"github.com/{REPO}", "github.com/someone/fork")
                       .replace(f"githubusercontent.com/{REPO}/", "githubusercontent.com/someone/fork/"))
        assert "git+https://github.com/someone/fork" in new and REPO not in new
    new_cell = json.loads(stale[folder / "99_new.ipynb"])["cells"][0]["source"]
    assert new_cell == ["# 99 · A new notebook\n", "\n", badges.colab_badge("99_new.ipynb", "someone/fork") + "\n",
                        "\n", "Text."]
    table = stale[readme]
    assert "| 99 A new notebook | " in table and "| 02 " not in table  # one row per notebook in the folder
    assert table.count("github/someone/fork/blob/main/notebooks/") == 3


def test_a_notebook_without_a_colab_install_cell_is_refused():
    notebook = json.loads(NOTEBOOKS[0].read_text(encoding="utf-8"))
    notebook["cells"] = [cell for cell in notebook["cells"] if badges.COLAB_CHECK not in "".join(cell["source"])]
    with pytest.raises(ValueError, match="no Colab install cell"):
        badges.with_install_line(notebook, "00.ipynb")
