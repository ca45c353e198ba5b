"""Clip paths, probing and decoding shared by MultiMood's video processor and feature extractor.

The published code joins a record's clips into a temporary mp4 with the ffmpeg CLI, reads frames from that file
with decord and its audio with another ffmpeg process. Here the clips are one timeline instead: each clip is
probed once from its packet table (no decoding), frame indices are chosen on the joined timeline with the
published rule and mapped back to (clip, frame in clip), and only the packets those frames depend on are decoded.
No temporary file, no subprocess, and never a whole clip's frames in memory.

Clip integrity is checked where it is cheap, from the probe: a file that is not a video (a still image under a
video name, an audio file with a cover picture) and a clip whose readable packets fall short of what its container
promises (a file cut off mid-way: fewer frames than an mp4 sample table lists, or, in Matroska/WebM and AVI, more
than `TRUNCATION_TOLERANCE` seconds less video than the header states) are errors naming the record and the clip.
Containers that promise nothing (MPEG-TS, raw streams) cannot be checked up front; there, as everywhere, a frame
the decoder cannot produce is an error when it is decoded.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TypeVar

import av
import numpy as np

from .records import MissingClipError, MultimoodClipError

SAMPLING_RATE = 16000

# Decoders whose "skip non-reference frames" mode is exact: a non-reference picture (H.264 nal_ref_idc 0,
# MPEG-4 part 2 / MPEG-1/2 B-frames) is never used to predict another one, so skipping the ones we do not
# output leaves every output frame bit-identical (checked against full decoding in the tests).
_NONREF_SKIP_CODECS = frozenset({"h264", "mpeg4", "mpeg1video", "mpeg2video", "h263"})

_AUDIO_CHUNK = 1 << 14  # samples per resampler call

# Seconds of video a Matroska/WebM or AVI clip may lack against its header before it counts as cut off: headers
# round durations and the last frame's duration is sometimes unknown, a cut-off file lacks far more.
TRUNCATION_TOLERANCE = 0.5
# Codecs of still-image files: a single frame of one of these is a picture, not a video.
_IMAGE_CODECS = frozenset({"png", "apng", "gif", "webp", "bmp", "tiff", "mjpeg", "jpeg2000"})

T = TypeVar("T")
R = TypeVar("R")


def resolve_clip(clip: str | os.PathLike, video_folder: str | os.PathLike | None, record_id: object) -> Path:
    """Path of `clip`; inside `video_folder`, names that would escape the folder are refused.

    Clip names come from dataset records, so they are untrusted input: an absolute name, a `..` component or a
    symlink that resolves outside the folder raises `MultimoodClipError` (a `ValueError`). Without a folder the path
    is used as given. A missing file raises `MissingClipError` (also a `FileNotFoundError`). Both messages name the
    record and the path.
    """
    name = os.fspath(clip)
    if video_folder is None:
        path = Path(name)
    else:
        if not name:
            raise MultimoodClipError(f"record {record_id}: empty clip name")
        if Path(name).is_absolute() or PureWindowsPath(name).anchor:
            raise MultimoodClipError(
                f"record {record_id}: clip path {name!r} is absolute; it must be relative to {video_folder}"
            )
        if ".." in PurePosixPath(name).parts or ".." in PureWindowsPath(name).parts:
            raise MultimoodClipError(
                f"record {record_id}: clip path {name!r} contains '..' and could leave {video_folder}"
            )
        folder = Path(video_folder).resolve()
        path = Path(video_folder) / name
        if not path.resolve().is_relative_to(folder):
            raise MultimoodClipError(
                f"record {record_id}: clip {path} resolves to {path.resolve()}, outside the video folder {folder}"
            )
    if not path.is_file():
        raise MissingClipError(f"record {record_id}: clip {path} does not exist")
    return path


def _open(path: Path, record_id: object) -> av.container.InputContainer:
    try:
        return av.open(os.fspath(path), metadata_errors="ignore")
    except FileNotFoundError as error:
        raise MissingClipError(f"record {record_id}: clip {path} does not exist") from error
    except (av.FFmpegError, OSError) as error:
        raise MultimoodClipError(f"record {record_id}: cannot read clip {path}: {error}") from error


def _unreadable(path: Path, record_id: object, error: Exception) -> MultimoodClipError:
    return MultimoodClipError(f"record {record_id}: cannot decode clip {path}: {error}")


@dataclass(frozen=True)
class ClipInfo:
    """One clip's layout, read from its packet table without decoding.

    `num_frames` counts the video packets, which is what decord reports for the joined file of the published
    code (the mp4 sample count), so timeline indices match it exactly. The packet fields are in decode order;
    `display_order[j]` is the decode position of the j-th frame in presentation order.
    """

    path: Path
    num_frames: int
    fps: float
    duration: float
    keyframes: tuple[int, ...]
    has_audio: bool
    width: int
    height: int
    codec: str
    packet_pts: tuple[int | None, ...] = field(repr=False)
    packet_dts: tuple[int | None, ...] = field(repr=False)
    packet_is_key: tuple[bool, ...] = field(repr=False)
    display_order: tuple[int, ...] = field(repr=False)

    @property
    def seekable(self) -> bool:
        """Frames can be located by timestamp (every packet has a distinct pts)."""
        pts = self.packet_pts
        return None not in pts and len(set(pts)) == len(pts)


def probe_clip(path: Path, record_id: object) -> ClipInfo:
    """Read a clip's packet table (frame count, keyframes, timestamps) and stream facts; decodes nothing.

    Raises `ValueError` naming the record and the clip when the file is not a video or is cut off (see the module
    docstring).
    """
    with _open(path, record_id) as container:
        stream = _video_stream(container, path, record_id)
        try:
            packets = [
                (packet.pts, packet.dts, packet.is_keyframe, packet.duration)
                for packet in container.demux(stream)
                if packet.size
            ]
        except av.FFmpegError as error:
            raise _unreadable(path, record_id, error) from error
        if not packets:
            raise MultimoodClipError(f"record {record_id}: clip {path} has no video frames")
        if len(packets) == 1 and stream.codec_context.name in _IMAGE_CODECS:
            raise MultimoodClipError(
                f"record {record_id}: clip {path} is a still image ({stream.codec_context.name}), not a video"
            )
        shortfall = _shortfall(container, stream, packets)
        if shortfall:
            raise MultimoodClipError(f"record {record_id}: clip {path} is truncated or damaged: {shortfall}")
        pts, dts, is_key, _ = (tuple(column) for column in zip(*packets))
        if None in pts:
            display_order = tuple(range(len(pts)))
        else:
            display_order = tuple(sorted(range(len(pts)), key=pts.__getitem__))
        key_positions = {position for position, key in enumerate(is_key) if key}
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if container.duration:
            duration = container.duration / av.time_base
        elif stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = len(packets) / fps if fps else 0.0
        return ClipInfo(
            path=path,
            num_frames=len(packets),
            fps=fps,
            duration=duration,
            keyframes=tuple(index for index, position in enumerate(display_order) if position in key_positions),
            has_audio=bool(container.streams.audio),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
            packet_pts=pts,
            packet_dts=dts,
            packet_is_key=is_key,
            display_order=display_order,
        )


def _video_stream(container: av.container.InputContainer, path: Path, record_id: object) -> av.VideoStream:
    """The clip's video stream; cover pictures (attached pictures of audio files) and still images are refused."""
    streams = [
        stream for stream in container.streams.video
        if not stream.disposition & av.stream.Disposition.attached_pic
    ]
    if not streams:
        cover = " (only a cover picture)" if container.streams.video else ""
        raise MultimoodClipError(f"record {record_id}: clip {path} has no video stream{cover}")
    best = container.streams.best("video")
    stream = best if best in streams else streams[0]
    demuxer = container.format.name
    if demuxer in ("image2", "image2pipe") or demuxer.endswith("_pipe"):
        raise MultimoodClipError(
            f"record {record_id}: clip {path} is a still image ({stream.codec_context.name}), not a video"
        )
    return stream


