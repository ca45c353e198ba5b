"""MultimoodProcessor on the real Qwen2 tokenizer, real MESC records and real clips."""

from __future__ import annotations

import copy
import json
import os
import textwrap

import pytest
import torch

from multimood.model.processing_multimood import (
    IGNORE_INDEX,
    MultimoodDataCollator,
    MultimoodProcessor,
    format_target,
)
from multimood.model.records import (
    ESCONV_STRATEGIES,
    MESC_EMOTIONS,
    MESC_STRATEGIES,
    MultimoodRecordError,
    parse_output,
)
from tests.model_utils import run_in_clean_process

SMALL = {"num_frames": 4, "size": 56}  # fast media for tests that do not need the published shapes
NOAUDIO_CLIP = "videollama2_output_v_1jgsRbGzCls_noaudio.mp4"


@pytest.fixture(scope="module")
def data(shared_data):
    return shared_data


@pytest.fixture(scope="module")
def processor(data):
    return MultimoodProcessor.from_tokenizer(data / "tokenizer" / "qwen2")


def _variant(processor, **kwargs):
    """Another processor on a copy of the same tokenizer (processors keep their tokenizer's template in step)."""
    return MultimoodProcessor.from_tokenizer(copy.deepcopy(processor.tokenizer), **kwargs)


def _record(records, dialogue_id):
    return copy.deepcopy(next(r for r in records if r["Dialogue_ID"] == dialogue_id))


def _count(ids, token_id):
    return int((torch.as_tensor(ids) == token_id).sum())


@pytest.fixture(scope="module")
def long_record(records):
    """A real record whose history is the histories of many records end to end (about 20 exchanges)."""
    record = _record(records, 5)
    record["history_chat"] = [m for r in records[:40] for m in r["history_chat"]][-60:]
    return record


def _text_only(record):
    record = copy.deepcopy(record)
    record["path_to_vid_user_most_recent"] = []
    return record


# ------------------------------------------------------------------------------------------------
# Tokenizer, prompt and target
# ------------------------------------------------------------------------------------------------


def test_special_tokens(processor, data):
    assert processor.special_token_ids == {
        "video_token_id": 151646, "audio_token_id": 151647, "history_token_id": 151648, "mem_token_id": 151649,
    }
    tok = processor.tokenizer
    assert tok.pad_token == "<|endoftext|>" and processor.pad_token_id == 151643
    placeholders = tok("<video><audio><history><MEM>", add_special_tokens=False)["input_ids"]
    assert placeholders == [151646, 151647, 151648, 151649]
    assert tok.decode([151646, 9707, 151649], skip_special_tokens=True) == "Hello"
    # idempotent: building again from the prepared tokenizer adds nothing
    again = MultimoodProcessor.from_tokenizer(tok)
    assert len(again.tokenizer) == len(tok) and again.special_token_ids == processor.special_token_ids


def test_prompt_layout(processor, records):
    record = _record(records, 5)
    prompt = processor.render_prompt(record)
    assert prompt.startswith("<|im_start|>system\nYou are a supportive, professional counsellor assistant.")
    assert prompt.endswith("<|im_start|>assistant\n")
    user = prompt.rsplit("<|im_start|>user\n", 1)[1]
    lines = user.split("\n")
    assert lines[0] == f"Problem type: {record['problem_type']}"
    assert lines[1] == f"Situation: {record['situation']}"
    assert lines[2] == "Client's video and voice: <video><audio>"
    assert lines[3] == "Earlier conversation (memory): <history>"
    assert lines[4] == "Client: " + " ".join(record["utt_user_most_recent"])
    for label in MESC_EMOTIONS + MESC_STRATEGIES:
        assert label in user
    assert prompt.count("<video>") == prompt.count("<audio>") == prompt.count("<history>") == 1
    # the history turns (consecutive client messages merged) sit between the system and the user turn
    assert (
        "<|im_start|>user\nKate and I, we... we just argue nonstop. I think it's beginning to affect my work."
        "<|im_end|>\n<|im_start|>assistant\nWhat do you mean you argue?<|im_end|>"
    ) in prompt
    # with target: the same prompt followed by the four-line answer
    full = processor.render_prompt(record, with_target=True)
    assert full == prompt + processor.format_target(record) + "<|im_end|>\n"


