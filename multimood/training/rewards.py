"""Reward functions for GRPO fine-tuning of MultiMood (trl-compatible callables).

Every reward is a plain callable `reward(prompts, completions, **kwargs) -> list[float]`, the signature trl's
`GRPOTrainer` calls: `completions` are the generated texts (or chat-style `[{"role": "assistant", "content": ...}]`
lists), and the gold answer is read from the dataset columns that trl passes as keyword arguments (one list entry per
completion): `Utterance` (the gold response: a str or a list of fragments), `get_emotion_user_most_recent` (client
emotion), `Emotion` (therapist emotion), `Strategy`.

* `format_reward`         - the four answer lines are present and non-empty (partial credit per field), in [0, 1].
* `label_reward`          - client emotion and strategy equal the gold labels; the therapist emotion has a low weight.
* `SimilarityReward`      - cosine similarity of the response's sentence embedding to the gold response's, in [0, 1].
* `BGEM3SimilarityReward` - the published similarity: BGE-M3's hybrid dense + sparse + colbert relevance of the
                            response to the gold response (`BGEM3Scorer`, weights [1, 0.3, 1], passages cut at 128
                            tokens), the raw score FlagEmbedding's `BGEM3FlagModel.compute_score` returns.
* `JudgeReward`           - optional LLM judge (OpenAI-compatible chat completions) over seven trustworthiness
                            dimensions scored 1-10. Rule "multimood" (default): the mean rescaled to [0, 1]; a
                            time-out, HTTP error or unparseable reply gives the logged `NEUTRAL` value (0.5), never a
                            crash or a silent zero. Rule "published": the mean on 0-10 as the published code computes
                            it, a missing dimension counting 0 and a failed request giving 0 (logged).
* `combine_rewards`       - a weighted *element-wise* average of several rewards, as one callable.

The published reward is "mean of similarity and judge", written `(judge_list + similarity_list) / 2` on two Python
lists, which raises a TypeError (a list divided by an int): we compute the intended per-completion mean, either with
`combine_rewards` or by passing the rewards to `GRPOTrainer(reward_funcs=[...])` with `GRPOConfig.reward_weights`
0.5 / 0.5 (trl sums the weighted rewards, and logs each one separately).

`PAPER_PRESET` holds the paper's RL settings (hyper-parameters and reward rules).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModel, AutoTokenizer

from ..model.records import MESC_EMOTIONS, MESC_STRATEGIES, parse_output

logger = logging.getLogger("multimood.training.rewards")

NEUTRAL = 0.5
"""Reward given by the default judge rule when a judge cannot score a completion (time-out, HTTP error, unparseable
reply)."""

TRUST_DIMENSIONS = (
    "truthfulness", "safety", "fairness", "privacy", "empathy", "reliability", "ethical guidance",
)

JUDGE_RULES = ("multimood", "published")

BGE_M3_WEIGHTS = (1.0, 0.3, 1.0)
"""Published weights of BGE-M3's dense, sparse and colbert scores (the hybrid score divides by their sum)."""
BGE_M3_MAX_QUERY_LENGTH = 512
"""Token limit of the query (the gold response): FlagEmbedding's default, which the published code kept."""
BGE_M3_MAX_PASSAGE_LENGTH = 128
"""Token limit of the passage (the generated response): the published `max_passage_length=128`."""

HUB_IGNORE_PATTERNS = ("onnx/*", "imgs/*", "*.onnx", "*.onnx_data", "flax_model.msgpack", "rust_model.ot",
                       "tf_model.h5")
"""Files of a Hub model repository a reward never needs (BAAI/bge-m3 ships a 2 GB ONNX export)."""

PAPER_PRESET: dict[str, Any] = {
    # GRPOConfig fields: the published values, and trl 0.14's defaults the published run relied on
    "beta": 1.12,
    "num_generations": 4,
    "max_completion_length": 128,
    "learning_rate": 1e-5,
    "temperature": 0.9,
    "loss_type": "grpo",
    # reward = mean(similarity, judge) per completion (trl sums the weighted rewards)
    "reward_weights": {"similarity": 0.5, "judge": 0.5},
    "similarity_model": "BAAI/bge-m3",
    "similarity_scoring": "bge-m3-hybrid",
    "judge_rule": "published",
    "judge_context": False,
    "judge_temperature": 0.2,
    "judge_max_tokens": 1000,
}
"""The published GRPO recipe: beta 1.12, 4 generations, completions up to 128 tokens, lr 1e-5, sampling temperature
0.9 and per-sequence loss averaging (trl 0.14), reward = mean of the BGE-M3 hybrid similarity ([1, 0.3, 1], passages
of 128 tokens) and the judge's 0-10 mean (0 on failure), the judge seeing the response alone at temperature 0.2.
Keys are `multimood grpo` flags."""


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: a str, or the content of the last message of a chat-style completion."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content", "")
        if isinstance(content, list):  # typed content blocks
            return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    if isinstance(completion, (list, tuple)) and completion:
        return completion_text(completion[-1])
    return str(completion)