def _shortfall(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    packets: Sequence[tuple[int | None, int | None, bool, int | None]],
) -> str | None:
    """How the readable video packets fall short of what the container header promises, or None.

    mp4/mov lists every frame in its sample table, which sits before the data in a "faststart" file and so survives
    a cut; Matroska/WebM (the track's `DURATION` tag) and AVI (the stream header's length) state the video's
    duration in their header. Other containers promise nothing.
    """
    demuxer = container.format.name
    if "mp4" in demuxer.split(","):
        if stream.frames > len(packets):
            return f"its container lists {stream.frames} video frames but only {len(packets)} can be read"
        return None
    if demuxer == "avi" and stream.frames and stream.time_base:
        promised = float(stream.frames * stream.time_base)  # the stream header's length, in time-base units
    elif demuxer == "matroska,webm":
        promised = _matroska_duration(stream.metadata.get("DURATION"))
        if promised is None and len(container.streams) == 1 and container.duration:
            promised = container.duration / av.time_base
    else:
        return None
    stamps = [(pts if pts is not None else dts, duration) for pts, dts, _, duration in packets]
    stamps = [(stamp, duration or 0) for stamp, duration in stamps if stamp is not None]
    if promised is None or not stamps or not stream.time_base:
        return None
    first = min(stamp for stamp, _ in stamps)
    readable = float((max(stamp + duration for stamp, duration in stamps) - first) * stream.time_base)
    if promised - readable > TRUNCATION_TOLERANCE:
        return f"its container promises {promised:.2f} s of video but only {readable:.2f} s can be read"
    return None


