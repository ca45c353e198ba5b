"""Hub release: the exact upload folder of a tiny model loads in a process that never imported `multimood`
(Auto classes and the "emotional-support" pipeline), the card's metadata parses with `huggingface_hub`
(model-index from a `multimood evaluate` JSON), and pushing without a network fails fast with a clear message.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from huggingface_hub import ModelCard, constants, metadata_load

from multimood import MultimoodConfig, MultimoodForConditionalGeneration, MultimoodProcessor
from multimood.checkpoints.assembly import build_processor, fit_processor_to_model
from multimood.checkpoints.hub import (
    DEFAULT_LICENSE,
    check_upload_folder,
    find_template,
    prepare_upload_folder,
    push_main,
    push_to_hub,
    render_model_card,
    training_hyperparameters,
)
from multimood.model.pipeline_multimood import CUSTOM_PIPELINES, EmotionalSupportPipeline
from tests.model_utils import TINY_NUM_FRAMES, run_in_clean_process, tiny_config

REPO_ID = "someone/multimood-tiny"
MAX_NEW = 24
QUERY = {"utterance": "I haven't slept properly since the accident.", "history": ["Client: hi", "Therapist: hello"],
         "situation": "car accident", "problem_type": "sleep"}
# A `multimood evaluate` output (abridged: every section key the card reads, plus ones it must skip).
METRICS = {
    "paper": {
        "client_emotion_accuracy": 0.51, "client_emotion_precision": 0.4, "client_emotion_f1": 0.47,
        "therapist_emotion_accuracy": 0.62, "therapist_emotion_f1": 0.58, "strategy_accuracy": 0.33,
        "strategy_f1": 0.29, "bleu2": 0.12, "rouge1": 0.25, "rouge2": 0.07, "rougeL": 0.21, "meteor": 0.19,
        "bertscore_f1": None, "parse_rate": 0.98, "n": 40, "n_scored": {"response": 39}, "n_dropped": {"response": 1},
    },
    "strict": {
        "client_emotion_accuracy": 0.5, "client_emotion_f1": 0.31, "therapist_emotion_accuracy": 0.6,
        "therapist_emotion_f1": 0.4, "strategy_accuracy": 0.32, "strategy_f1": 0.2, "bleu1": 0.2, "bleu2": 0.08,
        "bleu4": 0.01, "rougeL": 0.2, "meteor": 0.18, "distinct1": 0.3, "distinct2": 0.6, "parse_rate": 0.98,
        "n": 40, "n_reference_unparseable": 0, "bleu_signature": "nrefs:1|case:mixed",
    },
    "provenance": {"tokenizer": {"name": "treebank"}},
    "notes": ["a note"],
}
TRAINING_ARGS = {
    "output_dir": "out", "learning_rate": 2e-5, "lr_scheduler_type": "cosine", "warmup_steps": 0.03,
    "num_train_epochs": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 8, "weight_decay": 0.0,
    "max_grad_norm": 1.0, "bf16": True, "seed": 42, "model_max_length": 2048, "lora_enable": False, "lora_r": 64,
    "logging_dir": "out/runs", "report_to": ["tensorboard"], "deepspeed": {"zero_optimization": {"stage": 3}},
    "world_size": 1,
}


@pytest.fixture(scope="module")
def built(shared_data, tmp_path_factory):
    """(model, processor, upload folder) of a tiny random model with the real Qwen2 tokenizer."""
    torch.manual_seed(0)
    config = tiny_config()
    model = MultimoodForConditionalGeneration(config).eval()
    media = {"num_frames": TINY_NUM_FRAMES, "audio_num_windows": 2, "audio_max_seconds": 4.0, "num_k_vid": 2}
    processor = build_processor(shared_data / "tokenizer" / "qwen2", media, k_turn_history=2)
    fit_processor_to_model(processor, config)  # the frames and <video> count of the tiny vision tower
    metrics_file = tmp_path_factory.mktemp("metrics") / "metrics.json"
    metrics_file.write_text(json.dumps(METRICS))
    folder = tmp_path_factory.mktemp("hub") / "upload"
    prepare_upload_folder(model, processor, folder, eval_results=metrics_file, training_args=TRAINING_ARGS,
                          repo_id=REPO_ID)
    return model, processor, folder


def test_upload_folder_contents(built):
    folder = built[2]
    names = {p.name for p in folder.iterdir()}
    expected = {
        "README.md", "config.json", "generation_config.json", "model.safetensors", "configuration_multimood.py",
        "modeling_multimood.py", "modeling_beats.py", "processing_multimood.py", "video_processing_multimood.py",
        "feature_extraction_multimood.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja",
    }
    assert expected <= names, expected - names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_multimood.MultimoodForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_multimood.MultimoodConfig"
    assert "pipeline_multimood.py" in names and config["custom_pipelines"] == CUSTOM_PIPELINES
    assert check_upload_folder(folder) == []


CLEAN_LOAD = textwrap.dedent(
    """
    import json, sys
    sys.modules["multimood"] = None  # only the uploaded remote code may be used
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
    folder, query, max_new, with_pipeline = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    for part in (config, model, processor, processor.video_processor, processor.feature_extractor):
        assert type(part).__module__.startswith("transformers_modules"), type(part).__module__
    ids = processor.tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    result = {"logits_sum": float(logits.double().sum()), "vocab": logits.shape[-1]}
    if with_pipeline:
        from transformers import pipeline
        pipe = pipeline("emotional-support", model=folder, trust_remote_code=True)
        assert type(pipe).__module__.startswith("transformers_modules"), type(pipe).__module__
        result["answer"] = pipe(query, max_new_tokens=max_new)
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.slow
def test_upload_folder_loads_in_a_clean_process(built, tmp_path):
    model, processor, folder = built
    with_pipeline = EmotionalSupportPipeline is not None
    result = run_in_clean_process(CLEAN_LOAD, folder, json.dumps(QUERY), MAX_NEW, "1" if with_pipeline else "0",
                                  cwd=tmp_path)
    ids = processor.tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert result["vocab"] == expected.shape[-1]
    assert result["logits_sum"] == pytest.approx(float(expected.double().sum()), rel=1e-6, abs=1e-3)
    if with_pipeline:
        pipe = EmotionalSupportPipeline(model=model, processor=processor, device="cpu")
        assert result["answer"] == pipe(QUERY, max_new_tokens=MAX_NEW)