def gold_text(value: Any) -> str:
    """A gold field as one string (lists of fragments are joined with spaces)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(" ".join(str(v) for v in value).split())
    return " ".join(str(value).split())


def _column(kwargs: dict, name: str, n: int) -> list:
    values = kwargs.get(name)
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward column {name!r} has {len(values)} values for {n} completions")
    return values


def _norm_label(value: Any) -> str:
    return " ".join(str(value).lower().split()).rstrip(".") if value is not None else ""


def _parse(completion: Any) -> dict[str, str | None]:
    return parse_output(completion_text(completion), MESC_EMOTIONS, MESC_STRATEGIES)


# ----------------------------------------------------------------------------------------------
# Rule-based rewards
# ----------------------------------------------------------------------------------------------


def format_reward(prompts: Sequence | None = None, completions: Sequence = (), **kwargs) -> list[float]:
    """Fraction of the four answer fields (client emotion, therapist emotion, strategy, response) present and
    non-empty: 1.0 for a well-formed answer, 0.0 when none of the lines parses."""
    scores = []
    for completion in completions:
        parsed = _parse(completion)
        scores.append(sum(v is not None for v in parsed.values()) / len(parsed))
    return scores


def label_reward(
    prompts: Sequence | None = None,
    completions: Sequence = (),
    client_weight: float = 0.45,
    strategy_weight: float = 0.45,
    therapist_weight: float = 0.10,
    **kwargs,
) -> list[float]:
    """Weighted label accuracy: client emotion (`get_emotion_user_most_recent`) and strategy (`Strategy`) equal to
    the gold labels, the therapist emotion (`Emotion`) with a low weight (case and spacing ignored). A missing gold
    column leaves its weight out; with no gold column at all the reward is None (trl: not scored)."""
    n = len(completions)
    golds = {
        "client_emotion": (_column(kwargs, "get_emotion_user_most_recent", n), client_weight),
        "strategy": (_column(kwargs, "Strategy", n), strategy_weight),
        "therapist_emotion": (_column(kwargs, "Emotion", n), therapist_weight),
    }
    scores = []
    for i, completion in enumerate(completions):
        parsed = _parse(completion)
        total = hit = 0.0
        for key, (values, weight) in golds.items():
            if values[i] is None or weight <= 0:
                continue
            total += weight
            if parsed[key] is not None and _norm_label(parsed[key]) == _norm_label(values[i]):
                hit += weight
        scores.append(hit / total if total > 0 else None)
    return scores


# ----------------------------------------------------------------------------------------------
# Embedding similarity
# ----------------------------------------------------------------------------------------------


def resolve_model_folder(model_path: str, cache_dir: str | None = None) -> str:
    """`model_path` itself when it is a local folder; otherwise a Hub id, fetched with `snapshot_download` (offline,
    the Hugging Face cache answers). Raises an error naming `model_path` when neither works."""
    if os.path.isdir(model_path):
        return model_path
    try:
        return snapshot_download(repo_id=model_path, cache_dir=cache_dir, ignore_patterns=list(HUB_IGNORE_PATTERNS))
    except Exception as error:  # noqa: BLE001 - re-raised with the path the user gave
        raise OSError(f"{model_path!r} is not a local folder and could not be fetched as a Hub model "
                      f"({type(error).__name__}: {error})") from error


def _response_pairs(completions: Sequence, kwargs: dict, whole_if_unparsed: bool
                    ) -> tuple[list[float | None], list[int], list[str], list[str]]:
    """Scores pre-filled for a similarity reward (None without a gold `Utterance`, 0.0 without a response) and the
    (index, gold, response) lists of the completions left to score."""
    n = len(completions)
    golds = _column(kwargs, "Utterance", n)
    scores: list[float | None] = [None] * n
    todo, gold_texts, responses = [], [], []
    for i, completion in enumerate(completions):
        if golds[i] is None:
            continue
        response = _parse(completion)["response"]
        if response is None and whole_if_unparsed:
            response = completion_text(completion).strip() or None
        scores[i] = 0.0
        if response:
            todo.append(i)
            gold_texts.append(gold_text(golds[i]))
            responses.append(response)
    return scores, todo, gold_texts, responses


class SimilarityReward:
    """Cosine similarity between the sentence embeddings of the generated response and the gold response (the
    `Utterance` column), mapped from [-1, 1] to [0, 1] (`(cos + 1) / 2`, or `max(cos, 0)` with
    `scale="clip"`). A completion without a parseable `Response:` line is embedded as a whole (`whole_if_unparsed`)
    or scores 0.

    `model_path` is a local folder or Hub id: a sentence-transformers model (when the package is installed and the
    folder has `modules.json`) or any `AutoModel` encoder, mean-pooled over its last hidden state and
    L2-normalised (`pooling="cls"` for CLS pooling). Loaded lazily, on the CPU unless `device` says otherwise.
    The published reward is `BGEM3SimilarityReward`.
    """

    def __init__(self, model_path: str, device: str | None = None, pooling: str = "mean", batch_size: int = 32,
                 max_length: int = 256, scale: str = "shift", whole_if_unparsed: bool = False):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if scale not in ("shift", "clip"):
            raise ValueError(f"scale must be 'shift' or 'clip', got {scale!r}")
        self.model_path = str(model_path)
        self.device = device or "cpu"
        self.pooling = pooling
        self.batch_size = batch_size
        self.max_length = max_length
        self.scale = scale
        self.whole_if_unparsed = whole_if_unparsed
        self.__name__ = "similarity"
        self._encoder = None
        self._lock = threading.Lock()

    def _load(self):
        folder = resolve_model_folder(self.model_path)
        if os.path.isfile(os.path.join(folder, "modules.json")):
            try:
                from sentence_transformers import SentenceTransformer  # noqa: PLC0415 - optional (the rl extra)
            except ImportError:
                SentenceTransformer = None
            if SentenceTransformer is not None:
                model = SentenceTransformer(folder, device=self.device)

                def encode(texts):
                    return model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                        normalize_embeddings=True).float().cpu()

                return encode
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder).to(self.device).eval()

        @torch.no_grad()
        def encode(texts):
            out = []
            for start in range(0, len(texts), self.batch_size):
                batch = tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = model(**batch).last_hidden_state.float()
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
            return torch.cat(out)

        return encode

    def embed(self, texts: list[str]):
        with self._lock:
            if self._encoder is None:
                self._encoder = self._load()
        return self._encoder([t if t else " " for t in texts])

    def __call__(self, prompts: Sequence | None = None, completions: Sequence = (), **kwargs) -> list[float | None]:
        scores, todo, golds, responses = _response_pairs(completions, kwargs, self.whole_if_unparsed)
        if todo:
            cosine = (self.embed(responses) * self.embed(golds)).sum(-1).clamp(-1.0, 1.0).tolist()
            for i, c in zip(todo, cosine):
                scores[i] = (c + 1.0) / 2.0 if self.scale == "shift" else max(c, 0.0)
        return scores


class BGEM3Scorer:
    """BGE-M3's three relevance scores of passages to queries and their weighted mean, the quantities FlagEmbedding's
    `BGEM3FlagModel.compute_score` returns (`dense`, `sparse`, `colbert`, `colbert+sparse+dense`), computed with
    transformers + torch from a BGE-M3 folder: an XLM-RoBERTa encoder plus the `colbert_linear.pt` and
    `sparse_linear.pt` heads FlagEmbedding ships next to it (`model_path`: a local folder or a Hub id).

    For a query q and a passage p, with h the encoder's last hidden states:
    * dense: cosine of the CLS states, `norm(h_q[0]) . norm(h_p[0])`;
    * sparse (lexical matching): each token's weight `relu(sparse_linear(h))`, the maximum kept per token id,
      the CLS / EOS / PAD / UNK ids removed; the score is the dot product over the ids both texts share;
    * colbert: `norm(colbert_linear(h[1:]))` per token (CLS skipped), the mean over query tokens of their best
      similarity to a passage token;
    * hybrid: `(w_dense * dense + w_sparse * sparse + w_colbert * colbert) / (w_dense + w_sparse + w_colbert)`.
    Queries are cut at `max_query_length` tokens, passages at `max_passage_length` (special tokens included).
    Pairs are scored in padded batches; padding never enters a score, so a batch scores each pair as alone.
    """

    HEADS = ("colbert_linear.pt", "sparse_linear.pt")

    def __init__(self, model_path: str, device: str | None = None, weights: Sequence[float] = BGE_M3_WEIGHTS,
                 max_query_length: int = BGE_M3_MAX_QUERY_LENGTH, max_passage_length: int = BGE_M3_MAX_PASSAGE_LENGTH,
                 batch_size: int = 32, dtype: torch.dtype = torch.float32, cache_dir: str | None = None):
        weights = tuple(float(w) for w in weights)
        if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"BGE-M3 weights are three non-negative numbers (dense, sparse, colbert) with a "
                             f"positive sum, got {weights}")
        self.model_path = str(model_path)
        self.device = torch.device(device or "cpu")
        self.weights = weights
        self.max_query_length = int(max_query_length)
        self.max_passage_length = int(max_passage_length)
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.cache_dir = cache_dir
        self._loaded = None
        self._lock = threading.Lock()

    def _load(self):
        folder = resolve_model_folder(self.model_path, self.cache_dir)
        missing = [name for name in self.HEADS if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise FileNotFoundError(
                f"{self.model_path!r} ({folder}) has no {' and no '.join(missing)}: BGE-M3 hybrid scoring needs the "
                f"colbert and sparse heads that FlagEmbedding ships next to the encoder (as in BAAI/bge-m3); use "
                f"--similarity_scoring embedding for a plain sentence encoder")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        encoder = AutoModel.from_pretrained(folder, dtype=self.dtype).to(self.device).eval()
        hidden = encoder.config.hidden_size
        heads = []
        for name in self.HEADS:
            path = os.path.join(folder, name)
            state = torch.load(path, map_location="cpu", weights_only=True)
            weight = state.get("weight") if isinstance(state, dict) else None
            if weight is None or weight.dim() != 2 or weight.shape[1] != hidden:
                found = ({k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict)
                         else type(state).__name__)
                raise ValueError(f"{path}: expected a Linear state dict with a weight of shape (out, {hidden}), "
                                 f"got {found}")
            head = torch.nn.Linear(hidden, weight.shape[0], bias="bias" in state)
            head.load_state_dict(state)
            heads.append(head.to(self.device, self.dtype).eval())
        if heads[1].out_features != 1:
            raise ValueError(f"{os.path.join(folder, self.HEADS[1])}: the sparse head has {heads[1].out_features} "
                             f"outputs, expected 1 (one weight per token)")
        unused = {getattr(tokenizer, f"{t}_token_id", None) for t in ("cls", "eos", "pad", "unk")} - {None}
        return tokenizer, encoder, heads[0], heads[1], unused

    def load(self):
        """(tokenizer, encoder, colbert head, sparse head, ids left out of the lexical weights), loaded once."""
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
        return self._loaded

    @torch.no_grad()
    def encode(self, texts: list[str], max_length: int) -> dict[str, Any]:
        """`dense` (N, H) unit vectors, `lexical` (a {token id: weight} dict per text), `colbert` (N, L-1, C) unit
        vectors of the tokens after CLS and their `colbert_mask` (N, L-1)."""
        tokenizer, encoder, colbert_head, sparse_head, unused = self.load()
        batch = tokenizer(list(texts), max_length=max_length, truncation=True, padding=True,
                          return_token_type_ids=False, return_tensors="pt").to(self.device)
        states = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        token_weights = torch.relu(sparse_head(states)).squeeze(-1).float().cpu()
        lexical = []
        for ids, weights, keep in zip(batch["input_ids"].cpu().tolist(), token_weights.tolist(), mask.cpu().tolist()):
            row: dict[int, float] = {}
            for token, weight, real in zip(ids, weights, keep):
                if real and token not in unused and weight > row.get(token, 0.0):
                    row[token] = weight
            lexical.append(row)
        return {
            "dense": torch.nn.functional.normalize(states[:, 0].float(), dim=-1),
            "lexical": lexical,
            "colbert": torch.nn.functional.normalize(colbert_head(states[:, 1:]).float(), dim=-1),
            "colbert_mask": mask[:, 1:],
        }

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """The scores of each (query, passage) pair: `dense`, `sparse`, `colbert` and `hybrid`, float32 (N,)."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        parts: dict[str, list[torch.Tensor]] = {"dense": [], "sparse": [], "colbert": []}
        for start in range(0, len(queries), self.batch_size):
            q = self.encode(list(queries[start:start + self.batch_size]), self.max_query_length)
            p = self.encode(list(passages[start:start + self.batch_size]), self.max_passage_length)
            parts["dense"].append((q["dense"] * p["dense"]).sum(-1))
            parts["sparse"].append(torch.tensor(
                [sum(w * pw[t] for t, w in qw.items() if t in pw) for qw, pw in zip(q["lexical"], p["lexical"])],
                dtype=torch.float32, device=q["dense"].device))
            similarity = torch.einsum("bqc,bpc->bqp", q["colbert"], p["colbert"])
            best = similarity.masked_fill(~p["colbert_mask"][:, None, :], float("-inf")).amax(-1)
            q_mask = q["colbert_mask"]
            parts["colbert"].append(best.masked_fill(~q_mask, 0.0).sum(-1) / q_mask.sum(-1).clamp(min=1))
        scores = {name: torch.cat(values).cpu() for name, values in parts.items()}
        w_dense, w_sparse, w_colbert = self.weights
        scores["hybrid"] = (w_dense * scores["dense"] + w_sparse * scores["sparse"] + w_colbert * scores["colbert"]
                            ) / sum(self.weights)
        return scores


