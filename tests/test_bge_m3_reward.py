"""The published similarity reward: BGE-M3's hybrid (dense + sparse + colbert) score, computed by `BGEM3Scorer` from a
tiny random BGE-M3 folder (XLM-RoBERTa encoder + FlagEmbedding's `colbert_linear.pt` / `sparse_linear.pt` heads)
and checked against a hand computation in numpy written from the formula of FlagEmbedding's
`BGEM3FlagModel.compute_score` (it uses only the reference encoder from transformers and the saved head weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from transformers import AutoTokenizer, XLMRobertaModel

from multimood.model.records import format_answer
from multimood.training import rewards as R
from tests.bge_m3_utils import WORDS, write_tiny_bge_m3


@pytest.fixture(scope="module")
def tiny_bge_m3(tmp_path_factory) -> Path:
    return write_tiny_bge_m3(tmp_path_factory.mktemp("tiny_bge_m3"))


class HandScore:
    """BGE-M3's published scores of one (query, passage) pair, each text encoded alone (no padding), in float64."""

    def __init__(self, folder: Path):
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.encoder = XLMRobertaModel.from_pretrained(folder).eval()
        colbert = torch.load(folder / "colbert_linear.pt", weights_only=True)
        sparse = torch.load(folder / "sparse_linear.pt", weights_only=True)
        self.colbert_w, self.colbert_b = colbert["weight"].double().numpy(), colbert["bias"].double().numpy()
        self.sparse_w, self.sparse_b = sparse["weight"].double().numpy(), sparse["bias"].double().numpy()
        self.vocab_size = self.encoder.config.vocab_size

    def states(self, text: str, max_length: int) -> tuple[list[int], np.ndarray]:
        ids = self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        with torch.no_grad():
            hidden = self.encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
        return ids, hidden.double().numpy()

    def lexical_vector(self, ids: list[int], hidden: np.ndarray) -> np.ndarray:
        weights = np.maximum(hidden @ self.sparse_w.T + self.sparse_b, 0.0)[:, 0]
        vector = np.zeros(self.vocab_size)
        for token, weight in zip(ids, weights):
            vector[token] = max(vector[token], weight)
        vector[[0, 1, 2, 3]] = 0.0  # <s>, <pad>, </s>, <unk> carry no lexical weight
        return vector

    def __call__(self, query: str, passage: str, weights=(1.0, 0.3, 1.0), max_query=512, max_passage=128) -> dict:
        def unit(x):
            return x / np.linalg.norm(x, axis=-1, keepdims=True)

        q_ids, q = self.states(query, max_query)
        p_ids, p = self.states(passage, max_passage)
        dense = float(unit(q[0]) @ unit(p[0]))
        sparse = float(self.lexical_vector(q_ids, q) @ self.lexical_vector(p_ids, p))
        q_vecs = unit(q[1:] @ self.colbert_w.T + self.colbert_b)
        p_vecs = unit(p[1:] @ self.colbert_w.T + self.colbert_b)
        colbert = float((q_vecs @ p_vecs.T).max(axis=1).mean())
        hybrid = (weights[0] * dense + weights[1] * sparse + weights[2] * colbert) / sum(weights)
        return {"dense": dense, "sparse": sparse, "colbert": colbert, "hybrid": hybrid}


@pytest.fixture(scope="module")
def hand(tiny_bge_m3) -> HandScore:
    return HandScore(tiny_bge_m3)


PAIRS = [
    ("Kate said that?", "Kate said that?"),
    ("I am really sorry to hear you lost your job this week.", "You feel unheard, tell me more about it."),
    ("how are you", "the weather is nice today. hello world"),  # unknown words: <unk> ids, no lexical weight
    ("you feel unheard", "you feel you feel unheard unheard i am not sure"),  # repeated ids: the max weight per id
]


def test_hybrid_score_matches_hand_computation(tiny_bge_m3, hand):
    scorer = R.BGEM3Scorer(str(tiny_bge_m3), batch_size=3)  # a batch of 3 then 1: padding must not enter a score
    scores = scorer.score([q for q, _ in PAIRS], [p for _, p in PAIRS])
    for i, (query, passage) in enumerate(PAIRS):
        expected = hand(query, passage)
        for name in ("dense", "sparse", "colbert", "hybrid"):
            assert scores[name][i].item() == pytest.approx(expected[name], abs=1e-5), (name, query, passage)
    assert scores["sparse"].gt(0).any() and scores["dense"][0].item() == pytest.approx(1.0, abs=1e-5)
    # the published weights are [1, 0.3, 1], divided by their sum (2.3), as FlagEmbedding's compute_score does
    assert R.BGE_M3_WEIGHTS == (1.0, 0.3, 1.0)
    raw = scores["dense"] + 0.3 * scores["sparse"] + scores["colbert"]
    assert torch.allclose(scores["hybrid"], raw / 2.3, atol=1e-6)


