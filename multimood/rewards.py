"""Reward functions for GRPO fine-tuning of MultiMood (trl-compatible callables).

Every reward is a plain callable `reward(prompts, completions, **kwargs) -> list[float]`, the signature trl's
`GRPOTrainer` calls: `completions` are the generated texts (or chat-style `[{"role": "assistant", "content": ...}]`
lists), and the gold answer is read from the dataset columns that trl passes as keyword arguments (one list entry per
completion): `Utterance` (the gold response: a str or a list of fragments), `get_emotion_user_most_recent` (client
emotion), `Emotion` (therapist emotion), `Strategy`. Every value is in [0, 1].

* `format_reward`        - the four answer lines are present and non-empty (partial credit per field).
* `label_reward`         - client emotion and strategy equal the gold labels; the therapist emotion has a low weight.
* `SimilarityReward`     - cosine similarity of the response's sentence embedding to the gold response's, in [0, 1].
* `JudgeReward`          - optional LLM judge (OpenAI-compatible chat completions) over seven trustworthiness
                           dimensions, 1-10 each, rescaled to [0, 1]. A time-out, an HTTP error or an unparseable
                           reply gives the logged `NEUTRAL` value (0.5): never a crash, never a silent zero.
* `combine_rewards`      - a weighted *element-wise* average of several rewards, as one callable.

The published reward is "mean of similarity and judge" but its code added the two Python lists, which concatenates
them (2N values for N completions) instead of averaging: `combine_rewards` averages per completion. Passing the
rewards separately to `GRPOTrainer(reward_funcs=[...])` with `GRPOConfig.reward_weights` is equivalent up to scale
(trl sums the weighted rewards before normalising advantages) and logs each reward separately.

`PAPER_PRESET` holds the paper's RL hyper-parameters.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from .processing_multimood import MESC_EMOTIONS, MESC_STRATEGIES, parse_output

logger = logging.getLogger("multimood.rewards")

NEUTRAL = 0.5
"""Reward given when a judge cannot score a completion (time-out, HTTP error, unparseable reply)."""

TRUST_DIMENSIONS = (
    "truthfulness", "safety", "fairness", "privacy", "empathy", "reliability", "ethical guidance",
)

PAPER_PRESET: dict[str, Any] = {
    # GRPOConfig fields
    "beta": 1.12,
    "num_generations": 4,
    "max_completion_length": 128,
    "learning_rate": 1e-5,
    # reward = mean(similarity, judge), element-wise (the published code concatenated the two lists: a defect)
    "reward_weights": {"similarity": 1.0, "judge": 1.0},
    "similarity_model": "BAAI/bge-m3",
}
"""The paper's GRPO recipe: beta 1.12, 4 generations, completions up to 128 tokens, lr 1e-5, reward = mean of the
BGE-M3 embedding similarity and the LLM-judged trustworthiness score."""


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


class SimilarityReward:
    """Cosine similarity between the sentence embeddings of the generated response and the gold response (the
    `Utterance` column), mapped from [-1, 1] to [0, 1] (`(cos + 1) / 2`, or `max(cos, 0)` with
    `scale="clip"`). A completion without a parseable `Response:` line is embedded as a whole (`whole_if_unparsed`)
    or scores 0.

    `model_path` is a local folder or Hub id: a sentence-transformers model (when the package is installed and the
    folder has `modules.json`) or any `AutoModel` encoder, mean-pooled over its last hidden state and
    L2-normalised (BGE-M3 uses CLS pooling: pass `pooling="cls"`). Loaded lazily, on the CPU unless `device` says
    otherwise.
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
        import os  # noqa: PLC0415

        if os.path.isfile(os.path.join(self.model_path, "modules.json")):
            try:
                from sentence_transformers import SentenceTransformer  # noqa: PLC0415
            except ImportError:
                SentenceTransformer = None
            if SentenceTransformer is not None:
                model = SentenceTransformer(self.model_path, device=self.device)

                def encode(texts):
                    return model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                        normalize_embeddings=True).float().cpu()

                return encode
        import torch  # noqa: PLC0415
        from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModel.from_pretrained(self.model_path).to(self.device).eval()

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
        n = len(completions)
        golds = _column(kwargs, "Utterance", n)
        responses = []
        for completion in completions:
            parsed = _parse(completion)
            response = parsed["response"]
            if response is None and self.whole_if_unparsed:
                response = completion_text(completion).strip() or None
            responses.append(response)
        scores: list[float | None] = [None] * n
        todo = [i for i in range(n) if golds[i] is not None]
        for i in todo:
            scores[i] = 0.0
        todo = [i for i in todo if responses[i]]
        if todo:
            a = self.embed([responses[i] for i in todo])
            b = self.embed([gold_text(golds[i]) for i in todo])
            cosine = (a * b).sum(-1).clamp(-1.0, 1.0).tolist()
            for i, c in zip(todo, cosine):
                scores[i] = (c + 1.0) / 2.0 if self.scale == "shift" else max(c, 0.0)
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


