"""MultiMood records: the schema of one therapist turn, the label sets, the chat history, the one validator
every entry point uses, the answer format the model learns and the parser that reads it back.

A record is one therapist turn of a counselling session:

| field | type | role |
|---|---|---|
| `Dialogue_ID` | string (ints in files are turned into strings) | required in files |
| `utt_user_most_recent` | non-empty list of strings: the client's latest fragments (some text needed) | model input |
| `Utterance` | non-empty list of strings: the therapist's fragments | target |
| `Emotion` | string or null: the therapist's emotion (null where a corpus has none: ESConv) | target |
| `Strategy` | non-empty string | target |
| `get_emotion_user_most_recent` | non-empty string: the client's emotion | target |
| `path_to_vid_user_most_recent` | list of strings: clip paths, relative to the video folder | optional, `[]` |
| `history_chat` | list of `{"role": "user"/"assistant", "content"}` messages | optional, `[]` |
| `history_chat_mamba` | string: the history for the compressor | optional, `""` |
| `situation`, `problem_type` | strings | optional, `""` |

`validate_record` checks a record against the schema and, when label lists are given, its labels against
the label sets, and returns it in the canonical form:

- list fields (`utt_user_most_recent`, `Utterance`, `path_to_vid_user_most_recent`) are lists of
  strings; `utt_user_most_recent` and `Utterance` must hold some text (the client's latest words
  are the model's input; the response is the target);
- `history_chat` becomes `{"role": "user"/"assistant", "content"}` messages (see `normalize_history`:
  `Client: ` / `Therapist: ` prefixed strings and the roles `client` / `therapist` are accepted);
- labels (`get_emotion_user_most_recent`, `Emotion`, `Strategy`) are matched against the label sets
  ignoring case, surrounding and repeated white space and one trailing full stop, and returned in
  the label set's spelling (`"Sadness "` -> `"sadness"`); any other value (`"ecstatic"`) is an error
  naming the field and the labels. `Emotion` may be null (a corpus without the therapist's emotion,
  such as ESConv) unless targets are required and labels are checked: a training target needs it.

`strict=True` is the file schema (`Dialogue_ID` required, list fields must be lists); `strict=False` also
accepts the conveniences of Python callers (a string for a list field, no `Dialogue_ID`). Both apply the
same rules otherwise, so a record that validates also trains.

The answer (`format_answer`) is four lines: `Client emotion: ...`, `Therapist emotion: ...`, `Strategy:
...`, `Response: ...`, or, under a published prompt style, the published `Client's emotion: ... \\n` lines
(`PUBLISHED_ANSWER_TEMPLATE`). `parse_output` reads both.

This file is Hub remote code (the processor imports it): no imports beyond the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

TARGET_FIELDS = ("Utterance", "Emotion", "Strategy", "get_emotion_user_most_recent")
SCHEMA_FIELDS = (
    "Dialogue_ID",
    "Utterance",
    "Emotion",
    "Strategy",
    "get_emotion_user_most_recent",
    "path_to_vid_user_most_recent",
    "utt_user_most_recent",
    "history_chat",
    "history_chat_mamba",
    "situation",
    "problem_type",
)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


class MultimoodError(ValueError):
    """Base of multimood's errors: the message names the file / record, the field and what was expected.

    Commands print it as one line (no traceback unless `--debug` or `MULTIMOOD_DEBUG=1`).
    """


class MultimoodRecordError(MultimoodError):
    """A record that does not fit the schema or the label sets; `str(error)` is `{where}: {problem}`.

    `where` names the record (`record 3 (Dialogue_ID=48)`, or a file and line), `field` the field
    (None when the record as a whole is wrong).
    """

    def __init__(self, where: str | None, field: str | None, problem: str):
        self.where = self.record_name = where
        self.field, self.problem = field, problem
        super().__init__(f"{where}: {problem}" if where else problem)


class MultimoodClipError(MultimoodError):
    """A clip that cannot be used (outside the video folder, unreadable, cut off, a still image); the message names
    the record and the clip. Servers answer it as a bad request."""


class MissingClipError(MultimoodClipError, FileNotFoundError):
    """A clip file that does not exist (also a `FileNotFoundError`)."""


def record_name(record: Any, index: int | None = None) -> str:
    """How errors refer to a record: `record 3 (Dialogue_ID=48)` (its position in the batch or file)."""
    head = f"record {index}" if index is not None else ""
    dialogue_id = record.get("Dialogue_ID") if isinstance(record, Mapping) else None
    if dialogue_id is not None:
        return f"{head} (Dialogue_ID={dialogue_id})" if head else f"Dialogue_ID={dialogue_id}"
    return head or "record"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------------------------
# Label sets (data, not code). MESC spellings follow the records (lower case).
# ----------------------------------------------------------------------------------------------

MESC_EMOTIONS = ["anger", "sadness", "disgust", "depression", "neutral", "joy", "fear"]
MESC_STRATEGIES = [
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
]
# ESConv: the 8 supporter strategies as spelled in ESConv's dialog files, and the seekers'
# `emotion_type` values (ESConv has no per-turn emotion labels of its own).
ESCONV_STRATEGIES = [
    "Question",
    "Restatement or Paraphrasing",
    "Reflection of feelings",
    "Self-disclosure",
    "Affirmation and Reassurance",
    "Providing Suggestions",
    "Information",
    "Others",
]
ESCONV_EMOTIONS = [
    "anxiety",
    "depression",
    "sadness",
    "anger",
    "fear",
    "disgust",
    "shame",
    "nervousness",
    "guilt",
    "jealousy",
    "pain",
]
LABEL_SETS = {
    "mesc": {"emotion_labels": MESC_EMOTIONS, "strategy_labels": MESC_STRATEGIES},
    "esconv": {"emotion_labels": ESCONV_EMOTIONS, "strategy_labels": ESCONV_STRATEGIES},
}


def label_lists(label_set: str | None) -> tuple[list[str] | None, list[str] | None]:
    """(emotion labels, strategy labels) of a named label set; `None` / `"none"`: no label check."""
    if label_set is None or label_set == "none":
        return None, None
    if label_set not in LABEL_SETS:
        raise MultimoodError(f"label set must be one of {', '.join(sorted(LABEL_SETS))} or none, got {label_set!r}")
    return list(LABEL_SETS[label_set]["emotion_labels"]), list(LABEL_SETS[label_set]["strategy_labels"])


def canonical_label(value: str | None, labels: Sequence[str] | None) -> str | None:
    """The label set's spelling of `value` when it names one of `labels` (case, spacing and one trailing
    full stop ignored); otherwise `value` unchanged."""
    if value is None or not labels:
        return value
    key = " ".join(value.lower().split()).removesuffix(".").strip()
    for label in labels:
        if " ".join(label.lower().split()) == key:
            return label
    return value


# ----------------------------------------------------------------------------------------------
# Chat history: the one reader of speakers, roles and `Client: ` / `Therapist: ` prefixes
# ----------------------------------------------------------------------------------------------

# How prompts, the compressor input and converted records name the two roles.
SPEAKER_NAMES = {"user": "Client", "assistant": "Therapist"}
_ROLE_OF_SPEAKER = {"user": "user", "client": "user", "assistant": "assistant", "therapist": "assistant"}
_SPEAKER_PREFIX = re.compile(r"^\s*(client|therapist)\s*:\s?", re.IGNORECASE)


def speaker_role(speaker: Any) -> str | None:
    """`"user"` (the client) or `"assistant"` (the therapist) for a speaker named `user` / `client` /
    `assistant` / `therapist` (any case, surrounding spaces ignored); None for anything else."""
    return _ROLE_OF_SPEAKER.get(speaker.strip().lower()) if isinstance(speaker, str) else None


def split_speaker_prefix(text: str) -> tuple[str | None, str]:
    """`(role, rest)` of a `Client: ...` / `Therapist: ...` line (any case); `(None, text)` without a prefix."""
    match = _SPEAKER_PREFIX.match(text)
    if match is None:
        return None, text
    return speaker_role(match.group(1)), text[match.end() :]


def normalize_history(value: Any, where: str = "record", strict: bool = False) -> list[dict[str, str]]:
    """`history_chat` as `{"role": "user"/"assistant", "content"}` messages (content stripped).

    Accepts `{"role", "content"}` objects (roles `user`/`client`, `assistant`/`therapist`, any case) and
    strings, optionally prefixed `Client: ` / `Therapist: `; an unprefixed string is spoken by the other
    speaker than the message before it (the first one by the client). `strict=False` also accepts one string.
    """

    def fail(problem: str):
        raise MultimoodRecordError(where, "history_chat", f"field 'history_chat' {problem}")

    if isinstance(value, str) and not strict:
        value = [value]
    if not isinstance(value, (list, tuple)):
        fail(f"must be a list of messages, got {_type_name(value)}")
    messages, previous = [], "assistant"
    for i, message in enumerate(value):
        if isinstance(message, Mapping):
            role, content = speaker_role(message.get("role")), message.get("content")
            if role is None:
                fail(f"message {i} must have role 'user' or 'assistant', got {message.get('role')!r}")
        elif isinstance(message, str):
            role, content = split_speaker_prefix(message)
            role = role or ("user" if previous == "assistant" else "assistant")
        else:
            fail(f"message {i} must be an object or a string, got {_type_name(message)}")
        if not isinstance(content, str):
            fail(f"message {i} content must be a string, got {_type_name(content)}")
        previous = role
        messages.append({"role": role, "content": content.strip()})
    return messages


def history_messages(record: Mapping, index: int | None = None) -> list[tuple[str, str]]:
    """The record's `history_chat` as `(role, text)` messages: white space collapsed, empty messages skipped."""
    history = record.get("history_chat")
    if history is None:
        return []
    messages = normalize_history(history, record_name(record, index))
    return [(m["role"], " ".join(m["content"].split())) for m in messages if m["content"].strip()]


