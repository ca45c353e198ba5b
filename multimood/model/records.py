"""MultiMood records: the one validator every entry point uses, and the error types.

A record is one therapist turn of a counselling session (the fields are described in
`dataset_builder`). `validate_record` checks a record against the schema and, when label lists are
given, its labels against the label sets, and returns it in the canonical form:

- list fields (`utt_user_most_recent`, `Utterance`, `path_to_vid_user_most_recent`) are lists of
  strings; `utt_user_most_recent` and `Utterance` must hold some text (the client's latest words
  are the model's input; the response is the target);
- `history_chat` becomes `{"role": "user"/"assistant", "content"}` messages (`Client: ` /
  `Therapist: ` prefixed strings and the roles `client` / `therapist` accepted);
- labels (`get_emotion_user_most_recent`, `Emotion`, `Strategy`) are matched against the label sets
  ignoring case, surrounding and repeated white space and one trailing full stop, and returned in
  the label set's spelling (`"Sadness "` -> `"sadness"`); any other value (`"ecstatic"`) is an error
  naming the field and the labels. `Emotion` may be null (a corpus without the therapist's emotion,
  such as ESConv) unless targets are required and labels are checked: a training target needs it.

`strict=True` is the file schema (`Dialogue_ID` required, list fields must be lists);
`strict=False` also accepts the conveniences of Python callers (a string for a list field, no
`Dialogue_ID`). Both apply the same rules otherwise, so a record that validates also trains.

This file is Hub remote code (the processor imports it): no imports beyond the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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

_SPEAKER_PREFIX = re.compile(r"^\s*(client|therapist)\s*:\s?", re.IGNORECASE)
_ROLES = {"user": "user", "client": "user", "assistant": "assistant", "therapist": "assistant"}


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


def record_name(record: Any, index: int | None = None) -> str:
    """How errors refer to a record: `record 3 (Dialogue_ID=48)` (its position in the batch or file)."""
    head = f"record {index}" if index is not None else ""
    dialogue_id = record.get("Dialogue_ID") if isinstance(record, Mapping) else None
    if dialogue_id is not None:
        return f"{head} (Dialogue_ID={dialogue_id})" if head else f"Dialogue_ID={dialogue_id}"
    return head or "record"


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


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Checker:
    """Field checks of one record; every failure raises `MultimoodRecordError` at `where`."""

    def __init__(self, record: Mapping, where: str, strict: bool):
        self.record, self.where, self.strict = record, where, strict

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

    def label(self, name: str, labels: Sequence[str] | None, kind: str, label_set: str | None, reject: bool = True) -> str:
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
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or role.strip().lower() not in _ROLES:
                fail(f"message {i} must have role 'user' or 'assistant', got {role!r}")
            if not isinstance(content, str):
                fail(f"message {i} content must be a string, got {_type_name(content)}")
            role, content = _ROLES[role.strip().lower()], content.strip()
        elif isinstance(message, str):
            match = _SPEAKER_PREFIX.match(message)
            if match:
                role = "user" if match.group(1).lower() == "client" else "assistant"
                content = message[match.end() :].strip()
            else:
                role = "user" if previous == "assistant" else "assistant"
                content = message.strip()
        else:
            fail(f"message {i} must be an object or a string, got {_type_name(message)}")
        previous = role
        messages.append({"role": role, "content": content})
    return messages


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
    where = where or record_name(record)
    if not isinstance(record, Mapping):
        raise MultimoodRecordError(where, None, f"is {_type_name(record)}, expected a dict (a JSON object)")
    check = _Checker(record, where, strict=False)
    for name in TARGET_FIELDS:
        if record.get(name) is None:
            check.fail(name, f"missing required field {name!r} (the target needs it)")
    return {
        "get_emotion_user_most_recent": check.label("get_emotion_user_most_recent", emotion_labels, "emotion",
                                                    label_set, reject_unknown),
        "Emotion": check.label("Emotion", emotion_labels, "emotion", label_set, reject_unknown),
        "Strategy": check.label("Strategy", strategy_labels, "strategy", label_set, reject_unknown),
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
    where = where or record_name(record)
    if not isinstance(record, Mapping):
        raise MultimoodRecordError(where, None, f"is {_type_name(record)}, expected a dict (a JSON object)")
    check = _Checker(record, where, strict)
    required = ("utt_user_most_recent",) + (("Dialogue_ID",) if strict else ()) + (TARGET_FIELDS if require_targets else ())
    for name in required:
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
    clips = check.string_list("path_to_vid_user_most_recent", "a list of clip file names") if present(
        "path_to_vid_user_most_recent") else []
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


__all__ = [
    "MultimoodError",
    "MultimoodRecordError",
    "SCHEMA_FIELDS",
    "TARGET_FIELDS",
    "canonical_label",
    "normalize_history",
    "record_name",
    "validate_record",
    "validate_targets",
]
