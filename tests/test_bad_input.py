"""Bad input through the real entry points: one clear line (file, line or record, field), a non-zero exit and no
traceback; or a documented fallback. The catalogue is docs/errors.md.

Most command cases call `multimood.cli.main(argv)` in this process (the same code as the console command);
`test_commands_as_subprocesses` runs a representative subset as real processes (exit codes, stderr, `--debug`).
Records and clips are the real ones under ../shared/data; the model is a tiny random MultiMood saved to a folder.
The module only uses names that exist on the code before the error contract, so that its silent cases can be
run against that code (PYTHONPATH=<old checkout>) and seen to fail there.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import pipeline

from multimood import MultimoodForConditionalGeneration, cli
from multimood.apps import demo
from multimood.checkpoints.assembly import build_processor, fit_processor_to_model
from multimood.data.corpora import convert_esconv
from multimood.data.dataset_builder import load_dialogues
from multimood.model.pipeline_multimood import save_pipeline_files
from multimood.model.processing_multimood import MultimoodProcessor
from multimood.training.grpo import make_grpo_dataset
from tests.model_utils import TINY_NUM_FRAMES, tiny_config

REPO = Path(__file__).resolve().parents[1]
MEDIA = {"num_frames": TINY_NUM_FRAMES, "audio_num_windows": 2, "audio_max_seconds": 4.0, "num_k_vid": 2}
NOT_UTF8 = b'{"Dialogue_ID": 7, "utt_user_most_recent": ["caf\xe9"]}'


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys, caplog=None) -> tuple[int | str, str]:
    """(exit code, everything printed) of `multimood ARGV` in this process; an escaping exception is a
    traceback (code "traceback", its text included), as the console command would show it."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else f"SystemExit({stop.code})"
        extra = "" if isinstance(stop.code, int) else str(stop.code)
    except Exception:  # noqa: BLE001 - what the user would see
        code, extra = "traceback", "Traceback (most recent call last):\n" + traceback.format_exc()
    else:
        extra = ""
    out = capsys.readouterr()
    return code, out.out + out.err + extra + (caplog.text if caplog is not None else "")


