"""Corpus converters: MESC (utterance CSV + val.json) and ESConv dialogues -> MultiMood records.

Both cut a dialogue the same way (`_turn_records`): one record per therapist turn that follows client
fragments. What they write passes `multimood.model.records.validate_record` (checked before returning),
so a converted file validates and, with targets, trains.
"""

from __future__ import annotations

import csv
import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..model.records import (
    SPEAKER_NAMES,
    MultimoodError,
    canonical_label,
    label_lists,
    merge_turns,
    speaker_role,
    validate_record,
)
from .record_files import PathLike, iter_json_items, read_json_file

logger = logging.getLogger(__name__)

# The published clip names (MESC clip extraction, MultiMood's records): `dia{D}_utt{U}_{row}.mp4`, where
# `row` is the utterance's 0-based row in the complete MESC CSV (all 1,019 dialogues, test included).
MESC_CLIP_PATTERN = "dia{dialogue_id}_utt{utterance_id}_{row}.mp4"
MESC_COLUMNS = ("Utterance", "Speaker", "Emotion", "Strategy", "Dialogue_ID", "Utterance_ID", "Season", "Episode")
MESC_SUBSETS = ("all", "val", "train")

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


# ----------------------------------------------------------------------------------------------
# Shared by both corpora
# ----------------------------------------------------------------------------------------------


def _mamba_history(history: Sequence[Mapping[str, str]]) -> str:
    """One line per turn (a speaker's consecutive fragments joined by spaces): `Client: ...` / `Therapist: ...`."""
    turns = merge_turns((message["role"], message["content"]) for message in history)
    return "\n".join(f"{SPEAKER_NAMES[role]}: {text}" for role, text in turns)


def _dialogue_context(dialogue: Mapping[str, Any]) -> dict[str, str]:
    """`situation` and `problem_type` of a dialogue object (MESC val.json, ESConv), stripped, `""` when absent."""
    return {
        "situation": (dialogue.get("situation") or "").strip(),
        "problem_type": (dialogue.get("problem_type") or "").strip(),
    }


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


def _check_converted(records: Sequence[Mapping[str, Any]], source: PathLike, require_targets: bool,
                     label_set: str) -> None:
    """Every converted record passes the validator (what a converter writes validates and trains)."""
    emotions, strategies = label_lists(label_set)
    for index, record in enumerate(records):
        where = f"{source}: converted record {index} (Dialogue_ID={record['Dialogue_ID']})"
        validate_record(record, require_targets, emotions, strategies, label_set=label_set, where=where)


# ----------------------------------------------------------------------------------------------
# MESC
# ----------------------------------------------------------------------------------------------


def _label(value: str) -> str:
    """Lower case, single spaces: MESC labels as the processor's label sets spell them."""
    return " ".join(value.split()).lower()


def _read_dialogue_ids(path: PathLike) -> list[int]:
    data = read_json_file(path)
    if isinstance(data, dict):
        data = data.get("val_json_dialogue_ids", next(iter(data.values()), None))
    if not isinstance(data, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in data):
        raise MultimoodError(f"{path}: expected a list of integer dialogue ids (or {{'val_json_dialogue_ids': [...]}})")
    return data


def _read_mesc_csv(csv_path: PathLike) -> list[tuple[int, dict[str, str]]]:
    """`(line, row)` of every data row of the MESC CSV; unreadable text, malformed CSV and missing columns
    are errors naming the file (and line)."""
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
    return rows


def _mesc_fragment(csv_path: PathLike, line: int, row: dict[str, str], row_index: int, clip_pattern: str) -> dict:
    """One CSV row as a fragment (`dialogue_id, order, role, text, emotion, strategy, clip`), its cells checked."""
    emotions, strategies = label_lists("mesc")
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
    clip = clip_pattern.format(
        dialogue_id=dialogue_id, utterance_id=utterance_id, season=season, episode=episode, row=row_index
    )
    return {
        "dialogue_id": dialogue_id,
        "order": utterance_id,
        "role": speaker_role(speaker),
        "text": row["Utterance"].strip(),
        "emotion": _label(row["Emotion"]),
        "strategy": _label(row["Strategy"]),
        "clip": clip,
    }


def _warn_on_missing_dialogues(csv_path: PathLike, dialogue_ids: set[int], clip_pattern: str) -> None:
    """Clip names numbered by CSV row match the published ones only when no dialogue is missing before them."""
    if "{row" in clip_pattern and dialogue_ids != set(range(max(dialogue_ids, default=-1) + 1)):
        first_gap = min(set(range(max(dialogue_ids) + 1)) - dialogue_ids)
        logger.warning(
            "%s lacks dialogues (first missing: %d): clip names using {row} do not match the published ones "
            "from that dialogue on; use the complete MESC CSV or a clip_pattern without {row}",
            csv_path,
            first_gap,
        )


