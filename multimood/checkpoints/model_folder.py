"""Saved model folders: what one holds, checking one before loading it, and writing a complete one.

A complete multimood folder holds the model (`config.json` with `auto_map`, safetensors weights, the generation
config), the processor (`processor_config.json`, tokenizer files, chat template), the remote code of both and the
"emotional-support" pipeline declaration, so that `AutoModelForCausalLM`, `AutoProcessor` and `pipeline(...)` load
it with `trust_remote_code=True` in a process that never imported `multimood`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..model.pipeline_multimood import save_pipeline_files
from ..model.records import MultimoodError

CONFIG_NAME = "config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"


class ModelFolderError(MultimoodError):
    """A saved model folder that cannot be loaded: missing, incomplete or damaged (the file is named)."""


def is_hub_id(value: Any) -> bool:
    """`owner/name` that is not a local path: a Hub repo id."""
    return (
        isinstance(value, str)
        and bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value))
        and not os.path.exists(value)
    )


def read_json_config(path: Path, error: type[MultimoodError]) -> dict:
    """The JSON object of a `config.json`; `error` (naming the file) when it is not JSON or not an object."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path}: not a JSON config ({' '.join(str(problem).split())})") from None
    if not isinstance(config, dict):
        raise error(f"{path}: expected a JSON object")
    return config


def is_multimood_folder(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a local folder whose `config.json` is a multimood one."""
    if not path or not os.path.isdir(path):
        return False
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "multimood"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def check_model_folder(path: str | os.PathLike, need_processor: bool = True) -> Path | None:
    """Check a saved multimood folder before loading it, so that a damaged one fails with one clear line.

    Returns the folder, or None for a Hub repo id (`owner/name` that is not a local path: the Hub answers).
    Raises `ModelFolderError` for a missing path, a file, a folder without `config.json` (or with one of
    another model type), without `processor_config.json` (with `need_processor`), without weights, with a
    truncated or damaged `.safetensors` file or a shard its index lists but the folder lacks.
    """
    text = os.fspath(path)
    folder = Path(text).expanduser()
    if not folder.exists():
        if is_hub_id(text) and not text.startswith((".", "~")):
            return None
        raise ModelFolderError(f"{text}: no such model folder")
    if not folder.is_dir():
        raise ModelFolderError(f"{text}: is a file, expected a saved model folder")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelFolderError(f"{text}: no config.json: not a saved multimood model folder (save_pretrained writes "
                               "config.json, the weights, processor_config.json and the tokenizer files)")
    found = read_json_config(config_path, ModelFolderError).get("model_type")
    if found != "multimood":
        raise ModelFolderError(f"{config_path}: model_type is {found!r}, expected 'multimood' (convert a published "
                               "checkpoint with `multimood convert`)")
    if need_processor and not (folder / PROCESSOR_CONFIG_NAME).is_file():
        raise ModelFolderError(f"{text}: no processor_config.json: the processor was not saved with the model "
                               "(processor.save_pretrained(folder))")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set((json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}).values()))
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            raise ModelFolderError(f"{index}: not a safetensors index ({' '.join(str(error).split())})") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ModelFolderError(f"{index}: lists shard(s) the folder lacks: {', '.join(missing)}")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelFolderError(f"{text}: no model weights (*.safetensors)")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for every damage
            raise ModelFolderError(
                f"{file}: truncated or damaged safetensors file ({' '.join(str(error).split())})"
            ) from None
    return folder


def complete_model_folder(folder: str | os.PathLike, processor=None) -> None:
    """Add the processor files (when `processor` is given) and the pipeline declaration to a folder that holds a
    saved model; a LoRA adapter folder (no `config.json`) gets the processor only."""
    if processor is not None:
        processor.save_pretrained(folder)
    if (Path(folder) / CONFIG_NAME).is_file():
        save_pipeline_files(folder)


def save_model_folder(model, processor, folder: str | os.PathLike, **save_kwargs) -> Path:
    """Write a complete model folder: `model.save_pretrained(folder, **save_kwargs)`, the processor, the pipeline."""
    model.save_pretrained(folder, **save_kwargs)
    complete_model_folder(folder, processor)
    return Path(folder)


__all__ = [
    "ModelFolderError",
    "check_model_folder",
    "complete_model_folder",
    "is_hub_id",
    "is_multimood_folder",
    "read_json_config",
    "save_model_folder",
]