def assert_error(code, text: str, *needles: str) -> str:
    """Exit code 1 or 2, no traceback, and one line holding every needle; returns that line."""
    assert code in (1, 2), f"exit code {code!r}:\n{text}"
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if all(needle in line for needle in needles)]
    assert lines, f"no line names {needles}:\n{text}"
    return lines[0]


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def real_records(shared_data) -> list[dict]:
    lines = (shared_data / "records" / "mesc_val_records.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:3]]


def text_only(record: dict, **changes) -> dict:
    out = {k: v for k, v in record.items() if k != "path_to_vid_user_most_recent"}
    out.update(changes)
    return out


@pytest.fixture(scope="module")
def processor(shared_data) -> MultimoodProcessor:
    return MultimoodProcessor.from_tokenizer(shared_data / "tokenizer" / "qwen2", k_turn_history=2)


@pytest.fixture(scope="module")
def model_folder(shared_data, tmp_path_factory) -> Path:
    """A tiny random MultiMood with its processor and the pipeline files, as `save_pretrained` writes them."""
    torch.manual_seed(0)
    config = tiny_config()
    model = MultimoodForConditionalGeneration(config).eval()
    processor = build_processor(shared_data / "tokenizer" / "qwen2", MEDIA, k_turn_history=2)
    fit_processor_to_model(processor, config)
    folder = tmp_path_factory.mktemp("bad_input") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_pipeline_files(folder)
    return folder


def damaged_copy(model_folder: Path, tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / f"model_{damage}"
    shutil.copytree(model_folder, folder)
    if damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "no_processor_config":
        (folder / "processor_config.json").unlink()
    elif damage == "truncated_weights":
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    return folder


# ----------------------------------------------------------------------------------------------
# The record validator through the processor (what training and the pipeline run on every batch)
# ----------------------------------------------------------------------------------------------

PROCESSOR_CASES = {
    # name: (changes to a real text-only record, field, text the message must hold)
    "emotion outside the label set": ({"Emotion": "ecstatic"}, "Emotion", "'ecstatic'"),
    "strategy outside the label set": ({"Strategy": "hypnosis"}, "Strategy", "'hypnosis'"),
    "client emotion outside the label set": (
        {"get_emotion_user_most_recent": "bored"}, "get_emotion_user_most_recent", "'bored'"
    ),
    "empty client utterance": ({"utt_user_most_recent": []}, "utt_user_most_recent", "must not be empty"),
    "blank client utterance": ({"utt_user_most_recent": ["   ", ""]}, "utt_user_most_recent", "must not be empty"),
    "blank response": ({"Utterance": [" "]}, "Utterance", "must not be empty"),
    "null therapist emotion": ({"Emotion": None}, "Emotion", "Emotion"),
    "empty strategy": ({"Strategy": ""}, "Strategy", "non-empty"),
    "float Dialogue_ID": ({"Dialogue_ID": 1.5}, "Dialogue_ID", "string or an integer"),
    "history role": ({"history_chat": [{"role": "bot", "content": "hi"}]}, "history_chat", "'bot'"),
    "clip name not a string": ({"path_to_vid_user_most_recent": [3]}, "path_to_vid_user_most_recent", "item 0"),
}


@pytest.mark.parametrize("case", sorted(PROCESSOR_CASES))
def test_processor_rejects_bad_records_naming_the_field(processor, real_records, case):
    changes, field, needle = PROCESSOR_CASES[case]
    good, bad = text_only(real_records[0]), text_only(real_records[1], **changes)
    with pytest.raises(ValueError) as info:
        processor(records=[good, bad], with_target=True)
    message = str(info.value)
    assert "record 1" in message and f"'{field}'" in message and needle in message, message
    assert getattr(info.value, "field", None) == field


def test_processor_label_set_is_configurable(processor, real_records):
    """The MESC record's strategy is no ESConv label: an ESConv processor rejects it, naming the label set."""
    esconv = MultimoodProcessor.from_tokenizer(processor.tokenizer, label_set="esconv")
    expected = r"record 0 \(Dialogue_ID=5\): field 'Strategy' is 'restatement', not one of the esconv"
    with pytest.raises(ValueError, match=expected):
        esconv(records=[text_only(real_records[0], Emotion="sadness", get_emotion_user_most_recent="anxiety")],
               with_target=True)


def test_label_spelling_is_normalised_by_the_documented_rule(processor, real_records):
    """`"Sadness "`, `"ANGER."`, `"Open  Question"`: case, spacing and a trailing full stop are ignored."""
    record = text_only(real_records[0], get_emotion_user_most_recent="Sadness ", Emotion="ANGER.",
                       Strategy="Open  Question")
    target = processor.format_target(processor.check_record(record, with_target=True))
    assert target.splitlines()[:3] == ["Client emotion: sadness", "Therapist emotion: anger", "Strategy: open question"]


# ----------------------------------------------------------------------------------------------
# multimood data validate / the dataset builder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, field, needle",
    [
        ("ecstatic", "Emotion", "'ecstatic'"),
        ("hypnosis", "Strategy", "'hypnosis'"),
        ("empty_utterance", "utt_user_most_recent", "must not be empty"),
        ("not_an_object", None, "expected a dict"),
    ],
)
def test_data_validate_rejects_what_training_rejects(real_records, tmp_path, capsys, caplog, case, field, needle):
    bad = {
        "ecstatic": dict(real_records[1], Emotion="ecstatic"),
        "hypnosis": dict(real_records[1], Strategy="hypnosis"),
        "empty_utterance": dict(real_records[1], utt_user_most_recent=[]),
        "not_an_object": [1, 2],
    }[case]
    path = write_lines(tmp_path / "records.jsonl", [json.dumps(real_records[0]), json.dumps(bad)])
    code, text = run_cli(["data", "validate", path], capsys, caplog)
    line = assert_error(code, text, str(path), "line 2", needle)
    if field:
        assert f"'{field}'" in line


def test_data_validate_normalises_label_spelling(real_records, tmp_path, capsys, caplog):
    record = dict(real_records[0], get_emotion_user_most_recent="Sadness ", Strategy="Restatement")
    path = write_lines(tmp_path / "records.jsonl", [json.dumps(record)])
    code, text = run_cli(["data", "validate", path], capsys, caplog)
    assert code == 0, text
    row = load_dialogues(path, cache_dir=tmp_path / "cache", label_set="mesc")["train"][0]
    assert (row["get_emotion_user_most_recent"], row["Strategy"]) == ("sadness", "restatement")


@pytest.mark.parametrize(
    "content, needles",
    [
        ([b"GOOD", NOT_UTF8], ["line 2", "not UTF-8", "0xe9"]),
        ([b"GOOD", b'{"Dialogue_ID": 1, "utt_user_most_recent": ['], ["line 2", "malformed JSON"]),
        ([], ["no records"]),
        ([b'[{"Dialogue_ID": 1,', b'  "Utterance": ['], ["line", "malformed JSON"]),
    ],
    ids=["not-utf8", "not-json", "empty", "broken-array"],
)
def test_data_validate_unreadable_files(real_records, tmp_path, capsys, caplog, content, needles):
    lines = [json.dumps(real_records[0]).encode() if line == b"GOOD" else line for line in content]
    path = write_lines(tmp_path / "records.jsonl", lines) if lines else tmp_path / "records.jsonl"
    if not lines:
        path.write_bytes(b"")
    code, text = run_cli(["data", "validate", path], capsys, caplog)
    assert_error(code, text, str(path), *needles)


def test_data_validate_missing_file_and_bad_label_set(tmp_path, capsys, caplog):
    code, text = run_cli(["data", "validate", tmp_path / "nope.jsonl"], capsys, caplog)
    assert_error(code, text, "nope.jsonl", "No such file")
    code, text = run_cli(["data", "validate", "--label-set", "bogus", tmp_path / "nope.jsonl"], capsys, caplog)
    assert_error(code, text, "--label-set", "bogus")


def test_training_data_errors_name_the_line_not_datasets(real_records, tmp_path):
    """The builder (training's loader) reports the file and line of undecodable bytes and of labels outside
    the label set, not `DatasetGenerationError`."""
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(real_records[0]).encode(), NOT_UTF8])
    with pytest.raises(ValueError, match=r"train.jsonl line 2: not UTF-8"):
        load_dialogues(path, cache_dir=tmp_path / "cache")
    path = write_lines(tmp_path / "labels.jsonl", [json.dumps(dict(real_records[0], Emotion="ecstatic"))])
    with pytest.raises(ValueError, match=r"labels.jsonl line 1: field 'Emotion' is 'ecstatic'"):
        load_dialogues(path, cache_dir=tmp_path / "cache", label_set="mesc")


