"""The web demo's server side: the functions the Gradio page calls, run directly on real clips.

The model is the quickstart's trained tiny model (its own BPE tokenizer; 4 frames of 56 px, the last 2
clips, 2 audio windows), built once per session by `quickstart_model_folder`, which the browser test
shares. Set MULTIMOOD_DEMO_MODEL to a model folder to use that one instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="the demo needs the `demo` extra (pip install -e '.[demo]')")

from multimood.apps import demo  # noqa: E402
from multimood.training import quickstart  # noqa: E402

NO_AUDIO_CLIP = "videollama2_output_v_1jgsRbGzCls_noaudio.mp4"


def quickstart_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quickstart model folder, trained once per test session (both demo test files call this)."""
    if os.environ.get("MULTIMOOD_DEMO_MODEL"):
        return Path(os.environ["MULTIMOOD_DEMO_MODEL"])

    root = tmp_path_factory.getbasetemp() / "demo_quickstart"
    folder = root / "model"
    if not (folder / "model.safetensors").is_file():
        quickstart.run(quickstart.build_parser().parse_args(
            ["--output_dir", str(folder), "--data_dir", str(root / "data"), "--max_steps", "4"]))
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> demo.DemoModel:
    return demo.load_model(quickstart_model_folder(tmp_path_factory), device="cpu", max_new_tokens=48)


@pytest.fixture(scope="module")
def videos(shared_data) -> Path:
    return shared_data / "media" / "video"


@pytest.fixture(scope="module")
def record(shared_data, videos) -> dict:
    """A real MESC validation turn: its history, the client's words and its clips."""
    line = (shared_data / "records" / "mesc_val_records.jsonl").read_text().splitlines()[0]
    record = json.loads(line)
    record["clips"] = [str(videos / name) for name in record["path_to_vid_user_most_recent"][-3:]]
    return record


@pytest.fixture(scope="module")
def turn(model, record) -> demo.TurnResult:
    return demo.predict(model, record["history_chat"], " ".join(record["utt_user_most_recent"]), record["clips"],
                        record["situation"], record["problem_type"])


def _assert_valid_answer(answer: dict, model: demo.DemoModel) -> None:
    processor = model.processor
    assert answer["client_emotion"] in processor.emotion_labels
    assert answer["therapist_emotion"] in processor.emotion_labels
    assert answer["strategy"] in processor.strategy_labels
    assert answer["response"].strip()


# ----------------------------------------------------------------------------------------------
# A prediction on real clips
# ----------------------------------------------------------------------------------------------


def test_predict_answers_with_valid_labels_and_scores(turn, model):
    _assert_valid_answer(turn.answer, model)
    processor = model.processor
    scores = turn.answer["label_scores"]
    expected = {"client_emotion": processor.emotion_labels, "therapist_emotion": processor.emotion_labels,
                "strategy": processor.strategy_labels}
    for name, labels in expected.items():
        assert list(scores[name]) == list(labels)
        assert sum(scores[name].values()) == pytest.approx(1.0, abs=1e-4)
    assert turn.crisis == []


def test_frame_strip_is_the_processed_frames(turn, model, record):
    """One image per sampled frame, from the clips the model uses; normalising the images again gives
    exactly the processor's pixel values."""
    processor = model.processor
    video = processor.video_processor
    assert len(turn.frames) == video.num_frames
    used = record["clips"][-processor.num_k_vid:]
    first = len(record["clips"]) - len(used)
    batch = processor(records=demo.build_record([], "x", record["clips"], None, None), return_frame_indices=True)
    pixels = batch["pixel_values_videos"][0].numpy()
    for (image, caption), frame, (clip, index) in zip(turn.frames, pixels, batch["frame_indices"][0]):
        assert image.dtype == np.uint8 and image.shape == (video.size["height"], video.size["width"], 3)
        assert image.std() > 5  # a picture, not a flat fill
        assert clip >= first
        assert caption == f"clip {clip + 1} ({Path(record['clips'][clip]).name}) · frame {index}"
        mean = np.asarray(video.image_mean, np.float32)[:, None, None]
        std = np.asarray(video.image_std, np.float32)[:, None, None]
        again = (image.transpose(2, 0, 1).astype(np.float32) * np.float32(video.rescale_factor) - mean) / std
        np.testing.assert_allclose(again, frame, atol=1e-5)
    assert any(f"looks at the last {len(used)} clips" in notice for notice in turn.notices)


