"""Score a predictions JSONL (same as `multimood evaluate`).

    python run_scripts/evaluate_multimood.py PREDICTIONS.jsonl --output METRICS.json [--report REPORT.md]
"""

import sys

from multimood.cli import run_command
from multimood.evaluation.metrics import evaluate_command

if __name__ == "__main__":
    sys.exit(run_command("evaluate_multimood.py", evaluate_command))
