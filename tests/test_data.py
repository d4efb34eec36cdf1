"""Tests for rlhf_course.reward.data: both schemas' parsers, every bad-input case, loaders' counts."""

import pytest

from rlhf_course.core import assets
from rlhf_course.reward import data, preference_parsing
from rlhf_course.reward.preference_parsing import PreferenceDataError

HH_CHOSEN = ("\n\nHuman: What is a reward model?\n\nAssistant: A model that scores replies."
             "\n\nHuman: Why train one?\n\nAssistant: To turn human comparisons into a training signal.")
HH_REJECTED = ("\n\nHuman: What is a reward model?\n\nAssistant: A model that scores replies."
               "\n\nHuman: Why train one?\n\nAssistant: No idea.")

CN_RECORD = {
    "context": [{"role": "human", "text": "你好"}, {"role": "assistant", "text": "你好！有什么可以帮你？"},
                {"role": "human", "text": "推荐一本书"}],
    "chosen": {"role": "assistant", "text": "《三体》很好看。"},
    "rejected": {"role": "assistant", "text": "我不知道。"},
}


def test_parse_hh_record_splits_the_shared_prompt_from_the_two_replies():
    pair = preference_parsing.parse_hh_record({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert pair.context == (("human", "What is a reward model?"), ("assistant", "A model that scores replies."),
                            ("human", "Why train one?"))
    assert pair.chosen == "To turn human comparisons into a training signal."
    assert pair.rejected == "No idea."
    assert preference_parsing.hh_transcript(pair.context, pair.chosen) == HH_CHOSEN


def test_parse_hh_transcript_keeps_tags_inside_text_apart_from_turns():
    turns = preference_parsing.parse_hh_transcript("\n\nHuman: say 'Assistant' please\n\nAssistant: Assistant")
    assert turns == [("human", "say 'Assistant' please"), ("assistant", "Assistant")]


def test_parse_hh_cn_record_and_merge_with_templates():
    pair = preference_parsing.parse_hh_cn_record(CN_RECORD)
    assert pair.context[-1] == ("human", "推荐一本书") and pair.language == "zh"
    zh = data.TEMPLATES["qa_zh"]
    assert zh.render(pair.context, pair.chosen) == "问:你好\n\n答:你好！有什么可以帮你？\n\n问:推荐一本书\n\n答:《三体》很好看。"
    en = data.TEMPLATES["qa_en"]
    assert en.render((("human", "Hi?"),), "Hello.") == "Question: Hi?\n\nAnswer: Hello."
    assert en.prompt((("human", "Hi?"),)) + en.reply("Hello.") == en.render((("human", "Hi?"),), "Hello.")
    hh = data.TEMPLATES["hh"]
    assert "\n\n" + hh.render(pair.context, "x") == preference_parsing.hh_transcript(pair.context, "x")


HH_BAD = [
    ({"rejected": HH_REJECTED}, "chosen", "missing"),
    ({"chosen": HH_CHOSEN}, "rejected", "missing"),
    ({"chosen": 3, "rejected": HH_REJECTED}, "chosen", "expected a transcript string"),
    ({"chosen": HH_CHOSEN, "rejected": "   "}, "rejected", "empty text"),
    ({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, "rejected", "identical to chosen"),
    ({"chosen": "Hello there", "rejected": HH_REJECTED}, "chosen", "does not start with 'Human:'"),
    ({"chosen": "\n\nHuman: hi", "rejected": HH_REJECTED}, "chosen", "does not end with an 'Assistant:' turn"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": HH_REJECTED}, "chosen", "empty text"),
    ({"chosen": HH_CHOSEN, "rejected": "\n\nHuman: other\n\nAssistant: No idea."}, "rejected", "differs"),
    ("not a dict", "(record)", "expected a dict"),
    # Issue 17: near misses of the tags name what was found and what is expected ...
    ({"chosen": HH_CHOSEN.replace("\n", "\r\n"), "rejected": HH_REJECTED}, "chosen",
     "transcript starts with '\\r\\n\\r\\nHuman:', not '\\n\\nHuman:' (Windows line endings"),
    ({"chosen": HH_CHOSEN.replace("\n\n", "\n"), "rejected": HH_REJECTED}, "chosen",
     "transcript starts with '\\nHuman:', not '\\n\\nHuman:' (1 newline before it, not 2)"),
    ({"chosen": HH_CHOSEN.replace("Human:", "human:"), "rejected": HH_REJECTED}, "chosen",
     "not '\\n\\nHuman:' ('human' is not capitalised as 'Human')"),
    ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("\n\nAssistant: No", "\nAssistant: No")}, "rejected",
     "does not end with an 'Assistant:' turn. found '\\nAssistant:' at character"),
    # ... and text that is not valid Unicode is refused here, not later inside pyarrow with no record index.
    ({"chosen": HH_CHOSEN + "\ud800", "rejected": HH_REJECTED}, "chosen",
     f"not valid Unicode (a lone surrogate). found '\\ud800' at character {len(HH_CHOSEN)}"),
    ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("No idea.", "No\udfff idea.")}, "rejected",
     f"not valid Unicode (a lone surrogate). found '\\udfff' at character {HH_REJECTED.index('No idea.') + 2}"),
]