# ----------------------------------------------------------------------------------------------
# multimood data mesc / esconv
# ----------------------------------------------------------------------------------------------

MESC_HEADER = ["Utterance", "Speaker", "Emotion", "Strategy", "Dialogue_ID", "Utterance_ID", "Season", "Episode",
               "StartTime", "EndTime"]


@pytest.fixture(scope="module")
def mesc_rows(shared_data) -> list[dict]:
    """The first real dialogue of the MESC CSV."""
    with open(shared_data / "dialogues" / "mesc" / "MESC_without_test.csv", encoding="utf-8-sig", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["Dialogue_ID"] == "0"]
    assert len(rows) > 4 and {r["Speaker"] for r in rows} == {"Client", "Therapist"}
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MESC_HEADER)
    writer.writeheader()
    writer.writerows({k: row[k] for k in MESC_HEADER} for row in rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "damage, needles",
    [
        ("ecstatic", ["line 4", "'Emotion'", "'ecstatic'"]),
        ("hypnosis", ["'Strategy'", "'Hypnosis'"]),
        ("no_speaker_column", ["missing column", "Speaker"]),
        ("dialogue_id", ["line 3", "integer"]),
        ("not_utf8", ["not UTF-8"]),
    ],
)
def test_data_mesc_rejects_bad_rows(mesc_rows, tmp_path, capsys, caplog, damage, needles):
    rows = [dict(row) for row in mesc_rows]
    path = tmp_path / "mesc.csv"
    if damage == "ecstatic":
        rows[2]["Emotion"] = "ecstatic"  # CSV line 4
    elif damage == "hypnosis":
        next(row for row in rows if row["Speaker"] == "Therapist")["Strategy"] = "Hypnosis"
    elif damage == "dialogue_id":
        rows[1]["Dialogue_ID"] = "zero"
    write_csv(path, rows)
    if damage == "no_speaker_column":
        path.write_text(path.read_text().replace("Speaker", "Who", 1))
    elif damage == "not_utf8":
        path.write_bytes(path.read_bytes().replace(b"a", b"\xe9", 1))
    output = tmp_path / "out.jsonl"
    code, text = run_cli(["data", "mesc", "--csv", path, "--output", output], capsys, caplog)
    assert_error(code, text, str(path), *needles)
    assert not output.exists()


