"""Releasing a MultiMood model on the Hugging Face Hub: the model card, the exact upload folder, the upload.

    multimood push --model DIR --repo-id ID [--eval-results metrics.json] [--training-args args.json]
                   [--private] [--token TOKEN] [--dry-run OUT]

* `render_model_card(model_or_folder, eval_results, training_args, ...)` renders the Jinja template
  `model_card.md` (see `find_template`) into a `huggingface_hub.ModelCard`: metadata (base models of every
  tower, datasets, language, licence, pipeline tag, tags, `model-index` from a `multimood evaluate` JSON),
  the architecture of this checkpoint, training hyper-parameters, evaluation table, intended use, risks
  and the MESC / ESConv non-commercial terms.
* `prepare_upload_folder(model, processor, folder, ...)` writes exactly what is uploaded: safetensors
  weights, `config.json` with `auto_map` and `custom_pipelines`, the remote-code files, the generation
  config, the processor files and `README.md`; nothing else (no optimizer states, no pickles).
* `push_to_hub(folder, repo_id, ...)` creates the repo and uploads the folder with `HfApi`. Offline
  (`HF_HUB_OFFLINE=1`) or with the Hub unreachable it fails within seconds with a `RuntimeError` that names
  the repo, never hangs.

The template: one source, the top-level `model_card.md` of the repository. From a checkout (also an editable
install) it is read there; an installed wheel carries the same file as data (`share/multimood/model_card.md`,
declared in pyproject `[tool.setuptools.data-files]`); `$MULTIMOOD_MODEL_CARD_TEMPLATE` or `template_path=`
point elsewhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from safetensors import safe_open

from ..cli import run_command
from ..model.configuration_multimood import MAMBA_370M, QWEN2_1_5B_INSTRUCT, SIGLIP_SO400M_PATCH14_384, MultimoodConfig
from ..model.modeling_multimood import MultimoodForConditionalGeneration
from ..model.processing_multimood import MultimoodProcessor
from .model_folder import (
    PROCESSOR_CONFIG_NAME,
    check_model_folder,
    complete_model_folder,
    is_hub_id,
    save_model_folder,
)

logger = logging.getLogger("multimood.checkpoints.hub")

TEMPLATE_NAME = "model_card.md"
TEMPLATE_ENV = "MULTIMOOD_MODEL_CARD_TEMPLATE"
DEFAULT_LICENSE = "cc-by-nc-4.0"
PIPELINE_TAG = "video-text-to-text"
TAGS = ("custom_code", "multimodal", "emotional-support", "video", "audio", "multimood")
TASK_NAME = "Multimodal emotional support conversation"
DATASETS_BY_LABEL_SET = {"mesc": ["MESC"], "esconv": ["thu-coai/esconv"]}
DATASET_NAMES = {"mesc": "MESC", "esconv": "ESConv"}

# Metrics of `multimood evaluate` that go into `model-index`: key -> (metric type, readable name).
MODEL_INDEX_METRICS = {
    "client_emotion_accuracy": ("accuracy", "Client emotion accuracy"),
    "client_emotion_f1": ("f1", "Client emotion F1"),
    "therapist_emotion_accuracy": ("accuracy", "Therapist emotion accuracy"),
    "therapist_emotion_f1": ("f1", "Therapist emotion F1"),
    "strategy_accuracy": ("accuracy", "Strategy accuracy"),
    "strategy_f1": ("f1", "Strategy F1"),
    "bleu1": ("bleu", "BLEU-1"),
    "bleu2": ("bleu", "BLEU-2"),
    "bleu3": ("bleu", "BLEU-3"),
    "bleu4": ("bleu", "BLEU-4"),
    "rouge1": ("rouge", "ROUGE-1"),
    "rouge2": ("rouge", "ROUGE-2"),
    "rougeL": ("rouge", "ROUGE-L"),
    "meteor": ("meteor", "METEOR"),
    "bertscore_f1": ("bertscore", "BERTScore F1"),
    "distinct1": ("distinct-1", "Distinct-1"),
    "distinct2": ("distinct-2", "Distinct-2"),
    "parse_rate": ("parse_rate", "Answer parse rate"),
}
SECTION_NOTES = {
    "paper": "published evaluation script: weighted F1, mean sentence BLEU-2 (0.99/0.01), unparsed pairs dropped",
    "strict": "unparsed answers count as wrong, macro F1, sacreBLEU corpus BLEU",
}
# Hyper-parameters shown on the card when a full TrainingArguments dump is given.
HYPERPARAMETERS = (
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "total_train_batch_size", "weight_decay",
    "max_grad_norm", "optim", "bf16", "fp16", "tf32", "gradient_checkpointing", "model_max_length", "seed",
    "lora_enable", "lora_r", "lora_alpha", "lora_dropout", "deepspeed",
)
# Files of a saved multimood folder that belong on the Hub (everything else is left out and logged).
UPLOAD_PATTERNS = (
    r".*\.safetensors", r".*\.safetensors\.index\.json", r"config\.json", r"generation_config\.json", r".*\.py",
    r"tokenizer.*\.json", r"vocab\.json", r"merges\.txt", r"special_tokens_map\.json", r"added_tokens\.json",
    r"chat_template\.(jinja|json)", r"processor_config\.json", r"preprocessor_config\.json",
    r"video_preprocessor_config\.json", r"conversion_report\.json", r"LICENSE.*", r"NOTICE.*",
)
REMOTE_CODE_MODULES = ("configuration_multimood", "modeling_multimood", "modeling_beats", "records", "chat_messages")


# ----------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------


def find_template(template_path: str | os.PathLike | None = None) -> Path:
    """The card template: `template_path`, `$MULTIMOOD_MODEL_CARD_TEMPLATE`, the checkout's top-level
    `model_card.md`, or the copy an installed wheel carries in `<prefix>/share/multimood/`."""
    candidates = []
    if template_path is not None:
        candidates.append(Path(template_path))
    if os.environ.get(TEMPLATE_ENV):
        candidates.append(Path(os.environ[TEMPLATE_ENV]))
    candidates.append(Path(__file__).resolve().parents[2] / TEMPLATE_NAME)
    for prefix in {sysconfig.get_path("data"), sys.prefix, sys.base_prefix}:
        candidates.append(Path(prefix) / "share" / "multimood" / TEMPLATE_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        if template_path is not None and candidate == Path(template_path):
            raise FileNotFoundError(f"model card template {candidate} does not exist")
    raise FileNotFoundError(
        f"model card template {TEMPLATE_NAME} not found (looked in: {', '.join(map(str, candidates))}); "
        f"pass template_path= or set ${TEMPLATE_ENV}"
    )


def _load_config(model_or_folder):
    """(MultimoodConfig, folder or None, model or None) of a model, a config or a saved folder."""
    if isinstance(model_or_folder, (str, os.PathLike)):
        folder = Path(model_or_folder)
        return MultimoodConfig.from_pretrained(folder), folder, None
    if isinstance(model_or_folder, MultimoodConfig):
        return model_or_folder, None, None
    config = getattr(model_or_folder, "config", None)
    if config is None:
        raise TypeError(f"expected a MultiMood model, config or folder, got {type(model_or_folder).__name__}")
    return config, None, model_or_folder


def _known_base(config, block: str) -> str | None:
    """The published base model a sub-config matches exactly, if any (for configs built without a name)."""
    known = {
        "text": (
            QWEN2_1_5B_INSTRUCT,
            "Qwen/Qwen2-1.5B-Instruct",
            ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"),
        ),
        "vision": (
            SIGLIP_SO400M_PATCH14_384,
            "google/siglip-so400m-patch14-384",
            ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size"),
        ),
        "compressor": (
            MAMBA_370M,
            "state-spaces/mamba-370m-hf",
            ("hidden_size", "num_hidden_layers", "state_size", "expand"),
        ),
    }
    if block not in known or config is None:
        return None
    values, name, fields = known[block]
    return name if all(getattr(config, f, None) == values[f] for f in fields) else None


def base_models(config, overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """Hub ids of the towers: `overrides` ({"text"|"vision"|"audio"|"compressor": id}), else the sub-configs'
    `_name_or_path` when it is a Hub id, else the published base whose sizes the sub-config matches."""
    overrides = dict(overrides or {})
    sub = {
        "text": config.text_config, "vision": config.vision_config, "audio": config.audio_config,
        "compressor": config.compressor_config,
    }
    out = {}
    for block, sub_config in sub.items():
        if block in overrides:
            if overrides[block]:
                out[block] = overrides[block]
            continue
        if sub_config is None:
            continue
        name = getattr(sub_config, "_name_or_path", None)
        name = name if is_hub_id(name) else _known_base(sub_config, block)
        if name:
            out[block] = name
    return out


def load_eval_results(eval_results: Mapping | str | os.PathLike | None) -> dict | None:
    if eval_results is None or isinstance(eval_results, Mapping):
        return dict(eval_results) if eval_results is not None else None
    return json.loads(Path(eval_results).read_text(encoding="utf-8"))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def eval_result_entries(
    metrics: Mapping, dataset_name: str, dataset_type: str, dataset_split: str | None = "test",
) -> list:
    """`huggingface_hub.EvalResult`s of a `multimood evaluate` JSON (sections `paper` and `strict`)."""
    dataset = metrics.get("dataset") if isinstance(metrics.get("dataset"), Mapping) else {}
    results = []
    for section in ("paper", "strict"):
        values = metrics.get(section) or {}
        for key, (metric_type, name) in MODEL_INDEX_METRICS.items():
            value = _number(values.get(key))
            if value is None:
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=TASK_NAME,
                    dataset_type=dataset.get("type", dataset_type),
                    dataset_name=dataset.get("name", dataset_name),
                    dataset_split=dataset.get("split", dataset_split),
                    metric_type=metric_type,
                    metric_value=round(value, 6),
                    metric_name=f"{name} ({section})",
                    metric_config=section,
                )
            )
    return results


def eval_results_table(metrics: Mapping) -> str:
    """Markdown table metric | paper | strict of every numeric metric."""
    sections = [s for s in ("paper", "strict") if isinstance(metrics.get(s), Mapping)]
    keys: list[str] = []
    for section in sections:
        keys += [k for k, v in metrics[section].items() if _number(v) is not None and k not in keys]
    if not keys:
        return ""
    lines = ["| metric | " + " | ".join(sections) + " |", "|---|" + "---|" * len(sections)]
    for key in keys:
        cells = []
        for section in sections:
            value = _number(metrics[section].get(key))
            cells.append("–" if value is None else (f"{int(value)}" if key == "n" else f"{value:.4f}"))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_hyperparameters(training_args: Any) -> dict[str, Any]:
    """The hyper-parameters worth showing, from a dict, a JSON file or a `TrainingArguments`."""
    if training_args is None:
        return {}
    if isinstance(training_args, (str, os.PathLike)):
        training_args = json.loads(Path(training_args).read_text(encoding="utf-8"))
    elif hasattr(training_args, "to_dict"):
        training_args = training_args.to_dict()
    args = dict(training_args)
    if "output_dir" in args or len(args) > 40:  # a full TrainingArguments dump: keep what matters
        shown = {k: args[k] for k in HYPERPARAMETERS if k in args and args[k] not in (None, "", [], {})}
        if "per_device_train_batch_size" in args and "world_size" in args and "total_train_batch_size" not in shown:
            # world_size is a TrainingArguments property, not in to_dict(): callers add it (see push in train)
            steps = args.get("gradient_accumulation_steps", 1)
            shown["total_train_batch_size"] = args["per_device_train_batch_size"] * steps * args["world_size"]
        if not shown.get("lora_enable"):
            for key in ("lora_enable", "lora_r", "lora_alpha", "lora_dropout"):
                shown.pop(key, None)
        if isinstance(shown.get("deepspeed"), (dict, str)):
            shown["deepspeed"] = _deepspeed_stage(shown["deepspeed"])
        return shown
    return {k: v for k, v in args.items() if v is not None}


def _deepspeed_stage(value: dict | str) -> str:
    config = value
    if isinstance(value, str):
        try:
            config = json.loads(Path(value).read_text()) if os.path.isfile(value) else json.loads(value)
        except (OSError, json.JSONDecodeError):
            return Path(value).name
    stage = (config.get("zero_optimization") or {}).get("stage") if isinstance(config, dict) else None
    return f"ZeRO-{stage}" if stage is not None else "yes"


def _trainer_summary(folder: Path | None) -> str | None:
    """One line from a Trainer's `trainer_state.json` (steps, epochs, final training loss), if present."""
    if folder is None or not (folder / "trainer_state.json").is_file():
        return None
    state = json.loads((folder / "trainer_state.json").read_text())
    losses = [entry["train_loss"] for entry in state.get("log_history", []) if "train_loss" in entry]
    parts = [f"{state.get('global_step')} optimizer steps", f"{state.get('epoch')} epoch(s)"]
    if losses:
        parts.append(f"final training loss {losses[-1]:.4f}")
    return "Supervised fine-tuning with the Hugging Face `Trainer`: " + ", ".join(parts) + "."


