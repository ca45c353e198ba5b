"""The "emotional-support" pipeline: constrained labels, batching, simple inputs, saving, clean-process
loading with `pipeline(..., trust_remote_code=True)` and the `multimood predict` command.

A tiny random MultiMood (every block, real Qwen2 vocabulary) with a processor built from the real Qwen2
tokenizer reads real MESC records and real clips (4 frames of 56 px, 2 audio windows).
"""

from __future__ import annotations

import copy
import json
import os
import textwrap
import warnings

import pytest
import torch
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from multimood import MultimoodForConditionalGeneration
from multimood.checkpoints.assembly import fit_processor_to_model, set_media_settings
from multimood.evaluation.predict import predict_main
from multimood.model.pipeline_multimood import (
    CUSTOM_PIPELINES,
    TASK,
    AnswerConstraint,
    AnswerFormatLogitsProcessor,
    EmotionalSupportPipeline,
    answer_segments,
    save_pipeline_files,
    to_record,
)
from multimood.model.processing_multimood import MultimoodProcessor
from multimood.model.records import MultimoodError
from multimood.training import quickstart
from tests.model_utils import TINY_NUM_FRAMES, run_in_clean_process, tiny_config

# Small media (2 audio windows of 4 s, 2 clips) and a wider initialisation so that a random model's answers
# depend on the input: batched == one-at-a-time then compares different answers.
TINY = {"initializer_range": 0.2}
MEDIA = {"num_frames": TINY_NUM_FRAMES, "audio_num_windows": 2, "audio_max_seconds": 4.0, "num_k_vid": 2}
TEXT_INIT_RANGE = 0.2
MAX_NEW = 32


def _match_processor(processor, config) -> None:
    """Small media, frames and token counts of the model (what training saves with the model)."""
    set_media_settings(processor, MEDIA)
    fit_processor_to_model(processor, config)


@pytest.fixture(scope="module")
def records(records) -> list[dict]:
    """The first 6 real records (conftest's `records`), the third without clips."""
    recs = copy.deepcopy(records[:6])
    recs[2] = {k: v for k, v in recs[2].items() if k != "path_to_vid_user_most_recent"}  # text only
    assert not recs[4]["history_chat"]  # one record without history
    return recs


@pytest.fixture(scope="module")
def built(shared_data, tmp_path_factory):
    """(model, processor, folder): a tiny random model and its processor, saved with the pipeline files."""
    torch.manual_seed(0)
    config = tiny_config(**TINY)
    config.text_config.initializer_range = TEXT_INIT_RANGE
    model = MultimoodForConditionalGeneration(config).eval()
    processor = MultimoodProcessor.from_tokenizer(shared_data / "tokenizer" / "qwen2", k_turn_history=2)
    _match_processor(processor, config)
    folder = tmp_path_factory.mktemp("pipeline") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_pipeline_files(folder)
    return model, processor, folder


@pytest.fixture(scope="module")
def pipe(built) -> EmotionalSupportPipeline:
    model, processor, _ = built
    return EmotionalSupportPipeline(model=model, processor=processor, device="cpu")


@pytest.fixture(scope="module")
def batched(pipe, records, video_folder) -> list[dict]:
    return pipe(records, video_folder=video_folder, batch_size=3, max_new_tokens=MAX_NEW)


def _assert_labels_valid(answer: dict, processor) -> None:
    assert answer["client_emotion"] in processor.emotion_labels, answer
    assert answer["therapist_emotion"] in processor.emotion_labels, answer
    assert answer["strategy"] in processor.strategy_labels, answer
    assert "unknown_labels" not in answer
    lines = answer["generated_text"].split("\n")
    assert lines[0] == f"Client emotion: {answer['client_emotion']}"
    assert lines[1] == f"Therapist emotion: {answer['therapist_emotion']}"
    assert lines[2] == f"Strategy: {answer['strategy']}"
    assert lines[3].startswith("Response:")


# ----------------------------------------------------------------------------------------------
# The constraint (no model)
# ----------------------------------------------------------------------------------------------


