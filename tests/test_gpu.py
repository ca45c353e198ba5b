"""The GPU path: bf16 training, attention implementations, the mamba-ssm kernels, device_map loading, and
`bench/gpu_check.sh`.

Each model check takes a `device`: its CUDA variant is marked `gpu` (`bench/gpu_check.sh` runs
`pytest -m gpu`) and skips without CUDA; its CPU variant runs the same body here as a smoke check.
On the CPU, oneDNN is switched off for bf16 (it computes some small grouped convolutions wrongly on
AMX-BF16 machines), so the float32 oracle is compared with PyTorch's own bf16 kernels.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multimood import MultimoodConfig, MultimoodForConditionalGeneration
from tests.model_utils import multimodal_batch, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
NO_CUDA = "CUDA is not available"
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]),
]
CUDA_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]
LAYOUT = [
    {"text": 14, "video": True, "audio": True, "history": 3},
    {"text": 9, "video": True, "audio": False, "history": 0},
    {"text": 7, "video": False, "audio": False, "history": 2},
]

# bf16 against float32 (bf16 keeps 8 significant bits, about 2-3 decimal digits): the loss within 2 %,
# the whole gradient within 5 % in L2 norm (cosine above 0.995), logits within 3 % of their largest value.
BF16_LOSS_RTOL = 2e-2
BF16_GRAD_RTOL = 5e-2
BF16_LOGITS_TOL = 3e-2


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in the float32 oracles; oneDNN off on the CPU (see the module doc)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.mkldnn.enabled)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.mkldnn.enabled = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.mkldnn.enabled = saved


def build(device: str, seed: int = 0, **config_overrides) -> MultimoodForConditionalGeneration:
    torch.manual_seed(seed)
    return MultimoodForConditionalGeneration(tiny_config(**config_overrides)).to(device)


def labelled_batch(config, device: str, padding_side: str = "right") -> dict:
    batch = multimodal_batch(config, LAYOUT, padding_side=padding_side)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, : labels.shape[1] // 2] = -100
    batch["labels"] = labels
    return {k: v.to(device) for k, v in batch.items()}


def loss_and_gradients(model, batch, autocast_dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
    """The loss and the gradient of every trainable parameter as one float32 vector."""
    model.zero_grad(set_to_none=True)
    device = batch["input_ids"].device.type
    context = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with context:
        loss = model(**batch).loss
    loss.backward()
    grads = [p.grad.float().flatten() for p in model.parameters() if p.requires_grad and p.grad is not None]
    return float(loss.detach()), torch.cat(grads)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_step_matches_float32(device):
    """Autocast bf16 (the Trainer's `--bf16`) gives the float32 loss and gradient within the stated tolerance,
    and one AdamW step moves the weights the same way."""
    model = build(device).train()
    batch = labelled_batch(model.config, device)
    loss32, grad32 = loss_and_gradients(model, batch, None)
    loss16, grad16 = loss_and_gradients(model, batch, torch.bfloat16)
    assert abs(loss16 - loss32) <= BF16_LOSS_RTOL * abs(loss32), (loss16, loss32)
    error = float((grad16 - grad32).norm() / grad32.norm())
    assert error <= BF16_GRAD_RTOL, f"bf16 gradient differs from float32 by {error:.3%} (L2)"
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) >= 0.995

    # bf16 weights (DeepSpeed's bf16, inference in bf16): the loss only, same tolerance
    with torch.no_grad():
        loss_bf16_weights = float(model.to(torch.bfloat16)(**batch).loss)
    assert abs(loss_bf16_weights - loss32) <= BF16_LOSS_RTOL * abs(loss32), (loss_bf16_weights, loss32)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


def _assert_logits_close(
    actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, what: str
):
    actual, expected = actual[mask], expected[mask]
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg=what)
    else:
        error = float((actual - expected).abs().max() / expected.abs().max())
        assert error <= BF16_LOGITS_TOL, f"{what}: largest difference {error:.2%} of the largest logit"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_matches_eager(device, dtype):
    """SDPA (the default; flash / memory-efficient kernels on CUDA) against the eager attention, on a padded batch."""
    model = build(device).to(dtype).eval()
    batch = labelled_batch(model.config, device, padding_side="left")
    model.set_attn_implementation("eager")
    eager = _logits(model, batch)
    model.set_attn_implementation("sdpa")
    sdpa = _logits(model, batch)
    _assert_logits_close(sdpa, eager, batch["attention_mask"].bool(), dtype, "sdpa vs eager")


def _importable(package: str) -> str | None:
    """None when `package` imports, else why not (flash-attn and mamba-ssm builds can fail at import)."""
    try:
        importlib.import_module(package)
    except Exception as error:  # noqa: BLE001 - a broken build raises anything
        return f"{package} does not import ({type(error).__name__}: {str(error)[:120]})"
    return None


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_flash_attention_2_matches_sdpa(padding_side):
    """`flash_attention_2` (varlen kernels on a padded batch) against SDPA, both in bf16."""
    reason = _importable("flash_attn")
    if reason:
        pytest.skip(reason)
    model = build("cuda").to(torch.bfloat16).eval()
    batch = labelled_batch(model.config, "cuda", padding_side=padding_side)
    sdpa = _logits(model, batch)
    model.set_attn_implementation("flash_attention_2")
    assert model.model.language_model.config._attn_implementation == "flash_attention_2"
    flash = _logits(model, batch)
    _assert_logits_close(flash, sdpa, batch["attention_mask"].bool(), torch.bfloat16, "flash_attention_2 vs sdpa")


# The hub-kernel functions of transformers' Mamba modules: the mamba-ssm / causal-conv1d implementation when
# those packages import, else the pure-torch one, which stays reachable as `__wrapped__`.
MAMBA_KERNELS = {
    "mamba": ("causal_conv1d_update", "causal_conv1d_fn", "mamba_inner_fn", "mamba_selective_state_update",
              "mamba_selective_scan"),
    "mamba2": ("causal_conv1d_update", "causal_conv1d_fn", "mamba2_split_conv1d_scan_combined",
               "mamba2_selective_state_update", "mamba2_chunk_scan"),
}


@contextlib.contextmanager
def pure_torch_mamba(kind: str):
    """Swap transformers' Mamba kernel functions for their pure-torch reference while inside."""
    module = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    saved = {}
    for name in MAMBA_KERNELS[kind]:
        function = getattr(module, name, None)
        if function is not None and hasattr(function, "__wrapped__"):
            saved[name] = function
            setattr(module, name, function.__wrapped__)
    try:
        yield len(saved)
    finally:
        for name, function in saved.items():
            setattr(module, name, function)


def _compressor_output(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory tokens of the history, and the compressor's gradient for their sum of squares."""
    model.zero_grad(set_to_none=True)
    memory, _ = model.get_history_features(batch["history_input_ids"], batch["history_attention_mask"])
    memory.pow(2).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.model.mamba_compressor.parameters() if p.grad is not None])
    return memory.detach(), grads


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("device", DEVICES)
def test_mamba_kernels_match_pure_torch(device, kind):
    """The history compressor with the mamba-ssm / causal-conv1d kernels (where they import) against the
    pure-torch reference, forward and backward, in float32. On the CPU both sides run the reference."""
    if device == "cuda":
        for package in ("mamba_ssm", "causal_conv1d"):
            reason = _importable(package)
            if reason:
                pytest.skip(reason)
    model = build(device, compressor=kind).train()
    batch = labelled_batch(model.config, device)
    fast_memory, fast_grads = _compressor_output(model, batch)
    with pure_torch_mamba(kind) as swapped:
        assert swapped >= 2, f"transformers' {kind} module no longer exposes its kernel functions"
        torch_memory, torch_grads = _compressor_output(model, batch)
    torch.testing.assert_close(fast_memory, torch_memory, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(fast_grads, torch_grads, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_device_map_loading_generates_like_the_cpu_model(device, tmp_path):
    """A saved folder loaded with `device_map` answers greedily like the float32 model on the CPU."""
    model = build("cpu").eval()
    model.save_pretrained(tmp_path)
    batch = multimodal_batch(model.config, LAYOUT, padding_side="left")
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 151643}
    expected = model.generate(**batch, **kwargs)
    loaded = MultimoodForConditionalGeneration.from_pretrained(tmp_path, device_map=device, dtype=torch.float32)
    assert {p.device.type for p in loaded.parameters()} == {device}
    got = loaded.generate(**{k: v.to(device) for k, v in batch.items()}, **kwargs)
    assert torch.equal(got.cpu(), expected)


# ----------------------------------------------------------------------------------------------
# bench/gpu_check.py on the CPU
# ----------------------------------------------------------------------------------------------


def test_published_model_and_real_shaped_batch_on_meta_device():
    """The benchmark's inputs fit `MultimoodConfig()`: placeholder counts, media features and the LLM's
    output shapes, on the meta device (no memory, no compute)."""
    gpu_check = _gpu_check()
    config = MultimoodConfig()
    batch = gpu_check.real_shaped_batch(config, 2, 2048, "cpu")
    ids = batch["input_ids"]
    # hand counts: 16 frames of 27x27 patches merged 2x2x2 -> 8*13*13; 2998 fbank frames -> 187*8 patches
    assert (ids == config.video_token_id).sum(1).tolist() == [8 * 13 * 13] * 2
    assert (ids == config.audio_token_id).sum(1).tolist() == [187 * 8] * 2
    assert (ids == config.history_token_id).sum(1).tolist() == [8, 8]
    assert ids.shape == (2, 2048 + 1352 + 1496 + 8)
    assert (batch["history_input_ids"] == config.mem_token_id).sum(1).tolist() == [8, 8]
    assert (batch["labels"] != -100).sum(1).tolist() == [gpu_check.TARGET_TOKENS] * 2
    with torch.device("meta"):
        model = MultimoodForConditionalGeneration(config)
        video = model.get_video_features(batch["pixel_values_videos"].to("meta"))
        audio = model.get_audio_features(batch["input_features"].to("meta"))
        # the compressor body only: picking the <MEM> positions out is data-dependent
        history = model.model.mamba_compressor.mamba(input_ids=batch["history_input_ids"].to("meta")).last_hidden_state
        memory = model.model.mamba_compressor.memory_projection(history[:, -1])
        hidden = model.model.language_model(inputs_embeds=torch.empty(2, ids.shape[1], 1536)).last_hidden_state
        logits = model.lm_head(hidden)
    for token_id, features, name in ((config.video_token_id, video, "video"), (config.audio_token_id, audio, "audio")):
        model.model.get_placeholder_mask(ids, token_id, [features.shape[1]] * 2, name)
    assert video.shape == (2, 1352, 1536) and audio.shape == (2, 1496, 1536) and memory.shape[-1] == 1536
    assert logits.shape == (2, ids.shape[1], 151936)


def test_flop_count_is_model_flops():
    """`count_flops` against hand counts: a trained Linear costs 6 * in * out per row (forward, input and
    weight gradients); a frozen one fed by a frozen input costs only its forward, 2 * in * out."""
    gpu_check = _gpu_check()
    rows, width_in, width_out = 4, 32, 16
    trained = torch.nn.Linear(width_in, width_out, bias=False)
    frozen = torch.nn.Linear(width_in, width_in, bias=False).requires_grad_(False)
    x = torch.randn(rows, width_in)
    assert gpu_check.count_flops(lambda: trained(x).sum().backward()) == 2 * rows * width_in * width_out * 2
    assert gpu_check.count_flops(lambda: trained(frozen(x)).sum().backward()) == (
        2 * rows * width_in * width_in + 2 * rows * width_in * width_out * 2)
    hidden = torch.randn(rows, width_in, requires_grad=True)
    assert gpu_check.count_flops(lambda: trained(hidden).sum().backward()) == 6 * rows * width_in * width_out


def test_peak_table_reads_device_names():
    """Dense bf16 datasheet peaks, by the names `torch.cuda.get_device_name()` gives."""
    peak = _gpu_check().peak_bf16_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989.4  # SXM
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA H200") == 989.4
    assert peak("NVIDIA H200 NVL") == 835.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak("NVIDIA GeForce GTX 1080") is None


@pytest.mark.skipif(CUDA, reason="checks the CPU-only run")
def test_gpu_check_on_cpu_lists_its_skips(tmp_path):
    """`bench/gpu_check.sh` without CUDA: exits 0, names every skipped part with its reason, writes the JSON."""
    out = tmp_path / "check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    rows = summary["rows"]
    assert {r["part"] for r in rows} == {"tests", "train", "generate"}
    assert all(r["status"] == "skipped" for r in rows), rows
    tests = [r for r in rows if r["part"] == "tests"]
    assert len(tests) >= 6 and all(NO_CUDA in r["detail"] for r in tests), tests
    assert [r["name"] for r in rows if r["part"] == "generate"] == ["batch 1", "batch 8"]
    for row in rows:
        assert row["name"] in proc.stdout and "skipped" in proc.stdout
    assert summary["table"] in proc.stdout


def test_benchmark_code_runs_on_a_tiny_model_on_cpu():
    """The training and generation benchmarks' code on a tiny config on the CPU (a smoke check of what
    `bench/gpu_check.sh` runs at full size on CUDA): figures are consistent with the inputs. No value is
    compared here, so oneDNN stays on (without it the CPU's convolution backward takes ten times longer)."""
    torch.backends.mkldnn.enabled = True  # `exact_float32` restores the setting afterwards
    gpu_check = _gpu_check()
    model = build("cpu")
    args = gpu_check.build_parser().parse_args(["--batch_size", "2", "--text_tokens", "160", "--steps", "1",
                                                "--new_tokens", "3", "--num_frames", "4", "--audio_seconds", "4"])
    train = gpu_check.training_benchmark(model, args, torch.device("cpu"))
    figures = train.figures
    assert train.status == "ok" and figures["sequence_tokens"] == 160 + 8 + 24 * 8 + 8
    assert figures["tokens_per_second"] == pytest.approx(2 * figures["sequence_tokens"] / figures["step_seconds"])
    assert figures["model_tflop_per_step"] > figures["llm_6nt_tflop_per_step"] > 0  # towers and connector on top
    assert figures["mfu"] is None and figures["peak_memory_gib"] is None
    generate = gpu_check.generation_benchmark(model.to(torch.bfloat16).eval(), 2, args, torch.device("cpu"))
    assert generate.status == "ok" and generate.figures["new_tokens"] == 3
