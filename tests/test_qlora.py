"""QLoRA (4-bit LLM + LoRA), the projector learning rate and modality-grouped batches, on the CPU.

Oracles: bitsandbytes' own functional quantization of the initial weights, the initial tensors themselves, a
float32 model rebuilt from the merged folder, hand-listed parameter names, and the records' clip lists.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from multimood import MultimoodForConditionalGeneration
from multimood.checkpoints.assembly import build_processor
from multimood.model.processing_multimood import MultimoodDataCollator
from multimood.training import train as mm_train
from multimood.training.assembly import quantize_language_model
from multimood.training.train import ModalityLengthGroupedBatchSampler, MultimoodTrainer, modality_lengths
from tests.model_utils import multimodal_batch, tiny_config
from tests.test_training import (  # noqa: F401
    _reload_in_clean_process,
    _run_killing_group,
    _tiny_argv,
    _vocab,
    sample_data,
)

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'multimood[qlora]')")

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The merged folder holds W_dequantized + B @ A * scale in float32; the adapter model computes
# x @ W_dequantized^T + (x @ A^T) @ B^T * scale. Only the float32 summation order differs: measured 5e-7 on
# logits of magnitude 0.7 (tiny config, random LoRA B).
MERGED_LOGITS_ATOL = 1e-5
MERGED_LOGITS_RTOL = 1e-5


@pytest.fixture(scope="module")
def mixed_records(sample_data, tmp_path_factory):  # noqa: F811
    """The first 12 sample dialogue turns with every third record made text-only (no clips): two steps of the
    modality-grouped sampler then see both kinds of batch."""
    records = [json.loads(line) for line in Path(sample_data["records"]).read_text().splitlines()][:12]
    for record in records[::3]:
        record["path_to_vid_user_most_recent"] = []
    path = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {**sample_data, "records": path}


def _batch_of(records_path: Path, indices: list[int], processor, videos) -> dict:
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    return MultimoodDataCollator(processor, video_folder=str(videos))([records[i] for i in indices])


@pytest.mark.slow
def test_qlora_4bit_trains_only_lora_and_tuned_blocks_and_merged_matches(mixed_records, tmp_path):
    """Two 4-bit NF4 QLoRA steps (double quant): the quantized LLM weights stay exactly bitsandbytes' quantization of
    the initial weights, the frozen blocks stay bit-identical, the LoRA B matrices and the two projectors move; the
    projectors sit in the --mm_projector_lr groups; the adapter holds LoRA and the projectors; the merged folder loads
    with trust_remote_code and gives the adapter model's logits."""
    out = tmp_path / "qlora"
    argv = _tiny_argv(mixed_records, out, _vocab(mixed_records), "--max_steps", "2", "--save_strategy", "no",
                      "--warmup_ratio", "0.0", "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
                      "--lora_dropout", "0.0", "--bits", "4", "--quant_type", "nf4", "--double_quant", "True",
                      "--mm_projector_lr", "1e-3", "--weight_decay", "0.1", "--freeze_mamba_compressor", "true",
                      "--group_by_modality_length", "True")
    model_args, data_args, training_args = mm_train.parse_args(argv)
    transformers.set_seed(training_args.seed)  # what train() does before it builds the model
    initial_model, _ = mm_train.build_model_and_processor(model_args, data_args, training_args)
    initial = {k: v.detach().clone() for k, v in initial_model.state_dict().items()}
    del initial_model

    trainer, _ = mm_train.main(argv)
    peft_model = trainer.model
    trained = peft_model.get_base_model().state_dict()  # tied weights under both names

    quantized = changed_projectors = 0
    for key, before in initial.items():
        module, _, leaf = key.rpartition(".")
        if module.split(".")[-1] in LORA_LINEARS and ".language_model." in f".{key}":
            layer = peft_model.get_base_model().get_submodule(module).base_layer
            if leaf == "bias":
                assert torch.equal(layer.bias, before), key
                continue
            packed, state = bnb.functional.quantize_4bit(before, quant_type="nf4", compress_statistics=True)
            assert torch.equal(layer.weight.data, packed), key  # not trained: bnb's quantization of the initial weight
            assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                               bnb.functional.dequantize_4bit(packed, state)), key
            quantized += 1
        elif key.startswith(("model.mm_projector.", "model.mm_projector_a.")):
            block, rest = key.split(".")[1], key.split(".", 2)[2]
            assert torch.equal(trained[f"model.{block}.original_module.{rest}"], before), key
            changed_projectors += not torch.equal(trained[f"model.{block}.modules_to_save.default.{rest}"], before)
        else:  # towers, frozen compressor, embeddings, norms, LM head
            assert torch.equal(trained[key], before), key
    assert quantized == 2 * len(LORA_LINEARS)  # tiny config: 2 decoder layers
    assert changed_projectors > 0.8 * sum(k.startswith("model.mm_projector") for k in initial)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * len(LORA_LINEARS) and all(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".modules_to_save.default." in n for n in trainable), sorted(trainable)[:10]
    assert not any("mamba_compressor" in n for n in trainable)

    projector_ids = {id(p) for n, p in peft_model.named_parameters() if p.requires_grad and "mm_projector" in n}
    in_projector_groups = {
        id(p) for g in trainer.optimizer.param_groups if g["initial_lr"] == 1e-3 for p in g["params"]
    }
    assert projector_ids and in_projector_groups == projector_ids
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {3e-3, 1e-3}

    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as saved:
        keys = list(saved.keys())
    assert sum("lora_A" in k for k in keys) == sum("lora_B" in k for k in keys) == 2 * len(LORA_LINEARS)
    assert any("mm_projector." in k and "lora" not in k for k in keys)
    assert any("mm_projector_a." in k for k in keys) and not any("mamba_compressor" in k for k in keys)

    # (in this process the Auto classes resolve to the package's registered class; the clean-process load of a
    # merged QLoRA folder is test_finetune_qlora_script_trains_saves_and_reloads)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", trust_remote_code=True).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    batch = _batch_of(mixed_records["records"], [1, 3], trainer.processing_class, mixed_records["videos"])
    assert "pixel_values_videos" in batch
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, atol=MERGED_LOGITS_ATOL, rtol=MERGED_LOGITS_RTOL)
    # the merged weights are not the initial float32 ones (4-bit base): the check above is not vacuous
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q_proj], initial[q_proj])