def test_audio_windows_cover_the_clips_heard(turn, model, record):
    extractor = model.processor.feature_extractor
    assert len(turn.audio_windows) == extractor.num_windows
    heard = record["clips"][-min(extractor.num_k_vid, model.processor.num_k_vid):]
    names = {Path(clip).name for clip in heard}
    for number, (index, start, end, text) in enumerate(turn.audio_windows, start=1):
        assert index == number
        assert end - start == pytest.approx(extractor.window_seconds, abs=0.02)
        assert any(name in text for name in names)
    figure = turn.audio_figure
    assert figure is not None
    axes = figure.axes[0]
    shaded = [patch for patch in axes.patches if patch.get_alpha() and patch.get_alpha() < 1]
    assert len(shaded) == extractor.num_windows


def test_submit_fills_the_page_and_continue_appends_two_turns(model, record):
    utterance = "I keep lying awake thinking about work."
    history = record["history_chat"][-2:]
    result = demo.submit(model, history, utterance, record["clips"][-1:], "New job", "Occupational burnout")
    assert set(result) == set(demo.SUBMIT_OUTPUTS)
    _assert_valid_answer({k: result[k] for k in ("client_emotion", "therapist_emotion", "strategy", "response")},
                         model)
    assert result["error"]["visible"] is False
    assert result["crisis"]["visible"] is False
    assert result["label_scores"]["visible"] is True and result["label_scores"]["value"] is not None
    assert len(result["frames"]) == model.processor.video_processor.num_frames
    assert result["continue"]["interactive"] is True
    assert result["last_turn"] == {"utterance": utterance, "response": result["response"]}

    turns, box, clips, last, button = demo.continue_conversation(history, result["last_turn"])
    assert turns == [*history, {"role": "user", "content": utterance},
                     {"role": "assistant", "content": result["response"]}]
    assert (box, clips, last, button["interactive"]) == ("", None, None, False)
    assert demo.show_history(turns) == turns


def test_text_only_turn(model):
    result = demo.predict(model, [], "Hello, I don't know where to start.", None, "", None)
    _assert_valid_answer(result.answer, model)
    assert result.frames == [] and result.audio_figure is None and result.audio_windows == []
    assert result.notices == ["No clips: the model answers from the text alone."]


def test_clip_without_audio_is_accepted_and_said(model, videos):
    silent, talking = str(videos / NO_AUDIO_CLIP), str(videos / "retalking_face_2.mp4")
    result = demo.predict(model, [], "I feel numb.", [silent, talking], "", "")
    _assert_valid_answer(result.answer, model)
    assert f"clip 1 ({NO_AUDIO_CLIP}) has no audio track; the model hears silence for it." in result.notices
    assert any("no audio" in text.get_text() for text in result.audio_figure.axes[0].texts)

    alone = demo.submit(model, [], "I feel numb.", [silent], "", "")
    assert alone["error"]["visible"] is False
    assert alone["client_emotion"] in model.processor.emotion_labels
    assert NO_AUDIO_CLIP in alone["notices"] and "None of the clips has an audio track" in alone["notices"]
    assert alone["audio_plot"] is None and alone["audio_windows"] == []


# ----------------------------------------------------------------------------------------------
# Bad input: a readable message in the page
# ----------------------------------------------------------------------------------------------


def _error_of(result: dict) -> str:
    assert result["error"]["visible"] is True
    assert result["client_emotion"] == "" and result["response"] == "" and result["frames"] == []
    assert result["continue"]["interactive"] is False and result["last_turn"] is None
    message = result["error"]["value"]
    assert "Traceback" not in message and 'File "' not in message
    return message


def test_empty_utterance(model, videos):
    message = _error_of(demo.submit(model, [], "   ", [str(videos / "retalking_face_1.mp4")], "", ""))
    assert "utterance" in message and "empty" in message


def test_too_many_clips(model, videos):
    clips = [str(videos / "retalking_face_1.mp4")] * (demo.MAX_CLIPS + 1)
    message = _error_of(demo.submit(model, [], "Hello.", clips, "", ""))
    assert f"{demo.MAX_CLIPS + 1} clips" in message and f"at most {demo.MAX_CLIPS}" in message


def test_unreadable_and_missing_clips(model, videos, tmp_path):
    broken = tmp_path / "upload" / "broken_clip.mp4"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not a video" * 100)
    message = _error_of(demo.submit(model, [], "Hello.", [str(videos / "retalking_face_1.mp4"), str(broken)], "", ""))
    assert "broken_clip.mp4" in message and "cannot read" in message
    assert str(tmp_path) not in message  # upload folders are shortened to the clip's name

    message = _error_of(demo.submit(model, [], "Hello.", [str(tmp_path / "gone.mp4")], "", ""))
    assert "gone.mp4" in message and "does not exist" in message


