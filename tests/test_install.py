"""The install path: the package builds from a local clone and installs into a fresh virtualenv (as on Colab)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*command, **kwargs):
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_the_package_installs_from_a_local_clone_into_a_fresh_virtualenv(tmp_path):
    clone = tmp_path / "clone"
    run("git", "clone", "--quiet", ROOT, clone)  # committed files only, as pip sees a git+https URL
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", tmp_path / "wheels", clone)
    wheel, = (tmp_path / "wheels").glob("rlhf_course-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = sorted(str(p.relative_to(clone)) for p in (clone / "rlhf_course").rglob("*.py"))
    assert set(modules) <= set(names), set(modules) - set(names)
    assert not any(name.startswith(("tests/", "notebooks/")) for name in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    assert "Provides-Extra: gpu" in zipfile.ZipFile(wheel).read(metadata).decode()

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel)
    # the dependencies are this environment's (no downloads in tests): a .pth line puts them after the fresh install
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "course-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = run(python, "-c", "import rlhf_course, rlhf_course.core.hub, rlhf_course.course.standins, rlhf_course.rl.ppo; "
                            "print(rlhf_course.__file__)", cwd=tmp_path)
    assert out.strip().startswith(str(site)), out
