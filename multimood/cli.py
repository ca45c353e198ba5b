"""`multimood` console command: one entry point, a subcommand per job."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "quickstart": ("multimood.quickstart", "main", "generate sample clips and dialogues, train a tiny model, reload it and predict (no downloads)"),
    "train": ("multimood.train", "main", "supervised fine-tuning (the seed's finetune.sh flags; see `multimood train --help`)"),
    "grpo": ("multimood.grpo", "main", "GRPO reinforcement fine-tuning of an SFT model (trl; see `multimood grpo --help`)"),
    "convert": ("multimood.convert_videollama2_to_multimood", "main", "convert a published MultiMood / VideoLLaMA 2 checkpoint (or back with --to-published)"),
    "push": ("multimood.hub", "push_main", "build the Hub folder (card, remote code, pipeline) of a saved model and upload it"),
    "data": ("multimood.dataset_builder", "main", "convert MESC / ESConv to the record JSONL, validate record files"),
    "predict": ("multimood.predict", "predict_main", "answer a records JSONL with the emotional-support pipeline -> predictions JSONL for `multimood evaluate`"),
    "evaluate": ("multimood.evaluation", "main", "paper-compatible and strict metrics of a predictions JSONL"),
    "demo": ("multimood.demo", "main", "web demo (Gradio): upload clips and a conversation, see emotions, strategy and response"),
}


def usage() -> str:
    lines = ["usage: multimood <command> [options]", "", "commands:"]
    lines += [f"  {name:<11}  {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"multimood: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[command]
    result = getattr(importlib.import_module(module_name), function_name)(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