# ----------------------------------------------------------------------------------------------
# The crisis screen
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Sometimes I think about suicide.", ["suicide"]),
    ("I have been having suicidal thoughts", ["suicide"]),
    ("I want to kill myself", ["kill myself"]),
    ("I just want to end my life.", ["end my life"]),
    ("I've thought about ending it all", ["end it all"]),
    ("I started self-harming again", ["self-harm"]),
    ("I hurt myself last night", ["hurt myself"]),
    ("Some days I want to die", ["want to die"]),
    ("Everyone would be better off if I was gone, I'd be better off dead", ["better off dead"]),
    ("There's no reason to live", ["no reason to live"]),
    ("I took an overdose once", ["overdose"]),
])
def test_crisis_screen_matches(text, expected):
    assert demo.crisis_matches([text]) == expected


@pytest.mark.parametrize("text", [
    "This deadline is killing me.", "My phone died again.", "I killed it at the presentation.",
    "I hurt my back at the gym.", "Let's end the session here.", "I'm dying to see the new film.",
])
def test_crisis_screen_ignores_everyday_phrases(text):
    assert demo.crisis_matches([text]) == []


def test_crisis_box_shows_on_self_harm_and_the_model_still_answers(model, videos):
    clip = [str(videos / "retalking_face_3.mp4")]
    hit = demo.submit(model, [], "I keep thinking I should just hurt myself.", clip, "", "")
    assert hit["crisis"]["visible"] is True
    assert "988" in hit["crisis"]["value"] and "findahelpline.com" in hit["crisis"]["value"]
    assert hit["client_emotion"] in model.processor.emotion_labels and hit["response"]

    quiet = demo.submit(model, [], "Work has been stressful lately.", clip, "", "")
    assert quiet["crisis"]["visible"] is False

    in_history = demo.submit(model, [{"role": "user", "content": "I thought about suicide last year."}],
                             "", clip, "", "")
    assert in_history["crisis"]["visible"] is True  # shown even when the turn itself is refused
    assert in_history["error"]["visible"] is True


def test_disclaimer_is_always_on_the_page(model):
    page = demo.build_demo(model)
    config = page.get_config_file()
    by_id = {c["props"].get("elem_id"): c for c in config["components"] if c["props"].get("elem_id")}
    assert "Research model, not a counsellor" in by_id["disclaimer"]["props"]["value"]
    assert by_id["disclaimer"]["props"]["visible"] is True
    assert by_id["crisis"]["props"]["visible"] is False
    for elem_id in ("clips", "utterance", "submit", "continue", "history", "client-emotion", "therapist-emotion",
                    "strategy", "response", "label-scores", "frames", "audio-windows", "audio-window-table", "error"):
        assert elem_id in by_id, elem_id


# ----------------------------------------------------------------------------------------------
# Building the conversation
# ----------------------------------------------------------------------------------------------


def test_turn_by_turn_paste_and_clear():
    history, box = demo.add_turn([], "Therapist", "  How are you today? ")
    assert (history, box) == ([{"role": "assistant", "content": "How are you today?"}], "")
    history, _ = demo.add_turn(history, "Client", "Tired.")
    assert history[-1] == {"role": "user", "content": "Tired."}
    assert demo.add_turn(history, "Client", "   ")[0] == history

    pasted = "Therapist: What brings you here?\n\nclient: My sister and I\nstopped talking.\nTHERAPIST:Since when?"
    turns, box, error = demo.load_pasted_conversation(history, pasted)
    assert turns == [
        {"role": "assistant", "content": "What brings you here?"},
        {"role": "user", "content": "My sister and I stopped talking."},
        {"role": "assistant", "content": "Since when?"},
    ]
    assert box == "" and error["visible"] is False

    kept, box, error = demo.load_pasted_conversation(turns, "hello there\nClient: hi")
    assert kept == turns and box == "hello there\nClient: hi"
    assert error["visible"] is True and "Line 1" in error["value"]

    assert demo.clear_conversation()[:2] == ([], None)


def test_add_recording_appends_to_the_clips(videos):
    first = str(videos / "retalking_face_1.mp4")
    assert demo.add_recording([first], "/tmp/recording.webm") == ([first, "/tmp/recording.webm"], None)
    assert demo.add_recording(None, None) == ([], None)


def test_cli_defaults():
    args = demo.build_parser().parse_args(["--model", "outputs/quickstart"])
    assert (args.model, args.port, args.host, args.share) == ("outputs/quickstart", 7860, "127.0.0.1", False)
