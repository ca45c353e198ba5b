"""The web demo in a real browser: `multimood demo` serves the page on 127.0.0.1 and headless Chromium
(Debian's `chromium` + `chromium-driver`, driven by Selenium) uploads real clips, submits without an
utterance (a message in the page), adds a conversation turn, types the utterance, submits and reads the
answer, continues the conversation and submits a text-only turn that the crisis screen catches.

The page's screenshot is kept as an artifact: $MULTIMOOD_TEST_ARTIFACTS/demo.png, else
outputs/test_artifacts/demo.png (README's docs/demo.png is one of these).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the demo needs the `demo` extra (pip install -e '.[demo]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the `test` extra)")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.test_demo import quickstart_model_folder  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,2000",
]
ANSWER_FIELDS = ("client-emotion", "therapist-emotion", "strategy", "response")
START_TIMEOUT = 120
ANSWER_TIMEOUT = 120

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return quickstart_model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_folder, tmp_path_factory):
    """The URL of `multimood demo` serving the quickstart model on a free port of 127.0.0.1."""
    folder = model_folder
    port = _free_port()
    log = tmp_path_factory.mktemp("demo_server") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "multimood.cli", "demo", "--model", str(folder), "--port", str(port),
               "--max_new_tokens", "48"]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"`multimood demo` exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not answer on {url} in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="multimood-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    # an explicit driver path: selenium-manager never tries to download one
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _artifact_path() -> Path:
    folder = Path(os.environ.get("MULTIMOOD_TEST_ARTIFACTS", REPO_ROOT / "outputs" / "test_artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "demo.png"


def _field_text(driver, elem_id: str) -> str:
    return driver.execute_script(
        "const box = document.querySelector(`#${arguments[0]} textarea, #${arguments[0]} input`);"
        "return box ? box.value : '';", elem_id)


def _type(driver, elem_id: str, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    box.send_keys(text)


def _shown(driver, elem_id: str) -> bool:
    """Whether the element is on the page and visible (Gradio leaves hidden components out of the page)."""
    return any(element.is_displayed() for element in driver.find_elements(By.ID, elem_id))


def _choose(driver, elem_id: str, option: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.click()
    WebDriverWait(driver, 10).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} [role=option][aria-label='{option}']")
    ).click()
    WebDriverWait(driver, 10).until(lambda d: box.get_attribute("value") == option)


def test_upload_submit_continue_and_crisis_screen_in_chromium(server, browser, model_folder, shared_data):
    saved = json.loads((model_folder / "processor_config.json").read_text())  # the label sets, frames per turn
    videos = shared_data / "media" / "video"
    clips = [videos / "retalking_face_1.mp4", videos / "retalking_face_3.mp4"]
    utterance = "I can't sleep. Every night I lie awake going over what went wrong at work."
    driver = browser
    driver.get(server)
    wait = WebDriverWait(driver, 60)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#clips input[type=file]"))
    disclaimer = driver.find_element(By.ID, "disclaimer")
    assert disclaimer.is_displayed() and "Research model, not a counsellor" in disclaimer.text

    upload.send_keys("\n".join(str(clip) for clip in clips))
    wait.until(lambda d: all(clip.stem in d.find_element(By.ID, "clips").text for clip in clips))  # listed: uploaded
    driver.find_element(By.ID, "submit").click()  # no utterance yet: a message in the page, not a stack trace
    wait.until(lambda d: _shown(d, "error") and "utterance" in d.find_element(By.ID, "error").text)
    assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
    _choose(driver, "turn-role", "Therapist")
    _type(driver, "turn-text", "How have you been sleeping since we last met?")
    _type(driver, "situation", "A new job with long hours.")
    _choose(driver, "problem-type", "Occupational burnout")
    _type(driver, "utterance", utterance)
    driver.find_element(By.ID, "add-turn").click()
    wait.until(lambda d: "How have you been sleeping" in d.find_element(By.ID, "history").text)
    driver.find_element(By.ID, "submit").click()

    WebDriverWait(driver, ANSWER_TIMEOUT).until(
        lambda d: all(_field_text(d, elem_id).strip() for elem_id in ANSWER_FIELDS))
    answer = {elem_id: _field_text(driver, elem_id) for elem_id in ANSWER_FIELDS}
    assert answer["client-emotion"] in saved["emotion_labels"]
    assert answer["therapist-emotion"] in saved["emotion_labels"]
    assert answer["strategy"] in saved["strategy_labels"]
    assert answer["response"].strip()
    assert not _shown(driver, "error") and not _shown(driver, "crisis")
    frames = saved["video_processor"]["num_frames"]
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#frames img")) == frames)
    assert driver.find_element(By.ID, "frames").text.count("· frame ") == frames
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#label-scores img"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#audio-windows img"))
    assert "the model hears silence" not in driver.find_element(By.ID, "notices").text

    for _ in range(3):  # the whole page in the screenshot: grow the window until the layout stops growing
        height = driver.execute_script("return document.documentElement.scrollHeight")
        if driver.get_window_size()["height"] >= height + 40:
            break
        driver.set_window_size(1400, height + 120)
        time.sleep(0.5)
    screenshot = _artifact_path()
    assert driver.save_screenshot(str(screenshot))
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000

    driver.find_element(By.ID, "continue").click()
    wait.until(lambda d: utterance in d.find_element(By.ID, "history").text)
    assert answer["response"].strip()[:20] in driver.find_element(By.ID, "history").text
    assert _field_text(driver, "utterance") == ""

    # the next client turn, text only, mentions self-harm: crisis resources appear and the model still answers
    _type(driver, "utterance", "Some nights I think about hurting myself.")
    driver.find_element(By.ID, "submit").click()
    WebDriverWait(driver, ANSWER_TIMEOUT).until(lambda d: _shown(d, "crisis"))
    assert "988" in driver.find_element(By.ID, "crisis").text
    WebDriverWait(driver, ANSWER_TIMEOUT).until(lambda d: "text alone" in d.find_element(By.ID, "notices").text)
    assert all(_field_text(driver, elem_id).strip() for elem_id in ANSWER_FIELDS)
    assert not _shown(driver, "error")
