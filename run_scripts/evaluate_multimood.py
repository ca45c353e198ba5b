"""Score a predictions JSONL (same as `multimood evaluate`).

    python run_scripts/evaluate_multimood.py PREDICTIONS.jsonl --output METRICS.json [--report REPORT.md]
"""

import sys

from multimood.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
