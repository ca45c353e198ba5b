"""Supervised fine-tuning of MultiMood with the Hugging Face `Trainer` (the seed's `finetune.sh` flags).

Run with `torchrun run_scripts/run_multimood.py --deepspeed run_scripts/zero3.json ...` or `multimood train ...`.
The flags are in `arguments.py`; the model and processor are assembled (and LoRA / QLoRA applied) in `assembly.py`.

Data: JSONL / JSON-array records; the dataset yields raw record dicts and `MultimoodDataCollator` does
all the processing (video decoding runs in the DataLoader workers).
After training the output folder is complete (weights, config with `auto_map`, remote code, processor
files, pipeline); with LoRA it holds the adapter and `merged/` holds a full model that loads with
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`.
QLoRA (`--bits 4/8` with LoRA) quantizes the LLM's linear layers after assembly; its `merged/` is the dequantized
base plus the adapter, in float32. `MultimoodTrainer` adds the published `--mm_projector_lr` optimizer groups and
`--group_by_modality_length` batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
from functools import partial
from pathlib import Path

import torch
import transformers
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import get_last_checkpoint, seed_worker

from ..checkpoints.hub import check_hub_reachable, prepare_upload_folder, push_to_hub
from ..checkpoints.model_folder import complete_model_folder, save_model_folder
from ..data.bad_samples import BadSampleScreen
from ..data.dataset_builder import load_dialogues
from ..model.modeling_multimood import MultimoodForConditionalGeneration
from ..model.processing_multimood import MultimoodDataCollator
from .arguments import (
    DataArguments,
    ModelArguments,
    MultimoodTrainingArguments,
    check_quantization_flags,
    check_training_flags,
    parse_args,
)
from .assembly import (
    apply_lora,
    build_model_and_processor,
    check_lora_switches,
    load_lora_adapter,
    load_projector_files,
    prepare_kbit_training,
)

logger = logging.getLogger("multimood.training.train")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_records(path: str | os.PathLike):
    """The records of a JSONL / JSON-array file, validated by the dataset builder (all splits of one file)."""
    return load_dialogues({"train": str(Path(path).expanduser().resolve())})["train"]


def make_dataset(path: str, limit: int | None = None):
    data = load_records(path)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    if len(data) == 0:
        raise ValueError(f"{path}: no records")
    return data


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def save_lora_merged(trainer: Trainer, processor, output_dir: str) -> str | None:
    """Merge the LoRA adapter into a copy-free full model and save it to `output_dir/merged`."""
    model = trainer.model
    merged_dir = os.path.join(output_dir, "merged")
    gather = contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed  # noqa: PLC0415 - optional heavy dependency, present whenever ZeRO-3 is on

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gather:
        if trainer.args.should_save:
            merged = model.merge_and_unload()
            state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
            save_model_folder(merged, processor, merged_dir, state_dict=state)
    return merged_dir if trainer.args.should_save else None


def full_precision_base_state(peft_model) -> dict[str, torch.Tensor]:
    """The state dict of a peft model's quantized base as a plain float32 model: the bitsandbytes weights dequantized
    (exactly the weights the adapter was trained on), LoRA layers and modules_to_save copies left out."""
    import bitsandbytes as bnb  # noqa: PLC0415 - optional heavy dependency (the qlora extra)
    from peft.utils.integrations import dequantize_bnb_weight  # noqa: PLC0415 - optional (the qlora extra)

    state = {}
    for module_name, module in peft_model.get_base_model().named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            state[prefix + "weight"] = dequantize_bnb_weight(module.weight, getattr(module, "state", None))
            if module.bias is not None:
                state[prefix + "bias"] = module.bias.detach()
            continue
        for name, tensor in module.named_parameters(recurse=False):
            if not isinstance(tensor, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
                state[prefix + name] = tensor.detach()
        for name, tensor in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[prefix + name] = tensor.detach()
    plain = {}
    for key, value in state.items():
        parts = key.split(".")
        if any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
            continue
        plain[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = value.float().cpu()
    return plain


def save_qlora_merged(trainer: Trainer, processor, output_dir: str) -> str | None:
    """QLoRA: the adapter saved in `output_dir` merged into a float32 copy of the dequantized base, to
    `output_dir/merged` (a full model that loads with trust_remote_code, same logits as the adapter model).

    peft's own `merge_and_unload` would quantize the merged weights again, losing the adapter's update.
    """
    from peft import PeftModel  # noqa: PLC0415 - optional heavy dependency (the qlora extra)

    if not trainer.args.should_save:
        return None
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    full = MultimoodForConditionalGeneration._from_config(peft_model.get_base_model().config, dtype=torch.float32)
    full.load_state_dict(full_precision_base_state(peft_model), strict=True)
    merged = PeftModel.from_pretrained(full, output_dir).merge_and_unload()
    return str(save_model_folder(merged, processor, os.path.join(output_dir, "merged")))


# ----------------------------------------------------------------------------------------------
# Trainer: the projector learning rate and modality-grouped batches
# ----------------------------------------------------------------------------------------------

PROJECTOR_PARAMETER_KEY = "mm_projector"  # the video connector `mm_projector` and the audio projector `mm_projector_a`


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: all but biases and the weights of normalisation layers
    (LayerNorm, RMSNorm, GroupNorm...), the published trainer's rule (`ALL_LAYERNORM_LAYERS` and "bias")."""
    names = set()
    for module_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            continue
        prefix = f"{module_name}." if module_name else ""
        names.update(prefix + name for name, _ in module.named_parameters(recurse=False) if "bias" not in name)
    return names


