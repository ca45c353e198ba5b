"""Records, the validating builder and the MESC / ESConv converters, on the real data in ../shared/data."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest

from multimood.data.corpora import convert_esconv, convert_mesc
from multimood.data.dataset_builder import MULTIMOOD_FEATURES, MultimoodDialogueBuilder, load_dialogues, main
from multimood.data.record_files import InvalidRecordError, iter_records, write_jsonl
from multimood.model.records import validate_record

MESC_EMOTIONS = {"anger", "sadness", "disgust", "depression", "neutral", "joy", "fear"}
MESC_STRATEGIES = {
    "open question",
    "approval",
    "self-disclosure",
    "restatement",
    "interpretation",
    "advisement",
    "communication skills",
    "structuring the therapy",
    "guiding the pace and depth of the conversation",
    "others",
}
ESCONV_STRATEGIES = {
    "Question",
    "Restatement or Paraphrasing",
    "Reflection of feelings",
    "Self-disclosure",
    "Affirmation and Reassurance",
    "Providing Suggestions",
    "Information",
    "Others",
}


@pytest.fixture(scope="module")
def records_file(shared_data: Path) -> Path:
    return shared_data / "records" / "mesc_val_records.jsonl"


@pytest.fixture(scope="module")
def seed_file(shared_data: Path) -> Path:
    return shared_data / "records" / "seed_form_example.json"


@pytest.fixture(scope="module")
def mesc(shared_data: Path) -> dict[str, Path]:
    folder = shared_data / "dialogues" / "mesc"
    names = {"csv": "MESC_without_test.csv", "val": "val.json", "ids": "val_dialogue_ids.json"}
    return {key: folder / name for key, name in names.items()}


@pytest.fixture(scope="module")
def mesc_val(mesc) -> list[dict]:
    return convert_mesc(mesc["csv"], mesc["val"], mesc["ids"], dialogue_subset="val")


@pytest.fixture
def good_record(records_file: Path) -> dict:
    with open(records_file, encoding="utf-8") as handle:
        return json.loads(handle.readline())


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------


def test_builder_on_published_records(records_file, tmp_path):
    builder = MultimoodDialogueBuilder(data_files={"validation": [str(records_file)]}, cache_dir=str(tmp_path))
    builder.download_and_prepare()
    dataset = builder.as_dataset()["validation"]

    assert dataset.num_rows == 445
    assert dataset.features == MULTIMOOD_FEATURES
    first = dataset[0]
    assert first["Dialogue_ID"] == "5"  # an int in the file
    assert first["Utterance"] == ["Kate said that?"]
    assert (first["Emotion"], first["Strategy"], first["get_emotion_user_most_recent"]) == (
        "neutral",
        "restatement",
        "anger",
    )
    assert len(first["utt_user_most_recent"]) == 17
    assert first["history_chat"][0] == {"role": "user", "content": "Kate and I,"}
    assert first["history_chat"][4] == {"role": "assistant", "content": "What do you mean you argue?"}
    assert first["history_chat_mamba"] == ""  # absent -> ""
    assert first["problem_type"] == "Breakups or Divorce"
    assert all(isinstance(path, str) for path in first["path_to_vid_user_most_recent"])
    assert builder.report["validation"].read == 445 and builder.report["validation"].skipped == 0


def test_seed_form_and_mixed_splits(records_file, seed_file, tmp_path):
    dataset, report = load_dialogues(
        {"train": records_file, "seed": [seed_file]}, cache_dir=tmp_path, return_report=True
    )
    assert {split: ds.num_rows for split, ds in dataset.items()} == {"train": 445, "seed": 3}
    assert (report["train"].read, report["seed"].read) == (445, 3)
    # The seed form (JSON array, history as prefixed strings) holds 3 of the 445 records: same content.
    by_key = {(r["Dialogue_ID"], tuple(r["Utterance"])): r for r in dataset["train"]}
    for seed in dataset["seed"]:
        assert seed == by_key[(seed["Dialogue_ID"], tuple(seed["Utterance"]))]
    assert dataset["seed"][0]["history_chat"][4] == {"role": "assistant", "content": "What do you mean you argue?"}


def test_history_strings_are_normalised():
    record = validate_record(
        {
            "Dialogue_ID": 3,
            "utt_user_most_recent": ["now"],
            "Utterance": ["ok"],
            "Emotion": None,
            "Strategy": "Question",
            "get_emotion_user_most_recent": "anxiety",
            "history_chat": ["hello", "hi there", "Therapist: and you?", "fine", {"role": "Client", "content": "x"}],
        }
    )
    assert record["history_chat"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "assistant", "content": "and you?"},
        {"role": "user", "content": "fine"},  # unprefixed: the other speaker than the message before
        {"role": "user", "content": "x"},
    ]
    assert record["Dialogue_ID"] == "3" and record["Emotion"] is None
    assert (record["path_to_vid_user_most_recent"], record["situation"], record["history_chat_mamba"]) == ([], "", "")


@pytest.mark.parametrize(
    "change, line, message",
    [
        ("broken", 2, r"line 2: malformed JSON"),
        ("missing", 2, r"line 2: missing required field 'Strategy'"),
        ("wrong_type", 2, r"line 2: field 'Utterance' must be a list of strings, got int"),
        ("string_utterance", 2, r"line 2: field 'Utterance' must be a list of strings, got str"),
        ("bad_item", 2, r"line 2: field 'utt_user_most_recent' must be a list of strings, item 1 is int"),
        ("bad_role", 2, r"line 2: field 'history_chat' message 0 must have role 'user' or 'assistant', got 'bot'"),
        ("float_id", 2, r"line 2: field 'Dialogue_ID' must be a string or an integer, got float"),
    ],
)
def test_invalid_jsonl_records(good_record, tmp_path, change, line, message):
    bad = dict(good_record)
    if change == "missing":
        del bad["Strategy"]
    elif change == "wrong_type":
        bad["Utterance"] = 7
    elif change == "string_utterance":
        bad["Utterance"] = "Kate said that?"
    elif change == "bad_item":
        bad["utt_user_most_recent"] = ["fine", 3]
    elif change == "bad_role":
        bad["history_chat"] = [{"role": "bot", "content": "hi"}]
    elif change == "float_id":
        bad["Dialogue_ID"] = 1.5
    bad_line = '{"Dialogue_ID": 1, "Utterance": [}' if change == "broken" else json.dumps(bad)
    path = _write_lines(tmp_path / "x.jsonl", [json.dumps(good_record), bad_line, json.dumps(good_record)])

    with pytest.raises(InvalidRecordError, match=re.escape(str(path)) + " " + message) as info:
        load_dialogues(path, cache_dir=tmp_path / "cache")
    assert f"line {line}" in str(info.value)


def test_invalid_json_array(good_record, tmp_path):
    path = tmp_path / "seed.json"
    path.write_text(json.dumps([good_record, {**good_record, "Emotion": 3}], indent=2), encoding="utf-8")
    message = r"line \d+ \(array index 1\): field 'Emotion' must be a string or null"
    with pytest.raises(InvalidRecordError, match=message):
        load_dialogues(path, cache_dir=tmp_path / "cache")

    path.write_text(json.dumps([good_record, good_record], indent=2)[:-10], encoding="utf-8")
    with pytest.raises(InvalidRecordError, match=r"seed.json line \d+: malformed JSON"):
        list(iter_records(path, skip_invalid=True))  # a broken array cannot be split into records


def test_skip_invalid_counts_and_report(good_record, tmp_path, caplog):
    valid = json.dumps(good_record)
    no_strategy = json.dumps({k: v for k, v in good_record.items() if k != "Strategy"})
    first = _write_lines(tmp_path / "a.jsonl", [valid, "{not json", valid, ""])
    second = _write_lines(tmp_path / "b.jsonl", [no_strategy, valid, json.dumps({**good_record, "Utterance": 5})])
    files = {"train": [first, second], "test": [second]}

    with caplog.at_level(logging.WARNING, logger="multimood.data"):
        dataset, report = load_dialogues(files, cache_dir=tmp_path / "cache", skip_invalid=True, return_report=True)
    assert dataset["train"].num_rows == 3 and dataset["test"].num_rows == 1
    assert (report["train"].read, report["train"].skipped, report["train"].kept) == (6, 3, 3)
    assert (report["test"].read, report["test"].skipped) == (3, 2)
    skipped = [r.getMessage() for r in caplog.records if "skipping invalid record" in r.getMessage()]
    assert len(skipped) == 5
    assert any("a.jsonl line 2: malformed JSON" in m for m in skipped)
    assert any("b.jsonl line 1: missing required field 'Strategy'" in m for m in skipped)
    assert any("train: 6 read, 3 skipped, 3 kept (2 files)" in r.getMessage() for r in caplog.records)

    # The report survives the cache; a split where everything is skipped is an empty split.
    _, again = load_dialogues(files, cache_dir=tmp_path / "cache", skip_invalid=True, return_report=True)
    assert again == report
    bad = _write_lines(tmp_path / "c.jsonl", [no_strategy])
    assert load_dialogues(bad, cache_dir=tmp_path / "cache", skip_invalid=True)["train"].num_rows == 0


def test_relative_paths_inference_records_and_cache_refresh(good_record, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    inference = {k: v for k, v in good_record.items() if k not in ("Utterance", "Emotion", "Strategy")}
    _write_lines(data / "infer.jsonl", [json.dumps(inference)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    files, cache = {"test": "infer.jsonl"}, tmp_path / "cache"
    with pytest.raises(InvalidRecordError, match="missing required field 'Utterance'"):
        load_dialogues(files, cache_dir=cache, base_dir=data)
    dataset = load_dialogues(files, cache_dir=cache, base_dir=data, require_targets=False)
    row = dataset["test"][0]
    assert row["Utterance"] is None and row["Strategy"] is None and row["get_emotion_user_most_recent"] == "anger"

    # Rewriting a file rebuilds the cached dataset.
    _write_lines(data / "infer.jsonl", [json.dumps(inference)] * 2)
    dataset = load_dialogues(files, cache_dir=cache, base_dir=data, require_targets=False)
    assert dataset["test"].num_rows == 2


# ----------------------------------------------------------------------------------------------
# MESC
# ----------------------------------------------------------------------------------------------


def test_convert_mesc_counts_and_labels(mesc, mesc_val):
    every = convert_mesc(mesc["csv"])
    train = convert_mesc(mesc["csv"], mesc["val"], mesc["ids"], dialogue_subset="train")
    assert (len(every), len(mesc_val), len(train)) == (4166, 445, 3721)
    assert len({r["Dialogue_ID"] for r in mesc_val}) == 102
    for record in every:
        assert record["Emotion"] in MESC_EMOTIONS and record["get_emotion_user_most_recent"] in MESC_EMOTIONS
        assert record["Strategy"] in MESC_STRATEGIES  # lower case, the CSV's "open question" rows included
        assert record["utt_user_most_recent"] and len(record["path_to_vid_user_most_recent"]) == len(
            record["utt_user_most_recent"]
        )
    assert Counter(r["Strategy"] for r in mesc_val) == {
        "open question": 172,
        "restatement": 78,
        "interpretation": 54,
        "approval": 39,
        "communication skills": 36,
        "self-disclosure": 33,
        "guiding the pace and depth of the conversation": 16,
        "advisement": 11,
        "structuring the therapy": 6,
    }
    assert all(r["situation"] and r["problem_type"] for r in mesc_val)
    assert not any(r["situation"] for r in train)


def test_convert_mesc_hand_checked(mesc, mesc_val):
    every = convert_mesc(mesc["csv"], clip_pattern="s{season:02d}e{episode:02d}_{dialogue_id}_{utterance_id}.mp4")
    # CSV rows 0-11 (dialogue 0, season 1 episode 1): C T C T C T C C C C C T.
    fourth = [r for r in every if r["Dialogue_ID"] == "0"][3]
    assert fourth == {
        "Dialogue_ID": "0",
        "Utterance": ["And it isn't?"],
        "Emotion": "neutral",
        "Strategy": "open question",
        "get_emotion_user_most_recent": "sadness",
        "path_to_vid_user_most_recent": [f"s01e01_0_{u}.mp4" for u in range(6, 11)],
        "utt_user_most_recent": [
            "You know what?",
            "It's disappointing.",
            "I thought I'd feel better,",
            "relieved.",
            "I thought it'd be a lot more fun.",
        ],
        "history_chat": [
            {"role": "user", "content": "I told you."},
            {"role": "assistant", "content": "Told me what?"},
            {"role": "user", "content": "That you'd be sorry you ever encouraged me to cry here."},
            {"role": "assistant", "content": "I'm not sorry at all."},
            {"role": "user", "content": "You didn't expect it to be like this, I bet."},
            {"role": "assistant", "content": "Like what?"},
        ],
        "history_chat_mamba": (
            "Client: I told you.\nTherapist: Told me what?\n"
            "Client: That you'd be sorry you ever encouraged me to cry here.\nTherapist: I'm not sorry at all.\n"
            "Client: You didn't expect it to be like this, I bet.\nTherapist: Like what?"
        ),
        "situation": "",
        "problem_type": "",
    }

    # Dialogue 25 (val.json dialogue 1), CSV rows 653-661: two client fragments (joy), then seven
    # therapist fragments, five "Interpretation" and two "Structuring the therapy": the first one wins.
    first = [r for r in mesc_val if r["Dialogue_ID"] == "25"][0]
    assert first["Utterance"] == [
        "Maybe I didn't make myself clear earlier on When I was talking about",
        "the customer always being wrong.",
        "What I meant was that sometimes",
        "the patient hides things from his therapist...",
        "From himself.",
        "And so part of our job is to uncover",
        "the things that we hide.",
    ]
    assert (first["Emotion"], first["Strategy"], first["get_emotion_user_most_recent"]) == (
        "neutral",
        "interpretation",
        "joy",
    )
    assert first["utt_user_most_recent"] == [
        "Don't you think you're exaggerating? I explained something simple...",
        "A dead man's erection. What's that gotta do with daniel?",
    ]
    assert first["path_to_vid_user_most_recent"] == ["dia25_utt0_653.mp4", "dia25_utt1_654.mp4"]  # published naming
    assert (first["history_chat"], first["history_chat_mamba"]) == ([], "")
    assert first["problem_type"] == "Bereavement"
    assert first["situation"].startswith("I was afraid of having a physical erection during cardiac arrest.")


_LEAK = " The emotion state of "  # val.json's machine-written visual description, left in some reference texts


def _clean(text: str) -> str:
    return text.split(_LEAK)[0]


def test_convert_mesc_agrees_with_reference_records(mesc, mesc_val, records_file):
    """The 445 ready-made records and ours agree on every field that does not depend on clip pairing.

    Known differences of the reference file: its Dialogue_ID is the val.json index (ours: the CSV id),
    its history keeps the last 14 messages (ours: all), and 48 records keep a machine-written visual
    description from val.json (" The emotion state of the speaker ...") appended to a fragment.
    """
    ids = json.loads(mesc["ids"].read_text())["val_json_dialogue_ids"]
    references = [json.loads(line) for line in records_file.read_text(encoding="utf-8").splitlines()]
    ours: dict[str, list[dict]] = {}
    for record in mesc_val:
        ours.setdefault(record["Dialogue_ID"], []).append(record)

    leaked = 0
    for reference in references:
        dialogue = str(ids[reference["Dialogue_ID"]])
        utterance = [_clean(t) for t in reference["Utterance"]]
        history = [{"role": m["role"], "content": _clean(m["content"])} for m in reference["history_chat"]]
        client = [_clean(t) for t in reference["utt_user_most_recent"]]
        matches = [
            r
            for r in ours[dialogue]
            if (r["Utterance"], r["utt_user_most_recent"], r["history_chat"][-14:]) == (utterance, client, history)
        ]
        assert len(matches) == 1, (dialogue, reference["Utterance"])
        match = matches[0]
        ours[dialogue].remove(match)
        for name in ("Emotion", "Strategy", "get_emotion_user_most_recent", "situation", "problem_type"):
            assert match[name] == reference[name], (dialogue, name)
        leaked += (utterance, client, history) != (
            reference["Utterance"],
            reference["utt_user_most_recent"],
            reference["history_chat"],
        )
    assert not any(ours.values())  # one to one
    assert leaked <= 48  # the reference file's known leaks; never more


# ----------------------------------------------------------------------------------------------
# ESConv
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split, count, dialogues", [("train", 10191, 910), ("valid", 2156, 195)])
def test_convert_esconv(shared_data, split, count, dialogues):
    path = shared_data / "dialogues" / "esconv" / f"{split}.jsonl"
    records = convert_esconv(path)
    assert len(records) == count and len({r["Dialogue_ID"] for r in records}) == dialogues
    assert {r["Strategy"] for r in records} == ESCONV_STRATEGIES
    emotions = {json.loads(line)["emotion_type"] for line in path.read_text(encoding="utf-8").splitlines()}
    assert {r["get_emotion_user_most_recent"] for r in records} == emotions
    assert all(r["Emotion"] is None and r["path_to_vid_user_most_recent"] == [] for r in records)


def test_convert_esconv_hand_checked_and_upstream_schema(shared_data, tmp_path):
    folder = shared_data / "dialogues" / "esconv"
    first = convert_esconv(folder / "valid.jsonl")[0]
    # valid.jsonl line 1: sys "Hi, what I can help you with today?" (opening: no record), usr "Hi",
    # usr "I had problems in the past and somehow right now", sys "What sort of problems ..."
    assert first == {
        "Dialogue_ID": "valid-0",
        "Utterance": ["What sort of problems were in your past and now?"],
        "Emotion": None,
        "Strategy": "Restatement or Paraphrasing",
        "get_emotion_user_most_recent": "depression",
        "path_to_vid_user_most_recent": [],
        "utt_user_most_recent": ["Hi", "I had problems in the past and somehow right now"],
        "history_chat": [{"role": "assistant", "content": "Hi, what I can help you with today?"}],
        "history_chat_mamba": "Therapist: Hi, what I can help you with today?",
        "situation": (
            "I used to love my field of study, But soon after entering the university I started skipping the "
            "classes and failing. I lost my interest and there was nothing to motivate me."
        ),
        "problem_type": "academic pressure",
    }
    failed = convert_esconv(folder / "FailedESConv.json", id_prefix="failed/")
    assert len(failed) == 1908 and failed[0]["Dialogue_ID"] == "failed/0"
    assert {r["Strategy"] for r in failed} == ESCONV_STRATEGIES  # "Questions", "Other", ... mapped

    # Null therapist emotions load through the builder.
    write_jsonl(failed[:20], tmp_path / "failed.jsonl")
    dataset = load_dialogues(tmp_path / "failed.jsonl", cache_dir=tmp_path / "cache")
    assert dataset["train"].num_rows == 20 and dataset["train"][0]["Emotion"] is None


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def test_cli(mesc, good_record, tmp_path, capsys):
    output = tmp_path / "val.jsonl"
    args = ["mesc", "--csv", str(mesc["csv"]), "--dialogues", str(mesc["val"]), "--dialogue-ids", str(mesc["ids"])]
    assert main([*args, "--dialogue-subset", "val", "--output", str(output)]) == 0
    assert "wrote 445 records of 102 dialogues" in capsys.readouterr().out
    assert len(output.read_text(encoding="utf-8").splitlines()) == 445

    bad = _write_lines(tmp_path / "bad.jsonl", [json.dumps(good_record), json.dumps({**good_record, "Utterance": 1})])
    assert main(["validate", f"validation={output}", str(bad)]) == 1
    printed = capsys.readouterr().out
    assert "validation: 445 read, 0 skipped, 445 kept (1 file)" in printed
    assert "train: 2 read, 1 skipped, 1 kept (1 file)" in printed
    assert main(["validate", str(output)]) == 0
