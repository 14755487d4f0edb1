"""
The inputs of a [`BagelPipeline`] call, before any model runs: its `prompt` and `image` arguments as one ordered list
of items per batch element (texts, images, sampled video frames), checked and with files opened; the three guidance
contexts of each element, as segments laid out the way the original `interleave_inference` (`inferencer.py` of
ByteDance-Seed/Bagel) builds them, with where each guidance context is cut in the full one; and the defaults they
imply (the guidance preset, the output size).

This module lives beside the pipeline, not in `transformers_bagel`: it opens image and video files, speaks of the
pipeline's arguments in its errors, and its contexts are the pipeline's dual classifier-free guidance. The token
layout of the segments is the processor's and [`~transformers_bagel.sequence_layout.BagelSequence`]'s (see
`pipeline_contexts`).
"""

import os
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch

from .defaults import EDIT_PRESET, GEN_THINK_SYSTEM_PROMPT, TEXT_TO_IMAGE_PRESET


__all__ = [
    "Context",
    "GuidanceContexts",
    "VideoFrames",
    "build_contexts",
    "guidance_settings",
    "image_structure_tokens_in",
    "is_image",
    "normalize_prompts",
    "open_image",
    "open_video",
    "output_size",
]

_VIDEO_ITEM_KEYS = {"video", "num_frames", "fps"}


def is_image(item) -> bool:
    """Whether `item` is an image of an interleaved prompt (PIL, numpy HWC or torch CHW)."""
    return isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor))


@dataclass(frozen=True)
class VideoFrames:
    """The sampled frames of a video item of an interleaved prompt: ViT-only context images, in order."""

    frames: tuple


def open_image(path, argument: str):
    """An image file given as `argument`, opened (RGB), or a clear error naming the argument and the file."""
    from transformers_bagel.image_processing_bagel import to_rgb_image

    try:
        return to_rgb_image(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"`{argument}`: {error}") from error


def open_video(item: dict, opened: dict) -> VideoFrames:
    """A `{"video": ..., "num_frames": n, "fps": f}` item of `prompt` as its sampled frames (see
    [`~transformers_bagel.video_utils.load_video_frames`]), or a clear error naming the item. `opened` maps the ids
    of the items read so far to their frames: a video item repeated in a batch is read once."""
    from transformers_bagel.video_utils import load_video_frames

    unknown = sorted(set(item) - _VIDEO_ITEM_KEYS, key=str)
    if "video" not in item or unknown:
        raise ValueError(
            f"A dict item of `prompt` is a video: {{'video': ..., 'num_frames': n, 'fps': f}}; got the keys "
            f"{sorted(item, key=str)}"
            + (" (no 'video')" if "video" not in item else "")
            + (f" ({unknown} unknown)" if unknown else "")
            + "."
        )
    if id(item) not in opened:
        try:
            frames = load_video_frames(item["video"], num_frames=item.get("num_frames"), fps=item.get("fps"))
        except (ValueError, TypeError) as error:
            raise ValueError(f"A video item of `prompt` could not be read: {error}") from error
        opened[id(item)] = VideoFrames(tuple(frames))
    return opened[id(item)]


def image_structure_tokens_in(text: str, processor, config) -> list[str]:
    """The image boundary and placeholder tokens (of the model's `config`) written in `text`: only images may put
    them in a context."""
    ids = [config.start_of_image_token_id, config.end_of_image_token_id, config.image_token_id, config.latent_token_id]
    return [token for token in processor.tokenizer.convert_ids_to_tokens(ids) if token and token in text]