def test_projector_lr_param_groups(tmp_path):
    """--mm_projector_lr: connector and audio projector in their own groups, decay for all but biases and norm
    weights (the published rule); without it the Trainer's two groups."""
    model = MultimoodForConditionalGeneration(tiny_config())
    args = mm_train.MultimoodTrainingArguments(output_dir=str(tmp_path), report_to="none", learning_rate=1e-4,
                                               weight_decay=0.1, mm_projector_lr=2e-5)
    optimizer = MultimoodTrainer(model=model, args=args).create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert len(groups) == 4
    grouped = [n for g in groups for n in g[0]]
    assert sorted(grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each once
    projector = {
        names[id(p)] for p in [*model.model.mm_projector.parameters(), *model.model.mm_projector_a.parameters()]
    }
    for members, lr, _ in groups:
        assert members <= projector if lr == 2e-5 else not members & projector
    assert {n for g in groups if g[1] == 2e-5 for n in g[0]} == projector
    decayed = {n for g in groups if g[2] == 0.1 for n in g[0]}
    for name in (
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.mm_projector_a.weight",
        "model.mm_projector.s1.b1.conv1.conv.weight",
        "model.mamba_compressor.mamba.layers.0.mixer.in_proj.weight",
        "model.mamba_compressor.mamba.layers.0.mixer.A_log",
    ):
        assert name in decayed, name
    for name in (
        "model.language_model.layers.0.self_attn.q_proj.bias",
        "model.language_model.norm.weight",
        "model.language_model.layers.0.input_layernorm.weight",
        "model.mm_projector_a.bias",
        "model.mm_projector.s1.b1.conv1.bn.weight",  # timm LayerNormAct2d, a LayerNorm
        "model.mamba_compressor.mamba.norm_f.weight",
        "model.mamba_compressor.mamba.layers.0.mixer.norm.weight",
        "model.mamba_compressor.mamba.layers.0.mixer.dt_bias",
    ):
        assert name in grouped and name not in decayed, name
    norms = [n for n, p in model.named_parameters() if p.requires_grad and "norm" in n.lower()]
    assert norms and not set(norms) & decayed

    plain = MultimoodTrainer(model=model, args=mm_train.MultimoodTrainingArguments(
        output_dir=str(tmp_path), report_to="none", weight_decay=0.1)).create_optimizer()
    assert len(plain.param_groups) == 2 and {g["lr"] for g in plain.param_groups} == {5e-5}


def _modalities(batches, lengths):
    return [{length > 0 for length in (lengths[i] for i in batch)} for batch in batches]


def test_modality_grouped_batches_single_modality_and_seeded():
    generator = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(1, 200, (29,), generator=generator)]
    lengths = [n if i % 3 else -n for i, n in enumerate(lengths)]  # 10 text-only, 19 with clips
    sampler = ModalityLengthGroupedBatchSampler(lengths, per_device_batch_size=2, batches_per_megabatch=3, seed=7)
    batches = sampler.batches()
    assert len(batches) == len(sampler) == len(list(iter(sampler)))
    assert sorted(i for b in batches for i in b) == list(range(29))  # every record once, none dropped
    assert all(len(m) == 1 for m in _modalities(batches, lengths))  # every batch single-modality
    assert sum(len(b) < 2 for b in batches) <= 2  # only each modality's last batch may be short
    # full megabatches (3 batches = 6 records) first: one modality each, longest first
    full = (19 // 6) + (10 // 6)
    for k in range(full):
        megabatch = [i for b in batches[3 * k:3 * k + 3] for i in b]
        assert len(megabatch) == 6 and len({lengths[i] > 0 for i in megabatch}) == 1
        assert [abs(lengths[i]) for i in megabatch] == sorted((abs(lengths[i]) for i in megabatch), reverse=True)
    assert ModalityLengthGroupedBatchSampler(lengths, 2, 3, seed=7).batches() == batches  # deterministic
    assert ModalityLengthGroupedBatchSampler(lengths, 2, 3, seed=8).batches() != batches
    sampler.set_epoch(1)
    assert sampler.batches() != batches  # reshuffled each epoch
    with pytest.raises(ValueError, match="non-zero"):
        ModalityLengthGroupedBatchSampler([3, 0, -2], 2)


def test_trainer_serves_single_modality_batches(mixed_records, tmp_path):
    """--group_by_modality_length: the Trainer's training batches, collated from real records and clips, have video
    for all records or for none."""
    records = mm_train.load_records(mixed_records["records"])
    clips = [bool(r["path_to_vid_user_most_recent"]) for r in records]
    lengths = modality_lengths(records)
    assert [n > 0 for n in lengths] == clips and all(n != 0 for n in lengths)
    processor = build_processor(str(mixed_records["tokenizer"]), {"num_frames": 2, "image_size": 28})
    args = mm_train.MultimoodTrainingArguments(output_dir=str(tmp_path), report_to="none", seed=3,
                                               per_device_train_batch_size=2, group_by_modality_length=True)
    trainer = MultimoodTrainer(
        model=torch.nn.Linear(1, 1),
        args=args,
        train_dataset=records,
        data_collator=MultimoodDataCollator(processor, video_folder=str(mixed_records["videos"])),
    )
    loader = trainer.get_train_dataloader()
    sampler = loader.batch_sampler
    assert isinstance(sampler, ModalityLengthGroupedBatchSampler)
    assert len(loader) == len(sampler.batches())
    seen = []
    for indices, batch in zip(sampler.batches(), loader):
        has_video = "pixel_values_videos" in batch
        assert {clips[i] for i in indices} == {has_video}
        if has_video:
            assert batch["pixel_values_videos"].shape[0] == len(indices)
        seen += indices
    assert sorted(seen) == list(range(len(records)))


def test_quantize_language_model_8bit_matches_dequantized_weights(tmp_path):
    """--bits 8: only the LLM's linear layers become int8 (the rest keeps float32) and the model computes what a
    float32 copy holding the dequantized weights computes."""
    config = tiny_config()
    torch.manual_seed(0)
    model = MultimoodForConditionalGeneration(config).eval()
    reference = MultimoodForConditionalGeneration(config).eval()
    reference.load_state_dict(model.state_dict())
    args = mm_train.MultimoodTrainingArguments(output_dir=str(tmp_path), report_to="none", bits=8, lora_enable=True)
    assert quantize_language_model(model, args) == 2 * len(LORA_LINEARS)
    int8 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(int8) == 2 * len(LORA_LINEARS) and all(m.weight.dtype == torch.int8 for m in int8)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "language_model.layers" not in n
               or not n.endswith("proj.weight"))
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            scale = module.weight.SCB.float().view(-1, 1) / 127  # bitsandbytes' row-wise absmax int8 code
            reference.get_submodule(name).weight.data = module.weight.data.float() * scale
    batch = multimodal_batch(config, [{"text": 12, "video": True, "audio": True, "history": 2}, {"text": 9}])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_finetune_qlora_script_trains_saves_and_reloads(sample_data, tmp_path):  # noqa: F811
    """`bash run_scripts/finetune_qlora.sh` (torchrun, one CPU process, DeepSpeed ZeRO-2, gradient checkpointing) with
    the tiny config: trains, saves the adapter and the merged model, which reloads in a clean process and generates."""
    out = tmp_path / "qlora_script"
    config = json.loads(_tiny_argv(sample_data, out, _vocab(sample_data))[1])
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "NPROC_PER_NODE": "1",
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": "29563",
        "MODEL_PATH": str(sample_data["tokenizer"]),
        "DATA_PATH": str(sample_data["records"]),
        "VID_FOLDER": str(sample_data["videos"]),
        "OUTPUT_DIR": str(out),
        "PYTHONPATH": f"{REPO_ROOT}:{os.environ.get('PYTHONPATH', '')}",
    }
    extra = ["--model_config", json.dumps(config), "--vision_tower", "", "--mamba_compressor", "", "--audio_tower", "",
             "--num_frames", "4", "--image_size", "56", "--num_k_vid", "2", "--k_turn_history", "2",
             "--model_max_length", "1024", "--lora_r", "8", "--lora_alpha", "16", "--bf16", "False",
             "--max_steps", "2", "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
             "--per_device_train_batch_size", "2", "--learning_rate", "3e-3"]
    # (the first DeepSpeed run on a machine compiles its CPU communication op into ~/.cache/torch_extensions)
    proc = _run_killing_group(["bash", str(REPO_ROOT / "run_scripts" / "finetune_qlora.sh"), "", "", "", *extra],
                              900, env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    assert "quantized 14 LLM linear layers to 4-bit (nf4)" in proc.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and "mamba_compressor" not in (
        adapter["modules_to_save"] or []
    )  # --freeze_mamba_compressor
    result = _reload_in_clean_process(out / "merged", sample_data["records"], sample_data["videos"])
    assert result["new_tokens"] > 0 and not result["module"].startswith("multimood.")
    shutil.rmtree(out, ignore_errors=True)


def test_pretrain_mm_mlp_adapter_files_load_into_projectors(tmp_path):
    """--pretrain_mm_mlp_adapter / _a: the published per-projector files (keys `model.mm_projector[_a].*`)."""
    model = MultimoodForConditionalGeneration(tiny_config())
    video = {f"model.mm_projector.{k}": torch.randn_like(v) for k, v in model.model.mm_projector.state_dict().items()}
    audio = {
        f"model.mm_projector_a.{k}": torch.randn_like(v) for k, v in model.model.mm_projector_a.state_dict().items()
    }
    torch.save(video, tmp_path / "mm_projector.bin")
    torch.save({**audio, "model.mm_projector.readout.0.weight": torch.zeros(1)}, tmp_path / "mm_projector_a.bin")
    before_audio = {k: v.clone() for k, v in model.model.mm_projector_a.state_dict().items()}
    model_args = mm_train.ModelArguments(pretrain_mm_mlp_adapter=str(tmp_path / "mm_projector.bin"))
    mm_train.load_projector_files(model, model_args)
    for key, value in video.items():
        assert torch.equal(model.model.mm_projector.state_dict()[key[len("model.mm_projector."):]], value), key
    for key, value in before_audio.items():
        assert torch.equal(model.model.mm_projector_a.state_dict()[key], value), key  # untouched without _a
    mm_train.load_projector_files(
        model, mm_train.ModelArguments(pretrain_mm_mlp_adapter_a=str(tmp_path / "mm_projector_a.bin"))
    )
    for key, value in audio.items():
        assert torch.equal(model.model.mm_projector_a.state_dict()[key[len("model.mm_projector_a."):]], value), key
    with pytest.raises(ValueError, match="no `mm_projector_a.\\*` tensors"):
        mm_train.load_projector_files(
            model, mm_train.ModelArguments(pretrain_mm_mlp_adapter_a=str(tmp_path / "mm_projector.bin"))
        )


def test_lora_weight_path_continues_a_saved_adapter(tmp_path):
    """--lora_weight_path: the saved adapter's own weights (LoRA and fully trained projectors) come back, trainable."""
    config = tiny_config()
    args = mm_train.MultimoodTrainingArguments(output_dir=str(tmp_path), report_to="none", lora_enable=True, lora_r=4)
    first = mm_train.apply_lora(MultimoodForConditionalGeneration(config), mm_train.ModelArguments(), args)
    with torch.no_grad():
        for _, param in first.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    first.save_pretrained(tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in first.named_parameters() if p.requires_grad}
    args.lora_weight_path = str(tmp_path / "adapter")
    again = mm_train.load_lora_adapter(MultimoodForConditionalGeneration(config), args)
    trainable = {n: p for n, p in again.named_parameters() if p.requires_grad}
    assert set(trainable) == set(saved)
    for name, value in saved.items():
        assert torch.equal(trainable[name], value), name
    args.lora_weight_path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere: no adapter_config.json"):
        mm_train.load_lora_adapter(MultimoodForConditionalGeneration(config), args)