def test_registered_with_transformers():
    assert TASK in PIPELINE_REGISTRY.get_supported_tasks()
    assert PIPELINE_REGISTRY.supported_tasks[TASK]["impl"] is EmotionalSupportPipeline


def test_answer_segments_follow_the_processor(built):
    processor = built[1]
    segments = answer_segments(processor)
    assert segments[0] == [f"Client emotion: {e}\n" for e in processor.emotion_labels]
    assert segments[1] == [f"Therapist emotion: {e}\n" for e in processor.emotion_labels]
    assert segments[2] == [f"Strategy: {s}\n" for s in processor.strategy_labels]
    assert segments[3] == ["Response:"]
    esconv = MultimoodProcessor.from_tokenizer(copy.deepcopy(processor.tokenizer), label_set="esconv")
    assert answer_segments(esconv)[2] == [f"Strategy: {s}\n" for s in esconv.strategy_labels]


def test_constraint_accepts_gold_answers_and_nothing_else(built, records):
    processor = built[1]
    tokenizer = processor.tokenizer
    constraint = AnswerConstraint.from_processor(processor)
    for record in records:
        ids = tokenizer(processor.format_target(record), add_special_tokens=False)["input_ids"]
        # every gold token of the label lines is allowed, and the response is free
        for step in range(len(ids)):
            allowed = constraint.allowed_tokens(ids[:step])
            if allowed is None:
                break
            assert ids[step] in allowed, (record["Dialogue_ID"], tokenizer.decode(ids[: step + 1]))
        assert constraint.state(ids) == AnswerConstraint.FREE
        assert tokenizer.decode(ids[:step]) == processor.format_target(record).split("Response:")[0] + "Response:"
    prefix = tokenizer("Client emotion:", add_special_tokens=False)["input_ids"]
    allowed = constraint.allowed_tokens(prefix)
    labels = {tokenizer(" " + e, add_special_tokens=False)["input_ids"][0] for e in processor.emotion_labels}
    assert set(allowed) == labels
    assert tokenizer(" happiness", add_special_tokens=False)["input_ids"][0] not in allowed
    assert set(constraint.allowed_tokens([])) == {tokenizer("Client", add_special_tokens=False)["input_ids"][0]}


def test_constraint_trie_with_a_label_that_extends_another():
    constraint = AnswerConstraint([[[1, 2], [1, 2, 3]], [[4, 5]]])
    assert constraint.allowed_tokens([]) == [1]
    assert sorted(constraint.allowed_tokens([1, 2])) == [3, 4]  # "1 2" may end here or go on
    assert constraint.allowed_tokens([1, 2, 3]) == [4]
    assert constraint.allowed_tokens([1, 2, 4]) == [5]
    assert constraint.state([1, 2, 4, 5]) == AnswerConstraint.FREE
    assert constraint.state([1, 2, 3, 4, 5, 9, 9]) == AnswerConstraint.FREE
    assert constraint.state([7]) == AnswerConstraint.INVALID
    assert constraint.allowed_tokens([7]) is None


def test_constraint_walk_and_sequence_log_probs_with_a_label_that_extends_another():
    constraint = AnswerConstraint([[[1, 2], [1, 2, 3]], [[4, 5]]])
    assert constraint.walk([1, 2, 3, 4, 5]) == (AnswerConstraint.FREE, [0, 3])
    assert constraint.walk([1, 2, 4]) == ((1, constraint.tries[1].children[4]), [0, 2])
    assert constraint.walk([1, 7])[1] == [0]
    logits = torch.randn(2, 4, 6)
    logits[1, :3] = logits[0, :3]  # both sequences read the same context up to "1 2"
    expected = []
    for k in range(2):  # the sequences [1, 2] and [1, 2, 3]
        # by hand: the allowed sets are {1}, {2}, then {3, 4} after "1 2", then {4} after "1 2 3"
        total = 0.0
        total += logits[k, 1, [2]].log_softmax(-1)[0]  # token 2 after token 1 (token 1 is forced)
        after = logits[k, 2, [3, 4]].log_softmax(-1)
        total += after[1] if k == 0 else after[0]  # "1 2" ends with the next segment's 4; "1 2 3" goes on
        expected.append(total)
    torch.testing.assert_close(constraint.sequence_log_probs(0, logits), torch.stack(expected))
    assert torch.isclose(constraint.sequence_log_probs(0, logits).exp().sum(), torch.tensor(1.0))