def _mesc_contexts(
    dialogues_json: PathLike, dialogue_ids_json: PathLike, val_ids: list[int], dialogues: Mapping[int, list[dict]]
) -> dict[int, dict[str, str]]:
    """CSV dialogue id -> `situation` / `problem_type` from val.json (its i-th dialogue is CSV dialogue
    `val_ids[i]`); a dialogue whose speakers differ from the CSV's is an error."""
    val = read_json_file(dialogues_json)
    if not isinstance(val, list) or not all(isinstance(dialogue, dict) for dialogue in val):
        raise MultimoodError(f"{dialogues_json}: expected a list of dialogue objects (MESC val.json)")
    if len(val) != len(val_ids):
        raise MultimoodError(
            f"{dialogues_json} has {len(val)} dialogues but {dialogue_ids_json} lists {len(val_ids)} ids"
        )
    contexts = {}
    for index, (dialogue_id, dialogue) in enumerate(zip(val_ids, val, strict=True)):
        rows = dialogues.get(dialogue_id)
        speakers = ["user" if turn.get("speaker") == "user" else "assistant" for turn in dialogue.get("dialog", [])]
        if rows is not None and speakers != [r["role"] for r in sorted(rows, key=lambda r: r["order"])]:
            raise MultimoodError(
                f"{dialogues_json} dialogue {index} does not match CSV dialogue {dialogue_id} (speakers differ)"
            )
        contexts[dialogue_id] = _dialogue_context(dialogue)
    return contexts


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
    if dialogue_subset not in MESC_SUBSETS:
        raise MultimoodError(f"dialogue_subset must be 'all', 'val' or 'train', got {dialogue_subset!r}")
    if (dialogue_subset != "all" or dialogues_json is not None) and dialogue_ids_json is None:
        raise MultimoodError("dialogue_ids_json is needed to select the val dialogues or to pair val.json with the CSV")
    val_ids = _read_dialogue_ids(dialogue_ids_json) if dialogue_ids_json is not None else []

    dialogues: dict[int, list[dict[str, Any]]] = {}
    for row_index, (line, row) in enumerate(_read_mesc_csv(csv_path)):
        fragment = _mesc_fragment(csv_path, line, row, row_index, clip_pattern)
        dialogues.setdefault(fragment["dialogue_id"], []).append(fragment)
    _warn_on_missing_dialogues(csv_path, set(dialogues), clip_pattern)
    contexts = {}
    if dialogues_json is not None:
        contexts = _mesc_contexts(dialogues_json, dialogue_ids_json, val_ids, dialogues)

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


# ----------------------------------------------------------------------------------------------
# ESConv
# ----------------------------------------------------------------------------------------------


def _esconv_fragment(where: str, turn_index: int, turn: Any, emotion: str) -> dict[str, Any] | None:
    """One ESConv dialog turn as a fragment (`role, text, emotion, strategy`); None for an empty text.

    The client's fragments carry the dialogue's emotion; a supporter's must name one of the 8 strategies
    (the original release's spellings mapped by `ESCONV_STRATEGY_ALIASES`).
    """
    _, strategies = label_lists("esconv")
    where = f"{where}, dialog turn {turn_index}"
    if not isinstance(turn, dict):
        raise MultimoodError(f"{where}: expected an object, got {type(turn).__name__}")
    speaker = str(turn.get("speaker", "")).strip().lower()
    if speaker not in _ESCONV_CLIENT | _ESCONV_SUPPORTER:
        raise MultimoodError(f"{where}: unknown ESConv speaker {turn.get('speaker')!r}")
    text = turn.get("text", turn.get("content"))
    if not isinstance(text, str):
        raise MultimoodError(f"{where}: field 'text' must be a string, got {text!r}")
    text = " ".join(text.split())
    if not text:
        return None
    written = turn.get("strategy") or (turn.get("annotation") or {}).get("strategy")
    strategy = written
    if speaker in _ESCONV_SUPPORTER:
        if not isinstance(written, str) or not written.strip():
            raise MultimoodError(f"{where}: the supporter turn has no strategy (field 'strategy', one of "
                                 f"{', '.join(strategies)})")
        strategy = " ".join(written.split())
        strategy = canonical_label(ESCONV_STRATEGY_ALIASES.get(strategy, strategy), strategies)
        if strategy not in strategies:
            raise MultimoodError(f"{where}: field 'strategy' is {written!r}, not one of the esconv strategy labels "
                                 f"({', '.join(strategies)})")
    client = speaker in _ESCONV_CLIENT
    return {
        "role": "user" if client else "assistant",
        "text": text,
        "emotion": emotion if client else None,
        "strategy": strategy,
    }


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
    emotions, _ = label_lists("esconv")
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
        fragments = [_esconv_fragment(where, i, turn, emotion) for i, turn in enumerate(dialogue["dialog"])]
        turns = [fragment for fragment in fragments if fragment is not None]
        dialogue_records, skipped = _turn_records(f"{prefix}{index}", turns, _dialogue_context(dialogue))
        records.extend(dialogue_records)
        openings += skipped
    _check_converted(records, jsonl_path, require_targets=False, label_set="esconv")
    logger.info("ESConv %s: %d records, %d opening supporter turns skipped", jsonl_path, len(records), openings)
    return records


__all__ = ["ESCONV_STRATEGY_ALIASES", "MESC_CLIP_PATTERN", "MESC_COLUMNS", "convert_esconv", "convert_mesc"]