def _parameter_count(model, folder: Path | None) -> int | None:
    if model is not None:
        return sum(p.numel() for p in model.parameters())
    if folder is None:
        return None
    total = 0
    files = list(folder.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total or None


def _human(count: int | None) -> str | None:
    if not count:
        return None
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit} ({count:,})"
    return f"{count:,}"


def _describe(block: str, config, name: str | None) -> str:
    if config is None:
        return "none"
    if block == "text":
        sizes = f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size}"
        return f"{name or 'Qwen2'} ({sizes})"
    if block == "vision":
        sizes = f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.image_size} px"
        return f"{name or 'SigLIP'} ({sizes})"
    if block == "audio":
        return f"{name or 'BEATs'} ({config.encoder_layers} layers, hidden {config.encoder_embed_dim})"
    return (
        f"{name or config.model_type.capitalize()} ({config.num_hidden_layers} layers, hidden {config.hidden_size}), "
        "memory tokens replace the `<history>` placeholders"
    )


def _card_processor(folder: Path | None, processor: MultimoodProcessor | None) -> MultimoodProcessor | None:
    """The processor the card describes: the one given, else the folder's, else none."""
    if processor is None and folder is not None and (folder / PROCESSOR_CONFIG_NAME).is_file():
        return MultimoodProcessor.from_pretrained(folder)
    return processor


