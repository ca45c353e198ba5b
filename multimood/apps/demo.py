"""`multimood demo`: a Gradio page to try a MultiMood model on clips of a client and a conversation.

    multimood demo --model outputs/quickstart [--port 7860] [--host 127.0.0.1] [--share]

The page takes up to `MAX_CLIPS` short clips of the client (uploaded, or recorded with the webcam), the
client's current utterance, the earlier conversation (pasted as `Client:` / `Therapist:` lines or built
turn by turn), the situation and the problem type. It shows the client's emotion, the therapist's emotion
and strategy (with the label probabilities as bar charts when the pipeline returns them), the response,
the frames the model looked at and the audio windows it heard. "Continue" moves the client utterance and
the response into the conversation so the next client turn can be entered; the clips belong to the turn
they were given with and are cleared then.

Everything the page does goes through plain functions (`predict`, `submit`, `continue_conversation`,
`add_turn`, `load_pasted_conversation`, ...) that the Gradio events call and that the tests call directly.
Expected input problems (empty utterance, too many clips, unreadable clips) are shown as a message in the
page; a clip without an audio track is accepted (the model hears silence for it) and said so.

The page states that this is a research model, not a counsellor, and shows crisis resources when the
input matches `CRISIS_PATTERNS` (a plain keyword screen, documented in the README); the model still runs.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..evaluation.predict import load_pipeline
from ..model.media import decode_audio
from ..model.records import SPEAKER_NAMES, speaker_role, split_speaker_prefix

if TYPE_CHECKING:
    import gradio as gr
    from matplotlib.figure import Figure

MAX_CLIPS = 5
DEFAULT_PORT = 7860
DEFAULT_MAX_NEW_TOKENS = 128
SPEAKERS = list(SPEAKER_NAMES.values())  # the page's speaker choices: "Client", "Therapist"

# MESC's problem types (the published model's training data); any other text may be typed.
PROBLEM_TYPES = [
    "The relationship with friends and family",
    "Therapeutic Relationship",
    "Emotional Transference or Infidelity",
    "Self-Assessment or Assessment of Others",
    "Childhood Shadow",
    "Parental Influence",
    "Occupational burnout",
    "Job Loss or Career Setbacks",
    "Breakups or Divorce",
    "Illness Coping",
    "Bereavement",
    "Interpersonal Relationships",
    "Post-Traumatic Stress Disorder",
    "Personal development",
    "Self-punishment",
    "Parenting confusion",
]

# The crisis keyword screen: case-insensitive regular expressions checked on the utterance, the
# conversation and the situation after `normalise_for_screen`. A match shows `CRISIS_RESOURCES`; it is a simple
# screen, not a classifier.
CRISIS_PATTERNS = {
    "suicide": r"\bsuicid(e|es|al|ality)\b",
    "kill myself": r"\bkill(ing)?\s*my\s*self\b",
    "end my life": r"\b(end(ing)?|take|taking)\s+my\s+(own\s+)?life\b",
    "end it all": r"\bend(ing)?\s+it\s+all\b",
    "self-harm": r"\bself[\s-]?harm(ing)?\b",
    "hurt myself": r"\b(hurt(ing)?|harm(ing)?|cut(ting)?|injur(e|ing))\s+my\s*self\b",
    "want to die": r"\b(want(ed)?|wish|going)\s+(I\s+was\s+|I\s+were\s+)?(to\s+)?(die|be\s+dead|dead)\b",
    "better off dead": r"\bbetter\s+off\s+dead\b",
    "no reason to live": r"\b(no\s+reason\s+to\s+live|not\s+worth\s+living)\b",
    "overdose": r"\boverdos(e|ed|ing)\b",
    # "live"/"exist" only where the sentence stops or goes on with "anymore", "like this": not "live in Paris"
    "don't want to live": r"\b(don'?t|do\s+not|never)\s+(really\s+|even\s+)?want\s+to\s+(be\s+alive\b|(live|exist)"
                          r"(?=\s*(any\s*more|any\s+longer|like\s+this|[.!?,;:)]|$)))",
    "rather be dead": r"\b(I'?d|I\s+would)\s+(\w+\s+)?rather\s+(just\s+)?(be\s+dead|die|not\s+be\s+alive|not\s+exist|"
                      r"not\s+wake\s+up)\b",
}
_CRISIS_REGEXES = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in CRISIS_PATTERNS.items()}

# Letters of other scripts drawn like Latin ones (Cyrillic, Greek), typographic apostrophes and dashes: mapped to
# the plain character before the screen runs, so "kіll" with a Cyrillic і or "don’t" with a curly apostrophe match.
_SCREEN_CONFUSABLES = str.maketrans({
    **dict(zip("аеорсухіјѕһԁԛԝӏкАВЕКМНОРСТХУІЈЅ", "aeopcyxijshdqwlkABEKMHOPCTXYIJS", strict=True)),
    **dict(zip("αοικνρυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "aoiknpuxABEZHIKMNOPTYX", strict=True)),
    **dict.fromkeys("\u2018\u2019\u201b\u02bc\u02bb\u00b4\u0060\u2032", "'"),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"),
})

DISCLAIMER = (
    "<b>Research model, not a counsellor.</b> MultiMood is a research model for emotional-support dialogue. "
    "Its labels and replies can be wrong, unhelpful or inappropriate. Do not use it for real counselling, "
    "diagnosis or crisis support. If you need help, talk to a qualified professional."
)
CRISIS_RESOURCES = (
    "<b>If you or someone else may be in danger, please reach out now.</b><ul>"
    "<li>Emergency services: call your local emergency number (911 in the US and Canada, 112 in the EU, "
    "999 in the UK).</li>"
    "<li>US: call or text <b>988</b> (988 Suicide &amp; Crisis Lifeline), or chat at 988lifeline.org.</li>"
    "<li>UK and Ireland: Samaritans, <b>116 123</b>.</li>"
    "<li>Other countries: <a href='https://findahelpline.com' target='_blank'>findahelpline.com</a> lists "
    "free, confidential helplines.</li></ul>"
    "This page is a research demo and cannot help in a crisis."
)
CSS = """
#disclaimer {border: 2px solid #b45309; border-radius: 8px; padding: 8px 12px; background: #fffbeb; color: #1f2937}
#crisis {border: 3px solid #b91c1c; border-radius: 8px; padding: 8px 12px; background: #fef2f2; color: #1f2937}
#error {border: 2px solid #b91c1c; border-radius: 8px; padding: 8px 12px; color: #b91c1c}
#notices {color: #374151}
"""

# Keys of `submit`'s result, in the order of the Gradio outputs.
SUBMIT_OUTPUTS = (
    "client_emotion", "therapist_emotion", "strategy", "response", "label_scores", "frames", "audio_plot",
    "audio_windows", "notices", "error", "crisis", "last_turn", "continue",
)


class DemoInputError(ValueError):
    """Input the page refuses before running the model; the message is shown as it is."""


@dataclass
class DemoModel:
    """The loaded pipeline and what the page needs to know about it (loaded once per server)."""

    pipe: Any
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @property
    def processor(self) -> Any:
        return self.pipe.processor


@dataclass
class TurnResult:
    """What one prediction shows: the answer, the frames and audio windows the model got, notices."""

    answer: dict
    frames: list[tuple[np.ndarray, str]]
    audio_figure: Figure | None  # None without clips or when no clip has audio
    audio_windows: list[list]
    notices: list[str]
    crisis: list[str]


def load_model(model_dir: str | os.PathLike, device: str | None = None,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> DemoModel:
    """The "emotional-support" pipeline of a saved model folder or Hub repo: its model and processor code,
    this package's pipeline class (so label scores are there whatever pipeline file the folder carries)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(os.fspath(model_dir), device=device)
    return DemoModel(pipe=pipe, max_new_tokens=max_new_tokens)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def normalise_for_screen(text: str) -> str:
    """The text the crisis screen reads: Unicode NFKC (full-width and other compatibility forms become plain
    letters), without format characters (zero-width spaces and joiners, soft hyphens: category Cf) and combining
    marks, with Cyrillic/Greek look-alike letters, curly apostrophes and typographic dashes made plain."""
    decomposed = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    kept = "".join(char for char in decomposed if unicodedata.category(char) not in ("Cf", "Mn"))
    return unicodedata.normalize("NFC", kept).translate(_SCREEN_CONFUSABLES)


