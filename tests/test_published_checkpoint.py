"""The converter's oracle: a tiny checkpoint built, saved and run by the PUBLISHED classes.

`golden/published/tiny_published_checkpoint/` holds a `Videollama2Qwen2ForCausalLM` of the published code (random
weights, `pytorch_model.bin` + `config.json` as the published training saves them), the inputs it was called with
and its float32 logits. `multimood convert` on that folder, then our model on the same inputs (each published
sentinel replaced by our placeholder block), must give the same logits. The folder must also carry the published
profile (prompt style, audio window rule, no memory injection, BEATs layer drop, the published decoding), and
`multimood predict` on it with no flags must feed the model the published eval prompts and decode as published.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multimood import MultimoodForConditionalGeneration, MultimoodProcessor
from multimood.checkpoints.convert_videollama2_to_multimood import REPORT_NAME, convert, main
from multimood.evaluation.predict import predict_main
from tests.test_prompt_styles import _expected

GOLDEN = "golden/published/tiny_published_checkpoint"
VIDEO_SENTINEL, HISTORY_SENTINEL = -201, -203  # the published code's placeholders
PUBLISHED_VOCAB, PUBLISHED_MEM_ID = 64, 63
TOLERANCE = 1e-4  # float32; measured 3e-7


@pytest.fixture(scope="module")
def golden(shared_data: Path) -> Path:
    return shared_data / GOLDEN


@pytest.fixture(scope="module")
def converted(tmp_path_factory, golden: Path, shared_data: Path) -> Path:
    """The folder `multimood convert` writes, with the command line of the golden's README (no profile flags)."""
    out = tmp_path_factory.mktemp("published") / "converted"
    code = main([str(golden), str(out), "--tokenizer", str(shared_data / "tokenizer" / "qwen2"),
                 "--vision_tower", str(golden / "siglip_tiny")])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def model(converted: Path) -> MultimoodForConditionalGeneration:
    """The converted model as `from_pretrained` gives it (its saved profile: no memory injection)."""
    return MultimoodForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def inputs(golden: Path) -> dict[str, torch.Tensor]:
    return load_file(str(golden / "inputs.safetensors"))


@pytest.fixture(scope="module")
def expected(golden: Path) -> dict[str, torch.Tensor]:
    return load_file(str(golden / "expected_logits.safetensors"))


def expand(input_ids: torch.Tensor, blocks: dict[int, list[int]]) -> torch.Tensor:
    """Replace each published sentinel by our placeholder block (one row)."""
    row: list[int] = []
    for token in input_ids[0].tolist():
        row += blocks.get(token, [token])
    return torch.tensor([row])