def test_card_metadata_parses(built):
    folder = built[2]
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.license == DEFAULT_LICENSE and data.language == "en" and data.library_name == "transformers"
    assert data.pipeline_tag == "video-text-to-text"
    assert {"custom_code", "multimodal", "emotional-support", "video", "audio"} <= set(data.tags)
    assert data.datasets == ["MESC"] and data.model_name == "multimood-tiny"
    assert data.base_model is None  # a random tiny model has no base
    results = {(r.metric_name, r.metric_config): r for r in data.eval_results}
    assert results[("Client emotion accuracy (paper)", "paper")].metric_value == 0.51
    assert results[("Strategy F1 (strict)", "strict")].metric_value == 0.2
    assert results[("BLEU-2 (paper)", "paper")].metric_type == "bleu"
    assert results[("ROUGE-L (strict)", "strict")].dataset_name == "MESC"
    assert ("BERTScore F1 (paper)", "paper") not in results  # None values are left out
    assert all(r.task_type == "text-generation" and r.dataset_split == "test" for r in data.eval_results)
    meta = metadata_load(folder / "README.md")
    assert meta["model-index"][0]["name"] == "multimood-tiny" and len(meta["model-index"][0]["results"]) == 1
    text = card.text
    for needle in (
        "| learning_rate | 2e-05 |",
        "| total_train_batch_size | 16 |",
        "| deepspeed | ZeRO-3 |",
        "| client_emotion_accuracy | 0.5100 | 0.5000 |",
        "non-commercial",
        "Risks of emotional-support",
        "Intended use and limitations",
        f'model="{REPO_ID}"',
        "988",
        "stc_connector_v35 (4 frames → 8 tokens)",
    ):
        assert needle in text, needle
    assert "lora_r" not in text and "logging_dir" not in text


def test_card_base_models_and_template(tmp_path, shared_data):
    """Sub-config names that are Hub ids, the published sizes, and explicit overrides become `base_model`."""
    config = tiny_config()
    config.text_config._name_or_path = "Qwen/Qwen2-0.5B-Instruct"
    config.vision_config._name_or_path = "/local/siglip"  # a local path is not a Hub id
    card = render_model_card(config, base_model={"audio": "someone/beats-iter3"}, license="apache-2.0")
    assert card.data.base_model == ["Qwen/Qwen2-0.5B-Instruct", "someone/beats-iter3"]
    assert card.data.license == "apache-2.0" and card.data.eval_results is None
    assert "No evaluation results" in card.text

    published = MultimoodConfig()  # the published sizes: Qwen2-1.5B-Instruct, SigLIP so400m, mamba-370m
    card = render_model_card(
        published, processor=MultimoodProcessor.from_tokenizer(shared_data / "tokenizer" / "qwen2")
    )
    assert card.data.base_model == [
        "Qwen/Qwen2-1.5B-Instruct",
        "google/siglip-so400m-patch14-384",
        "state-spaces/mamba-370m-hf",
    ]
    assert "1352 tokens" in card.text and "1496 tokens" in card.text
    assert find_template().name == "model_card.md"
    custom = tmp_path / "card.md"
    custom.write_text("---\n{{ card_data }}\n---\n# {{ model_name }} custom\n")
    assert render_model_card(config, template_path=custom, model_name="X").text.strip() == "# X custom"