def crisis_matches(texts: Iterable[str | None]) -> list[str]:
    """Names of the `CRISIS_PATTERNS` that any of `texts` matches (after `normalise_for_screen`), in the
    patterns' order."""
    joined = normalise_for_screen("\n".join(text for text in texts if text))
    return [name for name, regex in _CRISIS_REGEXES.items() if regex.search(joined)]


def clip_paths(clips: Sequence[Any] | None) -> list[str]:
    """File paths of the clip component's value (paths, or file objects with a `name`)."""
    return [os.fspath(getattr(clip, "name", clip)) for clip in clips or []]


def check_inputs(utterance: str | None, clips: Sequence[str]) -> None:
    """Refuse what the model cannot take, with a message for the page."""
    if not (utterance or "").strip():
        raise DemoInputError("Type the client's current utterance: it is empty.")
    if len(clips) > MAX_CLIPS:
        names = ", ".join(Path(clip).name for clip in clips)
        raise DemoInputError(
            f"{len(clips)} clips were given ({names}); the model takes at most {MAX_CLIPS}. Remove some clips."
        )


def _history_text(history: Sequence[dict]) -> list[str]:
    return [turn["content"] for turn in history]


def parse_conversation(text: str) -> list[dict]:
    """Pasted lines -> turns. A line starting with `Client:` or `Therapist:` starts a turn; other lines
    continue the turn above them; blank lines are skipped."""
    turns: list[dict] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        role, rest = split_speaker_prefix(line)
        if role is not None:
            turns.append({"role": role, "content": rest.strip()})
        elif turns:
            turns[-1]["content"] = f"{turns[-1]['content']} {line}".strip()
        else:
            raise DemoInputError(f"Line {number} of the pasted conversation must start with 'Client:' or 'Therapist:'.")
    empty = [i + 1 for i, turn in enumerate(turns) if not turn["content"]]
    if empty:
        raise DemoInputError(f"Turn {empty[0]} of the pasted conversation is empty.")
    return turns