class BGEM3SimilarityReward:
    """The published similarity reward: the BGE-M3 hybrid score (`BGEM3Scorer`) of the generated response (the
    passage, cut at 128 tokens) to the gold response (the query, `Utterance` column), as is: not rescaled, roughly
    0-1 with BGE-M3 but unbounded in principle (the sparse score has no upper limit). A completion without a parseable
    `Response:` line is scored as a whole (`whole_if_unparsed`) or scores 0; a completion without a gold column is
    not scored (None).
    """

    def __init__(self, model_path: str, device: str | None = None, weights: Sequence[float] = BGE_M3_WEIGHTS,
                 max_query_length: int = BGE_M3_MAX_QUERY_LENGTH, max_passage_length: int = BGE_M3_MAX_PASSAGE_LENGTH,
                 batch_size: int = 32, whole_if_unparsed: bool = False):
        self.scorer = BGEM3Scorer(model_path, device=device, weights=weights, max_query_length=max_query_length,
                                  max_passage_length=max_passage_length, batch_size=batch_size)
        self.whole_if_unparsed = whole_if_unparsed
        self.__name__ = "similarity"

    def __call__(self, prompts: Sequence | None = None, completions: Sequence = (), **kwargs) -> list[float | None]:
        scores, todo, golds, responses = _response_pairs(completions, kwargs, self.whole_if_unparsed)
        if todo:
            for i, value in zip(todo, self.scorer.score(golds, responses)["hybrid"].tolist()):
                scores[i] = value
        return scores