def test_data_mesc_refuses_to_overwrite_its_input(mesc_rows, tmp_path, capsys, caplog):
    path = write_csv(tmp_path / "mesc.csv", mesc_rows)
    before = path.read_bytes()
    code, text = run_cli(["data", "mesc", "--csv", path, "--output", path], capsys, caplog)
    assert_error(code, text, "--output", str(path))
    assert path.read_bytes() == before


def test_data_mesc_bad_dialogue_ids_file(mesc_rows, tmp_path, capsys, caplog):
    path = write_csv(tmp_path / "mesc.csv", mesc_rows)
    ids = tmp_path / "ids.json"
    ids.write_text("[0, 1,")
    code, text = run_cli(["data", "mesc", "--csv", path, "--dialogue-ids", ids, "--dialogue-subset", "val",
                          "--output", tmp_path / "out.jsonl"], capsys, caplog)
    assert_error(code, text, str(ids), "malformed JSON")


@pytest.fixture(scope="module")
def esconv_dialogue(shared_data) -> dict:
    with open(shared_data / "dialogues" / "esconv" / "valid.jsonl", encoding="utf-8") as f:
        return json.loads(f.readline())


@pytest.mark.parametrize(
    "damage, needles",
    [
        ("no_strategy", ["line 2", "dialog turn", "no strategy"]),
        ("unknown_strategy", ["line 2", "dialog turn", "'Hypnosis'"]),
        ("unknown_emotion", ["line 2", "emotion_type", "'ecstatic'"]),
        ("not_json", ["line 2", "malformed JSON"]),
        ("bad_speaker", ["line 2", "dialog turn 0", "speaker"]),
    ],
)
def test_data_esconv_rejects_bad_dialogues(esconv_dialogue, tmp_path, capsys, caplog, damage, needles):
    """A supporter turn without a strategy used to be written as `"Strategy": null` with exit 0."""
    bad = json.loads(json.dumps(esconv_dialogue))
    supporter = next(i for i, turn in enumerate(bad["dialog"]) if turn["speaker"] == "sys" and i > 0)
    if damage == "no_strategy":
        bad["dialog"][supporter].pop("strategy")
    elif damage == "unknown_strategy":
        bad["dialog"][supporter]["strategy"] = "Hypnosis"
    elif damage == "unknown_emotion":
        bad["emotion_type"] = "ecstatic"
    elif damage == "bad_speaker":
        bad["dialog"][0]["speaker"] = "robot"
    second = "{not json" if damage == "not_json" else json.dumps(bad)
    path = write_lines(tmp_path / "esconv.jsonl", [json.dumps(esconv_dialogue), second])
    output = tmp_path / "out.jsonl"
    code, text = run_cli(["data", "esconv", "--input", path, "--output", output], capsys, caplog)
    assert_error(code, text, str(path), *needles)
    assert not output.exists()


