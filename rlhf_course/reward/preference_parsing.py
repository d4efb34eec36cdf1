"""Parsing preference records: the hh-rlhf and hh_rlhf_cn schemas, checked record by record.

* **hh-rlhf** (Anthropic, Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF"):
  ``{"chosen": str, "rejected": str}``, each a whole transcript
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the two transcripts share every turn but the last
  assistant reply, and the shared prefix is the prompt (DeepSpeed-Chat step 2 and ColossalAI's Coati
  reward-model trainer read it this way).
* **hh_rlhf_cn** (the Chinese translation used by the Qwen2 LoRA reward-model seed):
  ``{"context": [{"role", "text"}, ...], "chosen": {"role", "text"}, "rejected": {"role", "text"}}``.

Both parse into one ``PreferencePair``.  Bad records raise ``PreferenceDataError`` naming the record
and field; ``load_preference_records`` counts what it kept and why it dropped the rest in a
``LoadReport`` (nothing silently).  ``reward.data`` builds data sets on top of this module.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

HUMAN_TAG = "\n\nHuman:"
ASSISTANT_TAG = "\n\nAssistant:"
ROLES = ("human", "assistant")
ROLE_ALIASES = {"human": "human", "user": "human", "assistant": "assistant", "bot": "assistant", "gpt": "assistant"}
SCHEMAS = ("hh-rlhf", "hh_rlhf_cn")


class PreferenceDataError(ValueError):
    """A preference record is malformed; says which record, which field, what is wrong, what to do."""

    def __init__(self, record, field_name: str, reason: str, hint: str = ""):
        self.record = record
        self.field = field_name
        self.reason = reason
        message = f"record {record}, field '{field_name}': {reason}"
        if hint:
            message += f". {hint}"
        super().__init__(message)


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: the dialogue so far, a preferred reply and a dispreferred one."""

    context: tuple[tuple[str, str], ...]  # ((role, text), ...), roles "human"/"assistant", ends with human
    chosen: str
    rejected: str
    language: str = "en"
    source: str = ""


# ----------------------------------------------------------------------------- hh-rlhf


_TURN_TAG = re.compile(re.escape(HUMAN_TAG) + "|" + re.escape(ASSISTANT_TAG))
_ROLE_OF_TAG = {HUMAN_TAG: "human", ASSISTANT_TAG: "assistant"}
# Something a human would read as a turn tag: any case, any line breaks or spaces before it, spaces before ':'.
_NEAR_TAG = re.compile(r"(?P<lead>[ \t\r\n]*)(?P<word>human|assistant)(?P<gap>[ \t]*):", re.IGNORECASE)
_TAG_HINT = ("hh-rlhf (Anthropic/hh-rlhf) separates turns with exactly '\\n\\nHuman:' and '\\n\\nAssistant:'; "
             "normalise the text first (e.g. text.replace('\\r\\n', '\\n')) or fix where it comes from")


def _near_tag_problems(match: re.Match) -> str:
    """What makes a ``_NEAR_TAG`` match differ from the real tag, in words."""
    lead, word, gap = match.group("lead"), match.group("word"), match.group("gap")
    problems = []
    if "\r" in lead:
        problems.append("Windows line endings (\\r\\n)")
    elif " " in lead or "\t" in lead:
        problems.append("spaces or tabs before it")
    elif lead not in ("", "\n\n"):
        problems.append(f"{len(lead)} newline{'s' if len(lead) != 1 else ''} before it, not 2")  # lead is all "\n"
    if word not in ("Human", "Assistant"):
        problems.append(f"'{word}' is not capitalised as '{word.capitalize()}'")
    if gap:
        problems.append("a space before the ':'")
    return "; ".join(problems)


def _start_variant(text: str) -> str | None:
    """A near miss of the opening ``'\\n\\nHuman:'`` (CRLF, one newline, lowercase ...), described; else None."""
    match = _NEAR_TAG.match(text)
    if match is None or match.group("word").lower() != "human":
        return None
    return f"transcript starts with {match.group()!r}, not '\\n\\nHuman:' ({_near_tag_problems(match)})"