def _matroska_duration(value: str | None) -> float | None:
    """Seconds of a Matroska `DURATION` tag (`HH:MM:SS.nnnnnnnnn`), or None."""
    try:
        hours, minutes, seconds = (value or "").split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def uniform_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """The published "uniform v1" rule: frame i of N at round(((N-1)/num_frames)*(i+0.5) + 1e-6)."""
    segment = float(total_frames - 1) / num_frames
    return np.round(np.array([segment * (i + 0.5) for i in range(num_frames)]) + 1e-6).astype(int).tolist()


def sample_timeline(frame_counts: Sequence[int], num_frames: int) -> list[tuple[int, int]]:
    """Sample `num_frames` frames on clips joined end to end, as (clip position, frame index in that clip).

    Identical to sampling the concatenated file: the published rule runs on the total frame count and each global
    index is mapped back to its clip.
    """
    offsets = np.cumsum([0, *frame_counts])
    picks = []
    for index in uniform_frame_indices(int(offsets[-1]), num_frames):
        position = int(np.searchsorted(offsets, index, side="right")) - 1
        picks.append((position, index - int(offsets[position])))
    return picks


def nearest_keyframes(info: ClipInfo, indices: Sequence[int]) -> list[int]:
    """For the approximate keyframe mode: the keyframe closest to each index (the earlier one on ties)."""
    keyframes = info.keyframes or (0,)
    chosen = []
    for index in indices:
        position = bisect.bisect_left(keyframes, index)
        candidates = keyframes[max(position - 1, 0) : position + 1]
        chosen.append(min(candidates, key=lambda keyframe: (abs(keyframe - index), keyframe)))
    return chosen


