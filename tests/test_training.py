"""Training: argument parsing of the seed's flags, tiny end-to-end runs (full, LoRA, resume, DeepSpeed),
the saved folder reloading in a clean process, and the quickstart."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer

from multimood import MultimoodForConditionalGeneration
from multimood.training import quickstart
from multimood.training import train as mm_train
from tests.model_utils import TINY_VOCAB
from tests.optional_deps import import_or_skip

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_SCRIPTS = REPO_ROOT / "run_scripts"


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
    import_or_skip("deepspeed", "train")
    paths = {
        name: str(tmp_path / name)
        for name in ("llm", "siglip", "mamba", "beats", "projectors", "data", "videos", "out")
    }
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
    import_or_skip("deepspeed", "train")
    args = mm_train.MultimoodTrainingArguments(
        output_dir=str(tmp_path), deepspeed=str(RUN_SCRIPTS / name), report_to="none"
    )
    assert args.hf_deepspeed_config is not None


# ----------------------------------------------------------------------------------------------
# Tiny runs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The quickstart's synthetic clips, dialogues and small tokenizer (no shared data needed)."""
    root = tmp_path_factory.mktemp("sample")
    records, videos = quickstart.write_sample_data(root)
    quickstart.train_tokenizer(mm_train.load_records(records), root / "tokenizer")
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
    new_tokens = out.shape[1] - inputs["input_ids"].shape[1]
    print("RESULT", json.dumps({"module": type(model).__module__, "new_tokens": new_tokens, "keys": sorted(parsed)}))
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
    records = tmp_path / "mesc.jsonl"
    lines = (shared_data / "records" / "mesc_val_records.jsonl").read_text().splitlines()[:6]
    records.write_text("\n".join(lines) + "\n")
    data = {
        "records": records,
        "videos": shared_data / "media" / "video",
        "tokenizer": shared_data / "tokenizer" / "qwen2",
    }
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
    from peft import PeftModel  # noqa: PLC0415 - needs peft (the train extra)

    out = tmp_path / "lora"
    argv = _tiny_argv(sample_data, out, _vocab(sample_data), "--max_steps", "4", "--save_strategy", "no",
                      "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0")
    trainer, _ = mm_train.main(argv)
    assert isinstance(trainer.model, PeftModel)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and set(adapter["modules_to_save"]) >= {
        "mm_projector",
        "mm_projector_a",
        "mamba_compressor",
    }
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
    full, _ = mm_train.main(
        _tiny_argv(sample_data, tmp_path / "full", vocab, "--max_steps", "6", "--save_strategy", "no")
    )
    full_state = {k: v.detach().clone() for k, v in full.model.state_dict().items()}
    part = tmp_path / "part"
    mm_train.main(
        _tiny_argv(sample_data, part, vocab, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3")
    )
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
    import_or_skip("deepspeed", "train")
    out = tmp_path / "ds"
    argv = _tiny_argv(sample_data, out, _vocab(sample_data), "--max_steps", "3", "--save_strategy", "no",
                      "--deepspeed", str(RUN_SCRIPTS / "zero2.json"))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29561",
         str(RUN_SCRIPTS / "run_multimood.py"), *argv],
        capture_output=True, text=True, timeout=420, env=env, cwd=str(REPO_ROOT),
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    assert (out / "model.safetensors").exists() and (out / "processor_config.json").exists()


@pytest.mark.slow
def test_quickstart_learns_input_dependent_answers(tmp_path, capsys):
    """The default quickstart (about 2 minutes on 2 idle cores): its answers depend on the input (two sample
    turns get different client emotions, and the label probabilities differ), its responses are sentences, and
    it prints the held-out accuracy next to the majority-label baseline."""
    out = tmp_path / "quickstart"
    summary = quickstart.run(quickstart.build_parser().parse_args(["--output_dir", str(out)]))
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer_config.json"):
        assert (out / name).exists(), name
    assert summary["last_loss"] < summary["first_loss"]
    examples = summary["examples"]
    assert len({e["prediction"]["client_emotion"] for e in examples}) >= 2, examples
    scores = [e["label_scores"]["client_emotion"] for e in examples]
    spread = max(abs(a[label] - b[label]) for a in scores for b in scores for label in a)
    assert spread > 0.1, scores  # the probabilities move with the input, not only the argmax
    responses = [e["prediction"]["response"] for e in examples]
    assert all(len(r.split()) >= 3 for r in responses), responses  # replies, not a label word ("neutral")
    assert any(r.rstrip()[-1] in ".?!" for r in responses), responses  # at least one whole sentence
    report = summary["heldout_accuracy"]
    assert report["client_emotion"]["accuracy"] > report["client_emotion"]["majority_baseline"], report
    printed = capsys.readouterr().out
    assert "accuracy on the 32 held-out turns" in printed and "always 'neutral'" in printed
    for example in examples:
        assert example["client"][:40] in printed