def _assistant_variant(text: str) -> str | None:
    """The first near miss of ``'\\n\\nAssistant:'`` at a line start, as a hint; else None."""
    for match in _NEAR_TAG.finditer(text):
        if (match.group("word").lower() == "assistant" and ("\n" in match.group("lead") or "\r" in match.group("lead"))
                and not match.group().endswith(ASSISTANT_TAG)):
            return (f"found {match.group()!r} at character {match.start()}, which is not a turn tag "
                    f"({_near_tag_problems(match)}); {_TAG_HINT}")
    return None


def _check_unicode(text: str, record, field_name: str) -> None:
    """Refuse text that does not encode as UTF-8: a lone surrogate such as '\\ud800' (from a bad decode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PreferenceDataError(
            record, field_name, "not valid Unicode (a lone surrogate)",
            f"found {text[error.start]!r} at character {error.start}: such text cannot be written as UTF-8 "
            "(pyarrow, tokenizers and JSON writers fail on it later); fix how it was decoded or drop the record",
        ) from None


def _split_hh_transcript(text, record, field_name: str) -> list[tuple[str, str]]:
    if not isinstance(text, str):
        raise PreferenceDataError(record, field_name, f"expected a transcript string, got {type(text).__name__}")
    if not text.strip():
        raise PreferenceDataError(record, field_name, "empty text")
    if not text.startswith(HUMAN_TAG):
        # hh-rlhf transcripts start with "\n\nHuman:"; tolerate a missing leading blank line.
        if text.startswith(HUMAN_TAG.strip()):
            text = "\n\n" + text
        else:
            variant = _start_variant(text)
            if variant:
                raise PreferenceDataError(record, field_name, variant, _TAG_HINT)
            raise PreferenceDataError(record, field_name, "transcript does not start with 'Human:'",
                                      "hh-rlhf transcripts look like '\\n\\nHuman: ...\\n\\nAssistant: ...'")
    # One left-to-right scan for both tags (linear in the length, however many turns); a turn runs from the
    # end of its tag to the start of the next tag.
    tags = list(_TURN_TAG.finditer(text))
    ends = [tag.start() for tag in tags[1:]] + [len(text)]
    return [(_ROLE_OF_TAG[tag.group()], text[tag.end():end].strip()) for tag, end in zip(tags, ends)]


def parse_hh_transcript(text, record=0, field_name: str = "chosen") -> list[tuple[str, str]]:
    """Split a ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` transcript into (role, text) turns.

    Tags must be exactly ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"`` (Anthropic/hh-rlhf's form; a transcript may
    also open with ``"Human:"``).  Near misses (Windows line endings, one newline, lowercase ``human:``) are
    refused with a message that names what was found, and so is text that is not valid Unicode.
    """
    turns = _split_hh_transcript(text, record, field_name)
    _check_unicode(text, record, field_name)
    return turns


def parse_hh_record(record: dict, index=0, language: str = "en", source: str = "hh-rlhf") -> PreferencePair:
    """Parse one hh-rlhf record; the prompt is the shared dialogue up to the last assistant turn."""
    if not isinstance(record, dict):
        raise PreferenceDataError(index, "(record)", f"expected a dict, got {type(record).__name__}")
    sides = {}
    for name in ("chosen", "rejected"):
        if name not in record or record[name] is None:
            raise PreferenceDataError(index, name, "missing", "every hh-rlhf record needs 'chosen' and 'rejected'")
        turns = _split_hh_transcript(record[name], index, name)
        if turns[-1][0] != "assistant":
            raise PreferenceDataError(index, name, "transcript does not end with an 'Assistant:' turn",
                                      _assistant_variant(record[name]) or "")
        if not turns[-1][1]:
            raise PreferenceDataError(index, name, "empty text in the last assistant reply")
        if len(turns) < 2:
            raise PreferenceDataError(index, name, "no 'Human:' turn before the reply")
        sides[name] = turns
    if sides["chosen"][:-1] != sides["rejected"][:-1]:
        raise PreferenceDataError(index, "rejected", "its dialogue before the last reply differs from chosen's",
                                  "a pair must compare two replies to the same prompt")
    chosen, rejected = sides["chosen"][-1][1], sides["rejected"][-1][1]
    if chosen == rejected:
        raise PreferenceDataError(index, "rejected", "identical to chosen", "such a pair carries no preference")
    for name in ("chosen", "rejected"):  # last, so every other problem keeps its message
        _check_unicode(record[name], index, name)
    return PreferencePair(tuple(sides["chosen"][:-1]), chosen, rejected, language, source)


def hh_transcript(context, reply: str) -> str:
    """The inverse of ``parse_hh_transcript``: turns and a reply as one hh-rlhf transcript string."""
    tags = {"human": HUMAN_TAG, "assistant": ASSISTANT_TAG}
    return "".join(f"{tags[role]} {text}" for role, text in list(context) + [("assistant", reply)])


# ----------------------------------------------------------------------------- hh_rlhf_cn


def _message(value, index, field_name: str) -> tuple[str, str]:
    if not isinstance(value, dict):
        raise PreferenceDataError(index, field_name, f"expected a {{role, text}} dict, got {type(value).__name__}")
    for key in ("role", "text"):
        if key not in value or value[key] is None:
            raise PreferenceDataError(index, f"{field_name}.{key}", "missing")
        if not isinstance(value[key], str):
            raise PreferenceDataError(index, f"{field_name}.{key}",
                                      f"expected a string, got {type(value[key]).__name__}")
    role = ROLE_ALIASES.get(value["role"].strip().lower())
    if role is None:
        raise PreferenceDataError(index, f"{field_name}.role", f"unknown role {value['role']!r}",
                                  f"use one of {sorted(ROLE_ALIASES)}")
    text = value["text"].strip()
    if not text:
        raise PreferenceDataError(index, f"{field_name}.text", "empty text")
    return role, text


def parse_hh_cn_record(record: dict, index=0, language: str = "zh", source: str = "hh_rlhf_cn") -> PreferencePair:
    """Parse one hh_rlhf_cn record: ``context`` list of {role, text}, ``chosen``/``rejected`` {role, text}."""
    if not isinstance(record, dict):
        raise PreferenceDataError(index, "(record)", f"expected a dict, got {type(record).__name__}")
    if "context" not in record or record["context"] is None:
        raise PreferenceDataError(index, "context", "missing")
    if not isinstance(record["context"], (list, tuple)):
        raise PreferenceDataError(index, "context", f"expected a list of turns, got {type(record['context']).__name__}")
    if not record["context"]:
        raise PreferenceDataError(index, "context", "empty list", "the prompt needs at least one human turn")
    context = tuple(_message(turn, index, f"context[{i}]") for i, turn in enumerate(record["context"]))
    if context[-1][0] != "human":
        raise PreferenceDataError(index, f"context[{len(context) - 1}].role", "the last context turn is not human")
    replies = {}
    for name in ("chosen", "rejected"):
        if name not in record or record[name] is None:
            raise PreferenceDataError(index, name, "missing", "every hh_rlhf_cn record needs 'chosen' and 'rejected'")
        replies[name] = _message(record[name], index, name)[1]
    if replies["chosen"] == replies["rejected"]:
        raise PreferenceDataError(index, "rejected", "identical to chosen", "such a pair carries no preference")
    messages = [(f"context[{i}]", turn) for i, turn in enumerate(record["context"])]
    for name, message in messages + [("chosen", record["chosen"]), ("rejected", record["rejected"])]:
        for key in ("role", "text"):  # last, so every other problem keeps its message
            _check_unicode(message[key], index, f"{name}.{key}")
    return PreferencePair(context, replies["chosen"], replies["rejected"], language, source)


# ----------------------------------------------------------------------------- loading with a report


@dataclass
class LoadReport:
    """What a loader kept and why it dropped the rest (reason -> count, and the first record index)."""

    name: str
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    first_record: dict = field(default_factory=dict)

    def drop(self, error: PreferenceDataError) -> None:
        reason = f"{error.field}: {error.reason}"
        self.dropped[reason] += 1
        self.first_record.setdefault(reason, error.record)

    def __str__(self) -> str:
        text = f"{self.name}: kept {self.kept} of {self.total} records"
        if self.dropped:
            reasons = "; ".join(f"{n} x {reason} (first: record {self.first_record[reason]})"
                                for reason, n in self.dropped.most_common())
            text += f", dropped {sum(self.dropped.values())}: {reasons}"
        return text

    def as_frame(self) -> pd.DataFrame:
        rows = [{"reason": "kept", "records": self.kept}]
        rows += [{"reason": reason, "records": n} for reason, n in self.dropped.most_common()]
        return pd.DataFrame(rows)


def load_preference_records(records, schema: str = "hh-rlhf", language: str | None = None,
                            source: str | None = None, strict: bool = False,
                            name: str | None = None) -> tuple[list[PreferencePair], LoadReport]:
    """Parse many records; bad ones are counted by reason (or raise at once with ``strict=True``).

    ``records``: a list (or any iterable, e.g. a ``datasets.Dataset``) of record dicts, or a pandas
    DataFrame with one record per row.  A single record, ``None`` or a string raise ``TypeError``; if not
    one record parses (often the wrong ``schema``), ``ValueError`` with the reasons.
    """
    if schema not in SCHEMAS:
        raise ValueError(f"schema={schema!r} is not known; use one of {SCHEMAS}")
    expected = _EXPECTED_RECORD[schema]
    if isinstance(records, pd.DataFrame):
        records = records.to_dict("records")
    elif isinstance(records, dict):
        raise TypeError(f"records is a single dict (keys {sorted(map(str, records))}); pass a list of records, "
                        f"e.g. [record], each like {expected}")
    elif records is None or isinstance(records, (str, bytes)) or not hasattr(records, "__iter__"):
        raise TypeError(f"records is {'None' if records is None else 'of type ' + type(records).__name__}; pass a list "
                        f"of records (dicts), each like {expected}")
    parse = parse_hh_record if schema == "hh-rlhf" else parse_hh_cn_record
    language = language or ("en" if schema == "hh-rlhf" else "zh")
    report = LoadReport(name or schema)
    pairs = []
    first = None
    for index, record in enumerate(records):
        first = record if index == 0 else first
        report.total += 1
        try:
            pairs.append(parse(record, index, language=language, source=source or schema))
        except PreferenceDataError as error:
            if strict:
                raise
            report.drop(error)
    report.kept = len(pairs)
    if report.total and not pairs:
        guess = _guess_schema(first)
        advice = (f"they look like {guess!r} records: pass schema={guess!r}" if guess and guess != schema
                  else f"schema {schema!r} expects records like {expected}")
        raise ValueError(f"not one of the {report.total} records parsed as schema {schema!r} ({report}); {advice}")
    return pairs, report


_EXPECTED_RECORD = {
    "hh-rlhf": "{'chosen': '\\n\\nHuman: ...\\n\\nAssistant: ...', 'rejected': '...'}",
    "hh_rlhf_cn": "{'context': [{'role': 'human', 'text': ...}], 'chosen': {'role': 'assistant', 'text': ...}, "
                  "'rejected': {...}}",
}


def _guess_schema(record) -> str | None:
    if not isinstance(record, dict):
        return None
    if "context" in record or isinstance(record.get("chosen"), dict):
        return "hh_rlhf_cn"
    if isinstance(record.get("chosen"), str):
        return "hh-rlhf"
    return None
