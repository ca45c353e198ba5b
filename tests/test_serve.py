"""`multimood serve`: transformers' OpenAI-compatible server on a MultiMood folder, asked by the `openai` client.

A tiny random MultiMood (real Qwen2 tokenizer) is saved and served by `multimood serve` in a subprocess on
127.0.0.1; requests carry a real clip as a `video_url` part and a conversation. The oracle of an answer is the
"emotional-support" pipeline (records path, constrained decoding) on the same turn, run in this process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from multimood import MultimoodForConditionalGeneration, parse_output
from multimood.checkpoints.assembly import fit_processor_to_model, set_media_settings
from multimood.cli import main as cli_main
from multimood.model.pipeline_multimood import EmotionalSupportPipeline
from multimood.model.processing_multimood import MultimoodProcessor
from tests.model_utils import TINY_NUM_FRAMES, tiny_config
from tests.optional_deps import import_or_skip

openai = import_or_skip("openai", "serving")
import_or_skip("fastapi", "serving")
import_or_skip("uvicorn", "serving")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = {"initializer_range": 0.2}
MEDIA = {"num_frames": TINY_NUM_FRAMES, "audio_num_windows": 2, "audio_max_seconds": 4.0, "num_k_vid": 2}
MAX_NEW = 40
CLIP = "retalking_face_1.mp4"
STARTUP_LIMIT_S = 600  # a loaded 2-core machine; the server normally answers /health within a minute


@pytest.fixture(scope="module")
def built(shared_data, tmp_path_factory):
    """(model, processor, folder): a tiny random model whose answers depend on its input, saved with its processor."""
    torch.manual_seed(0)
    config = tiny_config(**TINY)
    config.text_config.initializer_range = 0.2
    model = MultimoodForConditionalGeneration(config).eval()
    processor = MultimoodProcessor.from_tokenizer(shared_data / "tokenizer" / "qwen2", k_turn_history=2)
    set_media_settings(processor, MEDIA)
    fit_processor_to_model(processor, config)
    folder = tmp_path_factory.mktemp("serve") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


@contextlib.contextmanager
def running_server(folder: Path, log: Path, *flags: str):
    """The base URL of `multimood serve --model <folder> <flags>` running on 127.0.0.1 in its own process group."""
    port = _free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "multimood.cli", "serve", "--model", str(folder), "--port", str(port), *flags],
            stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO_ROOT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"multimood serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"multimood serve did not answer /health:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    with running_server(built[2], tmp_path_factory.mktemp("serve_log") / "server.log") as url:
        yield url


def _stop(process: subprocess.Popen) -> None:
    """End the server's process group (the server and anything it started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group is gone already
            break
        try:
            process.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=300)


HISTORY = [
    {"role": "user", "content": "I have not slept properly for a week."},
    {"role": "assistant", "content": "That sounds exhausting. What has been keeping you awake?"},
]
UTTERANCE = "My manager said my job might be cut next month."
SITUATION = "The client may lose their job."
PROBLEM = "job crisis"


def _messages(clip_url: str) -> list[dict]:
    return [
        {"role": "system", "content": f"Problem type: {PROBLEM}\nSituation: {SITUATION}"},
        *HISTORY,
        {"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": clip_url}},
            {"type": "text", "text": UTTERANCE},
        ]},
    ]


@pytest.fixture(scope="module")
def clip(shared_data) -> Path:
    return shared_data / "media" / "video" / CLIP


@pytest.fixture(scope="module")
def expected(built, clip) -> dict:
    """The pipeline's constrained greedy answer to the same turn (records path, this process)."""
    model, processor, _ = built
    pipe = EmotionalSupportPipeline(model=model, processor=processor, device="cpu")
    turn = {"utterance": UTTERANCE, "videos": [str(clip)], "history": HISTORY, "situation": SITUATION,
            "problem_type": PROBLEM}
    return pipe(turn, max_new_tokens=MAX_NEW)


def _ask(client, folder, messages, **kwargs):
    return client.chat.completions.create(model=str(folder), messages=messages, max_tokens=MAX_NEW, temperature=0,
                                          **kwargs)


@pytest.mark.slow
def test_models_lists_the_served_folder(client, built):
    assert [model.id for model in client.models.list().data] == [str(built[2])]


