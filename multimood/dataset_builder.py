"""MultiMood dialogue records: the schema, a validating `datasets` builder and corpus converters.

One record is one therapist turn (see ARCHITECTURE.md, "The record"):

| field | type | role |
|---|---|---|
| `Dialogue_ID` | string (ints in files are turned into strings) | required |
| `utt_user_most_recent` | list of strings: the client's latest fragments (may be empty) | required (model input) |
| `Utterance` | non-empty list of strings: the therapist's fragments | target |
| `Emotion` | string or null: the therapist's emotion (null where a corpus has none: ESConv) | target (key required) |
| `Strategy` | non-empty string | target |
| `get_emotion_user_most_recent` | non-empty string: the client's emotion | target |
| `path_to_vid_user_most_recent` | list of strings: clip paths, relative to the video folder | optional, default `[]` |
| `history_chat` | list of `{"role": "user"/"assistant", "content"}` | optional, default `[]` |
| `history_chat_mamba` | string: the history for the compressor | optional, default `""` |
| `situation`, `problem_type` | strings | optional, default `""` |

Targets are required for training (`require_targets=True`, the default); with `require_targets=False`
(inference data) a missing target becomes null. `history_chat` also accepts plain strings, as in the
seed README: a `Client: ` / `Therapist: ` prefix names the speaker, an unprefixed string is spoken by
the other speaker than the message before it (the first one by the client); they are stored as
`{"role", "content"}` messages (user = client, assistant = therapist; the roles `client` / `therapist`
are accepted too). Fields outside the schema are dropped with one warning per file. Clip paths stay
paths: decoding belongs to the processor.

Files are JSON Lines (one object a line) or one JSON array (the seed's form), told apart by the
first non-space character. Every error names the file, the line (and the array index) and the field.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import logging
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets.builder import Key
from datasets.exceptions import DatasetGenerationError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

MULTIMOOD_FEATURES = datasets.Features(
    {
        "Dialogue_ID": datasets.Value("string"),
        "Utterance": datasets.List(datasets.Value("string")),
        "Emotion": datasets.Value("string"),
        "Strategy": datasets.Value("string"),
        "get_emotion_user_most_recent": datasets.Value("string"),
        "path_to_vid_user_most_recent": datasets.List(datasets.Value("string")),
        "utt_user_most_recent": datasets.List(datasets.Value("string")),
        "history_chat": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "history_chat_mamba": datasets.Value("string"),
        "situation": datasets.Value("string"),
        "problem_type": datasets.Value("string"),
    }
)
TARGET_FIELDS = ("Utterance", "Emotion", "Strategy", "get_emotion_user_most_recent")
REQUIRED_INPUT_FIELDS = ("Dialogue_ID", "utt_user_most_recent")

REPORT_FILENAME = "multimood_read_report.json"
# The builder's code is part of its cache key: editing this file regenerates cached datasets.
_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

_SPEAKER_PREFIX = re.compile(r"^\s*(client|therapist)\s*:\s?", re.IGNORECASE)
_ROLES = {"user": "user", "client": "user", "assistant": "assistant", "therapist": "assistant"}
_SPEAKER_NAMES = {"user": "Client", "assistant": "Therapist"}


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


class InvalidRecordError(ValueError):
    """A record or file that does not fit the schema; `str(error)` names the file, line and field."""

    def __init__(self, message: str, path: str | None = None, location: str | None = None, field: str | None = None):
        self.path, self.location, self.field = path, location, field
        prefix = " ".join(part for part in (path, location) if part)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class _FieldError(Exception):
    """Raised by the record checks; the reader adds the file and the line."""

    def __init__(self, field_name: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field_name, message


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _string_list(record: Mapping, name: str, non_empty: bool = False) -> list[str]:
    value = record[name]
    if not isinstance(value, list):
        raise _FieldError(name, f"field {name!r} must be a list of strings, got {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _FieldError(name, f"field {name!r} must be a list of strings, item {i} is {_type_name(item)}")
    if non_empty and not value:
        raise _FieldError(name, f"field {name!r} must not be empty")
    return list(value)


def _string(record: Mapping, name: str, non_empty: bool = False, nullable: bool = False) -> str | None:
    value = record[name]
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        kind = "a string or null" if nullable else "a string"
        raise _FieldError(name, f"field {name!r} must be {kind}, got {_type_name(value)}")
    if non_empty and not value.strip():
        raise _FieldError(name, f"field {name!r} must be a non-empty string")
    return value


def _history(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise _FieldError("history_chat", f"field 'history_chat' must be a list of messages, got {_type_name(value)}")
    messages = []
    previous = "assistant"
    for i, message in enumerate(value):
        if isinstance(message, dict):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or role.strip().lower() not in _ROLES:
                raise _FieldError(
                    "history_chat",
                    f"field 'history_chat' message {i} must have role 'user' or 'assistant', got {role!r}",
                )
            if not isinstance(content, str):
                raise _FieldError(
                    "history_chat",
                    f"field 'history_chat' message {i} content must be a string, got {_type_name(content)}",
                )
            role = _ROLES[role.strip().lower()]
        elif isinstance(message, str):
            match = _SPEAKER_PREFIX.match(message)
            if match:
                role = "user" if match.group(1).lower() == "client" else "assistant"
                content = message[match.end() :].strip()
            else:
                role = "user" if previous == "assistant" else "assistant"
                content = message.strip()
        else:
            raise _FieldError(
                "history_chat",
                f"field 'history_chat' message {i} must be an object or a string, got {_type_name(message)}",
            )
        previous = role
        messages.append({"role": role, "content": content})
    return messages


def normalize_record(record: Any, require_targets: bool = True) -> dict[str, Any]:
    """Check one raw record against the schema and return it in the canonical form of `MULTIMOOD_FEATURES`.

    Raises `InvalidRecordError` naming the field (the file readers add the file and the line).
    """
    try:
        return _normalize(record, require_targets)
    except _FieldError as err:
        raise InvalidRecordError(err.message, field=err.field) from None


def _normalize(record: Any, require_targets: bool) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise _FieldError(None, f"a record must be a JSON object, got {_type_name(record)}")
    required = REQUIRED_INPUT_FIELDS + (TARGET_FIELDS if require_targets else ())
    for name in required:
        if name not in record or (record[name] is None and name != "Emotion"):
            raise _FieldError(name, f"missing required field {name!r}")

    dialogue_id = record["Dialogue_ID"]
    if isinstance(dialogue_id, bool) or not isinstance(dialogue_id, (str, int)):
        raise _FieldError(
            "Dialogue_ID", f"field 'Dialogue_ID' must be a string or an integer, got {_type_name(dialogue_id)}"
        )

    def present(name: str) -> bool:
        return record.get(name) is not None

    return {
        "Dialogue_ID": str(dialogue_id),
        "Utterance": _string_list(record, "Utterance", non_empty=True) if present("Utterance") else None,
        "Emotion": _string(record, "Emotion", nullable=True) if "Emotion" in record else None,
        "Strategy": _string(record, "Strategy", non_empty=True) if present("Strategy") else None,
        "get_emotion_user_most_recent": (
            _string(record, "get_emotion_user_most_recent", non_empty=True)
            if present("get_emotion_user_most_recent")
            else None
        ),
        "path_to_vid_user_most_recent": (
            _string_list(record, "path_to_vid_user_most_recent") if present("path_to_vid_user_most_recent") else []
        ),
        "utt_user_most_recent": _string_list(record, "utt_user_most_recent"),
        "history_chat": _history(record["history_chat"]) if present("history_chat") else [],
        "history_chat_mamba": _string(record, "history_chat_mamba") if present("history_chat_mamba") else "",
        "situation": _string(record, "situation") if present("situation") else "",
        "problem_type": _string(record, "problem_type") if present("problem_type") else "",
    }


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------


@dataclass
class SplitReport:
    """What reading one split found: records read, invalid records skipped, and the files."""

    read: int = 0
    skipped: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.read - self.skipped


def format_report(report: Mapping[str, SplitReport]) -> str:
    """One line per split: `train: 445 read, 0 skipped, 445 kept (1 file)`."""
    lines = []
    for split, item in report.items():
        files = f"{len(item.files)} file" + ("" if len(item.files) == 1 else "s")
        lines.append(f"{split}: {item.read} read, {item.skipped} skipped, {item.kept} kept ({files})")
    return "\n".join(lines)


def _first_char(path: PathLike) -> str:
    with open(path, encoding="utf-8-sig") as handle:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]
    return ""


def _raw_items(path: PathLike) -> Iterator[tuple[str, Any, InvalidRecordError | None]]:
    """`(location, object, parse_error)` for every record of a JSONL file or a JSON-array file."""
    name = str(path)
    if _first_char(path) == "[":
        text = Path(path).read_text(encoding="utf-8-sig")
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            # A broken array cannot be split into records: the file is unusable even with skip_invalid.
            message = f"malformed JSON ({err.msg}, column {err.colno})"
            raise InvalidRecordError(message, name, f"line {err.lineno}") from None
        decoder, pos, index = json.JSONDecoder(), text.index("[") + 1, 0
        whitespace = re.compile(r"[\s,]*")
        while True:
            pos = whitespace.match(text, pos).end()
            if text[pos] == "]":
                return
            item, end = decoder.raw_decode(text, pos)
            yield f"line {text.count(chr(10), 0, pos) + 1} (array index {index})", item, None
            pos, index = end, index + 1
    with open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            location = f"line {line_number}"
            try:
                yield location, json.loads(line), None
            except json.JSONDecodeError as err:
                message = f"malformed JSON ({err.msg}, column {err.colno})"
                yield location, None, InvalidRecordError(message, name, location)


def iter_records(
    path: PathLike,
    require_targets: bool = True,
    skip_invalid: bool = False,
    report: SplitReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Normalised records of one file; invalid ones raise, or with `skip_invalid` are logged and counted in `report`."""
    name = str(path)
    unknown: set[str] = set()
    for location, item, error in _raw_items(path):
        if report is not None:
            report.read += 1
        if error is None:
            try:
                record = _normalize(item, require_targets)
            except _FieldError as err:
                error = InvalidRecordError(err.message, name, location, err.field)
        if error is not None:
            if not skip_invalid:
                raise error
            logger.warning("skipping invalid record: %s", error)
            if report is not None:
                report.skipped += 1
            continue
        unknown.update(set(item) - set(MULTIMOOD_FEATURES))
        yield record
    if unknown:
        logger.warning("%s: ignored fields outside the MultiMood schema: %s", name, ", ".join(sorted(unknown)))