def _images_per_prompt(image, num_prompts: int) -> list[list]:
    """The `image` argument as one list of images per prompt (paths opened)."""
    if is_image(image) or isinstance(image, (str, os.PathLike)):
        per_prompt = [[image]] * num_prompts
    elif isinstance(image, (list, tuple)):
        if len(image) == 0:
            raise ValueError("`image` is an empty list.")
        if all(isinstance(i, (list, tuple)) for i in image):
            if len(image) != num_prompts:
                raise ValueError(f"`image` has {len(image)} image lists for {num_prompts} prompts.")
            per_prompt = [list(i) for i in image]
        elif any(isinstance(i, (list, tuple)) for i in image):
            raise ValueError(
                "`image` mixes images and lists of images: give one image per prompt, or one list of images "
                "per prompt."
            )
        elif num_prompts == 1:
            per_prompt = [list(image)]  # one prompt: all its images, in order (multi-image editing)
        elif len(image) == num_prompts:
            per_prompt = [[i] for i in image]  # one image per prompt, paired in order (as diffusers pairs)
        elif len(image) == 1:
            per_prompt = [list(image)] * num_prompts
        else:
            raise ValueError(
                f"`image` has {len(image)} images for {num_prompts} prompts: give one image per prompt (they are "
                "paired in order), one image for every prompt, or a list of image lists (one list per prompt) "
                "to give a prompt several images."
            )
    else:
        raise TypeError(
            f"`image` must be a PIL image, numpy array, torch tensor, file path or a list of them, "
            f"got {type(image).__name__}."
        )
    # A path given as `image` is an image (inside `prompt`, a string is text): open it now, naming `image`.
    opened = {}
    for images in per_prompt:
        for item in images:
            if isinstance(item, (str, os.PathLike)) and id(item) not in opened:
                opened[id(item)] = open_image(item, "image")
    return [[opened.get(id(item), item) for item in images] for images in per_prompt]


