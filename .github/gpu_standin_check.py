"""GPU check of the full profile's code paths against stand-in hub models (issue 16): one prepared script.

Runs the two training scripts the notebooks call, in the full profile's smoke mode, on the stand-ins of
Qwen/Qwen2-0.5B, bigscience/bloom-560m, lvwerra/gpt2-imdb, lvwerra/distilbert-imdb and the data sets,
read from the Hugging Face cache offline; then the hub-rule tests.  Prints one JSON line per step.

    python -m rlhf_course.course.standins /tmp/standins 16    # prints the variables to export
    export ...; python .github/gpu_standin_check.py --with-tests

Run on an H200 (torch 2.11+cu130) on 2026-12-04: every step passed, bf16 chosen (closing note of issue 16).
"""
import json, os, subprocess, sys, time

import torch

steps = [
    ("hub rule: where each stand-in resolves", [sys.executable, "-c",
        "from rlhf_course.core import hub\n"
        "for i, t in [('lvwerra/gpt2-imdb','model'),('lvwerra/distilbert-imdb','model'),('Qwen/Qwen2-0.5B','model'),"
        "('bigscience/bloom-560m','model'),('Anthropic/hh-rlhf','dataset'),('dikw/hh_rlhf_cn','dataset'),('stanfordnlp/imdb','dataset')]:\n"
        "    print(i, '->', hub.resolve(i, t))\n"
        "from rlhf_course.core.profiles import precision_flags, half_dtype, get_device\n"
        "print('device', get_device(), 'precision', precision_flags(False), 'QLoRA compute dtype', half_dtype())"]),
    ("reward model, Qwen2 stand-in, TRL RewardTrainer, en (4-bit asked)", [sys.executable, "-m", "rlhf_course.train_reward",
        "--output_dir", "/tmp/rm-qwen2-en"]),
    ("reward model, Qwen2 stand-in, seed's pairwise Trainer, bilingual", [sys.executable, "-m", "rlhf_course.train_reward",
        "--output_dir", "/tmp/rm-qwen2-bi", "--language", "bilingual", "--trainer", "pairwise"]),
    ("reward model, Bloom stand-in (ColossalAI seed), zh", [sys.executable, "-m", "rlhf_course.train_reward",
        "--output_dir", "/tmp/rm-bloom-zh", "--language", "zh", "--base_model", "bloom-560m", "--no_load_in_4bit"]),
    ("PPO, gpt2-imdb stand-in + distilbert-imdb reward, IMDB prompts", [sys.executable, "-m", "rlhf_course.train_ppo",
        "--output_dir", "/tmp/ppo-gpt2-imdb", "--n_eval", "8"]),
]
if len(sys.argv) > 1 and sys.argv[1] == "--with-tests":
    steps.append(("tests/test_hub.py", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                                        "tests/test_hub.py"]))
print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}), flush=True)
failed = 0
for name, command in steps:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    tail = (result.stdout + result.stderr).strip().splitlines()[-12:]
    print(json.dumps({"step": name, "rc": result.returncode, "seconds": round(seconds, 1)}), flush=True)
    print("\n".join("    " + line[:220] for line in tail), flush=True)
    failed += result.returncode != 0
sys.exit(failed)
