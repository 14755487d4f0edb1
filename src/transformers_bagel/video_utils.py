"""
Videos for BAGEL's understanding: BAGEL has no video tokens. As in the original VLM data, a video is a few frames
sampled from it, and each frame enters the sequence as one ViT image block where the video stands. This module
reads the frames (a video file through PyAV, a folder of frame images, or frames already in memory) and samples them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers.utils import logging

from .image_processing_bagel import to_rgb_image


logger = logging.get_logger(__name__)

__all__ = ["DEFAULT_NUM_FRAMES", "sample_frame_indices", "load_video_frames"]

# Frames taken when neither `num_frames` nor `fps` is given: the smallest count the original's VLM training drew
# (`frame_sampler_args: min_num_frames 8, max_num_frames 12`).
DEFAULT_NUM_FRAMES = 8

_INSTALL_AV = 'Decoding video files needs PyAV: pip install "bagel-hf[video]" (or pip install "av>=12").'


def _check_num_frames(num_frames, argument: str = "num_frames") -> None:
    if num_frames is not None and (
        not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool) or num_frames < 1
    ):
        raise ValueError(f"`{argument}` must be an integer >= 1, got {num_frames!r}.")


def _check_rate(value, argument: str) -> None:
    if value is not None and (
        not isinstance(value, (int, float, np.number))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"`{argument}` must be a finite number > 0, got {value!r}.")


def sample_frame_indices(total: int, num_frames: int | None = None, fps: float | None = None, video_fps=None) -> list:
    """
    The indices of the frames to keep out of `total`, by the original BAGEL's deterministic frame sampler.

    - By count (`num_frames`, [`DEFAULT_NUM_FRAMES`] when neither argument is given): the frames are split into
      `num_frames` equal intervals, interval `i` covering `[floor(i * total / num_frames), floor((i + 1) * total /
      num_frames))` (bounds computed in floating point as the original does), and the middle frame of each is taken
      (`(first + last) // 2`, the lower of two middles). A
      video with no more frames than `num_frames` keeps all of them (the original pads such a video with copies
      of its last frame, which add tokens and no information).
    - By rate (`fps`, needs `video_fps`, the video's own rate): one frame per `1 / fps` seconds, at the middle of
      each such clip (`round((k + 0.5) / fps * video_fps)`, halves to even), the indices past the end dropped; with
      `num_frames` too, the first `num_frames` of them are kept.

    Args:
        total (`int`): the number of frames of the video.
        num_frames (`int`, *optional*): how many frames to take.
        fps (`float`, *optional*): how many frames to take per second of video.
        video_fps (`float`, *optional*): the video's frame rate, needed with `fps`.

    Returns:
        `list[int]`: increasing frame indices.

    Raises:
        `ValueError` for a `total` below 1, a `num_frames` below 1, a rate that is not a finite number > 0, or `fps`
        without `video_fps`.
    """
    if not isinstance(total, (int, np.integer)) or isinstance(total, bool) or total < 1:
        raise ValueError(f"The video has no frames to sample (`total`={total!r}).")
    _check_num_frames(num_frames)
    _check_rate(fps, "fps")
    total = int(total)
    if fps is not None:
        if video_fps is None:
            raise ValueError(
                "`fps` sampling needs the video's frame rate, which frames given as a list or a folder do not have: "
                "pass `num_frames` instead."
            )
        _check_rate(video_fps, "video_fps")
        clips = math.ceil(total * fps / video_fps)  # clip k covers [k / fps, (k + 1) / fps) seconds
        indices = [round((k + 0.5) / fps * video_fps) for k in range(clips)]
        indices = [index for index in indices if index < total]
        if not indices:
            indices = [0]
        return indices[:num_frames] if num_frames is not None else indices
    count = DEFAULT_NUM_FRAMES if num_frames is None else int(num_frames)
    if count >= total:
        return list(range(total))
    # Interval bounds in floating point, truncated, as the original computes them (`np.linspace`): for some sizes
    # (30 frames into 22) a bound falls one frame below the exact `i * total // count`; kept for parity.
    bounds = np.linspace(0, total, count + 1).astype(int).tolist()
    return [(bounds[i] + bounds[i + 1] - 1) // 2 for i in range(count)]


def _natural_key(name: str):
    """`frame_2.jpg` before `frame_10.jpg`: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _image_extensions() -> set[str]:
    PIL.Image.init()
    return {ext.lower() for ext in PIL.Image.registered_extensions()}


def _folder_frames(folder: Path) -> list[Path]:
    extensions = _image_extensions()
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions]
    if not files:
        raise ValueError(f"The video folder {str(folder)!r} holds no image files (frames are read from images).")
    return sorted(files, key=lambda p: _natural_key(p.name))