def test_k_turn_history_keeps_last_exchanges(processor, long_record):
    record = long_record
    roles = [m["role"] for m in record["history_chat"]]
    turns = [r for i, r in enumerate(roles) if i == 0 or roles[i - 1] != r]
    # an exchange = a client turn and the therapist turn answering it
    n_exchanges = sum(1 for i, r in enumerate(turns) if r == "user" or i == 0)
    assert n_exchanges > 7

    def history_turns(prompt):
        body = prompt.split("<|im_end|>\n", 1)[1]  # after the system turn
        return body.count("<|im_start|>") - 2  # minus the final user turn and the generation prompt

    for k in (0, 1, 3, 7):
        messages = processor.build_messages(record, k_turn_history=k)
        kept = messages[1:-1]
        assert sum(m["role"] == "user" for m in kept) == k
        assert all(kept[i]["role"] != kept[i + 1]["role"] for i in range(len(kept) - 1))  # merged turns alternate
        assert history_turns(processor.render_prompt(record, k_turn_history=k)) == len(kept)
    # the last kept turn is the therapist's latest message, the first one a client turn
    kept = processor.build_messages(record, k_turn_history=3)[1:-1]
    assert kept[-1]["role"] == "assistant" and kept[-1]["content"].endswith(record["history_chat"][-1]["content"])
    assert kept[0]["role"] == "user"
    assert processor.k_turn_history == 7
    assert len(processor.build_messages(record)) == len(processor.build_messages(record, k_turn_history=7))


def test_history_forms_are_equivalent(processor, records, data):
    """role/content dicts, `Client: `/`Therapist: ` strings (the seed's JSON array) and alternating plain strings."""
    with open(data / "records" / "seed_form_example.json", encoding="utf-8") as f:
        seed = json.load(f)
    assert isinstance(seed, list) and isinstance(seed[0]["history_chat"][0], str)
    for seed_record in seed:
        record = _record(records, seed_record["Dialogue_ID"])
        seed_prompt = processor.render_prompt(seed_record, with_target=True)
        assert seed_prompt == processor.render_prompt(record, with_target=True)
        assert processor.history_input_ids(seed_record) == processor.history_input_ids(record)
    # unprefixed strings alternate, starting with the client
    plain = _record(records, 5)
    plain["history_chat"] = ["I can't sleep.", "Since when?", "Since the divorce."]
    messages = processor.build_messages(plain)
    assert [(m["role"], m["content"]) for m in messages[1:-1]] == [
        ("user", "I can't sleep."), ("assistant", "Since when?"), ("user", "Since the divorce."),
    ]
    ids = processor.history_input_ids(plain)
    text = processor.tokenizer.decode(ids)
    assert text == "Client: I can't sleep.<MEM>Therapist: Since when?<MEM>Client: Since the divorce.<MEM>"


def test_target_and_parse_round_trip(processor, records):
    record = _record(records, 5)
    target = processor.format_target(record)
    assert target == (
        "Client emotion: anger\nTherapist emotion: neutral\nStrategy: restatement\nResponse: Kate said that?"
    )
    assert format_target(record) == target
    assert parse_output(target) == {
        "client_emotion": "anger", "therapist_emotion": "neutral", "strategy": "restatement",
        "response": "Kate said that?",
    }
    for r in records[:50]:
        parsed = processor.parse_output(processor.format_target(r))
        assert parsed["response"] == " ".join(" ".join(r["Utterance"]).split())
        assert parsed["strategy"] == r["Strategy"] and parsed["therapist_emotion"] == r["Emotion"]
        assert parsed["client_emotion"] == r["get_emotion_user_most_recent"]
    # published spellings, canonical label spelling, missing fields are None (never dropped)
    published = (
        "Client's emotion: Anger \nTherapist's emotion: neutral \nTherapist's strategy: Open Question \n"
        "Therapist's response: Why?"
    )
    assert processor.parse_output(published) == {
        "client_emotion": "anger", "therapist_emotion": "neutral", "strategy": "open question", "response": "Why?",
    }
    assert parse_output("Client emotion: joy\nsomething else") == {
        "client_emotion": "joy", "therapist_emotion": None, "strategy": None, "response": None,
    }
    assert parse_output("") == dict.fromkeys(("client_emotion", "therapist_emotion", "strategy", "response"))
    parsed = parse_output("Strategy: others\nResponse: line one\nline two<|im_end|>junk")
    assert parsed["response"] == "line one\nline two"


