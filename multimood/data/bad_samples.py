"""Training data with bad samples: every record's clips checked once before training, and a record that fails
while its batch is built named by its place in its file.

`--on_bad_sample error` (the default) stops before training with one line naming the data file, the line, the
`Dialogue_ID` and the clip of the first bad record; `skip` leaves the bad records out and says how many. Both list
every bad record found in `OUTPUT_DIR/bad_samples.jsonl` (file, line, Dialogue_ID, clip, problem).

The check resolves the clips the processor will read (a record's last `num_k_vid`) and probes each distinct one from
its packet table (`media.probe_clip`: no decoding; it refuses missing files, still images, cut-off clips), on a
few threads with a progress bar. Verdicts are cached in `OUTPUT_DIR/clip_probe_cache.json` by path, size and
modification time, so a rerun or a resume probes only new or changed clips.

What a probe cannot see (damage inside the data, a broken audio track) shows when the batch is built:
`LocatedCollator` then finds the record at fault and raises `BadSampleError` naming its file and line (`error`),
or drops it from the batch, logs it and appends it to `bad_samples.jsonl` (`skip`). Checkpoints written before
such an error are left as they are, so `--resume_from_checkpoint` continues from the last one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from ..model.media import probe_clip, resolve_clip
from ..model.records import MultimoodError, record_name
from .record_files import iter_json_items

logger = logging.getLogger(__name__)

BAD_SAMPLES_FILENAME = "bad_samples.jsonl"
PROBE_CACHE_FILENAME = "clip_probe_cache.json"
# Dataset column that carries each record's place in its file to the collator (removed before processing): an
# index into the screen's table of (data file, location).
SOURCE_COLUMN = "multimood_source"
BAD_SAMPLE_POLICIES = ("error", "skip")
_PLACEHOLDER = "record \0"  # the record name given to probes whose verdict is cached for every record using the clip


class BadSampleError(MultimoodError):
    """A training record that cannot be used; the message names the data file, the line, Dialogue_ID and clip."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises errors in the main process with the worker's whole traceback as the message
        # (torch's ExceptionWrapper); keep the one line the user needs, which is the traceback's last.
        if message.startswith("Caught ") and f"{type(self).__name__}: " in message:
            message = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[1]
        super().__init__(message)


@dataclass(frozen=True)
class BadSample:
    """One record left out or refused, and why."""

    data_file: str
    location: str
    dialogue_id: str | None
    clip: str | None
    problem: str

    def describe(self) -> str:
        """`train.jsonl line 12 (Dialogue_ID=7): clip /videos/a.mp4 is truncated or damaged: ...`."""
        return f"{self.source}: {self.problem}"

    @property
    def source(self) -> str:
        return f"{self.data_file} {self.location} (Dialogue_ID={self.dialogue_id})"


def record_locations(path: str | os.PathLike) -> list[str]:
    """Where each record of a JSONL / JSON-array file is (`line 12`, `line 3 (array index 2)`), in file order."""
    return [location for location, _, _ in iter_json_items(path)]


def _without_name(message: str, name: str) -> str:
    """A media or processor message without its leading record name (the caller names the record itself)."""
    return message[len(name) :].lstrip(":, ") if message.startswith(name) else message


