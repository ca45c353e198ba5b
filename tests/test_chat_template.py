"""`MultimoodProcessor.apply_chat_template`: transformers' chat messages give exactly the records path's inputs.

The oracle is the records path (`processor(records=[record])`, checked against the published goldens in
test_prompt_styles.py) on the real MESC record the conversation is written from, with the real Qwen2 tokenizer and
the real clips.
"""

from __future__ import annotations

import copy
import json
import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from transformers.cli.serving.utils import BaseHandler, Modality

from multimood.model.chat_messages import MultimoodChatError
from multimood.model.feature_extraction_multimood import MultimoodFeatureExtractor
from multimood.model.processing_multimood import MultimoodProcessor
from multimood.model.records import PROMPT_STYLES, MultimoodError, format_answer
from multimood.model.video_processing_multimood import MultimoodVideoProcessor
from tests.model_utils import run_in_clean_process

NOAUDIO_CLIP = "videollama2_output_v_1jgsRbGzCls_noaudio.mp4"


@pytest.fixture(scope="module")
def records(shared_data):
    with open(shared_data / "records" / "mesc_val_records.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def video_folder(shared_data):
    return shared_data / "media" / "video"


@pytest.fixture(scope="module")
def processor(shared_data):
    """Small media (4 frames of 56 px, 2 s of audio) as the processor's own settings: the chat path keeps them."""
    return MultimoodProcessor.from_tokenizer(
        shared_data / "tokenizer" / "qwen2",
        video_processor=MultimoodVideoProcessor(num_frames=4, size={"height": 56, "width": 56}),
        feature_extractor=MultimoodFeatureExtractor(max_seconds=2.0),
    )


def _record(records, dialogue_id):
    return copy.deepcopy(next(r for r in records if r["Dialogue_ID"] == dialogue_id))


def _conversation(record, video_folder, context_in_system=True, clip_key="path"):
    """The chat messages of a record, written by hand from its fields: the history as user/assistant messages,
    the current turn's clips as video parts (absolute paths) before the client's words."""
    messages = []
    if context_in_system:
        messages.append(
            {"role": "system", "content": f"Problem type: {record['problem_type']}\nSituation: {record['situation']}"}
        )
    messages += [{"role": m["role"], "content": m["content"]} for m in record["history_chat"]]
    parts = []
    for clip in record["path_to_vid_user_most_recent"]:
        path = Path(video_folder) / clip
        parts.append({"type": "video", clip_key: path.as_uri() if clip_key == "url" else str(path)})
    parts += [{"type": "text", "text": fragment} for fragment in record["utt_user_most_recent"]]
    messages.append({"role": "user", "content": parts})
    return messages


def _context(record):
    return {"situation": record["situation"], "problem_type": record["problem_type"]}


def _assert_same(chat, expected):
    assert set(chat.keys()) == set(expected.keys())
    for key in expected:
        assert torch.equal(chat[key], expected[key]), key


def _inference_record(record):
    """The record as inference input: without its targets (the chat path has none)."""
    return {
        k: v for k, v in record.items() if k not in ("Utterance", "Emotion", "Strategy", "get_emotion_user_most_recent")
    }


# ------------------------------------------------------------------------------------------------
# The chat path equals the records path
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", PROMPT_STYLES)
@pytest.mark.parametrize("dialogue_id", [48, 6])  # 1 clip / 3 clips, both with chat history
def test_chat_equals_records(processor, records, video_folder, style, dialogue_id):
    record = _record(records, dialogue_id)
    assert record["history_chat"] and record["situation"] and record["problem_type"]
    expected = processor(records=[_inference_record(record)], video_folder=str(video_folder), prompt_style=style)
    chat = processor.apply_chat_template(
        _conversation(record, video_folder), tokenize=True, return_dict=True, return_tensors="pt", prompt_style=style
    )
    _assert_same(chat, expected)
    assert chat["pixel_values_videos"].shape[:2] == (1, 4)  # the processor's own 4 frames


def test_five_clips_file_urls_and_context_keywords(processor, records, video_folder):
    record = _record(records, 5)
    assert len(record["path_to_vid_user_most_recent"]) == 5
    expected = processor(records=[record], video_folder=str(video_folder))
    conversation = _conversation(record, video_folder, context_in_system=False, clip_key="url")
    chat = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, **_context(record))
    _assert_same(chat, expected)
    # the same context in a system message, and the same clips under the `video` key
    conversation = _conversation(record, video_folder, clip_key="video")
    _assert_same(processor.apply_chat_template(conversation, tokenize=True, return_dict=True), expected)