def test_post_process_output(processor, records):
    record = _record(records, 6)
    ids = processor.tokenizer(processor.format_target(record) + "<|im_end|>", add_special_tokens=False)["input_ids"]
    prompt = [1, 2, 3]
    out = processor.post_process_output(torch.tensor([prompt + ids]), input_length=len(prompt))
    assert out[0]["strategy"] == "open question" and out[0]["response"] == "What do you mean, rupture?"
    assert processor.batch_decode([ids], skip_special_tokens=True)[0] == processor.format_target(record)


# ------------------------------------------------------------------------------------------------
# Media placeholders, history, labels
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_placeholder_counts_at_published_size(processor, records, video_folder):
    batch = processor(records=_record(records, 5), video_folder=video_folder)
    assert tuple(batch["pixel_values_videos"].shape) == (1, 16, 3, 384, 384)
    assert tuple(batch["input_features"].shape) == (1, 2998, 128)
    assert _count(batch["input_ids"], processor.video_token_id) == 1352
    assert _count(batch["input_ids"], processor.audio_token_id) == 1496


def test_placeholder_counts_follow_processed_shapes(processor, records, video_folder):
    recs = [_record(records, 5), _record(records, 6), _record(records, 48)]
    batch = processor(records=recs, video_folder=video_folder, with_target=True, return_frame_indices=True, **SMALL)
    t, _, h, w = batch["pixel_values_videos"].shape[1:]
    assert (t, h, w) == (4, 56, 56)
    n_video = processor.video_processor.num_video_tokens(t, h, w)
    n_audio = processor.feature_extractor.num_audio_tokens(*batch["input_features"].shape[1:])
    assert len(batch["frame_indices"]) == 3 and len(batch["frame_indices"][0]) == 4
    # only the last num_k_vid (5) clips are used; frame_indices name positions in the record's own clip list
    seven = _record(records, 48)
    seven["path_to_vid_user_most_recent"] = [NOAUDIO_CLIP] * 2 + ["retalking_face_1.mp4"] * 5
    picks = processor(records=seven, video_folder=video_folder, return_frame_indices=True, **SMALL)["frame_indices"][0]
    assert len(picks) == 4 and all(2 <= clip <= 6 for clip, _ in picks)
    assert processor.feature_extractor(  # the no-audio clips fell outside the last five: the sample has audio
        [seven["path_to_vid_user_most_recent"][-5:]], video_folder=video_folder)["audio_present"].all()
    for row in batch["input_ids"]:
        assert _count(row, processor.video_token_id) == n_video
        assert _count(row, processor.audio_token_id) == n_audio
        video_pos = (row == processor.video_token_id).nonzero().flatten()
        audio_pos = (row == processor.audio_token_id).nonzero().flatten()
        # one contiguous video block immediately followed by one contiguous audio block
        assert int(video_pos[-1] - video_pos[0]) == n_video - 1 and int(audio_pos[0]) == int(video_pos[-1]) + 1
        assert int(audio_pos[-1] - audio_pos[0]) == n_audio - 1


