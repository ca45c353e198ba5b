"""Record files: reading JSON Lines / JSON-array files record by record with file-and-line errors, and writing JSONL.

Files are JSON Lines (one object a line) or one JSON array (the seed's form), told apart by the first
non-space character. Every error names the file, the line (and the array index) and the field; bytes
that are not UTF-8 and lines that are not JSON are errors of their line. Records are checked by
`multimood.model.records.validate_record`, the same check the processor applies to every batch, so a
file that validates trains. Fields outside the schema are dropped with one warning per file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.records import SCHEMA_FIELDS, MultimoodError, MultimoodRecordError, label_lists, validate_record

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


class InvalidRecordError(MultimoodRecordError):
    """A record or file that does not fit the schema; `str(error)` names the file, line and field."""

    def __init__(self, message: str, path: str | None = None, location: str | None = None, field: str | None = None):
        self.path, self.location = path, location
        super().__init__(" ".join(part for part in (path, location) if part) or None, field, message)


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


def _not_utf8(error: UnicodeDecodeError, line_start: int = 0) -> str:
    """The message for bytes that are not UTF-8 (`line_start`: offset of the line in the decoded buffer)."""
    return (f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at column {error.start - line_start + 1}); "
            "save the file as UTF-8")


def _line_of(data: bytes, error: UnicodeDecodeError) -> tuple[int, int]:
    """(line number, offset of that line) of a decoding error in a whole file's bytes."""
    return data.count(b"\n", 0, error.start) + 1, data.rfind(b"\n", 0, error.start) + 1


def read_json_file(path: PathLike) -> Any:
    """The JSON value of a file; not UTF-8 or malformed JSON is a `MultimoodError` naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        line, line_start = _line_of(data, err)
        raise MultimoodError(f"{path} line {line}: {_not_utf8(err, line_start)}") from None
    except json.JSONDecodeError as err:
        raise MultimoodError(f"{path} line {err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None


def _iter_array_items(name: str, data: bytes) -> Iterator[tuple[str, Any, None]]:
    """The items of a JSON-array file, each with its line and array index."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line, line_start = _line_of(data, err)
        raise InvalidRecordError(_not_utf8(err, line_start), name, f"line {line}") from None
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


def iter_json_items(path: PathLike) -> Iterator[tuple[str, Any, InvalidRecordError | None]]:
    """`(location, object, parse_error)` for every record of a JSONL file or a JSON-array file."""
    name = str(path)
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    if data.lstrip()[:1] == b"[":
        yield from _iter_array_items(name, data)
        return
    for line_number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        location = f"line {line_number}"
        try:
            yield location, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as err:
            yield location, None, InvalidRecordError(_not_utf8(err), name, location)
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

    Records are checked by `validate_record` (with the labels of `label_set` when given) and returned in its
    canonical form. Invalid records raise `InvalidRecordError`, or with `skip_invalid` are logged, counted in
    `report` and listed in `report.problems`.
    """
    name = str(path)
    emotions, strategies = label_lists(label_set)
    unknown: set[str] = set()
    for index, (location, item, error) in enumerate(iter_json_items(path)):
        if report is not None:
            report.read += 1
        if error is None:
            try:
                record = validate_record(item, require_targets, emotions, strategies, label_set, where=location)
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
        unknown.update(set(item) - set(SCHEMA_FIELDS))
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
    """Canonical records of one file (see `iter_located_records`)."""
    for _, _, record in iter_located_records(path, require_targets, skip_invalid, report, label_set):
        yield record


def write_jsonl(records: Sequence[Mapping[str, Any]], path: PathLike) -> None:
    """One JSON object a line, UTF-8 (not escaped), parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


__all__ = [
    "InvalidRecordError",
    "SplitReport",
    "format_report",
    "iter_json_items",
    "iter_located_records",
    "iter_records",
    "read_json_file",
    "write_jsonl",
]