def _decode_file(path: Path, num_frames, fps) -> list[PIL.Image.Image]:
    try:
        import av
    except ImportError as error:
        raise ImportError(_INSTALL_AV) from error

    def open_stream(container):
        if not container.streams.video:
            raise ValueError(f"The video file {str(path)!r} has no video stream.")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return stream

    try:
        # First pass: the frame count (container metadata is not reliable for every format), the frame rate.
        with av.open(str(path)) as container:
            stream = open_stream(container)
            rate = stream.average_rate or stream.guessed_rate
            total = sum(1 for _ in container.decode(stream))
        if total == 0:
            raise ValueError(f"The video file {str(path)!r} has no frames.")
        keep = sample_frame_indices(total, num_frames, fps, float(rate) if rate else None)
        wanted, frames = set(keep), {}
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(open_stream(container))):
                if index in wanted:
                    frames[index] = frame.to_image().convert("RGB")
                if index >= keep[-1]:
                    break
    except av.FFmpegError as error:
        raise ValueError(f"The video file {str(path)!r} could not be decoded: {error}") from error
    missing = [index for index in keep if index not in frames]
    if missing:
        raise ValueError(f"The video file {str(path)!r} ended before its frames {missing} could be decoded.")
    return [frames[index] for index in keep]


def load_video_frames(video, num_frames: int | None = None, fps: float | None = None) -> list[PIL.Image.Image]:
    """
    The frames of `video` that BAGEL sees, as RGB PIL images, sampled by [`sample_frame_indices`].

    Args:
        video: a video file (any format FFmpeg reads, decoded with PyAV: `pip install "bagel-hf[video]"`), a folder
            of frame images (ordered by name, digit runs compared as numbers: `f_2.png` before `f_10.png`), or frames
            in memory: a list of images (PIL, numpy, tensors, paths: anything
            [`~image_processing_bagel.to_rgb_image`] takes), a `(T, H, W, C)` numpy array or a `(T, C, H, W)` tensor.
        num_frames (`int`, *optional*): how many frames to take; [`DEFAULT_NUM_FRAMES`] when `fps` is not given
            either.
        fps (`float`, *optional*): frames per second of video to take (video files only: a folder or a list has no
            frame rate).

    Returns:
        `list[PIL.Image.Image]`: the sampled frames, in order.

    Raises:
        `ValueError` naming the file, folder or argument for a missing, unreadable or corrupt video, a video without
        frames, a folder without images, or a `num_frames` below 1; `ImportError` when a video file is given and PyAV
        is not installed.
    """
    _check_num_frames(num_frames)
    _check_rate(fps, "fps")
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if path.is_dir():
            files = _folder_frames(path)
            return [to_rgb_image(files[i]) for i in sample_frame_indices(len(files), num_frames, fps)]
        if not path.is_file():
            raise ValueError(f"The video {str(video)!r} is neither a file nor a folder of frames.")
        return _decode_file(path, num_frames, fps)
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim != 4:
            raise ValueError(
                f"A video array must have 4 dimensions ((T, H, W, C) numpy, (T, C, H, W) torch), got shape "
                f"{tuple(video.shape)}."
            )
        frames = list(video)
    elif isinstance(video, (list, tuple)):
        frames = list(video)
    else:
        raise TypeError(
            "`video` must be a video file, a folder of frames, a list of frames or a 4-d array, got "
            f"{type(video).__name__}."
        )
    if not frames:
        raise ValueError("`video` has no frames (an empty list or array).")
    return [to_rgb_image(frames[i]) for i in sample_frame_indices(len(frames), num_frames, fps)]
