"""Training entry point for torchrun / deepspeed launchers: `torchrun run_scripts/run_multimood.py --flags ...`.

Errors follow the `multimood` contract: one line and a non-zero exit (`--debug` or MULTIMOOD_DEBUG=1: traceback).
"""

import sys

from multimood.cli import run_command
from multimood.training.train import main

if __name__ == "__main__":
    sys.exit(run_command("run_multimood.py", main))