class ClipProbeCache:
    """Probe verdicts (None = usable, else the problem) keyed by clip path, size and modification time."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                logger.warning("%s: unreadable probe cache, probing every clip again", path)

    @staticmethod
    def _stamp(clip: Path) -> dict[str, int]:
        stat = clip.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def lookup(self, clip: Path) -> tuple[bool, str | None]:
        """(found, problem): found is False when the clip is new or changed since it was probed."""
        entry = self.entries.get(str(clip))
        if entry is None or {key: entry.get(key) for key in ("size", "mtime_ns")} != self._stamp(clip):
            return False, None
        return True, entry.get("problem")

    def store(self, clip: Path, problem: str | None) -> None:
        self.entries[str(clip)] = {**self._stamp(clip), "problem": problem}

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.entries, indent=1), encoding="utf-8")
        os.replace(partial, self.path)


def _probe_problem(clip: Path) -> str | None:
    try:
        probe_clip(clip, _PLACEHOLDER[len("record ") :])
    except (ValueError, OSError) as error:
        return _without_name(str(error), _PLACEHOLDER)
    return None


def find_bad_samples(
    clip_lists: Sequence[Sequence[str]],
    dialogue_ids: Sequence[str],
    data_file: str,
    locations: Sequence[str],
    video_folder: str | None,
    num_k_vid: int,
    cache: ClipProbeCache,
    progress: bool = True,
    threads: int | None = None,
) -> list[BadSample]:
    """The records (one clip list and Dialogue_ID each) whose clips cannot be used, in file order."""
    bad: list[BadSample] = []
    used: list[list[tuple[str, Path]]] = []
    for clips, dialogue_id, location in zip(clip_lists, dialogue_ids, locations):
        resolved = []
        for clip in list(clips)[-num_k_vid:] if num_k_vid > 0 else list(clips):
            try:
                resolved.append((clip, resolve_clip(clip, video_folder, _PLACEHOLDER[len("record ") :])))
            except (ValueError, OSError) as error:
                bad.append(BadSample(data_file, location, dialogue_id, clip, _without_name(str(error), _PLACEHOLDER)))
                resolved = None
                break
        used.append(resolved or [])

    problems: dict[Path, str | None] = {}
    to_probe = []
    for path in dict.fromkeys(path for clips in used for _, path in clips):
        found, problem = cache.lookup(path)
        if found:
            problems[path] = problem
        else:
            to_probe.append(path)
    if to_probe:
        threads = threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool, tqdm(
            total=len(to_probe), desc=f"checking the clips of {Path(data_file).name}", unit="clip", disable=not progress
        ) as bar:
            futures = {pool.submit(_probe_problem, path): path for path in to_probe}
            for future in as_completed(futures):
                problems[futures[future]] = future.result()
                cache.store(futures[future], problems[futures[future]])
                bar.update()
        cache.save()

    for clips, dialogue_id, location in zip(used, dialogue_ids, locations):
        for clip, path in clips:
            if problems[path] is not None:
                bad.append(BadSample(data_file, location, dialogue_id, clip, problems[path]))
                break
    order = {location: position for position, location in enumerate(locations)}
    return sorted(bad, key=lambda sample: order[sample.location])


def write_bad_samples(path: Path, samples: Sequence[BadSample], append: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(asdict(sample), ensure_ascii=False) + "\n")


@dataclass
class BadSampleScreen:
    """Applies `--on_bad_sample` to the training and evaluation datasets and to the collator."""

    policy: Literal["error", "skip"]
    video_folder: str | None
    num_k_vid: int
    output_dir: str | os.PathLike
    main_process: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.policy not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"--on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {self.policy!r}")
        self.list_path = Path(self.output_dir) / BAD_SAMPLES_FILENAME
        if self.main_process and self.list_path.exists():
            self.list_path.unlink()  # a list from an earlier run would mix with this one's
        self.cache = ClipProbeCache(Path(self.output_dir) / PROBE_CACHE_FILENAME if self.main_process else None)
        self.sources: list[tuple[str, str]] = []  # (data file, location) of every record screened

    def dataset(self, dataset, data_file: str | os.PathLike):
        """`dataset` (records of `data_file`, in file order) with each record's place in its file as a column; with
        `skip`, without the bad records. With `error`, raises `BadSampleError` on the first bad record."""
        data_file = str(data_file)
        locations = record_locations(data_file)[: len(dataset)]
        bad = find_bad_samples(
            dataset["path_to_vid_user_most_recent"], dataset["Dialogue_ID"], data_file, locations,
            self.video_folder, self.num_k_vid, self.cache, progress=self.progress and self.main_process,
        )
        first = len(self.sources)
        self.sources.extend((data_file, location) for location in locations)
        dataset = dataset.add_column(SOURCE_COLUMN, list(range(first, len(self.sources))))
        if not bad:
            return dataset
        if self.main_process:
            write_bad_samples(self.list_path, bad, append=True)
        if self.policy == "error":
            count, them = (f"{len(bad)} bad records", "them") if len(bad) > 1 else ("1 bad record", "it")
            raise BadSampleError(
                f"{bad[0].describe()} ({count} listed in {self.list_path}; --on_bad_sample skip leaves {them} out)"
            )
        if len(bad) == len(dataset):
            raise BadSampleError(f"{data_file}: every record is bad, e.g. {bad[0].describe()}")
        left_out = {sample.location for sample in bad}
        logger.warning(
            "%s: left out %d of %d records with unusable clips (--on_bad_sample skip), listed in %s; first: %s",
            data_file, len(bad), len(dataset), self.list_path, bad[0].describe(),
        )
        return dataset.select([i for i, location in enumerate(locations) if location not in left_out])

    def collator(self, collator: Callable[[list[dict]], Any]) -> LocatedCollator:
        return LocatedCollator(collator, list(self.sources), self.policy, str(self.list_path))


@dataclass
class LocatedCollator:
    """Wraps a record collator: a batch that fails is rebuilt record by record to find the bad one, which is named
    by its file and line (`error`) or dropped, logged and listed (`skip`)."""

    collator: Callable[[list[dict]], Any]
    sources: Sequence[tuple[str, str]]
    policy: Literal["error", "skip"] = "error"
    list_path: str | None = None

    def __call__(self, records: list[dict]) -> Any:
        sources = [record.pop(SOURCE_COLUMN, None) for record in records]
        try:
            return self.collator(records)
        except (ValueError, OSError) as error:
            bad = self._bad_records(records, sources)
            if not bad:
                raise
            if self.policy == "error" or len(bad) == len(records):
                first = bad[0][1]
                raise BadSampleError(
                    first.describe() + ("" if self.policy == "error" else " (every record of the batch is bad)")
                ) from error
        for _, sample in bad:
            logger.warning("left out %s (--on_bad_sample skip)", sample.describe())
        if self.list_path:
            write_bad_samples(Path(self.list_path), [sample for _, sample in bad], append=True)
        positions = {position for position, _ in bad}
        return self.collator([record for position, record in enumerate(records) if position not in positions])

    def _bad_records(self, records: list[dict], sources: list[int | None]) -> list[tuple[int, BadSample]]:
        """(position in the batch, what is wrong) of each record that fails on its own."""
        bad = []
        for position, (record, source) in enumerate(zip(records, sources)):
            try:
                self.collator([record])
            except (ValueError, OSError) as error:
                data_file, location = self.sources[source] if source is not None else ("?", f"batch record {position}")
                problem = _without_name(str(error), record_name(record, 0))
                clips = record.get("path_to_vid_user_most_recent") or []
                clip = next((clip for clip in clips if clip in problem), None)
                bad.append((position, BadSample(data_file, location, record.get("Dialogue_ID"), clip, problem)))
        return bad