def _decode_ranges(info: ClipInfo, indices: set[int]) -> list[tuple[int, int]]:
    """Decode-order packet ranges that produce the frames at presentation `indices`.

    A range starts at the last keyframe at or before the target (in decode order) whose pts is not later than the
    target's, so the leading pictures of an open GOP start one GOP earlier. Ranges are merged only when they
    overlap or touch: measured on the real clips with one decoder thread, a seek plus decoder flush costs less
    than decoding one frame, so any gap is worth skipping. A clip with one keyframe therefore gets one sequential
    pass up to its last target; a clip with dense keyframes gets one short run per target.
    """
    ranges = []
    for index in sorted(indices):
        target = info.display_order[index]
        start = target
        while start > 0 and not (info.packet_is_key[start] and info.packet_pts[start] <= info.packet_pts[target]):
            start -= 1
        ranges.append((start, target))
    ranges.sort()
    merged: list[list[int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def decode_frames(
    info: ClipInfo,
    indices: Sequence[int],
    transform: Callable[[av.VideoFrame], T],
    record_id: object,
    threads: int = 1,
) -> dict[int, T]:
    """Decode the frames at presentation `indices` of one clip and return {index: transform(frame)}.

    Seeks to the keyframe each frame depends on and decodes forward to it, skipping non-reference frames that are
    not wanted where the codec makes that exact; `transform` runs on each wanted frame as soon as it is decoded,
    so at most one full-size RGB frame per worker exists at a time.
    """
    wanted = {int(index) for index in indices}
    if not wanted:
        return {}
    if max(wanted) >= info.num_frames or min(wanted) < 0:
        raise IndexError(f"record {record_id}: frame indices {sorted(wanted)} out of range for {info.path}")
    results: dict[int, T] = {}
    with _open(info.path, record_id) as container:
        stream = container.streams.best("video")
        context = stream.codec_context
        if threads > 1:
            context.thread_type = "AUTO"
        context.thread_count = max(1, threads)
        try:
            if info.seekable:
                _decode_by_seeking(container, stream, info, wanted, transform, results)
            else:
                _decode_sequentially(container, stream, wanted, transform, results)
        except av.FFmpegError as error:
            raise _unreadable(info.path, record_id, error) from error
    missing = wanted - results.keys()
    if missing:
        raise MultimoodClipError(
            f"record {record_id}: frames {sorted(missing)} of clip {info.path} could not be decoded"
        )
    return results


def _decode_by_seeking(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    info: ClipInfo,
    wanted: set[int],
    transform: Callable[[av.VideoFrame], T],
    results: dict[int, T],
) -> None:
    context = stream.codec_context
    skip_unwanted = context.name in _NONREF_SKIP_CODECS
    index_of_pts = {info.packet_pts[info.display_order[index]]: index for index in wanted}
    target_positions = {info.display_order[index] for index in wanted}
    position_of_pts = {pts: position for position, pts in enumerate(info.packet_pts)}

    def collect(frames: list[av.VideoFrame]) -> None:
        for frame in frames:
            index = index_of_pts.get(frame.pts)
            if index is not None and index not in results:
                results[index] = transform(frame)

    def timestamp(position: int) -> int:
        return min(ts for ts in (info.packet_pts[position], info.packet_dts[position]) if ts is not None)

    def feed(start: int, end: int) -> bool:
        """Send packets start..end to the decoder; False when the seek landed after `start`."""
        first = True
        for packet in container.demux(stream):
            if not packet.size:
                continue
            position = position_of_pts.get(packet.pts, -1)
            if position < start:
                continue
            if position > start and first:
                return False
            first = False
            if skip_unwanted:
                context.skip_frame = "DEFAULT" if position in target_positions else "NONREF"
            collect(context.decode(packet))
            if position >= end:
                break
        return True

    for number, (start, end) in enumerate(_decode_ranges(info, wanted)):
        if start > 0 or number > 0:
            container.seek(timestamp(start), backward=True, stream=stream)
        if not feed(start, end):
            container.seek(timestamp(0), backward=True, stream=stream)
            feed(start, end)
        collect(context.decode(None))
        context.flush_buffers()


def _decode_sequentially(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    wanted: set[int],
    transform: Callable[[av.VideoFrame], T],
    results: dict[int, T],
) -> None:
    """Fallback for streams without usable timestamps: count frames in output order."""
    last = max(wanted)
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted:
            results[index] = transform(frame)
        if index >= last:
            break


def distinct_clips(clip_lists: Iterable[Sequence[Path]], record_ids: Iterable[object]) -> dict[Path, object]:
    """Each distinct clip of a batch, mapped to the first record using it (the one its errors name).

    Consecutive turns of a dialogue share most of their recent clips: reading each distinct clip once per
    batch is most of what batching gains in the processor.
    """
    first_user: dict[Path, object] = {}
    for clips, record_id in zip(clip_lists, record_ids):
        for clip in clips:
            first_user.setdefault(clip, record_id)
    return first_user


def map_threads(function: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """`[function(item) for item in items]`, on up to `threads` threads (decoders release the GIL)."""
    if threads <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(function, items))


def _resampler(source: av.AudioFrame, output_format: str, rate: int) -> av.AudioResampler:
    # The ffmpeg CLI (FFmpeg <= 7) resamples 8/16-bit input to 16-bit output in 16-bit arithmetic; newer
    # libswresample (bundled with PyAV) would use float. Ask for the CLI's choice so wav inputs match it exactly.
    options = {"internal_sample_fmt": "s16p"} if output_format == "s16" and source.format.bytes <= 2 else None
    return av.AudioResampler(format=output_format, layout="mono", rate=rate, options=options)


def _pcm_s16(frames: list[av.AudioFrame]) -> np.ndarray:
    if not frames:
        return np.zeros(0, np.float32)
    samples = np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames])
    return samples.astype(np.float32) / 32768.0


