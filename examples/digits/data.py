"""
scikit-learn's bundled handwritten digits (1,797 8x8 images, no download) as 64x64 RGB images, a fixed train /
held-out split, and BAGEL training samples of three task kinds built with `transformers_bagel.training.samples`
(their latents encoded once by the training stack's `latents_from_vae_inputs`):

| task | sample |
|---|---|
| text-to-image | "a handwritten digit seven" -> an image of a seven |
| understanding | image, "Which digit is this?" -> "seven" |
| editing | image of one digit, "change the digit to three" -> another sample of a three |
"""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from transformers.utils import logging

from transformers_bagel.modeling_bagel import unpack_latents
from transformers_bagel.training.samples import edit_sample, text_to_image_sample, understanding_sample
from transformers_bagel.training.trainer import latents_from_vae_inputs

from .configs import DIGITS_IMAGE_SIZE, LATENT_PATCH_SIZE, VAE_DOWNSAMPLE


logger = logging.get_logger(__name__)

__all__ = [
    "DIGIT_NAMES",
    "TASK_KINDS",
    "UNDERSTANDING_QUESTION",
    "DigitsSplit",
    "DigitsTaskDataset",
    "answer_text",
    "augment_digit",
    "digit_from_text",
    "downscale_digit",
    "edit_instruction",
    "encode_latents",
    "load_digits_images",
    "split_digits",
    "text_to_image_prompt",
    "to_pil",
]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TASK_KINDS = ("text_to_image", "understanding", "edit")
UNDERSTANDING_QUESTION = "Which digit is this?"
_ORIGINAL_SIDE = 8
_ORIGINAL_MAX = 16.0  # load_digits pixel values are 0..16


def _check_label(label) -> int:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= int(label) <= 9:
        raise ValueError(f"A digit label must be an integer in 0..9, got {label!r}.")
    return int(label)


def text_to_image_prompt(label: int) -> str:
    """The text-to-image prompt of a digit, e.g. `"a handwritten digit seven"`."""
    return f"a handwritten digit {DIGIT_NAMES[_check_label(label)]}"


def edit_instruction(label: int) -> str:
    """The editing instruction towards a digit, e.g. `"change the digit to three"`."""
    return f"change the digit to {DIGIT_NAMES[_check_label(label)]}"


def answer_text(label: int) -> str:
    """The understanding answer of a digit, e.g. `"seven"`."""
    return DIGIT_NAMES[_check_label(label)]


def digit_from_text(text: str) -> int | None:
    """The digit an answer names (its first digit word), or None when it names none."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
    for word in text.lower().replace("?", " ").replace(".", " ").split():
        if word in DIGIT_NAMES:
            return DIGIT_NAMES.index(word)
    return None


def load_digits_images(size: int = DIGITS_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """
    scikit-learn's `load_digits`, upscaled with PIL bicubic to `size` x `size` RGB (white ink on black).

    Returns:
        `(images, labels)`: `uint8` array `(1797, size, size, 3)` and `int64` array `(1797,)`.
    """
    from sklearn.datasets import load_digits

    if not isinstance(size, int) or isinstance(size, bool) or size < _ORIGINAL_SIDE:
        raise ValueError(f"`size` must be an integer >= {_ORIGINAL_SIDE}, got {size!r}.")
    digits = load_digits()
    small = np.round(digits.images / _ORIGINAL_MAX * 255.0).astype(np.uint8)
    images = np.stack(
        [np.asarray(PIL.Image.fromarray(image, mode="L").resize((size, size), PIL.Image.Resampling.BICUBIC)) for image in small]
    )
    return np.repeat(images[..., None], 3, axis=-1), digits.target.astype(np.int64)


def downscale_digit(image) -> np.ndarray:
    """
    An image (PIL, or `uint8` HWC array) back to the 8x8 grey scale of `load_digits` (box filter, values 0..16),
    flattened to 64 features: the input of the evaluation classifier.
    """
    if isinstance(image, np.ndarray):
        image = to_pil(image)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"Expected a PIL image or a uint8 array, got {type(image).__name__}.")
    grey = image.convert("L").resize((_ORIGINAL_SIDE, _ORIGINAL_SIDE), PIL.Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.float64).reshape(-1) / 255.0 * _ORIGINAL_MAX


def to_pil(image: np.ndarray) -> PIL.Image.Image:
    """A `uint8` `(H, W, 3)` array as an RGB PIL image."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError("Expected a uint8 array of shape (H, W, 3).")
    return PIL.Image.fromarray(image, mode="RGB")


def augment_digit(image: PIL.Image.Image, rng: np.random.Generator, max_shift: float = 4.0, max_degrees: float = 10.0,
                  max_zoom: float = 0.1) -> PIL.Image.Image:
    """
    A random small affine change of a digit (shift up to `max_shift` pixels, rotation up to `max_degrees`, zoom up
    to `max_zoom`), background filled with black: the understanding samples see a new variant at every read, so the
    small vision encoder learns the digit and not the 1,437 training pictures.
    """
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    zoom = 1.0 + rng.uniform(-max_zoom, max_zoom)
    dx, dy = rng.uniform(-max_shift, max_shift, size=2)
    cx, cy = image.width / 2, image.height / 2
    # PIL maps each output pixel to an input pixel: the inverse of "zoom and rotate about the centre, then shift".
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    a, b, d, e = cos, sin, -sin, cos
    c = cx - a * (cx + dx) - b * (cy + dy)
    f = cy - d * (cx + dx) - e * (cy + dy)
    return image.transform(
        image.size, PIL.Image.Transform.AFFINE, (a, b, c, d, e, f), resample=PIL.Image.Resampling.BILINEAR, fillcolor=0
    )