def test_converted_esconv_records_validate_as_documented(esconv_dialogue, tmp_path, capsys, caplog):
    """What `data esconv` writes validates with its label set (no targets: ESConv has no therapist emotion), and
    is refused, naming the field, as MESC training data."""
    source = write_lines(tmp_path / "esconv.jsonl", [json.dumps(esconv_dialogue)])
    output = tmp_path / "records.jsonl"
    code, text = run_cli(["data", "esconv", "--input", source, "--output", output], capsys, caplog)
    assert code == 0, text
    assert all(r["Strategy"] for r in convert_esconv(source))
    code, text = run_cli(["data", "validate", "--no-targets", "--label-set", "esconv", output], capsys, caplog)
    assert code == 0, text
    code, text = run_cli(["data", "validate", output], capsys, caplog)
    assert_error(code, text, str(output), "line 1", "'Emotion'")


# ----------------------------------------------------------------------------------------------
# multimood predict
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def records_file(real_records, tmp_path) -> Path:
    return write_lines(tmp_path / "records.jsonl", [json.dumps(text_only(r)) for r in real_records])


def predict_args(model: Path | str, data: Path, output: Path, *extra) -> list:
    return ["predict", "--model", model, "--data", data, "--output", output, "--max_new_tokens", "4", "--quiet",
            "--device", "cpu", *extra]


def test_predict_refuses_to_overwrite_its_input(model_folder, records_file, capsys):
    before = records_file.read_bytes()
    for output in (records_file, records_file.parent / "." / records_file.name):
        code, text = run_cli(predict_args(model_folder, records_file, output), capsys)
        assert_error(code, text, "--output", "--data")
        assert records_file.read_bytes() == before


@pytest.mark.parametrize(
    "flag, value",
    [("--limit", "-1"), ("--limit", "0"), ("--batch_size", "0"), ("--max_new_tokens", "0"), ("--max_length", "-5"),
     ("--num_beams", "0"), ("--temperature", "0"), ("--top_p", "1.5")],
)
def test_predict_numeric_flags(model_folder, records_file, tmp_path, capsys, flag, value):
    """`--limit -1` used to drop the last record silently."""
    output = tmp_path / "preds.jsonl"
    code, text = run_cli(predict_args(model_folder, records_file, output, flag, value), capsys)
    assert_error(code, text, flag, value)
    assert not output.exists()


@pytest.mark.parametrize(
    "line, needles",
    [(NOT_UTF8, ["line 2", "not UTF-8"]), (b"{'single': 'quotes'}", ["line 2", "malformed JSON"]),
     (b'{"utt_user_most_recent": ["hi"]}', ["line 2", "'Dialogue_ID'"])],
    ids=["not-utf8", "not-json", "no-id"],
)
def test_predict_unreadable_records(model_folder, real_records, tmp_path, capsys, line, needles):
    data = write_lines(tmp_path / "records.jsonl", [json.dumps(text_only(real_records[0])).encode(), line])
    code, text = run_cli(predict_args(model_folder, data, tmp_path / "preds.jsonl"), capsys)
    assert_error(code, text, str(data), *needles)


def test_predict_skip_errors_skips_malformed_lines_and_lists_them(model_folder, real_records, tmp_path, capsys):
    data = write_lines(tmp_path / "records.jsonl", [json.dumps(text_only(real_records[0])).encode(), NOT_UTF8,
                                                    b"{broken", json.dumps(text_only(real_records[1])).encode()])
    output = tmp_path / "preds.jsonl"
    code, text = run_cli(predict_args(model_folder, data, output, "--skip_errors"), capsys)
    assert code == 0, text
    lines = [json.loads(x) for x in output.read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 3]  # positions in the file
    assert f"{data} line 2: not UTF-8" in text and f"{data} line 3: malformed JSON" in text
    assert "2 record(s) skipped" in text