def test_hybrid_weights_select_the_modes(tiny_bge_m3, hand):
    query, passage = PAIRS[1]
    expected = hand(query, passage, weights=(0.0, 1.0, 0.0))
    only_sparse = R.BGEM3Scorer(str(tiny_bge_m3), weights=(0, 1, 0)).score([query], [passage])
    assert only_sparse["hybrid"].item() == pytest.approx(expected["sparse"], abs=1e-6)
    mixed = R.BGEM3Scorer(str(tiny_bge_m3), weights=(2, 1, 0.5)).score([query], [passage])
    assert mixed["hybrid"].item() == pytest.approx(hand(query, passage, weights=(2, 1, 0.5))["hybrid"], abs=1e-5)
    with pytest.raises(ValueError, match="three"):
        R.BGEM3Scorer(str(tiny_bge_m3), weights=(1, 1))


def test_passage_cut_at_128_tokens_query_at_512(tiny_bge_m3, hand):
    rng = np.random.default_rng(0)
    words = [str(w) for w in rng.choice(WORDS, size=300)]
    long_text = " ".join(words)
    scorer = R.BGEM3Scorer(str(tiny_bge_m3))
    assert (scorer.max_query_length, scorer.max_passage_length) == (512, 128)
    query = "I am really sorry to hear you lost your job"
    got = scorer.score([query], [long_text])["hybrid"].item()
    assert got == pytest.approx(hand(query, long_text, max_passage=128)["hybrid"], abs=1e-5)
    assert got != pytest.approx(hand(query, long_text, max_passage=512)["hybrid"], abs=1e-4)
    # passage tokens past 128 (CLS + 126 words + EOS) change nothing; a word inside the window does
    changed_late = " ".join(words[:126] + ["kate"] * 174)
    assert scorer.score([query], [changed_late])["hybrid"].item() == pytest.approx(got, abs=1e-6)
    changed_early = " ".join(words[:100] + ["kate"] * 200)
    assert scorer.score([query], [changed_early])["hybrid"].item() != pytest.approx(got, abs=1e-4)
    # the query (the gold response) keeps up to 512 tokens
    as_query = scorer.score([long_text], [query])["hybrid"].item()
    assert as_query == pytest.approx(hand(long_text, query, max_query=512)["hybrid"], abs=1e-5)
    assert as_query != pytest.approx(hand(long_text, query, max_query=128)["hybrid"], abs=1e-4)


def test_reward_scores_the_response_line_against_the_gold(tiny_bge_m3, hand):
    reward = R.BGEM3SimilarityReward(str(tiny_bge_m3))
    gold = "I am really sorry to hear you lost your job this week."
    response = "you lost your job"
    completions = [format_answer("sadness", "neutral", "reflection of feelings", response), "no answer lines", response]
    scores = reward(prompts=["p"] * 3, completions=completions, Utterance=[[gold]] * 3)
    # the gold response is the query, the generated response the passage (the published service's order)
    assert scores[0] == pytest.approx(hand(gold, response)["hybrid"], abs=1e-5)
    assert scores[0] != pytest.approx(hand(response, gold)["hybrid"], abs=1e-4)
    assert scores[1] == 0.0 and scores[2] == 0.0  # no Response line
    whole = R.BGEM3SimilarityReward(str(tiny_bge_m3), whole_if_unparsed=True)
    assert whole(completions=[response], Utterance=[gold])[0] == pytest.approx(scores[0], abs=1e-6)
    assert reward(completions=completions[:1]) == [None]  # no gold column: not scored


def test_missing_heads_is_a_clear_error(tiny_bge_m3, tmp_path):
    folder = tmp_path / "encoder_only"
    shutil.copytree(tiny_bge_m3, folder)
    (folder / "sparse_linear.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"sparse_linear\.pt.*colbert and sparse heads"):
        R.BGEM3Scorer(str(folder)).score(["a"], ["b"])
    torch.save({"weight": torch.zeros(1, 7)}, folder / "sparse_linear.pt")
    with pytest.raises(ValueError, match=r"sparse_linear\.pt.*shape"):
        R.BGEM3Scorer(str(folder)).score(["a"], ["b"])
    with pytest.raises(OSError, match="not a local folder"):
        R.BGEM3Scorer(str(tmp_path / "nowhere")).score(["a"], ["b"])


def test_hub_id_loads_from_the_hub_cache_offline(tiny_bge_m3, hand, tmp_path, monkeypatch):
    """A Hub id goes through `snapshot_download`; offline, the Hugging Face cache answers."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-bge-m3"
    shutil.copytree(tiny_bge_m3, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    scorer = R.BGEM3Scorer("someone/tiny-bge-m3", cache_dir=str(tmp_path / "hub"))
    query, passage = PAIRS[1]
    assert scorer.score([query], [passage])["hybrid"].item() == pytest.approx(hand(query, passage)["hybrid"], abs=1e-5)


def test_paper_preset_builds_the_hybrid_reward(tiny_bge_m3, hand, tmp_path):
    from multimood.training.grpo import build_rewards, parse_args  # noqa: PLC0415 - needs trl (the train extra)

    script, _ = parse_args(["--model_path", "m", "--output_dir", str(tmp_path), "--preset", "paper",
                            "--similarity_model", str(tiny_bge_m3), "--reward_weights", "similarity=1"])
    (reward,), weights = build_rewards(script)
    assert isinstance(reward, R.BGEM3SimilarityReward) and weights == [1.0]
    gold, response = PAIRS[1]
    got = reward(completions=[format_answer("anger", "neutral", "restatement", response)], Utterance=[gold])
    assert got[0] == pytest.approx(hand(gold, response)["hybrid"], abs=1e-5)