# ----------------------------------------------------------------------------------------------
# Robustness: resume after SIGKILL, two ranks (DDP and ZeRO-3) on the CPU, real MESC records and clips
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mesc_mixed(shared_data, tmp_path_factory):
    """Eight real MESC records with the real clips; the last four are made text-only (no clips, no chat history,
    hence no video, audio or compressor input). A small BPE tokenizer trained on them keeps the LM head narrow: the
    real Qwen2 vocabulary (150k rows) makes these multi-process runs several times slower and is already covered by
    test_train_on_mesc_loss_decreases_and_reloads."""
    root = tmp_path_factory.mktemp("mesc_mixed")
    lines = (shared_data / "records" / "mesc_val_records.jsonl").read_text().splitlines()[:8]
    records = [json.loads(line) for line in lines]
    for record in records[4:]:
        record["path_to_vid_user_most_recent"] = []
        record["history_chat"] = []
        record.pop("history_chat_mamba", None)
    path = root / "mesc_mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    quickstart.train_tokenizer(records, root / "tokenizer")
    return {"records": path, "videos": shared_data / "media" / "video", "tokenizer": root / "tokenizer"}


def _mixed_argv(data: dict, output_dir, *extra: str) -> list[str]:
    return _tiny_argv(data, output_dir, _vocab(data), "--k_turn_history", "1", "--dataloader_num_workers", "0",
                      "--ddp_timeout", "180", *extra)