def test_predict_reference_labels_outside_the_label_set(model_folder, real_records, tmp_path, capsys):
    """A gold label outside the model's label sets used to become a `reference` silently."""
    data = write_lines(tmp_path / "records.jsonl", [json.dumps(text_only(real_records[0], Emotion="ecstatic"))])
    output = tmp_path / "preds.jsonl"
    code, text = run_cli(predict_args(model_folder, data, output), capsys)
    assert_error(code, text, str(data), "line 1", "Dialogue_ID=5", "'Emotion'", "'ecstatic'")


@pytest.mark.parametrize(
    "damage, needles",
    [("no_config", ["config.json"]), ("no_processor_config", ["processor_config.json"]),
     ("truncated_weights", ["model.safetensors", "truncated"]), ("missing", ["no such model folder"]),
     ("file", ["is a file"])],
)
def test_predict_damaged_model_folder(model_folder, records_file, tmp_path, capsys, damage, needles):
    if damage == "missing":
        model = tmp_path / "no" / "such" / "model"
    elif damage == "file":
        model = records_file
    else:
        model = damaged_copy(model_folder, tmp_path, damage)
    code, text = run_cli(predict_args(model, records_file, tmp_path / "preds.jsonl"), capsys)
    line = assert_error(code, text, str(model), *needles)
    assert "repo id" not in line.lower() or damage != "missing"


def test_predict_missing_data_and_video_folder(model_folder, records_file, tmp_path, capsys):
    code, text = run_cli(predict_args(model_folder, tmp_path / "none.jsonl", tmp_path / "p.jsonl"), capsys)
    assert_error(code, text, "--data", "none.jsonl", "no such file")
    code, text = run_cli(predict_args(model_folder, records_file, tmp_path / "p.jsonl", "--video_folder",
                                      tmp_path / "clips"), capsys)
    assert_error(code, text, "--video_folder", "no such folder")


def test_pipeline_rejects_a_record_without_client_words(model_folder, real_records):
    pipe = pipeline("emotional-support", model=str(model_folder), trust_remote_code=True, device="cpu")
    with pytest.raises(ValueError, match=r"Dialogue_ID=5.*'utt_user_most_recent' must not be empty"):
        pipe(text_only(real_records[0], utt_user_most_recent=[""]), max_new_tokens=2)


def test_demo_functions_refuse_bad_input(model_folder, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"processor_config.json"):
        demo.load_model(damaged_copy(model_folder, tmp_path, "no_processor_config"), device="cpu")
    with pytest.raises(ValueError, match=r"Line 1 .*'Client:' or 'Therapist:'"):
        demo.parse_conversation("Doctor: hello")
    with pytest.raises(ValueError, match=r"utterance: it is empty"):
        demo.check_inputs(" ", [])
    code, text = run_cli(["demo", "--model", tmp_path / "no_model"], capsys)
    assert_error(code, text, "no_model", "no such model folder")


# ----------------------------------------------------------------------------------------------
# multimood evaluate
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, needles",
    [
        ([b"GOOD", b'{"prediction": "Client emotion: anger", "reference": "caf\xe9"}'], ["line 2", "not UTF-8"]),
        ([b"GOOD", b"not json"], ["line 2", "malformed JSON"]),
        ([b"GOOD", b'{"prediction": "x"}'], ["line 2", "'reference'"]),
        ([b"GOOD", b'["x", "y"]'], ["line 2", "JSON object"]),
        ([b"   "], ["no predictions"]),
    ],
    ids=["not-utf8", "not-json", "no-reference", "not-object", "empty"],
)
def test_evaluate_bad_predictions_files(tmp_path, capsys, lines, needles):
    good = json.dumps({"prediction": "Client emotion: anger", "reference": "Client emotion: anger"}).encode()
    path = write_lines(tmp_path / "preds.jsonl", [good if line == b"GOOD" else line for line in lines])
    code, text = run_cli(["evaluate", path, "--output", tmp_path / "metrics.json"], capsys)
    assert_error(code, text, str(path), *needles)


