"""MultiMood dialogue records as a `datasets` `DatasetDict`: a validating builder, `load_dialogues`, and the
`multimood data` command (convert MESC / ESConv, validate record files).

One record is one therapist turn; its fields and the checks are those of `multimood.model.records` (the
schema table and `validate_record`), the same the processor applies to every batch: a file that validates
trains. Targets are required for training (`require_targets=True`, the default); with
`require_targets=False` (inference data) a missing target becomes null. With a label set (`label_set="mesc"`
/ `"esconv"`) the targets must name its labels: case, spacing and a trailing full stop are ignored and the
label set's spelling is stored (`"Sadness "` -> `"sadness"`), any other value is an error, and a null
`Emotion` is an error (a training target needs it). `history_chat` also accepts plain strings, as in the
seed README: a `Client: ` / `Therapist: ` prefix names the speaker, an unprefixed string is spoken by the
other speaker than the message before it (the first one by the client); they are stored as `{"role",
"content"}` messages (user = client, assistant = therapist). Fields outside the schema are dropped with one
warning per file. Clip paths stay paths: decoding belongs to the processor.

Files are JSON Lines or one JSON array (see `record_files`); every error names the file, the line (and the
array index) and the field. The corpus converters are in `corpora`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets.builder import Key
from datasets.exceptions import DatasetGenerationError

from ..cli import run_command
from ..model import records as record_schema
from ..model.records import LABEL_SETS, SCHEMA_FIELDS, MultimoodError, label_lists
from . import record_files
from .corpora import MESC_CLIP_PATTERN, MESC_SUBSETS, convert_esconv, convert_mesc
from .record_files import (
    PathLike,
    SplitReport,
    format_report,
    iter_records,
    write_jsonl,
)

logger = logging.getLogger(__name__)

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
# The code that reads and checks records is part of the cache key: editing it regenerates cached datasets.
_SOURCE_HASH = hashlib.sha256(
    b"".join(Path(module.__file__).read_bytes() for module in (record_schema, record_files))
    + Path(__file__).read_bytes()
).hexdigest()[:16]

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
    `cache_dir` (default: the datasets cache) and rebuilt when a file or the code reading records changes.
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
    args = _data_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.command in ("mesc", "esconv"):
        return _convert(args)
    return _validate(args.files, require_targets=not args.no_targets, label_set=args.label_set)


def _data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimood-data", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    mesc = commands.add_parser("mesc", help="MESC CSV (+ val.json) -> records JSONL")
    mesc.add_argument("--csv", required=True, help="MESC utterance CSV (e.g. MESC_without_test.csv)")
    mesc.add_argument("--dialogues", help="val.json: situation and problem type of the val dialogues")
    mesc.add_argument("--dialogue-ids", help="val_dialogue_ids.json: CSV Dialogue_ID of each val.json dialogue")
    mesc.add_argument(
        "--dialogue-subset",
        choices=MESC_SUBSETS,
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
    return parser


def _convert(args: argparse.Namespace) -> int:
    """`data mesc` / `data esconv`: write the converted records and print their label counts."""
    source = args.csv if args.command == "mesc" else args.input
    if os.path.exists(args.output) and os.path.samefile(args.output, source):
        raise MultimoodError(f"--output {args.output} is the input file: choose another path")
    if args.command == "mesc":
        converted = convert_mesc(args.csv, args.dialogues, args.dialogue_ids, args.dialogue_subset, args.clip_pattern)
    else:
        converted = convert_esconv(args.input, args.id_prefix)
        print("note: ESConv has no therapist emotion (Emotion is null): these records validate with "
              "`--no-targets --label-set esconv`; training needs an Emotion label")
    write_jsonl(converted, args.output)
    _print_summary(converted, args.output)
    return 0


def _validate(items: Sequence[str], require_targets: bool, label_set: str) -> int:
    """`data validate`: records read and skipped per split; non-zero when a record is invalid or a file empty."""
    report: dict[str, SplitReport] = {}
    empty = []
    for split, files in _split_files(items).items():
        item = report.setdefault(split, SplitReport())
        for path in files:
            item.files.append(path)
            read = item.read
            for _ in iter_records(path, require_targets, skip_invalid=True, report=item, label_set=label_set):
                pass
            if item.read == read:
                empty.append(path)
    print(format_report(report))
    for path in empty:
        print(f"error: {path}: no records (an empty file)")
    return 1 if empty or any(item.skipped for item in report.values()) else 0


__all__ = [
    "MULTIMOOD_FEATURES",
    "MultimoodDialogueBuilder",
    "MultimoodDialogueConfig",
    "data_command",
    "load_dialogues",
    "main",
]


if __name__ == "__main__":
    raise SystemExit(main())