def test_text_only_and_no_audio_samples(processor, records, video_folder):
    text_only = _text_only(_record(records, 5))
    no_audio = _record(records, 6)
    no_audio["path_to_vid_user_most_recent"] = [NOAUDIO_CLIP]
    with_audio = _record(records, 48)
    batch = processor(records=[text_only, no_audio, with_audio], video_folder=video_folder, **SMALL)
    ids = batch["input_ids"]
    n_video = processor.video_processor.num_video_tokens(4, 56, 56)
    n_audio = processor.feature_extractor.num_audio_tokens(2998, 128)
    assert [_count(r, processor.video_token_id) for r in ids] == [0, n_video, n_video]
    # by default a clip without an audio track is heard as silence (as published): it keeps its audio block
    assert [_count(r, processor.audio_token_id) for r in ids] == [0, n_audio, n_audio]
    assert batch["pixel_values_videos"].shape[0] == batch["input_features"].shape[0] == 2  # samples with clips
    # audio_missing="drop": the clip without an audio track contributes no features and no audio block
    dropping = MultimoodProcessor(processor.video_processor, processor.feature_extractor, processor.tokenizer,
                                  audio_missing="drop")
    batch = dropping(records=[text_only, no_audio, with_audio], video_folder=video_folder, **SMALL)
    ids = batch["input_ids"]
    assert [_count(r, processor.audio_token_id) for r in ids] == [0, 0, n_audio]
    assert batch["pixel_values_videos"].shape[0] == 2 and batch["input_features"].shape[0] == 1
    text = processor.decode(ids[1][batch["attention_mask"][1].bool()])
    assert "Client's video: <video>" in text and "<audio>" not in text
    # a batch with no clips at all carries no media keys, and a text-only prompt has no media line
    batch = processor(records=[text_only], video_folder=video_folder)
    assert "pixel_values_videos" not in batch and "input_features" not in batch
    assert "video" not in processor.decode(batch["input_ids"][0]).split("<|im_start|>user\n")[-1].split("Client:")[0]


def test_history_placeholders_match_mem_tokens(processor, records, video_folder):
    no_history = _text_only(_record(records, 48))
    no_history["history_chat"] = []
    mamba = _text_only(_record(records, 6))
    mamba["history_chat_mamba"] = (
        "usr She says I don't love her. <MEM> sys What do you mean? <MEM> usr Her, us, it. <MEM> "
    )
    lines = _text_only(_record(records, 5))
    lines["history_chat_mamba"] = "Client: one\nTherapist: two"
    recs = [_text_only(_record(records, 5)), no_history, mamba, lines]
    batch = processor(records=recs, video_folder=video_folder, with_target=True)
    hist, hist_mask = batch["history_input_ids"], batch["history_attention_mask"]
    assert hist.shape[0] == 3  # no row for the sample without history
    mem_per_row = [_count(row[mask.bool()], processor.mem_token_id) for row, mask in zip(hist, hist_mask)]
    history_per_sample = [_count(row, processor.history_token_id) for row in batch["input_ids"]]
    assert history_per_sample == [mem_per_row[0], 0, 3, 2] and mem_per_row[1:] == [3, 2]
    assert mem_per_row[0] == len(recs[0]["history_chat"])  # one <MEM> after each utterance
    assert processor.tokenizer.decode(hist[1][hist_mask[1].bool()]) == (
        "usr She says I don't love her.<MEM>sys What do you mean?<MEM>usr Her, us, it.<MEM>"
    )
    # <history> copies are one contiguous block
    pos = (batch["input_ids"][0] == processor.history_token_id).nonzero().flatten()
    assert int(pos[-1] - pos[0]) == len(pos) - 1


def test_history_compressor_limits(processor, long_record):
    record = long_record
    unlimited = _variant(processor, history_max_tokens=10**6)
    everything = unlimited.history_utterance_ids(record)
    assert len(everything) == len(record["history_chat"])  # one <MEM> after each utterance
    assert all(u[-1] == processor.mem_token_id and processor.mem_token_id not in u[:-1] for u in everything)
    for proc, limit in ((processor, 512), (_variant(processor, history_max_tokens=40), 40)):
        kept = proc.history_utterance_ids(record)
        # the most recent whole utterances that fit
        assert kept == everything[len(everything) - len(kept):] and sum(map(len, kept)) <= limit
        assert sum(map(len, everything[len(everything) - len(kept) - 1:])) > limit
    slots = _variant(processor, max_memory_slots=2)
    assert slots.history_utterance_ids(record) == everything[-2:]
    assert len(processor.history_input_ids(record)) == sum(map(len, processor.history_utterance_ids(record)))