def test_evaluate_refuses_to_overwrite_its_input(tmp_path, capsys):
    path = write_lines(tmp_path / "preds.jsonl", [json.dumps({"prediction": "a", "reference": "a"})])
    before = path.read_bytes()
    code, text = run_cli(["evaluate", path, "--output", path], capsys)
    assert_error(code, text, "--output", "predictions file")
    assert path.read_bytes() == before


# ----------------------------------------------------------------------------------------------
# multimood train / GRPO: flags and data checked before the model loads
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def train_file(real_records, tmp_path) -> Path:
    return write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in real_records])


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--k_turn_history", "-1"], ["--k_turn_history", "-1"]),
        (["--model_max_length", "10"], ["--model_max_length", "10"]),
        (["--warmup_ratio", "0.1", "--warmup_steps", "5"], ["--warmup_ratio", "--warmup_steps"]),
        (["--num_k_vid", "-2"], ["--num_k_vid", "-2"]),
        (["--max_train_samples", "0"], ["--max_train_samples", "0"]),
        (["--lora_dropout", "1.5"], ["--lora_dropout", "1.5"]),
        (["--label_set", "bogus"], ["--label_set", "bogus"]),
        (["--vid_folder", "/no/such/clips"], ["--vid_folder", "no such folder"]),
        (["--model_path", "/no/such/llm"], ["--model_path", "/no/such/llm", "no such folder"]),
        (["--eval_data_path", "/no/such.jsonl"], ["--eval_data_path", "no such file"]),
    ],
)
def test_train_flags_fail_before_the_model_loads(train_file, tmp_path, capsys, flags, needles):
    argv = ["train", "--data_path", train_file, "--output_dir", tmp_path / "out", "--model_path", "/no/such/llm",
            *flags]
    code, text = run_cli(argv, capsys)
    assert_error(code, text, *needles)
    assert "Loading" not in text and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "line, needles",
    [(json.dumps({"Dialogue_ID": 1, "utt_user_most_recent": ["x"], "Utterance": ["y"], "Emotion": "ecstatic",
                  "Strategy": "others", "get_emotion_user_most_recent": "joy"}).encode(), ["line 2", "'ecstatic'"]),
     (NOT_UTF8, ["line 2", "not UTF-8"]), (b"{oops", ["line 2", "malformed JSON"])],
    ids=["label", "not-utf8", "not-json"],
)
def test_train_data_errors_name_file_and_line(real_records, tmp_path, capsys, line, needles):
    """The cause used to hide behind `DatasetGenerationError` (or a label outside the set was trained on)."""
    data = write_lines(tmp_path / "train.jsonl", [json.dumps(real_records[0]).encode(), line])
    code, text = run_cli(
        ["train", "--data_path", data, "--output_dir", tmp_path / "out", "--model_path", "someone/llm"], capsys
    )
    assert_error(code, text, str(data), *needles)
    assert "DatasetGenerationError" not in text


def test_grpo_prompts_reject_gold_labels_outside_the_label_set(processor, real_records, tmp_path):
    data = write_lines(tmp_path / "grpo.jsonl", [json.dumps(text_only(real_records[0])),
                                                 json.dumps(text_only(real_records[1], Strategy="hypnosis"))])
    with pytest.raises(ValueError, match=r"grpo.jsonl: record 1 \(Dialogue_ID=.*'Strategy' is 'hypnosis'"):
        make_grpo_dataset(str(data), processor)


# ----------------------------------------------------------------------------------------------
# multimood convert / push
# ----------------------------------------------------------------------------------------------