def media_values(processor: MultimoodProcessor | None) -> dict[str, Any]:
    """The card's media lines, from the processor (None without one: the template shows the published values)."""
    if processor is None:
        return {}
    video, audio = processor.video_processor, processor.feature_extractor
    values = {"num_frames": video.num_frames, "num_video_tokens": video.num_video_tokens()}
    if audio is not None:
        values.update(num_audio_tokens=audio.num_audio_tokens(), audio_num_windows=audio.num_windows,
                      audio_window_seconds=f"{audio.window_seconds:g}")
    return values


def _eval_summary(metrics: Mapping, dataset_name: str, dataset_split: str | None) -> str:
    notes = "; ".join(f"**{s}**: {SECTION_NOTES[s]}" for s in ("paper", "strict") if s in metrics)
    n = (metrics.get("strict") or metrics.get("paper") or {}).get("n")
    return f"On {dataset_name} ({dataset_split}{f', {n} samples' if n else ''}). {notes}."


def render_model_card(
    folder_or_model,
    eval_results: Mapping | str | os.PathLike | None = None,
    training_args: Any = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    processor=None,
    base_model: Mapping[str, str | None] | None = None,
    datasets: list[str] | None = None,
    dataset_name: str | None = None,
    dataset_type: str | None = None,
    dataset_split: str | None = "test",
    license: str = DEFAULT_LICENSE,  # noqa: A002 - the Hub's field name
    language: str | list[str] = "en",
    tags: list[str] | None = None,
    training_summary: str | None = None,
    template_path: str | os.PathLike | None = None,
    **template_kwargs: Any,
):
    """The Hub card (`huggingface_hub.ModelCard`) of a MultiMood model, config or saved folder.

    `eval_results` is the JSON that `multimood evaluate` writes (a dict or its path); its `paper` and
    `strict` sections become `model-index` entries (dataset name/type/split from the arguments or from an
    optional `dataset` object in the JSON). `training_args` is a dict, a JSON path or `TrainingArguments`.
    `base_model` overrides the Hub ids of the towers ({"text", "vision", "audio", "compressor"}). The media
    settings (frames, audio windows, token counts) are the processor's: `processor`, else the folder's.
    Extra keyword arguments go to the template."""
    config, folder, model = _load_config(folder_or_model)
    processor = _card_processor(folder, processor)
    label_set = getattr(processor, "label_set", None) or "mesc"
    datasets = list(datasets) if datasets is not None else DATASETS_BY_LABEL_SET.get(label_set, [])
    dataset_name = dataset_name or DATASET_NAMES.get(label_set, label_set)
    dataset_type = dataset_type or (datasets[0] if datasets else label_set)
    name = model_name or (repo_id.split("/")[-1] if repo_id else "MultiMood")
    bases = base_models(config, base_model)
    metrics = load_eval_results(eval_results)
    results = eval_result_entries(metrics, dataset_name, dataset_type, dataset_split) if metrics else None
    base_ids = list(dict.fromkeys(bases.values()))
    card_data = ModelCardData(
        model_name=name,
        base_model=(base_ids[0] if len(base_ids) == 1 else base_ids) or None,
        datasets=datasets or None,
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(dict.fromkeys([*TAGS, *(tags or [])])),
        eval_results=results or None,
    )
    values = {
        "model_name": name,
        "repo_id": repo_id,
        "license": license,
        **{f"{block}_base_model": _describe(block, getattr(config, f"{block}_config"), bases.get(block))
           for block in ("text", "vision", "audio", "compressor")},
        "mm_projector_type": config.mm_projector_type,
        "mm_projector_a_type": config.mm_projector_a_type,
        **media_values(processor),
        "num_parameters": _human(_parameter_count(model, folder)),
        "hyperparameters": training_hyperparameters(training_args),
        "training_summary": training_summary or _trainer_summary(folder),
        "eval_results_table": eval_results_table(metrics) if metrics else None,
        "eval_results_summary": _eval_summary(metrics, dataset_name, dataset_split) if metrics else None,
        **template_kwargs,
    }
    return ModelCard.from_template(card_data, template_path=str(find_template(template_path)), **values)