def test_labels_cover_target_and_end_of_turn(processor, records, video_folder):
    recs = [_record(records, 5), _text_only(_record(records, 6)), _text_only(_record(records, 48))]
    batch = processor(records=recs, video_folder=video_folder, with_target=True, **SMALL)
    assert batch["labels"].shape == batch["input_ids"].shape
    im_start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    for row_ids, row_labels, mask, record in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], recs):
        positions = (row_labels != IGNORE_INDEX).nonzero().flatten()
        assert int(positions[-1] - positions[0]) == len(positions) - 1  # one contiguous span
        assert torch.equal(row_labels[positions], row_ids[positions])
        assert processor.decode(row_labels[positions]) == processor.format_target(record) + "<|im_end|>"
        # the generation prompt `<|im_start|>assistant\n` right before the span is not a target
        start = int(positions[0])
        assert processor.decode(row_ids[start - 3 : start]) == "<|im_start|>assistant\n"
        assert int(row_ids[start - 3]) == im_start
        # nothing after the span but the template's trailing newline and padding
        assert int(mask[int(positions[-1]) + 2 :].sum()) == 0
    # generation batches carry no labels
    assert "labels" not in processor(records=recs[1:], video_folder=video_folder)


# ------------------------------------------------------------------------------------------------
# Truncation, padding
# ------------------------------------------------------------------------------------------------


def test_truncation_drops_oldest_history_first(processor, long_record, video_folder):
    record = copy.deepcopy(long_record)
    record["path_to_vid_user_most_recent"] = ["retalking_face_3.mp4"]
    full = processor(records=record, video_folder=video_folder, with_target=True, **SMALL)
    length = int(full["attention_mask"].sum())
    media = _count(full["input_ids"], processor.video_token_id) + _count(full["input_ids"], processor.audio_token_id)
    full_prompt = processor.decode(full["input_ids"][0])
    # model_max_length counts text tokens; video/audio copies come on top
    assert int(processor(records=record, video_folder=video_folder, with_target=True,
                         max_length=length - media, **SMALL)["attention_mask"].sum()) == length
    cut = processor(records=record, video_folder=video_folder, with_target=True, max_length=length - media - 1, **SMALL)
    text = processor.decode(cut["input_ids"][0])
    history_turns = processor.build_messages(record)[1:-1]
    oldest, newest = history_turns[0]["content"], history_turns[-1]["content"]
    assert oldest in full_prompt and oldest not in text and newest in text
    assert int(cut["attention_mask"].sum()) <= length - 1
    assert _count(cut["input_ids"], processor.video_token_id) == _count(full["input_ids"], processor.video_token_id)
    assert _count(cut["input_ids"], processor.audio_token_id) == _count(full["input_ids"], processor.audio_token_id)
    labels = cut["labels"][0]
    assert processor.decode(labels[labels != IGNORE_INDEX]) == processor.format_target(record) + "<|im_end|>"
    # counting the media too (max_length_includes_media) gives the same cut with the media added to the budget
    incl = _variant(processor, max_length_includes_media=True)
    same = incl(records=record, video_folder=video_folder, with_target=True, max_length=length - 1, **SMALL)
    assert torch.equal(same["input_ids"], cut["input_ids"])
    # after all chat turns, the oldest compressor utterances go (one <history> slot each)
    no_turns = processor(records=record, video_folder=video_folder, with_target=True, k_turn_history=0, **SMALL)
    n_hist = _count(no_turns["input_ids"], processor.history_token_id)
    squeezed = processor(records=record, video_folder=video_folder, with_target=True,
                         max_length=int(no_turns["attention_mask"].sum()) - media - 5, **SMALL)
    assert _count(squeezed["input_ids"], processor.history_token_id) == n_hist - 5
    assert _count(squeezed["history_input_ids"], processor.mem_token_id) == n_hist - 5
    assert "<|im_start|>assistant" not in processor.decode(squeezed["input_ids"][0]).split("<|im_start|>user")[0]


