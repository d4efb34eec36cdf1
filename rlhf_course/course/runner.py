"""Execute the course notebooks top to bottom and time each one.

``make course`` runs ``python -m rlhf_course.bench course --write``: every notebook is executed
in a fresh kernel, in reading order, and saved in place with its outputs, and the wall time of each
is printed and recorded in ``notebooks/results/course_timings.json`` (which notebook 00 displays).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: rlhf_course/course/runner.py -> .
NOTEBOOKS = ROOT / "notebooks"
TIMINGS = NOTEBOOKS / "results" / "course_timings.json"

# Rough full-profile (one GPU, hub models and data) run times in minutes: estimates written by
# hand from the seeds' reports, not measured here. The laptop column is measured (see TIMINGS).
FULL_PROFILE_ESTIMATE_MIN = {
    "00": 1, "01": 1, "02": 2, "03": 5, "04": 60, "05": 60, "06": 15, "07": 40, "08": 120, "09": 60,
}


def notebook_paths(pattern: str = "*.ipynb") -> list[Path]:
    return sorted(p for p in NOTEBOOKS.glob(pattern) if p.name[:2].isdigit())


def execute_notebook(path: Path, write: bool, timeout: int = 1800) -> float:
    """Run one notebook in a fresh kernel (cwd = notebooks/); return its wall time in seconds."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    if write:
        nbformat.write(notebook, path)
    return seconds


def cached_assets() -> set[str]:
    """Names of the complete derived assets in the course cache now (``cache.cache_dir``)."""
    from rlhf_course.core import cache

    return {p.name for p in cache.cache_dir().iterdir() if (p / cache.COMPLETE_MARKER).exists()}


def record_timings(seconds_by_notebook: dict[str, float], built_by_notebook: dict[str, list[str]]) -> None:
    """Write each notebook's wall time and the derived assets its run built (none: a cached run)."""
    timings = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    for name, seconds in seconds_by_notebook.items():
        timings[name] = {
            "laptop_seconds": round(seconds, 1),
            "built_assets": built_by_notebook.get(name, []),
            "measured": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        }
    TIMINGS.write_text(json.dumps(dict(sorted(timings.items())), indent=2) + "\n")


def benchmark_course(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_course.bench course")
    parser.add_argument("--write", action="store_true", help="save executed notebooks in place")
    parser.add_argument("--only", default="*", help="glob of notebooks to run, e.g. '0[1-3]*'")
    args = parser.parse_args(argv)
    os.environ.setdefault("RLHF_PROFILE", "laptop")
    paths = notebook_paths(args.only if args.only.endswith(".ipynb") else args.only + ".ipynb")
    if not paths:
        raise SystemExit(f"No notebooks match {args.only!r} in {NOTEBOOKS}")
    seconds_by_notebook, built_by_notebook = {}, {}
    for path in paths:
        print(f"running {path.name} ...", flush=True)
        before = cached_assets()
        seconds_by_notebook[path.name] = execute_notebook(path, write=args.write)
        built_by_notebook[path.name] = sorted(cached_assets() - before)
        built = ", built " + ", ".join(built_by_notebook[path.name]) if built_by_notebook[path.name] else ""
        print(f"  {path.name}: {seconds_by_notebook[path.name]:7.1f} s{built}", flush=True)
    total = sum(seconds_by_notebook.values())
    print(f"total: {total:.1f} s = {total / 60:.1f} min ({len(paths)} notebooks, profile "
          f"{os.environ['RLHF_PROFILE']}, {os.cpu_count()} CPU cores)")
    if args.write:
        record_timings(seconds_by_notebook, built_by_notebook)


def built_on_that_run(measured: dict) -> str:
    """The derived assets (trained models) a timed run built first, 'nothing (cached)', or
    'not recorded' for timings written before the runner kept this."""
    if "built_assets" not in measured:
        return "not recorded"
    return ", ".join(measured["built_assets"]) or "nothing (cached)"


def timings_table():
    """Measured laptop wall time of each notebook (from the last ``make course``), which derived
    assets that run had to build first, and the full-profile estimate, as a DataFrame for notebook 00."""
    import pandas as pd

    timings = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    names = sorted(set(timings) | {p.name for p in notebook_paths()})
    rows = []
    for name in names:
        measured = timings.get(name, {})
        seconds = measured.get("laptop_seconds")
        rows.append({
            "notebook": name,
            "laptop, measured (min)": round(seconds / 60, 1) if seconds is not None else None,
            "measured on": measured.get("measured"),
            "built on that run": built_on_that_run(measured),
            "full profile, GPU estimate (min)": FULL_PROFILE_ESTIMATE_MIN.get(name[:2]),
        })
    return pd.DataFrame(rows).set_index("notebook")
