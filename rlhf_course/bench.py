"""Benchmarks: measured figures, never pass/fail.  ``python -m rlhf_course.bench NAME``.

The benchmarks live in ``rlhf_course.course.benchmarks`` and the course runner; each is registered here by name.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "course": "rlhf_course.course.runner:benchmark_course",  # wall time of every notebook
    "token_loss": "rlhf_course.course.benchmarks:benchmark_token_loss",  # vectorised vs reference token loss
    "rollout": "rlhf_course.course.benchmarks:benchmark_rollout",  # batched vs one-query-at-a-time generation
    "ppo_step": "rlhf_course.course.benchmarks:benchmark_ppo_step",  # one PPO step at GPT-2-124M scale (GPU)
}


def run_benchmark(name: str, argv: list[str]) -> None:
    module, function = BENCHMARKS[name].split(":")
    getattr(importlib.import_module(module), function)(argv)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    args, rest = parser.parse_known_args(argv)
    names = [n for n in BENCHMARKS if n != "course"] if args.name == "all" else [args.name]
    for name in names:
        print(f"== {name} ==", flush=True)
        run_benchmark(name, rest)


if __name__ == "__main__":
    main()