def test_logits_processor_masks_constrained_rows_only():
    constraint = AnswerConstraint([[[1, 2], [1, 3]], [[4]]])
    processor = AnswerFormatLogitsProcessor(constraint, prompt_length=2)
    input_ids = torch.tensor([[9, 9, 1], [9, 9, 7]])  # row 0 is inside the labels, row 1 left them
    scores = torch.arange(12, dtype=torch.float).repeat(2, 1)
    out = processor(input_ids, scores.clone())
    assert torch.isinf(out[0]).sum() == 10 and out[0, 2] == 2 and out[0, 3] == 3
    assert torch.equal(out[1], scores[1])
    scores[0, [2, 3]] = -float("inf")  # all allowed tokens removed by an earlier processor: keep them
    out = processor(input_ids, scores.clone())
    assert out[0, 2] == 0 and out[0, 3] == 0 and torch.isinf(out[0]).sum() == 10
    done = processor(torch.tensor([[9, 9, 1, 2, 4], [9, 9, 1, 3, 4]]), scores.clone())
    assert torch.equal(done, scores) and processor.done


def test_to_record_simple_form():
    record = to_record({"utterance": "I can't sleep.", "videos": "a.mp4",
                        "history": [("client", "Hi."), "Therapist: Hello."],
                        "situation": "Work stress", "problem_type": "job crisis"})
    assert record == {
        "utt_user_most_recent": ["I can't sleep."],
        "path_to_vid_user_most_recent": ["a.mp4"],
        "history_chat": [{"role": "user", "content": "Hi."}, "Therapist: Hello."],
        "situation": "Work stress",
        "problem_type": "job crisis",
    }
    with pytest.raises(ValueError, match="history item 1: unknown speaker 'bot'"):
        to_record({"utterance": "x", "history": [("Therapist", "Hi."), ("bot", "Hello.")]})
    assert to_record("Hello") == {"utt_user_most_recent": ["Hello"]}
    with pytest.raises(ValueError, match="unknown simple-form keys"):
        to_record({"utterance": "x", "video": "a.mp4"})
    with pytest.raises(ValueError, match="utt_user_most_recent"):
        to_record({"text": "x"})


# ----------------------------------------------------------------------------------------------
# The pipeline in process
# ----------------------------------------------------------------------------------------------


def test_constrained_labels_are_in_the_label_sets(batched, built):
    processor = built[1]
    assert len(batched) == 6
    for answer in batched:
        assert set(answer) == {"client_emotion", "therapist_emotion", "strategy", "response", "generated_text"}
        _assert_labels_valid(answer, processor)


def test_constrained_with_sampling_and_beams(pipe, records, video_folder, built):
    processor = built[1]
    torch.manual_seed(0)
    sampled = pipe(records[:3], video_folder=video_folder, batch_size=3, max_new_tokens=MAX_NEW,
                   do_sample=True, temperature=3.0, top_k=50)
    beams = pipe(records[:2], video_folder=video_folder, batch_size=2, max_new_tokens=MAX_NEW, num_beams=2)
    for answer in sampled + beams:
        _assert_labels_valid(answer, processor)
    two = pipe(records[0], video_folder=video_folder, max_new_tokens=MAX_NEW, num_beams=2, num_return_sequences=2)
    assert isinstance(two, list) and len(two) == 2
    for answer in two:
        _assert_labels_valid(answer, processor)