def merge_turns(messages: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive `(role, text)` messages of one speaker joined (with spaces) into one turn."""
    turns: list[tuple[str, str]] = []
    for role, text in messages:
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + " " + text)
        else:
            turns.append((role, text))
    return turns


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


class _Checker:
    """Field checks of one record; every failure raises `MultimoodRecordError` at `where`."""

    def __init__(self, record: Any, where: str | None, strict: bool):
        self.where = where or record_name(record)
        if not isinstance(record, Mapping):
            raise MultimoodRecordError(self.where, None, f"is {_type_name(record)}, expected a dict (a JSON object)")
        self.record, self.strict = record, strict

    def fail(self, field: str | None, problem: str):
        raise MultimoodRecordError(self.where, field, problem)

    def string_list(self, name: str, what: str = "a list of strings", needs_text: bool = False) -> list[str]:
        value = self.record[name]
        if isinstance(value, str) and not self.strict:
            value = [value]
        if not isinstance(value, (list, tuple)):
            self.fail(name, f"field {name!r} must be {what}, got {_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(name, f"field {name!r} must be {what}, item {i} is {_type_name(item)}")
        if needs_text and not "".join(value).strip():
            self.fail(name, f"field {name!r} must not be empty" + ("" if value else " (got [])"))
        return list(value)

    def string(self, name: str, non_empty: bool = False) -> str:
        value = self.record[name]
        if not isinstance(value, str) or (non_empty and not value.strip()):
            kind = "a non-empty string" if non_empty else "a string"
            self.fail(name, f"field {name!r} must be {kind}, got {value!r}")
        return value

    def label(
        self, name: str, labels: Sequence[str] | None, kind: str, label_set: str | None, reject: bool = True
    ) -> str:
        value = self.record[name]
        if not isinstance(value, str) or not value.strip():
            kind_of = "a non-empty string"
            if name == "Emotion":  # nullable
                kind_of = "a non-empty string or null" if isinstance(value, str) else "a string or null"
            self.fail(name, f"field {name!r} must be {kind_of}, got {value!r}")
        value = canonical_label(value, labels)
        if reject and labels and value not in labels:
            named = f"the {label_set} {kind} labels" if label_set else f"the {kind} labels"
            self.fail(name, f"field {name!r} is {value!r}, not one of {named} ({', '.join(labels)})")
        return value

    def history(self) -> list[dict[str, str]]:
        return normalize_history(self.record["history_chat"], self.where, self.strict)


def validate_targets(
    record: Any,
    emotion_labels: Sequence[str] | None = None,
    strategy_labels: Sequence[str] | None = None,
    label_set: str | None = None,
    reject_unknown: bool = True,
    where: str | None = None,
) -> dict[str, Any]:
    """The four targets of a record, checked (all present, `Emotion` too) and in the label sets' spelling.

    `reject_unknown=False` keeps a label outside the lists as written (formatting only: the answer format
    is read with placeholder labels); `validate_record` always rejects them.
    """
    check = _Checker(record, where, strict=False)
    for name in TARGET_FIELDS:
        if record.get(name) is None:
            check.fail(name, f"missing required field {name!r} (the target needs it)")

    def label(name: str, labels: Sequence[str] | None, kind: str) -> str:
        return check.label(name, labels, kind, label_set, reject_unknown)

    return {
        "get_emotion_user_most_recent": label("get_emotion_user_most_recent", emotion_labels, "emotion"),
        "Emotion": label("Emotion", emotion_labels, "emotion"),
        "Strategy": label("Strategy", strategy_labels, "strategy"),
        "Utterance": check.string_list("Utterance", needs_text=True),
    }


def validate_record(
    record: Any,
    require_targets: bool = True,
    emotion_labels: Sequence[str] | None = None,
    strategy_labels: Sequence[str] | None = None,
    label_set: str | None = None,
    strict: bool = True,
    where: str | None = None,
) -> dict[str, Any]:
    """Check one record and return it in canonical form (see the module doc); raises `MultimoodRecordError`.

    Args:
        require_targets: the four targets must be present (training / evaluation data); otherwise a
            missing target becomes None (inference data), a present one is still checked.
        emotion_labels, strategy_labels: the label sets the targets must name (checked with
            `require_targets` only); None skips the check of that kind.
        label_set: the label sets' name, only for messages (`mesc`, `esconv`).
        strict: the file schema (see the module doc).
        where: how errors name the record (default: `record_name(record)`).
    """
    check = _Checker(record, where, strict)
    required = ("utt_user_most_recent",) + (("Dialogue_ID",) if strict else ())
    for name in required + (TARGET_FIELDS if require_targets else ()):
        if name not in record or (record[name] is None and name != "Emotion"):
            check.fail(name, f"missing required field {name!r}")

    def present(name: str) -> bool:
        return record.get(name) is not None

    dialogue_id = record.get("Dialogue_ID")
    if dialogue_id is not None and (isinstance(dialogue_id, bool) or not isinstance(dialogue_id, (str, int))):
        check.fail("Dialogue_ID", f"field 'Dialogue_ID' must be a string or an integer, got {_type_name(dialogue_id)}")
    if not require_targets:  # inference data: labels present are not part of the model input
        emotion_labels = strategy_labels = None
    emotion = None
    if present("Emotion"):
        emotion = check.label("Emotion", emotion_labels, "emotion", label_set)
    elif require_targets and emotion_labels:
        check.fail("Emotion", "field 'Emotion' is null, but a training target needs the therapist's emotion "
                   f"(one of {', '.join(emotion_labels)}); records without it are inference data (no targets)")
    clips = []
    if present("path_to_vid_user_most_recent"):
        clips = check.string_list("path_to_vid_user_most_recent", "a list of clip file names")
    for i, clip in enumerate(clips):
        if not clip.strip():
            check.fail("path_to_vid_user_most_recent",
                       f"field 'path_to_vid_user_most_recent' item {i} is {clip!r}, expected a clip file name")
    return {
        "Dialogue_ID": None if dialogue_id is None else str(dialogue_id),
        "Utterance": check.string_list("Utterance", needs_text=True) if present("Utterance") else None,
        "Emotion": emotion,
        "Strategy": check.label("Strategy", strategy_labels, "strategy", label_set) if present("Strategy") else None,
        "get_emotion_user_most_recent": (
            check.label("get_emotion_user_most_recent", emotion_labels, "emotion", label_set)
            if present("get_emotion_user_most_recent") else None
        ),
        "path_to_vid_user_most_recent": clips,
        "utt_user_most_recent": check.string_list("utt_user_most_recent", needs_text=True),
        "history_chat": check.history() if present("history_chat") else [],
        "history_chat_mamba": check.string("history_chat_mamba") if present("history_chat_mamba") else "",
        "situation": check.string("situation") if present("situation") else "",
        "problem_type": check.string("problem_type") if present("problem_type") else "",
    }


# ----------------------------------------------------------------------------------------------
# The answer: its format and its parser
# ----------------------------------------------------------------------------------------------

# The processor's prompt styles; they also pick the answer format (ours, or the published one for both
# published styles).
PROMPT_STYLES = ("multimood", "published-train", "published-eval")

# The published answer: one field per line, each line but the last ending in " ".
PUBLISHED_ANSWER_TEMPLATE = (
    "Client's emotion: {client_emotion} \n"
    "Therapist's emotion: {therapist_emotion} \n"
    "Therapist's strategy: {strategy} \n"
    "Therapist's response: {response}"
)

# Answer lines: (output key, canonical prefix, accepted prefixes, lower case without the colon).
_ANSWER_FIELDS = (
    ("client_emotion", "Client emotion", ("client emotion", "client's emotion", "client’s emotion")),
    ("therapist_emotion", "Therapist emotion", ("therapist emotion", "therapist's emotion", "therapist’s emotion")),
    ("strategy", "Strategy", ("strategy", "therapist strategy", "therapist's strategy", "therapist’s strategy")),
    ("response", "Response", ("response", "therapist response", "therapist's response", "therapist’s response")),
)
ANSWER_FIELDS = tuple(key for key, _, _ in _ANSWER_FIELDS)  # the keys of a parsed answer, in order
LABEL_FIELDS = ANSWER_FIELDS[:3]  # the lines drawn from the label sets
_ANSWER_LINE = re.compile(
    r"^\s*[*#>\-\s]*(?P<key>"
    + "|".join(sorted({re.escape(p) for _, _, ps in _ANSWER_FIELDS for p in ps}, key=len, reverse=True))
    + r")\s*[*]*\s*:\s*(?P<value>.*)$",
    re.IGNORECASE,
)
_PREFIX_TO_KEY = {p: key for key, _, ps in _ANSWER_FIELDS for p in ps}
_TRAILING_SPECIALS = re.compile(r"(<\|im_end\|>|<\|endoftext\|>|<\|im_start\|>).*$", re.DOTALL)


def check_prompt_style(prompt_style: str) -> str:
    """`prompt_style` when it is one of `PROMPT_STYLES`; a `ValueError` naming them otherwise."""
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {list(PROMPT_STYLES)}, got {prompt_style!r}")
    return prompt_style


def format_answer(
    client_emotion: str, therapist_emotion: str, strategy: str, response: str, prompt_style: str = "multimood"
) -> str:
    """The four-line answer the model is trained to generate (`Client emotion: ...`, or with a published
    prompt style the published `Client's emotion: x \\nTherapist's emotion: ...` lines)."""
    values = [" ".join(str(v).split()) for v in (client_emotion, therapist_emotion, strategy, response)]
    if check_prompt_style(prompt_style) != "multimood":
        return PUBLISHED_ANSWER_TEMPLATE.format(**{key: v for (key, _, _), v in zip(_ANSWER_FIELDS, values)})
    return "\n".join(f"{prefix}: {v}" for (_, prefix, _), v in zip(_ANSWER_FIELDS, values))


def parse_output(
    text: str, emotion_labels: Sequence[str] | None = None, strategy_labels: Sequence[str] | None = None
) -> dict[str, str | None]:
    """Parse a generated answer into `client_emotion`, `therapist_emotion`, `strategy`, `response`.

    Lines are matched by their prefix (case-insensitive; the published `Client's emotion:` /
    `Therapist's strategy:` / `Therapist's response:` spellings are accepted too). A field that is
    missing or empty is `None`; nothing is silently dropped. The response runs from its line to
    the end of the text (or to the next answer line). When label lists are given, a value naming
    one of them is returned in the list's spelling; any other value is returned as written.
    """
    result: dict[str, str | None] = {key: None for key, _, _ in _ANSWER_FIELDS}
    if text is None:
        return result
    text = _TRAILING_SPECIALS.sub("", text)
    current = None
    buffers: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = _ANSWER_LINE.match(line)
        if match:
            current = _PREFIX_TO_KEY[match.group("key").lower()]
            if current in buffers:  # a repeated field: keep the first answer
                current = "__ignored__"
            buffers[current] = [match.group("value")]
        elif current == "response":
            buffers[current].append(line)
    for key, _, _ in _ANSWER_FIELDS:
        if key in buffers:
            if key == "response":
                value = "\n".join(buffers[key]).strip()
            else:
                value = " ".join(" ".join(buffers[key]).split()).strip("*").strip()
            result[key] = value or None
    result["client_emotion"] = canonical_label(result["client_emotion"], emotion_labels)
    result["therapist_emotion"] = canonical_label(result["therapist_emotion"], emotion_labels)
    result["strategy"] = canonical_label(result["strategy"], strategy_labels)
    return result


__all__ = [
    "ESCONV_EMOTIONS",
    "ESCONV_STRATEGIES",
    "LABEL_SETS",
    "MESC_EMOTIONS",
    "MESC_STRATEGIES",
    "MultimoodError",
    "MultimoodRecordError",
    "PROMPT_STYLES",
    "PUBLISHED_ANSWER_TEMPLATE",
    "SCHEMA_FIELDS",
    "SPEAKER_NAMES",
    "TARGET_FIELDS",
    "canonical_label",
    "check_prompt_style",
    "format_answer",
    "history_messages",
    "label_lists",
    "merge_turns",
    "normalize_history",
    "parse_output",
    "record_name",
    "speaker_role",
    "split_speaker_prefix",
    "validate_record",
    "validate_targets",
]