def modality_lengths(dataset) -> list[int]:
    """Per record, its words (client fragments, therapist answer, chat history, situation), positive when the record
    has client clips (video and audio) and negative when it is text-only: the published `modality_lengths`
    convention."""
    lengths = []
    for record in dataset:
        texts = [*record["utt_user_most_recent"], *record["Utterance"], record.get("situation") or "",
                 record.get("problem_type") or "", *(m["content"] for m in record.get("history_chat") or [])]
        words = max(1, sum(len(text.split()) for text in texts))
        lengths.append(words if record.get("path_to_vid_user_most_recent") else -words)
    return lengths


class ModalityLengthGroupedBatchSampler:
    """Batches that hold one modality only (records with clips, or text-only), grouped by length.

    Each modality's records are shuffled and cut into megabatches of `batch_size * batches_per_megabatch` records (one
    optimizer step over all ranks and accumulation steps), sorted longest first within a megabatch and cut into
    batches; the full megabatches of both modalities are shuffled together and each modality's incomplete last
    megabatch comes at the end. The published sampler merged those two remainders into one mixed megabatch and cut
    the flat index list into batches, so batches could mix modalities; here every batch is single-modality.
    The order depends only on `seed` and the epoch (`set_epoch`), the same on every rank.
    """

    batch_size = None  # batches may be shorter than `per_device_batch_size` (accelerate shards them as they are)
    drop_last = False

    def __init__(self, lengths: list[int], per_device_batch_size: int, batches_per_megabatch: int = 1, seed: int = 0):
        if any(length == 0 for length in lengths):
            raise ValueError("modality lengths must be non-zero (positive: with clips, negative: text-only)")
        self.lengths = list(lengths)
        self.per_device_batch_size = per_device_batch_size
        self.megabatch_size = per_device_batch_size * max(1, batches_per_megabatch)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self) -> list[list[int]]:
        return [group for group in ([i for i, n in enumerate(self.lengths) if n > 0],
                                    [i for i, n in enumerate(self.lengths) if n < 0]) if group]

    def __len__(self) -> int:
        total = 0
        for group in self._groups():
            full, rest = divmod(len(group), self.megabatch_size)
            total += full * (self.megabatch_size // self.per_device_batch_size) + -(-rest // self.per_device_batch_size)
        return total

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        full, remainders = [], []
        for group in self._groups():
            shuffled = [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
            for start in range(0, len(shuffled), self.megabatch_size):
                megabatch = sorted(shuffled[start:start + self.megabatch_size], key=lambda i: -abs(self.lengths[i]))
                cut = [megabatch[j:j + self.per_device_batch_size]
                       for j in range(0, len(megabatch), self.per_device_batch_size)]
                (full if len(megabatch) == self.megabatch_size else remainders).append(cut)
        order = torch.randperm(len(full), generator=generator).tolist()
        return [batch for megabatch in [full[k] for k in order] + remainders for batch in megabatch]

    def __iter__(self):
        return iter(self.batches())


class MultimoodTrainer(Trainer):
    """`Trainer` with the published optimizer groups (`--mm_projector_lr`) and modality-grouped batches
    (`--group_by_modality_length`)."""

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return sorted(decay_parameter_names(model))

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """With `--mm_projector_lr`: the connector and audio projector in their own groups (with and without decay)."""
        if self.args.mm_projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = []
        for projector in (False, True):
            for decays in (True, False):
                params = [p for n, p in opt_model.named_parameters()
                          if p.requires_grad and (n in decay) == decays and (PROJECTOR_PARAMETER_KEY in n) == projector]
                if params:
                    group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
                    if projector:
                        group["lr"] = self.args.mm_projector_lr
                    groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def get_train_dataloader(self) -> DataLoader:
        if not self.args.group_by_modality_length:
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        batch_sampler = ModalityLengthGroupedBatchSampler(
            modality_lengths(self.train_dataset),
            per_device_batch_size=self._train_batch_size,
            batches_per_megabatch=self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        workers = self.args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=batch_sampler,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=self.args.process_index),
        )
        return self.accelerator.prepare(loader)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def save_trained(trainer: Trainer, processor, output_dir: str, lora_enable: bool = False, merge_lora: bool = True,
                 quantized: bool = False) -> str | None:
    """The trained model as a complete folder in `output_dir` (with LoRA: the adapter and the processor), and with
    LoRA and `merge_lora` the merged full model in `output_dir/merged`, whose path is returned (SFT and GRPO)."""
    trainer.save_state()
    if not lora_enable:
        trainer.model.config.use_cache = True
    trainer.save_model(output_dir)
    if trainer.args.should_save:
        complete_model_folder(output_dir, processor)
    if not (lora_enable and merge_lora):
        return None
    return (save_qlora_merged if quantized else save_lora_merged)(trainer, processor, output_dir)


def prepare_model(model_args: ModelArguments, data_args: DataArguments, training_args: MultimoodTrainingArguments):
    """(model, processor) to train: assembled, projector files loaded, quantized (QLoRA) and adapted (LoRA)."""
    check_quantization_flags(training_args)
    model, processor = build_model_and_processor(model_args, data_args, training_args)
    load_projector_files(model, model_args)
    if training_args.bits in (4, 8):
        model = prepare_kbit_training(model, training_args)
    if training_args.lora_enable:
        if training_args.lora_weight_path:
            model = load_lora_adapter(model, training_args)
        else:
            model = apply_lora(model, model_args, training_args, training_args.gradient_checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model, processor


def training_data(data_args: DataArguments, training_args: MultimoodTrainingArguments, processor):
    """(train dataset, eval dataset or None, collator), records with unusable clips screened out or refused."""
    train_dataset = make_dataset(data_args.data_path, data_args.max_train_samples)
    eval_dataset = make_dataset(data_args.eval_data_path) if data_args.eval_data_path else None
    video_folder = os.path.abspath(data_args.vid_folder) if data_args.vid_folder else None
    screen = BadSampleScreen(data_args.on_bad_sample, video_folder, processor.num_k_vid, training_args.output_dir,
                             main_process=training_args.process_index == 0, progress=not training_args.disable_tqdm)
    train_dataset = screen.dataset(train_dataset, data_args.data_path)
    eval_dataset = screen.dataset(eval_dataset, data_args.eval_data_path) if eval_dataset is not None else None
    collator = screen.collator(MultimoodDataCollator(processor, video_folder=video_folder, with_target=True))
    return train_dataset, eval_dataset, collator


def resume_checkpoint(training_args: MultimoodTrainingArguments) -> str | bool | None:
    """`--resume_from_checkpoint`: a path, or true / last / latest for the last checkpoint of output_dir."""
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        resume = True
    if resume is True:
        resume = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    return resume


def train(model_args: ModelArguments, data_args: DataArguments, training_args: MultimoodTrainingArguments):
    if data_args.data_path is None:
        raise ValueError("--data_path is required")
    check_lora_switches(model_args, training_args.lora_enable)
    transformers.set_seed(training_args.seed)
    # The Trainer would push output_dir as is (checkpoints, its own card): we push a prepared folder at the end,
    # and check the Hub answers before spending the training time.
    push, training_args.push_to_hub = training_args.push_to_hub, False
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    if push:
        check_hub_reachable(repo_id)
    model, processor = prepare_model(model_args, data_args, training_args)
    train_dataset, eval_dataset, collator = training_data(data_args, training_args, processor)
    trainer = MultimoodTrainer(model=model, args=training_args, train_dataset=train_dataset,
                               eval_dataset=eval_dataset, data_collator=collator, processing_class=processor)
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    merged_dir = save_trained(trainer, processor, training_args.output_dir, training_args.lora_enable,
                              training_args.merge_lora, quantized=training_args.bits in (4, 8))
    if push and trainer.args.should_save:
        if training_args.lora_enable and merged_dir is None:
            raise ValueError("--push_to_hub with LoRA needs the merged model (--merge_lora True)")
        folder = prepare_upload_folder(
            merged_dir or training_args.output_dir, None, Path(training_args.output_dir) / "hub_upload",
            training_args={**training_args.to_dict(), "world_size": training_args.world_size},
            repo_id=repo_id, overwrite=True,
        )
        push_to_hub(folder, repo_id, token=training_args.hub_token, private=bool(training_args.hub_private_repo))
    return trainer, result


def main(argv: list[str] | None = None):
    model_args, data_args, training_args = parse_args(argv)
    check_training_flags(model_args, data_args, training_args)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    return train(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