def test_training_hyperparameters_selection():
    shown = training_hyperparameters(TRAINING_ARGS)
    assert shown["learning_rate"] == 2e-5 and shown["total_train_batch_size"] == 16 and shown["deepspeed"] == "ZeRO-3"
    assert "lora_r" not in shown and "output_dir" not in shown and "report_to" not in shown
    assert training_hyperparameters({"learning_rate": 1e-4, "note": "x"}) == {"learning_rate": 1e-4, "note": "x"}


def test_dry_run_from_a_saved_folder(built, tmp_path, capsys):
    """`multimood push --dry-run` builds the same folder from a training output, leaving the junk out."""
    model, processor, upload = built
    saved = tmp_path / "trained"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    (saved / "training_args.bin").write_bytes(b"pickle")
    (saved / "checkpoint-10").mkdir()
    (saved / "trainer_state.json").write_text(json.dumps(
        {"global_step": 10, "epoch": 1.0, "log_history": [{"loss": 2.0}, {"train_loss": 1.5}]}))
    (tmp_path / "args.json").write_text(json.dumps(TRAINING_ARGS))
    out = tmp_path / "dry"
    code = push_main(["--model", str(saved), "--repo-id", REPO_ID, "--dry-run", str(out),
                      "--training-args", str(tmp_path / "args.json"), "--base-model", "text=Qwen/Qwen2-7B-Instruct"])
    assert code == 0
    assert "dry run" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {p.name for p in upload.iterdir()}
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "Qwen/Qwen2-7B-Instruct"
    assert "10 optimizer steps" in card.text and "final training loss 1.5000" in card.text
    assert (out / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()
    assert check_upload_folder(out) == []
    (out / "modeling_beats.py").unlink()
    assert check_upload_folder(out) == ["remote code modeling_beats.py is missing"]


# ----------------------------------------------------------------------------------------------
# Pushing without a network
# ----------------------------------------------------------------------------------------------

PUSH = "import sys; from multimood.checkpoints.hub import push_main; sys.exit(push_main(sys.argv[1:]))"


def _push_in_subprocess(folder, env_update: dict, *extra) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_update, TOKENIZERS_PARALLELISM="false")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PUSH, "--model", str(folder), "--repo-id", REPO_ID, *extra],
                          capture_output=True, text=True, env=env, timeout=120)
    return proc, time.monotonic() - start


def _push_seconds(stderr: str) -> float:
    return float(stderr.rsplit("(after ", 1)[1].split(" s)")[0])


@pytest.mark.parametrize(
    "env_update, needle",
    [({"HF_HUB_OFFLINE": "1"}, "offline mode is on"), ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "did not answer")],
    ids=["offline", "unreachable"],
)
def test_push_fails_fast_without_network(built, env_update, needle):
    proc, elapsed = _push_in_subprocess(built[2], env_update)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert REPO_ID in proc.stderr and needle in proc.stderr, proc.stderr[-2000:]
    assert _push_seconds(proc.stderr) < 3  # the push itself; the rest is Python and torch starting
    assert elapsed < 60


def _online(monkeypatch) -> None:
    """Offline mode off for this test, whatever the session's environment says."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_push_times_out_on_a_silent_server(built, monkeypatch):
    """A host that accepts connections and never answers: the probe gives up after `timeout` seconds."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    _online(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"someone/multimood-tiny.*did not answer within 1 s"):
        push_to_hub(built[2], REPO_ID, timeout=1)
    assert time.monotonic() - start < 5
    server.close()


def test_push_reports_hub_errors(built, monkeypatch):
    """A Hub that answers with errors: the RuntimeError names the repo and carries the Hub's message."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_HEAD = do_PUT = _answer

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _online(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        with pytest.raises(RuntimeError, match=r"someone/multimood-tiny.*401.*hf auth login"):
            push_to_hub(built[2], REPO_ID, token="hf_not_a_token", timeout=5)
    finally:
        server.shutdown()


def test_push_refuses_an_incomplete_folder(built, tmp_path):
    with pytest.raises(RuntimeError, match="refusing to push"):
        push_to_hub(tmp_path, REPO_ID)