def _run_killing_group(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` in a new session; past `timeout` kill its whole process group (torchrun's ranks too) and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(REPO_ROOT), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no result after {timeout} s (hung?): {shlex.join(cmd[:6])} ...\n{err[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _safetensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def _global_step(folder) -> int:
    return json.loads((Path(folder) / "trainer_state.json").read_text())["global_step"]


def _logged_losses(folder) -> list[float]:
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _complete_checkpoint(folder: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint with a readable one is complete."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(mesc_mixed, tmp_path):
    """`run_multimood.py` killed with SIGKILL after its step-2 checkpoint, then resumed from that checkpoint, ends with
    the same global step and bit-identical weights as an uninterrupted run with the same seed (CPU, one process, the
    same thread count, no data workers: every operation is deterministic, so no tolerance is needed)."""
    script = str(RUN_SCRIPTS / "run_multimood.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    steps = ("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--seed", "1234")

    full = tmp_path / "full"
    done = _run_killing_group([sys.executable, script, *_mixed_argv(mesc_mixed, full, *steps)], 300, env)
    assert done.returncode == 0, done.stderr[-5000:]

    part = tmp_path / "part"
    log = tmp_path / "killed_run.log"  # a file, not a pipe: nobody reads the output while the run goes on
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, script, *_mixed_argv(mesc_mixed, part, *steps)], env=env,
                                cwd=str(REPO_ROOT), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint = part / "checkpoint-2"
    deadline = time.monotonic() + 240
    try:
        while not _complete_checkpoint(checkpoint) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        finished = proc.poll() is not None
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not finished, f"the run ended before it could be killed (rc {proc.returncode}): {log.read_text()[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert _complete_checkpoint(checkpoint), "no complete checkpoint-2 before the deadline"
    assert not (part / "model.safetensors").exists() and not (part / "checkpoint-6").exists()  # really interrupted

    resumed = _run_killing_group([sys.executable, script, *_mixed_argv(
        mesc_mixed, part, *steps, "--resume_from_checkpoint", str(checkpoint))], 300, env)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert _global_step(part) == _global_step(full) == 6
    expected, got = _safetensors(full), _safetensors(part)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert _logged_losses(part) == _logged_losses(full)


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    # run_multimood.py's main(), plus: which modalities each rank's batches have, and the trained model's logits
    # on a fixed batch (every rank runs that forward: under ZeRO-3 it gathers partitioned parameters collectively).
    import json, os, sys
    import torch
    from multimood.training import train as mm_train
    from multimood.model.processing_multimood import MultimoodDataCollator

    log_dir, argv = sys.argv[1], sys.argv[2:]
    rank = int(os.environ["RANK"])
    log = open(os.path.join(log_dir, f"batches_rank{rank}.jsonl"), "w")
    collate = MultimoodDataCollator.__call__

    def logged(self, records):
        batch = collate(self, records)
        seen = {"video": "pixel_values_videos" in batch, "history": "history_input_ids" in batch}
        log.write(json.dumps(seen) + "\\n")
        log.flush()
        return batch

    MultimoodDataCollator.__call__ = logged
    trainer, _ = mm_train.main(argv)
    _, data_args, _ = mm_train.parse_args(argv)
    records = [json.loads(line) for line in open(data_args.data_path)]
    probe = [records[0], records[-1]]  # one multimodal, one text-only
    batch = MultimoodDataCollator(trainer.processing_class, video_folder=data_args.vid_folder)(probe)
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    if rank == 0:
        torch.save({"batch": dict(batch), "logits": logits}, os.path.join(log_dir, "probe.pt"))
    print("RANK", rank, "DONE", trainer.state.global_step, flush=True)
    """
)


def _torchrun_two_ranks(data: dict, out: Path, log_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    script = log_dir / "run_logged.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    argv = _mixed_argv(data, out, "--per_device_train_batch_size", "1", "--max_steps", "4", "--save_strategy", "no",
                       "--seed", "3", *extra)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
        ),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(log_dir), *argv]
    return _run_killing_group(cmd, 420, env)


def _check_two_rank_run(proc, out: Path, log_dir: Path) -> None:
    """Both ranks finished; at some step one rank had a text-only batch while the other had video; ONE complete
    output folder that reloads with logits equal to the trained model's."""

    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    assert "RANK 0 DONE 4" in proc.stdout and "RANK 1 DONE 4" in proc.stdout
    seen = [
        [json.loads(line) for line in (log_dir / f"batches_rank{r}.jsonl").read_text().splitlines()][:4] for r in (0, 1)
    ]
    assert all(len(s) == 4 for s in seen), seen
    assert any(a["video"] != b["video"] for a, b in zip(*seen)), f"no step where the ranks' modalities differ: {seen}"
    assert _global_step(out) == 4
    losses = _logged_losses(out)
    # the Trainer logs a NaN step loss as the running mean (0.0 at the start): finite and positive means real losses
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses), losses
    names = {p.name for p in out.iterdir()}
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json",
                 "modeling_multimood.py", "processing_multimood.py", "trainer_state.json"):
        assert name in names, name
    assert not [n for n in names if n.startswith(("checkpoint-", "global_step", "model-0", "pytorch_model"))], names
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, log_dir.name])  # no second folder
    probe = torch.load(log_dir / "probe.pt", weights_only=True)
    model, info = MultimoodForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    state = _safetensors(out)
    assert state and all(v.numel() > 0 for v in state.values())
    reference = MultimoodForConditionalGeneration(model.config).state_dict()
    for name, value in model.state_dict().items():
        assert value.shape == reference[name].shape, name
    with torch.no_grad():
        logits = model.eval()(**probe["batch"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert processor.video_processor.num_frames == 4 and "num_frames" not in model.config.to_dict()


@pytest.mark.slow
def test_ddp_two_ranks_mixed_modalities(mesc_mixed, tmp_path):
    """torchrun, 2 ranks, gloo on the CPU, one record per rank and step, text-only and multimodal records mixed:
    no hang (ddp_find_unused_parameters=False: the unused blocks still get gradients), one complete folder."""
    out, logs = tmp_path / "ddp", tmp_path / "logs"
    proc = _torchrun_two_ranks(mesc_mixed, out, logs, "--ddp_find_unused_parameters", "False")
    _check_two_rank_run(proc, out, logs)


@pytest.mark.slow
def test_deepspeed_zero3_two_ranks_saves_full_weights(mesc_mixed, tmp_path):
    """ZeRO-3 (run_scripts/zero3.json, gather_16bit_weights_on_model_save) on 2 CPU ranks with mixed modalities:
    trains, saves full (unpartitioned) weights that reload with the trained model's logits."""
    import_or_skip("deepspeed", "train")
    out, logs = tmp_path / "zero3", tmp_path / "logs"
    proc = _torchrun_two_ranks(mesc_mixed, out, logs, "--deepspeed", str(RUN_SCRIPTS / "zero3.json"))
    _check_two_rank_run(proc, out, logs)