# ----------------------------------------------------------------------------------------------
# The prediction and what the model saw
# ----------------------------------------------------------------------------------------------


def build_record(history: Sequence[dict], utterance: str, clips: Sequence[str], situation: str | None,
                 problem_type: str | None) -> dict:
    """One therapist turn in the dialogue record schema (the form both the processor and the pipeline take)."""
    record: dict[str, Any] = {
        "Dialogue_ID": "demo",
        "utt_user_most_recent": [utterance.strip()],
        "history_chat": [{"role": turn["role"], "content": turn["content"]} for turn in history],
    }
    if clips:
        record["path_to_vid_user_most_recent"] = list(clips)
    if (situation or "").strip():
        record["situation"] = situation.strip()
    if (problem_type or "").strip():
        record["problem_type"] = problem_type.strip()
    return record


def clip_label(position: int, path: str) -> str:
    return f"clip {position + 1} ({Path(path).name})"


def frame_strip(processor: Any, record: dict) -> list[tuple[np.ndarray, str]]:
    """The processed frames of `record` as uint8 images (de-normalised), captioned with clip and frame index."""
    batch = processor(records=record, return_frame_indices=True, return_tensors="pt")
    if "pixel_values_videos" not in batch:
        return []
    video = processor.video_processor
    mean = np.asarray(video.image_mean, np.float32)[:, None, None]
    std = np.asarray(video.image_std, np.float32)[:, None, None]
    pixels = batch["pixel_values_videos"][0].float().numpy()
    clips = record["path_to_vid_user_most_recent"]
    strip = []
    for frame, (clip, index) in zip(pixels, batch["frame_indices"][0]):
        levels = (frame * std + mean) / video.rescale_factor
        image = np.clip(np.rint(levels), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        strip.append((image, f"{clip_label(clip, clips[clip])} · frame {index}"))
    return strip


def audio_windows(feature_extractor: Any, clips: Sequence[str], first_position: int
                  ) -> tuple[Figure | None, list[list], list[str]]:
    """(waveform figure with the windows shaded, one table row per window, notices) for the clips the
    feature extractor uses; `first_position` is the position of `clips[0]` in the turn's clip list."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional (demo extra), only for a turn with audio

    rate = feature_extractor.sampling_rate
    tracks = [decode_audio(Path(clip), "demo", rate=rate) for clip in clips]
    labels = [clip_label(first_position + i, clip) for i, clip in enumerate(clips)]
    notices = [
        f"{label} has no audio track; the model hears silence for it."
        for label, (_, has_audio) in zip(labels, tracks) if not has_audio
    ]
    if not any(has_audio for _, has_audio in tracks):
        notices.append("None of the clips has an audio track: the model hears silence for this turn.")
        return None, [], notices
    starts = np.cumsum([0] + [len(samples) / rate for samples, _ in tracks])
    total = float(starts[-1])
    spans = feature_extractor.window_spans(total)
    rows = []
    for number, (start, end) in enumerate(spans, start=1):
        heard = []
        for label, offset, stop in zip(labels, starts[:-1], starts[1:]):
            low, high = max(start, offset), min(end, stop)
            if high > low:
                heard.append(f"{label} {low - offset:.2f}–{high - offset:.2f} s")
        if end > total:
            heard.append(f"cut {end - max(start, total):.2f} s short at the end of the audio")
        rows.append([number, round(start, 2), round(end, 2), "; ".join(heard)])

    waveform = np.concatenate([samples for samples, _ in tracks]).astype(np.float32)
    figure = Figure(figsize=(10, 2.8), layout="constrained")
    axes = figure.add_subplot()
    bucket = max(1, len(waveform) // 2000)  # min/max envelope: a few thousand points whatever the length
    usable = len(waveform) // bucket * bucket
    if usable:
        blocks = waveform[:usable].reshape(-1, bucket)
        times = (np.arange(blocks.shape[0]) + 0.5) * bucket / rate
        axes.fill_between(times, blocks.min(1), blocks.max(1), color="#1f2937", linewidth=0)
    for number, (start, end) in enumerate(spans, start=1):
        axes.axvspan(start, end, color="#f97316", alpha=0.22)
        axes.text((start + end) / 2, 1.02, str(number), ha="center", va="bottom", fontsize=8,
                  transform=axes.get_xaxis_transform())
    for label, (_, has_audio), offset, stop in zip(labels, tracks, starts[:-1], starts[1:]):
        if not has_audio:
            axes.axvspan(offset, stop, facecolor="none", edgecolor="#9ca3af", hatch="//", linewidth=0)
        axes.axvline(offset, color="#2563eb", linewidth=1)
        axes.text((offset + stop) / 2, 0.02, label + ("" if has_audio else " — no audio"), ha="center",
                  va="bottom", fontsize=8, color="#2563eb", transform=axes.get_xaxis_transform())
    axes.set_xlim(0, max(total, spans[-1][1]))
    axes.set_ylim(-1, 1)
    axes.set_xlabel("seconds on the clips' joined audio timeline")
    axes.set_yticks([])
    axes.set_title(f"Audio windows the model heard ({len(spans)} × {feature_extractor.window_seconds:g} s)",
                   fontsize=10, pad=14)
    return figure, rows, notices


def label_figure(label_scores: dict[str, dict[str, float]], answer: dict) -> Figure:
    """Horizontal bar charts of each label line's probabilities; the chosen label is highlighted."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional (demo extra), only when scores are shown

    titles = {"client_emotion": "Client emotion", "therapist_emotion": "Therapist emotion", "strategy": "Strategy"}
    fields = [name for name in titles if name in label_scores]
    sizes = [len(label_scores[name]) for name in fields]
    figure = Figure(figsize=(7, 0.24 * sum(sizes) + 0.9 * len(fields)), layout="constrained")
    grid = figure.add_gridspec(len(fields), 1, height_ratios=sizes)
    for row, name in enumerate(fields):
        axes = figure.add_subplot(grid[row])
        labels = list(label_scores[name])
        values = [label_scores[name][label] for label in labels]
        colours = ["#ea580c" if label == answer.get(name) else "#9ca3af" for label in labels]
        axes.barh(labels, values, color=colours)
        axes.invert_yaxis()
        axes.set_xlim(0, 1)
        axes.set_title(titles[name], fontsize=10, loc="left")
        axes.tick_params(labelsize=8)
        for y, value in enumerate(values):
            axes.text(min(value + 0.01, 0.9), y, f"{value:.2f}", va="center", fontsize=7)
    return figure


def predict(model: DemoModel, history: Sequence[dict], utterance: str | None, clips: Sequence[Any] | None,
            situation: str | None, problem_type: str | None) -> TurnResult:
    """Run the model on one client turn. Raises `DemoInputError` for refused input, and the processor's
    `ValueError` / `FileNotFoundError` (naming the clip) for clips it cannot read."""
    paths = clip_paths(clips)
    crisis = crisis_matches([utterance, situation, *_history_text(history)])
    check_inputs(utterance, paths)
    record = build_record(history, utterance, paths, situation, problem_type)
    processor = model.processor
    notices = []
    frames, figure, windows = [], None, []
    if paths:
        used = paths[-processor.num_k_vid :] if processor.num_k_vid else paths
        first = len(paths) - len(used)
        if first:
            notices.append(f"This model looks at the last {len(used)} clips only: "
                           f"{', '.join(clip_label(i, p) for i, p in enumerate(paths[:first]))} not used.")
        frames = frame_strip(processor, record)
        extractor = processor.feature_extractor
        heard = used[-extractor.num_k_vid :] if extractor.num_k_vid else used
        figure, windows, audio_notices = audio_windows(extractor, heard, len(paths) - len(heard))
        notices += audio_notices
    else:
        notices.append("No clips: the model answers from the text alone.")
    answer = model.pipe(record, max_new_tokens=model.max_new_tokens, return_label_scores=True)
    if answer.get("unknown_labels"):
        notices.append(f"The answer was cut before all labels were generated: {sorted(answer['unknown_labels'])}.")
    return TurnResult(answer=answer, frames=frames, audio_figure=figure, audio_windows=windows, notices=notices,
                      crisis=crisis)


# ----------------------------------------------------------------------------------------------
# What the Gradio events call
# ----------------------------------------------------------------------------------------------


def _gradio() -> Any:
    """Gradio, imported on first use: it is the optional `demo` extra and takes seconds to import, while the
    page's plain functions (and their tests) run without it."""
    import gradio  # noqa: PLC0415 - optional heavy dependency, see the docstring

    return gradio


def _update(**kwargs) -> dict:
    return _gradio().update(**kwargs)


def _notices_html(notices: Sequence[str]) -> str:
    return "".join(f"<p>ℹ️ {html.escape(notice)}</p>" for notice in notices)


def _crisis_update(crisis: Sequence[str]) -> dict:
    return _update(value=CRISIS_RESOURCES if crisis else "", visible=bool(crisis))


def _readable(error: Exception, clips: Sequence[str]) -> str:
    """The error's message with upload paths shortened to the clip names the user knows."""
    message = str(error)
    for clip in sorted(clips, key=len, reverse=True):
        message = message.replace(clip, Path(clip).name)
    return message


def submit(model: DemoModel, history: Sequence[dict], utterance: str | None, clips: Sequence[Any] | None,
           situation: str | None, problem_type: str | None) -> dict[str, Any]:
    """The page's values after "Submit", keyed as `SUBMIT_OUTPUTS`; expected errors become a message."""
    paths = clip_paths(clips)
    try:
        result = predict(model, history, utterance, paths, situation, problem_type)
    except (ValueError, FileNotFoundError) as error:
        message = f"<b>Cannot answer this turn.</b> {html.escape(_readable(error, paths))}"
        return {
            "client_emotion": "", "therapist_emotion": "", "strategy": "", "response": "",
            "label_scores": _update(value=None, visible=False), "frames": [], "audio_plot": None,
            "audio_windows": [], "notices": "", "error": _update(value=message, visible=True),
            "crisis": _crisis_update(crisis_matches([utterance, situation, *_history_text(history)])),
            "last_turn": None, "continue": _update(interactive=False),
        }
    answer = result.answer
    scores = answer.get("label_scores")
    return {
        "client_emotion": answer.get("client_emotion") or "",
        "therapist_emotion": answer.get("therapist_emotion") or "",
        "strategy": answer.get("strategy") or "",
        "response": answer.get("response") or "",
        "label_scores": _update(value=label_figure(scores, answer) if scores else None, visible=bool(scores)),
        "frames": result.frames,
        "audio_plot": result.audio_figure,
        "audio_windows": result.audio_windows,
        "notices": _notices_html(result.notices),
        "error": _update(value="", visible=False),
        "crisis": _crisis_update(result.crisis),
        "last_turn": {"utterance": (utterance or "").strip(), "response": answer.get("response") or ""},
        "continue": _update(interactive=bool(answer.get("response"))),
    }


def continue_conversation(history: Sequence[dict], last_turn: dict | None) -> tuple[list[dict], str, None, None, dict]:
    """(history + the client turn + the model's response, empty utterance, no clips, no last turn, Continue off)."""
    turns = list(history)
    if last_turn:
        turns += [{"role": "user", "content": last_turn["utterance"]},
                  {"role": "assistant", "content": last_turn["response"]}]
    return turns, "", None, None, _update(interactive=False)


def add_turn(history: Sequence[dict], speaker: str, text: str | None) -> tuple[list[dict], str]:
    """(history with one more turn of `speaker` ("Client" or "Therapist"), empty text box); blank text adds nothing."""
    text = (text or "").strip()
    if not text:
        return list(history), ""
    return [*history, {"role": speaker_role(speaker), "content": text}], ""


def load_pasted_conversation(history: Sequence[dict], text: str | None) -> tuple[list[dict], str, dict]:
    """(turns of the pasted text replacing the history, empty paste box, error box); a bad paste keeps the history."""
    try:
        turns = parse_conversation(text or "")
    except DemoInputError as error:
        message = f"<b>Cannot read the conversation.</b> {html.escape(str(error))}"
        return list(history), text or "", _update(value=message, visible=True)
    return turns, "", _update(value="", visible=False)


def clear_conversation() -> tuple[list[dict], None, dict]:
    """(no history, no last turn, Continue off)."""
    return [], None, _update(interactive=False)


def show_history(history: Sequence[dict]) -> list[dict]:
    """The chatbot's messages: the history turns are already role/content messages (client = user)."""
    return [dict(turn) for turn in history]


def add_recording(clips: Sequence[Any] | None, recording: str | None) -> tuple[list[str], None]:
    """(clips + the webcam recording, an empty recorder)."""
    paths = clip_paths(clips)
    return (paths + [recording] if recording else paths), None


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------


def _input_column(gr: Any) -> dict[str, Any]:
    """The turn's inputs: clips (uploaded or recorded), utterance, situation, problem type, Submit / Continue."""
    parts: dict[str, Any] = {}
    parts["clips"] = gr.File(label=f"Clips of the client for this turn (up to {MAX_CLIPS}, oldest first)",
                             file_count="multiple", file_types=["video"], type="filepath", elem_id="clips")
    with gr.Accordion("Record a clip with the webcam", open=False):
        parts["recorder"] = gr.Video(sources=["webcam"], include_audio=True, label="Recording", elem_id="recorder")
        parts["add_recording"] = gr.Button("Add the recording to the clips", elem_id="add-recording")
    parts["utterance"] = gr.Textbox(label="Client's current utterance", lines=2, elem_id="utterance",
                                    placeholder="What the client says now")
    parts["situation"] = gr.Textbox(label="Situation", lines=2, elem_id="situation")
    parts["problem_type"] = gr.Dropdown(PROBLEM_TYPES, value=None, allow_custom_value=True, label="Problem type",
                                        elem_id="problem-type")
    with gr.Row():
        parts["submit"] = gr.Button("Submit", variant="primary", elem_id="submit")
        parts["continue"] = gr.Button("Continue the conversation", interactive=False, elem_id="continue")
    return parts


def _conversation_column(gr: Any) -> dict[str, Any]:
    """The earlier conversation: the chat view, adding a turn, clearing, pasting a whole conversation."""
    parts: dict[str, Any] = {}
    parts["chat"] = gr.Chatbot(label="Earlier conversation (client: right, therapist: left)", height=320,
                               elem_id="history")
    with gr.Row():
        parts["speaker"] = gr.Dropdown(SPEAKERS, value="Client", label="Speaker", scale=1, elem_id="turn-role")
        parts["turn_text"] = gr.Textbox(label="Turn", scale=3, elem_id="turn-text")
    with gr.Row():
        parts["add_turn"] = gr.Button("Add turn", elem_id="add-turn")
        parts["clear"] = gr.Button("Clear conversation", elem_id="clear-history")
    with gr.Accordion("Paste a conversation", open=False):
        parts["pasted"] = gr.Textbox(label="One turn per line, starting with 'Client:' or 'Therapist:'", lines=5,
                                     elem_id="paste")
        parts["paste"] = gr.Button("Use the pasted conversation", elem_id="paste-load")
    return parts


def _answer_area(gr: Any, frames_per_turn: int) -> dict[str, Any]:
    """What a prediction shows, keyed as `SUBMIT_OUTPUTS` (less the state and the Continue button): messages,
    labels, response, label probabilities, the frames and the audio windows."""
    parts: dict[str, Any] = {}
    parts["error"] = gr.HTML("", visible=False, elem_id="error")
    parts["notices"] = gr.HTML("", elem_id="notices")
    with gr.Row():
        with gr.Column():
            parts["client_emotion"] = gr.Textbox(label="Client emotion", interactive=False, elem_id="client-emotion")
            parts["therapist_emotion"] = gr.Textbox(label="Therapist emotion", interactive=False,
                                                    elem_id="therapist-emotion")
            parts["strategy"] = gr.Textbox(label="Strategy", interactive=False, elem_id="strategy")
            parts["response"] = gr.Textbox(label="Response", interactive=False, lines=4, elem_id="response")
        with gr.Column():
            parts["label_scores"] = gr.Plot(label="Label probabilities", visible=False, elem_id="label-scores")
    columns = min(frames_per_turn, 8)
    rows = -(-frames_per_turn // columns)
    parts["frames"] = gr.Gallery(label=f"Frames the model looked at ({frames_per_turn} per turn)", columns=columns,
                                 rows=rows, height=rows * (1200 // columns) + 60, object_fit="contain",
                                 elem_id="frames")
    parts["audio_plot"] = gr.Plot(label="Audio windows the model heard", elem_id="audio-windows")
    parts["audio_windows"] = gr.Dataframe(headers=["window", "start (s)", "end (s)", "heard from"],
                                          label="Audio windows", interactive=False, elem_id="audio-window-table")
    return parts


def _connect_events(model: DemoModel, history: Any, last_turn: Any, turn: dict[str, Any],
                    conversation: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Wire the buttons to the plain functions above (`submit`, `continue_conversation`, `add_turn`, ...)."""

    def on_submit(*values):
        result = submit(model, *values)
        return [result[key] for key in SUBMIT_OUTPUTS]

    turn_inputs = [history, turn["utterance"], turn["clips"], turn["situation"], turn["problem_type"]]
    turn["submit"].click(on_submit, turn_inputs, [outputs[key] for key in SUBMIT_OUTPUTS], api_name="predict")
    turn["continue"].click(continue_conversation, [history, last_turn],
                           [history, turn["utterance"], turn["clips"], last_turn, turn["continue"]])
    new_turn = [history, conversation["speaker"], conversation["turn_text"]]
    conversation["add_turn"].click(add_turn, new_turn, [history, conversation["turn_text"]])
    conversation["turn_text"].submit(add_turn, new_turn, [history, conversation["turn_text"]])
    conversation["paste"].click(load_pasted_conversation, [history, conversation["pasted"]],
                                [history, conversation["pasted"], outputs["error"]])
    conversation["clear"].click(clear_conversation, None, [history, last_turn, turn["continue"]])
    turn["add_recording"].click(add_recording, [turn["clips"], turn["recorder"]], [turn["clips"], turn["recorder"]])
    history.change(show_history, history, conversation["chat"], api_visibility="private")


def build_demo(model: str | os.PathLike | DemoModel, device: str | None = None,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> gr.Blocks:
    """The Gradio page of `model` (a model folder or Hub repo, loaded once here, or a loaded `DemoModel`)."""
    gr = _gradio()
    if not isinstance(model, DemoModel):
        model = load_model(model, device=device, max_new_tokens=max_new_tokens)
    frames_per_turn = int(model.processor.video_processor.num_frames)

    with gr.Blocks(title="MultiMood demo", analytics_enabled=False) as demo:
        history = gr.State([])
        last_turn = gr.State(None)
        gr.Markdown("# MultiMood: multimodal emotional support\nThe client's clips, words and the conversation "
                    "so far → the client's emotion, the therapist's emotion and strategy, and a response.")
        gr.HTML(DISCLAIMER, elem_id="disclaimer")
        crisis = gr.HTML("", visible=False, elem_id="crisis")
        with gr.Row():
            with gr.Column():
                turn = _input_column(gr)
            with gr.Column():
                conversation = _conversation_column(gr)
        outputs = {**_answer_area(gr, frames_per_turn), "crisis": crisis, "last_turn": last_turn,
                   "continue": turn["continue"]}
        _connect_events(model, history, last_turn, turn, conversation, outputs)
    return demo


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False) -> None:
    """Serve the page (blocks); `host=None` lets Gradio read GRADIO_SERVER_NAME (as Hugging Face Spaces set it)."""
    gr = _gradio()
    # one prediction at a time (one model in memory); the default theme's fonts are served by Gradio itself,
    # so the page needs no internet
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=share, theme=gr.themes.Default(), css=CSS, show_error=False,
        max_file_size="200mb",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimood demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (e.g. from `multimood quickstart`) or Hub repo id")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for every interface)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_demo(args.model, device=args.device, max_new_tokens=args.max_new_tokens)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
