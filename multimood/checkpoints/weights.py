"""Reading weights: `.safetensors` / `.bin` / `.pt` files, sharded checkpoint folders, Hub snapshots, BEATs
checkpoints and pretrained projector tensors.

Pickles are only ever read with `torch.load(weights_only=True)`: a pickle holding anything but tensors and plain
containers is refused with an error naming the file. The converter (published -> multimood) and training (pretrained
towers and projectors) both read their source weights here.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open

from ..model.configuration_multimood import BeatsConfig
from ..model.records import MultimoodError

logger = logging.getLogger("multimood.checkpoints.weights")

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_PATTERNS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model-*.safetensors",
    "pytorch_model-*.bin",
    "*.safetensors",
)
PROJECTOR_KEY = "mm_projector"  # the video connector `mm_projector.*` and the audio projector `mm_projector_a.*`

BEATS_WEIGHT_NORM = {
    "encoder.pos_conv.0.weight_g": "encoder.pos_conv.0.parametrizations.weight.original0",
    "encoder.pos_conv.0.weight_v": "encoder.pos_conv.0.parametrizations.weight.original1",
}
_BEATS_LAYER_BIAS = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.(\w+)$")


class WeightFileError(MultimoodError):
    """A weight file or checkpoint folder that cannot be read (damaged, truncated, unsafe pickle, missing shard)."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def load_pickled_weights(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)`: a pickle holding anything but tensors and plain containers is
    refused with a `WeightFileError` naming the file (never retried without `weights_only`)."""
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise WeightFileError(
            f"{path}: refused to load: the pickle holds objects other than tensors"
            + (f" ({blocked[0]})" if blocked else "")
            + "; only tensor checkpoints are read (save it as safetensors from a source you trust)"
        ) from None
    except (EOFError, RuntimeError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise WeightFileError(f"{path}: truncated or damaged checkpoint ({_one_line(error)})") from None


def load_weight_file(path: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The entries of one `.safetensors` / `.bin` / `.pt` file (only the keys `keep` accepts, when given).

    A safetensors file is read key by key, so keeping a few tensors of a large shard costs only those."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys() if keep is None or keep(key)}
        except OSError:
            raise
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for every damage
            raise WeightFileError(f"{path}: truncated or damaged safetensors file ({_one_line(error)})") from None
    state = load_pickled_weights(path)
    if not isinstance(state, dict):
        raise WeightFileError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state if keep is None else {key: value for key, value in state.items() if keep(key)}


def list_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder: those of an index json, else the usual file names."""
    folder = Path(folder)
    for index_name in INDEX_NAMES:
        index = folder / index_name
        if index.is_file():
            files = sorted(set((json.loads(index.read_text()).get("weight_map") or {}).values()))
            missing = [name for name in files if not (folder / name).is_file()]
            if missing:
                raise WeightFileError(f"{index} lists shard(s) that are not in the folder: {', '.join(missing)}")
            return [folder / name for name in files]
    for pattern in WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise WeightFileError(
        f"{folder}: no weights found (expected an index json, model*.safetensors or pytorch_model*.bin)"
    )


def read_state_dict(
    folder: str | os.PathLike, unknown: dict[str, str] | None = None, notes: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) checkpoint folder. A key in two shards is an error; non-tensor entries go to
    `unknown` (key -> why) and index entries that no shard holds to `notes`, when given."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file in list_weight_files(folder):
        for key, value in load_weight_file(file).items():
            if key in state:
                raise WeightFileError(f"{key} is in both {origin[key]} and {file.name}")
            if not isinstance(value, torch.Tensor):
                if unknown is not None:
                    unknown[key] = f"not a tensor ({type(value).__name__}) in {file.name}"
                continue
            state[key] = value
            origin[key] = file.name
    for index_name in INDEX_NAMES:
        index = Path(folder) / index_name
        if index.is_file():
            absent = sorted(set(json.loads(index.read_text()).get("weight_map") or {}) - set(state))
            if absent and notes is not None:
                notes.append(f"{index_name} lists {len(absent)} tensor(s) the shards do not hold: {absent[:5]}")
            break
    return state