def parse_judge_scores(text: str) -> dict[str, float] | None:
    """The seven 1-10 scores of a judge reply (a JSON object, possibly inside ``` fences or surrounding prose, or
    `name: score` lines); None when any dimension is missing or out of range."""
    if not isinstance(text, str) or not text.strip():
        return None
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
    if len(found) < len(TRUST_DIMENSIONS):
        for dim in TRUST_DIMENSIONS:
            if dim in found:
                continue
            pattern = re.escape(dim).replace(r"\ ", r"[\s_]+")
            m = re.search(rf"{pattern}\W{{0,5}}(\d+(?:\.\d+)?)", text, flags=re.IGNORECASE)
            if m:
                found[dim] = float(m.group(1))
    if len(found) != len(TRUST_DIMENSIONS) or any(not (1.0 <= v <= 10.0) or math.isnan(v) for v in found.values()):
        return None
    return found


class JudgeReward:
    """An LLM judge over an OpenAI-compatible `POST {base_url}/chat/completions` endpoint (vLLM, TGI, llama.cpp,
    OpenAI...). Each completion's response is scored on `TRUST_DIMENSIONS` from 1 to 10; the reward is the mean
    score rescaled to [0, 1] (`(mean - 1) / 9`). A time-out, connection / HTTP error or unparseable reply gives
    `neutral` (0.5) and a WARNING on the `multimood.rewards` logger; `self.failures` counts them.

    Off by default: nothing is contacted unless a `JudgeReward` is built and passed to the trainer.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 30.0,
                 max_workers: int = 4, neutral: float = NEUTRAL, temperature: float = 0.0, max_tokens: int = 200,
                 system_prompt: str = JUDGE_SYSTEM_PROMPT):
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
        self.failures = 0
        self.__name__ = "judge"

    def _user_message(self, context: str, response: str) -> str:
        context = context.strip()
        if len(context) > 4000:
            context = "..." + context[-4000:]
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
            text = self.request(context, response)
        except Exception as error:  # noqa: BLE001 - any failure of the judge must not stop training
            self.failures += 1
            logger.warning("judge request to %s failed (%s: %s); using neutral reward %.2f",
                           self.url, type(error).__name__, error, self.neutral)
            return self.neutral
        scores = parse_judge_scores(text)
        if scores is None:
            self.failures += 1
            logger.warning("unparseable judge reply %r; using neutral reward %.2f", str(text)[:200], self.neutral)
            return self.neutral
        return (sum(scores.values()) / len(scores) - 1.0) / 9.0

    def __call__(self, prompts: Sequence | None = None, completions: Sequence = (), **kwargs) -> list[float]:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        prompts = list(prompts) if prompts is not None else [""] * len(completions)
        contexts = [completion_text(p) if not isinstance(p, str) else p for p in prompts]
        responses = [_parse(c)["response"] or None for c in completions]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(self.score_one, contexts, responses))


# ----------------------------------------------------------------------------------------------
# Combination
# ----------------------------------------------------------------------------------------------


def combine_rewards(rewards: dict[str, Callable] | Sequence[Callable], weights: dict[str, float] | Sequence[float] | None = None,
                    name: str = "combined") -> Callable:
    """One reward callable: the weighted element-wise average of `rewards` per completion
    (`sum_k w_k r_k / sum_k w_k`, over the rewards that scored the completion, i.e. did not return None).

    This is the fixed form of the published `similarity + judge` (list concatenation); with equal weights it is
    the paper's mean of the two scores.
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
                raise ValueError(f"reward {getattr(func, '__name__', func)!r} returned {len(values)} values for {n} completions")
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
    "NEUTRAL", "PAPER_PRESET", "TRUST_DIMENSIONS", "JUDGE_SYSTEM_PROMPT",
    "format_reward", "label_reward", "SimilarityReward", "JudgeReward",
    "combine_rewards", "parse_reward_weights", "parse_judge_scores", "completion_text", "gold_text",
]
