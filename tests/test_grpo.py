"""GRPO stage: the rewards on hand-made cases, the LLM judge (both rules) against local HTTP servers (canned scores,
a time-out, garbage), and a tiny paper-preset GRPO run on real MESC records and clips that updates the trainable
weights. The BGE-M3 hybrid similarity is checked in test_bge_m3_reward.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, BertTokenizerFast

from multimood.model.records import format_answer
from multimood.training import quickstart
from multimood.training import rewards as R
from tests.bge_m3_utils import write_tiny_bge_m3

GOLD = {
    "Utterance": [["Kate said that?"], "You feel unheard."],
    "get_emotion_user_most_recent": ["anger", "sadness"],
    "Emotion": ["neutral", "neutral"],
    "Strategy": ["restatement", "open question"],
}
GOOD = format_answer("anger", "neutral", "restatement", "Kate said that?")
PARTIAL = "Client emotion: sadness\nTherapist emotion: joy\nStrategy: open question"
BAD = "I am not sure what to say."


# ----------------------------------------------------------------------------------------------
# Rule-based rewards and combination
# ----------------------------------------------------------------------------------------------


def test_format_reward():
    scores = R.format_reward(
        prompts=["p"] * 4, completions=[GOOD, PARTIAL, BAD, [{"role": "assistant", "content": GOOD}]]
    )
    assert scores == [1.0, 0.75, 0.0, 1.0]


def test_label_reward_weights_and_case():
    completions = [GOOD, "Client emotion: Anger\nTherapist emotion: joy\nStrategy: Restatement.\nResponse: x"]
    scores = R.label_reward(prompts=["p"] * 2, completions=completions,
                            **{k: [v[0], v[0]] for k, v in GOLD.items()})
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(0.9)  # therapist emotion wrong: low weight
    # second gold: client sadness / open question; PARTIAL gets both, therapist emotion wrong
    assert R.label_reward(completions=[PARTIAL, BAD], **{k: [v[1], v[1]] for k, v in GOLD.items()}) == [
        pytest.approx(0.9), 0.0]
    # no gold column at all: not scored (trl turns None into NaN and ignores it)
    assert R.label_reward(completions=[GOOD]) == [None]


def test_combine_rewards_is_elementwise_mean_not_concatenation():
    def a(prompts=None, completions=(), **kw):
        return [1.0, 0.0, 0.5]

    def b(prompts=None, completions=(), **kw):
        return [0.0, 0.0, None]

    combined = R.combine_rewards({"a": a, "b": b})
    out = combined(prompts=["p"] * 3, completions=["x"] * 3)
    assert len(out) == 3  # one value per completion (published `(a + b) / 2` on lists: concatenation, then TypeError)
    assert out == [0.5, 0.0, 0.5]  # None is left out of the mean
    weighted = R.combine_rewards([a, b], weights=[3, 1])
    assert weighted(completions=["x"] * 3)[0] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        R.combine_rewards([a, b], weights=[1])
    assert R.parse_reward_weights("similarity=1, judge=0.5") == {"similarity": 1.0, "judge": 0.5}
    assert R.parse_reward_weights('{"format": 2}') == {"format": 2.0}
    assert R.PAPER_PRESET["beta"] == 1.12 and R.PAPER_PRESET["num_generations"] == 4
    assert R.PAPER_PRESET["max_completion_length"] == 128 and R.PAPER_PRESET["learning_rate"] == 1e-5


# ----------------------------------------------------------------------------------------------
# Similarity reward (a tiny random BERT saved locally: plain AutoModel + mean pooling, offline)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_encoder")
    words = sorted({w for text in ["kate said that you feel unheard i am not sure what to say how are "
                                   "the weather is nice today tell me more about it"] for w in text.split()})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", ".", ","] + words))
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=8 + len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(root)
    return root


def test_similarity_reward(tiny_encoder):
    reward = R.SimilarityReward(str(tiny_encoder))
    completions = [GOOD, format_answer("anger", "neutral", "restatement", "the weather is nice today"), PARTIAL, BAD]
    golds = [["Kate said that?"]] * 4
    scores = reward(prompts=["p"] * 4, completions=completions, Utterance=golds)
    assert scores[0] == pytest.approx(1.0, abs=1e-5)  # identical response
    assert 0.0 <= scores[1] < scores[0]
    assert scores[2] == 0.0 and scores[3] == 0.0  # no Response line
    whole = R.SimilarityReward(str(tiny_encoder), whole_if_unparsed=True, scale="clip")
    assert 0.0 < whole(completions=[BAD], Utterance=golds[:1])[0] <= 1.0
    assert reward(completions=[GOOD]) == [None]  # no gold column


# ----------------------------------------------------------------------------------------------
# LLM judge against local servers
# ----------------------------------------------------------------------------------------------


def _serve(reply):
    """A local OpenAI-compatible server on 127.0.0.1; `reply(request_json) -> (status, body_str)` (may sleep)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            status, text = reply(body)
            data = text.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1", seen


