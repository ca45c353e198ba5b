"""The shell launchers compose the flags that run_multimood.py parses (torchrun replaced by a recorder)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from multimood.training.train import main, parse_args

SCRIPTS = Path(__file__).resolve().parents[1] / "run_scripts"


def launched_flags(script: str, tmp_path: Path, *extra: str) -> list[str]:
    """Run a launcher with a `torchrun` on PATH that records its arguments instead of launching."""
    recorder = tmp_path / "bin" / "torchrun"
    recorder.parent.mkdir()
    recorder.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {shlex.quote(str(tmp_path / "args"))}\n')
    recorder.chmod(0o755)
    env = dict(os.environ, PATH=f"{recorder.parent}:{os.environ['PATH']}", NPROC_PER_NODE="2")
    subprocess.run(["bash", str(SCRIPTS / script), "", "", "", *extra], check=True, env=env, timeout=60)
    args = (tmp_path / "args").read_text().splitlines()
    return args[args.index(str(SCRIPTS / "run_multimood.py")) + 1 :]


@pytest.mark.parametrize("script", ["finetune.sh", "finetune_lora.sh"])
def test_launchers_compose_parseable_flags(script, tmp_path):
    flags = launched_flags(script, tmp_path, "--max_steps", "3")
    model_args, data_args, training_args = parse_args(flags)
    assert model_args.model_path == "Qwen/Qwen2-1.5B-Instruct" and data_args.num_k_vid == 5
    assert training_args.max_steps == 3 and training_args.warmup_steps == pytest.approx(0.03)
    assert training_args.lr_scheduler_type == "cosine" and training_args.model_max_length == 2048
    if script == "finetune_lora.sh":
        assert training_args.lora_enable and training_args.lora_r == 64 and training_args.lora_alpha == 16
        assert training_args.learning_rate == pytest.approx(2e-4)
        assert training_args.deepspeed.endswith("zero2.json")
    else:
        assert not training_args.lora_enable and training_args.learning_rate == pytest.approx(2e-5)
        assert training_args.deepspeed.endswith("zero3.json")


def test_push_to_hub_offline_fails_before_training(tmp_path, monkeypatch, shared_data):
    """`run_multimood.py --push_to_hub` checks the Hub first: offline it stops at once, naming the repo."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records = tmp_path / "records.jsonl"  # valid: the flags and records are checked before the Hub
    records.write_text((shared_data / "records" / "mesc_val_records.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(RuntimeError, match="'someone/multimood-test'.*offline"):
        main(["--data_path", str(records), "--output_dir", str(tmp_path / "out"),
              "--push_to_hub", "True", "--hub_model_id", "someone/multimood-test"])
    assert not (tmp_path / "out").exists()