def test_context_keywords_are_the_system_message(processor, records, video_folder):
    record = _record(records, 48)
    in_system = processor.apply_chat_template(_conversation(record, video_folder), tokenize=True)
    as_keywords = processor.apply_chat_template(
        _conversation(record, video_folder, context_in_system=False), tokenize=True, **_context(record)
    )
    assert torch.equal(in_system, as_keywords)
    without = processor.apply_chat_template(_conversation(record, video_folder, context_in_system=False), tokenize=True)
    assert not torch.equal(in_system, without)  # the context reaches the prompt
    # the same field both ways: equal values are fine, different ones are an error
    processor.apply_chat_template(_conversation(record, video_folder), situation=record["situation"])
    with pytest.raises(MultimoodChatError, match="'situation' is given both as keyword"):
        processor.apply_chat_template(_conversation(record, video_folder), situation="something else")


def test_text_only_turn(processor, records, video_folder):
    record = _record(records, 48)
    record["path_to_vid_user_most_recent"] = []
    expected = processor(records=[record])
    chat = processor.apply_chat_template(_conversation(record, video_folder), tokenize=True, return_dict=True)
    _assert_same(chat, expected)
    assert "pixel_values_videos" not in chat and "input_features" not in chat


def test_content_as_plain_strings(processor, records, video_folder):
    record = _record(records, 48)
    record["path_to_vid_user_most_recent"] = []
    conversation = _conversation(record, video_folder)
    conversation[-1]["content"] = " ".join(record["utt_user_most_recent"])
    assert all(isinstance(m["content"], str) for m in conversation)
    assert torch.equal(
        processor.apply_chat_template(conversation, tokenize=True), processor(records=[record])["input_ids"]
    )


def test_earlier_turns_are_text(processor, records, video_folder):
    """A clip in an earlier user message is not model input (a record carries the current turn's clips only)."""
    record = _record(records, 48)
    conversation = _conversation(record, video_folder)
    first_user = next(m for m in conversation if m["role"] == "user")
    first_user["content"] = [
        {"type": "video", "path": str(video_folder / "retalking_face_3.mp4")},
        {"type": "text", "text": first_user["content"]},
    ]
    expected = processor(records=[record], video_folder=str(video_folder))
    _assert_same(processor.apply_chat_template(conversation, tokenize=True, return_dict=True), expected)


def test_the_models_own_answers_count_as_their_response(processor, records, video_folder):
    """A chat client sends the model's four-line answers back as assistant messages: the history gets the
    `Response:` text, as the records' history holds the therapist's words."""
    record = _record(records, 48)
    record["path_to_vid_user_most_recent"] = []
    conversation = _conversation(record, video_folder)
    answered = copy.deepcopy(conversation)
    for message in answered:
        if message["role"] == "assistant":
            message["content"] = format_answer("sadness", "neutral", "open question", message["content"])
    assert answered != conversation
    expected = processor(records=[record])["input_ids"]
    assert torch.equal(processor.apply_chat_template(answered, tokenize=True), expected)
    # a therapist message that merely starts like an answer line stays as written
    first = next(i for i, m in enumerate(record["history_chat"]) if m["role"] == "assistant")
    odd, changed = copy.deepcopy(conversation), copy.deepcopy(record)
    odd[1 + first]["content"] = changed["history_chat"][first]["content"] = "Strategy: let us talk about it."
    assert torch.equal(processor.apply_chat_template(odd, tokenize=True), processor(records=[changed])["input_ids"])


def test_batch_of_conversations(processor, records, video_folder):
    first, second = _record(records, 48), _record(records, 74)
    expected = processor(records=[first, second], video_folder=str(video_folder))
    chat = processor.apply_chat_template(
        [_conversation(first, video_folder), _conversation(second, video_folder)], tokenize=True, return_dict=True
    )
    _assert_same(chat, expected)
    texts = processor.apply_chat_template([_conversation(first, video_folder), _conversation(second, video_folder)])
    assert texts == [processor.render_prompt(first), processor.render_prompt(second)]