@pytest.mark.parametrize("record, field_name, reason", HH_BAD)
def test_bad_hh_records_name_the_record_and_field(record, field_name, reason):
    with pytest.raises(PreferenceDataError) as caught:
        preference_parsing.parse_hh_record(record, index=7)
    assert caught.value.record == 7 and caught.value.field == field_name
    assert reason in str(caught.value) and "record 7" in str(caught.value)


def _cn(**changes):
    record = {key: value for key, value in CN_RECORD.items()}
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    return record


CN_BAD = [
    (_cn(context=None), "context", "missing"),
    (_cn(context="你好"), "context", "expected a list"),
    (_cn(context=[]), "context", "empty list"),
    (_cn(context=[{"role": "human"}]), "context[0].text", "missing"),
    (_cn(context=[{"role": "human", "text": 5}]), "context[0].text", "expected a string"),
    (_cn(context=[{"role": "alien", "text": "hi"}]), "context[0].role", "unknown role"),
    (_cn(context=[{"role": "assistant", "text": "hi"}]), "context[0].role", "last context turn is not human"),
    (_cn(chosen=None), "chosen", "missing"),
    (_cn(rejected=None), "rejected", "missing"),
    (_cn(chosen="好"), "chosen", "expected a {role, text} dict"),
    (_cn(rejected={"role": "assistant", "text": " "}), "rejected.text", "empty text"),
    (_cn(rejected={"role": "assistant", "text": ["x"]}), "rejected.text", "expected a string"),
    (_cn(rejected={"role": "assistant", "text": "《三体》很好看。"}), "rejected", "identical to chosen"),
    (_cn(rejected={"role": "assistant", "text": "不\ud83d"}), "rejected.text", "not valid Unicode (a lone surrogate)"),
    (_cn(context=[{"role": "human", "text": "\ud800你好"}]), "context[0].text", "not valid Unicode (a lone surrogate)"),
]


@pytest.mark.parametrize("record, field_name, reason", CN_BAD)
def test_bad_hh_cn_records_name_the_record_and_field(record, field_name, reason):
    with pytest.raises(PreferenceDataError) as caught:
        preference_parsing.parse_hh_cn_record(record, index=3)
    assert caught.value.field == field_name and reason in caught.value.reason
    assert str(caught.value).startswith(f"record 3, field '{field_name}'")


