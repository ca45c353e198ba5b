"""MultiMood dialogue records: the schema, a validating `datasets` builder and corpus converters.

One record is one therapist turn (see ARCHITECTURE.md, "The record"):

| field | type | role |
|---|---|---|
| `Dialogue_ID` | string (ints in files are turned into strings) | required |
| `utt_user_most_recent` | non-empty list of strings: the client's latest fragments (some text needed) | required (model input) |
| `Utterance` | non-empty list of strings: the therapist's fragments | target |
| `Emotion` | string or null: the therapist's emotion (null where a corpus has none: ESConv) | target (key required) |
| `Strategy` | non-empty string | target |
| `get_emotion_user_most_recent` | non-empty string: the client's emotion | target |
| `path_to_vid_user_most_recent` | list of strings: clip paths, relative to the video folder | optional, default `[]` |
| `history_chat` | list of `{"role": "user"/"assistant", "content"}` | optional, default `[]` |
| `history_chat_mamba` | string: the history for the compressor | optional, default `""` |
| `situation`, `problem_type` | strings | optional, default `""` |

Targets are required for training (`require_targets=True`, the default); with `require_targets=False`
(inference data) a missing target becomes null. With a label set (`label_set="mesc"` / `"esconv"`, or
explicit lists) the targets must name its labels: case, spacing and a trailing full stop are ignored and
the label set's spelling is stored (`"Sadness "` -> `"sadness"`), any other value is an error, and a
null `Emotion` is an error (a training target needs it). The checks are `records.validate_record`, the
same the processor applies to every batch: a file that validates trains. `history_chat` also accepts plain strings, as in the
seed README: a `Client: ` / `Therapist: ` prefix names the speaker, an unprefixed string is spoken by
the other speaker than the message before it (the first one by the client); they are stored as
`{"role", "content"}` messages (user = client, assistant = therapist; the roles `client` / `therapist`
are accepted too). Fields outside the schema are dropped with one warning per file. Clip paths stay
paths: decoding belongs to the processor.

Files are JSON Lines (one object a line) or one JSON array (the seed's form), told apart by the
first non-space character. Every error names the file, the line (and the array index) and the field;
bytes that are not UTF-8 and lines that are not JSON are errors of their line.
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

from ..cli import run_command
from ..model.processing_multimood import LABEL_SETS
from ..model.records import SCHEMA_FIELDS, MultimoodError, MultimoodRecordError, canonical_label, validate_record

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
assert tuple(MULTIMOOD_FEATURES) == SCHEMA_FIELDS

REPORT_FILENAME = "multimood_read_report.json"
# The builder's code is part of its cache key: editing this file regenerates cached datasets.
_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

_SPEAKER_NAMES = {"user": "Client", "assistant": "Therapist"}


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


class InvalidRecordError(MultimoodRecordError):
    """A record or file that does not fit the schema; `str(error)` names the file, line and field."""

    def __init__(self, message: str, path: str | None = None, location: str | None = None, field: str | None = None):
        self.path, self.location = path, location
        super().__init__(" ".join(part for part in (path, location) if part) or None, field, message)


def label_lists(label_set: str | None) -> tuple[list[str] | None, list[str] | None]:
    """(emotion labels, strategy labels) of a named label set; `None` / `"none"`: no label check."""
    if label_set is None or label_set == "none":
        return None, None
    if label_set not in LABEL_SETS:
        raise MultimoodError(f"label set must be one of {', '.join(sorted(LABEL_SETS))} or none, got {label_set!r}")
    return list(LABEL_SETS[label_set]["emotion_labels"]), list(LABEL_SETS[label_set]["strategy_labels"])


def normalize_record(record: Any, require_targets: bool = True, label_set: str | None = None) -> dict[str, Any]:
    """Check one raw record against the schema (and a label set) and return it in the canonical form of
    `MULTIMOOD_FEATURES`. Raises `InvalidRecordError` naming the field (the file readers add the file and line).
    """
    try:
        return _normalize(record, require_targets, label_set)
    except MultimoodRecordError as err:
        raise InvalidRecordError(err.problem, field=err.field) from None


def _normalize(record: Any, require_targets: bool, label_set: str | None = None) -> dict[str, Any]:
    emotions, strategies = label_lists(label_set)
    return validate_record(record, require_targets, emotions, strategies, label_set=label_set, where="record")


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------


@dataclass
class SplitReport:
    """What reading one split found: records read, invalid records skipped, and the files."""

    read: int = 0
    skipped: int = 0
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per skipped record: file, line, field

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


def _not_utf8(line: bytes, error: UnicodeDecodeError, line_start: int = 0) -> str:
    """The message for bytes that are not UTF-8 (`line_start`: offset of the line in the decoded buffer)."""
    return (f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at column {error.start - line_start + 1}); "
            "save the file as UTF-8")


def iter_json_items(path: PathLike) -> Iterator[tuple[str, Any, InvalidRecordError | None]]:
    """`(location, object, parse_error)` for every record of a JSONL file or a JSON-array file."""
    name = str(path)
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    if data.lstrip()[:1] == b"[":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line, line_start = data.count(b"\n", 0, err.start) + 1, data.rfind(b"\n", 0, err.start) + 1
            raise InvalidRecordError(_not_utf8(data, err, line_start), name, f"line {line}") from None
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
    for line_number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        location = f"line {line_number}"
        try:
            yield location, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as err:
            yield location, None, InvalidRecordError(_not_utf8(raw, err), name, location)
        except json.JSONDecodeError as err:
            message = f"malformed JSON ({err.msg}, column {err.colno})"
            yield location, None, InvalidRecordError(message, name, location)


def iter_located_records(
    path: PathLike,
    require_targets: bool = True,
    skip_invalid: bool = False,
    report: SplitReport | None = None,
    label_set: str | None = None,
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """`(index, location, record)` of every valid record of one file: `index` is the record's position among
    the file's records (invalid ones included), `location` its line (and array index).

    Invalid records raise `InvalidRecordError`, or with `skip_invalid` are logged, counted in `report` and
    listed in `report.problems`.
    """
    name = str(path)
    emotions, strategies = label_lists(label_set)
    unknown: set[str] = set()
    for index, (location, item, error) in enumerate(iter_json_items(path)):
        if report is not None:
            report.read += 1
        if error is None:
            try:
                record = validate_record(item, require_targets, emotions, strategies, label_set=label_set, where=location)
            except MultimoodRecordError as err:
                error = InvalidRecordError(err.problem, name, location, err.field)
        if error is not None:
            if not skip_invalid:
                raise error
            logger.warning("skipping invalid record: %s", error)
            if report is not None:
                report.skipped += 1
                report.problems.append(str(error))
            continue
        unknown.update(set(item) - set(MULTIMOOD_FEATURES))
        yield index, location, record
    if unknown:
        logger.warning("%s: ignored fields outside the MultiMood schema: %s", name, ", ".join(sorted(unknown)))


def iter_records(
    path: PathLike,
    require_targets: bool = True,
    skip_invalid: bool = False,
    report: SplitReport | None = None,
    label_set: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Normalised records of one file; invalid ones raise, or with `skip_invalid` are logged and counted in `report`."""
    for _, _, record in iter_located_records(path, require_targets, skip_invalid, report, label_set):
        yield record


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
        label_set (`str`, *optional*): `"mesc"` or `"esconv"`: the targets must name that label set's labels
            (see the module doc); `None` checks the schema only.
    """

    skip_invalid: bool = False
    require_targets: bool = True
    label_set: str | None = None


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
            records = iter_records(
                path, self.config.require_targets, self.config.skip_invalid, report, self.config.label_set
            )
            for record_index, record in enumerate(records):
                yield Key(file_index, record_index), record

    def _prepare_split(self, split_generator: datasets.SplitGenerator, **kwargs: Any) -> None:
        try:
            super()._prepare_split(split_generator, **kwargs)
        except DatasetGenerationError as err:
            # Show the record error itself (file, line, field), not datasets' generic wrapper.
            if isinstance(err.__cause__, (MultimoodError, OSError)):
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
    label_set: str | None = None,
) -> datasets.DatasetDict | tuple[datasets.DatasetDict, dict[str, SplitReport]]:
    """Load MultiMood record files into a `DatasetDict` with `MULTIMOOD_FEATURES`, offline.

    `data_files` is one file or a list of files (the split "train"), or a mapping split name -> file(s);
    glob patterns are allowed. Relative paths are resolved against `base_dir` when given, else the
    current working directory, once, when this is called; each record keeps its clip paths relative
    (they are resolved against the video folder by the processor). The result is cached under
    `cache_dir` (default: the datasets cache) and rebuilt when a file or this module changes.
    `return_report=True` also returns the records read and skipped per split (they are logged too).
    `label_set` (`"mesc"`, `"esconv"`): the targets must name its labels (see the module doc).
    """
    label_lists(label_set)  # an unknown name fails here, not inside datasets
    base_path = os.path.abspath(base_dir if base_dir is not None else os.getcwd())
    builder = MultimoodDialogueBuilder(
        data_files=_data_files_dict(data_files),
        base_path=base_path,
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        skip_invalid=skip_invalid,
        require_targets=require_targets,
        label_set=label_set,
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


def read_json_file(path: PathLike) -> Any:
    """The JSON value of a file; not UTF-8 or malformed JSON is a `MultimoodError` naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        line, line_start = data.count(b"\n", 0, err.start) + 1, data.rfind(b"\n", 0, err.start) + 1
        raise MultimoodError(f"{path} line {line}: {_not_utf8(data, err, line_start)}") from None
    except json.JSONDecodeError as err:
        raise MultimoodError(f"{path} line {err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None


def _read_dialogue_ids(path: PathLike) -> list[int]:
    data = read_json_file(path)
    if isinstance(data, dict):
        data = data.get("val_json_dialogue_ids", next(iter(data.values()), None))
    if not isinstance(data, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in data):
        raise MultimoodError(f"{path}: expected a list of integer dialogue ids (or {{'val_json_dialogue_ids': [...]}})")
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
        raise MultimoodError(f"dialogue_subset must be 'all', 'val' or 'train', got {dialogue_subset!r}")
    if (dialogue_subset != "all" or dialogues_json is not None) and dialogue_ids_json is None:
        raise MultimoodError("dialogue_ids_json is needed to select the val dialogues or to pair val.json with the CSV")
    val_ids = _read_dialogue_ids(dialogue_ids_json) if dialogue_ids_json is not None else []

    dialogues: dict[int, list[dict[str, Any]]] = {}
    emotions, strategies = label_lists("mesc")
    with open(csv_path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = []
        try:
            for row in reader:
                rows.append((reader.line_num, row))
        except UnicodeDecodeError as err:
            raise MultimoodError(f"{csv_path} line {reader.line_num + 1}: not UTF-8 text ({err.reason}); "
                                 "save the file as UTF-8") from None
        except csv.Error as err:
            raise MultimoodError(f"{csv_path} line {reader.line_num}: malformed CSV ({err})") from None
        missing = [column for column in MESC_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise MultimoodError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        for row_index, (line, row) in enumerate(rows):
            if any(row.get(column) is None for column in MESC_COLUMNS):
                raise MultimoodError(f"{csv_path} line {line}: the row has fewer cells than the header")
            speaker = row["Speaker"].strip().lower()
            if speaker not in ("client", "therapist"):
                raise MultimoodError(
                    f"{csv_path} line {line}: column 'Speaker' must be Client or Therapist, got {row['Speaker']!r}"
                )
            try:
                dialogue_id, utterance_id = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
                season, episode = int(row["Season"]), int(row["Episode"])
            except ValueError as err:
                raise MultimoodError(f"{csv_path} line {line}: {err} (Dialogue_ID, Utterance_ID, Season and "
                                     "Episode must be integers)") from None
            if _label(row["Emotion"]) not in emotions:
                raise MultimoodError(f"{csv_path} line {line}: column 'Emotion' is {row['Emotion']!r}, not one of the "
                                     f"mesc emotion labels ({', '.join(emotions)})")
            if speaker == "therapist" and _label(row["Strategy"]) not in strategies:
                raise MultimoodError(f"{csv_path} line {line}: column 'Strategy' is {row['Strategy']!r}, not one of the "
                                     f"mesc strategy labels ({', '.join(strategies)})")
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
        val = read_json_file(dialogues_json)
        if not isinstance(val, list) or not all(isinstance(dialogue, dict) for dialogue in val):
            raise MultimoodError(f"{dialogues_json}: expected a list of dialogue objects (MESC val.json)")
        if len(val) != len(val_ids):
            raise MultimoodError(
                f"{dialogues_json} has {len(val)} dialogues but {dialogue_ids_json} lists {len(val_ids)} ids"
            )
        for index, (dialogue_id, dialogue) in enumerate(zip(val_ids, val, strict=True)):
            rows = dialogues.get(dialogue_id)
            speakers = ["user" if turn.get("speaker") == "user" else "assistant" for turn in dialogue.get("dialog", [])]
            if rows is not None and speakers != [r["role"] for r in sorted(rows, key=lambda r: r["order"])]:
                raise MultimoodError(
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
    _check_converted(records, csv_path, require_targets=True, label_set="mesc")
    logger.info("MESC %s: %d records, %d opening therapist turns skipped", csv_path, len(records), openings)
    return records


def _check_converted(records: Sequence[Mapping[str, Any]], source: PathLike, require_targets: bool,
                     label_set: str) -> None:
    """Every converted record passes the validator (what a converter writes validates and trains)."""
    emotions, strategies = label_lists(label_set)
    for index, record in enumerate(records):
        where = f"{source}: converted record {index} (Dialogue_ID={record['Dialogue_ID']})"
        validate_record(record, require_targets, emotions, strategies, label_set=label_set, where=where)


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
    emotions, strategies = label_lists("esconv")
    records, openings = [], 0
    for index, (location, dialogue, error) in enumerate(iter_json_items(jsonl_path)):
        if error is not None:
            raise error
        where = f"{jsonl_path} {location}"
        if not isinstance(dialogue, dict) or not isinstance(dialogue.get("dialog"), list):
            raise MultimoodError(f"{where}: expected an ESConv dialogue object with a 'dialog' list")
        emotion = canonical_label(str(dialogue.get("emotion_type") or ""), emotions)
        if emotion not in emotions:
            raise MultimoodError(f"{where}: field 'emotion_type' is {dialogue.get('emotion_type')!r}, not one of the "
                                 f"esconv emotion labels ({', '.join(emotions)})")
        turns = []
        for turn_index, turn in enumerate(dialogue["dialog"]):
            if not isinstance(turn, dict):
                raise MultimoodError(f"{where}, dialog turn {turn_index}: expected an object, got {type(turn).__name__}")
            speaker = str(turn.get("speaker", "")).strip().lower()
            if speaker not in _ESCONV_CLIENT | _ESCONV_SUPPORTER:
                raise MultimoodError(f"{where}, dialog turn {turn_index}: unknown ESConv speaker {turn.get('speaker')!r}")
            text = turn.get("text", turn.get("content"))
            if not isinstance(text, str):
                raise MultimoodError(f"{where}, dialog turn {turn_index}: field 'text' must be a string, got {text!r}")
            text = " ".join(text.split())
            strategy = turn.get("strategy") or (turn.get("annotation") or {}).get("strategy")
            if speaker in _ESCONV_SUPPORTER and text:
                if not isinstance(strategy, str) or not strategy.strip():
                    raise MultimoodError(f"{where}, dialog turn {turn_index}: the supporter turn has no strategy "
                                         f"(field 'strategy', one of {', '.join(strategies)})")
                strategy = " ".join(strategy.split())
                strategy = canonical_label(ESCONV_STRATEGY_ALIASES.get(strategy, strategy), strategies)
                if strategy not in strategies:
                    raise MultimoodError(f"{where}, dialog turn {turn_index}: field 'strategy' is "
                                         f"{turn.get('strategy') or turn['annotation'].get('strategy')!r}, not one of "
                                         f"the esconv strategy labels ({', '.join(strategies)})")
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
    _check_converted(records, jsonl_path, require_targets=False, label_set="esconv")
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
    return run_command("multimood-data", data_command, None if argv is None else list(argv))


def data_command(argv: Sequence[str] | None = None) -> int:
    """`multimood data` / `multimood-data`: convert MESC / ESConv to MultiMood records, or validate record files."""
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
    validate.add_argument(
        "--label-set",
        choices=(*sorted(LABEL_SETS), "none"),
        default="mesc",
        help="the targets must name this label set's labels, as the processor's (default: %(default)s; "
        "none: schema only)",
    )

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    if args.command in ("mesc", "esconv"):
        if os.path.exists(args.output) and os.path.samefile(args.output, args.csv if args.command == "mesc" else args.input):
            raise MultimoodError(f"--output {args.output} is the input file: choose another path")
        if args.command == "mesc":
            records = convert_mesc(args.csv, args.dialogues, args.dialogue_ids, args.dialogue_subset, args.clip_pattern)
        else:
            records = convert_esconv(args.input, args.id_prefix)
            print("note: ESConv has no therapist emotion (Emotion is null): these records validate with "
                  "`--no-targets --label-set esconv`; training needs an Emotion label")
        write_jsonl(records, args.output)
        _print_summary(records, args.output)
        return 0

    report: dict[str, SplitReport] = {}
    empty = []
    for split, files in _split_files(args.files).items():
        item = report.setdefault(split, SplitReport())
        for path in files:
            item.files.append(path)
            read = item.read
            for _ in iter_records(path, not args.no_targets, skip_invalid=True, report=item, label_set=args.label_set):
                pass
            if item.read == read:
                empty.append(path)
    print(format_report(report))
    for path in empty:
        print(f"error: {path}: no records (an empty file)")
    return 1 if empty or any(item.skipped for item in report.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