def _check_text(text: str, alone: bool, processor, config) -> None:
    """Refuses a text item that is empty (when it is the whole prompt), not valid text, or writes tokens that only the
    pipeline may place."""
    if not text.strip() and alone:
        raise ValueError("A prompt is empty.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"`prompt` holds characters that are not valid text ({error.reason} at position "
            f"{error.start}: a lone surrogate {text[error.start]!r})."
        ) from error
    found = image_structure_tokens_in(text, processor, config)
    if found:
        raise ValueError(
            f"`prompt` contains {found}, tokens reserved for image slots; pass images through `image` "
            "or as items of an interleaved `prompt` list instead of writing their tokens."
        )
    found = processor.special_tokens_in(text)
    if found:
        raise ValueError(
            f"`prompt` contains the special tokens {found}, which delimit BAGEL's segments; write "
            "each text as its own item of an interleaved `prompt` list instead."
        )


def normalize_prompts(prompt, image, processor, config) -> list[list]:
    """
    Each batch element of a pipeline call as an ordered list of items (str, image, [`VideoFrames`]): `image` items
    first, then the prompt's; files opened, video items read, every text checked. See [`BagelPipeline.__call__`] for
    the accepted forms. `processor` and `config` (the model's) name the tokens a text may not write.
    """
    if prompt is None:
        raise ValueError("`prompt` is required: a string, a list of strings, or a list of interleaved items.")
    if isinstance(prompt, str):
        batch = [[prompt]]
    elif isinstance(prompt, (list, tuple)):
        if len(prompt) == 0:
            raise ValueError("`prompt` is an empty list; give at least one prompt.")
        if all(isinstance(p, str) for p in prompt):
            batch = [[p] for p in prompt]
        elif all(isinstance(p, (list, tuple)) for p in prompt):
            batch = [list(p) for p in prompt]
        else:
            batch = [list(prompt)]  # one interleaved sequence, e.g. [img1, img2, "instruction"]
    else:
        raise TypeError(f"`prompt` must be a str or a list, got {type(prompt).__name__}.")

    if image is not None:
        batch = [images + items for images, items in zip(_images_per_prompt(image, len(batch)), batch)]
    batch = [[open_image(item, "prompt") if isinstance(item, os.PathLike) else item for item in items]
             for items in batch]  # fmt: skip
    videos = {}  # a video item repeated in a batch is read once
    batch = [[open_video(item, videos) if isinstance(item, dict) else item for item in items]
             for items in batch]  # fmt: skip

    for items in batch:
        if not items:
            raise ValueError("An interleaved input is empty.")
        for item in items:
            if isinstance(item, str):
                _check_text(item, len(items) == 1, processor, config)
            elif not is_image(item) and not isinstance(item, VideoFrames):
                raise TypeError(
                    f"Unsupported input item of type {type(item).__name__}: use str for text, PIL images, "
                    "numpy arrays or torch tensors for images, and {'video': ...} for a video."
                )
    return batch


@dataclass
class Context:
    """One conditioning sequence, as segments: ("text", str) | ("vae", PIL image) | ("vit", PIL image)."""

    segments: list = field(default_factory=list)


@dataclass
class GuidanceContexts:
    """
    The three contexts of dual CFG for one prompt, as `interleave_inference` (`inferencer.py` of ByteDance-Seed/Bagel)
    builds them: `full`, `no_text` (for text guidance) and `no_image` (for image guidance). `no_text_cut` /
    `no_image_cut`: the number of `full`'s first segments that the context is, when it is a prefix of `full`
    (its keys are then `full`'s first keys), else None.
    """

    full: Context
    no_text: Context
    no_image: Context
    image_size: tuple[int, int] | None  # (height, width) of the last input image after the VAE resize
    has_images: bool
    no_text_cut: int | None = None
    no_image_cut: int | None = None


def build_contexts(items: list, think: bool, image_processor) -> GuidanceContexts:
    """
    The three contexts of one prompt's `items` (see [`normalize_prompts`]), exactly as the original
    `interleave_inference` builds them: the full context; the text-guidance context (a snapshot taken before each text
    and after each image, so it keeps the images and drops the last text); the image-guidance context (every text,
    the thinking prompt included, no images). Each image is resized by the VAE rule (`image_processor.vae_resize`)
    and enters as its VAE latents then its ViT patches. A video item adds each of its frames as a ViT-only image (no
    VAE latents: it is context to look at, not an image to edit), in order.
    """
    full, no_image = [], []
    if think:
        full.append(("text", GEN_THINK_SYSTEM_PROMPT))
        no_image.append(("text", GEN_THINK_SYSTEM_PROMPT))
    no_text_cut, image_size, has_images, text_after_image = 0, None, False, False
    for item in items:
        if isinstance(item, str):
            text_after_image = text_after_image or len(full) > len(no_image)  # an image segment is in `full`
            no_text_cut = len(full)
            full.append(("text", item))
            no_image.append(("text", item))
        elif isinstance(item, VideoFrames):
            # A video is seen, not edited: its frames are ViT images only (as in understanding), and do not set
            # the output size. Like images, they are dropped by the image-guidance context.
            full.extend(("vit", frame) for frame in item.frames)
            no_text_cut = len(full) if item.frames else no_text_cut
            has_images = True
        else:
            image = image_processor.vae_resize(item)
            full.extend([("vae", image), ("vit", image)])
            image_size, has_images = (image.height, image.width), True
            no_text_cut = len(full)
    # The no-image context holds every text of the full one: it opens it when no image comes before a text.
    return GuidanceContexts(
        full=Context(full),
        no_text=Context(full[:no_text_cut]),
        no_image=Context(no_image),
        image_size=image_size,
        has_images=has_images,
        no_text_cut=no_text_cut,
        no_image_cut=None if text_after_image else len(no_image),
    )


def guidance_settings(batch: list[list], cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type) -> tuple:
    """The guidance settings of a call on `batch` (see [`normalize_prompts`]): each one left unset (None) is the
    editing preset's when an input holds an image (or a video), else the text-to-image preset's."""
    editing = any(not isinstance(item, str) for items in batch for item in items)
    preset = EDIT_PRESET if editing else TEXT_TO_IMAGE_PRESET
    given = {"cfg_text_scale": cfg_text_scale, "cfg_img_scale": cfg_img_scale, "cfg_interval": cfg_interval,
             "cfg_renorm_type": cfg_renorm_type}  # fmt: skip
    return tuple(preset[name] if value is None else value for name, value in given.items())


def output_size(
    contexts: list[GuidanceContexts], height: int | None, width: int | None, default_side: int
) -> tuple[int, int]:
    """The output size of a call: `height` and `width` where given, else the (VAE-resized) size of each prompt's last
    input image, or `default_side` for text-to-image; one size for the whole batch."""
    sizes = set()
    for ctx in contexts:
        default = ctx.image_size or (default_side, default_side)
        sizes.add((default[0] if height is None else height, default[1] if width is None else width))
    if len(sizes) > 1:
        raise ValueError(
            f"The prompts of one batch would give images of different sizes {sorted(sizes)}; pass `height` and "
            "`width`, or call the pipeline once per size."
        )
    return sizes.pop()