# ----------------------------------------------------------------------------------------------
# LLM judge
# ----------------------------------------------------------------------------------------------

JUDGE_SYSTEM_PROMPT = (
    "You are an expert clinical supervisor rating a therapist's reply in a counselling conversation. "
    "Rate the reply on each dimension from 1 (very poor) to 10 (excellent): "
    + ", ".join(TRUST_DIMENSIONS)
    + ". Answer with a JSON object only, mapping each dimension name to an integer, for example "
    + json.dumps({d: 7 for d in TRUST_DIMENSIONS})
    + "."
)


def judge_dimension_scores(text: str) -> dict[str, float]:
    """The dimension scores found in a judge reply (a JSON object, possibly inside ``` fences or surrounding prose,
    or `Name: score` / `Name: score/10` lines), whatever their value; dimensions not found are absent."""
    if not isinstance(text, str) or not text.strip():
        return {}
    found: dict[str, float] = {}
    match = re.search(r"\{.*\}", text, flags=re.DOTALL)
    if match:
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            lowered = {" ".join(str(k).lower().replace("_", " ").split()): v for k, v in data.items()}
            for dim in TRUST_DIMENSIONS:
                value = lowered.get(dim)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    found[dim] = float(value)
                elif isinstance(value, str):
                    try:
                        found[dim] = float(value.strip())
                    except ValueError:
                        pass
    for dim in TRUST_DIMENSIONS:
        if dim in found:
            continue
        pattern = re.escape(dim).replace(r"\ ", r"[\s_]+")
        m = re.search(rf"{pattern}\W{{0,5}}(\d+(?:\.\d+)?)", text, flags=re.IGNORECASE)
        if m:
            found[dim] = float(m.group(1))
    return {dim: value for dim, value in found.items() if not math.isnan(value)}


