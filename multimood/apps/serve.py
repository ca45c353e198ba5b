"""`multimood serve`: an OpenAI-compatible server for a MultiMood model folder, which is `transformers serve`.

    multimood serve --model outputs/quickstart [--host 127.0.0.1] [--port 8000] [--device auto] [--unconstrained]

The server is transformers' own (`transformers.cli.serve.Serve`: `/v1/chat/completions` plain and streaming,
`/v1/models`, `/health`), started in this process after `register_for_serving()` has told the Auto mappings the
server consults about MultiMood. Ours are that registration and two small additions to it: the label-line hook
in `generate` and the HTTP 400 for refused clips.

Registration (`register_for_serving`), why each entry:
- `MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES["multimood"]`: the server's `ModelManager._load_model` loads a folder with
  `AutoModelForMultimodalLM` only when its `model_type` is a key of this name mapping (otherwise it looks for
  `getattr(transformers, config.architectures[0])`, which transformers does not have), and
  `ModelManager.get_model_modality` calls a model multimodal (so that `video_url` parts reach the processor and the
  clip's audio is read, `load_audio_from_video=True`) only when its class name is one of the mapping's values. The
  name mapping has no public `register`; the entry is added in this process only (not on `import multimood`).
- `AutoModelForMultimodalLM.register(MultimoodConfig, ServedMultimoodForConditionalGeneration)`: the class the
  server then instantiates. `AutoConfig` and `AutoProcessor` need nothing more than `import multimood` already
  registers, so the server loads the installed package's classes, never the folder's remote code: the command takes
  no `--trust-remote-code`.

Label lines: `ServedMultimoodForConditionalGeneration.generate` adds the pipeline's `AnswerFormatLogitsProcessor`
whenever the server hands it our processor (the server always calls `model.generate(..., tokenizer=processor)`),
so the three label lines of every answer (plain and streaming, any sampling the request asks for) are forced to
`Client emotion: <label>` / `Therapist emotion: <label>` / `Strategy: <label>` of the processor's label sets,
followed by `Response:`; the response text is free. Not constrained: a cut answer (`max_tokens` too small to finish
the label lines), and everything with `--unconstrained`. The four fields are not split out: the answer is the
text, which `multimood.parse_output` reads.

Errors: a request whose messages the processor refuses (a missing clip, a file that is not a video, a remote URL,
too many clips) fails in `processor.apply_chat_template` with a `MultimoodError` naming the clip (the chat
messages' `MultimoodChatError`, the media decoder's `MultimoodClipError`); the stock server would answer 500, so
`add_error_handlers` answers HTTP 400 with an OpenAI-style error body (`{"error": {"message": ...}}`) for those
(other errors keep the stock 500); the server
keeps serving. Clips: a `video_url` part's URL goes to the processor as it is (the server downloads
nothing): a local path or a `file://` URL is read from the server's disk, an `http(s)` URL is refused.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import socket
from typing import Any

from transformers import AutoModelForMultimodalLM, LogitsProcessorList
from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES

from ..checkpoints.model_folder import check_model_folder
from ..model.configuration_multimood import MultimoodConfig
from ..model.modeling_multimood import MultimoodForConditionalGeneration
from ..model.pipeline_multimood import AnswerConstraint, AnswerFormatLogitsProcessor
from ..model.processing_multimood import MultimoodProcessor
from ..model.records import MultimoodError

SERVING_PACKAGES = ("fastapi", "uvicorn", "openai", "pydantic")


class ServedMultimoodForConditionalGeneration(MultimoodForConditionalGeneration):
    """MultiMood whose `generate` constrains the label lines when it is given the MultiMood processor.

    `transformers serve` passes the processor as `tokenizer=`; the constraint is the pipeline's
    (`AnswerConstraint.from_processor`), built once per processor label set.
    """

    constrain_labels = True  # `multimood serve --unconstrained` sets it to False

    def generate(self, input_ids=None, logits_processor=None, tokenizer=None, **kwargs):
        if self.constrain_labels and isinstance(tokenizer, MultimoodProcessor) and input_ids is not None:
            logits_processor = LogitsProcessorList(logits_processor or [])
            logits_processor.append(AnswerFormatLogitsProcessor(self._answer_constraint(tokenizer), input_ids.shape[1]))
        return super().generate(input_ids=input_ids, logits_processor=logits_processor, tokenizer=tokenizer, **kwargs)

    def _answer_constraint(self, processor: MultimoodProcessor) -> AnswerConstraint:
        key = (tuple(processor.emotion_labels), tuple(processor.strategy_labels), processor.prompt_style)
        cache = self.__dict__.setdefault("_answer_constraints", {})
        if key not in cache:
            cache[key] = AnswerConstraint.from_processor(processor)
        return cache[key]


def register_for_serving() -> None:
    """Make `transformers serve` load a multimood folder as a multimodal model (see the module docstring)."""
    MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES[MultimoodConfig.model_type] = ServedMultimoodForConditionalGeneration.__name__
    AutoModelForMultimodalLM.register(MultimoodConfig, ServedMultimoodForConditionalGeneration, exist_ok=True)


def add_error_handlers(app) -> None:
    """HTTP 400 (OpenAI error body) for messages the processor refuses, instead of the stock server's 500.

    Other errors keep the stock answer (500, traceback in the server log).
    """
    from fastapi.responses import JSONResponse  # noqa: PLC0415 - the optional `serving` extra

    async def refused_input(_request, error: MultimoodError):
        message = " ".join(str(error).split())
        body = {"error": {"message": message, "type": "invalid_request_error", "param": "messages", "code": None}}
        return JSONResponse(body, status_code=400)

    app.add_exception_handler(MultimoodError, refused_input)


def check_serving_installed() -> None:
    missing = [name for name in SERVING_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise MultimoodError(f"`multimood serve` needs the serving extra ({', '.join(missing)} missing): "
                             "pip install 'multimood[serving]'")


def check_port_free(host: str, port: int) -> None:
    """Fail before the model loads when the address cannot be bound (uvicorn would only fail after loading)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise MultimoodError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            reason = "in use" if error.errno == errno.EADDRINUSE else error.strerror
            raise MultimoodError(f"--port {port} on {host}: {reason}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimood serve",
        description="OpenAI-compatible server (transformers serve) for a MultiMood model folder: "
        "/v1/chat/completions (plain and streaming, video_url parts with local paths or file:// URLs), /v1/models. "
        "The model id clients send is the --model value, as /v1/models lists it.",
    )
    parser.add_argument("--model", required=True, help="saved multimood model folder (e.g. outputs/quickstart)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    parser.add_argument("--device", default="auto", help="'auto' (the GPU if there is one), 'cpu', 'cuda:0', ...")
    parser.add_argument("--dtype", default="auto", help="'auto' (the saved dtype), 'float32', 'bfloat16', ...")
    parser.add_argument("--unconstrained", action="store_true",
                        help="generate the label lines freely (default: forced to the processor's label sets)")
    parser.add_argument("--chat-template-kwargs", default=None,
                        help="JSON object of default keyword arguments for the processor's apply_chat_template "
                        "(per-request `chat_template_kwargs` override them)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="transformers' log level (default warning)")
    return parser


def _server_class():
    from transformers.cli.serve import Serve  # noqa: PLC0415 - imports the optional `serving` extra

    class MultimoodServe(Serve):
        def start_server(self) -> None:
            """`Serve(non_blocking=True)` calls this once the app is built: `serve()` adds our handlers and runs."""

    return MultimoodServe


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", dtype: str = "auto",
          constrained: bool = True, chat_template_kwargs: dict[str, Any] | None = None,
          log_level: str = "warning") -> None:
    """Load `model` and serve it until interrupted."""
    check_serving_installed()
    check_model_folder(model)
    check_port_free(host, port)
    register_for_serving()
    ServedMultimoodForConditionalGeneration.constrain_labels = constrained
    server = _server_class()(
        force_model=model, host=host, port=port, device=device, dtype=dtype, log_level=log_level,
        chat_template_kwargs=json.dumps(chat_template_kwargs) if chat_template_kwargs else None, non_blocking=True,
    )
    add_error_handlers(server.server.config.app)
    try:
        server.server.run()
    except SystemExit as stop:  # uvicorn exits when it cannot start (it logged why: e.g. the port was taken meanwhile)
        if stop.code:
            raise MultimoodError(f"the server could not start on {host}:{port} (see the log line above)") from None
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise MultimoodError(f"--port must be in 1..65535, got {args.port}")
    chat_template_kwargs = None
    if args.chat_template_kwargs is not None:
        try:
            chat_template_kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as error:
            raise MultimoodError(f"--chat-template-kwargs: not JSON ({error})") from None
        if not isinstance(chat_template_kwargs, dict):
            raise MultimoodError("--chat-template-kwargs must be a JSON object")
    serve(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          constrained=not args.unconstrained, chat_template_kwargs=chat_template_kwargs, log_level=args.log_level)
    return 0
