#!/usr/bin/env bash
# The GPU path in one command (no downloads): CUDA model tests, a timed bf16 training step of the published
# 2.6B model and batched generation throughput; one summary table, also written to --json (default
# gpu_check.json). Without CUDA it prints what it skipped and exits 0. See BENCHMARKS.md.
#
# usage: bash bench/gpu_check.sh [--json PATH] [--batch_size 2] [--text_tokens 2048] [--steps 3] [--new_tokens 128]
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import multimood" 2>/dev/null; then
    echo "gpu_check: '$PYTHON' cannot import multimood: install the project first (pip install -e '.[test]'), or set PYTHON" >&2
    exit 2
fi
exec env PYTHONUNBUFFERED=1 "$PYTHON" "$REPO_ROOT/bench/gpu_check.py" "$@"