def local_path(source: str | os.PathLike, allow_patterns: list[str]) -> Path:
    """`source` as a local path: itself when it exists, else the snapshot of the Hub repo it names."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    return Path(snapshot_download(str(source), allow_patterns=allow_patterns))


def read_folder_weights(source: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor]]:
    """(folder, tensors) of a local folder or, when online, a Hub repo id (config, safetensors and bin files)."""
    path = local_path(source, ["*.json", "*.safetensors", "*.bin"])
    return path, read_state_dict(path)


def projector_weights(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`mm_projector*` tensors of a file, a folder or a Hub repo, keyed from `mm_projector` on (prefixes dropped)."""
    path = local_path(source, ["*mm_projector*", "*.safetensors", "*.json", "*.bin"])
    files = [path] if path.is_file() else sorted(
        [*path.glob("*mm_projector*.bin"), *path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
    )
    tensors = {}
    for file in files:
        for key, value in load_weight_file(file, keep=lambda key: PROJECTOR_KEY in key).items():
            if isinstance(value, torch.Tensor):
                tensors[key[key.index(PROJECTOR_KEY):]] = value
    if not tensors:
        raise FileNotFoundError(f"no mm_projector weights found in {source}")
    return tensors


def group_keys(entries: dict[str, str]) -> dict[str, tuple[int, str]]:
    """Collapse per-layer keys (`layers.3.` -> `layers.N.`) with the same reason, for a readable log."""
    groups: dict[str, tuple[int, str]] = {}
    for key, reason in entries.items():
        pattern = re.sub(r"\.\d+\.", ".N.", key)
        count, _ = groups.get(pattern, (0, reason))
        groups[pattern] = (count + 1, reason)
    return groups


# ----------------------------------------------------------------------------------------------
# BEATs
# ----------------------------------------------------------------------------------------------


def beats_key(key: str) -> tuple[str | None, str | None]:
    """(multimood BEATs key, None) for a published BEATs key relative to the tower, or (None, why it is unused).

    Layer 0's relative position bias becomes the one shared `encoder.relative_attention_bias`; the copies of
    the other layers are unused (the caller checks that they equal layer 0's)."""
    if key.startswith("predictor.") or key.startswith("predictor_dropout."):
        return None, "BEATs AudioSet classifier (predictor): not part of the encoder, MultiMood never uses it"
    if key.startswith("label_embedding."):
        return None, "BEATs label embedding of pre-training: not part of the encoder"
    if key in BEATS_WEIGHT_NORM:
        return BEATS_WEIGHT_NORM[key], None
    match = _BEATS_LAYER_BIAS.match(key)
    if match:
        if match.group(1) == "0":
            return f"encoder.relative_attention_bias.{match.group(2)}", None
        return None, "per-layer copy of the relative position bias that all layers share (layer 0's is used)"
    return key, None


def convert_beats_state_dict(
    state: dict[str, torch.Tensor], unused: dict[str, str] | None = None, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(our-layout tensors, {source key: our key}) of BEATs tensors keyed relative to the tower.

    Unused tensors go to `unused` as {prefix + key: reason}. A per-layer bias copy that differs from layer 0's
    is reported as such (the published model only ever uses layer 0's)."""
    converted: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for key, value in state.items():
        new, reason = beats_key(key)
        if new is None:
            match = _BEATS_LAYER_BIAS.match(key)
            if match:
                first = state.get(f"encoder.layers.0.self_attn.relative_attention_bias.{match.group(2)}")
                if first is None or first.shape != value.shape or not torch.equal(first, value):
                    reason = ("per-layer relative position bias that DIFFERS from layer 0's; "
                              "the published model shares layer 0's")
            if unused is not None:
                unused[prefix + key] = reason
            continue
        converted[new] = value
        renamed[key] = new
    return converted, renamed


def read_beats_checkpoint(
    path: str | os.PathLike, unused: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in our BEATs layout, BEATs cfg) of an original BEATs `.pt` or a VideoLLaMA2 `audio_tower.bin`.

    Read with `weights_only=True`. Prefixes `model.audio_tower.`, `audio_tower.`, `model.` are removed; the
    weight-norm and shared-bias renames of `beats_key` apply; tensors not needed (the AudioSet `predictor`,
    the bias copies of layers 1..N-1) go to `unused` (key -> reason) when given, and are logged."""
    checkpoint = load_pickled_weights(path)
    cfg: dict = {}
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        cfg = dict(checkpoint.get("cfg") or {})
        checkpoint = checkpoint["model"]
    state = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            if unused is not None:
                unused[key] = f"not a tensor ({type(value).__name__})"
            continue
        for prefix in ("model.audio_tower.", "audio_tower.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        state[key] = value
    dropped: dict[str, str] = {}
    converted, _ = convert_beats_state_dict(state, dropped)
    if dropped:
        logger.info("%s: %d BEATs tensor(s) not used: %s", path, len(dropped), sorted(group_keys(dropped)))
    if unused is not None:
        unused.update(dropped)
    return converted, cfg


def beats_config_from_cfg(cfg: dict) -> dict:
    """The `BeatsConfig` fields of an original BEATs checkpoint's `cfg`."""
    fields = set(BeatsConfig().to_dict())
    return {k: v for k, v in cfg.items() if k in fields and k not in ("model_type", "transformers_version")}


__all__ = [
    "WeightFileError",
    "beats_config_from_cfg",
    "beats_key",
    "convert_beats_state_dict",
    "group_keys",
    "list_weight_files",
    "load_pickled_weights",
    "load_weight_file",
    "local_path",
    "projector_weights",
    "read_beats_checkpoint",
    "read_folder_weights",
    "read_state_dict",
]