class _Payload:
    """Pickled as a call of os.system: a weights-only load must refuse it (it is never run)."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def published_folder(tmp_path: Path, weights: str) -> Path:
    folder = tmp_path / "published"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "videollama2_qwen2", "hidden_size": 32}))
    if weights == "pickle":
        torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": _Payload()},
                   folder / "pytorch_model.bin")
    elif weights == "truncated":
        save_file({"model.embed_tokens.weight": torch.zeros(64, 64)}, str(folder / "model.safetensors"))
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    elif weights == "no_config":
        (folder / "config.json").unlink()
    return folder


@pytest.mark.parametrize(
    "weights, needles",
    [("pickle", ["pytorch_model.bin", "refused"]), ("truncated", ["model.safetensors", "truncated"]),
     ("no_config", ["no config.json"]), ("missing", ["no such checkpoint folder"])],
)
def test_convert_damaged_checkpoints(tmp_path, capsys, weights, needles):
    source = tmp_path / "absent" if weights == "missing" else published_folder(tmp_path, weights)
    code, text = run_cli(["convert", source, tmp_path / "out"], capsys)
    line = assert_error(code, text, str(source), *needles)
    assert "weights_only=False" not in text and "weights_only` set to `False" not in text, line


def test_convert_to_published_and_push_of_a_damaged_folder(model_folder, tmp_path, capsys):
    broken = damaged_copy(model_folder, tmp_path, "truncated_weights")
    code, text = run_cli(["convert", "--to-published", broken, tmp_path / "out"], capsys)
    assert_error(code, text, "model.safetensors", "truncated")
    code, text = run_cli(["push", "--model", tmp_path / "none", "--repo-id", "a/b", "--dry-run", tmp_path / "up"],
                         capsys)
    assert_error(code, text, "none", "no such model folder")


# ----------------------------------------------------------------------------------------------
# Real processes: exit codes, one line on stderr, the traceback only on request
# ----------------------------------------------------------------------------------------------


def _run(args: list, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    environment.pop("MULTIMOOD_DEBUG", None)
    environment.update(env or {})
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=environment, timeout=300,
                          cwd=REPO)


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    code, text = run_cli(["data", "validate", tmp_path / "none.jsonl", "--debug"], capsys)
    assert code == "traceback" and "FileNotFoundError" in text
    monkeypatch.setenv("MULTIMOOD_DEBUG", "1")
    code, text = run_cli(["evaluate", tmp_path / "none.jsonl", "--output", tmp_path / "m.json"], capsys)
    assert code == "traceback" and "none.jsonl" in text


@pytest.mark.slow
def test_commands_as_subprocesses(real_records, model_folder, tmp_path):
    """The console scripts and run_scripts as real processes (each one imports torch: a few of them only)."""
    bad = write_lines(tmp_path / "bad.jsonl",
                      [json.dumps(real_records[0]), json.dumps(dict(real_records[1], Emotion="ecstatic"))])
    good = write_lines(tmp_path / "good.jsonl", [json.dumps(text_only(r)) for r in real_records])
    python = sys.executable
    cases = [
        ([Path(python).parent / "multimood-data", "validate", bad], ["bad.jsonl line 2", "'Emotion'", "'ecstatic'"]),
        ([python, "-m", "multimood.cli", "predict", "--model", model_folder, "--data", good, "--output", good],
         ["multimood predict: error:", "--output", "--data"]),
        ([python, "run_scripts/run_multimood.py", "--data_path", good, "--output_dir", tmp_path / "o",
          "--model_max_length", "10"], ["run_multimood.py: error:", "--model_max_length"]),
    ]
    for args, needles in cases:
        if not Path(args[0]).exists():
            continue
        result = _run(args)
        assert result.returncode == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert any(all(n in line for n in needles) for line in result.stderr.splitlines()), (args, result.stderr)
    debug = _run([python, "-m", "multimood.cli", "--debug", "data", "validate", tmp_path / "none.jsonl"])
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "none.jsonl" in debug.stderr
