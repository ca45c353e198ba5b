"""`EmotionalSupportPipeline`: the "emotional-support" pipeline of MultiMood.

    from transformers import pipeline

    pipe = pipeline("emotional-support", model="path/to/model", trust_remote_code=True)
    pipe(record, video_folder="clips/")          # one record of the dialogue JSONL schema -> one dict
    pipe(records, video_folder="clips/", batch_size=8, max_new_tokens=128)   # a list -> a list
    pipe({"utterance": "I can't sleep.", "videos": ["me.mp4"], "history": [...],
          "situation": "...", "problem_type": "..."})                        # the simple form

Each answer is a dict with `client_emotion`, `therapist_emotion`, `strategy`, `response` and
`generated_text` (the decoded answer). Inputs are records of the dialogue JSONL schema
(`utt_user_most_recent`, `path_to_vid_user_most_recent`, `history_chat`, `situation`, `problem_type`, ...;
clip names are resolved against `video_folder`) or the simple form (`utterance` str or list, `videos`,
`history` as `{"role", "content"}` messages, `"Client: ..."` / `"Therapist: ..."` strings or `(speaker,
text)` pairs, `situation`, `problem_type`); a plain string is an utterance.

Constrained decoding (on by default): the three label lines are forced, token by token, to
`<line prefix><one label of the processor's label set>` followed by the `Response:` prefix; the
response itself is free. The line prefixes are read from the processor's own answer format
(`processor.format_target`), the labels from `processor.emotion_labels` / `strategy_labels`, so
labels are always members of the label sets, even with an untrained model. `constrained=False`
generates freely; labels outside the label sets (or missing) are then listed in `unknown_labels`
(`{field: value}`) and a warning is issued.

Label probabilities (`return_label_scores=True`): each answer also gets `label_scores`, for each label
line the probability of every label of its set under constrained decoding, given the prompt and the
answer's earlier lines (the candidates are read from the cache of their common context).

Batching (`batch_size=N`) pads on the left and gives the same answers as one record at a time.
Generation parameters (`max_new_tokens`, `do_sample`, `num_beams`, `generation_config`,
`logits_processor`...) pass through to `generate`; `device`, `dtype` and `device_map` behave as in
transformers.

Saving: `save_pipeline_files(folder)` copies this file (and `records.py`, which it imports) into a saved
model folder and declares the task in its `config.json` (`custom_pipelines`), after which
`pipeline("emotional-support", model=folder, trust_remote_code=True)` works in a process that never
imported `multimood`.
`pipe.save_pretrained(folder)` saves model, processor and this file together.

This file is Hub remote code: it imports only torch, public transformers API and its sibling `records`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, Pipeline
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.generation import GenerationConfig
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

from .records import ANSWER_FIELDS, LABEL_FIELDS, speaker_role

logger = logging.get_logger(__name__)

TASK = "emotional-support"
# What `config.json` declares (the format `Pipeline.save_pretrained` writes for registered pipelines).
CUSTOM_PIPELINES = {
    TASK: {"impl": "pipeline_multimood.EmotionalSupportPipeline", "pt": ["AutoModelForCausalLM"], "type": "multimodal"}
}
SIMPLE_FORM_KEYS = ("utterance", "videos", "history", "situation", "problem_type", "Dialogue_ID")


# ----------------------------------------------------------------------------------------------
# Constrained decoding of the label lines
# ----------------------------------------------------------------------------------------------


class _TrieNode:
    __slots__ = ("children", "terminal", "allowed")

    def __init__(self):
        self.children: dict[int, _TrieNode] = {}
        self.terminal = False
        self.allowed: list[int] | None = None  # token ids allowed at this node (filled by AnswerConstraint)


def _build_trie(sequences: Iterable[Sequence[int]]) -> _TrieNode:
    root = _TrieNode()
    for sequence in sequences:
        if not sequence:
            raise ValueError("an allowed token sequence is empty")
        node = root
        for token in sequence:
            node = node.children.setdefault(int(token), _TrieNode())
        node.terminal = True
    return root


class AnswerConstraint:
    """The token sequences the start of an answer may take: one trie per segment, then free text.

    `segments[i]` lists the allowed token sequences of segment i (e.g. the tokens of
    `"Client emotion: sadness\\n"` for each emotion label). A row's state is found by walking its
    generated tokens through the tries; once the last segment is complete the row is free. A token
    outside the tries (forced by something else) leaves the row unconstrained.
    """

    FREE = "free"
    INVALID = "invalid"

    def __init__(self, segments: Sequence[Sequence[Sequence[int]]]):
        if not segments:
            raise ValueError("AnswerConstraint needs at least one segment")
        self.segments = [[list(map(int, s)) for s in seqs] for seqs in segments]
        self.tries = [_build_trie(seqs) for seqs in self.segments]
        self._tensors: dict[tuple[int, str], torch.Tensor] = {}
        for index, root in enumerate(self.tries):
            self._fill_allowed(root, index)

    def _fill_allowed(self, node: _TrieNode, segment: int) -> None:
        allowed = list(node.children)
        if node.terminal:
            if segment + 1 >= len(self.tries):
                allowed = None  # the last segment may end here: anything may follow
            else:
                allowed = sorted(set(allowed) | set(self.tries[segment + 1].children))
        node.allowed = allowed
        for child in node.children.values():
            self._fill_allowed(child, segment)

    def walk(self, tokens: Sequence[int]) -> tuple[Any, list[int]]:
        """(the state after `tokens`, the offset in `tokens` where each segment reached so far starts).

        The state is `(segment, node)`, or `FREE` (constraint done) or `INVALID` (left the tries).
        """
        segment, node, starts = 0, self.tries[0], [0]
        for offset, token in enumerate(tokens):
            while True:
                child = node.children.get(token)
                if child is not None:
                    node = child
                    if node.terminal and not node.children:
                        segment += 1
                        if segment == len(self.tries):
                            return self.FREE, starts
                        node = self.tries[segment]
                        starts.append(offset + 1)
                    break
                if node.terminal:  # a complete sequence that a longer one extends: `token` starts the next segment
                    segment += 1
                    if segment == len(self.tries):
                        return self.FREE, starts
                    node = self.tries[segment]
                    starts.append(offset)
                    continue
                return self.INVALID, starts
        return (segment, node), starts

    def state(self, tokens: Sequence[int]):
        """`(segment, node)` after `tokens`, or `FREE` (constraint done) or `INVALID` (left the tries)."""
        return self.walk(tokens)[0]

    def sequence_log_probs(self, segment: int, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of segment `segment`'s sequences under constrained decoding.

        `logits[k, j]` are the next-token logits after the context and the first j tokens of sequence k
        (k in the order of `segments[segment]`, j = 0..len(sequence k)). At every trie node the
        distribution is renormalised over the allowed tokens, as `AnswerFormatLogitsProcessor` does;
        a sequence that another one extends ends with the probability of its allowed next-segment tokens.
        """
        log_probs = torch.zeros(len(self.segments[segment]), dtype=torch.float32)
        for k, sequence in enumerate(self.segments[segment]):
            node, total = self.tries[segment], torch.zeros((), dtype=torch.float32)
            for j, token in enumerate(sequence):
                step = logits[k, j, node.allowed].float().log_softmax(-1)
                total = total + step[node.allowed.index(token)]
                node = node.children[token]
            if node.children:  # the sequence ends only if the next token leaves the trie
                step = logits[k, len(sequence)].float().log_softmax(-1)
                if node.allowed is None:  # anything may follow the last segment
                    continuing = step[list(node.children)].logsumexp(-1)
                    total = total + torch.log1p(-continuing.exp())
                else:
                    ends = [token for token in node.allowed if token not in node.children]
                    total = total + step[ends].logsumexp(-1) - step[node.allowed].logsumexp(-1)
            log_probs[k] = total
        return log_probs

    def allowed_tokens(self, tokens: Sequence[int]) -> list[int] | None:
        """Token ids allowed after `tokens` (the generated part only); `None` when unconstrained."""
        state = self.state(tokens)
        if state in (self.FREE, self.INVALID):
            return None
        return state[1].allowed

    def allowed_tensor(self, tokens: Sequence[int], device: torch.device) -> torch.Tensor | None:
        state = self.state(tokens)
        if state in (self.FREE, self.INVALID) or state[1].allowed is None:
            return None
        key = (id(state[1]), str(device))
        tensor = self._tensors.get(key)
        if tensor is None:
            tensor = torch.tensor(state[1].allowed, dtype=torch.long, device=device)
            self._tensors[key] = tensor
        return tensor

    def max_length(self) -> int:
        """Tokens needed to complete every segment in the worst case."""
        return sum(max(len(s) for s in seqs) for seqs in self.segments)

    @classmethod
    def from_processor(cls, processor, prompt_style: str | None = None) -> "AnswerConstraint":
        """The constraint of a MultiMood processor's answer format (of `prompt_style`, default the
        processor's) and label sets."""
        segments = answer_segments(processor, prompt_style)
        tokenizer = processor.tokenizer
        encoded = [
            [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts] for texts in segments
        ]
        constraint = cls(encoded)
        # The trained answers are tokenized in one piece: check that the segments tokenize the same way.
        sample = "".join(texts[0] for texts in segments)
        joined = [t for seqs in encoded for t in seqs[0]]
        if tokenizer(sample, add_special_tokens=False)["input_ids"] != joined:
            logger.warning(
                "The label lines tokenize differently alone than inside an answer; constrained decoding still "
                "yields valid labels but may force token splits the model was not trained on."
            )
        return constraint


