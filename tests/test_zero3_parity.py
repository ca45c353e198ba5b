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

from multimood.training import train as mm_train
from tests.optional_deps import import_or_skip
from tests.test_training import (
    RUN_SCRIPTS,
    _free_port,
    _logged_losses,
    _run_killing_group,
    _tiny_argv,
    _vocab,
    sample_data,  # noqa: F401  (the session fixture)
)

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# float32 with a different reduction order (partitioned parameters, all-reduced gradients): measured
# differences are ~2e-7 relative; other data or other initial weights give ~1e-2.
LOSS_RTOL = 1e-4


def _initial_model(data: dict, folder: Path) -> Path:
    """One randomly initialised tiny model, saved: both runs start from the same weights (ZeRO-3 builds and
    initialises its model partitioned, which draws the random numbers in another order)."""
    model_args, data_args, training_args = mm_train.parse_args(_tiny_argv(data, folder, _vocab(data)))
    model, processor = mm_train.build_model_and_processor(model_args, data_args, training_args)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _argv(data: dict, model: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_path", str(model), "--data_path", str(data["records"]), "--vid_folder", str(data["videos"]),
        "--num_k_vid", "2", "--k_turn_history", "2", "--output_dir", str(output_dir), "--max_steps", str(STEPS),
        "--learning_rate", "3e-3", "--warmup_ratio", "0.1", "--max_grad_norm", "1.0", "--logging_steps", "1",
        "--report_to", "none", "--model_max_length", "1024", "--seed", "7", "--disable_tqdm", "True",
        "--save_strategy", "no", "--dataloader_num_workers", "0", "--train_sampling_strategy", "sequential", *extra,
    ]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first DeepSpeed run on a machine compiles its CPU shm-comm extension (minutes)
def test_zero3_two_ranks_matches_single_process_losses(sample_data, tmp_path):  # noqa: F811
    import_or_skip("deepspeed", "train")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
        ),
    }
    script = str(RUN_SCRIPTS / "run_multimood.py")
    initial = _initial_model(sample_data, tmp_path / "initial")

    single = tmp_path / "single"
    done = _run_killing_group([sys.executable, script, *_argv(sample_data, initial, single,
                                                             "--per_device_train_batch_size", "2")], 400, env)
    assert done.returncode == 0, done.stderr[-5000:]

    zero3 = tmp_path / "zero3"
    argv = _argv(sample_data, initial, zero3, "--per_device_train_batch_size", "1",
                 "--deepspeed", str(RUN_SCRIPTS / "zero3.json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           script, *argv]
    done = _run_killing_group(cmd, 800, env)
    assert done.returncode == 0, done.stderr[-5000:]

    expected, got = _logged_losses(single), _logged_losses(zero3)
    assert len(expected) == len(got) == STEPS
    assert len(set(expected)) == STEPS  # real, changing losses
    assert got == pytest.approx(expected, rel=LOSS_RTOL), (got, expected)