# ----------------------------------------------------------------------------------------------
# The datasets builder
# ----------------------------------------------------------------------------------------------


@dataclass
class MultimoodDialogueConfig(datasets.BuilderConfig):
    """`data_files` (split name -> list of paths) plus how strictly to read them.

    Args:
        skip_invalid (`bool`, defaults to `False`): skip invalid records (a warning each, counted in the
            report) instead of raising on the first one.
        require_targets (`bool`, defaults to `True`): records must carry the four targets (training and
            evaluation data); `False` accepts inference-only records.
    """

    skip_invalid: bool = False
    require_targets: bool = True


class MultimoodDialogueBuilder(datasets.GeneratorBasedBuilder):
    """Builds a `DatasetDict` of MultiMood records with explicit features, offline, from local files.

    ```python
    builder = MultimoodDialogueBuilder(data_files={"train": ["train.jsonl"]}, cache_dir="cache")
    builder.download_and_prepare()
    dataset = builder.as_dataset()
    builder.report  # {"train": SplitReport(read=..., skipped=..., files=[...])}
    ```
    Relative `data_files` are resolved against `base_path` (default: the working directory). The read
    report is stored beside the cached Arrow files, so it is also there when the cache is reused.
    """

    BUILDER_CONFIG_CLASS = MultimoodDialogueConfig
    config: MultimoodDialogueConfig

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("dataset_name", "multimood_dialogues")
        kwargs.setdefault("hash", _SOURCE_HASH)
        super().__init__(**kwargs)
        self._report: dict[str, SplitReport] | None = None

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="MultiMood emotional-support dialogue records: one therapist turn each.",
            features=MULTIMOOD_FEATURES,
        )

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        if not self.config.data_files:
            raise ValueError("MultimoodDialogueBuilder needs data_files (split name -> list of JSONL/JSON files)")
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"split": split, "files": dl_manager.download(list(files))})
            for split, files in self.config.data_files.items()
        ]

    def _generate_examples(self, split: str, files: list[str]) -> Iterator[tuple[Key, dict[str, Any]]]:
        if self._report is None:  # generated without download_and_prepare (e.g. streaming)
            self._report = {}
        report = self._report.setdefault(split, SplitReport())
        for file_index, path in enumerate(files):
            report.files.append(str(path))
            records = iter_records(path, self.config.require_targets, self.config.skip_invalid, report)
            for record_index, record in enumerate(records):
                yield Key(file_index, record_index), record

    def _prepare_split(self, split_generator: datasets.SplitGenerator, **kwargs: Any) -> None:
        try:
            super()._prepare_split(split_generator, **kwargs)
        except DatasetGenerationError as err:
            # Show the record error itself (file, line, field), not datasets' generic wrapper.
            if isinstance(err.__cause__, InvalidRecordError):
                raise err.__cause__ from None
            raise

    def _download_and_prepare(self, dl_manager, verification_mode, **prepare_split_kwargs):
        self._report = {}
        super()._download_and_prepare(dl_manager, verification_mode, **prepare_split_kwargs)
        with self._fs.open(posixpath.join(self._output_dir, REPORT_FILENAME), "w") as handle:
            json.dump({split: asdict(item) for split, item in self._report.items()}, handle, indent=2)
        _log_report(self._report)

    @property
    def report(self) -> dict[str, SplitReport]:
        """Records read and skipped per split, from this run or from the cache it reused."""
        if self._report is None:
            path = posixpath.join(self._output_dir, REPORT_FILENAME)
            if not self._fs.exists(path):
                return {}
            with self._fs.open(path) as handle:
                self._report = {split: SplitReport(**item) for split, item in json.load(handle).items()}
        return self._report