def answer_segments(processor, prompt_style: str | None = None) -> list[list[str]]:
    """The text segments of the constrained answer start, read from `processor.format_target`.

    With the default format: `["Client emotion: {e}\\n" for e in emotions]`, `["Therapist emotion:
    {e}\\n" ...]`, `["Strategy: {s}\\n" for s in strategies]`, `["Response:"]`; with a published
    prompt style `["Client's emotion: {e} \\n" ...]`, ..., `["Therapist's response:"]`.
    """
    sentinels = [f"QQMULTIMOODFIELD{i}QQ" for i in range(4)]
    fake = {
        "get_emotion_user_most_recent": sentinels[0],
        "Emotion": sentinels[1],
        "Strategy": sentinels[2],
        "Utterance": [sentinels[3]],
    }
    text = processor.format_target(fake, **({} if prompt_style is None else {"prompt_style": prompt_style}))
    pieces, position = [], 0
    for sentinel in sentinels:
        found = text.find(sentinel, position)
        if found < 0:
            raise ValueError(f"cannot read the answer format from the processor: {text!r}")
        pieces.append(text[position:found])
        position = found + len(sentinel)
    # Spaces and line breaks before a line prefix end the previous line's segment, so a label is never
    # a prefix of another label's segment.
    suffixes = ["", "", ""]
    for i in (1, 2, 3):
        stripped = pieces[i].lstrip(" \r\n")
        suffixes[i - 1] = pieces[i][: len(pieces[i]) - len(stripped)]
        pieces[i] = stripped
    labels = [processor.emotion_labels, processor.emotion_labels, processor.strategy_labels]
    segments = [[pieces[i] + label + suffixes[i] for label in labels[i]] for i in range(3)]
    response_prefix = pieces[3].rstrip(" ")  # the space belongs to the first word of the response
    if response_prefix:
        segments.append([response_prefix])
    return segments


