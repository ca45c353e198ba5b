"""`multimood` console command: `multimood quickstart [...]` and `multimood train [...]`."""

from __future__ import annotations

import sys

USAGE = """usage: multimood <command> [options]

commands:
  quickstart   generate sample clips and dialogues, train a tiny model, reload it and predict (no downloads)
  train        supervised fine-tuning (the seed's finetune.sh flags; see `multimood train --help`)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "quickstart":
        from .quickstart import main as quickstart_main

        return quickstart_main(rest)
    if command == "train":
        from .train import main as train_main

        train_main(rest)
        return 0
    print(f"multimood: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