def _log_report(report: Mapping[str, SplitReport]) -> None:
    skipped = any(item.skipped for item in report.values())
    logger.log(logging.WARNING if skipped else logging.INFO, "MultiMood records:\n%s", format_report(report))


def _data_files_dict(data_files: PathLike | Sequence[PathLike] | Mapping[str, Any]) -> dict[str, list[str]]:
    if isinstance(data_files, Mapping):
        items = data_files.items()
    else:
        items = [("train", data_files)]
    out = {}
    for split, files in items:
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        out[str(split)] = [os.fspath(path) for path in files]
    return out


def load_dialogues(
    data_files: PathLike | Sequence[PathLike] | Mapping[str, PathLike | Sequence[PathLike]],
    cache_dir: PathLike | None = None,
    skip_invalid: bool = False,
    require_targets: bool = True,
    base_dir: PathLike | None = None,
    return_report: bool = False,
) -> datasets.DatasetDict | tuple[datasets.DatasetDict, dict[str, SplitReport]]:
    """Load MultiMood record files into a `DatasetDict` with `MULTIMOOD_FEATURES`, offline.

    `data_files` is one file or a list of files (the split "train"), or a mapping split name -> file(s);
    glob patterns are allowed. Relative paths are resolved against `base_dir` when given, else the
    current working directory, once, when this is called; each record keeps its clip paths relative
    (they are resolved against the video folder by the processor). The result is cached under
    `cache_dir` (default: the datasets cache) and rebuilt when a file or this module changes.
    `return_report=True` also returns the records read and skipped per split (they are logged too).
    """
    base_path = os.path.abspath(base_dir if base_dir is not None else os.getcwd())
    builder = MultimoodDialogueBuilder(
        data_files=_data_files_dict(data_files),
        base_path=base_path,
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        skip_invalid=skip_invalid,
        require_targets=require_targets,
    )
    builder.download_and_prepare()
    # datasets cannot read back a split of 0 examples (every record skipped, or an empty file).
    empty = {name: [] for name in MULTIMOOD_FEATURES}
    dataset = datasets.DatasetDict(
        {
            split: builder.as_dataset(split=split)
            if info.num_examples
            else datasets.Dataset.from_dict(empty, features=MULTIMOOD_FEATURES, split=split)
            for split, info in builder.info.splits.items()
        }
    )
    return (dataset, builder.report) if return_report else dataset


