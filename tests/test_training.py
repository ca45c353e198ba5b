"""Training: argument parsing of the seed's flags, tiny end-to-end runs (full, LoRA, resume, DeepSpeed),
the saved folder reloading in a clean process, and the quickstart."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from multimood import quickstart
from multimood import train as mm_train

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_SCRIPTS = REPO_ROOT / "run_scripts"


def _deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------

SEED_COMMAND = """
    --deepspeed {zero3}
    --model_type videollama2_qwen2
    --model_path {llm}
    --vision_tower {siglip}
    --mamba_compressor {mamba}
    --audio_tower {beats}
    --pretrain_projectors_repo {projectors}
    --mm_projector_type stc_connector_v35
    --data_path {data}
    --vid_folder {videos}
    --num_k_vid 5
    --mm_vision_select_layer -2
    --image_aspect_ratio pad
    --num_frames 16
    --bf16 True
    --tf32 True
    --fp16 False
    --output_dir {out}
    --num_train_epochs 1
    --tune_adapter_llm true
    --per_device_train_batch_size 8
    --per_device_eval_batch_size 4
    --gradient_accumulation_steps 2
    --save_strategy steps
    --save_steps 1
    --save_total_limit 99
    --learning_rate 2e-5
    --weight_decay 0.
    --warmup_ratio 0.03
    --max_grad_norm 1.0
    --lr_scheduler_type cosine
    --logging_steps 1
    --model_max_length 2048
    --gradient_checkpointing True
    --dataloader_num_workers 4
    --report_to none
    --run_name Multimood
    --k_turn_history 7
"""


def test_parse_seed_flags(tmp_path):
    if not _deepspeed_available():
        pytest.skip("deepspeed is not installed (pip install deepspeed==0.19.8)")
    paths = {name: str(tmp_path / name) for name in ("llm", "siglip", "mamba", "beats", "projectors", "data", "videos", "out")}
    argv = shlex.split(SEED_COMMAND.format(zero3=RUN_SCRIPTS / "zero3.json", **paths))
    model_args, data_args, args = mm_train.parse_args(argv)
    assert model_args.model_type == "videollama2_qwen2"
    assert model_args.model_path == paths["llm"] and model_args.vision_tower == paths["siglip"]
    assert model_args.mamba_compressor == paths["mamba"] and model_args.audio_tower == paths["beats"]
    assert model_args.pretrain_projectors_repo == paths["projectors"]
    assert model_args.mm_projector_type == "stc_connector_v35" and model_args.mm_vision_select_layer == -2
    assert model_args.tune_llm is True and model_args.tune_mm_projector and not model_args.tune_vision_tower
    assert data_args.data_path == paths["data"] and data_args.vid_folder == paths["videos"]
    assert (data_args.num_k_vid, data_args.num_frames, data_args.k_turn_history) == (5, 16, 7)
    assert data_args.image_aspect_ratio == "pad"
    assert args.warmup_ratio == 0.03 and args.warmup_steps == pytest.approx(0.03)
    assert args.learning_rate == 2e-5 and args.weight_decay == 0.0 and args.max_grad_norm == 1.0
    assert args.lr_scheduler_type == "cosine"
    assert args.bf16 is True and args.fp16 is False
    assert args.per_device_train_batch_size == 8 and args.per_device_eval_batch_size == 4
    assert args.gradient_accumulation_steps == 2 and args.num_train_epochs == 1
    assert args.save_strategy == "steps" and args.save_steps == 1 and args.save_total_limit == 99
    assert args.logging_steps == 1 and args.model_max_length == 2048
    assert args.gradient_checkpointing is True and args.dataloader_num_workers == 4
    assert args.remove_unused_columns is False and args.run_name == "Multimood"
    assert args.deepspeed == str(RUN_SCRIPTS / "zero3.json")
    if not torch.cuda.is_available():
        assert args.use_cpu is True and not args.tf32
    lora_args = mm_train.parse_args(["--output_dir", paths["out"], "--lora_enable", "True"])[2]
    assert (lora_args.lora_enable, lora_args.lora_r, lora_args.lora_alpha) == (True, 64, 16)


def test_parse_rejects_bad_flags(tmp_path):
    with pytest.raises(ValueError, match="warmup_ratio"):
        mm_train.parse_args(["--output_dir", str(tmp_path), "--warmup_ratio", "1.5"])
    with pytest.raises(ValueError, match="Qwen2"):
        mm_train.parse_args(["--output_dir", str(tmp_path), "--model_type", "llama"])


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_deepspeed_configs(name, tmp_path):
    config = json.loads((RUN_SCRIPTS / name).read_text())
    assert "optimizer" not in config  # the Trainer builds torch AdamW (no fused-op build on CPU)
    if config["zero_optimization"]["stage"] == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if not _deepspeed_available():
        pytest.skip("deepspeed is not installed")
    args = mm_train.MultimoodTrainingArguments(output_dir=str(tmp_path), deepspeed=str(RUN_SCRIPTS / name), report_to="none")
    assert args.hf_deepspeed_config is not None


# ----------------------------------------------------------------------------------------------
# Tiny runs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The quickstart's synthetic clips, dialogues and small tokenizer (no shared data needed)."""
    root = tmp_path_factory.mktemp("sample")
    records, videos = quickstart.write_sample_data(root)
    quickstart.train_tokenizer(mm_train.read_records(records), root / "tokenizer")
    return {"records": records, "videos": videos, "tokenizer": root / "tokenizer"}