@pytest.mark.slow
def test_chat_completion_with_a_clip_is_the_pipeline_answer(client, built, clip, expected):
    """Plain completion, the clip as a `file://` URL: the pipeline's answer, four lines with labels of the sets."""
    model, processor, folder = built
    answer = _ask(client, folder, _messages(clip.as_uri()))
    text = answer.choices[0].message.content
    assert text.strip() == expected["generated_text"]
    parsed = parse_output(text)
    assert parsed["client_emotion"] in processor.emotion_labels
    assert parsed["therapist_emotion"] in processor.emotion_labels
    assert parsed["strategy"] in processor.strategy_labels
    assert parsed["response"] is not None
    assert answer.usage.completion_tokens == MAX_NEW


@pytest.mark.slow
def test_streaming_gives_the_same_answer(client, built, clip, expected):
    """`stream=True`, the clip as a plain path: the chunks join to the pipeline's answer."""
    stream = _ask(client, built[2], _messages(str(clip)), stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces).strip() == expected["generated_text"]


@pytest.mark.slow
def test_bad_clips_get_400_naming_the_clip_and_the_server_keeps_serving(client, built, clip, expected, tmp_path):
    folder = built[2]
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("these are not video frames\n")
    missing = (clip.parent / "no_such_clip.mp4").as_uri()
    remote = "http://127.0.0.1:9/remote_clip.mp4"  # refused by the processor before any connection
    for bad, name in ((missing, "no_such_clip.mp4"), (not_a_video.as_uri(), "notes.mp4"), (remote, "remote_clip.mp4")):
        with pytest.raises(openai.BadRequestError) as refused:
            _ask(client, folder, _messages(bad))
        assert refused.value.status_code == 400
        assert name in refused.value.message
    answer = _ask(client, folder, _messages(clip.as_uri()))
    assert answer.choices[0].message.content.strip() == expected["generated_text"]


@pytest.mark.slow
def test_other_errors_keep_the_stock_answer(client, built, clip):
    """Only the processor's refusals become 400: a bad `generation_config` (a ValueError elsewhere) stays a 500."""
    with pytest.raises(openai.InternalServerError):
        _ask(client, built[2], _messages(str(clip)), extra_body={"generation_config": "{not json"})


@pytest.mark.slow
def test_unconstrained_server_is_the_free_pipeline_answer(built, clip, tmp_path):
    """`--unconstrained`: the label lines are generated freely, as the pipeline's `constrained=False`."""
    model, processor, folder = built
    pipe = EmotionalSupportPipeline(model=model, processor=processor, device="cpu")
    turn = {"utterance": UTTERANCE, "videos": [str(clip)], "history": HISTORY, "situation": SITUATION,
            "problem_type": PROBLEM}
    with pytest.warns(UserWarning, match="free generation"):
        free = pipe(turn, max_new_tokens=MAX_NEW, constrained=False)
    assert "unknown_labels" in free  # the oracle differs from a constrained answer
    with running_server(folder, tmp_path / "server.log", "--unconstrained") as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        answer = _ask(client, folder, _messages(str(clip)))
    assert answer.choices[0].message.content.strip() == free["generated_text"]


# ----------------------------------------------------------------------------------------------
# The command's own errors: one line, non-zero exit, before any model loads
# ----------------------------------------------------------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("multimood serve: error: ") and "\n" not in err, err
    return err


def test_missing_model_folder(tmp_path, capsys):
    assert cli_main(["serve", "--model", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no such model folder" in _one_line_error(capsys)


def test_folder_of_another_model_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert cli_main(["serve", "--model", str(tmp_path)]) == 1
    assert "expected 'multimood'" in _one_line_error(capsys)


def test_port_in_use(built, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["serve", "--model", str(built[2]), "--port", str(port)]) == 1
    assert f"--port {port} on 127.0.0.1: in use" in _one_line_error(capsys)


def test_missing_serving_extra(built, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # what Python does for a package that is not installed
    assert cli_main(["serve", "--model", str(built[2])]) == 1
    err = _one_line_error(capsys)
    assert "fastapi missing" in err and "multimood[serving]" in err


def test_bad_flags_and_help(capsys):
    assert cli_main(["serve", "--model", "x", "--port", "eighty"]) == 2
    assert "invalid int value: 'eighty'" in capsys.readouterr().err
    assert cli_main(["serve", "--model", "x", "--port", "70000"]) == 1
    assert "--port must be in 1..65535" in _one_line_error(capsys)
    assert cli_main(["serve", "--model", "x", "--chat-template-kwargs", "[1]"]) == 1
    assert "must be a JSON object" in _one_line_error(capsys)
    assert cli_main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--unconstrained" in out and "/v1/chat/completions" in out
    assert cli_main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