# ----------------------------------------------------------------------------------------------
# Converters
# ----------------------------------------------------------------------------------------------

# The published clip names (MESC clip extraction, MultiMood's records): `dia{D}_utt{U}_{row}.mp4`, where
# `row` is the utterance's 0-based row in the complete MESC CSV (all 1,019 dialogues, test included).
MESC_CLIP_PATTERN = "dia{dialogue_id}_utt{utterance_id}_{row}.mp4"
MESC_COLUMNS = ("Utterance", "Speaker", "Emotion", "Strategy", "Dialogue_ID", "Utterance_ID", "Season", "Episode")

# Strategy spellings of ESConv's original release (FailedESConv.json) -> the 8 of the cleaned dialog files.
ESCONV_STRATEGY_ALIASES = {
    "Questions": "Question",
    "Other": "Others",
    "Restatement": "Restatement or Paraphrasing",
    "Approval and Reassurance": "Affirmation and Reassurance",
    "Direct Guidance": "Providing Suggestions",
}
_ESCONV_CLIENT = {"usr", "seeker", "speaker"}
_ESCONV_SUPPORTER = {"sys", "supporter", "listener"}


def _label(value: str) -> str:
    """Lower case, single spaces: MESC labels as the processor's label sets spell them."""
    return " ".join(value.split()).lower()