def test_video_folder_keeps_clips_inside(processor, records, video_folder, tmp_path):
    record = _record(records, 48)
    conversation = _conversation(record, video_folder)
    conversation[-1]["content"][0] = {"type": "video", "path": record["path_to_vid_user_most_recent"][0]}
    expected = processor(records=[record], video_folder=str(video_folder))
    chat = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, video_folder=str(video_folder))
    _assert_same(chat, expected)
    with pytest.raises(MultimoodChatError, match=r"message 15 \(user\), part 0: clip .* outside the video folder"):
        processor.apply_chat_template(_conversation(record, video_folder), video_folder=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Text and ids
# ------------------------------------------------------------------------------------------------


def test_text_and_ids(processor, records, video_folder):
    record = _record(records, 6)
    conversation = _conversation(record, video_folder)
    text = processor.apply_chat_template(conversation)
    assert isinstance(text, str) and text == processor.render_prompt(record)
    assert text.endswith("<|im_start|>assistant\n") and "Situation: " + " ".join(record["situation"].split()) in text
    ids = processor.apply_chat_template(conversation, tokenize=True, return_dict=False, return_tensors="pt")
    expected = processor(records=[record], video_folder=str(video_folder))["input_ids"]
    assert torch.equal(ids, expected)
    # the decoded ids are the text with each placeholder expanded into its run of copies
    decoded = processor.tokenizer.decode(ids[0], skip_special_tokens=False)
    assert re.sub(r"(<video>|<audio>|<history>)\1+", r"\1", decoded) == text
    assert decoded.count("<video>") == processor.video_processor.num_video_tokens()
    # return_tensors=None (what `transformers serve` passes with continuous batching): lists of the same ids
    plain = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors=None)
    assert plain["input_ids"] == expected.tolist()


# ------------------------------------------------------------------------------------------------
# What `transformers serve` sends
# ------------------------------------------------------------------------------------------------


def _openai_messages(record, video_folder):
    """An OpenAI chat-completions request's messages: the clips as `video_url` parts with file:// URLs."""
    messages = [
        {"role": "system", "content": f"Problem type: {record['problem_type']}\nSituation: {record['situation']}"}
    ]
    messages += [{"role": m["role"], "content": m["content"]} for m in record["history_chat"]]
    parts = [
        {"type": "video_url", "video_url": {"url": (Path(video_folder) / clip).as_uri()}}
        for clip in record["path_to_vid_user_most_recent"]
    ]
    parts.append({"type": "text", "text": " ".join(record["utt_user_most_recent"])})
    messages.append({"role": "user", "content": parts})
    return messages


@pytest.mark.parametrize("use_cb", [False, True])
def test_serve_request_keeps_the_models_frames(processor, records, video_folder, use_cb):
    """The messages and keyword arguments of transformers serve's chat-completions handler (converted by the
    server's own code) give the records path's inputs: its `num_frames=32` does not change the frame count."""
    record = _record(records, 6)
    messages = BaseHandler.get_processor_inputs_from_messages(
        _openai_messages(record, video_folder), Modality.MULTIMODAL
    )
    assert messages[-1]["content"][0]["type"] == "video" and messages[-1]["content"][0]["url"].startswith("file://")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inputs = processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tools=None,
            return_tensors=None if use_cb else "pt",
            return_dict=True,
            tokenize=True,
            load_audio_from_video=True,
            num_frames=32,
        )
    assert any("num_frames=32 ignored" in str(w.message) for w in caught)
    expected = processor(records=[record], video_folder=str(video_folder), return_tensors=None if use_cb else "pt")
    if use_cb:
        assert inputs["input_ids"] == expected["input_ids"]
        assert torch.equal(
            torch.as_tensor(inputs["pixel_values_videos"]), torch.as_tensor(expected["pixel_values_videos"])
        )
    else:
        _assert_same(inputs, expected)
    assert len(inputs["pixel_values_videos"][0]) == 4


def test_num_frames_override_when_asked(processor, records, video_folder):
    record = _record(records, 48)
    chat = processor.apply_chat_template(
        _conversation(record, video_folder),
        tokenize=True,
        return_dict=True,
        num_frames=2,
        allow_num_frames_override=True,
    )
    expected = processor(records=[record], video_folder=str(video_folder), num_frames=2)
    _assert_same(chat, expected)
    assert chat["pixel_values_videos"].shape[1] == 2


def test_neutral_and_ignored_keywords(processor, records, video_folder):
    record = _record(records, 48)
    record["path_to_vid_user_most_recent"] = []
    conversation = _conversation(record, video_folder)
    expected = processor(records=[record])["input_ids"]
    same = processor.apply_chat_template(
        conversation,
        tokenize=True,
        tools=[],
        documents=None,
        chat_template=None,
        continue_final_message=False,
        load_audio_from_video=False,
        video_load_backend="pyav",
        sanitize_control_tokens=True,
        processor_kwargs={"k_turn_history": 7},
    )
    assert torch.equal(same, expected)
    fewer = processor.apply_chat_template(conversation, tokenize=True, processor_kwargs={"k_turn_history": 1})
    assert torch.equal(fewer, processor(records=[record], k_turn_history=1)["input_ids"])
    assert fewer.shape[1] < expected.shape[1]