def test_loader_counts_kept_and_dropped_records_by_reason():
    records = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"chosen": HH_CHOSEN},
               {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, {"chosen": HH_CHOSEN},
               {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]
    pairs, report = preference_parsing.load_preference_records(records, "hh-rlhf")
    assert len(pairs) == report.kept == 2 and report.total == 5
    assert report.dropped == {"rejected: missing": 2, "rejected: identical to chosen": 1}
    assert report.first_record["rejected: missing"] == 1
    text = str(report)
    assert "kept 2 of 5" in text and "2 x rejected: missing (first: record 1)" in text
    assert report.as_frame()["records"].sum() == 5
    with pytest.raises(PreferenceDataError, match="record 1, field 'rejected'"):
        preference_parsing.load_preference_records(records, "hh-rlhf", strict=True)


def test_cn_loader_counts_and_unknown_schema():
    pairs, report = preference_parsing.load_preference_records([CN_RECORD, _cn(context=[])], "hh_rlhf_cn")
    assert report.kept == 1 and report.dropped == {"context: empty list": 1}
    assert pairs[0].language == "zh"
    with pytest.raises(ValueError, match="schema"):
        preference_parsing.load_preference_records([], "alpaca")


def test_a_lone_surrogate_no_longer_reaches_pyarrow():
    records = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
               {"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("No idea.", "No \ud800idea.")}]
    pairs, report = preference_parsing.load_preference_records(records, "hh-rlhf")
    assert len(pairs) == 1 and report.first_record == {"rejected: not valid Unicode (a lone surrogate)": 1}
    data.PreferenceSplits(pairs, pairs, [report]).datasets()  # pyarrow accepts what is left


def test_problems_found_before_the_unicode_check_keep_their_messages():
    bad = {"chosen": HH_CHOSEN + "\ud800"}  # rejected missing: that is what is reported
    with pytest.raises(PreferenceDataError, match="field 'rejected': missing"):
        preference_parsing.parse_hh_record(bad)
    with pytest.raises(PreferenceDataError, match="does not start with 'Human:'"):
        preference_parsing.parse_hh_transcript("\ud800")


def _best_seconds(function, repeats: int = 3) -> float:
    import gc
    import time

    gc.disable()  # collections triggered by allocation would add noise unrelated to the parser
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return min(times)
    finally:
        gc.enable()


def test_parse_hh_transcript_takes_linear_time_in_the_number_of_turns():
    # Issue 17: every turn searched the rest of the text for both tags, so turns of one role in a row made the
    # parse quadratic (100k turns, 1 MB: 29 s).  Against a linear scan of the same text (split on blank lines),
    # the parser is ~10x slower; the quadratic version was ~3000x slower at this size.  A ratio of two timings
    # on one input, not a wall-clock limit (a 10k vs 100k turns ratio is not used: even str.split grows ~35x
    # there on a busy 2-core machine, from caches).
    turns = 50_000
    text = "".join(f"\n\nHuman: question {i}" for i in range(turns))
    parse_s = _best_seconds(lambda: preference_parsing.parse_hh_transcript(text))
    linear_s = _best_seconds(lambda: [part.strip() for part in text.split("\n\n")])
    assert parse_s < 100 * linear_s, f"parse {parse_s:.3f} s vs linear scan {linear_s:.4f} s"
    parsed = preference_parsing.parse_hh_transcript(text + "\n\nAssistant: a")
    assert len(parsed) == turns + 1 and parsed[-2] == ("human", f"question {turns - 1}") and parsed[-1] == ("assistant", "a")


def test_loader_refuses_what_is_not_a_list_of_records():
    record = {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}
    with pytest.raises(TypeError, match="records is None; pass a list of records"):
        preference_parsing.load_preference_records(None)
    with pytest.raises(TypeError, match=r"records is a single dict \(keys \['chosen', 'rejected'\]\); pass a list"):
        preference_parsing.load_preference_records(record)
    with pytest.raises(TypeError, match="records is of type str"):
        preference_parsing.load_preference_records(HH_CHOSEN)
    import pandas as pd

    pairs, report = preference_parsing.load_preference_records(pd.DataFrame([record, record]))  # one record per row
    assert report.kept == 2 and pairs[0] == preference_parsing.parse_hh_record(record)


def test_loader_raises_when_no_record_fits_the_schema():
    with pytest.raises(ValueError, match="they look like 'hh_rlhf_cn' records: pass schema='hh_rlhf_cn'"):
        preference_parsing.load_preference_records([CN_RECORD, CN_RECORD], "hh-rlhf")
    with pytest.raises(ValueError, match="not one of the 1 records parsed as schema 'hh_rlhf_cn'.*pass schema='hh-rlhf'"):
        preference_parsing.load_preference_records([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], "hh_rlhf_cn")
    with pytest.raises(ValueError, match="kept 0 of 2 records"):
        preference_parsing.load_preference_records([{"chosen": HH_CHOSEN}, {"chosen": HH_CHOSEN}], "hh-rlhf")
    assert preference_parsing.load_preference_records([], "hh-rlhf")[1].total == 0  # nothing given, nothing to complain about


def test_tokenize_pairs_drops_pairs_whose_difference_truncation_cuts_off():
    tokenizer = assets.gpt2_tokenizer()
    frame = data.pairs_to_frame([
        preference_parsing.PreferencePair((("human", "word " * 40),), "yes", "no"),  # difference beyond 16 tokens
        preference_parsing.PreferencePair((("human", "Hi?"),), "Hello there.", "Go away."),
    ])
    tokenized, report = data.tokenize_pairs(frame, tokenizer, max_length=16)
    assert report.kept == 1 and report.total == 2 and report.truncated == 1
    assert report.dropped == {"chosen/rejected: difference cut off by truncation": 1}
    row = tokenized[0]
    assert set(row) >= {"input_ids_j", "attention_mask_j", "input_ids_k", "attention_mask_k"}
    assert tokenizer.decode(row["input_ids_j"]) == "Question: Hi?\n\nAnswer: Hello there."
    with pytest.raises(PreferenceDataError, match="truncation"):
        data.tokenize_pairs(frame, tokenizer, max_length=16, strict=True)


def test_laptop_records_follow_the_schemas_and_splits_share_no_prompt():
    english = data.english_laptop_records(seed=0)
    chinese = data.chinese_laptop_records(seed=0)
    en_pairs, en_report = preference_parsing.load_preference_records(english, "hh-rlhf")
    zh_pairs, zh_report = preference_parsing.load_preference_records(chinese, "hh_rlhf_cn")
    assert en_report.kept == len(english) > 500 and not en_report.dropped
    assert zh_report.kept == len(chinese) > 500 and not zh_report.dropped
    assert {r["source"] for r in english} == {"chatterbot-en", "rotten-tomatoes"}
    splits = data.preference_splits("bilingual", train_size=40, test_size=20, verbose=False)
    assert len(splits.train) == 80 and len(splits.test) == 40
    dialogue_prompts = lambda pairs: {p.context for p in pairs if p.source.startswith("chatterbot")}  # noqa: E731
    assert not dialogue_prompts(splits.train) & dialogue_prompts(splits.test)
    frames = splits.datasets()
    assert frames["train"].column_names == ["prompt", "chosen", "rejected", "language", "source"]
    assert set(splits.summary()["language"]) == {"en", "zh"}
    with pytest.raises(ValueError, match="language"):
        data.preference_splits("fr")