def decode_audio(path: Path, record_id: object, rate: int = SAMPLING_RATE) -> tuple[np.ndarray, bool]:
    """A media file's audio as mono float32 at `rate`: the samples `ffmpeg -i F -vn -acodec pcm_s16le -ac 1 -ar 16000`
    writes, divided by 32768. A file without an audio track gives silence as long as the file, and `False`."""
    with _open(path, record_id) as container:
        if not container.streams.audio:
            duration = container.duration / av.time_base if container.duration else 0.0
            return np.zeros(round(duration * rate), np.float32), False
        stream = container.streams.best("audio")
        resampler, fifo = None, av.AudioFifo()
        frames: list[av.AudioFrame] = []
        try:
            for frame in container.decode(stream):
                if resampler is None:
                    resampler = _resampler(frame, "s16", rate)
                fifo.write(frame)
                # resampling in large chunks gives the same samples with far fewer filter-graph calls
                while fifo.samples >= _AUDIO_CHUNK:
                    frames.extend(resampler.resample(fifo.read(_AUDIO_CHUNK)))
            if resampler is not None:
                if fifo.samples:
                    frames.extend(resampler.resample(fifo.read()))
                frames.extend(resampler.resample(None))
        except av.FFmpegError as error:
            raise _unreadable(path, record_id, error) from error
    return _pcm_s16(frames), True


def resample_waveform(waveform: np.ndarray, sampling_rate: int, rate: int = SAMPLING_RATE) -> np.ndarray:
    """A 1-D float waveform at `sampling_rate` as float32 at `rate`, with the libswresample filter used for clips."""
    waveform = np.ascontiguousarray(waveform, dtype=np.float32)
    if sampling_rate == rate or waveform.size == 0:
        return waveform
    frame = av.AudioFrame.from_ndarray(waveform[None, :], format="flt", layout="mono")
    frame.sample_rate = int(sampling_rate)
    frame.pts = 0
    frame.time_base = Fraction(1, int(sampling_rate))
    resampler = _resampler(frame, "flt", rate)
    frames = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([out.to_ndarray().reshape(-1) for out in frames]).astype(np.float32, copy=False)