# ------------------------------------------------------------------------------------------------
# Bad messages
# ------------------------------------------------------------------------------------------------


def _turn(*parts):
    return {"role": "user", "content": list(parts)}


TEXT = {"type": "text", "text": "I feel lost."}


def _bad_cases(clip):
    many = [{"type": "video", "path": clip}] * 6
    return {
        "no user turn": ([{"role": "assistant", "content": "Hello."}], r"conversation: has no user message"),
        "unknown part": (
            [_turn({"type": "image", "url": clip}, TEXT)],
            r"conversation, message 0 \(user\), part 0: part type 'image' is not supported",
        ),
        "too many clips": (
            [_turn(*many, TEXT)],
            r"conversation, message 0 \(user\): has 6 video parts, at most 5 clips",
        ),
        "missing file": (
            [_turn({"type": "video", "path": "/nowhere/clip.mp4"}, TEXT)],
            r"message 0 \(user\), part 0: clip '/nowhere/clip.mp4' does not exist",
        ),
        "remote url": (
            [
                {"role": "system", "content": "Situation: at work"},
                _turn(TEXT, {"type": "video", "url": "https://example.com/c.mp4"}),
            ],
            r"message 1 \(user\), part 1: clip 'https://example.com/c.mp4': remote URLs \(https://\) are "
            r"refused",
        ),
        "no source": (
            [_turn({"type": "video"}, TEXT)],
            r"part 0: a video part needs exactly one of 'path', 'url' or 'video'",
        ),
        "no text": (
            [_turn({"type": "video", "path": clip})],
            r"message 0 \(user\): the client's current turn has no text",
        ),
        "answer after turn": (
            [_turn(TEXT), {"role": "assistant", "content": "Why?"}],
            r"message 1 \(assistant\): nothing may follow the client's current turn",
        ),
        "tool role": (
            [{"role": "tool", "content": "{}"}, _turn(TEXT)],
            r"message 0 \(tool\): role 'tool' is not supported",
        ),
        "system prose": (
            [{"role": "system", "content": "You are a helpful assistant."}, _turn(TEXT)],
            r"message 0 \(system\): system text 'You are a helpful assistant.' is not a context line",
        ),
        "bad content": ([{"role": "user", "content": 3}], r"message 0 \(user\): content must be a string or a list"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("x")))
def test_bad_messages(processor, video_folder, case):
    conversation, message = _bad_cases(str(video_folder / "retalking_face_1.mp4"))[case]
    with pytest.raises(MultimoodChatError, match=message) as raised:
        processor.apply_chat_template(conversation, tokenize=True)
    assert isinstance(raised.value, MultimoodError)


def test_bad_conversation_in_a_batch_is_named(processor):
    with pytest.raises(MultimoodChatError, match=r"^conversation 1, message 0 \(user\): the client's current turn"):
        processor.apply_chat_template([[_turn(TEXT)], [_turn()]])


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools= is not supported: MultiMood does not call",
        ),
        ({"chat_template": "{{ messages }}"}, "chat_template= is not supported"),
        ({"num_frames": "many"}, "num_frames must be a positive integer"),
        ({"enable_thinking": True}, r"unknown keyword argument\(s\) \['enable_thinking'\]; accepted: "),
        ({"add_generation_prompt": False}, "add_generation_prompt=False is not supported"),
    ],
)
def test_bad_keywords(processor, keywords, message):
    with pytest.raises(MultimoodChatError, match=message):
        processor.apply_chat_template([_turn(TEXT)], **keywords)


# ------------------------------------------------------------------------------------------------
# Saved folders ship the module
# ------------------------------------------------------------------------------------------------

CLEAN_CHAT = textwrap.dedent(
    """
    import json, sys
    sys.modules["multimood"] = None  # only the saved remote code may be used
    from transformers import AutoProcessor
    folder, conversation = sys.argv[1], json.loads(sys.argv[2])
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    ids = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    print("RESULT " + json.dumps(ids.tolist()))
    """
)


@pytest.mark.slow
def test_saved_processor_chats_in_a_clean_process(processor, records, video_folder, tmp_path):
    folder = tmp_path / "saved"
    processor.save_pretrained(folder)
    assert (folder / "chat_messages.py").is_file()
    record = _record(records, 48)
    conversation = _conversation(record, video_folder)
    ids = run_in_clean_process(CLEAN_CHAT, folder, json.dumps(conversation), cwd=tmp_path)
    assert ids == processor(records=[record], video_folder=str(video_folder))["input_ids"].tolist()