# ----------------------------------------------------------------------------------------------
# The upload folder
# ----------------------------------------------------------------------------------------------


def _is_upload_file(name: str) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in UPLOAD_PATTERNS)


def _copy_model_folder(source: Path, folder: Path) -> list[str]:
    """Copy the Hub files of a saved folder (weights hard-linked where possible); return what was left out."""
    skipped = []
    for path in sorted(source.iterdir()):
        if path.is_dir() or not _is_upload_file(path.name):
            skipped.append(path.name + ("/" if path.is_dir() else ""))
            continue
        target = folder / path.name
        if path.suffix == ".safetensors":
            try:
                os.link(path, target)  # weights are never rewritten: a link saves a copy of gigabytes
                continue
            except OSError:
                pass
        shutil.copyfile(path, target)
    return skipped


def _copy_saved_folder(source: Path, folder: Path) -> None:
    """The Hub files of a saved folder in `folder`; `.bin` weights are re-saved as safetensors."""
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json: not a saved model folder")
    if not list(source.glob("*.safetensors")):
        if not list(source.glob("pytorch_model*.bin")):
            raise FileNotFoundError(f"{source} holds no model weights")
        logger.info("%s holds .bin weights: re-saving them as safetensors", source)
        MultimoodForConditionalGeneration.from_pretrained(source, dtype="auto").save_pretrained(folder)
    skipped = _copy_model_folder(source, folder)
    if skipped:
        logger.info("left out of the upload: %s", ", ".join(skipped))