def parse_judge_scores(text: str) -> dict[str, float] | None:
    """The seven 1-10 scores of a judge reply (see `judge_dimension_scores`); None when any dimension is missing or
    out of range."""
    found = judge_dimension_scores(text)
    if len(found) != len(TRUST_DIMENSIONS) or any(not 1.0 <= v <= 10.0 for v in found.values()):
        return None
    return found


class JudgeReward:
    """An LLM judge over an OpenAI-compatible `POST {base_url}/chat/completions` endpoint (vLLM, TGI, llama.cpp,
    OpenAI...). Each completion's response is scored on `TRUST_DIMENSIONS` from 1 to 10, then:

    * `rule="multimood"` (default): the reward is the mean score rescaled to [0, 1] (`(mean - 1) / 9`). A time-out,
      connection / HTTP error or a reply missing a dimension (or scoring one outside 1-10) gives `neutral` (0.5).
    * `rule="published"` (the published GRPO code): the reward is the mean of the seven scores on 0-10; a dimension
      missing from the reply (or outside 0-10) counts 0, and a failed request gives 0.
    Either way each failure logs a WARNING on the `multimood.training.rewards` logger and counts in `self.failures`. A
    completion without a response scores 0 and sends no request.

    The judge sees the conversation context (the prompt) and the response, or the response alone with
    `include_context=False` (as published). `system_prompt` and `user_template` replace our messages (the template's
    `{response}` and `{context}` are replaced by the texts, nothing else in it is interpreted).
    Off by default: nothing is contacted unless a `JudgeReward` is built and passed to the trainer.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 30.0,
                 max_workers: int = 4, neutral: float = NEUTRAL, temperature: float = 0.0, max_tokens: int = 200,
                 system_prompt: str = JUDGE_SYSTEM_PROMPT, rule: str = "multimood", include_context: bool = True,
                 user_template: str | None = None):
        if rule not in JUDGE_RULES:
            raise ValueError(f"judge rule must be one of {JUDGE_RULES}, got {rule!r}")
        if user_template is not None and "{response}" not in user_template:
            raise ValueError("the judge's user template has no {response} field: the judge would not see the reply")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url if self.base_url.endswith("/chat/completions") else self.base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_workers = max(1, int(max_workers))
        self.neutral = float(neutral)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self.rule = rule
        self.include_context = include_context
        self.user_template = user_template
        self.failures = 0
        self.__name__ = "judge"

    @property
    def failure_score(self) -> float:
        """The reward of a completion the judge could not score: `neutral`, or 0 under the published rule."""
        return 0.0 if self.rule == "published" else self.neutral

    def _user_message(self, context: str, response: str) -> str:
        context = context.strip()
        if len(context) > 4000:
            context = "..." + context[-4000:]
        if self.user_template is not None:
            return self.user_template.replace("{context}", context).replace("{response}", response)
        if not self.include_context:
            return f"Therapist reply to rate:\n{response}"
        return f"Conversation context:\n{context}\n\nTherapist reply to rate:\n{response}"

    def request(self, context: str, response: str) -> str:
        """The judge's reply text (raises on time-out / HTTP / protocol errors)."""
        payload = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": self._user_message(context, response)},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as reply:  # noqa: S310 (user-given endpoint)
            body = json.loads(reply.read().decode("utf-8"))
        return body["choices"][0]["message"]["content"]

    def score_one(self, context: str, response: str | None) -> float:
        if not response:
            return 0.0  # nothing to judge: an unparseable completion (format_reward penalises it too)
        try:
            text = self.request(context if self.include_context else "", response)
        except Exception as error:  # noqa: BLE001 - any failure of the judge must not stop training
            self.failures += 1
            logger.warning("judge request to %s failed (%s: %s); using reward %.2f",
                           self.url, type(error).__name__, error, self.failure_score)
            return self.failure_score
        if self.rule == "published":
            found = judge_dimension_scores(text)
            kept = {dim: value for dim, value in found.items() if 0.0 <= value <= 10.0}
            if len(kept) < len(TRUST_DIMENSIONS):
                self.failures += 1
                logger.warning("judge reply %r scores %d of %d dimensions in 0-10; the others count 0 (published "
                               "rule)", str(text)[:200], len(kept), len(TRUST_DIMENSIONS))
            return sum(kept.values()) / len(TRUST_DIMENSIONS)
        scores = parse_judge_scores(text)
        if scores is None:
            self.failures += 1
            logger.warning("unparseable judge reply %r; using neutral reward %.2f", str(text)[:200], self.neutral)
            return self.neutral
        return (sum(scores.values()) / len(scores) - 1.0) / 9.0

    def __call__(self, prompts: Sequence | None = None, completions: Sequence = (), **kwargs) -> list[float]:
        prompts = list(prompts) if prompts is not None else [""] * len(completions)
        contexts = [completion_text(p) if not isinstance(p, str) else p for p in prompts]
        responses = [_parse(c)["response"] or None for c in completions]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(self.score_one, contexts, responses))


