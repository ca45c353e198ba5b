"""Training with bad samples (`--on_bad_sample`): real `Trainer` runs of a tiny model on the quickstart's clips and
dialogues, with some clips cut off, replaced by a picture, missing, or damaged inside their data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import pytest
from PIL import Image
from transformers import AutoTokenizer

from multimood.data import bad_samples
from multimood.data.bad_samples import BadSampleError
from multimood.training import quickstart
from multimood.training import train as mm_train

# Records (0-based, in file order) given a bad clip, and the clip. The data file starts with a blank line and has
# one in the middle, so a record's line is not its index + 1.
BAD_CLIPS = {3: "cut.mp4", 8: "photo.mp4", 10: "missing.mp4"}


def _vocab(tokenizer: Path) -> int:
    return -(-(len(AutoTokenizer.from_pretrained(str(tokenizer))) + 4) // 8) * 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_samples")
    source, videos = quickstart.write_sample_data(root)
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    quickstart.train_tokenizer(records, root / "tokenizer")

    # cut.mp4: a faststart copy of a sample clip, cut at 60 % of its bytes (its sample table survives)
    whole = root / "whole.mp4"
    faststart = {"movflags": "faststart"}
    with av.open(str(videos / "clip_e.mp4")) as reader, av.open(str(whole), "w", options=faststart) as writer:
        stream = writer.add_stream_from_template(reader.streams.video[0])
        for packet in reader.demux(reader.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                writer.mux(packet)
    (videos / "cut.mp4").write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])

    Image.new("RGB", (64, 48), (120, 90, 60)).save(videos / "photo.mp4", format="PNG")

    lines = [""]
    for index, record in enumerate(records):
        if index in BAD_CLIPS:
            record["path_to_vid_user_most_recent"] = [*record["path_to_vid_user_most_recent"], BAD_CLIPS[index]][-2:]
        lines.append(json.dumps(record))
        if index == 5:
            lines.append("")
    path = root / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    line_of = {index: number for number, index in zip(
        [n for n, line in enumerate(lines, 1) if line.strip()], range(len(records)))}
    return {"records": path, "videos": videos, "tokenizer": root / "tokenizer", "all": records, "line_of": line_of,
            "vocab": _vocab(root / "tokenizer")}


def _argv(data: dict, output_dir: Path, *extra: str, records: Path | None = None) -> list[str]:
    config = quickstart.tiny_model_config(data["vocab"], num_frames=4, image_size=56)
    return [
        "--model_config", json.dumps(config), "--tokenizer_path", str(data["tokenizer"]),
        "--data_path", str(records or data["records"]), "--vid_folder", str(data["videos"]),
        "--num_frames", "4", "--image_size", "56", "--num_k_vid", "2", "--k_turn_history", "2",
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--report_to", "none", "--model_max_length", "1024", "--seed", "0",
        "--disable_tqdm", "True", "--dataloader_num_workers", "0", *extra,
    ]


def _listed(output_dir: Path) -> list[dict]:
    path = output_dir / bad_samples.BAD_SAMPLES_FILENAME
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_stops_before_training_naming_file_line_dialogue_and_clip(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(BadSampleError) as raised:
        mm_train.main(_argv(data, out, "--max_steps", "2"))
    message = str(raised.value)
    first = min(BAD_CLIPS)
    assert "\n" not in message
    assert message.startswith(f"{data['records']} line {data['line_of'][first]} "
                              f"(Dialogue_ID={data['all'][first]['Dialogue_ID']}): clip ")
    assert "cut.mp4 is truncated or damaged" in message and "3 bad records" in message
    assert "--on_bad_sample skip" in message
    listed = _listed(out)
    assert [(item["location"], item["clip"]) for item in listed] == [
        (f"line {data['line_of'][index]}", clip) for index, clip in sorted(BAD_CLIPS.items())]
    assert "still image" in listed[1]["problem"] and "does not exist" in listed[2]["problem"]
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_skip_leaves_the_bad_records_out_and_lists_them(data, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="multimood.data.bad_samples"):
        trainer, _ = mm_train.main(_argv(data, out, "--max_steps", "2", "--save_strategy", "no",
                                         "--on_bad_sample", "skip"))
    assert trainer.state.global_step == 2
    kept = trainer.train_dataset
    assert len(kept) == len(data["all"]) - len(BAD_CLIPS)
    good = [record for index, record in enumerate(data["all"]) if index not in BAD_CLIPS]
    assert kept["path_to_vid_user_most_recent"] == [record["path_to_vid_user_most_recent"] for record in good]
    assert [item["clip"] for item in _listed(out)] == [clip for _, clip in sorted(BAD_CLIPS.items())]
    assert f"left out {len(BAD_CLIPS)} of {len(data['all'])} records" in caplog.text
    assert (out / "model.safetensors").exists()


def test_probe_verdicts_are_cached_by_path_size_and_mtime(data, tmp_path, monkeypatch):
    """A second screen of the same records probes nothing; a clip changed in between is probed again."""
    videos = tmp_path / "videos"
    shutil.copytree(data["videos"], videos)
    calls: list[Path] = []
    real_probe = bad_samples.probe_clip
    monkeypatch.setattr(bad_samples, "probe_clip", lambda path, record: calls.append(path) or real_probe(path, record))
    dataset = mm_train.load_records(data["records"])

    def screen() -> list[dict]:
        checker = bad_samples.BadSampleScreen("skip", str(videos), 2, tmp_path / "out", progress=False)
        checker.dataset(dataset, data["records"])
        return _listed(tmp_path / "out")

    first = screen()
    distinct = {clip for clips in dataset["path_to_vid_user_most_recent"] for clip in clips[-2:]} - {"missing.mp4"}
    assert sorted(path.name for path in calls) == sorted(distinct)
    calls.clear()
    assert screen() == first and calls == []
    shutil.copyfile(videos / "clip_a.mp4", videos / "cut.mp4")  # the cut clip replaced by a whole one
    second = screen()
    assert [path.name for path in calls] == ["cut.mp4"]
    assert [item["clip"] for item in second] == ["photo.mp4", "missing.mp4"]


@pytest.mark.slow
def test_damage_found_mid_run_names_the_file_line_and_keeps_the_checkpoints(data, tmp_path):
    """A clip whose data is damaged inside probes fine and fails when its batch is built. The error names the
    record's line in the file (not its position in the batch), the checkpoints written before it stay complete, and
    a resumed run with `skip` finishes, listing the record."""
    good = [record for index, record in enumerate(data["all"]) if index not in BAD_CLIPS][:9]
    videos = tmp_path / "videos"
    shutil.copytree(data["videos"], videos)
    records = tmp_path / "records.jsonl"
    target = 4  # gets damaged.mp4, a copy of clip_d that is damaged after the first run
    good[target]["path_to_vid_user_most_recent"] = ["damaged.mp4"]
    records.write_text("\n" + "".join(json.dumps(record) + "\n" for record in good))  # record i on line i + 2
    shutil.copyfile(videos / "clip_d.mp4", videos / "damaged.mp4")
    out = tmp_path / "run"
    argv = ["--vid_folder", str(videos), "--save_strategy", "steps", "--save_steps", "1"]
    mm_train.main([*_argv(data, out, "--max_steps", "2", records=records), *argv])
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    damaged = bytearray((videos / "damaged.mp4").read_bytes())
    start = damaged.find(b"mdat") + 16
    damaged[start : start + (len(damaged) - start) // 2] = bytes((len(damaged) - start) // 2)
    (videos / "damaged.mp4").write_bytes(bytes(damaged))

    # 9 records in batches of 2: every record is seen by step 10 (two epochs), so the damaged one fails after step 2
    resume = ["--max_steps", "10", "--resume_from_checkpoint", "True"]
    with pytest.raises(BadSampleError) as raised:
        mm_train.main([*_argv(data, out, *resume, records=records), *argv])
    message = str(raised.value)
    assert message.startswith(f"{records} line {target + 2} (Dialogue_ID={good[target]['Dialogue_ID']}): ")
    assert "damaged.mp4" in message and "record 0" not in message and "\n" not in message
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert checkpoints[:2] == [out / "checkpoint-1", out / "checkpoint-2"]
    for checkpoint in checkpoints:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["global_step"] == int(checkpoint.name.split("-")[1])
        assert (checkpoint / "model.safetensors").stat().st_size > 0

    trainer, _ = mm_train.main([*_argv(data, out, *resume, "--on_bad_sample", "skip", records=records), *argv])
    assert trainer.state.global_step == 10
    listed = _listed(out)
    assert {(item["location"], item["clip"]) for item in listed} == {(f"line {target + 2}", "damaged.mp4")}
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_damage_found_in_a_dataloader_worker_is_still_one_line(data, tmp_path):
    """torch re-raises a worker's error with the worker's traceback as its message; the user still gets one line."""
    good = [record for index, record in enumerate(data["all"]) if index not in BAD_CLIPS][:2]
    videos = tmp_path / "videos"
    shutil.copytree(data["videos"], videos)
    damaged = bytearray((videos / "clip_a.mp4").read_bytes())
    start = damaged.find(b"mdat") + 16
    damaged[start : start + (len(damaged) - start) // 2] = bytes((len(damaged) - start) // 2)
    (videos / "damaged.mp4").write_bytes(bytes(damaged))
    good[1]["path_to_vid_user_most_recent"] = ["damaged.mp4"]
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(record) + "\n" for record in good))
    argv = _argv(data, tmp_path / "run", "--max_steps", "1", "--save_strategy", "no", records=records)
    with pytest.raises(BadSampleError) as raised:
        mm_train.main([*argv, "--vid_folder", str(videos), "--dataloader_num_workers", "1"])
    assert str(raised.value).startswith(f"{records} line 2 (Dialogue_ID={good[1]['Dialogue_ID']}): ")
    assert "\n" not in str(raised.value)