class AnswerFormatLogitsProcessor(LogitsProcessor):
    """Masks every token that would leave the answer format (see `AnswerConstraint`).

    `prompt_length` is the (left-padded) prompt width: the generated part of row r is
    `input_ids[r, prompt_length:]`. Rows are judged from their tokens alone, so beams and several
    sequences per input work; once every row is past the constrained part, nothing is done. Make one
    per `generate` call.
    """

    def __init__(self, constraint: AnswerConstraint, prompt_length: int):
        self.constraint = constraint
        self.prompt_length = int(prompt_length)
        self.window = constraint.max_length() + 1  # generated tokens that can matter
        self.done = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.done:
            return scores
        generated = input_ids[:, self.prompt_length : self.prompt_length + self.window].tolist()
        constrained = []
        for row, tokens in enumerate(generated):
            ids = self.constraint.allowed_tensor(tokens, scores.device)
            if ids is not None:
                constrained.append((row, ids))
        if not constrained:
            # Every row is past the label lines; the rows of later steps extend these rows' prefixes.
            self.done = True
            return scores
        out = scores.clone()
        for row, ids in constrained:
            values = scores[row, ids]
            if bool(torch.isneginf(values).all()):
                # Something earlier (bad words, suppressed tokens) removed every allowed token: keep them all.
                values = torch.zeros_like(values)
            out[row].fill_(-float("inf"))
            out[row, ids] = values
        return out


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def _as_list(value: Any, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)):
        return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
    raise TypeError(f"`{name}` must be a str or a list, got {type(value).__name__}")