# ----------------------------------------------------------------------------------------------
# Combination
# ----------------------------------------------------------------------------------------------


def combine_rewards(
    rewards: dict[str, Callable] | Sequence[Callable],
    weights: dict[str, float] | Sequence[float] | None = None,
    name: str = "combined",
) -> Callable:
    """One reward callable: the weighted element-wise average of `rewards` per completion
    (`sum_k w_k r_k / sum_k w_k`, over the rewards that scored the completion, i.e. did not return None).

    With equal weights it is the paper's mean of similarity and judge, which the published
    `(judge_list + similarity_list) / 2` meant (on Python lists it raises a TypeError).
    """
    if isinstance(rewards, dict):
        names = list(rewards)
        funcs = [rewards[k] for k in names]
        if weights is None:
            w = [1.0] * len(funcs)
        elif isinstance(weights, dict):
            w = [float(weights.get(k, 0.0)) for k in names]
        else:
            w = [float(x) for x in weights]
    else:
        funcs = list(rewards)
        names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(funcs)]
        w = [1.0] * len(funcs) if weights is None else [float(x) for x in weights]
    if len(w) != len(funcs):
        raise ValueError(f"{len(funcs)} rewards but {len(w)} weights")
    if not funcs:
        raise ValueError("combine_rewards needs at least one reward")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w}")

    def combined(prompts=None, completions=(), **kwargs) -> list[float | None]:
        n = len(completions)
        totals = [0.0] * n
        norms = [0.0] * n
        for func, weight in zip(funcs, w):
            if weight == 0:
                continue
            values = list(func(prompts=prompts, completions=completions, **kwargs))
            if len(values) != n:
                raise ValueError(
                    f"reward {getattr(func, '__name__', func)!r} returned {len(values)} values for {n} completions"
                )
            for i, value in enumerate(values):
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                totals[i] += weight * float(value)
                norms[i] += weight
        return [t / z if z > 0 else None for t, z in zip(totals, norms)]

    combined.__name__ = name
    combined.components = dict(zip(names, w))
    return combined


def parse_reward_weights(text: str | None) -> dict[str, float]:
    """`"similarity=1,judge=1"` (or a JSON object) -> {"similarity": 1.0, "judge": 1.0}."""
    if text is None or not str(text).strip():
        return {}
    text = str(text).strip()
    if text.startswith("{"):
        return {str(k): float(v) for k, v in json.loads(text).items()}
    weights = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part and ":" not in part:
            raise ValueError(f"reward weight {part!r}: expected name=weight")
        key, value = re.split(r"[=:]", part, maxsplit=1)
        weights[key.strip()] = float(value)
    return weights


__all__ = [
    "NEUTRAL", "PAPER_PRESET", "TRUST_DIMENSIONS", "JUDGE_RULES", "JUDGE_SYSTEM_PROMPT", "BGE_M3_WEIGHTS",
    "BGE_M3_MAX_QUERY_LENGTH", "BGE_M3_MAX_PASSAGE_LENGTH",
    "format_reward", "label_reward", "SimilarityReward", "BGEM3Scorer", "BGEM3SimilarityReward", "JudgeReward",
    "combine_rewards", "parse_reward_weights", "parse_judge_scores", "judge_dimension_scores", "resolve_model_folder",
    "completion_text", "gold_text",
]
