"""Chat messages -> one MultiMood record: what `MultimoodProcessor.apply_chat_template` reads.

The message list is transformers' multimodal chat format (as Qwen2.5-Omni and VideoLLaMA3 take it, and as
`transformers serve` hands it over from an OpenAI request)::

    [
        {"role": "system", "content": "Problem type: job crisis\\nSituation: lost my job last week"},  # optional
        {"role": "user", "content": "I haven't slept much."},                    # earlier client turn
        {"role": "assistant", "content": "That sounds exhausting."},             # earlier therapist turn
        {"role": "user", "content": [                                            # the current client turn
            {"type": "video", "path": "clips/turn3.mp4"},                         # up to `max_clips` clips
            {"type": "video", "url": "file:///data/clips/turn3b.mp4"},
            {"type": "text", "text": "I keep thinking it was my fault."},
        ]},
    ]

- The LAST user message is the client's current turn: its text parts (joined with spaces) are the client's
  words (`utt_user_most_recent`), its video parts the clips (`path_to_vid_user_most_recent`, in order).
  It must have some text. Nothing may follow it (the model writes the therapist's answer).
- Earlier user / assistant messages are the chat history (`history_chat`), text only: clips of earlier turns
  are not model input (a record carries only the current turn's clips), so their video parts are skipped.
- A video part names its clip by `path`, `url` or `video` (a string): a local path or a `file://` URL.
  Remote URLs (`http://`, `https://`, any other scheme) are refused: the package works offline.
- System (or `developer`) messages carry the two context fields, one per line, `Problem type: ...` and
  `Situation: ...` (keys case-insensitive; a line without a key continues the field above it). Any other
  system text is refused: the model's system prompt is a processor setting (`prompt_style`, `system_prompt`).
  The same fields may come as keyword arguments (`situation=`, `problem_type=`); giving one both ways with
  different values is an error.
- Content is a string or a list of parts; part types are `text` (also `input_text` / `output_text`) and
  `video`. Tool messages, tool calls, images and audio parts are refused (the model reads a clip's own sound).

Errors are `MultimoodChatError` naming the conversation, the message (index and role), the part and the clip.

This file is Hub remote code: it imports only the standard library and its sibling `records`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from .records import MultimoodError

TEXT_PART_TYPES = ("text", "input_text", "output_text")
SYSTEM_ROLES = ("system", "developer")
CONTEXT_KEYS = {"problem type": "problem_type", "problem": "problem_type", "situation": "situation"}
CLIP_KEYS = ("path", "url", "video")

# Keyword arguments of `apply_chat_template` beyond its own: the record's context fields, the options of the records
# path (`processor(records=...)`), those accepted and ignored (passed by transformers' processors and `transformers
# serve`, with no meaning for MultiMood), and those accepted only with their neutral value.
CONTEXT_OPTIONS = ("situation", "problem_type")
CALL_OPTIONS = (
    "prompt_style",
    "k_turn_history",
    "max_length",
    "truncation",
    "padding_side",
    "pad_to_multiple_of",
    "return_frame_indices",
    "video_folder",
)
IGNORED_OPTIONS = {
    "load_audio_from_video": "the model always hears the clips' own sound track",
    "video_load_backend": "clips are decoded with PyAV",
    "sanitize_control_tokens": "message text never produces control or placeholder tokens",
}
NEUTRAL_OPTIONS = {
    "tools": "MultiMood does not call tools",
    "documents": "MultiMood does not read documents",
    "continue_final_message": "the model always starts the therapist's answer",
    "return_assistant_tokens_mask": "there is no assistant turn to mask",
    "chat_template": "the prompt is the processor's (its `prompt_style` and `chat_template.jinja`)",
}


class MultimoodChatError(MultimoodError):
    """A chat message that cannot become a record; `str(error)` names the message, the part and the clip.

    `message_index` / `part_index` are None when the conversation as a whole is wrong.
    """

    def __init__(self, where: str, problem: str, message_index: int | None = None, part_index: int | None = None):
        self.where, self.problem = where, problem
        self.message_index, self.part_index = message_index, part_index
        super().__init__(f"{where}: {problem}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Reader:
    """Reads one conversation; every failure raises `MultimoodChatError` at the message/part it concerns."""

    def __init__(self, conversation_name: str, video_folder: str | os.PathLike | None):
        self.name, self.video_folder = conversation_name, video_folder

    def fail(self, problem: str, message: int | None = None, role: str | None = None, part: int | None = None):
        where = self.name
        if message is not None:
            where += f", message {message}" + (f" ({role})" if role else "")
        if part is not None:
            where += f", part {part}"
        raise MultimoodChatError(where, problem, message, part)

    def parts(self, message: Mapping, index: int, role: str) -> list[Mapping]:
        """The message content as a list of parts (a string is one text part)."""
        content = message.get("content")
        if content is None:
            return []
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)):
            self.fail(f"content must be a string or a list of parts, got {_type_name(content)}", index, role)
        for number, part in enumerate(content):
            if not isinstance(part, Mapping):
                self.fail(f"must be an object with a 'type', got {_type_name(part)}", index, role, number)
            kind = part.get("type")
            if kind not in TEXT_PART_TYPES and kind != "video":
                self.fail(
                    f"part type {kind!r} is not supported: MultiMood reads 'text' and 'video' parts (a clip's sound "
                    "is read from the clip itself)",
                    index,
                    role,
                    number,
                )
            if kind in TEXT_PART_TYPES and not isinstance(part.get("text"), str):
                self.fail(f"text part needs a string 'text', got {_type_name(part.get('text'))}", index, role, number)
        return list(content)

    @staticmethod
    def text(parts: Sequence[Mapping]) -> str:
        return " ".join(part["text"] for part in parts if part["type"] in TEXT_PART_TYPES)

    def clip(self, part: Mapping, index: int, role: str, number: int) -> str:
        """The clip of a video part as the records path takes it: a path (relative to `video_folder` if given)."""
        keys = [key for key in CLIP_KEYS if part.get(key) is not None]
        if len(keys) != 1:
            self.fail(
                "a video part needs exactly one of 'path', 'url' or 'video' (a local path or a file:// URL), "
                f"got {keys or 'none'}",
                index,
                role,
                number,
            )
        value = part[keys[0]]
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            self.fail(
                f"video part {keys[0]!r} must be a non-empty string (a path or a file:// URL), got {_type_name(value)}",
                index,
                role,
                number,
            )
        url = urlparse(value)
        if url.scheme == "file":
            if url.netloc not in ("", "localhost"):
                self.fail(f"clip {value!r}: a file:// URL must name a local file (no host)", index, role, number)
            path = Path(url2pathname(unquote(url.path)))
        elif url.scheme and len(url.scheme) > 1:  # a Windows drive letter is not a scheme
            self.fail(
                f"clip {value!r}: remote URLs ({url.scheme}://) are refused, multimood works offline; download the "
                "clip and pass its path or a file:// URL",
                index,
                role,
                number,
            )
        else:
            path = Path(value)
        return self.local(path, value, index, role, number)

    def local(self, path: Path, value: str, index: int, role: str, number: int) -> str:
        if self.video_folder is None:
            if not path.is_file():
                self.fail(f"clip {value!r} does not exist ({path} is not a file)", index, role, number)
            return os.fspath(path)
        folder = Path(self.video_folder).resolve()
        full = (path if path.is_absolute() else Path(self.video_folder) / path).resolve()
        if not full.is_relative_to(folder):
            self.fail(f"clip {value!r} resolves to {full}, outside the video folder {folder}", index, role, number)
        if not full.is_file():
            self.fail(f"clip {value!r} does not exist ({full} is not a file)", index, role, number)
        return full.relative_to(folder).as_posix()

    def context(self, text: str, index: int, role: str) -> dict[str, str]:
        """`Problem type:` / `Situation:` lines of a system message."""
        fields: dict[str, list[str]] = {}
        current = None
        for line in text.splitlines():
            key, colon, value = line.partition(":")
            name = CONTEXT_KEYS.get(" ".join(key.lower().split())) if colon else None
            if name is not None:
                if name in fields:
                    self.fail(f"the system message gives {name!r} twice", index, role)
                current = name
                fields[name] = [value.strip()]
            elif current is not None:
                fields[current].append(line.strip())
            elif line.strip():
                self.fail(
                    f"system text {line.strip()[:60]!r} is not a context line: a system message holds only "
                    "'Problem type: ...' and 'Situation: ...' lines (the model's system prompt is a processor "
                    "setting)",
                    index,
                    role,
                )
        return {name: " ".join(" ".join(lines).split()) for name, lines in fields.items()}


def conversation_to_record(
    conversation: Sequence[Mapping],
    situation: str | None = None,
    problem_type: str | None = None,
    video_folder: str | os.PathLike | None = None,
    max_clips: int | None = 5,
    name: str = "conversation",
) -> dict[str, Any]:
    """The record of a chat conversation (see the module doc), ready for `processor(records=[record])`.

    Args:
        conversation: the messages.
        situation, problem_type: the context fields (or in a system message).
        video_folder: when given, clips must lie inside it and the record names them relative to it (pass the
            same folder to the records path); otherwise the record holds the paths as given.
        max_clips: at most this many clips in the current turn (None or 0: no limit).
        name: how errors name the conversation.
    """
    reader = _Reader(name, video_folder)
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        reader.fail(f"must be a list of messages, got {_type_name(conversation)}")
    context: dict[str, str] = {}
    turns: list[tuple[int, str, list[Mapping]]] = []
    for index, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            reader.fail(f"must be an object with 'role' and 'content', got {_type_name(message)}", index)
        role = message.get("role")
        if role not in ("user", "assistant") + SYSTEM_ROLES:
            reader.fail(
                f"role {role!r} is not supported: use 'system', 'user' (client) or 'assistant' (therapist)",
                index,
                role if isinstance(role, str) else None,
            )
        if message.get("tool_calls"):
            reader.fail("tool calls are not supported: MultiMood does not call tools", index, role)
        parts = reader.parts(message, index, role)
        if role in SYSTEM_ROLES:
            if any(part["type"] == "video" for part in parts):
                reader.fail("a system message cannot hold a video part", index, role)
            for field_name, value in reader.context(reader.text(parts), index, role).items():
                if field_name in context:
                    reader.fail(f"{field_name!r} is given by an earlier system message too", index, role)
                context[field_name] = value
        else:
            turns.append((index, role, parts))
    last = max((position for position, (_, role, _) in enumerate(turns) if role == "user"), default=None)
    if last is None:
        reader.fail("has no user message: the last user message is the client's current turn")
    if last != len(turns) - 1:
        index, role, _ = turns[last + 1]
        reader.fail(
            "nothing may follow the client's current turn (the last user message): the model writes the "
            "therapist's answer",
            index,
            role,
        )
    index, role, parts = turns[last]
    clips = [reader.clip(part, index, role, number) for number, part in enumerate(parts) if part["type"] == "video"]
    if max_clips and len(clips) > max_clips:
        reader.fail(f"has {len(clips)} video parts, at most {max_clips} clips per client turn", index, role)
    utterance = reader.text(parts)
    if not utterance.strip():
        reader.fail("the client's current turn has no text: MultiMood needs the client's words", index, role)
    for field_name, value in (("situation", situation), ("problem_type", problem_type)):
        if value is None:
            continue
        if not isinstance(value, str):
            reader.fail(f"keyword {field_name}= must be a string, got {_type_name(value)}")
        value = " ".join(value.split())
        if field_name in context and context[field_name] != value:
            reader.fail(
                f"{field_name!r} is given both as keyword ({value!r}) and in a system message ({context[field_name]!r})"
            )
        context[field_name] = value
    history = [{"role": role, "content": reader.text(parts)} for _, role, parts in turns[:last]]
    return {
        "utt_user_most_recent": [utterance],
        "path_to_vid_user_most_recent": clips,
        "history_chat": history,
        "situation": context.get("situation", ""),
        "problem_type": context.get("problem_type", ""),
    }


def chat_options(options: Mapping[str, Any], num_frames: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sort `apply_chat_template`'s extra keyword arguments into (context fields, records-path options).

    `num_frames` (the processor's frames per turn) stays unless `allow_num_frames_override=True` comes with
    another value: `transformers serve` passes `num_frames=32` with every video request (a default of its own,
    not the client's wish), and the frame count is part of how the model was trained. A different `num_frames`
    without the flag is ignored with a warning. `processor_kwargs={...}` (transformers' way) is merged in.
    Unknown names raise `MultimoodChatError`.
    """
    options = dict(options)
    options.update(options.pop("processor_kwargs", None) or {})
    allow_override = bool(options.pop("allow_num_frames_override", False))
    frames = options.pop("num_frames", None)
    context = {name: options.pop(name) for name in CONTEXT_OPTIONS if name in options}
    call = {name: options.pop(name) for name in CALL_OPTIONS if name in options}
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise MultimoodChatError("apply_chat_template", f"num_frames must be a positive integer, got {frames!r}")
    if frames is not None and frames != num_frames:
        if allow_override:
            call["num_frames"] = frames
        else:
            warnings.warn(
                f"apply_chat_template: num_frames={frames} ignored, the model reads {num_frames} frames per client "
                "turn (pass allow_num_frames_override=True to change it)",
                stacklevel=3,
            )
    for name in IGNORED_OPTIONS:
        options.pop(name, None)
    for name, why in NEUTRAL_OPTIONS.items():
        if options.pop(name, None):
            raise MultimoodChatError("apply_chat_template", f"{name}= is not supported: {why}")
    if options:
        accepted = sorted(
            (
                *CONTEXT_OPTIONS,
                *CALL_OPTIONS,
                *IGNORED_OPTIONS,
                *NEUTRAL_OPTIONS,
                "num_frames",
                "allow_num_frames_override",
                "processor_kwargs",
            )
        )
        raise MultimoodChatError(
            "apply_chat_template", f"unknown keyword argument(s) {sorted(options)}; accepted: {', '.join(accepted)}"
        )
    return context, call


__all__ = ["MultimoodChatError", "chat_options", "conversation_to_record"]