def _history_message(message: Any, index: int) -> Any:
    """A simple-form history item as a record message: a `(speaker, text)` pair becomes `{"role", "content"}`;
    messages and `"Client: ..."` strings are the record schema already (the processor reads and checks them)."""
    if isinstance(message, (list, tuple)) and len(message) == 2:
        speaker, text = message
        role = speaker_role(speaker)
        if role is None:
            raise ValueError(f"history item {index}: unknown speaker {speaker!r} (client/therapist/user/assistant)")
        return {"role": role, "content": text}
    return message


def to_record(item: Any) -> dict:
    """A record of the dialogue JSONL schema from a record, the simple form or an utterance string."""
    if isinstance(item, str):
        item = {"utterance": item}
    if not isinstance(item, dict):
        raise TypeError(f"an input must be a record dict, a simple-form dict or a str, got {type(item).__name__}")
    if "utt_user_most_recent" in item:
        return item
    if "utterance" not in item:
        raise ValueError(
            "an input needs `utt_user_most_recent` (a record of the dialogue JSONL schema) or `utterance` "
            f"(the simple form: {', '.join(SIMPLE_FORM_KEYS)}); got keys {sorted(item)}"
        )
    unknown = sorted(set(item) - set(SIMPLE_FORM_KEYS))
    if unknown:
        raise ValueError(f"unknown simple-form keys {unknown}; expected some of {list(SIMPLE_FORM_KEYS)}")
    record: dict[str, Any] = {"utt_user_most_recent": _as_list(item["utterance"], "utterance")}
    videos = _as_list(item.get("videos"), "videos")
    if videos:
        record["path_to_vid_user_most_recent"] = videos
    history = item.get("history")
    if history:
        if isinstance(history, str):
            history = [history]
        record["history_chat"] = [_history_message(m, i) for i, m in enumerate(history)]
    for key in ("situation", "problem_type", "Dialogue_ID"):
        if item.get(key) is not None:
            record[key] = item[key]
    return record