def _mamba_history(history: Sequence[Mapping[str, str]]) -> str:
    """One line per turn (a speaker's consecutive fragments joined by spaces): `Client: ...` / `Therapist: ...`."""
    return "\n".join(
        f"{_SPEAKER_NAMES[role]}: " + " ".join(message["content"] for message in messages)
        for role, messages in itertools.groupby(history, key=lambda message: message["role"])
    )


def _turn_records(dialogue_id: str, turns: list[dict[str, Any]], context: Mapping[str, str]) -> tuple[list[dict], int]:
    """Records for one dialogue given its fragments in order (`role, text, emotion, strategy, clip`).

    One record per therapist turn (consecutive therapist fragments) that follows client fragments:
    the therapist's emotion and strategy are the first fragment's; the client's emotion is the last
    client fragment's; the history is every fragment before the client's latest ones. Returns the
    records and the number of therapist turns with no client fragment before them (skipped).
    """
    records, openings = [], 0
    runs = [(role, list(group)) for role, group in itertools.groupby(turns, key=lambda turn: turn["role"])]
    history: list[dict[str, str]] = []
    for i, (role, fragments) in enumerate(runs):
        if role == "assistant":
            if i == 0:
                openings += 1
            else:
                client = runs[i - 1][1]
                earlier = [dict(message) for message in history[: len(history) - len(client)]]
                records.append(
                    {
                        "Dialogue_ID": dialogue_id,
                        "Utterance": [f["text"] for f in fragments],
                        "Emotion": fragments[0]["emotion"],
                        "Strategy": fragments[0]["strategy"],
                        "get_emotion_user_most_recent": client[-1]["emotion"],
                        "path_to_vid_user_most_recent": [f["clip"] for f in client if f.get("clip")],
                        "utt_user_most_recent": [f["text"] for f in client],
                        "history_chat": earlier,
                        "history_chat_mamba": _mamba_history(earlier),
                        "situation": context.get("situation", ""),
                        "problem_type": context.get("problem_type", ""),
                    }
                )
        history = history + [{"role": role, "content": f["text"]} for f in fragments]
    return records, openings


def _read_dialogue_ids(path: PathLike) -> list[int]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("val_json_dialogue_ids", next(iter(data.values()), None))
    if not isinstance(data, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in data):
        raise ValueError(f"{path}: expected a list of integer dialogue ids (or {{'val_json_dialogue_ids': [...]}})")
    return data