def prepare_upload_folder(
    model,
    processor,
    folder: str | os.PathLike,
    eval_results: Mapping | str | os.PathLike | None = None,
    training_args: Any = None,
    overwrite: bool = False,
    **card_kwargs: Any,
) -> Path:
    """Write the exact folder that `push_to_hub` uploads and return its path.

    `model` is a `MultimoodForConditionalGeneration` (a merged model, not a PEFT wrapper) or a saved
    multimood folder; `processor` the `MultimoodProcessor` (may be None when the folder holds the processor
    files). Contents: safetensors weights, `config.json` (`auto_map`, `custom_pipelines`), remote code,
    `generation_config.json`, processor files, `README.md` (see `render_model_card`, which receives
    `eval_results`, `training_args` and `card_kwargs`)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} is not empty (pass overwrite=True to replace it)")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card_source = model
    if isinstance(model, (str, os.PathLike)):
        card_source = Path(model)
        _copy_saved_folder(card_source, folder)
        complete_model_folder(folder, processor)
    else:
        if hasattr(model, "peft_config") or type(model).__name__.startswith("Peft"):
            raise TypeError(
                "a PEFT model: merge the adapters first (model.merge_and_unload()) or pass the merged folder"
            )
        if processor is None:
            raise ValueError("processor is required when model is a model object")
        save_model_folder(model, processor, folder)
    card = render_model_card(card_source, eval_results, training_args, processor=processor, **card_kwargs)
    card.save(folder / "README.md")
    problems = check_upload_folder(folder)
    if problems:
        raise RuntimeError(f"the upload folder {folder} is incomplete: " + "; ".join(problems))
    return folder


def check_upload_folder(folder: str | os.PathLike) -> list[str]:
    """Problems that would make the uploaded repo unusable (empty list: fine)."""
    folder = Path(folder)
    problems = []
    config_path = folder / "config.json"
    if not config_path.is_file():
        return [f"no config.json in {folder}"]
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "multimood":
        problems.append(f"config.json model_type is {config.get('model_type')!r}, not 'multimood'")
    auto_map = config.get("auto_map") or {}
    for auto in ("AutoConfig", "AutoModelForCausalLM"):
        if auto not in auto_map:
            problems.append(f"config.json auto_map lacks {auto}")
    modules = {ref.split(".")[0] for ref in auto_map.values()} | set(REMOTE_CODE_MODULES)
    for pipeline in (config.get("custom_pipelines") or {}).values():
        modules.add(str(pipeline.get("impl", "")).split(".")[0])
    processor_config = folder / "processor_config.json"
    if not processor_config.is_file():
        problems.append("no processor_config.json (save the processor)")
    else:
        processor_map = json.loads(processor_config.read_text()).get("auto_map") or {}
        if "AutoProcessor" not in processor_map:
            problems.append("processor_config.json auto_map lacks AutoProcessor")
        modules |= {ref.split(".")[0] for ref in processor_map.values()}
    for module in sorted(m for m in modules if m):
        if not (folder / f"{module}.py").is_file():
            problems.append(f"remote code {module}.py is missing")
    if not any(folder.glob("*.safetensors")):
        problems.append("no safetensors weights")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        problems.append("no tokenizer files")
    pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if pickles:
        problems.append(f"pickle files must not be uploaded: {', '.join(pickles)}")
    if not (folder / "README.md").is_file():
        problems.append("no README.md model card")
    return problems


# ----------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------


_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_hub_reachable(repo_id: str, endpoint: str | None = None, timeout: float = 10.0) -> str:
    """Raise a `RuntimeError` naming `repo_id` at once when offline mode is on, or when the Hub does not answer an
    HTTP request within `timeout` seconds (any HTTP status counts as an answer; proxies from the environment
    apply). Returns the endpoint. huggingface_hub's own client has no timeout, so this probe is what keeps a
    push from hanging on a dead network."""
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    offline = [name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(name, "").upper() in _TRUE]
    if offline or constants.HF_HUB_OFFLINE:
        raise RuntimeError(
            f"cannot push to the Hub repo {repo_id!r}: offline mode is on "
            f"({', '.join(offline) or 'HF_HUB_OFFLINE'}=1); "
            "unset it to upload, or use --dry-run to only build the folder"
        )
    url = urlparse(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise RuntimeError(f"cannot push to the Hub repo {repo_id!r}: invalid endpoint {endpoint!r}")
    probe = urllib.request.Request(
        f"{endpoint}/api/models/{repo_id}", method="GET", headers={"User-Agent": "multimood"}
    )
    try:
        with urllib.request.urlopen(probe, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # the Hub answered (401, 404, ...): reachable
    except (OSError, ValueError) as error:  # URLError, refused, unreachable, timeouts
        reason = getattr(error, "reason", error)
        raise RuntimeError(
            f"cannot push to the Hub repo {repo_id!r}: {endpoint} did not answer within {timeout:g} s "
            f"({type(reason).__name__}: {reason}); check the network or HF_ENDPOINT, or use --dry-run to only build "
            "the folder"
        ) from error
    return endpoint


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    timeout: float = 10.0,
) -> str:
    """Create `repo_id` (if needed) and upload `folder` (as built by `prepare_upload_folder`); returns the
    commit URL. Fails fast with a `RuntimeError` naming the repo when offline or when the Hub is unreachable."""
    folder = Path(folder)
    problems = check_upload_folder(folder)
    if problems:
        raise RuntimeError(f"refusing to push {folder} to {repo_id!r}: " + "; ".join(problems))
    endpoint = check_hub_reachable(repo_id, timeout=timeout)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model",
            commit_message=commit_message or "Upload MultiMood model",
        )
    except OfflineModeIsEnabled as error:
        raise RuntimeError(f"cannot push to the Hub repo {repo_id!r}: offline mode is on ({error})") from error
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = " (authenticate with `hf auth login` or pass a token with write access)" if status in (401, 403) else ""
        raise RuntimeError(
            f"pushing to the Hub repo {repo_id!r} at {endpoint} failed: {_one_line(error)}{hint}"
        ) from error
    except OSError as error:  # connection errors (httpx errors are OSErrors here too)
        raise RuntimeError(f"pushing to the Hub repo {repo_id!r} at {endpoint} failed: {_one_line(error)}") from error
    except Exception as error:  # noqa: BLE001 - httpx transport errors and the like: always name the repo
        raise RuntimeError(f"pushing to the Hub repo {repo_id!r} at {endpoint} failed: {error!r}") from error
    return str(getattr(commit, "commit_url", commit))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimood push",
        description="Build the Hub folder of a saved MultiMood model (weights, remote code, processor, pipeline, "
                    "model card) and upload it.",
    )
    parser.add_argument("--model", required=True, help="saved multimood folder (model and processor files)")
    parser.add_argument(
        "--repo-id", "--repo_id", dest="repo_id", required=True, help="Hub repo, e.g. user/multimood-7b"
    )
    parser.add_argument(
        "--eval-results", "--eval_results", dest="eval_results", help="metrics JSON of `multimood evaluate`"
    )
    parser.add_argument("--training-args", "--training_args", dest="training_args",
                        help="training arguments JSON (TrainingArguments.to_dict() or a dict of hyper-parameters)")
    parser.add_argument(
        "--license", default=DEFAULT_LICENSE, help=f"licence of the weights (default {DEFAULT_LICENSE})"
    )
    parser.add_argument("--dataset", action="append", dest="datasets", help="dataset id for the card (repeatable)")
    parser.add_argument("--dataset-name", "--dataset_name", dest="dataset_name", help="evaluation dataset name (MESC)")
    parser.add_argument("--dataset-split", "--dataset_split", dest="dataset_split", default="test")
    parser.add_argument("--base-model", "--base_model", dest="base_model", action="append", default=[],
                        metavar="BLOCK=ID", help="Hub id of a tower: text=..., vision=..., audio=..., compressor=...")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", help="Hub token (default: the logged-in token)")
    parser.add_argument("--commit-message", "--commit_message", dest="commit_message")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the Hub before failing (10)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", metavar="OUT",
                        help="only build the upload folder in OUT (no network)")
    return parser


def push_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_model_folder(args.model)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    bases = {}
    for item in args.base_model:
        block, _, name = item.partition("=")
        if block not in ("text", "vision", "audio", "compressor") or not name:
            print(
                f"multimood push: error: --base-model {item!r}: expected BLOCK=ID with BLOCK "
                "text|vision|audio|compressor",
                file=sys.stderr,
            )
            return 2
        bases[block] = name
    card_kwargs = dict(repo_id=args.repo_id, license=args.license, datasets=args.datasets,
                       dataset_name=args.dataset_name, dataset_split=args.dataset_split, base_model=bases or None)
    start = time.monotonic()
    try:
        if args.dry_run:
            folder = prepare_upload_folder(args.model, None, args.dry_run, args.eval_results, args.training_args,
                                           **card_kwargs)
            files = sorted(p.name for p in folder.iterdir())
            print(f"dry run: {folder} holds the upload for {args.repo_id} ({len(files)} files): {', '.join(files)}")
            return 0
        check_hub_reachable(args.repo_id, timeout=args.timeout)  # before copying gigabytes
        with tempfile.TemporaryDirectory(prefix="multimood-push-") as tmp:
            folder = prepare_upload_folder(args.model, None, Path(tmp) / "upload", args.eval_results,
                                           args.training_args, **card_kwargs)
            url = push_to_hub(folder, args.repo_id, token=args.token, private=args.private,
                              commit_message=args.commit_message, timeout=args.timeout)
    except (RuntimeError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"multimood push: error: {error} (after {time.monotonic() - start:.1f} s)", file=sys.stderr)
        return 1
    print(f"pushed {args.model} to {args.repo_id}: {url}")
    return 0


__all__ = [
    "base_models",
    "check_hub_reachable",
    "check_model_folder",
    "check_upload_folder",
    "eval_result_entries",
    "eval_results_table",
    "find_template",
    "prepare_upload_folder",
    "push_main",
    "push_to_hub",
    "render_model_card",
    "training_hyperparameters",
]

if __name__ == "__main__":
    sys.exit(run_command("multimood push", push_main))