@dataclass
class DigitsSplit:
    """The fixed split: `train_*` for training, `held_out_*` for the classifier and every evaluation."""

    train_images: np.ndarray
    train_labels: np.ndarray
    held_out_images: np.ndarray
    held_out_labels: np.ndarray


def split_digits(held_out_fraction: float = 0.2, seed: int = 0, size: int = DIGITS_IMAGE_SIZE) -> DigitsSplit:
    """Stratified split of the 1,797 digits into train and held-out parts with a fixed seed (sklearn
    `train_test_split`)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"`held_out_fraction` must be in (0, 1), got {held_out_fraction!r}.")
    images, labels = load_digits_images(size)
    train_x, held_x, train_y, held_y = train_test_split(
        images, labels, test_size=held_out_fraction, random_state=seed, stratify=labels
    )
    return DigitsSplit(train_x, train_y, held_x, held_y)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, image_processor, batch_size: int = 64) -> torch.Tensor:
    """
    The VAE posterior means of `images` in BAGEL's normalised latent space (`(z - shift_factor) * scaling_factor`),
    `(N, latent_channels, H / 8, W / 8)` float32, for the latent cache of the training samples: the training stack's
    [`latents_from_vae_inputs`] (`sample_posterior=False`) on batches of `batch_size` images, unpacked from tokens back
    to latent images (the collator packs them again).
    """
    if len(images) == 0:
        raise ValueError("Got no images to encode.")
    vae.eval()
    stride, p = VAE_DOWNSAMPLE * LATENT_PATCH_SIZE, LATENT_PATCH_SIZE  # pixels per latent token side, token side
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [to_pil(image) for image in images[start : start + batch_size]]
        pixels = torch.stack(image_processor.preprocess_vae(chunk)["vae_pixel_values"])
        grid = (pixels.shape[-2] // stride, pixels.shape[-1] // stride)
        tokens = latents_from_vae_inputs(
            vae, torch.tensor([grid] * len(chunk)), p, vae_pixel_values=pixels, sample_posterior=False
        )
        out.append(unpack_latents(tokens.reshape(len(chunk), grid[0] * grid[1], -1), grid, p).cpu())
    return torch.cat(out)


class DigitsTaskDataset(torch.utils.data.Dataset):
    """
    Training samples of one task kind over a set of digits, built with the project's sample builders
    (`text_to_image_sample`, `understanding_sample`, `edit_sample`). VAE images carry their cached normalised latents
    (the collator's fixed-latent path), so the VAE never runs during training. An editing sample draws its target
    class (never the source's) and the target image anew at every read, so every epoch sees new pairs.

    Args:
        images (`np.ndarray`): `uint8` `(N, H, W, 3)`.
        labels (`np.ndarray`): `(N,)` digits.
        task (`str`): one of [`TASK_KINDS`].
        latents (`torch.Tensor`, *optional*): `(N, C, H / 8, W / 8)` normalised latents; required for
            `"text_to_image"` and `"edit"`.
        seed (`int`, defaults to 0): seeds the editing pairs and the augmentation.
        augment (`bool`, defaults to `True`): understanding images get a random small affine change
            ([`augment_digit`]) at every read.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        task: str,
        latents: torch.Tensor | None = None,
        seed: int = 0,
        augment: bool = True,
    ):
        if task not in TASK_KINDS:
            raise ValueError(f"Unknown task {task!r}; expected one of {TASK_KINDS}.")
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"Need as many labels as images (got {len(images)} images, {len(labels)} labels), at least one.")
        if task != "understanding":
            if latents is None or len(latents) != len(images):
                raise ValueError(f"The {task!r} task needs one cached latent per image (`latents`).")
        labels = np.asarray(labels)
        if task == "edit" and len(np.unique(labels)) < 2:
            raise ValueError("Editing samples need images of at least two different digits.")
        self.images, self.labels, self.task, self.latents, self.augment = images, labels, task, latents, augment
        self.by_label = {int(label): np.flatnonzero(labels == label) for label in np.unique(labels)}
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index])
        row = f"{self.task}:{index}"
        image = to_pil(self.images[index])
        if self.task == "understanding":
            if self.augment:
                image = augment_digit(image, self.rng)
            return understanding_sample(image, UNDERSTANDING_QUESTION, answer_text(label), row=row)
        if self.task == "text_to_image":
            sample = text_to_image_sample(text_to_image_prompt(label), image, row=row)
            sample["segments"][-1]["latents"] = self.latents[index]
            return sample
        choices = [other for other in self.by_label if other != label]
        target_label = int(self.rng.choice(choices))
        target = int(self.rng.choice(self.by_label[target_label]))
        sample = edit_sample(image, edit_instruction(target_label), to_pil(self.images[target]), row=row)
        vae_segments = [segment for segment in sample["segments"] if segment["type"] == "vae_image"]
        vae_segments[0]["latents"] = self.latents[index]
        vae_segments[1]["latents"] = self.latents[target]
        return sample
