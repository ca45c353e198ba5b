"""MultiMood processor: one record of a counselling session -> the model's inputs.

`MultimoodProcessor` bundles the video processor (SigLIP frames of up to `num_k_vid` client clips),
the feature extractor (BEATs filterbank of the same clips' audio) and the Qwen2 tokenizer, and owns
the single prompt builder that training, inference and evaluation share. What belongs to the record
itself (its schema and validation, the label sets, reading the chat history, the answer format and its
parser) is in `records.py`; this file builds prompts, expands placeholders, truncates and pads.

Prompt (rendered with the processor's chat template, ChatML by default)::

    <|im_start|>system
    {system_prompt}<|im_end|>
    <|im_start|>user                      \
    {client turn}<|im_end|>                | the last `k_turn_history` exchanges of `history_chat`
    <|im_start|>assistant                  | (consecutive messages of one speaker merged into a turn)
    {therapist turn}<|im_end|>            /
    <|im_start|>user
    Problem type: {problem_type}
    Situation: {situation}
    Client's video and voice: <video><audio>          (only when the record has clips / audio)
    Earlier conversation (memory): <history>          (only when there is history for the compressor)
    Client: {utt_user_most_recent joined by spaces}

    {instructions naming the label sets and the four-line answer format}<|im_end|>
    <|im_start|>assistant
    Client emotion: {get_emotion_user_most_recent}
    Therapist emotion: {Emotion}
    Strategy: {Strategy}
    Response: {Utterance joined by spaces}<|im_end|>

An *exchange* is a client turn together with the therapist turn that answers it. After merging
consecutive messages of one speaker into turns, every client turn opens a new exchange and the
therapist turn that follows closes it; a therapist turn at the very start of the history (no
client turn before it) is an exchange of its own, and so is a trailing client turn that has no
answer yet. `k_turn_history=k` keeps the last `k` exchanges; `k=0` keeps none.

Placeholders are expanded on token ids: `<video>` becomes `video_processor.num_video_tokens(T, H, W)`
copies (from the processed `pixel_values_videos`), `<audio>` `feature_extractor.num_audio_tokens(F,
M)` copies (from `input_features`), `<history>` one copy per `<MEM>` token of the sample's compressor
input. Length limit: `model_max_length` (2048 by default) counts the text tokens of the expanded
prompt plus the target, including the `<history>` copies; the `<video>`/`<audio>` copies come on top
of it (the published recipe: "model_max_length 2048 (text; media tokens come on top)"), unless
`max_length_includes_media=True`. When a sample is too long the oldest chat-history exchanges are
dropped first, then the oldest compressor utterances (each frees one `<history>` slot); the target,
the client's utterance and the media blocks are never cut; a sample that still does not fit raises a
`MultimoodRecordError` naming the record.

Prompt styles (`prompt_style`, a processor setting, overridable per call): the layout above is
`"multimood"`. `"published-train"` and `"published-eval"` reproduce, token for token, the inputs of the
published MultiMood code's training and inference (`PUBLISHED_PROMPTS`; MESC label lists as published,
whatever the processor's label set): their `<video>` slot holds our `<video>` then `<audio>` block, their
`<history>` stays plain text unless `use_memory=True`, the target is `PUBLISHED_ANSWER_TEMPLATE` (the labels
also cover the final line break, as published), and the compressor input is the published one
(`published_history_ids`). Clips without an audio track get the filterbank of silence and keep their
`<audio>` block (`audio_missing="silence"`, as published); `audio_missing="drop"` leaves the block out.

This file is Hub remote code: it imports only public transformers API and sibling modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .chat_messages import MultimoodChatError, chat_options, conversation_to_record
from .feature_extraction_multimood import MultimoodFeatureExtractor
from .records import (
    LABEL_SETS,
    SPEAKER_NAMES,
    MultimoodRecordError,
    check_prompt_style,
    format_answer,
    history_messages,
    merge_turns,
    parse_output,
    record_name,
    validate_record,
    validate_targets,
)
from .video_processing_multimood import MultimoodVideoProcessor

VIDEO_TOKEN = "<video>"
AUDIO_TOKEN = "<audio>"
HISTORY_TOKEN = "<history>"
MEM_TOKEN = "<MEM>"
MULTIMOOD_SPECIAL_TOKENS = (VIDEO_TOKEN, AUDIO_TOKEN, HISTORY_TOKEN, MEM_TOKEN)
IGNORE_INDEX = -100

DEFAULT_SYSTEM_PROMPT = (
    "You are a supportive, professional counsellor assistant. You follow a counselling session between a "
    "client and a therapist: the conversation so far and the client's latest words, face and voice. You "
    "recognise the client's emotion, choose the emotion and the strategy the therapist should respond "
    "with, and write the therapist's reply: warm, honest and respectful, in the client's own terms, never "
    "judging, manipulating or causing harm."
)

# Qwen2-style ChatML. Message content may be a string or a list of parts:
# {"type": "text", "text": ...}, {"type": "video"}, {"type": "audio"}, {"type": "history"}.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<video>' -}}"
    "{%- elif part['type'] == 'audio' -%}{{- '<audio>' -}}"
    "{%- elif part['type'] == 'history' -%}{{- '<history>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# ----------------------------------------------------------------------------------------------
# Prompt styles. "multimood" is this package's prompt (module doc). The two published styles
# reproduce, token for token, the inputs of the published MultiMood code (written here from the
# prompts it produces): "published-train" is its SFT prompt (framework/train.py of feature/train_sft),
# "published-eval" its inference prompt (evaluation_smes of feature/inference_eval). Their texts,
# quirks included ("response,determine", "categories.Step 3:"), are data, not to be corrected.
# ----------------------------------------------------------------------------------------------

AUDIO_MISSING_CHOICES = ("silence", "drop")

# Training drops its own system message, so the model trained under Qwen2's default system line.
PUBLISHED_TRAIN_SYSTEM_PROMPT = "You are a helpful assistant."
PUBLISHED_EVAL_SYSTEM_PROMPT = (
    "You are an expert in emotional psychology. Your task is to analyze the client's emotional state, predict "
    "the therapist's emotional response,determine the therapist's strategy, and generate an appropriate response "
    "based on the given inputs and historical context."
)
_PUBLISHED_OUTPUT_FORMAT = (
    "[OUTPUT FORMAT] \n"
    "Client's emotion: \n"
    "Therapist's emotion: \n"
    "Therapist's strategy: \n"
    "Therapist's response: \n"
)
# User turns: `{problem_type}`, `{situation}`, `{utterance}` are filled in; `<video>` is where the
# published model puts the video then the audio features (our `<video><audio>` block); `<history>`
# is plain text in the published code (its compressor output never reaches the prompt).
PUBLISHED_TRAIN_USER_TEMPLATE = (
    "[CONTEXT] \n"
    "Problem: {problem_type} \n"
    "Situation: {situation} \n"
    "History chat informations above \n"
    "[CURRENT CONTEXT] \n"
    "Client's video: <video> \n"
    "Chat history: <history> \n"
    "Client utterance: {utterance} \n"
    "The [CONTEXT] is history of current conversation between 'Client' and 'Therapist'. And [CURRENT CONTEXT] is "
    "the current 'Client' turn in the conversation \n"
    "Now you are the 'Therapist' and you need to understand the context to predict the Client’s emotion, "
    "Therapist’s emotion, then Therapist’s strategy. After that you need to make an empathy response to the "
    "'Client' based on the context. Let's think about it step by step: \n"
    "Step 1: Describe and understanding the context and content of the conversation \n"
    "Step 2: Predict the following and explain why for each components, notice that Therapist's strategy have "
    "guideline: \n"
    "Client's emotion: Choose only one from (anger, sadness, disgust, depression, neutral, joy, fear). \n"
    "Therapist's emotion: Choose only one from (anger, sadness, disgust, depression, neutral, joy, fear). \n"
    "Therapist's strategy: Choose only one from (open question, approval, self-disclosure, restatement, "
    "interpretation, advisement, communication skills, structuring the therapy, guiding the pace and depth of the "
    "conversation, others). \n"
    "Guide for Therapist's strategy: Communication Skills: Involve small talk and daily communication with clients, "
    "along with using simple phrases and body language during listening, thereby establishing a positive "
    "communication atmosphere.; Advisement: Offering guidance, advice, or possible solutions to clients, helping "
    "them address psychological issues and emotional distress they encounter.; Structuring the therapy: The "
    "therapist sets a clear framework and structure for the therapy process. This includes defining the goals of "
    "therapy, its duration, the main activities during therapy, and rules, etc.; Guiding the Pace and Depth of the "
    "Conversation: Therapists regulate the pace and depth of conversations during sessions through various "
    "techniques and methods, such as shifting the topic when the client is emotionally unstable or guiding the "
    "conversation back to key themes when necessary.; Others: Employ support strategies not encompassed by the "
    "previously mentioned categories."
    "Step 3: You are the 'Therapist', leverage Therapist's emotion and Therapist's strategy, think about how to "
    "reply to 'Client' in empathy. Follow this guideline: Understand the Client's emotion, follow Client's point of "
    "view and intention, express sympathy for Client's negative situation or approval of Client's positive "
    "situation. The response should not imply negative emotions or triggers toward anyone or anything, such as "
    "disgust, resentment, discrimination, hatred, etc while supporting user well-being. Keep the information in "
    "the response truthful, avoid misinformation. The response should open and honest, foster understanding, "
    "connection, and provide comfort or support. The response should safeguard human autonomy, identity and data "
    "dignity. Ensuring AI behaviors guide emotional health responsibly, avoiding manipulation or harm. \n"
    "Step 4: You need to consider the potential impact of your reply, the response should repeat a few words from "
    "Client utterance, you can express a different position or opinion, but you should not hurt Client's feelings "
    "\n"
    "You must follow the output format in [OUTPUT FORMAT] below, just print what is listed in [OUTPUT FORMAT], do "
    "not print anything more even your step thought. \n" + _PUBLISHED_OUTPUT_FORMAT
)
PUBLISHED_EVAL_USER_TEMPLATE = (
    "Problem: {problem_type} \n"
    "[CONTEXT] \n"
    "Situation: {situation} \n"
    "History: Chat above \n"
    "[CURRENT CONTEXT] \n"
    "Client's video: <video> \n"
    "History: <history> \n"
    "Client utterance: {utterance} \n"
    "[CONTEXT] is the past conversation between Client and Therapist. [CURRENT CONTEXT] is the Client's current "
    "turn. As the Therapist, analyze the context to predict the Client’s emotion, your emotion, and your strategy, "
    "then respond with empathy. Follow these steps: \n"
    "Step 1: Understand the conversation context and content. \n"
    "Step 2: Predict and explain: \n"
    "Client's emotion: Pick one (anger, sadness, disgust, depression, neutral, joy, fear). \n"
    "Therapist's emotion: Pick one (anger, sadness, disgust, depression, neutral, joy, fear). \n"
    "Therapist's strategy: Pick one (open question, approval, self-disclosure, restatement, interpretation, "
    "communication skills, advisement, structuring the therapy, guiding the pace and depth of the conversation, "
    "others).\n"
    "Guideline for Therapist's Strategy: \n"
    "- Open questions: Encourage detailed responses for self-reflection. \n"
    "- Approval: Affirm client’s worth or actions. \n"
    "- Self-disclosure: Share feelings or experiences to build rapport. \n"
    "- Restatement: Rephrase client’s words to show understanding. \n"
    "- Interpretation: Uncover deeper meanings in client’s behavior or feelings. \n"
    "- Communication skills: Use small talk, simple phrases, and body language for a positive atmosphere. \n"
    "- Advisement: Offer guidance or solutions for emotional distress. \n"
    "- Structuring the therapy: Set clear therapy goals, duration, and rules. \n"
    "- Guiding the pace and depth: Adjust conversation flow and focus. \n"
    "- Others: Use unlisted support strategies. \n"
    "Step 3: As Therapist, use your emotion and strategy to craft an empathetic response. Understand the Client’s "
    "emotion, align with their perspective, express sympathy for negatives or approval for positives. Avoid "
    "negativity (e.g., disgust, hatred) and support well-being with honest, comforting responses that respect "
    "autonomy and emotional health. \n"
    "Step 4: Ensure the response reflects Client’s words, allows differing views without harm, and considers its "
    "impact. \n"
    "The final response must follow this OUTPUT FORMAT, do not return anything more. \n" + _PUBLISHED_OUTPUT_FORMAT
)
PUBLISHED_PROMPTS = {
    "published-train": (PUBLISHED_TRAIN_SYSTEM_PROMPT, PUBLISHED_TRAIN_USER_TEMPLATE),
    "published-eval": (PUBLISHED_EVAL_SYSTEM_PROMPT, PUBLISHED_EVAL_USER_TEMPLATE),
}
# The published compressor input: "{Speaker}{text} <MEM> " per history message, in one string.
PUBLISHED_MEMORY_ITEM = "{speaker}{text} " + MEM_TOKEN + " "

_RESERVED_TEXT = ("<|im_start|>", "<|im_end|>", "<|endoftext|>") + MULTIMOOD_SPECIAL_TOKENS


def _neutralise(text: str) -> str:
    """Record text never smuggles in control or placeholder tokens: `<video>` becomes `< video>`."""
    for token in _RESERVED_TEXT:
        if token in text:
            text = text.replace(token, "< " + token[1:])
    return text


# ----------------------------------------------------------------------------------------------
# Targets (the answer format and its parser: `records.format_answer`, `records.parse_output`)
# ----------------------------------------------------------------------------------------------


def _join(fragments: Sequence[str]) -> str:
    """Text fragments (a validated list of strings) joined with single spaces."""
    return " ".join(" ".join(fragments).split())


def _target(targets: dict, prompt_style: str = "multimood") -> str:
    """The four-line answer of checked targets (see `records.validate_targets`) in the answer format of
    `prompt_style`."""
    return format_answer(targets["get_emotion_user_most_recent"], targets["Emotion"], targets["Strategy"],
                         _neutralise(_join(targets["Utterance"])), prompt_style)


def format_target(
    record: dict,
    emotion_labels: Sequence[str] | None = None,
    strategy_labels: Sequence[str] | None = None,
    index: int | None = None,
    prompt_style: str = "multimood",
) -> str:
    """The four-line target of a record in the answer format of `prompt_style` (labels in the label set's
    spelling when lists are given; a label outside them is kept as written here: `check_record(...,
    with_target=True)` rejects it)."""
    where = record_name(record, index)
    targets = validate_targets(record, emotion_labels, strategy_labels, reject_unknown=False, where=where)
    return _target(targets, prompt_style)


# ----------------------------------------------------------------------------------------------
# Chat-history exchanges (the prompt's units; reading the history: `records.history_messages`)
# ----------------------------------------------------------------------------------------------


def _chat_messages(turns: Sequence[tuple[str, str]]) -> list[dict]:
    """`(role, text)` history turns as chat messages (text neutralised)."""
    return [{"role": role, "content": _neutralise(text)} for role, text in turns]


def group_exchanges(turns: Sequence[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """`(role, text)` turns grouped into exchanges: a client turn and the therapist turn answering it (see
    module doc)."""
    exchanges: list[list[tuple[str, str]]] = []
    for turn in turns:
        if turn[0] == "user" or not exchanges or exchanges[-1][-1][0] == "assistant":
            exchanges.append([turn])
        else:
            exchanges[-1].append(turn)
    return exchanges


# ----------------------------------------------------------------------------------------------
# Tokenizer preparation
# ----------------------------------------------------------------------------------------------


def prepare_tokenizer(tokenizer, chat_template: str | None = None):
    """Add `<video> <audio> <history> <MEM>` as special tokens, a pad token and the chat template.

    Idempotent. With the Qwen2 vocabulary the four tokens get ids 151646..151649 (the model
    config's defaults). Returns the tokenizer.
    """
    missing = [t for t in MULTIMOOD_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(list(missing), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    if chat_template is not None or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    index: int
    record: dict
    name: str
    clips: list[str]
    clip_offset: int = 0  # position in the record's clip list of the first clip used
    has_video: bool = False
    has_audio: bool = False
    history_utterances: list[list[int]] = field(default_factory=list)  # token ids, each ending with <MEM>
    exchanges: list[list[tuple[str, str]]] = field(default_factory=list)
    target: str | None = None


class MultimoodProcessor(ProcessorMixin):
    r"""Processor of MultiMood: video processor + feature extractor + Qwen2 tokenizer + chat template.

    Args:
        video_processor ([`MultimoodVideoProcessor`]): frames of the client's clips.
        feature_extractor ([`MultimoodFeatureExtractor`]): filterbank of the clips' audio.
        tokenizer: a Qwen2 tokenizer prepared with [`prepare_tokenizer`] (the four special tokens).
        chat_template (`str`, *optional*): Jinja chat template; ChatML when `None`. Saved as
            `chat_template.jinja`; replace the file (or pass another template) to change the layout.
        label_set (`str`, *optional*, defaults to `"mesc"`): `"mesc"` or `"esconv"`; picks the default
            `emotion_labels` / `strategy_labels`.
        emotion_labels, strategy_labels (`list[str]`, *optional*): explicit label sets (take priority).
        k_turn_history (`int`, defaults to 7): chat-history exchanges kept in the prompt.
        model_max_length (`int`, defaults to 2048): text-token budget of a sample (see module doc).
        max_length_includes_media (`bool`, defaults to `False`): count `<video>`/`<audio>` copies too.
        history_max_tokens (`int`, defaults to 512): compressor input length limit.
        max_memory_slots (`int`, *optional*): at most this many `<MEM>` (most recent utterances).
        system_prompt (`str`, *optional*): the system message (of the `"multimood"` prompt style).
        prompt_style (`str`, defaults to `"multimood"`): the prompt and answer layout. `"multimood"`: this
            package's prompt (module doc). `"published-train"` / `"published-eval"`: the published
            MultiMood code's training / inference prompt, token for token (see [`PROMPT_STYLES`]); under
            both the chat history goes in as published (training: the last `2 * k_turn_history` merged
            messages as chat turns, a leading therapist message dropped; inference: none), the answer is
            the published `Client's emotion: x \\n...` format and the compressor input is published
            (`"{Speaker}{text} <MEM> "` per message, the FIRST `history_max_tokens` tokens kept).
            Overridable per call (`processor(records=..., prompt_style=...)`).
        use_memory (`bool`, *optional*): whether the prompt gets `<history>` memory slots (and the batch
            `history_input_ids` for the compressor). Defaults to `True` for `"multimood"` and `False` for
            the published styles, whose model never saw memory tokens (its `<history>` stays plain text);
            `True` there turns that `<history>` into the memory slots.
        audio_missing (`str`, defaults to `"silence"`): what a sample whose clips have no audio track gets:
            `"silence"` keeps its `<audio>` block with the filterbank of silence (what the published code
            feeds: 480000 zero samples), `"drop"` leaves the `<audio>` block and its features out.
    """

    def __init__(
        self,
        video_processor=None,
        feature_extractor=None,
        tokenizer=None,
        chat_template: str | None = None,
        label_set: str = "mesc",
        emotion_labels: list[str] | None = None,
        strategy_labels: list[str] | None = None,
        k_turn_history: int = 7,
        model_max_length: int = 2048,
        max_length_includes_media: bool = False,
        history_max_tokens: int = 512,
        max_memory_slots: int | None = None,
        system_prompt: str | None = None,
        prompt_style: str = "multimood",
        use_memory: bool | None = None,
        audio_missing: str = "silence",
        **kwargs,
    ):
        if label_set not in LABEL_SETS:
            raise ValueError(f"label_set must be one of {sorted(LABEL_SETS)}, got {label_set!r}")
        self.label_set = label_set
        self.emotion_labels = list(emotion_labels) if emotion_labels else list(LABEL_SETS[label_set]["emotion_labels"])
        self.strategy_labels = (
            list(strategy_labels) if strategy_labels else list(LABEL_SETS[label_set]["strategy_labels"])
        )
        if k_turn_history is None or int(k_turn_history) < 0:
            raise ValueError(f"k_turn_history must be >= 0, got {k_turn_history!r}")
        self.k_turn_history = int(k_turn_history)
        self.model_max_length = int(model_max_length)
        self.max_length_includes_media = bool(max_length_includes_media)
        self.history_max_tokens = int(history_max_tokens)
        self.max_memory_slots = None if max_memory_slots is None else int(max_memory_slots)
        self.system_prompt = system_prompt if system_prompt is not None else DEFAULT_SYSTEM_PROMPT
        self.prompt_style = check_prompt_style(prompt_style)
        self.use_memory = None if use_memory is None else bool(use_memory)
        if audio_missing not in AUDIO_MISSING_CHOICES:
            raise ValueError(f"audio_missing must be one of {list(AUDIO_MISSING_CHOICES)}, got {audio_missing!r}")
        self.audio_missing = audio_missing
        if tokenizer is not None:
            prepare_tokenizer(tokenizer)
        chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        super().__init__(video_processor, feature_extractor, tokenizer, chat_template=chat_template, **kwargs)
        if tokenizer is not None and isinstance(self.chat_template, str):
            # one template: `tokenizer.apply_chat_template` renders exactly what the processor renders
            tokenizer.chat_template = self.chat_template

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer_or_path,
        video_processor: MultimoodVideoProcessor | None = None,
        feature_extractor: MultimoodFeatureExtractor | None = None,
        chat_template: str | None = None,
        **kwargs,
    ) -> "MultimoodProcessor":
        """Build a processor from a plain tokenizer (object or folder, e.g. a Qwen2 checkpoint).

        Adds the special tokens, the pad token and the chat template, and uses default
        [`MultimoodVideoProcessor`] / [`MultimoodFeatureExtractor`] unless given. `kwargs` are
        processor attributes (`label_set`, `k_turn_history`, `model_max_length`, ...).
        """
        if isinstance(tokenizer_or_path, (str, bytes)) or hasattr(tokenizer_or_path, "__fspath__"):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_or_path), trust_remote_code=True)
        else:
            tokenizer = tokenizer_or_path
        prepare_tokenizer(tokenizer, chat_template)
        return cls(
            video_processor=video_processor if video_processor is not None else MultimoodVideoProcessor(),
            feature_extractor=feature_extractor if feature_extractor is not None else MultimoodFeatureExtractor(),
            tokenizer=tokenizer,
            chat_template=chat_template,
            **kwargs,
        )

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the parts with their own classes (siblings of this file), so that neither an Auto
        registration nor a second remote-code prompt is needed for the video processor and the feature
        extractor; the tokenizer goes through `AutoTokenizer`."""
        kwargs.pop("_from_auto", None)
        kwargs.pop("_from_pipeline", None)
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        subfolder = kwargs.pop("subfolder", "")
        part_classes = {"video_processor": MultimoodVideoProcessor, "feature_extractor": MultimoodFeatureExtractor}
        parts = []
        for name in cls.get_attributes():
            if name == "tokenizer":
                parts.append(AutoTokenizer.from_pretrained(
                    pretrained_model_name_or_path, subfolder=subfolder, trust_remote_code=trust_remote_code, **kwargs
                ))
            else:
                parts.append(part_classes[name].from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                                                **kwargs))
        return parts

    # ------------------------------------------------------------------ token ids

    video_token = VIDEO_TOKEN
    audio_token = AUDIO_TOKEN
    history_token = HISTORY_TOKEN
    mem_token = MEM_TOKEN

    @property
    def video_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)

    @property
    def audio_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)

    @property
    def history_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(HISTORY_TOKEN)

    @property
    def mem_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(MEM_TOKEN)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The ids the model config needs: `video_token_id`, `audio_token_id`, `history_token_id`, `mem_token_id`."""
        return {
            "video_token_id": self.video_token_id,
            "audio_token_id": self.audio_token_id,
            "history_token_id": self.history_token_id,
            "mem_token_id": self.mem_token_id,
        }

    @property
    def num_k_vid(self) -> int:
        """Clips used per record (the last ones); 0 means all of them."""
        value = getattr(self.video_processor, "num_k_vid", 5)
        return int(value) if value else 0

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "pixel_values_videos",
            "input_features",
            "history_input_ids",
            "history_attention_mask",
        ]

    # ------------------------------------------------------------------ prompt building

    def format_target(self, record: dict, index: int | None = None, prompt_style: str | None = None) -> str:
        """The four-line target of `record` (labels in this processor's spelling) in the answer format of
        `prompt_style` (default: the processor's)."""
        style = self.prompt_style if prompt_style is None else prompt_style
        return format_target(record, self.emotion_labels, self.strategy_labels, index=index, prompt_style=style)

    def memory_enabled(self, prompt_style: str | None = None) -> bool:
        """Whether prompts of `prompt_style` get `<history>` memory slots (see `use_memory`)."""
        if self.use_memory is not None:
            return self.use_memory
        return (self.prompt_style if prompt_style is None else prompt_style) == "multimood"

    def parse_output(self, text: str) -> dict[str, str | None]:
        """`parse_output` with this processor's label sets."""
        return parse_output(text, self.emotion_labels, self.strategy_labels)

    def instructions(self) -> str:
        """The task instructions of the user turn, naming the label sets and the answer format."""
        emotions = ", ".join(self.emotion_labels)
        strategies = ", ".join(self.strategy_labels)
        return (
            "You are the therapist. Read the session and answer in exactly four lines:\n"
            f"Client emotion: the client's current emotion, one of: {emotions}\n"
            f"Therapist emotion: the emotion your reply should carry, one of: {emotions}\n"
            f"Strategy: your counselling strategy, one of: {strategies}\n"
            "Response: your empathetic reply to the client, in one paragraph"
        )

    def check_record(self, record: Any, index: int | None = None, with_target: bool = False) -> dict:
        """`record` validated (schema and this processor's label sets) in canonical form; raises
        `MultimoodRecordError` naming the record and the field. The one check of training, inference and the
        command-line tools (see `records.validate_record`)."""
        return validate_record(
            record, with_target, self.emotion_labels, self.strategy_labels, label_set=self._label_set_name(),
            strict=False, where=record_name(record, index),
        )

    def _label_set_name(self) -> str | None:
        """The label sets' name for messages, when they are a named set's."""
        named = LABEL_SETS.get(self.label_set, {})
        if named.get("emotion_labels") == self.emotion_labels and named.get("strategy_labels") == self.strategy_labels:
            return self.label_set
        return None

    def _check_record(self, record: Any, index: int | None, with_target: bool) -> _Sample:
        name = record_name(record, index)
        record = self.check_record(record, index, with_target)
        clips = record["path_to_vid_user_most_recent"]
        used = list(clips)[-self.num_k_vid :] if self.num_k_vid > 0 else list(clips)
        sample = _Sample(
            index=index if index is not None else 0,
            record=record,
            name=name,
            clips=used,
            clip_offset=len(clips) - len(used),
        )
        sample.exchanges = group_exchanges(merge_turns(history_messages(record, index)))
        sample.history_utterances = self.history_utterance_ids(record, index)
        if with_target:
            sample.target = _target(validate_targets(record, where=name), self.prompt_style)
        return sample

    def build_messages(
        self,
        record: dict,
        k_turn_history: int | None = None,
        with_target: bool = False,
        include_video: bool | None = None,
        include_audio: bool | None = None,
        include_history: bool | None = None,
        index: int | None = None,
        prompt_style: str | None = None,
    ) -> list[dict]:
        """The chat messages of a record: system, history turns, the user turn, the target (optional).

        `include_video` / `include_audio` / `include_history` default to: the record has clips / has
        clips / has memory slots (history for the compressor and `memory_enabled`). The user turn's
        content is a list of parts (`text`, `video`, `audio`, `history`) that the chat template renders.
        `prompt_style` defaults to the processor's.
        """
        style = check_prompt_style(self.prompt_style if prompt_style is None else prompt_style)
        sample = self._check_record(record, index, with_target)
        self._apply_style(sample, style, with_target)
        if include_video is None:
            include_video = bool(sample.clips)
        if include_audio is None:
            include_audio = include_video
        if include_history is None:
            include_history = bool(sample.history_utterances)
        k = self.k_turn_history if k_turn_history is None else int(k_turn_history)
        units = self._history_units(sample, k, style)
        return self._messages(sample, units, include_video, include_audio, include_history, with_target, style)

    def _apply_style(self, sample: _Sample, style: str, with_target: bool) -> None:
        """Target and compressor input of `sample` for `style` (`_check_record` made them for the processor's)."""
        if style != self.prompt_style:
            if with_target:
                sample.target = self.format_target(sample.record, sample.index, prompt_style=style)
            sample.history_utterances = self.history_utterance_ids(sample.record, sample.index, prompt_style=style)
        if not self.memory_enabled(style):
            sample.history_utterances = []

    @staticmethod
    def _history_units(sample: _Sample, k: int, style: str) -> list[list[tuple[str, str]]]:
        """The chat history kept in the prompt, as the units truncation drops oldest first: the last `k`
        exchanges (multimood), the last `2k` merged messages one by one (published-train, as published),
        nothing (published-eval, whose prompt has no chat history)."""
        if k <= 0 or style == "published-eval":
            return []
        if style == "multimood":
            return sample.exchanges[len(sample.exchanges) - k :]
        turns = [turn for exchange in sample.exchanges for turn in exchange]
        return [[turn] for turn in turns[max(len(turns) - 2 * k, 0) :]]

    def _messages(self, sample: _Sample, units, include_video, include_audio, include_history, with_target, style):
        if style != "multimood":
            return self._published_messages(
                sample, units, include_video, include_audio, include_history, with_target, style
            )
        record = sample.record
        turns = [turn for exchange in units for turn in exchange]
        messages = [{"role": "system", "content": self.system_prompt}, *_chat_messages(turns)]
        parts: list[dict] = []

        def text(value: str):
            if parts and parts[-1]["type"] == "text":
                parts[-1]["text"] += value
            else:
                parts.append({"type": "text", "text": value})

        if record.get("problem_type"):
            text(f"Problem type: {_neutralise(' '.join(record['problem_type'].split()))}\n")
        if record.get("situation"):
            text(f"Situation: {_neutralise(' '.join(record['situation'].split()))}\n")
        if include_video or include_audio:
            text("Client's video and voice: " if include_audio and include_video else (
                "Client's video: " if include_video else "Client's voice: "))
            if include_video:
                parts.append({"type": "video"})
            if include_audio:
                parts.append({"type": "audio"})
            text("\n")
        if include_history:
            text("Earlier conversation (memory): ")
            parts.append({"type": "history"})
            text("\n")
        utterance = _join(record["utt_user_most_recent"])
        text(f"Client: {_neutralise(utterance)}\n\n")
        text(self.instructions())
        messages.append({"role": "user", "content": parts})
        if with_target:
            messages.append({"role": "assistant", "content": sample.target})
        return messages

    def _published_messages(self, sample, units, include_video, include_audio, include_history, with_target, style):
        """The messages of a published prompt style (see `PUBLISHED_PROMPTS`)."""
        record = sample.record
        system, template = PUBLISHED_PROMPTS[style]
        turns = [turn for unit in units for turn in unit]
        if turns and turns[0][0] == "assistant":  # published training drops a leading assistant message
            turns = turns[1:]
        messages = [{"role": "system", "content": system}, *_chat_messages(turns)]
        fields = {
            "problem_type": _neutralise(" ".join((record.get("problem_type") or "").split())),
            "situation": _neutralise(" ".join((record.get("situation") or "").split())),
            "utterance": _neutralise(_join(record["utt_user_most_recent"])),
        }
        before_media, after_media = (piece.format(**fields) for piece in template.split(VIDEO_TOKEN))
        parts: list[dict] = [{"type": "text", "text": before_media}]
        if include_video:
            parts.append({"type": "video"})
        if include_audio:
            parts.append({"type": "audio"})
        if include_history:  # the published `<history>` text becomes the memory slots
            before_history, after_history = after_media.split(HISTORY_TOKEN)
            parts += [
                {"type": "text", "text": before_history},
                {"type": "history"},
                {"type": "text", "text": after_history},
            ]
        else:
            parts.append({"type": "text", "text": after_media})
        messages.append({"role": "user", "content": parts})
        if with_target:
            messages.append({"role": "assistant", "content": sample.target})
        return messages

    def render_messages(self, messages: list[dict], chat_template: str | None = None, **kwargs) -> str:
        """Render built messages (`build_messages`) with this processor's chat template (or `chat_template`)."""
        kwargs.setdefault("tokenize", False)
        return self.tokenizer.apply_chat_template(messages, chat_template=chat_template or self._template(), **kwargs)

    def _template(self) -> str:
        template = self.chat_template
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()))
        return template or DEFAULT_CHAT_TEMPLATE

    def render_prompt(self, record: dict, with_target: bool = False, **kwargs) -> str:
        """The rendered prompt text of a record, placeholders not yet expanded (`kwargs`: those of
        `build_messages`, e.g. `prompt_style`).

        Without target it ends with the generation prompt; with target it is the whole conversation.
        """
        messages = self.build_messages(record, with_target=with_target, **kwargs)
        return self.render_messages(messages, add_generation_prompt=not with_target)

    # ------------------------------------------------------------------ chat messages (transformers' multimodal format)

    def apply_chat_template(
        self,
        conversation: Sequence[dict] | Sequence[Sequence[dict]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = "auto",
        **kwargs,
    ):
        """The model's input for a chat conversation: the records path (`processor(records=[record])`) on the record
        the messages describe, so a chat turn gets exactly the ids, media and masks of the same record.

        Messages (details and errors: `chat_messages`): earlier turns as `user` (client) and `assistant`
        (therapist) messages; the LAST user message is the client's current turn, its `{"type": "text"}` parts the
        client's words and up to `num_k_vid` (5) `{"type": "video", "path"|"url"|"video": ...}` parts its clips
        (local paths or `file://` URLs; remote URLs are refused). Content may be a plain string. The context comes
        as keywords `situation=` / `problem_type=` or in a system message of `Problem type: ...` and
        `Situation: ...` lines. A therapist message that is the model's own four-line answer counts as its
        `Response:` text (what a chat client sends back), as in the records' history.

        Returns, as transformers' processors do: with `tokenize=False` the prompt text (each `<video>`, `<audio>`,
        `<history>` placeholder once; history truncation to `model_max_length` happens on tokens only); with
        `tokenize=True, return_dict=True` the `BatchFeature` of `processor(records=...)`, ready for
        `model.generate(**inputs)`; with `tokenize=True, return_dict=False` its `input_ids`. A list of
        conversations gives a batch (a list of texts).

        Keyword arguments: `situation`, `problem_type`; the records path's `prompt_style`, `k_turn_history`,
        `max_length`, `truncation`, `padding_side`, `pad_to_multiple_of`, `return_frame_indices`, `video_folder`
        (clips must lie inside it); `num_frames` only with `allow_num_frames_override=True` (`transformers serve`
        sends `num_frames=32` with every video; the model keeps its own frame count otherwise);
        `load_audio_from_video`, `video_load_backend`, `sanitize_control_tokens` accepted and ignored; `tools`,
        `documents`, `chat_template`, `continue_final_message`, `return_assistant_tokens_mask` accepted only
        empty / false. `return_tensors="auto"` means `"pt"`. Bad messages raise `MultimoodChatError`.
        """
        context, call = chat_options(kwargs, int(self.video_processor.num_frames))
        if not add_generation_prompt:
            raise MultimoodChatError(
                "apply_chat_template", "add_generation_prompt=False is not supported: the prompt always ends "
                "with the therapist's turn for the model to write"
            )
        batched = (
            isinstance(conversation, Sequence)
            and not isinstance(conversation, (str, bytes))
            and bool(conversation)
            and all(isinstance(c, Sequence) and not isinstance(c, (str, bytes)) for c in conversation)
        )
        conversations = list(conversation) if batched else [conversation]
        records = []
        for number, messages in enumerate(conversations):
            record = conversation_to_record(
                messages, video_folder=call.get("video_folder"), max_clips=self.num_k_vid,
                name=f"conversation {number}" if batched else "conversation", **context,
            )
            for message in record["history_chat"]:
                if message["role"] == "assistant":
                    message["content"] = self._answer_response(message["content"])
            records.append(record)
        if not tokenize:
            style, k = call.get("prompt_style"), call.get("k_turn_history")
            texts = [self.render_prompt(record, prompt_style=style, k_turn_history=k) for record in records]
            return texts if batched else texts[0]
        inputs = self(records=records, return_tensors="pt" if return_tensors == "auto" else return_tensors, **call)
        return inputs if return_dict else inputs["input_ids"]

    def _answer_response(self, text: str) -> str:
        """The `Response:` text of the model's own four-line answer; any other therapist message as it is."""
        parsed = self.parse_output(text)
        return parsed["response"] if all(parsed.values()) else text

    # ------------------------------------------------------------------ history compressor input

    def history_utterance_ids(
        self, record: dict, index: int | None = None, prompt_style: str | None = None
    ) -> list[list[int]]:
        """The compressor input of a record as per-utterance token ids, each ending with `<MEM>`.

        `"multimood"` prompt style: from `history_chat_mamba` when it is a non-empty string (split at
        its `<MEM>` tokens when it has any, else at line breaks), else from every message of
        `history_chat` as `Client: ...` / `Therapist: ...`. Keeps the most recent whole utterances that
        fit in `history_max_tokens` (the most recent one is cut from the left if it alone is too long)
        and at most `max_memory_slots` of them.

        Published prompt styles: the published input, see `published_history_ids`.
        """
        if check_prompt_style(self.prompt_style if prompt_style is None else prompt_style) != "multimood":
            return self.published_history_ids(record, index)
        mamba = record.get("history_chat_mamba")
        if isinstance(mamba, str) and mamba.strip():
            if MEM_TOKEN in mamba:
                pieces = mamba.split(MEM_TOKEN)
                if not pieces[-1].strip():
                    pieces = pieces[:-1]
            else:
                pieces = mamba.splitlines()
            texts = [" ".join(p.split()) for p in pieces]
            texts = [t for t in texts if t]
        else:
            texts = [f"{SPEAKER_NAMES[role]}: {text}" for role, text in history_messages(record, index)]
        if not texts:
            return []
        limit = self.history_max_tokens
        if self.max_memory_slots is not None:
            texts = texts[-self.max_memory_slots :] if self.max_memory_slots > 0 else []
        mem = self.mem_token_id
        kept: list[list[int]] = []
        total = 0
        for text in reversed(texts):
            ids = self.tokenizer(_neutralise(text), add_special_tokens=False)["input_ids"] + [mem]
            if total + len(ids) > limit:
                if not kept and limit > 1:
                    kept.append(ids[-(limit - 1) - 1 : -1] + [mem])
                break
            kept.append(ids)
            total += len(ids)
        kept.reverse()
        return kept

    def published_history_ids(self, record: dict, index: int | None = None) -> list[list[int]]:
        """The published compressor input, split after each `<MEM>` (trailing tokens stay with the last piece).

        The text is `history_chat_mamba` as written when the record has it, else `"{Speaker}{text} <MEM> "`
        for every (unmerged) `history_chat` message (`Clientthat there would be <MEM> Therapist...`; the
        published format puts `(emotion) ` before the text when a message has an emotion, which records do
        not have). Tokenized in one piece and cut on the right to the FIRST `history_max_tokens` tokens,
        as published. Empty when there is no history or no `<MEM>` is left.
        """
        mamba = record.get("history_chat_mamba")
        if isinstance(mamba, str) and mamba.strip():
            text = MEM_TOKEN.join(_neutralise(piece) for piece in mamba.split(MEM_TOKEN))
        else:
            text = "".join(
                PUBLISHED_MEMORY_ITEM.format(speaker=SPEAKER_NAMES[role], text=_neutralise(content))
                for role, content in history_messages(record, index)
            )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.history_max_tokens]
        mem = self.mem_token_id
        pieces: list[list[int]] = []
        start = 0
        for position, token in enumerate(ids):
            if token == mem:
                pieces.append(ids[start : position + 1])
                start = position + 1
        if pieces and start < len(ids):
            pieces[-1] = pieces[-1] + ids[start:]
        return pieces

    def history_input_ids(self, record: dict, index: int | None = None, prompt_style: str | None = None) -> list[int]:
        """The compressor token ids of a record (empty when it has no history)."""
        return [t for ids in self.history_utterance_ids(record, index, prompt_style) for t in ids]

    # ------------------------------------------------------------------ media

    def _process_media(self, samples, video_folder, num_frames, size, return_frame_indices, return_tensors) -> dict:
        """The media tensors of the samples that have clips (in sample order); sets their `has_video` / `has_audio`."""
        with_clips = [s for s in samples if s.clips]
        if not with_clips:
            return {}
        videos = [s.clips for s in with_clips]
        ids = [s.name.removeprefix("record ") for s in with_clips]
        tensors = return_tensors or "pt"
        out = self._process_video(with_clips, videos, ids, video_folder, num_frames, size, return_frame_indices,
                                  tensors)
        if self.feature_extractor is not None:
            out.update(self._process_audio(with_clips, videos, ids, video_folder, tensors))
        return out

    def _process_video(self, with_clips, videos, ids, video_folder, num_frames, size, return_frame_indices, tensors):
        """`pixel_values_videos` (one entry per sample with clips) and, on request, `frame_indices`."""
        video_kwargs = {"video_folder": video_folder, "record_ids": ids, "return_tensors": tensors}
        if num_frames is not None:
            video_kwargs["num_frames"] = num_frames
        if size is not None:
            video_kwargs["size"] = size
        if return_frame_indices:
            video_kwargs["return_frame_indices"] = True
        video = self.video_processor(videos, **video_kwargs)
        pixel_values = video["pixel_values_videos"]
        if len(pixel_values) != len(with_clips):
            raise RuntimeError(
                f"the video processor returned {len(pixel_values)} videos for {len(with_clips)} samples"
            )
        out: dict[str, Any] = {"pixel_values_videos": pixel_values}
        if return_frame_indices:
            # positions in the record's own `path_to_vid_user_most_recent` list
            out["frame_indices"] = [
                [(s.clip_offset + int(clip), int(frame)) for clip, frame in picks]
                for s, picks in zip(with_clips, video["frame_indices"])
            ]
        for s in with_clips:
            s.has_video = True
        return out

    def _process_audio(self, with_clips, videos, ids, video_folder, tensors) -> dict:
        """`input_features` of the samples whose clips have audio (all of them with `audio_missing="silence"`)."""
        audio = self.feature_extractor(videos, video_folder=video_folder, record_ids=ids, return_tensors=tensors)
        present = [bool(x) for x in np.asarray(audio["audio_present"]).reshape(-1).tolist()]
        if self.audio_missing == "silence":  # the extractor gives clips without audio the filterbank of silence
            present = [True] * len(present)
        for s, p in zip(with_clips, present):
            s.has_audio = p
        keep = [i for i, p in enumerate(present) if p]
        if not keep:
            return {}
        features = audio["input_features"]
        if len(keep) != len(present):
            features = features[torch.as_tensor(keep)] if isinstance(features, torch.Tensor) else features[keep]
        return {"input_features": features}

    def _media_token_counts(self, media: dict) -> tuple[int, int]:
        """The placeholder copies of one `<video>` and of one `<audio>` block, from the processed media's shapes."""
        n_video = n_audio = 0
        if "pixel_values_videos" in media:
            t, _, h, w = tuple(media["pixel_values_videos"].shape[1:5])
            n_video = int(self.video_processor.num_video_tokens(t, h, w))
        if "input_features" in media:
            frames, bins = tuple(media["input_features"].shape[1:3])
            n_audio = int(self.feature_extractor.num_audio_tokens(frames, bins))
        return n_video, n_audio

    # ------------------------------------------------------------------ main entry point

    def __call__(
        self,
        records: dict | Sequence[dict] | None = None,
        video_folder: str | None = None,
        with_target: bool = False,
        return_tensors: str | None = "pt",
        padding_side: str | None = None,
        return_frame_indices: bool = False,
        num_frames: int | None = None,
        size: Any = None,
        k_turn_history: int | None = None,
        max_length: int | None = None,
        truncation: bool = True,
        pad_to_multiple_of: int | None = None,
        prompt_style: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Turn records into a batch.

        Returns a `BatchFeature` with `input_ids`, `attention_mask`, `labels` (with `with_target=True`:
        -100 except the last assistant turn's content and its end-of-turn token), and, only for the
        samples that have them (in sample order): `pixel_values_videos` (n_video, T, 3, S, S),
        `input_features` (n_audio, frames, bins), `history_input_ids` / `history_attention_mask`
        (n_history, L; right-padded with the pad id). `frame_indices` with `return_frame_indices`.

        Padding is on the right with `with_target=True` (training) and on the left otherwise
        (generation), unless `padding_side` says otherwise. `prompt_style` overrides the processor's.
        """
        if kwargs:
            raise TypeError(f"MultimoodProcessor got unexpected arguments: {sorted(kwargs)}")
        records = _record_list(records)
        padding_side = padding_side or ("right" if with_target else "left")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        k = self.k_turn_history if k_turn_history is None else int(k_turn_history)
        if k < 0:
            raise ValueError(f"k_turn_history must be >= 0, got {k}")
        limit = (self.model_max_length if max_length is None else int(max_length)) if truncation else None
        style = check_prompt_style(self.prompt_style if prompt_style is None else prompt_style)

        samples = [self._check_record(r, i, with_target) for i, r in enumerate(records)]
        for s in samples:
            self._apply_style(s, style, with_target)
        media = self._process_media(samples, video_folder, num_frames, size, return_frame_indices, return_tensors)
        n_video, n_audio = self._media_token_counts(media)
        encoded = [self._encode_sample(s, k, with_target, n_video, n_audio, limit, style) for s in samples]
        data = self._pad_batch(encoded, with_target, padding_side, pad_to_multiple_of)
        data.update(media)
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["frame_indices"])

    def _pad_batch(self, encoded, with_target: bool, padding_side: str, pad_to_multiple_of: int | None) -> dict:
        """`input_ids`, `attention_mask` (and `labels`) padded on `padding_side`; the compressor rows of the
        samples that have history, right-padded."""
        rows_ids, rows_labels, history_rows = zip(*encoded)
        data: dict[str, Any] = {}
        data["input_ids"], data["attention_mask"] = _pad(rows_ids, self.pad_token_id, padding_side, pad_to_multiple_of)
        if with_target:
            data["labels"], _ = _pad(rows_labels, IGNORE_INDEX, padding_side, pad_to_multiple_of)
        history_rows = [row for row in history_rows if row]
        if history_rows:
            data["history_input_ids"], data["history_attention_mask"] = _pad(history_rows, self.pad_token_id, "right")
        return data

    def _encode_sample(
        self, s: _Sample, k: int, with_target: bool, n_video: int, n_audio: int, limit: int | None, style: str
    ):
        """Token ids (placeholders expanded), labels and compressor ids of one sample, truncated to fit."""
        exchanges = self._history_units(s, k, style)
        utterances = list(s.history_utterances)
        media_tokens = (n_video if s.has_video else 0) + (n_audio if s.has_audio else 0)
        while True:
            ids, labels = self._tokenize_sample(s, exchanges, utterances, with_target, n_video, n_audio, style)
            if limit is None:
                break
            counted = len(ids) - (0 if self.max_length_includes_media else media_tokens)
            excess = counted - limit
            if excess <= 0:
                break
            if exchanges:
                exchanges = exchanges[1:]
                continue
            if utterances:
                drop = min(excess, len(utterances))
                utterances = utterances[drop:]
                continue
            budget = f"{limit} tokens" + ("" if self.max_length_includes_media else f" (+{media_tokens} media tokens)")
            raise MultimoodRecordError(
                s.name,
                None,
                f"does not fit in max_length={budget} even without chat history: it needs {len(ids)} tokens "
                f"({media_tokens} of them video/audio). Shorten the record or raise model_max_length.",
            )
        history = [t for u in utterances for t in u]
        return ids, labels, history

    def _tokenize_sample(self, s: _Sample, exchanges, utterances, with_target, n_video, n_audio, style):
        include_history = bool(utterances)
        messages = self._messages(s, exchanges, s.has_video, s.has_audio, include_history, False, style)
        template = self._template()
        prompt = self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        # a published prompt without memory slots keeps its `<history>` as plain text
        literal_history = style != "multimood" and not include_history
        prompt_ids = self._encode_text(prompt, literal_history)
        expected = {
            self.video_token_id: (1 if s.has_video else 0, n_video, "<video>"),
            self.audio_token_id: (1 if s.has_audio else 0, n_audio, "<audio>"),
            self.history_token_id: (1 if include_history else 0, len(utterances), "<history>"),
        }
        counts = {tid: 0 for tid in expected}
        for tid in prompt_ids:
            if tid in counts:
                counts[tid] += 1
        for tid, (want, _, token) in expected.items():
            if counts[tid] != want:
                raise MultimoodRecordError(
                    s.name,
                    None,
                    f"the rendered prompt has {counts[tid]} {token} placeholder(s), expected {want}: the chat "
                    "template must render each media/history part of a message exactly once",
                )
        if MEM_TOKEN in prompt or self.mem_token_id in prompt_ids:
            raise MultimoodRecordError(
                s.name, None, "the rendered prompt contains <MEM>, which only the compressor reads"
            )
        ids: list[int] = []
        for tid in prompt_ids:
            if tid in expected:
                ids.extend([tid] * expected[tid][1])
            else:
                ids.append(tid)
        labels = [IGNORE_INDEX] * len(ids)
        if with_target:
            full = self.tokenizer.apply_chat_template(
                self._messages(s, exchanges, s.has_video, s.has_audio, include_history, True, style),
                chat_template=template,
                tokenize=False,
                add_generation_prompt=False,
            )
            if not full.startswith(prompt):
                raise ValueError(
                    "the chat template must render the conversation with the target as the generation prompt "
                    "followed by the assistant message (the prompt is not a prefix of the full conversation)"
                )
            answer = full[len(prompt) :]
            if style != "multimood":  # published: the answer, its end-of-turn token and the line break are learnt
                target_ids = self._encode_text(answer, literal_history)
                return ids + target_ids, labels + target_ids
            body = answer.rstrip()
            target_ids = self.tokenizer(body, add_special_tokens=False)["input_ids"]
            tail = answer[len(body) :]
            tail_ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
            ids = ids + target_ids + tail_ids
            labels = labels + target_ids + [IGNORE_INDEX] * len(tail_ids)
        return ids, labels

    def _encode_text(self, text: str, literal_history: bool = False) -> list[int]:
        """Token ids of `text`; with `literal_history`, `<history>` is read as the plain text it is for the
        published tokenizer (which lacks our placeholder tokens), every other added token stays one token."""
        if not literal_history or HISTORY_TOKEN not in text:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        added = sorted((t for t in self.tokenizer.get_added_vocab() if t != HISTORY_TOKEN), key=len, reverse=True)
        ids: list[int] = []
        for piece in re.split("(" + "|".join(map(re.escape, added)) + ")", text):
            if piece in added:
                ids.append(self.tokenizer.convert_tokens_to_ids(piece))
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids

    # ------------------------------------------------------------------ decoding

    def post_process_output(
        self, generated_ids, input_length: int | None = None, skip_special_tokens: bool = True
    ) -> list[dict[str, str | None]]:
        """Decode generated ids (only the new tokens, or pass `input_length` to cut the prompt off)
        and parse each into `client_emotion`, `therapist_emotion`, `strategy`, `response` (+ `text`)."""
        if isinstance(generated_ids, torch.Tensor):
            if generated_ids.dim() == 1:
                generated_ids = generated_ids[None]
            generated_ids = generated_ids.tolist()
        elif generated_ids and isinstance(generated_ids[0], int):
            generated_ids = [generated_ids]
        if input_length:
            generated_ids = [row[input_length:] for row in generated_ids]
        texts = self.tokenizer.batch_decode(generated_ids, skip_special_tokens=skip_special_tokens)
        results = []
        for text in texts:
            parsed = self.parse_output(text)
            parsed["text"] = text
            results.append(parsed)
        return results


def _record_list(records: dict | Sequence[dict] | None) -> list:
    """The processor's `records` argument as a non-empty list."""
    if records is None:
        raise ValueError("MultimoodProcessor needs `records` (a record dict or a list of them)")
    records = [records] if isinstance(records, dict) else list(records)
    if not records:
        raise ValueError("MultimoodProcessor got an empty list of records")
    return records


def _pad(rows: Sequence[list[int]], value: int, side: str, multiple: int | None = None):
    """Pad rows to one length; returns (padded rows, attention mask) as lists."""
    length = max(len(r) for r in rows)
    if multiple:
        length = -(-length // multiple) * multiple
    padded, mask = [], []
    for r in rows:
        pad = [value] * (length - len(r))
        padded.append(pad + list(r) if side == "left" else list(r) + pad)
        m = [0] * len(pad)
        mask.append(m + [1] * len(r) if side == "left" else [1] * len(r) + m)
    return padded, mask


@dataclass
class MultimoodDataCollator:
    """Collate raw records into a batch with the processor (decoding runs in the DataLoader workers).

    Use with `Trainer(data_collator=MultimoodDataCollator(processor, video_folder=...))` and a dataset
    that yields record dicts (`remove_unused_columns=False`).
    """

    processor: MultimoodProcessor
    video_folder: str | None = None
    with_target: bool = True
    padding_side: str | None = None
    processor_kwargs: dict = field(default_factory=dict)

    def __call__(self, records: list[dict]) -> BatchFeature:
        return self.processor(
            records=list(records),
            video_folder=self.video_folder,
            with_target=self.with_target,
            padding_side=self.padding_side,
            **self.processor_kwargs,
        )


MultimoodProcessor.register_for_auto_class()

__all__ = [
    "AUDIO_MISSING_CHOICES",
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "MULTIMOOD_SPECIAL_TOKENS",
    "MultimoodDataCollator",
    "MultimoodProcessor",
    "PUBLISHED_PROMPTS",
    "format_target",
    "group_exchanges",
    "prepare_tokenizer",
]
