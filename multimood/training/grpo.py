"""GRPO fine-tuning of a MultiMood model (the paper's RL stage) with trl's `GRPOTrainer`.

Run with `python run_scripts/run_grpo.py --model_path SFT_DIR --data_path records.jsonl --vid_folder clips/
--output_dir out/ --preset paper --judge_url http://host:8000/v1 --judge_model NAME` (the paper's recipe, see `--preset`
in `--help`; `docs/fidelity.md` lists what differs from the published GRPO code)
(or under `torchrun` / `accelerate launch`, with `--deepspeed run_scripts/zero2.json`).

Data: the same records as SFT (JSONL / JSON array, validated by the dataset builder); the processor turns each
record into prompt ids (placeholders expanded) plus its clips' frames, audio features and history-compressor ids.
The gold columns (`Utterance`, `Emotion`, `Strategy`, `get_emotion_user_most_recent`) reach the rewards as keyword
arguments; a `prompt` column (the rendered prompt text) is added for trl's logging and for the judge.

How the multimodal inputs travel through trl (the smallest extension of `GRPOTrainer`, no new RL loop):
`MultimoodGRPOTrainer` overrides three hooks.
1. `_generate_and_score_completions` remembers the batch's records and, after trl's own scoring, adds the media as
   *row-aligned* tensors (`mm_*`, first dimension = completions, with `mm_has_*` masks for samples without a clip
   or a history), so trl's shuffling / splitting into `per_device_train_batch_size` slices keeps them in step.
2. `_tokenize_prompts` runs `MultimoodProcessor` on the records (prompt ids are returned unpadded: trl left-pads
   them itself) and hands the media to `generate` as extra tensors.
3. `_get_per_token_logps_and_entropies` (old / reference / policy log-probs) adds, per chunk, the media of the
   chunk's rows. `compute_loss` points it at the rows of the current slice.
Generation never samples the placeholder tokens (`suppress_tokens`), so re-reading a completion is always valid.
Without LoRA and with beta > 0, trl loads the reference model from `--model_path` (remote code: the folder's
`auto_map`); with `--lora_enable` the reference is the model with its adapter disabled.

This module imports trl (the `train` / `rl` extras) at its top: only `multimood grpo` and `run_scripts/run_grpo.py`
import it (the `multimood` command imports each subcommand's module when it runs).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
import transformers
from transformers import HfArgumentParser
from trl import GRPOConfig, GRPOTrainer

from ..checkpoints.model_folder import is_multimood_folder
from ..model.modeling_multimood import MultimoodForConditionalGeneration
from ..model.processing_multimood import MultimoodProcessor
from ..model.records import MultimoodError, MultimoodRecordError
from .arguments import LoraArguments, TuneArguments
from .assembly import apply_lora, configure_trainable
from .rewards import (
    BGE_M3_WEIGHTS,
    JUDGE_SYSTEM_PROMPT,
    PAPER_PRESET,
    BGEM3SimilarityReward,
    JudgeReward,
    SimilarityReward,
    format_reward,
    label_reward,
    parse_reward_weights,
)
from .train import make_dataset, save_trained

logger = logging.getLogger("multimood.training.grpo")

_MEDIA = ("video", "audio", "history")
REWARD_NAMES = ("format", "label", "similarity", "judge")
DEFAULT_REWARD_WEIGHTS = {"format": 0.2, "label": 0.4, "similarity": 1.0}


class MultimoodGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` that feeds MultiMood's video, audio and history inputs to generation and to the log-prob
    passes (see the module docstring). `video_folder` is where the records' clip names point."""

    def __init__(self, model, reward_funcs, args=None, processing_class=None, video_folder: str | None = None,
                 **kwargs):
        self.video_folder = video_folder
        self._batch_records: list[dict] | None = None
        self._active_mm: dict[str, torch.Tensor] | None = None
        config = model.config
        placeholders = [config.video_token_id, config.audio_token_id, config.history_token_id, config.mem_token_id]
        if args is not None:
            extra = dict(args.generation_kwargs or {})
            extra["suppress_tokens"] = sorted(set(list(extra.get("suppress_tokens") or []) + placeholders))
            args.generation_kwargs = extra
            args.remove_unused_columns = False
        # trl reads `config.image_token_id` for processor-based models (to suppress it); ours is the video one.
        added = "image_token_id" not in config.to_dict()
        if added:
            config.image_token_id = config.video_token_id
        try:
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, processing_class=processing_class,
                             **kwargs)
        finally:
            if added:
                try:
                    delattr(config, "image_token_id")
                except AttributeError:
                    pass

    # ---------------------------------------------------------------- media as row-aligned tensors

    def _encode_batch(self, records: list[dict]) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        """Prompt ids (unpadded) and row-aligned media of `records` (identical records processed once)."""
        keys, unique, index = {}, [], []
        for record in records:
            key = json.dumps(record, sort_keys=True, default=str)
            if key not in keys:
                keys[key] = len(unique)
                unique.append(record)
            index.append(keys[key])
        processor = self.processing_class
        batch = processor(records=unique, video_folder=self.video_folder, with_target=False, padding_side="left")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        config = self.accelerator.unwrap_model(self.model).config
        token = {"video": config.video_token_id, "audio": config.audio_token_id, "history": config.history_token_id}
        source = {"video": batch.get("pixel_values_videos"), "audio": batch.get("input_features"),
                  "history": batch.get("history_input_ids")}
        per_sample: dict[str, list] = {m: [None] * len(unique) for m in _MEDIA}
        per_sample["history_mask"] = [None] * len(unique)
        prompt_ids, cursor = [], dict.fromkeys(_MEDIA, 0)
        for i in range(len(unique)):
            row = ids[i][mask[i].bool()]
            prompt_ids.append(row.tolist())
            for m in _MEDIA:
                if (row == token[m]).any():
                    per_sample[m][i] = source[m][cursor[m]]
                    if m == "history":
                        per_sample["history_mask"][i] = batch["history_attention_mask"][cursor[m]]
                    cursor[m] += 1
        rows: dict[str, torch.Tensor] = {}
        for m, name in (("video", "mm_video"), ("audio", "mm_audio"), ("history", "mm_history"),
                        ("history_mask", "mm_history_mask")):
            present = [t for t in per_sample[m] if t is not None]
            if not present:
                continue
            template = torch.zeros_like(present[0])
            rows[name] = torch.stack([per_sample[m][j] if per_sample[m][j] is not None else template
                                      for j in index])
        for m in _MEDIA:
            rows[f"mm_has_{m}"] = torch.tensor([per_sample[m][j] is not None for j in index], dtype=torch.bool)
        return [prompt_ids[j] for j in index], rows

    @staticmethod
    def media_kwargs(rows: dict[str, torch.Tensor] | None, start: int = 0, end: int | None = None) -> dict:
        """Model keyword arguments (`pixel_values_videos`, `input_features`, `history_*`) of rows start:end."""
        if not rows:
            return {}
        out = {}
        sl = slice(start, end)
        for m, key, name in (("video", "pixel_values_videos", "mm_video"), ("audio", "input_features", "mm_audio"),
                             ("history", "history_input_ids", "mm_history")):
            has = rows.get(f"mm_has_{m}")
            if has is None or name not in rows:
                continue
            has = has[sl]
            if not bool(has.any()):
                continue
            out[key] = rows[name][sl][has]
            if m == "history":
                hist_mask = rows["mm_history_mask"][sl][has]
                width = int(hist_mask.sum(-1).max().item())  # trim the shared right padding
                out["history_input_ids"] = out["history_input_ids"][:, :width]
                out["history_attention_mask"] = hist_mask[:, :width]
        return out

    # ---------------------------------------------------------------- trl hooks

    def _generate_and_score_completions(self, inputs):
        self._batch_records = [{k: v for k, v in x.items() if k != "prompt"} for x in inputs]
        self._active_mm = None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._batch_records = None
        rows = self._active_mm or {}
        device = self.accelerator.device
        output.update({k: v.to(device) for k, v in rows.items()})
        return output

    def _tokenize_prompts(self, prompts):
        if self._batch_records is None or len(self._batch_records) != len(prompts):
            raise RuntimeError("MultimoodGRPOTrainer: prompts without their records (rollout_func / tools are "
                               "not supported)")
        prompt_ids, rows = self._encode_batch(self._batch_records)
        self._active_mm = rows
        return prompt_ids, None, self.media_kwargs(rows)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **kwargs):
        rows = self._active_mm
        if not rows:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            media = {k: v.to(input_ids.device) for k, v in self.media_kwargs(rows, start, end).items()}
            ids, mask = input_ids[start:end], attention_mask[start:end]
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100
            inputs = {"input_ids": ids, "attention_mask": mask, **media}
            if compute_aux_loss:
                inputs["output_router_logits"] = True
            with self.accelerator.autocast():
                outputs = model(**inputs, labels=labels, fused_lm_head=True)
            logps.append(outputs.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(outputs.entropy[:, -logits_to_keep:])
            if compute_aux_loss:
                aux.append(outputs.aux_loss)
        return (torch.cat(logps, 0), torch.cat(entropies, 0) if compute_entropy else None,
                torch.stack(aux).mean() if compute_aux_loss else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._active_mm = {k: v for k, v in inputs.items() if k.startswith("mm_")}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


PAPER_PRESET_HELP = (
    "'paper': the published GRPO recipe. Sets (flags given explicitly win): beta 1.12, 4 generations, completions "
    "up to 128 tokens, lr 1e-5, sampling temperature 0.9 and loss_type grpo (trl 0.14, which the published run "
    "used); reward = mean of similarity and judge (weights 0.5/0.5); similarity = BGE-M3 hybrid (BAAI/bge-m3, "
    "dense + sparse + colbert weighted 1/0.3/1 over their sum, gold response as query <= 512 tokens, generated "
    "response as passage <= 128 tokens); judge = mean of the 7 dimensions on 0-10, 0 on failure, shown the response "
    "alone, temperature 0.2, 1000 tokens (needs --judge_url and --judge_model; published: gpt-4o at "
    "https://api.openai.com/v1 with OPENAI_API_KEY). Still different from the published code: (1) it trained a "
    "text-only causal LM on text prompts (video as a text description, response-only target); we train the "
    "multimodal model on its SFT prompt and score the `Response:` line (a completion without one scores 0); "
    "(2) its `(judge + similarity) / 2` on Python lists raises a TypeError, we take the intended mean; (3) our judge "
    "prompt is short and asks for JSON, the published one is a long rubric with `Name: N/10` lines (give yours with "
    "--judge_system_prompt_file / --judge_user_template_file); (4) a judge score outside 0-10 counts 0 (published: "
    "taken as is) and requests time out after --judge_timeout (published: never); (5) BGE-M3 runs in float32 "
    "in-process (published: fp16 behind an HTTP service, 0.01 when unreachable); (6) batch and schedule are not set: "
    "published 1 prompt x 4 completions per device step, 16 accumulation steps, 3 epochs, bf16 "
    "(--per_device_train_batch_size 4 --gradient_accumulation_steps 16 --num_train_epochs 3 --bf16 True)."
)


@dataclass
class GRPOScriptArguments(TuneArguments, LoraArguments):
    """GRPO's own flags (trl's `GRPOConfig` holds the rest); what trains and LoRA as in SFT."""

    model_path: str | None = field(default=None, metadata={"help": "Saved multimood model folder (the SFT output)."})
    data_path: str | None = field(default=None, metadata={"help": "Training records (JSONL or a JSON array)."})
    vid_folder: str | None = field(default=None, metadata={"help": "Folder the records' clip names are relative to."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N records."})
    k_turn_history: int | None = field(default=None, metadata={"help": "Chat-history exchanges in the prompt."})
    model_max_length: int | None = field(default=None, metadata={"help": "Text-token budget of a prompt."})
    preset: str | None = field(default=None, metadata={"help": PAPER_PRESET_HELP})
    reward_weights_spec: str | None = field(
        default=None,
        metadata={
            "help": "Rewards and weights, e.g. 'format=0.2,label=0.4,similarity=1,judge=1' (names: "
            f"{', '.join(REWARD_NAMES)}). Default {DEFAULT_REWARD_WEIGHTS}, plus judge=1 with --judge_url."
        },
    )
    similarity_model: str | None = field(default=None, metadata={"help": "Similarity model: a local folder or a Hub "
                                                                           "id (BAAI/bge-m3 in the paper)."})
    similarity_scoring: Literal["embedding", "bge-m3-hybrid"] = field(
        default="embedding",
        metadata={"help": "embedding: cosine of pooled sentence embeddings, in [0, 1] (any encoder). bge-m3-hybrid "
                          "(published): BGE-M3's dense + sparse + colbert score of the response (<= 128 tokens) to the "
                          "gold response; needs colbert_linear.pt and sparse_linear.pt in the model folder."})
    similarity_hybrid_weights: str = field(
        default=",".join(f"{w:g}" for w in BGE_M3_WEIGHTS),
        metadata={"help": "bge-m3-hybrid: weights of the dense, sparse and colbert scores (divided by their sum)."})
    similarity_pooling: str = field(default="mean", metadata={"help": "embedding scoring: mean or cls pooling."})
    similarity_device: str = field(default="cpu", metadata={"help": "Device of the similarity model (cpu, cuda:0...)."})
    similarity_whole_if_unparsed: bool = field(
        default=False,
        metadata={"help": "Score the whole completion when it has no `Response:` line (else it scores 0)."},
    )
    judge_url: str | None = field(
        default=None, metadata={"help": "OpenAI-compatible base URL (…/v1) of the judge LLM."}
    )
    judge_model: str | None = field(default=None, metadata={"help": "Model name sent to the judge endpoint."})
    judge_api_key_env: str = field(
        default="JUDGE_API_KEY", metadata={"help": "Environment variable holding the judge's API key."}
    )
    judge_timeout: float = field(default=30.0, metadata={"help": "Seconds per judge request (then the failure score)."})
    judge_rule: Literal["multimood", "published"] = field(
        default="multimood",
        metadata={"help": "multimood: mean of the 7 scores rescaled to [0, 1], a logged neutral 0.5 when the judge "
                          "fails. published: mean of the 7 scores on 0-10, a missing dimension counts 0, a failed "
                          "request gives 0 (logged)."})
    judge_context: bool = field(
        default=True,
        metadata={
            "help": "Show the judge the conversation (the prompt) and "
            "the response; False: the response alone (published)."
        },
    )
    judge_temperature: float = field(default=0.0, metadata={"help": "Judge sampling temperature (published: 0.2)."})
    judge_max_tokens: int = field(default=200, metadata={"help": "Judge reply length limit (published: 1000)."})
    judge_system_prompt_file: str | None = field(
        default=None, metadata={"help": "Text file replacing the judge's system prompt."})
    judge_user_template_file: str | None = field(
        default=None, metadata={"help": "Text file replacing the judge's user message: {response} and {context} are "
                                        "replaced by the texts (e.g. a rubric asking for `Name: N/10` lines)."})


def _explicit(argv: list[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def parse_args(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--reward_weights name=w,...` is ours; GRPOConfig's own `reward_weights` (a float list) is set from it.
    argv = ["--reward_weights_spec" if a == "--reward_weights" else
            ("--reward_weights_spec=" + a.split("=", 1)[1] if a.startswith("--reward_weights=") else a) for a in argv]
    if not torch.cuda.is_available():
        # GRPOConfig defaults to bf16, which transformers refuses without a GPU unless use_cpu=True.
        if not _explicit(argv, "use_cpu"):
            argv += ["--use_cpu", "True"]
        if not _explicit(argv, "bf16"):
            argv += ["--bf16", "False"]
    preset = None
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif a.startswith("--preset="):
            preset = a.split("=", 1)[1]
    if preset is not None:
        if preset != "paper":
            raise ValueError(f"--preset {preset!r}: only 'paper' is known")
        # The preset fills the flags not given explicitly, before GRPOConfig validates them.
        for name, value in PAPER_PRESET.items():
            flag = "reward_weights_spec" if name == "reward_weights" else name
            if _explicit(argv, flag):
                continue
            if isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items())
            argv += [f"--{flag}", str(value)]
    parser = HfArgumentParser((GRPOScriptArguments, GRPOConfig))
    script, config = parser.parse_args_into_dataclasses(args=argv)
    config.remove_unused_columns = False
    return script, config


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--{flag} {text!r}: expected comma-separated numbers, e.g. 1,0.3,1") from None


def _read_text(path: str | None, flag: str) -> str | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--{flag} {path!r}: no such file")
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def build_rewards(script: GRPOScriptArguments) -> tuple[list, list[float]]:
    """(reward callables, weights) from the flags; each is logged by trl under its own name."""
    weights = parse_reward_weights(script.reward_weights_spec)
    if not weights:
        weights = dict(DEFAULT_REWARD_WEIGHTS)
        if script.similarity_model is None:
            weights.pop("similarity")
        if script.judge_url:
            weights["judge"] = 1.0
    unknown = set(weights) - set(REWARD_NAMES)
    if unknown:
        raise ValueError(f"unknown rewards {sorted(unknown)}; known: {REWARD_NAMES}")
    funcs, out_weights = [], []
    for name, weight in weights.items():
        if weight == 0:
            continue
        if name == "format":
            func = format_reward
        elif name == "label":
            func = label_reward
        elif name == "similarity":
            if not script.similarity_model:
                raise ValueError("the similarity reward needs --similarity_model")
            if script.similarity_scoring == "bge-m3-hybrid":
                mode_weights = _floats(script.similarity_hybrid_weights, "similarity_hybrid_weights")
                func = BGEM3SimilarityReward(
                    script.similarity_model,
                    device=script.similarity_device,
                    weights=mode_weights,
                    whole_if_unparsed=script.similarity_whole_if_unparsed,
                )
            else:
                func = SimilarityReward(script.similarity_model, device=script.similarity_device,
                                        pooling=script.similarity_pooling,
                                        whole_if_unparsed=script.similarity_whole_if_unparsed)
        else:
            if not (script.judge_url and script.judge_model):
                raise ValueError("the judge reward needs --judge_url and --judge_model")
            system_prompt = _read_text(script.judge_system_prompt_file, "judge_system_prompt_file")
            func = JudgeReward(script.judge_url, script.judge_model, api_key=os.environ.get(script.judge_api_key_env),
                               timeout=script.judge_timeout, rule=script.judge_rule,
                               include_context=script.judge_context, temperature=script.judge_temperature,
                               max_tokens=script.judge_max_tokens, system_prompt=system_prompt or JUDGE_SYSTEM_PROMPT,
                               user_template=_read_text(script.judge_user_template_file, "judge_user_template_file"))
        funcs.append(func)
        out_weights.append(float(weight))
    if not funcs:
        raise ValueError("no reward with a positive weight")
    return funcs, out_weights


def load_model_and_processor(script: GRPOScriptArguments, max_length: int | None = None):
    """The SFT model and its processor from `--model_path`, the `--tune_*` blocks trainable."""
    if not is_multimood_folder(script.model_path):
        raise ValueError(f"--model_path {script.model_path!r} is not a saved multimood model folder (run SFT first)")
    processor = MultimoodProcessor.from_pretrained(script.model_path)
    if script.k_turn_history is not None:
        processor.k_turn_history = script.k_turn_history
    if max_length is not None:
        processor.model_max_length = max_length
    model = MultimoodForConditionalGeneration.from_pretrained(script.model_path, dtype=torch.float32)
    configure_trainable(model, script)
    return model, processor


def make_grpo_dataset(data_path: str, processor, limit: int | None = None):
    """Records with a `prompt` column (the rendered prompt text) for trl."""
    data = make_dataset(data_path, limit)

    def prompt(record: dict, index: int) -> dict:
        try:  # the gold labels feed the rewards: they must name the processor's label sets
            processor.check_record(dict(record), index, with_target=True)
        except MultimoodRecordError as error:
            raise MultimoodError(f"{data_path}: {error}") from None
        return {"prompt": processor.render_prompt(dict(record))}

    return data.map(prompt, with_indices=True)


def train(script: GRPOScriptArguments, config: GRPOConfig):
    if script.data_path is None or script.model_path is None:
        raise ValueError("--model_path and --data_path are required")
    transformers.set_seed(config.seed)
    model, processor = load_model_and_processor(script, script.model_max_length)
    if script.lora_enable:
        model = apply_lora(model, script, script, config.gradient_checkpointing)
    elif config.beta != 0.0:
        config.trust_remote_code = True  # the reference model is reloaded from the folder's remote code
    rewards, weights = build_rewards(script)
    config.reward_weights = weights
    dataset = make_grpo_dataset(script.data_path, processor, script.max_train_samples)
    video_folder = os.path.abspath(script.vid_folder) if script.vid_folder else None
    trainer = MultimoodGRPOTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=dataset,
                                   processing_class=processor, video_folder=video_folder)
    logger.info("rewards: %s", dict(zip(trainer.reward_func_names, weights)))
    result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    save_trained(trainer, processor, config.output_dir, script.lora_enable, script.merge_lora)
    return trainer, result


def main(argv: list[str] | None = None):
    script, config = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if config.should_log else logging.WARNING)
    return train(script, config)


if __name__ == "__main__":
    main()
