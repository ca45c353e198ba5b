"""DeepSpeed ZeRO-3 trains the same model as a plain single-process run: same seeded steps, same losses.

Both runs are `run_scripts/run_multimood.py` on the quickstart's synthetic records (no shared data), float32
on the CPU, one thread per process. ZeRO-3 runs on two ranks with one record each per step; the plain run
takes both records per step in one batch. The Trainer draws the same permutation of the records in both, and
with `average_tokens_across_devices` the two-rank loss is normalised by the tokens of both ranks, so each
step's loss (and update) is the same mathematical quantity; only float32 summation order differs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.optional_deps import import_or_skip
from tests.test_training import RUN_SCRIPTS, _free_port, _logged_losses, _run_killing_group, _tiny_argv, _vocab
from tests.test_training import sample_data  # noqa: F401  (the session fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# float32 with a different reduction order (partitioned parameters, all-reduced gradients): measured
# differences are ~1e-6 relative; anything from a real divergence (other data, other weights) is > 1e-2.
LOSS_RTOL = 1e-4


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first DeepSpeed run on a machine compiles its CPU shm-comm extension (minutes)
def test_zero3_two_ranks_matches_single_process_losses(sample_data, tmp_path):  # noqa: F811
    import_or_skip("deepspeed", "train")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))}
    common = ("--max_steps", str(STEPS), "--save_strategy", "no", "--dataloader_num_workers", "0", "--seed", "7",
              "--max_grad_norm", "1.0")
    script = str(RUN_SCRIPTS / "run_multimood.py")
    vocab = _vocab(sample_data)

    single = tmp_path / "single"
    argv = _tiny_argv(sample_data, single, vocab, "--per_device_train_batch_size", "2", *common)
    done = _run_killing_group([sys.executable, script, *argv], 400, env)
    assert done.returncode == 0, done.stderr[-5000:]

    zero3 = tmp_path / "zero3"
    argv = _tiny_argv(sample_data, zero3, vocab, "--per_device_train_batch_size", "1", *common,
                      "--deepspeed", str(RUN_SCRIPTS / "zero3.json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           script, *argv]
    done = _run_killing_group(cmd, 800, env)
    assert done.returncode == 0, done.stderr[-5000:]

    expected, got = _logged_losses(single), _logged_losses(zero3)
    assert len(expected) == len(got) == STEPS
    assert len(set(expected)) == STEPS  # real, changing losses
    assert got == pytest.approx(expected, rel=LOSS_RTOL), (got, expected)