def _tiny_argv(data: dict, output_dir, vocab_size: int, *extra: str, compressor: str = "mamba2") -> list[str]:
    config = quickstart.tiny_model_config(vocab_size, num_frames=4, image_size=56)
    if compressor is None:
        config["compressor_config"] = None
    return [
        "--model_config", json.dumps(config),
        "--tokenizer_path", str(data["tokenizer"]),
        "--data_path", str(data["records"]),
        "--vid_folder", str(data["videos"]),
        "--num_frames", "4", "--image_size", "56", "--num_k_vid", "2", "--k_turn_history", "2",
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "2",
        "--learning_rate", "3e-3", "--warmup_ratio", "0.1",
        "--logging_steps", "1", "--report_to", "none", "--model_max_length", "1024",
        "--seed", "0", "--disable_tqdm", "True",
        *extra,
    ]


def _vocab(data) -> int:
    from transformers import AutoTokenizer

    return -(-(len(AutoTokenizer.from_pretrained(str(data["tokenizer"]))) + 4) // 8) * 8


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["multimood"] = None  # the folder must load without the package
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor
    folder, records, videos = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    record = [json.loads(line) for line in open(records)][0]
    inputs = processor(records=[record], video_folder=videos)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    parsed = processor.post_process_output(out[:, inputs["input_ids"].shape[1]:])[0]
    print("RESULT", json.dumps({"module": type(model).__module__, "new_tokens": out.shape[1] - inputs["input_ids"].shape[1],
                                "keys": sorted(parsed)}))
    """
)


def _reload_in_clean_process(folder, records, videos) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(folder), str(records), str(videos)],
        capture_output=True, text=True, timeout=300, cwd=str(folder),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_train_on_mesc_loss_decreases_and_reloads(shared_data, tmp_path):
    """A tiny model on real MESC records and real clips with the real Qwen2 tokenizer: loss drops clearly,
    and the saved folder reloads in a clean process and generates."""
    from tests.model_utils import TINY_VOCAB

    records = tmp_path / "mesc.jsonl"
    lines = (shared_data / "records" / "mesc_val_records.jsonl").read_text().splitlines()[:6]
    records.write_text("\n".join(lines) + "\n")
    data = {"records": records, "videos": shared_data / "media" / "video", "tokenizer": shared_data / "tokenizer" / "qwen2"}
    out = tmp_path / "model"
    argv = _tiny_argv(data, out, TINY_VOCAB, "--max_steps", "30", "--save_strategy", "no", "--k_turn_history", "1")
    trainer, _ = mm_train.main(argv)
    losses = _losses(trainer)
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, losses
    for name in ("config.json", "model.safetensors", "modeling_multimood.py", "configuration_multimood.py",
                 "processing_multimood.py", "processor_config.json", "tokenizer_config.json"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert "AutoModelForCausalLM" in config["auto_map"]
    result = _reload_in_clean_process(out, records, data["videos"])
    assert result["new_tokens"] > 0
    assert not result["module"].startswith("multimood.")
    assert {"client_emotion", "therapist_emotion", "strategy", "response"} <= set(result["keys"])


@pytest.mark.slow
def test_lora_saves_adapter_and_merged_model(sample_data, tmp_path):
    from peft import PeftModel

    from multimood import MultimoodForConditionalGeneration

    out = tmp_path / "lora"
    argv = _tiny_argv(sample_data, out, _vocab(sample_data), "--max_steps", "4", "--save_strategy", "no",
                      "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0")
    trainer, _ = mm_train.main(argv)
    assert isinstance(trainer.model, PeftModel)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and set(adapter["modules_to_save"]) >= {"mm_projector", "mm_projector_a", "mamba_compressor"}
    assert (out / "adapter_model.safetensors").exists()
    merged = out / "merged"
    assert (merged / "model.safetensors").exists() and (merged / "modeling_multimood.py").exists()
    model = MultimoodForConditionalGeneration.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
    trained = trainer.model.merge_and_unload().state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name], msg=name)


@pytest.mark.slow
def test_resume_from_checkpoint_matches_uninterrupted_run(sample_data, tmp_path):
    vocab = _vocab(sample_data)
    full, _ = mm_train.main(_tiny_argv(sample_data, tmp_path / "full", vocab, "--max_steps", "6", "--save_strategy", "no"))
    full_state = {k: v.detach().clone() for k, v in full.model.state_dict().items()}
    part = tmp_path / "part"
    mm_train.main(_tiny_argv(sample_data, part, vocab, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3"))
    checkpoint = part / "checkpoint-3"
    assert checkpoint.is_dir()
    shutil.rmtree(part / "checkpoint-6", ignore_errors=True)  # as if the run had been killed after step 3
    resumed, _ = mm_train.main(_tiny_argv(sample_data, part, vocab, "--max_steps", "6", "--save_strategy", "no",
                                          "--resume_from_checkpoint", "True"))
    assert resumed.state.global_step == 6
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, full_state[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_deepspeed_zero2_torchrun(sample_data, tmp_path):
    if not _deepspeed_available():
        pytest.skip("deepspeed is not installed")
    out = tmp_path / "ds"
    argv = _tiny_argv(sample_data, out, _vocab(sample_data), "--max_steps", "3", "--save_strategy", "no",
                      "--deepspeed", str(RUN_SCRIPTS / "zero2.json"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29561",
         str(RUN_SCRIPTS / "run_multimood.py"), *argv],
        capture_output=True, text=True, timeout=420, env=env, cwd=str(REPO_ROOT),
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    assert (out / "model.safetensors").exists() and (out / "processor_config.json").exists()


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "quickstart"
    summary = quickstart.run(quickstart.build_parser().parse_args(["--output_dir", str(out), "--max_steps", "20"]))
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer_config.json"):
        assert (out / name).exists(), name
    assert summary["last_loss"] < summary["first_loss"]
    assert set(summary["prediction"]) == {"client_emotion", "therapist_emotion", "strategy", "response"}
    printed = capsys.readouterr().out
    assert '"prediction"' in printed