def test_truncation_impossible_fit_names_the_record(processor, records, video_folder):
    recs = [_text_only(_record(records, 6)), _text_only(_record(records, 5))]
    with pytest.raises(MultimoodRecordError, match=r"record 0 \(Dialogue_ID=6\).*does not fit"):
        processor(records=recs, video_folder=video_folder, with_target=True, max_length=100)
    # without truncation the sample passes through whole
    batch = processor(records=recs, with_target=True, max_length=100, truncation=False)
    assert batch["input_ids"].shape[1] > 100


def test_padding_sides_and_masks(processor, records, video_folder):
    recs = [_text_only(_record(records, 48)), _text_only(_record(records, 5))]
    train = processor(records=recs, with_target=True)
    gen = processor(records=recs)
    pad = processor.pad_token_id
    lengths = [len(processor(records=r, with_target=True)["input_ids"][0]) for r in recs]
    for i, n in enumerate(lengths):  # right padding for training
        assert train["attention_mask"][i].tolist() == [1] * n + [0] * (train["input_ids"].shape[1] - n)
        assert (train["input_ids"][i, n:] == pad).all() and (train["labels"][i, n:] == IGNORE_INDEX).all()
    gen_lengths = [len(processor(records=r)["input_ids"][0]) for r in recs]
    for i, n in enumerate(gen_lengths):  # left padding for generation: every row ends with the generation prompt
        width = gen["input_ids"].shape[1]
        assert gen["attention_mask"][i].tolist() == [0] * (width - n) + [1] * n
        assert (gen["input_ids"][i, : width - n] == pad).all()
        assert processor.decode(gen["input_ids"][i, -3:]) == "<|im_start|>assistant\n"
    flipped = processor(records=recs, with_target=True, padding_side="left")
    assert flipped["attention_mask"][0, 0] == 0 and flipped["attention_mask"][:, -1].all()
    assert processor(records=recs, padding_side="right")["attention_mask"][:, 0].all()
    # the compressor ids are right-padded with the pad id (never -100) whatever the text padding side
    for batch in (train, gen):
        hist, mask = batch["history_input_ids"], batch["history_attention_mask"]
        assert (hist != IGNORE_INDEX).all() and (hist[mask == 0] == pad).all()
        assert mask[:, 0].all() and (mask[:, :-1] >= mask[:, 1:]).all()
        for row, m in zip(hist, mask):
            assert int(row[int(m.sum()) - 1]) == processor.mem_token_id


# ------------------------------------------------------------------------------------------------
# Label sets, chat template, save / load
# ------------------------------------------------------------------------------------------------


def test_label_sets_saved_and_selectable(processor, records, tmp_path):
    esconv = _variant(processor, label_set="esconv")
    assert esconv.strategy_labels == ESCONV_STRATEGIES
    prompt = esconv.render_prompt(_text_only(_record(records, 5)))
    assert "Providing Suggestions" in prompt and "guiding the pace" not in prompt
    assert esconv.parse_output("Strategy: providing suggestions")["strategy"] == "Providing Suggestions"
    custom = MultimoodProcessor.from_tokenizer(
        processor.tokenizer, emotion_labels=["calm", "upset"], strategy_labels=["listen", "advise"], k_turn_history=2
    )
    custom.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["emotion_labels"] == ["calm", "upset"] and saved["strategy_labels"] == ["listen", "advise"]
    assert saved["k_turn_history"] == 2 and saved["model_max_length"] == 2048 and saved["history_max_tokens"] == 512
    loaded = MultimoodProcessor.from_pretrained(tmp_path)
    loaded_settings = (loaded.emotion_labels, loaded.strategy_labels, loaded.k_turn_history)
    assert loaded_settings == (["calm", "upset"], ["listen", "advise"], 2)
    assert loaded.render_prompt(_record(records, 5)) == custom.render_prompt(_record(records, 5))
    default = _variant(processor)
    assert default.label_set == "mesc" and default.strategy_labels == MESC_STRATEGIES
    with pytest.raises(ValueError, match="label_set"):
        _variant(processor, label_set="nope")


LLAMA_STYLE = (
    "{%- for message in messages -%}"
    "{{- '[' + message['role'] | upper + ']: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- elif part['type'] == 'video' -%}{{- '<video>' -}}"
    "{%- elif part['type'] == 'audio' -%}{{- '<audio>' -}}{%- elif part['type'] == 'history' -%}{{- '<history>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|endoftext|>\\n\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '[ASSISTANT]: ' -}}{%- endif -%}"
)


