"""Prompt styles against the goldens of the PUBLISHED MultiMood code (shared/data/golden/published).

The goldens were made by running the published dataset classes on real MESC records: `prompts_train.jsonl`
(training form: ids with the video sentinel -201, labels), `prompts_eval.jsonl` (inference form) and, per
training row, `mamba_history_ASSUMED` (the compressor input). Our ids must equal theirs once the sentinel is
replaced by our `<video>...<audio>...` block and their `<MEM>` id (151646) by ours.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from transformers import AutoProcessor

from multimood.model.feature_extraction_multimood import MultimoodFeatureExtractor
from multimood.model.pipeline_multimood import AnswerConstraint
from multimood.model.processing_multimood import IGNORE_INDEX, MultimoodProcessor
from multimood.model.records import parse_output
from multimood.training import train as mm_train
from multimood.training.assembly import processor_from_args

PUBLISHED_VIDEO_SENTINEL = -201
PUBLISHED_MEM_ID = 151646
NOAUDIO_CLIP = "videollama2_output_v_1jgsRbGzCls_noaudio.mp4"
SMALL = {"num_frames": 4, "size": 56}


@pytest.fixture(scope="module")
def golden(shared_data):
    folder = shared_data / "golden" / "published"

    def rows(name):
        with open(folder / name, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]

    return {"train": rows("prompts_train.jsonl"), "eval": rows("prompts_eval.jsonl"), "folder": folder}


@pytest.fixture(scope="module")
def processor(shared_data):
    # 2 s of audio instead of 30 s: a short filterbank (fast); the audio block is then 96 tokens
    return MultimoodProcessor.from_tokenizer(
        shared_data / "tokenizer" / "qwen2", feature_extractor=MultimoodFeatureExtractor(max_seconds=2.0)
    )


def _variant(processor, **settings):
    """The same processor (shared tokenizer) with other settings."""
    other = copy.copy(processor)
    for name, value in settings.items():
        setattr(other, name, value)
    return other


def _expected(processor, row: dict, n_video: int, n_audio: int) -> tuple[list[int], list[int] | None]:
    """The golden ids (and labels) with the published sentinel replaced by our block and <MEM> by ours."""
    block = [processor.video_token_id] * n_video + [processor.audio_token_id] * n_audio
    ids, labels = [], [] if "labels" in row else None
    for position, token in enumerate(row["input_ids"]):
        if token == PUBLISHED_VIDEO_SENTINEL:
            ids += block
            if labels is not None:
                assert row["labels"][position] == IGNORE_INDEX
                labels += [IGNORE_INDEX] * len(block)
        else:
            ids.append(token)
            if labels is not None:
                labels.append(row["labels"][position])
    return ids, labels


@pytest.mark.parametrize("style,form", [("published-train", "train"), ("published-eval", "eval")])
def test_published_prompts_equal_the_published_ids(processor, golden, records, video_folder, style, form):
    rows = golden[form]
    assert len(rows) == 43 and not any(row.get("exceeds_model_max_length") for row in rows)
    with_target = style == "published-train"
    batch = processor(
        records=[records[row["index"]] for row in rows], video_folder=video_folder, with_target=with_target,
        prompt_style=style, **SMALL,
    )
    n_video = processor.video_processor.num_video_tokens(4, 56, 56)
    n_audio = processor.feature_extractor.num_audio_tokens(*batch["input_features"].shape[1:])
    assert "history_input_ids" not in batch  # the published model gets no memory tokens
    for i, row in enumerate(rows):
        keep = batch["attention_mask"][i].bool()
        ids, labels = _expected(processor, row, n_video, n_audio)
        assert batch["input_ids"][i][keep].tolist() == ids, f"{form} record {row['index']}"
        if with_target:
            assert batch["labels"][i][keep].tolist() == labels, f"labels of record {row['index']}"


@pytest.mark.parametrize("style,form", [("published-train", "train"), ("published-eval", "eval")])
def test_published_prompt_text(processor, golden, records, style, form):
    """The rendered text is the published string (our `<video><audio>` block in place of `<video>`)."""
    for row in golden[form][:5]:
        text = processor.render_prompt(records[row["index"]], with_target=form == "train", prompt_style=style)
        assert text.replace("<video><audio>", "<video>") == row["text"]


def test_default_style_is_ours_and_published_is_saved_and_overridable(processor, records, tmp_path):
    record = copy.deepcopy(records[3])
    record["path_to_vid_user_most_recent"] = []
    assert processor.prompt_style == "multimood"
    assert processor.render_prompt(record).startswith("<|im_start|>system\nYou are a supportive")
    _variant(processor, prompt_style="published-eval").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["prompt_style"] == "published-eval"
    loaded = MultimoodProcessor.from_pretrained(tmp_path)
    assert loaded.prompt_style == "published-eval"
    assert "You are an expert in emotional psychology" in loaded.render_prompt(record)
    assert loaded.format_target(record).startswith("Client's emotion: neutral \nTherapist's emotion:")
    overridden = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True, prompt_style="published-train")
    assert overridden.prompt_style == "published-train"
    assert overridden.render_prompt(record).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    # per call
    ours = loaded(records=record, prompt_style="multimood")["input_ids"][0].tolist()
    assert ours == processor(records=record)["input_ids"][0].tolist()
    with pytest.raises(ValueError, match="prompt_style"):
        loaded(records=record, prompt_style="published")
    with pytest.raises(ValueError, match="prompt_style"):
        MultimoodProcessor(tokenizer=processor.tokenizer, prompt_style="paper")


def _published_memory_text(record) -> str:
    """The published compressor text, written by hand from the README: "{Speaker}{text} <MEM> " per message."""
    speaker = {"user": "Client", "assistant": "Therapist"}
    return "".join(f"{speaker[m['role']]}{m['content']} <MEM> " for m in record["history_chat"])


def test_published_compressor_input(processor, golden, records):
    for row in golden["train"]:
        record = records[row["index"]]
        assumed = row["mamba_history_ASSUMED"]
        assert _published_memory_text(record) == assumed["history_chat_mamba"]
        got = processor.history_input_ids(record, prompt_style="published-eval")
        if not record["history_chat"]:  # published: the pad token alone; ours: no compressor row
            assert got == [] and assumed["text_his_ids"] == [processor.pad_token_id]
            continue
        mem = processor.mem_token_id
        assert got == [mem if t == PUBLISHED_MEM_ID else t for t in assumed["text_his_ids"]], row["index"]
        assert got == processor.history_input_ids(record, prompt_style="published-train")


def test_published_compressor_keeps_the_first_512_tokens(processor, records):
    record = copy.deepcopy(records[5])
    record["history_chat"] = [m for r in records[:40] for m in r["history_chat"]][-60:]
    text = _published_memory_text(record)
    everything = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(everything) > 600
    pieces = processor.published_history_ids(record)
    assert [t for piece in pieces for t in piece] == everything[:512]
    assert len(pieces) == everything[:512].count(processor.mem_token_id)
    assert all(piece.count(processor.mem_token_id) == 1 for piece in pieces)
    # ours keeps the most recent utterances instead
    ours = processor.history_input_ids(record, prompt_style="multimood")
    assert processor.tokenizer.decode(ours).endswith(record["history_chat"][-1]["content"] + "<MEM>")


def test_published_style_with_memory(processor, records):
    """use_memory=True turns the published `<history>` text into one memory slot per <MEM> of the compressor input."""
    with_memory = _variant(processor, prompt_style="published-eval", use_memory=True)
    record = copy.deepcopy(records[3])
    record["path_to_vid_user_most_recent"] = []
    batch = with_memory(records=record)
    ids = batch["input_ids"][0]
    n_mem = int((batch["history_input_ids"][0] == processor.mem_token_id).sum())
    assert n_mem == 14 and int((ids == processor.history_token_id).sum()) == n_mem
    text = with_memory.decode(ids)
    assert "\nHistory: " + "<history>" * n_mem + " \nClient utterance:" in text and "History: Chat above" in text
    # ours without memory: no <history> line, no compressor input
    without = _variant(processor, use_memory=False)
    batch = without(records=record)
    assert "history_input_ids" not in batch and processor.history_token_id not in batch["input_ids"][0].tolist()


def test_parse_output_reads_the_published_answers(golden, records):
    for row in golden["eval"]:
        record = records[row["index"]]
        for text in (row["label"], golden["train"][golden["eval"].index(row)]["label_text"]):
            parsed = parse_output(text)
            assert parsed == {
                "client_emotion": record["get_emotion_user_most_recent"],
                "therapist_emotion": record["Emotion"],
                "strategy": record["Strategy"],
                "response": " ".join(record["Utterance"]),
            }, row["index"]


def test_published_target_is_the_published_label(processor, golden, records):
    for row in golden["eval"]:
        assert processor.format_target(records[row["index"]], prompt_style="published-eval") == row["label"]


def test_answer_constraint_follows_the_prompt_style(processor, golden, records):
    constraint = AnswerConstraint.from_processor(processor, "published-eval")
    response_prefix = processor.tokenizer("Therapist's response:", add_special_tokens=False)["input_ids"]
    assert constraint.segments[-1] == [response_prefix]
    for row in golden["eval"][:10]:
        tokens = processor.tokenizer(row["label"], add_special_tokens=False)["input_ids"]
        assert constraint.state(tokens) == AnswerConstraint.FREE
        target = processor.format_target(records[row["index"]])
        ours = processor.tokenizer(target, add_special_tokens=False)["input_ids"]
        assert constraint.state(ours) == AnswerConstraint.INVALID


# ------------------------------------------------------------------------------------------------
# Clips without audio
# ------------------------------------------------------------------------------------------------


def test_clip_without_audio_gets_the_filterbank_of_silence(processor, shared_data, records, video_folder):
    processor = _variant(processor, feature_extractor=MultimoodFeatureExtractor())  # 30 s, as published
    record = copy.deepcopy(records[5])
    record["path_to_vid_user_most_recent"] = [NOAUDIO_CLIP]
    batch = processor(records=record, video_folder=video_folder, **SMALL)
    silence = np.load(shared_data / "golden" / "published" / "fbank_silence.npz")["fbank"]
    no_audio_track = np.load(shared_data / "golden" / "published" / "fbank_no_audio_track.npz")["fbank"]
    assert silence.shape == (2998, 128) and np.array_equal(silence, no_audio_track)
    assert tuple(batch["input_features"].shape) == (1, 2998, 128)
    np.testing.assert_allclose(batch["input_features"][0].numpy(), silence, atol=1e-2, rtol=0)
    np.testing.assert_allclose(silence, np.log(np.finfo(np.float32).eps), atol=1e-5, rtol=0)
    n_audio = int((batch["input_ids"][0] == processor.audio_token_id).sum())
    assert n_audio == processor.feature_extractor.num_audio_tokens(2998, 128) == 1496
    # the option of before: no audio block, no features
    dropping = _variant(processor, audio_missing="drop")
    batch = dropping(records=record, video_folder=video_folder, **SMALL)
    assert "input_features" not in batch and processor.audio_token_id not in batch["input_ids"][0].tolist()
    with pytest.raises(ValueError, match="audio_missing"):
        MultimoodProcessor(tokenizer=processor.tokenizer, audio_missing="zeros")


def test_train_flag_sets_the_processor_prompt_style(shared_data, tmp_path):
    tokenizer = str(shared_data / "tokenizer" / "qwen2")
    flags = ["--tokenizer_path", tokenizer, "--output_dir", str(tmp_path), "--report_to", "none"]
    model_args, data_args, training_args = mm_train.parse_args(flags + ["--prompt_style", "published-train"])
    processor = processor_from_args(model_args, data_args, training_args)
    assert processor.prompt_style == "published-train"
    model_args, data_args, training_args = mm_train.parse_args(flags)
    assert processor_from_args(model_args, data_args, training_args).prompt_style == "multimood"
    with pytest.raises(SystemExit):
        mm_train.parse_args(flags + ["--prompt_style", "paper"])
