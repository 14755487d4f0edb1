"""Image processor for BAGEL: the ViT side (understanding) and the VAE side (generation and editing).

BAGEL resizes with PIL bicubic (antialiased) to sizes chosen by its own rule (long edge at most `max`, short edge at
least `min`, both divisible by a stride, a pixel budget), which no transformers resize helper reproduces: the rule
rounds with Python's banker's rounding and applies its three constraints in a fixed order. It is written here, on
PIL, so the pixels are the ones the original model saw. No torchvision is needed.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import load_image
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["BagelImageProcessor", "to_rgb_image", "bagel_resize_size"]


# Modes PIL cannot turn into RGB directly without losing the value range: integer modes hold 16-bit values (PNG and
# TIFF 16-bit images open as "I;16*" or "I"); "F" holds floats on PIL's 0-255 scale (what `convert("L")` assumes).
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_HIGH_BIT_DEPTH_MODES = (*_SIXTEEN_BIT_MODES, "F")
# Modes with an alpha channel: composed onto white, as RGBA (a plain conversion to RGB would drop the alpha and show
# whatever colour transparent pixels hold, black for most files).
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


_DECODING_LOCK = threading.Lock()


@contextlib.contextmanager
def _complete_images_only():
    """PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` off while an image decodes here. Libraries turn it on for the whole
    process at import (lmms-eval does), after which a cut file decodes with its missing part filled in silently."""
    with _DECODING_LOCK:
        previous = PIL.ImageFile.LOAD_TRUNCATED_IMAGES
        PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            PIL.ImageFile.LOAD_TRUNCATED_IMAGES = previous


def to_rgb_image(image) -> PIL.Image.Image:
    """
    Turns one image into an RGB PIL image the way the original BAGEL data code does: transparent images are composed
    onto white, every other mode is converted to RGB. Also accepts a path, an http(s) URL, encoded bytes, an
    `np.ndarray` (`(H, W)`, `(H, W, C)` with C in 1, 3, 4; uint8, or float in [0, 1]) or a `torch.Tensor` (`(C, H, W)`
    or `(H, W)`; uint8, or float in [0, 1]). This is the project's one image loader.

    Raises:
        `TypeError` for anything else; `ValueError` for arrays of an unusable shape or an unreadable file.
    """
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        try:
            image = load_image(image)  # transformers' loader: fetched as its processors fetch a URL
        except Exception as error:  # requests' connection errors, PIL's decoding errors
            raise ValueError(f"Image URL {image!r} could not be loaded: {error}") from error
    elif isinstance(image, (str, os.PathLike, bytes, bytearray)):
        encoded = isinstance(image, (bytes, bytearray))
        name = f"data of {len(image)} bytes" if encoded else f"file {str(image)!r}"
        if not encoded and not Path(image).is_file():
            raise ValueError(f"Image file {str(image)!r} does not exist.")
        try:
            with PIL.Image.open(io.BytesIO(image) if encoded else Path(image)) as opened:
                with _complete_images_only():
                    opened.load()
                image = opened.copy()
        except (OSError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError) as error:
            raise ValueError(f"Image {name} could not be decoded: {error}") from error
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.ndim == 3:
            array = array.permute(1, 2, 0)
        image = _array_to_pil(array.float().numpy() if array.is_floating_point() else array.numpy())
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, PIL.Image.Image):
        raise TypeError(
            "Images must be PIL images, numpy arrays, torch tensors, file paths, URLs or encoded bytes, got "
            f"{type(image).__name__}."
        )
    else:
        try:
            with _complete_images_only():
                image.load()  # a lazily opened image decodes here: a truncated file fails now, naming it
        except (OSError, PIL.Image.DecompressionBombError) as error:
            name = getattr(image, "filename", "") or "a PIL image"
            raise ValueError(f"Image {name!r} could not be decoded: {error}") from error

    if image.width < 1 or image.height < 1:
        raise ValueError(f"Image has an empty size {image.size}.")
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image)
        if not np.isfinite(values).all():  # as for arrays: NaN / inf pixels would turn into an arbitrary image
            raise ValueError(f"Image of mode {image.mode} contains NaN or infinite values; pixels must be finite.")
        values = values.astype(np.float64)
        # A fixed scale, never per image: a uniform grey stays grey.
        top = 65535.0 if image.mode in _SIXTEEN_BIT_MODES else 255.0
        if values.min() < 0 or values.max() > top:
            raise ValueError(
                f"Image of mode {image.mode} holds values in [{values.min():g}, {values.max():g}], outside "
                f"[0, {top:g}] ({'16-bit integers' if top > 255 else 'PIL float pixels'}); rescale it first."
            )
        image = PIL.Image.fromarray((values / top * 255).round().astype(np.uint8), mode="L")
    if image.mode in _ALPHA_MODES or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"Image arrays must be (H, W), (H, W, C) or, for tensors, (C, H, W) with C in 1, 3, 4; got shape "
            f"{tuple(array.shape)}."
        )
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"Image arrays must be uint8 or float in [0, 1], got dtype {array.dtype}.")
        if not np.isfinite(array).all():
            raise ValueError("Image array contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < -1e-6 or high > 1 + 1e-6:
            hint = "divide 0-255 data by 255" if high > 1 + 1e-6 else "map [-1, 1] data with (x + 1) / 2"
            raise ValueError(
                f"Float image arrays must hold values in [0, 1], got [{low:g}, {high:g}]: {hint}, or pass uint8."
            )
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(array)


def _make_divisible(value: float, stride: int) -> int:
    # Python's round() on purpose: the original rounds half to even.
    return max(stride, int(round(value / stride) * stride))


def bagel_resize_size(
    width: int, height: int, max_size: int, min_size: int, stride: int, max_pixels: int
) -> tuple[int, int]:
    """
    BAGEL's target size `(width, height)` for an image: long edge at most `max_size`, short edge at least
    `min_size`, both sides multiples of `stride`, at most `max_pixels` pixels (the original's
    `MaxLongEdgeMinShortEdgeResize`, `data/transforms.py`).
    """

    def scaled(w, h, scale):
        return _make_divisible(round(w * scale), stride), _make_divisible(round(h * scale), stride)

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    new_w, new_h = scaled(width, height, scale)
    if new_w * new_h > max_pixels:
        new_w, new_h = scaled(new_w, new_h, max_pixels / (new_w * new_h))
    if max(new_w, new_h) > max_size:
        new_w, new_h = scaled(new_w, new_h, max_size / max(new_w, new_h))
    return new_w, new_h


class BagelImageProcessor(BaseImageProcessor):
    r"""
    Image processor of BAGEL (PIL backend).

    Two transforms, as in the original: the ViT transform (understanding) gives NaViT patches of a variable-size
    image, the VAE transform (generation, editing) gives a normalised pixel tensor for the autoencoder. At inference
    the original first resizes every input image with the VAE rule and then applies the ViT transform to that image
    (`resize_with_vae_rule_first=True`); its training data pipeline applies the ViT transform to the raw image.

    Args:
        vit_max_image_size (`int`, defaults to 980): longest edge for the ViT.
        vit_min_image_size (`int`, defaults to 224): shortest edge for the ViT.
        vit_patch_size (`int`, defaults to 14): ViT patch size (the ViT stride).
        vit_max_num_patch_per_side (`int`, defaults to 70): size of the ViT position table; larger grids are refused.
        vae_max_image_size (`int`, defaults to 1024): longest edge for the VAE.
        vae_min_image_size (`int`, defaults to 512): shortest edge for the VAE.
        vae_stride (`int`, defaults to 16): VAE downsampling times latent patch size.
        max_pixels (`int`, defaults to 14*14*9*1024): pixel budget of both transforms.
        image_mean, image_std (`list[float]`, defaults to 0.5): normalisation, giving values in [-1, 1].
        resize_with_vae_rule_first (`bool`, defaults to `True`): resize with the VAE rule before the ViT transform.
    """

    model_input_names = ["pixel_values", "image_grid_hw"]

    def __init__(
        self,
        vit_max_image_size: int = 980,
        vit_min_image_size: int = 224,
        vit_patch_size: int = 14,
        vit_max_num_patch_per_side: int = 70,
        vae_max_image_size: int = 1024,
        vae_min_image_size: int = 512,
        vae_stride: int = 16,
        max_pixels: int = 14 * 14 * 9 * 1024,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        resize_with_vae_rule_first: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vit_max_image_size = vit_max_image_size
        self.vit_min_image_size = vit_min_image_size
        self.vit_patch_size = vit_patch_size
        self.vit_max_num_patch_per_side = vit_max_num_patch_per_side
        self.vae_max_image_size = vae_max_image_size
        self.vae_min_image_size = vae_min_image_size
        self.vae_stride = vae_stride
        self.max_pixels = max_pixels
        self.image_mean = list(image_mean) if image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(image_std) if image_std is not None else [0.5, 0.5, 0.5]
        self.resize_with_vae_rule_first = resize_with_vae_rule_first
        self._check_sizes()

    def _check_sizes(self):
        for prefix, stride in (("vit", self.vit_patch_size), ("vae", self.vae_stride)):
            low, high = getattr(self, f"{prefix}_min_image_size"), getattr(self, f"{prefix}_max_image_size")
            if not 0 < low <= high:
                raise ValueError(f"Need 0 < {prefix}_min_image_size <= {prefix}_max_image_size, got {low} and {high}.")
            if stride <= 0:
                raise ValueError(f"The {prefix} stride must be positive, got {stride}.")
        if self.vit_max_image_size // self.vit_patch_size > self.vit_max_num_patch_per_side:
            raise ValueError(
                f"vit_max_image_size={self.vit_max_image_size} gives {self.vit_max_image_size // self.vit_patch_size} "
                f"patches per side, more than vit_max_num_patch_per_side={self.vit_max_num_patch_per_side}."
            )

    # -- sizes ----------------------------------------------------------------------------------------------------

    def get_resize_size(self, width: int, height: int, target: str) -> tuple[int, int]:
        """The `(width, height)` an image of this size is resized to by the `"vit"` or `"vae"` transform."""
        if target not in ("vit", "vae"):
            raise ValueError(f"`target` must be 'vit' or 'vae', got {target!r}.")
        stride = self.vit_patch_size if target == "vit" else self.vae_stride
        return bagel_resize_size(
            width,
            height,
            getattr(self, f"{target}_max_image_size"),
            getattr(self, f"{target}_min_image_size"),
            stride,
            self.max_pixels,
        )

    def _resize(self, image: PIL.Image.Image, target: str) -> PIL.Image.Image:
        width, height = self.get_resize_size(image.width, image.height, target)
        if (width, height) == image.size:
            return image
        return image.resize((width, height), PIL.Image.Resampling.BICUBIC)

    def vae_resize(self, image) -> PIL.Image.Image:
        """Any accepted image -> RGB PIL image resized by the VAE rule."""
        return self._resize(to_rgb_image(image), "vae")

    def vit_resize(self, image, resize_with_vae_rule_first: bool | None = None) -> PIL.Image.Image:
        """Any accepted image -> RGB PIL image as the ViT sees it (optionally VAE-resized first)."""
        image = to_rgb_image(image)
        if self._vae_first(resize_with_vae_rule_first):
            image = self._resize(image, "vae")
        return self._resize(image, "vit")

    def num_vit_patches(
        self, height: int, width: int, resize_with_vae_rule_first: bool | None = None
    ) -> tuple[int, int]:
        """Patch grid `(rows, cols)` of an image of this size after the ViT transform."""
        if self._vae_first(resize_with_vae_rule_first):
            width, height = self.get_resize_size(width, height, "vae")
        width, height = self.get_resize_size(width, height, "vit")
        return height // self.vit_patch_size, width // self.vit_patch_size

    def _vae_first(self, override: bool | None) -> bool:
        return self.resize_with_vae_rule_first if override is None else override

    # -- tensors --------------------------------------------------------------------------------------------------

    def _normalize(self, image: PIL.Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (pixels - mean) / std

    def preprocess(
        self,
        images,
        return_tensors: str | None = "pt",
        resize_with_vae_rule_first: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        ViT transform of one image or a list of images.

        Returns:
            [`BatchFeature`] with `pixel_values` of shape `(total_patches, 3 * patch_size**2)` (patches of all images
            concatenated, each flattened in `(p, q, channel)` order) and `image_grid_hw` of shape `(num_images, 2)`.
        """
        if kwargs:
            raise TypeError(f"Unexpected arguments for BagelImageProcessor.preprocess: {sorted(kwargs)}.")
        images = _as_list(images)
        p = self.vit_patch_size
        patches, grids = [], []
        for image in images:
            pixels = self._normalize(self.vit_resize(image, resize_with_vae_rule_first))
            channels, height, width = pixels.shape
            rows, cols = height // p, width // p
            if max(rows, cols) > self.vit_max_num_patch_per_side:
                raise ValueError(
                    f"Image of {width}x{height} pixels gives a {rows}x{cols} patch grid; the ViT position table has "
                    f"{self.vit_max_num_patch_per_side} per side."
                )
            tokens = pixels.reshape(channels, rows, p, cols, p).permute(1, 3, 2, 4, 0).reshape(rows * cols, -1)
            patches.append(tokens)
            grids.append((rows, cols))
        data = {"pixel_values": torch.cat(patches), "image_grid_hw": torch.tensor(grids, dtype=torch.long)}
        if return_tensors in (None, "np"):
            data = {key: value.numpy() for key, value in data.items()}
        elif return_tensors != "pt":
            raise ValueError(f"`return_tensors` must be 'pt', 'np' or None, got {return_tensors!r}.")
        return BatchFeature(data=data)

    def preprocess_vae(self, images, return_tensors: str | None = "pt") -> BatchFeature:
        """
        VAE transform of one image or a list of images.

        Returns:
            [`BatchFeature`] with `vae_pixel_values` (a list of `(3, H, W)` tensors in [-1, 1], sizes may differ) and
            `vae_image_sizes` (`(num_images, 2)`, `(H, W)` per image).
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"`return_tensors` must be 'pt' or None, got {return_tensors!r}.")
        pixels = [self._normalize(self.vae_resize(image)) for image in _as_list(images)]
        sizes = torch.tensor([tuple(p.shape[1:]) for p in pixels], dtype=torch.long)
        return BatchFeature(data={"vae_pixel_values": pixels, "vae_image_sizes": sizes})


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("Got an empty list of images.")
        return list(images)
    return [images]