def published_max_diff(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Max |difference| over the published vocabulary (the converted one adds our special tokens after it)."""
    assert logits.shape[:2] == reference.shape[:2]
    return (logits[..., :PUBLISHED_VOCAB] - reference).abs().max().item()


def test_converted_logits_equal_the_published_forward(model, inputs, expected):
    """Main case: what the published inference does for `--modal-type av` (8 video + 1496 audio tokens at -201)."""
    config = model.config
    video = [config.video_token_id] * config.num_video_tokens(4, 56, 56)
    audio = [config.audio_token_id] * config.num_audio_tokens(inputs["fbank"].shape[1])
    assert (len(video), len(audio)) == (8, 1496)
    input_ids = expand(inputs["input_ids"], {VIDEO_SENTINEL: video + audio})  # video first, as published
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values_videos=inputs["pixel_values"][None],
            input_features=inputs["fbank"],
        ).logits
    assert published_max_diff(logits, expected["logits"]) <= TOLERANCE
    # the inputs matter: without the audio the logits move far past the tolerance
    with torch.no_grad():
        silent = model(input_ids=input_ids, pixel_values_videos=inputs["pixel_values"][None],
                       input_features=torch.zeros_like(inputs["fbank"])).logits
    assert published_max_diff(silent, expected["logits"]) > 100 * TOLERANCE


def test_converted_history_case_with_memory_injection(converted: Path, inputs, expected):
    """The published model injects the compressor's memory at a -203 sentinel (its own prompts never hold one):
    with `inject_history_memory=True` the converted model does the same."""
    model = MultimoodForConditionalGeneration.from_pretrained(
        converted, dtype=torch.float32, inject_history_memory=True
    ).eval()
    config = model.config
    history_ids = inputs["history_case_history_input_ids"].clone()
    memory_slots = int((history_ids == PUBLISHED_MEM_ID).sum())
    history_ids[history_ids == PUBLISHED_MEM_ID] = config.mem_token_id
    input_ids = expand(inputs["history_case_input_ids"], {
        HISTORY_SENTINEL: [config.history_token_id] * memory_slots,
        VIDEO_SENTINEL: [config.video_token_id] * config.num_video_tokens(4, 56, 56),
    })
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values_videos=inputs["pixel_values"][None],
            history_input_ids=history_ids,
        ).logits
    assert published_max_diff(logits, expected["history_case_logits"]) <= TOLERANCE


def test_converted_folder_carries_the_published_profile(converted: Path, model):
    processor_config = json.loads((converted / "processor_config.json").read_text(encoding="utf-8"))
    assert processor_config["prompt_style"] == "published-eval"
    assert processor_config["feature_extractor"]["audio_window_rule"] == "pytorchvideo-0.1.5"
    config = json.loads((converted / "config.json").read_text(encoding="utf-8"))
    assert config["inject_history_memory"] is False
    assert config["audio_config"]["encoder_layerdrop"] == 0.05
    assert config["video_frame_pooling"] == "none"  # stc_connector_v35: the published code pools nothing
    report = json.loads((converted / REPORT_NAME).read_text(encoding="utf-8"))
    assert report["profile"]["processor.prompt_style"] == "published-eval"

    # memory injection off: history inputs are ignored (as the published model drops its memory) ...
    assert model.config.inject_history_memory is False
    ids = torch.tensor([[5, 6, 7, 8]])
    history = torch.tensor([[5, 6, model.config.mem_token_id]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with_history = model(input_ids=ids, history_input_ids=history).logits
    assert torch.equal(plain, with_history)
    # ... and a prompt that holds <history> placeholders is an error that names the setting
    with pytest.raises(ValueError, match="inject_history_memory"):
        model(input_ids=torch.tensor([[5, model.config.history_token_id, 7]]), history_input_ids=history)


def test_prompt_style_option_overrides_the_profile(golden: Path, shared_data: Path, tmp_path: Path):
    tokenizer = shared_data / "tokenizer" / "qwen2"
    report = convert(golden, tmp_path / "ours", tokenizer=tokenizer, vision_tower=golden / "siglip_tiny",
                     prompt_style="multimood")
    processor_config = json.loads((tmp_path / "ours" / "processor_config.json").read_text(encoding="utf-8"))
    config = json.loads((tmp_path / "ours" / "config.json").read_text(encoding="utf-8"))
    assert processor_config["prompt_style"] == "multimood" and config["inject_history_memory"] is True
    assert report.profile["processor.prompt_style"] == "multimood"
    status = main([str(golden), str(tmp_path / "bad"), "--tokenizer", str(tokenizer), "--prompt_style", "ours"])
    assert status == 2 and not (tmp_path / "bad").exists()  # argparse: usage line and exit status 2


class PrefillRecorder:
    """Records, for every `generate` of the real model, the prompt ids of its first forward and the number of
    forwards (one per generated token), through a global forward hook: predict builds its own model."""

    def __init__(self):
        self.prompts: list[list[int]] = []
        self.steps: list[int] = []
        self.dtypes: set[torch.dtype] = set()

    def __call__(self, module, args, kwargs, output):
        if type(module).__name__ != "MultimoodForConditionalGeneration" or kwargs.get("input_ids") is None:
            return
        if kwargs.get("pixel_values_videos") is not None:  # media are read at prefill only
            assert kwargs["input_ids"].shape[0] == 1
            self.prompts.append(kwargs["input_ids"][0].tolist())
            self.steps.append(0)
            self.dtypes.add(module.dtype)
        self.steps[-1] += 1


def run_predict(argv: list[str]) -> tuple[PrefillRecorder, list[dict]]:
    recorder = PrefillRecorder()
    handle = torch.nn.modules.module.register_module_forward_hook(recorder, with_kwargs=True)
    try:
        assert predict_main(argv) == 0
    finally:
        handle.remove()
    output = Path(argv[argv.index("--output") + 1])
    return recorder, [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def eval_rows(golden: Path) -> list[dict]:
    with open(golden.parent / "prompts_eval.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line, _ in zip(handle, range(2))]


@pytest.fixture(scope="module")
def eval_records(tmp_path_factory, shared_data: Path, eval_rows: list[dict]) -> Path:
    """The golden eval rows' records, as a records file for `multimood predict`."""
    with open(shared_data / "records" / "mesc_val_records.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    path = tmp_path_factory.mktemp("predict") / "records.jsonl"
    path.write_text("".join(json.dumps(records[row["index"]]) + "\n" for row in eval_rows), encoding="utf-8")
    return path


def test_convert_then_predict_is_the_published_evaluation(
    converted: Path, shared_data: Path, eval_rows: list[dict], eval_records: Path, tmp_path: Path
):
    """convert -> predict with no flags: the model's prompts are the published eval ids, decoding is the published
    one (free, greedy, the folder's max_new_tokens), and on CPU the checkpoint's dtype is kept. The folder holds the
    published 2048 new tokens; predict runs on a copy that asks for 2, so that the test does not generate 2048."""
    generation = json.loads((converted / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["max_new_tokens"] == 2048 and generation.get("do_sample", False) is False
    folder = tmp_path / "short"
    shutil.copytree(converted, folder)
    (folder / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": 2}), encoding="utf-8")

    recorder, lines = run_predict([
        "--model", str(folder), "--data", str(eval_records), "--video_folder", str(shared_data / "media" / "video"),
        "--output", str(tmp_path / "preds.jsonl"), "--device", "cpu", "--quiet",
    ])
    processor = MultimoodProcessor.from_pretrained(converted)
    assert len(recorder.prompts) == len(eval_rows) == len(lines)
    for prompt, row in zip(recorder.prompts, eval_rows):
        n_video, n_audio = prompt.count(processor.video_token_id), prompt.count(processor.audio_token_id)
        assert n_video > 0 and n_audio > 0
        assert prompt == _expected(processor, row, n_video, n_audio)[0], f"eval prompt of record {row['index']}"
    assert recorder.steps == [2] * len(eval_rows)  # the folder's max_new_tokens, not predict's own 256
    assert not any(line["prediction"].startswith("Client") for line in lines)  # free: constrained starts so
    assert recorder.dtypes == {torch.float32}  # CPU: the checkpoint's dtype (float16 only on a GPU)