def test_custom_chat_template(processor, records, video_folder, tmp_path):
    record = _record(records, 6)
    custom = _variant(processor, chat_template=LLAMA_STYLE)
    prompt = custom.render_prompt(record)
    assert prompt.startswith("[SYSTEM]: You are a supportive") and prompt.endswith("[ASSISTANT]: ")
    assert "<|im_start|>" not in prompt
    assert custom.tokenizer.apply_chat_template(  # the tokenizer carries the same template
        custom.build_messages(record), tokenize=False, add_generation_prompt=True) == prompt
    batch = custom(records=record, video_folder=video_folder, with_target=True, **SMALL)
    labels = batch["labels"][0]
    assert custom.decode(labels[labels != IGNORE_INDEX]) == custom.format_target(record) + "<|endoftext|>"
    # a template replaced in the saved folder is used without code changes
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    (tmp_path / "chat_template.jinja").write_text(LLAMA_STYLE)
    reloaded = MultimoodProcessor.from_pretrained(tmp_path)
    assert reloaded.render_prompt(record) == prompt
    # a template that drops a placeholder is refused loudly
    broken = _variant(processor, chat_template=LLAMA_STYLE.replace("'<audio>'", "''"))
    with pytest.raises(MultimoodRecordError, match="<audio> placeholder"):
        broken(records=record, video_folder=video_folder, **SMALL)


CLEAN_LOAD = textwrap.dedent(
    """
    import json, sys
    sys.modules["multimood"] = None  # the package must not be importable: only the saved remote code
    import torch
    from transformers import AutoProcessor
    folder, records_file, out = sys.argv[1], sys.argv[2], sys.argv[3]
    args = json.loads(sys.argv[4])
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    assert type(processor.video_processor).__name__ == "MultimoodVideoProcessor"
    assert type(processor.feature_extractor).__name__ == "MultimoodFeatureExtractor"
    records = [json.loads(line) for line in open(records_file)]
    batch = processor(records=records, **args)
    torch.save({k: v for k, v in batch.items()}, out)
    """
)


@pytest.mark.slow
def test_save_and_load_in_clean_process(processor, records, video_folder, tmp_path):
    folder = tmp_path / "processor"
    processor.save_pretrained(folder)
    files = set(os.listdir(folder))
    assert {"processing_multimood.py", "video_processing_multimood.py", "feature_extraction_multimood.py", "media.py",
            "processor_config.json", "chat_template.jinja", "tokenizer_config.json"} <= files
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_multimood.MultimoodProcessor"
    recs = [_record(records, 5), _text_only(_record(records, 6)), _record(records, 48)]
    recs[2]["path_to_vid_user_most_recent"] = [NOAUDIO_CLIP, "retalking_face_1.mp4"]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = {"video_folder": video_folder, "with_target": True, **SMALL}
    run_in_clean_process(CLEAN_LOAD, folder, tmp_path / "records.jsonl", tmp_path / "out.pt", json.dumps(args),
                         cwd=tmp_path)
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    expected = processor(records=recs, **args)
    assert set(loaded) == set(expected)
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key


# ------------------------------------------------------------------------------------------------
# Bad records, collator
# ------------------------------------------------------------------------------------------------


def _drop(field):
    return lambda r: r.pop(field)


def _set(field, value):
    return lambda r: r.__setitem__(field, value)