def _chunks(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _stream_chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


class EmotionalSupportPipeline(Pipeline):
    """Client emotion, therapist emotion, strategy and response for counselling-session records.

    Args (at construction or per call):
        video_folder (`str`): folder that clip names (records' `path_to_vid_user_most_recent`,
            simple-form `videos`) are relative to; without it they are used as given.
        constrained (`bool`, defaults to `True`): force the label lines to the label sets.
        batch_size (`int`, defaults to 1): records per `generate` call (left padding).
        processor_kwargs (`dict`): extra processor arguments (`k_turn_history`, `max_length`...).
        prompt_style (`str`, *optional*): the processor's `prompt_style` for these calls (`"multimood"`,
            `"published-train"`, `"published-eval"`): the prompt and the constrained answer format
            follow it; default: the processor's own.
        skip_special_tokens (`bool`, defaults to `True`): how the answer is decoded.
        return_label_scores (`bool`, defaults to `False`): add `label_scores`, each label line's
            probabilities over its label set under constrained decoding, given the answer's earlier lines.
        Anything else is a generation parameter (`max_new_tokens`, `do_sample`, `num_beams`...).

    Returns one dict per input (a list for a list input; with `num_return_sequences=k > 1`, a list
    of k dicts per input): `client_emotion`, `therapist_emotion`, `strategy`, `response`,
    `generated_text`, and `unknown_labels` (`{field: value}`) when a label is missing or outside its
    label set (only possible with `constrained=False` or a too small `max_new_tokens`); with
    `return_label_scores=True`, `label_scores` (`{field: {label: probability}}` for each label line whose
    start the answer reached).
    """

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _load_video_processor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError("EmotionalSupportPipeline needs the MultiMood processor (`processor=`)")
        if self.tokenizer is None:
            self.tokenizer = self.processor.tokenizer
        self._constraints: dict[tuple, AnswerConstraint] = {}

    # ------------------------------------------------------------------ parameters

    def _sanitize_parameters(
        self,
        video_folder=None,
        constrained=None,
        processor_kwargs=None,
        skip_special_tokens=None,
        return_label_scores=None,
        prompt_style=None,
        **generate_kwargs,
    ):
        preprocess_params: dict[str, Any] = {}
        forward_params: dict[str, Any] = dict(generate_kwargs)
        postprocess_params: dict[str, Any] = {}
        if prompt_style is not None:
            preprocess_params["prompt_style"] = forward_params["prompt_style"] = str(prompt_style)
        if return_label_scores is not None:
            forward_params["return_label_scores"] = bool(return_label_scores)
        if video_folder is not None:
            preprocess_params["video_folder"] = os.fspath(video_folder)
        if processor_kwargs is not None:
            preprocess_params["processor_kwargs"] = dict(processor_kwargs)
        if constrained is not None:
            forward_params["constrained"] = bool(constrained)
            postprocess_params["constrained"] = bool(constrained)
        if skip_special_tokens is not None:
            postprocess_params["skip_special_tokens"] = bool(skip_special_tokens)
        return preprocess_params, forward_params, postprocess_params

    @property
    def answer_constraint(self) -> AnswerConstraint:
        """The constraint of this pipeline's processor (built on first use, rebuilt if the label sets change)."""
        return self.constraint_for()

    def constraint_for(self, prompt_style: str | None = None) -> AnswerConstraint:
        """The constraint of the answer format of `prompt_style` (default: the processor's prompt style)."""
        style = prompt_style or getattr(self.processor, "prompt_style", None)
        key = (tuple(self.processor.emotion_labels), tuple(self.processor.strategy_labels), style)
        if key not in self._constraints:
            self._constraints[key] = AnswerConstraint.from_processor(self.processor, prompt_style)
        return self._constraints[key]

    @property
    def label_sets(self) -> dict[str, list[str]]:
        emotions, strategies = list(self.processor.emotion_labels), list(self.processor.strategy_labels)
        return {"client_emotion": emotions, "therapist_emotion": emotions, "strategy": strategies}

    # ------------------------------------------------------------------ calling

    def __call__(self, inputs, *args, batch_size: int | None = None, num_workers: int | None = None, **kwargs):
        """Answer one input (returns a dict) or a list of inputs (returns a list); other iterables
        (generators, datasets) are answered lazily (returns an iterator)."""
        if args:
            logger.warning(f"Ignoring args : {args}")
        if num_workers:
            logger.warning_once("EmotionalSupportPipeline ignores num_workers: the processor decodes clips in threads")
        if batch_size is None:
            batch_size = self._batch_size or 1
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        forward_params = {**self._forward_params, **forward_params}
        postprocess_params = {**self._postprocess_params, **postprocess_params}
        self.call_count += 1
        params = (preprocess_params, forward_params, postprocess_params)
        if isinstance(inputs, (dict, str)):
            return self._run_batch([inputs], *params)[0]
        if isinstance(inputs, (list, tuple)):
            results = []
            for chunk in _chunks(inputs, batch_size):
                results.extend(self._run_batch(chunk, *params))
            return results
        if isinstance(inputs, Iterable):
            return self._run_stream(inputs, batch_size, params)
        raise TypeError(f"unsupported input type {type(inputs).__name__}")

    def _run_stream(self, inputs: Iterable, batch_size: int, params) -> Iterator[dict]:
        for chunk in _stream_chunks(inputs, batch_size):
            yield from self._run_batch(chunk, *params)

    def _run_batch(self, items: list, preprocess_params: dict, forward_params: dict, postprocess_params: dict):
        model_inputs = self.preprocess(items, **preprocess_params)
        model_outputs = self.forward(model_inputs, **forward_params)
        return self.postprocess(model_outputs, **postprocess_params)

    def run_single(self, inputs, preprocess_params, forward_params, postprocess_params):
        return self._run_batch([inputs], preprocess_params, forward_params, postprocess_params)[0]

    # ------------------------------------------------------------------ steps

    def preprocess(
        self,
        inputs,
        video_folder: str | None = None,
        processor_kwargs: dict | None = None,
        prompt_style: str | None = None,
    ):
        """A batch of inputs (a list, or one input) -> the processor's left-padded model inputs."""
        items = inputs if isinstance(inputs, list) else [inputs]
        records = [to_record(item) for item in items]
        if prompt_style is not None:
            processor_kwargs = {**(processor_kwargs or {}), "prompt_style": prompt_style}
        batch = self.processor(
            records=records,
            video_folder=video_folder,
            with_target=False,
            padding_side="left",
            return_tensors="pt",
            **(processor_kwargs or {}),
        )
        return {"model_inputs": dict(batch.items()), "num_inputs": len(records)}

    def _forward(
        self,
        model_inputs,
        constrained: bool = True,
        return_label_scores: bool = False,
        prompt_style: str | None = None,
        **generate_kwargs,
    ):
        inputs = model_inputs["model_inputs"]
        prompt_length = inputs["input_ids"].shape[1]
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        if generate_kwargs.get("pad_token_id") is None and self.model.generation_config.pad_token_id is None:
            generate_kwargs["pad_token_id"] = self.processor.tokenizer.pad_token_id
        if generate_kwargs.get("stop_strings") is not None:
            generate_kwargs.setdefault("tokenizer", self.processor.tokenizer)
        if constrained:
            processors = LogitsProcessorList(generate_kwargs.get("logits_processor") or [])
            processors.append(AnswerFormatLogitsProcessor(self.constraint_for(prompt_style), prompt_length))
            generate_kwargs["logits_processor"] = processors
        output = self.model.generate(**inputs, **generate_kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        eos = generate_kwargs.get("eos_token_id")
        if eos is None and generate_kwargs.get("generation_config") is not None:
            eos = generate_kwargs["generation_config"].eos_token_id
        if eos is None:
            eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        outputs = {
            "generated": sequences[:, prompt_length:],
            "num_inputs": model_inputs["num_inputs"],
            "eos_token_ids": eos,
        }
        if return_label_scores:
            outputs["label_scores"] = self._label_scores(inputs, outputs["generated"], prompt_style)
        return outputs

    def _row_inputs(self, inputs: dict, row: int) -> dict:
        """The model inputs of one prompt of a batch, without its padding.

        Media tensors hold entries only for the rows that use them, in row order: a row's entry is
        found by counting the earlier rows whose prompt has that modality's placeholder.
        """
        input_ids = inputs["input_ids"]
        keep = inputs["attention_mask"][row].bool()
        out = {"input_ids": input_ids[row][keep][None], "attention_mask": inputs["attention_mask"][row][keep][None]}
        config = self.model.config
        media = {
            "pixel_values_videos": config.video_token_id,
            "input_features": config.audio_token_id,
            "history_input_ids": config.history_token_id,
        }
        for name, token_id in media.items():
            if inputs.get(name) is None:
                continue
            present = (input_ids == token_id).any(-1)
            if present[row]:
                index = int(present[:row].sum())
                out[name] = inputs[name][index : index + 1]
                if name == "history_input_ids":
                    out["history_attention_mask"] = inputs["history_attention_mask"][index : index + 1]
        return out

    @torch.no_grad()
    def _label_scores(
        self, inputs: dict, generated: torch.Tensor, prompt_style: str | None = None
    ) -> list[dict[str, dict[str, float]]]:
        """Per generated row: each label line's probabilities over its label set, given the row's earlier lines.

        The prompt and the answer up to the end of the last label line are read once (with the cache);
        each label line's candidates are then read together from the cache cut back to that line's start.
        """
        constraint = self.constraint_for(prompt_style)
        label_sets = self.label_sets
        per_input = generated.shape[0] // inputs["input_ids"].shape[0]
        scores = []
        for row, tokens in enumerate(generated.tolist()):
            row_inputs = self._row_inputs(inputs, row // per_input)
            _, starts = constraint.walk(tokens)
            starts = starts[: len(LABEL_FIELDS)]
            prompt_length = row_inputs["input_ids"].shape[1]
            context = torch.tensor([tokens[: starts[-1]]], dtype=torch.long, device=self.device)
            ids = torch.cat([row_inputs["input_ids"], context], dim=1)
            mask = torch.ones_like(ids)
            # the last context token is read again with each candidate, so that its logits come with them
            length = prompt_length + starts[-1] - 1
            output = self.model(**{**row_inputs, "input_ids": ids[:, :length], "attention_mask": mask[:, :length]},
                                use_cache=True, logits_to_keep=1)
            cache, answer = output.cache, {}
            for segment in reversed(range(len(starts))):
                start = prompt_length + starts[segment] - 1
                cache.crop(start - cache.get_seq_length())
                candidates = constraint.segments[segment]
                width = 1 + max(len(c) for c in candidates)
                block = torch.full((len(candidates), width), int(self.processor.pad_token_id), dtype=torch.long)
                block_mask = torch.zeros_like(block)
                for k, candidate in enumerate(candidates):
                    block[k, : 1 + len(candidate)] = torch.tensor([int(ids[0, start]), *candidate])
                    block_mask[k, : 1 + len(candidate)] = 1
                expanded = copy.deepcopy(cache)
                expanded.batch_repeat_interleave(len(candidates))
                past_mask = torch.ones((len(candidates), start), dtype=torch.long)
                logits = self.model(
                    input_ids=block.to(self.device),
                    attention_mask=torch.cat([past_mask, block_mask], dim=1).to(self.device),
                    cache=expanded,
                    use_cache=True,
                ).logits
                probabilities = constraint.sequence_log_probs(segment, logits).softmax(-1).tolist()
                field = LABEL_FIELDS[segment]
                answer[field] = dict(zip(label_sets[field], probabilities))
            scores.append({field: answer[field] for field in LABEL_FIELDS if field in answer})
        return scores

    def postprocess(self, model_outputs, constrained: bool = True, skip_special_tokens: bool = True):
        generated = model_outputs["generated"]
        num_inputs = model_outputs["num_inputs"]
        eos = model_outputs.get("eos_token_ids") or []
        rows = []
        for row in generated.tolist():  # cut after the first end token: a batch pads finished rows
            end = next((i for i, token in enumerate(row) if token in eos), None)
            rows.append(row if end is None else row[: end + 1])
        texts = self.processor.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)
        label_sets = self.label_sets
        answers, unknown_count = [], 0
        label_scores = model_outputs.get("label_scores")
        for row, text in enumerate(texts):
            text = text.strip()
            parsed = self.processor.parse_output(text)
            answer = {field: parsed.get(field) for field in ANSWER_FIELDS}
            answer["generated_text"] = text
            if label_scores is not None:
                answer["label_scores"] = label_scores[row]
            unknown = {f: answer[f] for f in LABEL_FIELDS if answer[f] not in label_sets[f]}
            if unknown:
                answer["unknown_labels"] = unknown
                unknown_count += 1
            answers.append(answer)
        if unknown_count:
            reason = (
                "generation was cut before the label lines were complete (raise max_new_tokens)"
                if constrained
                else "free generation (constrained=False)"
            )
            warnings.warn(
                f"{unknown_count} of {len(answers)} answers have labels that are missing or outside the label "
                f"sets ({reason}); see their `unknown_labels`.",
                UserWarning,
                stacklevel=2,
            )
        per_input = len(answers) // max(num_inputs, 1)
        if per_input > 1:
            return [answers[i * per_input : (i + 1) * per_input] for i in range(num_inputs)]
        return answers

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Save the model, the processor and this pipeline's code (`custom_pipelines` in config.json)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory, **kwargs)
        save_pipeline_files(save_directory)


# ----------------------------------------------------------------------------------------------
# Registration and saving
# ----------------------------------------------------------------------------------------------


def register_pipeline(force: bool = False) -> None:
    """Register "emotional-support" with transformers' `PIPELINE_REGISTRY` (done on import)."""
    if force or TASK not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=EmotionalSupportPipeline, pt_model=AutoModelForCausalLM, type="multimodal"
        )


def add_custom_pipeline_to_config(config) -> None:
    """Declare the pipeline in a model config (or a config dict) before it is saved."""
    if isinstance(config, dict):
        current = config.get("custom_pipelines")
    else:
        current = getattr(config, "custom_pipelines", None)
    merged = {**(current or {}), **json.loads(json.dumps(CUSTOM_PIPELINES))}
    if isinstance(config, dict):
        config["custom_pipelines"] = merged
    else:
        config.custom_pipelines = merged


def save_pipeline_files(save_directory: str | os.PathLike) -> str:
    """Make a saved model folder loadable with `pipeline("emotional-support", model=folder, trust_remote_code=True)`.

    Copies this file into the folder as `pipeline_multimood.py` (with the sibling files it imports) and adds
    `custom_pipelines` to its `config.json` (which must exist: call it after `model.save_pretrained(folder)`).
    Idempotent. Returns the path of the copied pipeline file.
    """
    folder = os.fspath(save_directory)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: save the model before the pipeline files")
    source = os.path.abspath(__file__)
    for code_file in [source, *get_relative_import_files(source)]:
        target = os.path.join(folder, os.path.basename(code_file))
        if not (os.path.exists(target) and os.path.samefile(code_file, target)):
            shutil.copyfile(code_file, target)
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    add_custom_pipeline_to_config(config)
    with open(config_path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return os.path.join(folder, "pipeline_multimood.py")


register_pipeline()

__all__ = [
    "AnswerConstraint",
    "AnswerFormatLogitsProcessor",
    "CUSTOM_PIPELINES",
    "EmotionalSupportPipeline",
    "TASK",
    "add_custom_pipeline_to_config",
    "answer_segments",
    "register_pipeline",
    "save_pipeline_files",
    "to_record",
]