def test_batched_equals_one_at_a_time(pipe, batched, records, video_folder):
    singles = [pipe(record, video_folder=video_folder, max_new_tokens=MAX_NEW) for record in records]
    assert len({a["generated_text"] for a in singles}) > 1  # the answers depend on the record
    assert batched == singles
    assert pipe(records, video_folder=video_folder, batch_size=6, max_new_tokens=MAX_NEW) == singles
    streamed = pipe((r for r in records[:4]), video_folder=video_folder, batch_size=4, max_new_tokens=MAX_NEW)
    assert not isinstance(streamed, list)
    assert list(streamed) == singles[:4]


def test_rows_that_stop_early_in_a_batch(pipe, records, video_folder):
    """A row that ends while others go on is padded in a batch: the answers still equal one-at-a-time ones,
    special tokens included."""
    neutral = pipe.tokenizer(" neutral", add_special_tokens=False)["input_ids"][0]
    kwargs = {"video_folder": video_folder, "max_new_tokens": MAX_NEW, "skip_special_tokens": False,
              "eos_token_id": [neutral, pipe.tokenizer.convert_tokens_to_ids("<|im_end|>")]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = pipe(records, batch_size=6, **kwargs)
        singles = [pipe(record, **kwargs) for record in records]
    assert batched == singles
    stopped = [a for a in batched if a["generated_text"].endswith("neutral")]
    assert stopped and len(stopped) < len(batched)
    assert all("<|endoftext|>" not in a["generated_text"] for a in batched)


def test_free_generation_reports_unknown_labels(pipe, records, video_folder, built):
    processor = built[1]
    with pytest.warns(UserWarning, match="outside the label sets .*constrained=False"):
        answers = pipe(records[:3], video_folder=video_folder, batch_size=3, max_new_tokens=16, constrained=False)
    for answer in answers:
        assert answer["unknown_labels"]
        for field, value in answer["unknown_labels"].items():
            labels = processor.strategy_labels if field == "strategy" else processor.emotion_labels
            assert value not in labels and answer[field] == value
    assert not answers[0]["generated_text"].startswith("Client emotion:")


def test_generation_kwargs_pass_through(pipe, records, video_folder):
    with pytest.warns(UserWarning, match="raise max_new_tokens"):
        short = pipe(records[0], video_folder=video_folder, max_new_tokens=4)
    tokens = pipe.tokenizer(short["generated_text"], add_special_tokens=False)["input_ids"]
    assert len(tokens) <= 4 and short["generated_text"].startswith("Client emotion:")
    assert short["unknown_labels"]["strategy"] is None
    # parameters given at construction apply to every call; the call's override them
    model, processor = pipe.model, pipe.processor
    preset = EmotionalSupportPipeline(model=model, processor=processor, device="cpu", max_new_tokens=MAX_NEW,
                                      video_folder=video_folder)
    assert preset(records[1]) == pipe(records[1], video_folder=video_folder, max_new_tokens=MAX_NEW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(preset.tokenizer(preset(records[1], max_new_tokens=6)["generated_text"])["input_ids"]) <= 6


def test_label_scores_are_the_constrained_probabilities(pipe, records, video_folder, built):
    """Each label line's scores equal the product of the constrained next-token probabilities of its tokens,
    computed here without the cache: one full forward per candidate through AnswerFormatLogitsProcessor."""
    model, processor, _ = built
    tokenizer = processor.tokenizer
    answer = pipe(records[0], video_folder=video_folder, max_new_tokens=MAX_NEW, return_label_scores=True)
    assert set(answer["label_scores"]) == {"client_emotion", "therapist_emotion", "strategy"}
    inputs = processor(records=[records[0]], video_folder=video_folder, padding_side="left")
    prompt_length = inputs["input_ids"].shape[1]
    constraint = AnswerConstraint.from_processor(processor)
    segments = answer_segments(processor)
    lines = answer["generated_text"].split("\n")
    for segment, field in enumerate(("client_emotion", "therapist_emotion", "strategy")):
        scores = answer["label_scores"][field]
        labels = processor.strategy_labels if field == "strategy" else processor.emotion_labels
        assert list(scores) == list(labels) and abs(sum(scores.values()) - 1) < 1e-5
        prefix = "".join(line + "\n" for line in lines[:segment])
        log_probs = []
        for text in segments[segment]:
            answer_ids = tokenizer(prefix + text, add_special_tokens=False)["input_ids"]
            ids = torch.cat([inputs["input_ids"], torch.tensor([answer_ids])], dim=1)
            with torch.no_grad():
                logits = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
            first = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
            total = 0.0
            for position in range(prompt_length + first, ids.shape[1]):
                step = AnswerFormatLogitsProcessor(constraint, prompt_length)
                masked = step(ids[:, :position], logits[:, position - 1])
                total += float(masked.log_softmax(-1)[0, ids[0, position]])
            log_probs.append(total)
        expected = torch.tensor(log_probs).softmax(-1)
        torch.testing.assert_close(torch.tensor(list(scores.values())), expected, atol=1e-5, rtol=1e-4)
        assert answer[field] == max(scores, key=scores.get) or scores[answer[field]] > 0.05


def test_label_scores_batched_equal_one_at_a_time(pipe, records, video_folder):
    kwargs = {"video_folder": video_folder, "max_new_tokens": MAX_NEW, "return_label_scores": True}
    batched = pipe(records[:4], batch_size=4, **kwargs)
    singles = [pipe(record, **kwargs) for record in records[:4]]
    for one, other in zip(batched, singles):
        assert {k: v for k, v in one.items() if k != "label_scores"} == {
            k: v for k, v in other.items() if k != "label_scores"
        }
        for field, scores in one["label_scores"].items():
            torch.testing.assert_close(torch.tensor(list(scores.values())),
                                       torch.tensor(list(other["label_scores"][field].values())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = pipe(records[0], video_folder=video_folder, max_new_tokens=4, return_label_scores=True)
    assert list(cut["label_scores"]) == ["client_emotion"]  # only the lines whose start the answer reached


def test_simple_form_input(pipe, records, video_folder, built):
    record = records[0]
    simple = {
        "utterance": record["utt_user_most_recent"],
        "videos": record["path_to_vid_user_most_recent"],
        "history": record["history_chat"],
        "situation": record["situation"],
        "problem_type": record["problem_type"],
    }
    assert pipe(simple, video_folder=video_folder, max_new_tokens=MAX_NEW) == pipe(
        record, video_folder=video_folder, max_new_tokens=MAX_NEW
    )
    absolute = dict(simple, videos=[os.path.join(video_folder, v) for v in simple["videos"]])
    mixed = pipe([absolute, "I feel so alone since my wife left."], max_new_tokens=MAX_NEW, batch_size=2)
    for answer in mixed:
        _assert_labels_valid(answer, built[1])


def test_dtype_and_device_as_in_transformers(built, records, video_folder):
    folder = built[2]
    bf16 = pipeline(TASK, model=str(folder), trust_remote_code=True, dtype=torch.bfloat16, device="cpu")
    assert bf16.model.dtype == torch.bfloat16 and bf16.device.type == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        answer = bf16(records[0], video_folder=video_folder, max_new_tokens=MAX_NEW)
    _assert_labels_valid(answer, built[1])
    mapped = pipeline(TASK, model=str(folder), trust_remote_code=True, device_map="cpu")
    assert mapped.model.device.type == "cpu"


def test_save_pipeline_files_copies_the_code_the_pipeline_imports(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_pipeline_files(tmp_path)
    assert {"pipeline_multimood.py", "records.py"} <= set(os.listdir(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["custom_pipelines"] == CUSTOM_PIPELINES


def test_pipe_save_pretrained(pipe, records, video_folder, tmp_path):
    pipe.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"pipeline_multimood.py", "config.json", "model.safetensors", "processor_config.json",
            "processing_multimood.py", "modeling_multimood.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    reloaded = pipeline(TASK, model=str(tmp_path), trust_remote_code=True)
    assert type(reloaded).__name__ == "EmotionalSupportPipeline"
    assert type(reloaded).__module__.startswith("transformers_modules")
    kwargs = {"video_folder": video_folder, "max_new_tokens": MAX_NEW}
    assert reloaded(records[1], **kwargs) == pipe(records[1], **kwargs)
    save_pipeline_files(tmp_path)  # idempotent
    assert json.loads((tmp_path / "config.json").read_text())["custom_pipelines"] == CUSTOM_PIPELINES


# ----------------------------------------------------------------------------------------------
# A process that never imported multimood
# ----------------------------------------------------------------------------------------------

CLEAN_PIPELINE = textwrap.dedent(
    """
    import json, sys
    sys.modules["multimood"] = None  # the package must not be importable: only the saved remote code
    from transformers import pipeline
    folder, records_file, video_folder, max_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    pipe = pipeline("emotional-support", model=folder, trust_remote_code=True)
    for part in (pipe, pipe.model, pipe.processor):
        assert type(part).__module__.startswith("transformers_modules"), type(part).__module__
    records = [json.loads(line) for line in open(records_file)]
    answers = pipe(records, video_folder=video_folder, batch_size=3, max_new_tokens=max_new)
    print("RESULT " + json.dumps(answers))
    """
)


def test_pipeline_in_a_clean_process(built, batched, records, video_folder, tmp_path):
    folder = built[2]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    result = run_in_clean_process(CLEAN_PIPELINE, folder, tmp_path / "records.jsonl", video_folder, MAX_NEW,
                                  cwd=tmp_path)
    assert result == batched[:3]


# ----------------------------------------------------------------------------------------------
# multimood predict
# ----------------------------------------------------------------------------------------------


def test_predict_cli_writes_predictions(built, batched, records, video_folder, tmp_path, capsys):
    model, processor, folder = built
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    output = tmp_path / "out" / "preds.jsonl"
    code = predict_main(["--model", str(folder), "--data", str(data), "--video_folder", video_folder,
                         "--output", str(output), "--batch_size", "4", "--max_new_tokens", str(MAX_NEW),
                         "--device", "cpu"])
    assert code == 0
    lines = [json.loads(x) for x in output.read_text().splitlines()]
    assert len(lines) == len(records)
    for i, (line, record, answer) in enumerate(zip(lines, records, batched)):
        assert line["index"] == i and line["Dialogue_ID"] == str(record["Dialogue_ID"])  # ids are strings in the schema
        assert line["reference"] == processor.format_target(record)
        assert line["prediction"] == answer["generated_text"]
        for field in ("client_emotion", "therapist_emotion", "strategy", "response"):
            assert line[field] == answer[field]
        assert "unknown_labels" not in line
    assert "wrote 6 predictions" in capsys.readouterr().err

    # free generation: unknown labels are reported; a record without targets has no reference
    targets = ("Emotion", "Strategy", "Utterance", "get_emotion_user_most_recent")
    bare = {k: v for k, v in records[0].items() if k not in targets}
    data.write_text(json.dumps(bare) + "\n" + json.dumps(records[1]) + "\n")
    code = predict_main(["--model", str(folder), "--data", str(data), "--video_folder", video_folder,
                         "--output", str(output), "--max_new_tokens", "12", "--no-constrained", "--quiet"])
    assert code == 0
    lines = [json.loads(x) for x in output.read_text().splitlines()]
    assert "reference" not in lines[0] and lines[1]["reference"] == processor.format_target(records[1])
    assert all(line["unknown_labels"] for line in lines)
    assert "labels outside the label sets" in capsys.readouterr().err


def test_predict_cli_skip_errors(built, records, video_folder, tmp_path, capsys):
    folder = built[2]
    broken = dict(records[1], path_to_vid_user_most_recent=["missing_clip.mp4"])
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (records[0], broken, records[2])))
    args = ["--model", str(folder), "--data", str(data), "--video_folder", video_folder,
            "--output", str(tmp_path / "preds.jsonl"), "--batch_size", "3", "--max_new_tokens", "24", "--quiet"]
    message = f"{data} line 2 \\(record 1, Dialogue_ID=.*missing_clip.mp4.*--skip_errors"
    with pytest.raises(MultimoodError, match=message):
        predict_main(args)
    assert predict_main(args + ["--skip_errors"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 2]
    assert f"skipped {data} line 2 (record 1, Dialogue_ID=6): clip" in capsys.readouterr().err
    with pytest.raises(MultimoodError, match="line 1 \\(record 0, .*does not fit in max_length=16 tokens"):
        predict_main(args + ["--max_length", "16"])


# ----------------------------------------------------------------------------------------------
# A trained folder from `multimood quickstart`
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_on_a_quickstart_model(tmp_path, shared_data, video_folder):
    """The quickstart's trained tiny model (its own small BPE tokenizer): constrained labels are valid,
    batched answers equal one-at-a-time ones, and the longest real MESC val records fit its saved prompt budget."""
    folder, data = tmp_path / "model", tmp_path / "data"
    quickstart.run(quickstart.build_parser().parse_args(
        ["--output_dir", str(folder), "--data_dir", str(data), "--max_steps", "20"]))
    save_pipeline_files(folder)  # a no-op once quickstart saves the pipeline files itself
    pipe = pipeline(TASK, model=str(folder), trust_remote_code=True, device="cpu")
    records = [json.loads(line) for line in (data / "dialogues.jsonl").read_text().splitlines() if line.strip()][:6]
    kwargs = {"video_folder": str(data / "videos"), "max_new_tokens": 48}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = pipe(records, batch_size=6, **kwargs)
        singles = [pipe(record, **kwargs) for record in records]
    assert batched == singles
    for answer in batched:
        _assert_labels_valid(answer, pipe.processor)
    # MESC val record 318 needs more than 1024 prompt tokens (1169) with this tokenizer even without its history
    long_record = json.loads((shared_data / "records" / "mesc_val_records.jsonl").read_text().splitlines()[318])
    with pytest.raises(ValueError, match="does not fit in max_length=1024"):
        pipe(long_record, video_folder=video_folder, max_new_tokens=8, processor_kwargs={"max_length": 1024})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_labels_valid(pipe(long_record, video_folder=video_folder, max_new_tokens=48), pipe.processor)


def test_prompt_style_in_pipeline_and_predict(pipe, built, records, video_folder, tmp_path):
    """A published prompt style: the pipeline sends the processor's published prompt and constrains the
    published answer format; `multimood predict --prompt_style --constrained` does the same and writes published
    references."""
    _, processor, folder = built
    style = "published-eval"
    sent = pipe.preprocess(records[:2], video_folder=video_folder, prompt_style=style)["model_inputs"]["input_ids"]
    direct = processor(records=records[:2], video_folder=video_folder, padding_side="left", prompt_style=style)
    assert torch.equal(sent, direct["input_ids"])
    assert "You are an expert in emotional psychology" in processor.decode(sent[0])
    answers = pipe(records[:2], video_folder=video_folder, prompt_style=style, max_new_tokens=48)
    for answer in answers:
        lines = answer["generated_text"].split("\n")
        assert lines[0] == f"Client's emotion: {answer['client_emotion']} "
        assert lines[1] == f"Therapist's emotion: {answer['therapist_emotion']} "
        assert lines[2] == f"Therapist's strategy: {answer['strategy']} "
        assert lines[3].startswith("Therapist's response:") and "unknown_labels" not in answer
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    output = tmp_path / "preds.jsonl"
    # a published style decodes freely by default (the published evaluation); --constrained as the pipeline call above
    assert predict_main(["--model", str(folder), "--data", str(data), "--video_folder", video_folder, "--output",
                         str(output), "--max_new_tokens", "48", "--prompt_style", style, "--constrained",
                         "--quiet"]) == 0
    lines = [json.loads(x) for x in output.read_text().splitlines()]
    for line, record, answer in zip(lines, records, answers):
        assert line["reference"] == processor.format_target(record, prompt_style=style)
        assert line["reference"].startswith("Client's emotion: ")
        assert line["prediction"] == answer["generated_text"]