BAD_RECORDS = {
    "missing utterance": (_drop("utt_user_most_recent"), "utt_user_most_recent", "missing"),
    "utterance not text": (
        _set("utt_user_most_recent", 42), "utt_user_most_recent", "must be a list of strings, got int"
    ),
    "utterance item not text": (_set("utt_user_most_recent", ["ok", None]), "utt_user_most_recent", "item 1"),
    "empty utterance": (_set("utt_user_most_recent", []), "utt_user_most_recent", "empty"),
    "history not a list": (_set("history_chat", 3.5), "history_chat", "must be a list of messages"),
    "history bad role": (_set("history_chat", [{"role": "doctor", "content": "hi"}]), "history_chat", "role"),
    "history bad content": (_set("history_chat", [{"role": "user", "content": 1}]), "history_chat", "content"),
    "history item type": (_set("history_chat", [["Client", "hi"]]), "history_chat", "message 0"),
    "clips not a list": (_set("path_to_vid_user_most_recent", 7), "path_to_vid_user_most_recent", "list of clip"),
    "clip not a name": (_set("path_to_vid_user_most_recent", [""]), "path_to_vid_user_most_recent", "item 0"),
    "mamba not text": (_set("history_chat_mamba", ["a"]), "history_chat_mamba", "must be a string"),
    "situation not text": (_set("situation", {"a": 1}), "situation", "must be a string"),
    "missing emotion": (_drop("Emotion"), "Emotion", "missing"),
    "missing client emotion": (_drop("get_emotion_user_most_recent"), "get_emotion_user_most_recent", "missing"),
    "strategy not text": (_set("Strategy", 3), "Strategy", "non-empty str"),
    "missing response": (_drop("Utterance"), "Utterance", "missing"),
    "response not text": (_set("Utterance", {"x": 1}), "Utterance", "must be a list of strings, got dict"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_records_name_record_and_field(processor, records, case):
    corrupt, field, problem = BAD_RECORDS[case]
    good = _text_only(_record(records, 48))
    bad = _text_only(_record(records, 6))
    corrupt(bad)
    with pytest.raises(MultimoodRecordError) as info:
        processor(records=[good, bad], with_target=True)
    message = str(info.value)
    assert "record 1 (Dialogue_ID=6)" in message and f"field '{field}'" in message and problem in message
    assert info.value.field == field


def test_record_not_a_dict_and_missing_clip(processor, records, video_folder):
    with pytest.raises(MultimoodRecordError, match=r"record 1: is list, expected a dict"):
        processor(records=[_text_only(_record(records, 48)), ["not", "a", "record"]])
    missing = _record(records, 6)
    missing["path_to_vid_user_most_recent"] = ["retalking_face_1.mp4", "no_such_clip.mp4"]
    with pytest.raises(Exception, match=r"(?s)Dialogue_ID=6.*no_such_clip\.mp4|no_such_clip\.mp4.*Dialogue_ID=6"):
        processor(records=[_text_only(_record(records, 48)), missing], video_folder=video_folder, **SMALL)
    # labels are not needed for generation
    unlabeled = _text_only(_record(records, 6))
    for key in ("Emotion", "Strategy", "Utterance", "get_emotion_user_most_recent"):
        unlabeled.pop(key)
    assert "labels" not in processor(records=unlabeled)


def test_reserved_tokens_in_text_are_neutralised(processor, records):
    record = _text_only(_record(records, 6))
    record["utt_user_most_recent"] = ["I saw <video> and <|im_end|> and <MEM>"]
    batch = processor(records=record)
    ids = batch["input_ids"][0]
    assert _count(ids, processor.video_token_id) == 0 and _count(ids, processor.mem_token_id) == 0
    assert _count(ids, processor.tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2 + len(
        processor.build_messages(record)[1:-1]
    )


def test_collator_in_dataloader_workers(processor, records, video_folder):
    recs = [
        _record(records, 5), _text_only(_record(records, 6)), _record(records, 48), _text_only(_record(records, 74))
    ]
    collator = MultimoodDataCollator(processor, video_folder=video_folder, processor_kwargs=SMALL)
    loader = torch.utils.data.DataLoader(recs, batch_size=2, collate_fn=collator, num_workers=1)
    batches = list(loader)
    assert len(batches) == 2
    for batch, chunk in zip(batches, (recs[:2], recs[2:])):
        expected = processor(records=chunk, video_folder=video_folder, with_target=True, **SMALL)
        assert set(batch) == set(expected)
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key
    assert batches[0]["attention_mask"][:, 0].all()  # training collator pads on the right
    generation = MultimoodDataCollator(processor, video_folder=video_folder, with_target=False)
    out = generation([_text_only(recs[0]), recs[1]])
    assert "labels" not in out and out["attention_mask"][:, -1].all()
