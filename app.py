"""MultiMood web demo as a Hugging Face Space (or locally: `python app.py`).

The model is $MULTIMOOD_MODEL: a multimood model folder or a Hub repo id of one (e.g. a checkpoint converted
with `multimood convert` and uploaded with `multimood push`). Without it the demo serves the quickstart model
in outputs/quickstart, training it first (about 2 minutes on a CPU, no downloads) when the folder is absent.
The address and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (Spaces set them), else
127.0.0.1:7860. `multimood demo --model DIR` is the command-line way to serve the same page.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from multimood.apps.demo import build_demo, launch  # noqa: E402
from multimood.training import quickstart  # noqa: E402

QUICKSTART_MODEL = "outputs/quickstart"


def model_path() -> str:
    """$MULTIMOOD_MODEL, else the quickstart model (trained here when missing)."""
    if os.environ.get("MULTIMOOD_MODEL"):
        return os.environ["MULTIMOOD_MODEL"]
    if not (Path(QUICKSTART_MODEL) / "config.json").is_file():
        quickstart.main(["--output_dir", QUICKSTART_MODEL])
    return QUICKSTART_MODEL


demo = build_demo(model_path())

if __name__ == "__main__":
    launch(demo)
