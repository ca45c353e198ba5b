"""Video processor for MultiMood: a record's last clips, sampled as one timeline, to SigLIP pixel values.

Reproduces the published data path (join the clips, take 16 frames with the "uniform v1" rule, pad each frame
to a square of the mean colour, bicubic resize, rescale, normalise) without joining anything: frames are located
on the clips' joined timeline and decoded by seeking (see `media.py`). `decode_mode="keyframe"` is an approximate
fast path for users who trade exact frames for speed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image
from transformers import BatchFeature
from transformers.image_utils import SizeDict
from transformers.processing_utils import Unpack, VideosKwargs
from transformers.video_processing_utils import BaseVideoProcessor

from .media import (
    ClipInfo,
    decode_frames,
    distinct_clips,
    map_threads,
    nearest_keyframes,
    probe_clip,
    resolve_clip,
    sample_timeline,
)


class MultimoodVideoProcessorKwargs(VideosKwargs, total=False):
    r"""
    num_k_vid (`int`, *optional*, defaults to 5):
        Only the last `num_k_vid` clips of a record are used (the client's latest fragments).
    image_aspect_ratio (`str`, *optional*, defaults to `"pad"`):
        `"pad"` pads each frame to a square filled with the mean colour before resizing; `"none"` resizes directly.
    patch_size (`int`, *optional*, defaults to 14):
        Patch size of the vision tower, used to count video tokens.
    connector_downsample (`tuple[int, int, int]`, *optional*, defaults to `(2, 2, 2)`):
        Temporal, height and width stride of the video connector's sampler, used to count video tokens.
    projector_type (`str`, *optional*, defaults to `"stc_connector_v35"`):
        Video connector type, used to count video tokens.
    frame_pooling (`str`, *optional*, defaults to `"none"`):
        `"mean"` when an `mlp2x_gelu` connector averages the frames first (the model's `video_frame_pooling`), used
        to count video tokens.
    decode_mode (`str`, *optional*, defaults to `"exact"`):
        `"exact"` decodes exactly the frames the published path uses. `"keyframe"` is APPROXIMATE: it takes the
        keyframe nearest to each sampled frame and resizes with libswscale, much faster but not the same pixels.
    decode_threads (`int`, *optional*):
        Threads for decoding; defaults to `torch.get_num_threads()` (1 inside DataLoader workers).
    """

    num_k_vid: int
    image_aspect_ratio: Literal["pad", "none"]
    patch_size: int
    connector_downsample: tuple[int, int, int] | list[int]
    projector_type: str
    frame_pooling: Literal["none", "mean"]
    decode_mode: Literal["exact", "keyframe"]
    decode_threads: int | None


class MultimoodVideoProcessor(BaseVideoProcessor):
    r"""
    Turns each record's clip list into `num_frames` preprocessed frames sampled on the joined timeline of its last
    `num_k_vid` clips, exactly as the published code does on the ffmpeg-concatenated file, without writing that file.

    Preprocessing per frame matches `SiglipImageProcessorPil` after padding: pad to a square of the mean colour
    (`image_aspect_ratio="pad"`), PIL bicubic resize to `size`, rescale by 1/255, normalise with `image_mean` and
    `image_std`.
    """

    model_input_names = ["pixel_values_videos"]
    valid_kwargs = MultimoodVideoProcessorKwargs

    size = {"height": 384, "width": 384}
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    rescale_factor = 1 / 255
    num_frames = 16
    num_k_vid = 5
    image_aspect_ratio = "pad"
    patch_size = 14
    connector_downsample = (2, 2, 2)
    projector_type = "stc_connector_v35"
    frame_pooling = "none"
    decode_mode = "exact"
    decode_threads = None

    def __init__(self, **kwargs: Unpack[MultimoodVideoProcessorKwargs]) -> None:
        super().__init__(**kwargs)
        self.connector_downsample = tuple(self.connector_downsample)

    def preprocess(
        self,
        videos: Sequence[Sequence[str | os.PathLike]],
        video_folder: str | os.PathLike | None = None,
        record_ids: Sequence[object] | None = None,
        num_frames: int | None = None,
        size: int | dict[str, int] | SizeDict | None = None,
        return_frame_indices: bool = False,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            videos: one clip-name list per sample; the last `num_k_vid` clips of each list are used.
            video_folder: folder the clip names are relative to; names may not leave it. `None` uses paths as given.
            record_ids: one id per sample, named in errors (defaults to the sample's position).
            num_frames, size: per-call overrides of the saved settings (as can be any other saved attribute).
            return_frame_indices: also return `frame_indices`, per sample a list of (clip position in the
                sample's list, frame index within that clip) for every output frame.
            return_tensors: `"pt"` or `"np"`.

        Returns:
            `BatchFeature` with `pixel_values_videos` of shape (num_samples, num_frames, 3, height, width), float32.
        """
        settings = self._call_settings(num_frames=num_frames, size=size, **kwargs)
        if record_ids is None:
            record_ids = list(range(len(videos)))
        if len(record_ids) != len(videos):
            raise ValueError(f"got {len(videos)} samples but {len(record_ids)} record ids")
        threads = settings["decode_threads"] or torch.get_num_threads()
        selected = [
            self._select_clips(clips, video_folder, record_id, settings["num_k_vid"])
            for clips, record_id in zip(videos, record_ids)
        ]

        # 1. probe every distinct clip of the batch once (packet tables only), in parallel: consecutive turns of
        # a dialogue share most of their clips
        first_user = distinct_clips((paths for _, paths in selected), record_ids)
        info_of = dict(zip(first_user, map_threads(lambda job: probe_clip(*job), list(first_user.items()), threads)))
        infos = [[info_of[path] for path in paths] for _, paths in selected]

        # 2. pick the frames on each sample's joined timeline
        picks = [sample_timeline([info.num_frames for info in clips], settings["num_frames"]) for clips in infos]
        if settings["decode_mode"] == "keyframe":
            picks = [[(clip, nearest_keyframes(clips[clip], [index])[0]) for clip, index in sample]
                     for clips, sample in zip(infos, picks)]

        # 3. decode and resize the picked frames; 4. normalise them into the output batch
        picked_paths = [[(paths[clip], index) for clip, index in sample_picks]
                        for (_, paths), sample_picks in zip(selected, picks)]
        frames = self._decode_picked(picked_paths, info_of, first_user, settings, threads)
        pixel_values = _normalised_batch(picked_paths, frames, settings)

        data = {"pixel_values_videos": torch.from_numpy(pixel_values) if return_tensors == "pt" else pixel_values}
        if return_frame_indices:
            data["frame_indices"] = [
                [(offset + clip, index) for clip, index in sample_picks]
                for (offset, _), sample_picks in zip(selected, picks)
            ]
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["frame_indices"])

    def _decode_picked(
        self,
        picked_paths: list[list[tuple[Path, int]]],
        info_of: dict[Path, ClipInfo],
        first_user: dict[Path, object],
        settings: dict,
        threads: int,
    ) -> dict[Path, dict[int, np.ndarray]]:
        """Frame index -> resized RGB frame per clip: one decoding job per distinct clip, with the picks of all
        samples together, so a clip shared by several samples is read once."""
        wanted: dict[Path, set[int]] = {}
        for sample_picks in picked_paths:
            for path, index in sample_picks:
                wanted.setdefault(path, set()).add(index)
        jobs = [(info_of[path], sorted(indices), first_user[path]) for path, indices in wanted.items()]
        transform = self._frame_transform(settings)
        codec_threads = max(1, threads // max(1, len(jobs)))

        def decode(job: tuple) -> dict[int, np.ndarray]:
            info, indices, record_id = job
            return decode_frames(info, indices, transform, record_id, threads=codec_threads)

        return dict(zip(wanted, map_threads(decode, jobs, threads)))

    def num_video_tokens(
        self, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> int:
        """Number of `<video>` embeddings the connector makes from `num_frames` frames of height x width pixels."""
        num_frames = self.num_frames if num_frames is None else num_frames
        height = self.size.height if height is None else height
        width = self.size.width if width is None else width
        grid_height, grid_width = height // self.patch_size, width // self.patch_size
        if self.projector_type.startswith("stc_connector"):
            stride_t, stride_h, stride_w = self.connector_downsample
            return (num_frames // stride_t) * (grid_height // stride_h) * (grid_width // stride_w)
        if self.projector_type in ("linear", "mlp2x_gelu"):
            return (1 if self.frame_pooling == "mean" else num_frames) * grid_height * grid_width
        raise ValueError(f"unknown projector_type {self.projector_type!r}")

    def _call_settings(self, **overrides) -> dict:
        """The saved settings with this call's overrides (None means "use the saved value")."""
        names = ("num_frames", "size", "num_k_vid", "image_aspect_ratio", "image_mean", "image_std",
                 "rescale_factor", "decode_mode", "decode_threads")
        unknown = sorted(name for name, value in overrides.items() if value is not None and name not in names)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unsupported arguments {unknown}")
        settings = {name: getattr(self, name) if overrides.get(name) is None else overrides[name] for name in names}
        size = settings["size"]
        if isinstance(size, int):
            size = SizeDict(height=size, width=size)
        elif not isinstance(size, SizeDict):
            size = SizeDict(**size)
        if not (size.height and size.width):
            raise ValueError(f"size must give height and width, got {settings['size']}")
        settings["size"] = size
        if settings["image_aspect_ratio"] not in ("pad", "none"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'none', got {settings['image_aspect_ratio']!r}")
        if settings["decode_mode"] not in ("exact", "keyframe"):
            raise ValueError(f"decode_mode must be 'exact' or 'keyframe', got {settings['decode_mode']!r}")
        if settings["num_frames"] < 1:
            raise ValueError(f"num_frames must be at least 1, got {settings['num_frames']}")
        return settings

    @staticmethod
    def _select_clips(
        clips: Sequence[str | os.PathLike], video_folder: str | os.PathLike | None, record_id: object, num_k_vid: int
    ) -> tuple[int, list]:
        """(position of the first used clip in the record's list, resolved paths of the used clips)."""
        if isinstance(clips, (str, os.PathLike)):
            raise TypeError(f"record {record_id}: expected a list of clip names, got {clips!r}")
        if not clips:
            raise ValueError(f"record {record_id}: no video clips")
        used = list(clips)[-num_k_vid:] if num_k_vid else list(clips)
        return len(clips) - len(used), [resolve_clip(clip, video_folder, record_id) for clip in used]

    @staticmethod
    def _frame_transform(settings: dict) -> Callable[[av.VideoFrame], np.ndarray]:
        """Frame -> resized uint8 (height, width, 3), run on the decoding threads as frames come out."""
        height, width = settings["size"].height, settings["size"].width
        pad = settings["image_aspect_ratio"] == "pad"
        fill = tuple(int(mean * 255) for mean in settings["image_mean"])
        # one libswscale context per decoding thread: creating one per frame costs more than the conversion
        local = threading.local()

        def to_rgb(frame: av.VideoFrame, **size) -> np.ndarray:
            if not hasattr(local, "reformatter"):
                local.reformatter = VideoReformatter()
            return local.reformatter.reformat(frame, format="rgb24", **size).to_ndarray()

        if settings["decode_mode"] == "keyframe":
            def fast(frame: av.VideoFrame) -> np.ndarray:
                if not pad:
                    return to_rgb(frame, width=width, height=height, interpolation="AREA")
                side = max(frame.width, frame.height)
                scaled_width, scaled_height = round(frame.width * width / side), round(frame.height * height / side)
                rgb = to_rgb(frame, width=scaled_width, height=scaled_height, interpolation="AREA")
                canvas = np.empty((height, width, 3), np.uint8)
                canvas[:] = fill
                top, left = (height - scaled_height) // 2, (width - scaled_width) // 2
                canvas[top : top + scaled_height, left : left + scaled_width] = rgb
                return canvas

            return fast

        def exact(frame: av.VideoFrame) -> np.ndarray:
            image = Image.fromarray(to_rgb(frame))
            if pad and image.width != image.height:
                return np.asarray(_pad_and_resize(image, width, height, fill))
            return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))

        return exact


def _normalisation_table(settings: dict) -> np.ndarray:
    """uint8 -> float32 per channel, computed as SiglipImageProcessorPil does (float64 rescale, then float32
    normalise), so a table lookup gives bit-identical values."""
    levels = (np.arange(256, dtype=np.float64) * settings["rescale_factor"]).astype(np.float32)
    mean = np.asarray(settings["image_mean"], np.float32)[:, None]
    std = np.asarray(settings["image_std"], np.float32)[:, None]
    return (levels[None, :] - mean) / std


def _normalised_batch(picked_paths: list[list[tuple[Path, int]]], frames: dict[Path, dict[int, np.ndarray]],
                      settings: dict) -> np.ndarray:
    """(num_samples, num_frames, 3, height, width) float32: each picked uint8 frame through the normalisation
    table (rescale, mean and std in one lookup)."""
    table = _normalisation_table(settings)
    size = settings["size"]
    pixel_values = np.empty((len(picked_paths), settings["num_frames"], 3, size.height, size.width), np.float32)
    for sample, sample_picks in enumerate(picked_paths):
        for position, (path, index) in enumerate(sample_picks):
            rgb = frames[path][index]
            for channel in range(3):
                np.take(table[channel], rgb[..., channel], out=pixel_values[sample, position, channel])
    return pixel_values


def _pad_and_resize(image: Image.Image, width: int, height: int, fill: tuple[int, ...]) -> Image.Image:
    """Bicubic resize of `image` padded to a centred square of `fill`, bit-identical to padding then resizing.

    PIL resamples horizontally, then vertically. For a wide frame the padding is rows of `fill`, whose
    horizontal pass is `fill` again, so the horizontal pass runs on the frame alone and the rows are added before
    the vertical pass: the same pixels, about a third less work at 16:9.
    """
    side = max(image.width, image.height)
    if image.width > image.height:
        image = image.resize((width, image.height), Image.Resampling.BICUBIC)
        square = Image.new("RGB", (width, side), fill)
        square.paste(image, (0, (side - image.height) // 2))
    else:
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, ((side - image.width) // 2, 0))
    return square.resize((width, height), Image.Resampling.BICUBIC)


MultimoodVideoProcessor.register_for_auto_class("AutoVideoProcessor")

__all__ = ["MultimoodVideoProcessor"]
