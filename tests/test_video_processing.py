"""MultimoodVideoProcessor: frames and pixels against the published SigLIP path, settings, save/load, no temp files."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoVideoProcessor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from multimood.model import video_processing_multimood
from multimood.model.feature_extraction_multimood import MultimoodFeatureExtractor
from multimood.model.media import probe_clip, sample_timeline
from multimood.model.video_processing_multimood import MultimoodVideoProcessor

MIXED = [
    "retalking_face_1.mp4",
    "sadtalker_WDA_AlexandriaOcasioCortez_000.mp4",  # mpeg4 part 2
    "videollama2_sample_demo_3_baby_playing.mp4",  # 16:9, 23.976 fps
    "retalking_face_3.mp4",
    "videollama2_output_v_1jgsRbGzCls_noaudio.mp4",  # 16:9, 600 frames
]
# The published path pads then runs SiglipImageProcessorPil; ours must give the same float32 values. Both round
# the same uint8 PIL output through the same float arithmetic, so the tolerance is float32 rounding only.
PIXEL_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def video_dir(shared_data: Path) -> Path:
    return shared_data / "media" / "video"


@pytest.fixture(scope="module")
def processor() -> MultimoodVideoProcessor:
    return MultimoodVideoProcessor()


def oracle_frames(path: Path, indices: list[int]) -> dict[int, np.ndarray]:
    """Every frame decoded in order, the wanted ones kept."""
    wanted, kept = set(indices), {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in wanted:
                kept[index] = frame.to_ndarray(format="rgb24")
    return kept


def published_pixels(frames: list[np.ndarray], size: int, pad: bool = True) -> torch.Tensor:
    """The published preprocessing (expand2square with the mean colour, then SigLIP)."""
    images = []
    for frame in frames:
        image = Image.fromarray(frame)
        if pad and image.width != image.height:
            side = max(image.size)
            square = Image.new("RGB", (side, side), (127, 127, 127))
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = square
        images.append(image)
    siglip = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return siglip(images, return_tensors="pt")["pixel_values"]


def write_clip(path: Path, width: int, height: int, num_frames: int = 12) -> Path:
    rng = np.random.default_rng(width)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(num_frames):
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_mixed_clips_match_the_published_pixels(processor: MultimoodVideoProcessor, video_dir: Path):
    """Five clips of two codecs, four sizes and three frame rates: frames equal full decoding at the sampled
    indices, pixel values equal the published pad + SiglipImageProcessorPil path."""
    out = processor([MIXED], video_folder=video_dir, record_ids=["r0"], return_frame_indices=True)
    pixels = out["pixel_values_videos"]
    assert pixels.shape == (1, 16, 3, 384, 384) and pixels.dtype == torch.float32
    counts = [probe_clip(video_dir / name, "r0").num_frames for name in MIXED]
    assert out["frame_indices"] == [sample_timeline(counts, 16)]
    picks = out["frame_indices"][0]
    clips = {clip for clip, _ in picks}
    oracle = {clip: oracle_frames(video_dir / MIXED[clip], [i for c, i in picks if c == clip]) for clip in clips}
    frames = [oracle[clip][index] for clip, index in picks]
    difference = (pixels[0] - published_pixels(frames, 384)).abs().max().item()
    assert difference <= PIXEL_TOLERANCE


def test_batch_uses_the_last_clips_and_offsets_positions(processor: MultimoodVideoProcessor, video_dir: Path):
    six = ["retalking_face_2.mp4", *MIXED]
    out = processor([six, MIXED[:2]], video_folder=video_dir, num_frames=4, size=56, return_frame_indices=True)
    assert out["pixel_values_videos"].shape == (2, 4, 3, 56, 56)
    positions = {clip for clip, _ in out["frame_indices"][0]}
    assert min(positions) >= 1 and max(positions) == 5  # the first of six clips is not used
    alone = processor([MIXED], video_folder=video_dir, num_frames=4, size=56)
    torch.testing.assert_close(out["pixel_values_videos"][0], alone["pixel_values_videos"][0], rtol=0, atol=0)


def test_clips_shared_by_samples_are_probed_and_decoded_once(monkeypatch, video_dir: Path):
    opened = {"probe": [], "decode": []}

    def counting(name, function):
        def wrapper(info_or_path, *args, **kwargs):
            opened[name].append(Path(getattr(info_or_path, "path", info_or_path)).name)
            return function(info_or_path, *args, **kwargs)

        return wrapper

    module = video_processing_multimood
    monkeypatch.setattr(module, "probe_clip", counting("probe", module.probe_clip))
    monkeypatch.setattr(module, "decode_frames", counting("decode", module.decode_frames))
    turns = [MIXED[:2], MIXED[:3], MIXED[1:3], [MIXED[0]]]  # consecutive turns share clips
    batch = MultimoodVideoProcessor()(turns, video_folder=video_dir, num_frames=4, size=56)
    assert sorted(opened["probe"]) == sorted(opened["decode"]) == sorted(MIXED[:3])
    for row, clips in enumerate(turns):
        alone = MultimoodVideoProcessor()([clips], video_folder=video_dir, num_frames=4, size=56)
        assert torch.equal(batch["pixel_values_videos"][row], alone["pixel_values_videos"][0])


def test_overrides_and_aspect_modes(video_dir: Path):
    wide = "videollama2_sample_demo_3_baby_playing.mp4"
    processor = MultimoodVideoProcessor(image_aspect_ratio="none")
    out = processor([[wide]], video_folder=video_dir, num_frames=5, size={"height": 224, "width": 224},
                    return_frame_indices=True, return_tensors="np")
    pixels = out["pixel_values_videos"]
    assert isinstance(pixels, np.ndarray) and pixels.shape == (1, 5, 3, 224, 224)
    indices = [index for _, index in out["frame_indices"][0]]
    frames = oracle_frames(video_dir / wide, indices)
    expected = published_pixels([frames[index] for index in indices], 224, pad=False).numpy()
    assert np.abs(pixels[0] - expected).max() <= PIXEL_TOLERANCE
    padded = MultimoodVideoProcessor()([[wide]], video_folder=video_dir, num_frames=5, size=224)
    expected = published_pixels([frames[index] for index in indices], 224)
    assert (padded["pixel_values_videos"][0] - expected).abs().max().item() <= PIXEL_TOLERANCE


def test_portrait_and_odd_sizes_pad_like_the_published_path(tmp_path: Path):
    for width, height in [(47, 63), (63, 47), (50, 50)]:
        path = write_clip(tmp_path / f"{width}x{height}.mp4", width, height)
        out = MultimoodVideoProcessor()([[path.name]], video_folder=tmp_path, num_frames=3, size=70,
                                        return_frame_indices=True)
        indices = [index for _, index in out["frame_indices"][0]]
        frames = oracle_frames(path, indices)
        expected = published_pixels([frames[index] for index in indices], 70)
        assert (out["pixel_values_videos"][0] - expected).abs().max().item() <= PIXEL_TOLERANCE


def test_threads_do_not_change_results(video_dir: Path):
    """Clips decoded in parallel, and one clip decoded with frame threads, give the same pixels."""
    for batch in ([MIXED], [[MIXED[4]]]):
        single = MultimoodVideoProcessor(decode_threads=1)(batch, video_folder=video_dir, num_frames=6, size=56)
        many = MultimoodVideoProcessor(decode_threads=3)(batch, video_folder=video_dir, num_frames=6, size=56)
        assert torch.equal(single["pixel_values_videos"], many["pixel_values_videos"])


def test_keyframe_mode_is_approximate_and_uses_keyframes(video_dir: Path):
    fast = MultimoodVideoProcessor(decode_mode="keyframe")
    out = fast([MIXED], video_folder=video_dir, return_frame_indices=True)
    assert out["pixel_values_videos"].shape == (1, 16, 3, 384, 384)
    for clip, index in out["frame_indices"][0]:
        assert index in probe_clip(video_dir / MIXED[clip], "k").keyframes
    exact = MultimoodVideoProcessor()([MIXED], video_folder=video_dir)
    assert (out["pixel_values_videos"] - exact["pixel_values_videos"]).abs().mean() < 0.5


def test_num_video_tokens():
    processor = MultimoodVideoProcessor()
    assert processor.num_video_tokens(16, 384, 384) == 1352 == processor.num_video_tokens()
    assert processor.num_video_tokens(4, 56, 56) == 2 * 2 * 2
    assert MultimoodVideoProcessor(projector_type="mlp2x_gelu").num_video_tokens(16, 384, 384) == 16 * 27 * 27


def test_save_and_load_round_trip(tmp_path: Path, video_dir: Path):
    processor = MultimoodVideoProcessor(num_frames=6, size=112, image_aspect_ratio="pad")
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "video_preprocessor_config.json").is_file()
    loaded = MultimoodVideoProcessor.from_pretrained(tmp_path)
    for name in ("num_frames", "num_k_vid", "size", "image_aspect_ratio", "image_mean", "image_std", "patch_size",
                 "connector_downsample", "projector_type", "decode_mode"):
        assert getattr(loaded, name) == getattr(processor, name), name
    assert loaded.connector_downsample == (2, 2, 2) and loaded.num_k_vid == 5
    auto = AutoVideoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    clips = [MIXED[:3]]
    reference = processor(clips, video_folder=video_dir)["pixel_values_videos"]
    assert torch.equal(reference, loaded(clips, video_folder=video_dir)["pixel_values_videos"])
    assert torch.equal(reference, auto(clips, video_folder=video_dir)["pixel_values_videos"])


@pytest.mark.parametrize("bad, error", [("missing.mp4", FileNotFoundError), ("../x.mp4", ValueError)])
def test_errors_name_the_record(processor: MultimoodVideoProcessor, video_dir: Path, bad: str, error: type):
    with pytest.raises(error, match="record rec-9.*"):
        processor([MIXED[:1], [MIXED[0], bad]], video_folder=video_dir, record_ids=["rec-8", "rec-9"])
    with pytest.raises(ValueError, match="rec-3: no video clips"):
        processor([[]], video_folder=video_dir, record_ids=["rec-3"])
    with pytest.raises(TypeError, match="unsupported"):
        processor([MIXED[:1]], video_folder=video_dir, frobnicate=True)


def test_no_temporary_files_and_no_subprocess(monkeypatch, tmp_path: Path, video_dir: Path):
    """The published path writes a joined mp4 and runs ffmpeg for every sample; ours must do neither."""
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))

    def refuse(*args, **kwargs):
        raise AssertionError("the data path must not create temporary files or processes")

    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile", "TemporaryDirectory",
                 "SpooledTemporaryFile"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(os, "fork", refuse)
    MultimoodVideoProcessor()([MIXED], video_folder=video_dir, num_frames=4, size=56)
    MultimoodVideoProcessor(decode_mode="keyframe")([MIXED], video_folder=video_dir, num_frames=4, size=56)
    MultimoodFeatureExtractor()([MIXED], video_folder=video_dir)
    assert not any(private_tmp.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")
@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
def test_equals_the_published_data_path_on_uniform_clips(shared_data: Path, tmp_path: Path):
    """End to end against `published_sample` (ffmpeg concat into a temporary mp4, decord, SigLIP) on five real
    clips re-encoded to one format by shared/bench/make_uniform_clips.sh: same frame indices, same pixels.

    The BT.709-tagged clip comes last: in the joined file its parameter sets stay in force for the clips after it,
    so the published path converts those with the BT.709 matrix (a join artefact; ours uses each clip's own tags).
    """
    pytest.importorskip("decord")
    bench = shared_data.parent / "bench"
    if not (bench / "published_data_path.py").is_file():
        pytest.skip(f"published data path not found in {bench}")
    spec = importlib.util.spec_from_file_location("published_data_path", bench / "published_data_path.py")
    published = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(published)
    names = ["retalking_face_1.mp4", "retalking_face_2.mp4", "retalking_face_3.mp4",
             "sadtalker_WDA_AlexandriaOcasioCortez_000.mp4", "videollama2_sample_demo_3_baby_playing.mp4"]
    sources = [str(shared_data / "media" / "video" / name) for name in names]
    subprocess.run(["bash", str(bench / "make_uniform_clips.sh"), str(tmp_path), *sources], check=True,
                   stdout=subprocess.DEVNULL)
    reference = published.published_sample([str(tmp_path / name) for name in names], temp_folder=str(tmp_path))
    out = MultimoodVideoProcessor()([names], video_folder=tmp_path, return_frame_indices=True)
    counts = np.cumsum([0] + [probe_clip(tmp_path / name, "u").num_frames for name in names])
    assert [int(counts[clip]) + index for clip, index in out["frame_indices"][0]] == reference["frame_indices"].tolist()
    assert (out["pixel_values_videos"][0] - reference["pixel_values"]).abs().max().item() <= PIXEL_TOLERANCE