def convert_mesc(
    csv_path: PathLike,
    dialogues_json: PathLike | None = None,
    dialogue_ids_json: PathLike | None = None,
    dialogue_subset: str = "all",
    clip_pattern: str = MESC_CLIP_PATTERN,
) -> list[dict[str, Any]]:
    """MESC's utterance CSV (+ optionally `val.json` and its ids) -> MultiMood records, one per therapist turn.

    Rules (they reproduce the 445 published-style validation records, see the tests):
    - a turn is a run of consecutive fragments (CSV rows, ordered by `Utterance_ID`) of one speaker;
      a therapist turn with no client fragment before it (a dialogue opening) is skipped and counted;
    - `Utterance`: the therapist fragments; `Emotion`, `Strategy`: the first fragment's, lower case
      (fragments of one turn disagree on the strategy in about 1 turn in 6; the first is what the
      published records use);
    - `get_emotion_user_most_recent`: the emotion of the last client fragment before the turn;
      `utt_user_most_recent`: the client fragments just before the turn;
    - `path_to_vid_user_most_recent`: one clip per client fragment, named by `clip_pattern` with the
      fields `dialogue_id, utterance_id, season, episode, row` (row = 0-based data row in this CSV;
      the default is the published naming, exact only with the complete MESC CSV);
    - `history_chat`: every earlier fragment as a message (user = client, assistant = therapist), not
      truncated (the processor keeps the last `k_turn_history` exchanges); `history_chat_mamba`: the same
      history, one line per turn, `Client: ...` / `Therapist: ...`;
    - `situation`, `problem_type`: from `dialogues_json` (the i-th dialogue is CSV dialogue
      `ids[i]` of `dialogue_ids_json`), stripped; `""` for other dialogues;
    - `Dialogue_ID`: the CSV's `Dialogue_ID` as a string.

    `dialogue_subset`: `"all"` dialogues of the CSV, `"val"` (those listed in `dialogue_ids_json`) or
    `"train"` (all the others; the distributed CSV has no test dialogues).
    """
    if dialogue_subset not in ("all", "val", "train"):
        raise ValueError(f"dialogue_subset must be 'all', 'val' or 'train', got {dialogue_subset!r}")
    if (dialogue_subset != "all" or dialogues_json is not None) and dialogue_ids_json is None:
        raise ValueError("dialogue_ids_json is needed to select the val dialogues or to pair val.json with the CSV")
    val_ids = _read_dialogue_ids(dialogue_ids_json) if dialogue_ids_json is not None else []

    dialogues: dict[int, list[dict[str, Any]]] = {}
    with open(csv_path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in MESC_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        for row_index, row in enumerate(reader):
            speaker = row["Speaker"].strip().lower()
            if speaker not in ("client", "therapist"):
                raise ValueError(
                    f"{csv_path} line {reader.line_num}: Speaker must be Client or Therapist, got {row['Speaker']!r}"
                )
            try:
                dialogue_id, utterance_id = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
                season, episode = int(row["Season"]), int(row["Episode"])
            except ValueError as err:
                raise ValueError(f"{csv_path} line {reader.line_num}: {err}") from None
            dialogues.setdefault(dialogue_id, []).append(
                {
                    "order": utterance_id,
                    "role": "user" if speaker == "client" else "assistant",
                    "text": row["Utterance"].strip(),
                    "emotion": _label(row["Emotion"]),
                    "strategy": _label(row["Strategy"]),
                    "clip": clip_pattern.format(
                        dialogue_id=dialogue_id,
                        utterance_id=utterance_id,
                        season=season,
                        episode=episode,
                        row=row_index,
                    ),
                }
            )
    if "{row" in clip_pattern and set(dialogues) != set(range(max(dialogues, default=-1) + 1)):
        first_gap = min(set(range(max(dialogues) + 1)) - set(dialogues))
        logger.warning(
            "%s lacks dialogues (first missing: %d): clip names using {row} do not match the published ones "
            "from that dialogue on; use the complete MESC CSV or a clip_pattern without {row}",
            csv_path,
            first_gap,
        )

    contexts: dict[int, dict[str, str]] = {}
    if dialogues_json is not None:
        val = json.loads(Path(dialogues_json).read_text(encoding="utf-8"))
        if len(val) != len(val_ids):
            raise ValueError(
                f"{dialogues_json} has {len(val)} dialogues but {dialogue_ids_json} lists {len(val_ids)} ids"
            )
        for index, (dialogue_id, dialogue) in enumerate(zip(val_ids, val, strict=True)):
            rows = dialogues.get(dialogue_id)
            speakers = ["user" if turn.get("speaker") == "user" else "assistant" for turn in dialogue.get("dialog", [])]
            if rows is not None and speakers != [r["role"] for r in sorted(rows, key=lambda r: r["order"])]:
                raise ValueError(
                    f"{dialogues_json} dialogue {index} does not match CSV dialogue {dialogue_id} (speakers differ)"
                )
            contexts[dialogue_id] = {
                "situation": (dialogue.get("situation") or "").strip(),
                "problem_type": (dialogue.get("problem_type") or "").strip(),
            }

    selected = set(val_ids)
    records, openings = [], 0
    for dialogue_id, rows in dialogues.items():
        if dialogue_subset != "all" and (dialogue_id in selected) != (dialogue_subset == "val"):
            continue
        rows.sort(key=lambda r: r["order"])
        dialogue_records, skipped = _turn_records(str(dialogue_id), rows, contexts.get(dialogue_id, {}))
        records.extend(dialogue_records)
        openings += skipped
    logger.info("MESC %s: %d records, %d opening therapist turns skipped", csv_path, len(records), openings)
    return records


def convert_esconv(jsonl_path: PathLike, id_prefix: str | None = None) -> list[dict[str, Any]]:
    """ESConv dialogues -> MultiMood records (text only), one per supporter turn that follows the seeker.

    Reads the cleaned dialog files (JSONL: `speaker` usr/sys, `text`, `strategy`) and the original
    release's schema (a JSON array, e.g. FailedESConv.json: `speaker` seeker/speaker vs
    supporter/listener, `content`, `annotation.strategy`; old strategy spellings mapped by
    `ESCONV_STRATEGY_ALIASES`). Turns and the first-fragment rule are as in `convert_mesc`, except:
    `Emotion` is null (ESConv has no supporter emotion; the schema allows it), the client's emotion is
    the dialogue's `emotion_type`, there are no clips, texts have their whitespace collapsed (the
    original release ends lines with newlines), and `Dialogue_ID` is `{id_prefix}{index}` with
    `id_prefix` defaulting to the file's stem and a dash (`train-0`).
    """
    prefix = f"{Path(jsonl_path).stem}-" if id_prefix is None else id_prefix
    records, openings = [], 0
    for index, (location, dialogue, error) in enumerate(_raw_items(jsonl_path)):
        if error is not None:
            raise error
        where = f"{jsonl_path} {location}"
        if not isinstance(dialogue, dict) or not isinstance(dialogue.get("dialog"), list):
            raise ValueError(f"{where}: expected an ESConv dialogue object with a 'dialog' list")
        emotion = (dialogue.get("emotion_type") or "").strip().lower()
        turns = []
        for turn in dialogue["dialog"]:
            speaker = str(turn.get("speaker", "")).strip().lower()
            if speaker not in _ESCONV_CLIENT | _ESCONV_SUPPORTER:
                raise ValueError(f"{where}: unknown ESConv speaker {turn.get('speaker')!r}")
            text = turn.get("text", turn.get("content"))
            if not isinstance(text, str):
                raise ValueError(f"{where}: a turn has no text")
            text = " ".join(text.split())
            strategy = turn.get("strategy") or (turn.get("annotation") or {}).get("strategy")
            if strategy is not None:
                strategy = " ".join(strategy.split())
                strategy = ESCONV_STRATEGY_ALIASES.get(strategy, strategy)
            if text:
                turns.append(
                    {
                        "role": "user" if speaker in _ESCONV_CLIENT else "assistant",
                        "text": text,
                        "emotion": emotion if speaker in _ESCONV_CLIENT else None,
                        "strategy": strategy,
                    }
                )
        context = {
            "situation": (dialogue.get("situation") or "").strip(),
            "problem_type": (dialogue.get("problem_type") or "").strip(),
        }
        dialogue_records, skipped = _turn_records(f"{prefix}{index}", turns, context)
        records.extend(dialogue_records)
        openings += skipped
    logger.info("ESConv %s: %d records, %d opening supporter turns skipped", jsonl_path, len(records), openings)
    return records


def write_jsonl(records: Sequence[Mapping[str, Any]], path: PathLike) -> None:
    """One JSON object a line, UTF-8 (not escaped), parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Command line: multimood-data
# ----------------------------------------------------------------------------------------------


def _print_summary(records: Sequence[Mapping[str, Any]], output: PathLike) -> None:
    print(f"wrote {len(records)} records of {len({r['Dialogue_ID'] for r in records})} dialogues to {output}")
    for name in ("get_emotion_user_most_recent", "Emotion", "Strategy"):
        counts = Counter(str(r[name]) for r in records)
        print(f"{name}: " + ", ".join(f"{label} {n}" for label, n in counts.most_common()))


def _split_files(items: Sequence[str]) -> dict[str, list[str]]:
    """`SPLIT=PATH` or `PATH` (split "train") arguments -> split name -> files."""
    splits: dict[str, list[str]] = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep or os.path.exists(item):
            split, path = "train", item
        splits.setdefault(split, []).append(path)
    return splits


def main(argv: Sequence[str] | None = None) -> int:
    """`multimood-data`: convert MESC / ESConv to MultiMood records, or validate record files."""
    parser = argparse.ArgumentParser(prog="multimood-data", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    mesc = commands.add_parser("mesc", help="MESC CSV (+ val.json) -> records JSONL")
    mesc.add_argument("--csv", required=True, help="MESC utterance CSV (e.g. MESC_without_test.csv)")
    mesc.add_argument("--dialogues", help="val.json: situation and problem type of the val dialogues")
    mesc.add_argument("--dialogue-ids", help="val_dialogue_ids.json: CSV Dialogue_ID of each val.json dialogue")
    mesc.add_argument(
        "--dialogue-subset",
        choices=("all", "val", "train"),
        default="all",
        help="all CSV dialogues, the val ones, or all but the val ones (default: all)",
    )
    mesc.add_argument(
        "--clip-pattern",
        default=MESC_CLIP_PATTERN,
        help="clip file name with the fields dialogue_id, utterance_id, season, episode, row "
        "(default: %(default)s, the published naming)",
    )
    mesc.add_argument("--output", required=True, help="records JSONL to write")

    esconv = commands.add_parser("esconv", help="ESConv dialogues (JSONL or the original JSON array) -> records JSONL")
    esconv.add_argument("--input", required=True, help="ESConv train.jsonl / valid.jsonl / FailedESConv.json")
    esconv.add_argument("--id-prefix", help="Dialogue_ID prefix (default: the file stem and a dash)")
    esconv.add_argument("--output", required=True, help="records JSONL to write")

    validate = commands.add_parser("validate", help="check record files; print records read and skipped per split")
    validate.add_argument("files", nargs="+", metavar="[SPLIT=]FILE", help="JSONL or JSON-array record files")
    validate.add_argument("--no-targets", action="store_true", help="inference records: targets may be missing")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    if args.command == "mesc":
        records = convert_mesc(args.csv, args.dialogues, args.dialogue_ids, args.dialogue_subset, args.clip_pattern)
        write_jsonl(records, args.output)
        _print_summary(records, args.output)
        return 0
    if args.command == "esconv":
        records = convert_esconv(args.input, args.id_prefix)
        write_jsonl(records, args.output)
        _print_summary(records, args.output)
        return 0

    report: dict[str, SplitReport] = {}
    try:
        for split, files in _split_files(args.files).items():
            item = report.setdefault(split, SplitReport())
            for path in files:
                item.files.append(path)
                for _ in iter_records(path, not args.no_targets, skip_invalid=True, report=item):
                    pass
    except (InvalidRecordError, OSError) as err:
        print(f"error: {err}")
        return 1
    print(format_report(report))
    return 1 if any(item.skipped for item in report.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