def _chat(content: str) -> str:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})


def test_judge_canned_scores():
    scores = {d: 10 for d in R.TRUST_DIMENSIONS}
    scores["safety"] = 1
    server, url, seen = _serve(lambda body: (200, _chat("Here you go:\n```json\n" + json.dumps(scores) + "\n```")))
    try:
        judge = R.JudgeReward(url, "judge-model", api_key="k", timeout=5)
        out = judge(prompts=["context a", "context b"], completions=[GOOD, BAD])
    finally:
        server.shutdown()
    assert out[0] == pytest.approx((sum(scores.values()) / 7 - 1) / 9)
    assert out[1] == 0.0  # nothing to judge: no response line, no request sent
    assert len(seen) == 1 and seen[0]["path"] == "/v1/chat/completions"
    assert seen[0]["body"]["model"] == "judge-model" and seen[0]["auth"] == "Bearer k"
    assert "Kate said that?" in seen[0]["body"]["messages"][-1]["content"]
    assert judge.failures == 0


def test_judge_timeout_gives_logged_neutral(caplog):
    server, url, _ = _serve(lambda body: (time.sleep(3), (200, _chat("{}")))[1])
    try:
        judge = R.JudgeReward(url, "m", timeout=0.5)
        with caplog.at_level(logging.WARNING, logger="multimood.training.rewards"):
            start = time.monotonic()
            out = judge(prompts=["c"], completions=[GOOD])
            elapsed = time.monotonic() - start
    finally:
        server.shutdown()
    assert out == [R.NEUTRAL] and elapsed < 2.5
    assert judge.failures == 1
    assert any("failed" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("status,body", [
    (200, _chat("I think it is a lovely answer, 8 out of 10 overall.")),  # no per-dimension scores
    (200, "not json at all"),
    (200, _chat(json.dumps({d: 42 for d in R.TRUST_DIMENSIONS}))),  # out of range
    (500, "internal error"),
])
def test_judge_garbage_gives_logged_neutral(status, body, caplog):
    server, url, _ = _serve(lambda _: (status, body))
    try:
        judge = R.JudgeReward(url, "m", timeout=5)
        with caplog.at_level(logging.WARNING, logger="multimood.training.rewards"):
            out = judge(prompts=["c", "c"], completions=[GOOD, GOOD])
    finally:
        server.shutdown()
    assert out == [R.NEUTRAL, R.NEUTRAL]
    assert judge.failures == 2
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 2


def test_judge_unreachable_gives_neutral():
    judge = R.JudgeReward("http://127.0.0.1:9/v1", "m", timeout=1)
    assert judge(prompts=["c"], completions=[GOOD]) == [R.NEUTRAL]


def _published_reply(scores: dict[str, int]) -> str:
    """A reply in the published judge's output format (`Name: N/10` lines after the original response)."""
    lines = [f"{dim.title()}: {value}/10" for dim, value in scores.items()]
    return "Original response: Kate said that?\n" + "\n".join(lines)


def test_judge_published_rule_mean_on_0_10_and_zero_on_failure(caplog):
    full = dict(zip(R.TRUST_DIMENSIONS, [9, 8, 7, 10, 6, 8, 9]))
    partial = {dim: value for dim, value in full.items() if dim != "empathy"}  # one dimension missing
    wild = {**full, "safety": 42}  # out of range
    replies = iter([_published_reply(full), _published_reply(partial), _published_reply(wild), "no scores at all"])
    lock = threading.Lock()

    def reply(body):
        with lock:
            return 200, _chat(next(replies))

    server, url, seen = _serve(reply)
    try:
        judge = R.JudgeReward(url, "m", timeout=5, rule="published", include_context=False, max_workers=1,
                              temperature=0.2, max_tokens=1000)
        with caplog.at_level(logging.WARNING, logger="multimood.training.rewards"):
            out = judge(prompts=["context: Kate is my sister"] * 5, completions=[GOOD, GOOD, GOOD, GOOD, BAD])
    finally:
        server.shutdown()
    assert out[0] == pytest.approx(57 / 7)  # (9+8+7+10+6+8+9) / 7 on the 0-10 scale
    assert out[1] == pytest.approx((57 - 6) / 7)  # empathy missing counts 0
    assert out[2] == pytest.approx((57 - 8) / 7)  # safety 42/10 counts 0
    assert out[3] == 0.0 and out[4] == 0.0  # nothing parseable; no response to judge (no request)
    assert judge.failures == 3 and sum(r.levelno == logging.WARNING for r in caplog.records) == 3
    assert len(seen) == 4
    user = seen[0]["body"]["messages"][-1]["content"]
    assert "Kate said that?" in user and "Kate is my sister" not in user  # the response alone, as published
    assert (seen[0]["body"]["temperature"], seen[0]["body"]["max_tokens"]) == (0.2, 1000)


@pytest.mark.parametrize("status", [500, "timeout"])
def test_judge_published_rule_failed_request_gives_zero(status, caplog):
    if status == "timeout":
        server, url, _ = _serve(lambda body: (time.sleep(3), (200, _chat("{}")))[1])
    else:
        server, url, _ = _serve(lambda body: (status, "internal error"))
    try:
        judge = R.JudgeReward(url, "m", timeout=0.5, rule="published")
        with caplog.at_level(logging.WARNING, logger="multimood.training.rewards"):
            out = judge(prompts=["c"], completions=[GOOD])
    finally:
        server.shutdown()
    assert out == [0.0] and judge.failures == 1
    assert any("failed" in r.getMessage() for r in caplog.records)
    # the default rule on the same failure: the logged neutral value
    assert R.JudgeReward("http://127.0.0.1:9/v1", "m", timeout=1).failure_score == R.NEUTRAL


def test_judge_prompt_files_replace_the_messages(tmp_path):
    from multimood.training.grpo import build_rewards, parse_args  # noqa: PLC0415 - needs trl (the train extra)

    (tmp_path / "system.txt").write_text("You rate therapists.")
    (tmp_path / "user.txt").write_text('Rate {"this"} answer: {response}\nAfter: {context}')
    server, url, seen = _serve(lambda body: (200, _chat(_published_reply(dict.fromkeys(R.TRUST_DIMENSIONS, 5)))))
    try:
        script, _ = parse_args(["--model_path", "m", "--output_dir", str(tmp_path), "--preset", "paper",
                                "--judge_url", url, "--judge_model", "m", "--reward_weights", "judge=1",
                                "--judge_system_prompt_file", str(tmp_path / "system.txt"),
                                "--judge_user_template_file", str(tmp_path / "user.txt")])
        (judge,), _ = build_rewards(script)
        assert judge(prompts=["the context"], completions=[GOOD]) == [5.0]
    finally:
        server.shutdown()
    messages = seen[0]["body"]["messages"]
    assert messages[0]["content"] == "You rate therapists."
    assert messages[1]["content"] == 'Rate {"this"} answer: Kate said that?\nAfter: '  # no context under the preset
    (tmp_path / "user.txt").write_text("no field")
    with pytest.raises(ValueError, match="response"):
        build_rewards(script)


def test_parse_judge_scores_variants():
    lines = "\n".join(f"{d.title()}: {i + 2}" for i, d in enumerate(R.TRUST_DIMENSIONS))
    assert R.parse_judge_scores(lines)["ethical guidance"] == 8.0
    data = {d.replace(" ", "_"): 5 for d in R.TRUST_DIMENSIONS}
    assert R.parse_judge_scores(json.dumps(data)) == {d: 5.0 for d in R.TRUST_DIMENSIONS}
    assert R.parse_judge_scores("") is None


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


def test_parse_args_paper_preset(tmp_path):
    from multimood.training.grpo import build_rewards, parse_args  # noqa: PLC0415 - needs trl (the train extra)

    script, config = parse_args(["--model_path", "m", "--output_dir", str(tmp_path), "--preset", "paper",
                                 "--per_device_train_batch_size", "4", "--beta", "0.5"])
    assert (config.num_generations, config.max_completion_length, config.learning_rate) == (4, 128, 1e-5)
    assert config.beta == 0.5  # explicit flags win over the preset
    assert (config.temperature, config.loss_type) == (0.9, "grpo")  # trl 0.14, which the published run used
    assert (script.similarity_model, script.similarity_scoring) == ("BAAI/bge-m3", "bge-m3-hybrid")
    assert (script.judge_rule, script.judge_context, script.judge_temperature, script.judge_max_tokens) == (
        "published", False, 0.2, 1000)
    # reward = mean(similarity, judge): trl sums the weighted rewards
    assert R.parse_reward_weights(script.reward_weights_spec) == {"similarity": 0.5, "judge": 0.5}
    with pytest.raises(ValueError, match="judge"):
        build_rewards(script)  # the paper's judge needs an endpoint
    script, config = parse_args(["--model_path", "m", "--output_dir", str(tmp_path)])
    assert (script.similarity_scoring, script.judge_rule, script.judge_context) == ("embedding", "multimood", True)
    script, _ = parse_args(["--model_path", "m", "--output_dir", str(tmp_path), "--reward_weights", "format=1,label=2"])
    funcs, weights = build_rewards(script)
    assert [f.__name__ for f in funcs] == ["format_reward", "label_reward"] and weights == [1.0, 2.0]


# ----------------------------------------------------------------------------------------------
# A tiny GRPO run on real records and clips
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo_sft") / "model"
    quickstart.run(quickstart.build_parser().parse_args(["--output_dir", str(out), "--max_steps", "2"]))
    return out


@pytest.fixture(scope="module")
def tiny_bge_m3(tmp_path_factory) -> Path:
    return write_tiny_bge_m3(tmp_path_factory.mktemp("tiny_bge_m3"))


@pytest.mark.slow
def test_tiny_paper_preset_grpo_run_updates_weights(sft_model, shared_data, tiny_bge_m3, tmp_path):
    """The paper preset end to end (BGE-M3 hybrid similarity, the published judge rule against a local server) with
    the budget flags made tiny."""
    from multimood.training import grpo  # noqa: PLC0415 - needs trl (the train extra)

    seen_media = []
    trainer_cls = grpo.MultimoodGRPOTrainer
    original = trainer_cls._get_per_token_logps_and_entropies

    def spy(self, model, input_ids, *args, **kwargs):
        if self._active_mm:
            seen_media.append(sorted(self.media_kwargs(self._active_mm)))
        return original(self, model, input_ids, *args, **kwargs)

    trainer_cls._get_per_token_logps_and_entropies = spy
    server, url, _ = _serve(lambda body: (200, _chat(json.dumps(dict.fromkeys(R.TRUST_DIMENSIONS, 7)))))
    out = tmp_path / "grpo"
    try:
        trainer, result = grpo.main([
            "--model_path", str(sft_model),
            "--data_path", str(shared_data / "records" / "mesc_val_records.jsonl"),
            "--vid_folder", str(shared_data / "media" / "video"),
            "--output_dir", str(out), "--max_train_samples", "4", "--preset", "paper",
            "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "12",
            "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2", "--beta", "0.1",
            "--reward_weights", "format=0.5,label=1,similarity=0.5,judge=0.5", "--similarity_model", str(tiny_bge_m3),
            "--similarity_whole_if_unparsed", "True", "--judge_url", url, "--judge_model", "m",
            "--report_to", "none", "--save_strategy", "no", "--seed", "0",
        ])
    finally:
        trainer_cls._get_per_token_logps_and_entropies = original
        server.shutdown()
    assert isinstance(trainer.reward_funcs[2], R.BGEM3SimilarityReward)
    assert trainer.reward_funcs[3].rule == "published"
    # the media reached the log-prob passes (old/ref and policy)
    assert seen_media and all("pixel_values_videos" in keys and "history_input_ids" in keys for keys in seen_media)
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logs) == 2
    for name in ("format_reward", "label_reward", "similarity", "judge"):
        assert all(f"rewards/{name}/mean" in entry for entry in logs)
    # the trained weights moved away from the SFT weights
    before = load_file(str(sft_model / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    changed = [k for k in before if "language_model" in k and not torch.equal(before[k], after[k])]
    assert changed, "no LLM weight changed"
    frozen = [k for k in before if "vision_tower" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert (out / "processor_config.json").is_file()
