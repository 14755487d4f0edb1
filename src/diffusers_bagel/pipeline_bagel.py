"""BagelPipeline: text-to-image, image editing and thinking mode with BAGEL's dual classifier-free guidance."""

import contextlib
import copy
import difflib
import functools
import inspect
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.cache_utils import CacheMixin
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers.cache_utils import Cache

from transformers_bagel.chat import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT
from transformers_bagel.context_bagel import BagelContext, BagelContextSpan
from transformers_bagel.modeling_bagel import (
    BagelDecoderLayer,
    BagelForConditionalGeneration,
    pack_latents,
    unpack_latents,
)
from transformers_bagel.numerics import non_finite_message
from transformers_bagel.processing_bagel import BagelProcessor
from transformers_bagel.sequence_layout import BagelSequence

from .pipeline_folder import CLASS_NAME, pipeline_index_class_name, write_pipeline_code_and_pointers
from .pipeline_output import BagelPipelineOutput
from .defaults import (  # re-exported: the server and the app import them from here
    DEFAULT_MAX_THINK_TOKENS,
    EDIT_PRESET,
    MAX_GUIDANCE_SCALE,
    MAX_IMAGES_PER_CALL,
    MAX_INFERENCE_STEPS,
    MAX_TIMESTEP_SHIFT,
    MIN_TIMESTEP_SHIFT,
    OUTPUT_TYPES,
    RENORM_TYPES,
    TEXT_TO_IMAGE_PRESET,
)
from .lora_loading import BagelLoraLoaderMixin
from .scheduling_flow_match_euler import FlowMatchEulerScheduler
from .taylorseer import TaylorSeerState, TaylorSeerStepCache


logger = logging.get_logger(__name__)

# diffusers' step caches that apply to BAGEL's decoder layers (block-level hooks; the layer takes and returns
# `hidden_states`). Registering the layer's metadata lets diffusers' own hooks find its hidden states.
STEP_CACHE_CONFIGS = (FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig)
TransformerBlockRegistry.register(BagelDecoderLayer, TransformerBlockMetadata(hidden_states_argument_name="hidden_states"))

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_bagel import BagelPipeline

        >>> # a folder written by `bagel convert --input_dir BAGEL-7B-MoT --output_dir bagel-7b-hf`
        >>> pipe = BagelPipeline.from_pretrained("bagel-7b-hf", dtype=torch.bfloat16).to("cuda")
        >>> image = pipe("A photo of a red cat sitting on a wooden table.", generator=torch.manual_seed(0)).images[0]
        >>> edited = pipe("Make the cat blue.", image=image).images[0]
        >>> both = pipe([image, edited, "Put both cats on one sofa."]).images[0]
        ```
"""


class BagelVaeImageProcessor(VaeImageProcessor):
    """
    diffusers' [`~diffusers.image_processor.VaeImageProcessor`] whose PIL images are made by truncation to `uint8`,
    as the original BAGEL's `decode_image` makes them (`VaeImageProcessor.numpy_to_pil` rounds, which would move
    pixels one level away from the original's images). The `"np"` and `"pt"` outputs are the parent's.
    """

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
        """`(batch, height, width, 3)` (or one `(height, width, 3)`) RGB images in `[0, 1]` -> PIL images, with
        `uint8` pixels by truncation."""
        if images.ndim == 3:
            images = images[None, ...]
        return [PIL.Image.fromarray(image) for image in (images * 255).astype(np.uint8)]


@dataclass
class _Context:
    """One prompt's conditioning sequence, as segments: ("text", str) | ("vae", PIL image) | ("vit", PIL image)."""

    segments: list = field(default_factory=list)

    def copy(self) -> "_Context":
        return _Context(list(self.segments))


@dataclass
class _Contexts:
    """The three contexts of dual CFG for one prompt (SPEC "Three contexts for dual CFG")."""

    full: _Context
    no_text: _Context
    no_image: _Context
    image_size: tuple[int, int] | None  # (height, width) of the last input image after the VAE resize
    has_images: bool


@dataclass
class _Guidance:
    """
    The prefilled guidance branches of one pipeline call: every context in one [`BagelContext`], and per branch
    (`"cond"`: full context, `"text"`: without the text, `"image"`: without the images) the span of each prompt.
    """

    context: BagelContext
    spans: dict[str, list[BagelContextSpan]]
    batch_size: int
    use_text: bool
    use_image: bool
    image_reuses_full: bool
    cfg_text_scale: float
    cfg_img_scale: float
    cfg_interval: tuple[float, float]
    cfg_renorm_type: str
    cfg_renorm_min: float
    hooked_decoder: object = None  # the decoder carrying this call's diffusers step-cache hooks, if any

    @property
    def num_branches(self) -> int:
        return 1 + self.use_text + self.use_image


def _is_prefix(prefix: _Context, context: _Context) -> bool:
    """Whether `prefix`'s segments open `context` (texts equal, images the same objects)."""
    if len(prefix.segments) > len(context.segments):
        return False
    return all(
        a[0] == b[0] and (a[1] == b[1] if a[0] == "text" else a[1] is b[1])
        for a, b in zip(prefix.segments, context.segments)
    )


class _DenoisingLayers(torch.nn.Module, CacheMixin):
    """The decoder's layer list (the same modules) as a module that diffusers' `CacheMixin` can put its step-cache
    hooks on: `enable_cache`, `cache_context` and `disable_cache` are diffusers' own, applied to BAGEL's layers."""

    def __init__(self, layers: torch.nn.ModuleList):
        super().__init__()
        self.layers = layers


def _one_call_at_a_time(call):
    """Calls on one pipeline from several threads run one after another: a call's values (`num_timesteps`, the
    guidance scales, `_interrupt`), the scheduler's timesteps and a step cache's hooks live on the pipeline, as in
    every diffusers pipeline, so overlapping calls would mix them. The lock is re-entrant: a step callback may call
    the pipeline again."""

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        with self._call_lock:
            return call(self, *args, **kwargs)

    return wrapper


# Arguments of other diffusers pipelines that BAGEL has under another name, or has no use for.
_OTHER_PIPELINES_ARGUMENTS = {
    "guidance_scale": "BAGEL's text guidance is `cfg_text_scale` (and its image guidance, for edits, `cfg_img_scale`)",
    "true_cfg_scale": "BAGEL's text guidance is `cfg_text_scale`",
    "image_guidance_scale": "BAGEL's image guidance is `cfg_img_scale`",
    "negative_prompt": (
        "BAGEL has no negative prompt: its guidance contrasts the full context with the context without the text "
        "(`cfg_text_scale`) and without the images (`cfg_img_scale`)"
    ),
    "num_images": "use `num_images_per_prompt`",
    "steps": "use `num_inference_steps`",
    "seed": "pass `generator=torch.Generator().manual_seed(seed)`",
    "size": "use `height` and `width`",
}


def _unknown_arguments_message(kwargs: dict, call) -> str:
    """The TypeError of arguments `__call__` does not take, saying what BAGEL calls them, or the closest names."""
    known = [name for name in inspect.signature(call).parameters if name != "kwargs"]
    lines = []
    for name in kwargs:
        hint = _OTHER_PIPELINES_ARGUMENTS.get(name)
        if hint is None:
            close = difflib.get_close_matches(name, known, n=2)
            hint = f"did you mean {' or '.join(f'`{c}`' for c in close)}?" if close else "see help(BagelPipeline.__call__)"
        lines.append(f"`{name}`: {hint}")
    message = "BagelPipeline got unexpected keyword arguments: " + "; ".join(lines)
    return message if message.endswith("?") else message + "."


def _as_int(value):
    """A numpy / torch integer scalar as a Python int (for the argument checks); anything else unchanged."""
    if isinstance(value, (np.integer, torch.Tensor)) and not isinstance(value, bool):
        if isinstance(value, torch.Tensor) and (value.numel() != 1 or value.is_floating_point()):
            return value
        return int(value)
    return value


def _is_image(item) -> bool:
    return isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor))


@dataclass(frozen=True)
class _VideoFrames:
    """The sampled frames of a video item of an interleaved prompt: ViT-only context images, in order."""

    frames: tuple


_VIDEO_ITEM_KEYS = {"video", "num_frames", "fps"}


class BagelPipeline(DiffusionPipeline, BagelLoraLoaderMixin):
    r"""
    Pipeline for text-to-image generation and image editing with BAGEL.

    Args:
        model ([`~transformers_bagel.BagelForConditionalGeneration`]): the BAGEL model.
        vae ([`AutoencoderKL`]): the FLUX autoencoder.
        scheduler ([`FlowMatchEulerScheduler`]): BAGEL's shifted Euler schedule and dual-CFG combination.
        processor ([`~transformers_bagel.BagelProcessor`]): tokenizer and image processor.
    """

    model_cpu_offload_seq = "model->vae"
    # Every component is needed: the model denoises, the VAE encodes input images and decodes the result, the
    # scheduler steps and combines the guidance, the processor tokenizes.
    _optional_components = []
    _callback_tensor_inputs = ["latents"]
    # bf16 / fp16 convolutions are several times slower than float32 on CPUs (a bf16 call on CPU spent 7x the float32
    # time, almost all in the VAE): a half-precision VAE on the CPU runs in float32 unless this is set to False.
    vae_float32_on_cpu = True

    def __init__(
        self,
        model: BagelForConditionalGeneration,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerScheduler,
        processor: BagelProcessor,
    ):
        super().__init__()
        self.register_modules(model=model, vae=vae, scheduler=scheduler, processor=processor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        # The model packs latent patches (2 x 2 for BAGEL) into tokens: image sides are multiples of 8 x 2.
        patch_size = self.model.config.latent_patch_size if getattr(self, "model", None) else 2
        latent_channels = self.vae.config.latent_channels if getattr(self, "vae", None) else 16
        self.image_processor = BagelVaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor * patch_size, vae_latent_channels=latent_channels
        )
        self._call_lock = threading.RLock()
        # The current (or last) call's values behind the properties, as diffusers pipelines keep them.
        self._cfg_text_scale = self._cfg_img_scale = self._cfg_interval = self._cfg_renorm_type = None
        self._num_timesteps = None
        self._interrupt = False

    # -- properties -----------------------------------------------------------------------------------------------

    @property
    def cfg_text_scale(self) -> float | None:
        """The text guidance scale of the current (or last) call, its preset value when the call left it unset;
        `None` before any call."""
        return self._cfg_text_scale

    @property
    def cfg_img_scale(self) -> float | None:
        """The image guidance scale of the current (or last) call (the preset's when unset); `None` before any
        call."""
        return self._cfg_img_scale

    @property
    def cfg_interval(self) -> tuple[float, float] | None:
        """The guidance interval of the current (or last) call (the preset's when unset); `None` before any call."""
        return self._cfg_interval

    @property
    def cfg_renorm_type(self) -> str | None:
        """The guidance renormalisation of the current (or last) call (the preset's when unset); `None` before any
        call."""
        return self._cfg_renorm_type

    @property
    def num_timesteps(self) -> int | None:
        """The number of denoising steps of the current (or last) call; `None` before its schedule is set."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """
        Whether the running call is asked to stop denoising: set `pipe._interrupt = True` (as in diffusers'
        pipelines), in `callback_on_step_end` or from another thread (a "stop" button), and the call leaves its loop
        after the current step and decodes the latents it has. Each call starts with it False. Calls on one pipeline
        from several threads run one after another (see `__call__`), so the properties always belong to the call that
        runs.
        """
        return self._interrupt

    def to_json_string(self) -> str:
        """The pipeline's `model_index.json`, naming the class in diffusers' custom-pipeline form (`["pipeline_bagel",
        "BagelPipeline"]`, with `pipeline_bagel.py` beside it), as a converted folder's."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = CLASS_NAME
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        """
        [`~ConfigMixin.save_config`] with the other top-level files of a BAGEL pipeline folder (`pipeline_bagel.py`,
        the root `config.json` / `processor_config.json`): every folder `save_pretrained` writes loads through
        `BagelPipeline.from_pretrained`, `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` and the Auto
        classes' pointers, as a converted one does.
        """
        os.makedirs(save_directory, exist_ok=True)
        write_pipeline_code_and_pointers(save_directory)
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """[`~ConfigMixin.load_config`]; a converted folder's custom-pipeline class name (`["pipeline_bagel",
        "BagelPipeline"]`, for `DiffusionPipeline.from_pretrained`) is read as this class, so that loading through
        `BagelPipeline` runs no code from the folder and needs no `trust_remote_code`."""
        loaded = super().load_config(*args, **kwargs)
        pipeline_index_class_name(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    @property
    def latent_patch_size(self) -> int:
        return self.model.config.latent_patch_size

    @property
    def latent_downsample(self) -> int:
        return self.model.config.latent_downsample

    @property
    def default_sample_size(self) -> int:
        """BAGEL's default image side (1024), capped by the model's latent position table."""
        return min(1024, self.model.config.max_image_size)

    # -- inputs ---------------------------------------------------------------------------------------------------

    def _normalize_prompts(self, prompt, image) -> list[list]:
        """Each batch element as an ordered list of items (str or image): `image` items first, then the prompt."""
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
            if _is_image(image) or isinstance(image, (str, os.PathLike)):
                per_prompt = [[image]] * len(batch)
            elif isinstance(image, (list, tuple)):
                if len(image) == 0:
                    raise ValueError("`image` is an empty list.")
                if all(isinstance(i, (list, tuple)) for i in image):
                    if len(image) != len(batch):
                        raise ValueError(f"`image` has {len(image)} image lists for {len(batch)} prompts.")
                    per_prompt = [list(i) for i in image]
                elif any(isinstance(i, (list, tuple)) for i in image):
                    raise ValueError(
                        "`image` mixes images and lists of images: give one image per prompt, or one list of images "
                        "per prompt."
                    )
                elif len(batch) == 1:
                    per_prompt = [list(image)]  # one prompt: all its images, in order (multi-image editing)
                elif len(image) == len(batch):
                    per_prompt = [[i] for i in image]  # one image per prompt, paired in order (as diffusers pairs)
                elif len(image) == 1:
                    per_prompt = [list(image)] * len(batch)
                else:
                    raise ValueError(
                        f"`image` has {len(image)} images for {len(batch)} prompts: give one image per prompt (they are "
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
                        opened[id(item)] = self._open_image(item, "image")
            per_prompt = [[opened.get(id(item), item) for item in images] for images in per_prompt]
            batch = [images + items for images, items in zip(per_prompt, batch)]
        batch = [[self._open_image(item, "prompt") if isinstance(item, os.PathLike) else item for item in items]
                 for items in batch]  # fmt: skip
        videos = {}  # a video item repeated in a batch is read once
        batch = [[self._open_video(item, videos) if isinstance(item, dict) else item for item in items]
                 for items in batch]  # fmt: skip

        for items in batch:
            if not items:
                raise ValueError("An interleaved input is empty.")
            for item in items:
                if isinstance(item, str):
                    if not item.strip() and len(items) == 1:
                        raise ValueError("A prompt is empty.")
                    try:
                        item.encode("utf-8")
                    except UnicodeEncodeError as error:
                        raise ValueError(
                            f"`prompt` holds characters that are not valid text ({error.reason} at position "
                            f"{error.start}: a lone surrogate {item[error.start]!r})."
                        ) from error
                    found = self._image_structure_tokens_in(item)
                    if found:
                        raise ValueError(
                            f"`prompt` contains {found}, tokens reserved for image slots; pass images through `image` "
                            "or as items of an interleaved `prompt` list instead of writing their tokens."
                        )
                    found = self.processor.special_tokens_in(item)
                    if found:
                        raise ValueError(
                            f"`prompt` contains the special tokens {found}, which delimit BAGEL's segments; write "
                            "each text as its own item of an interleaved `prompt` list instead."
                        )
                elif not _is_image(item) and not isinstance(item, _VideoFrames):
                    raise TypeError(
                        f"Unsupported input item of type {type(item).__name__}: use str for text, PIL images, "
                        "numpy arrays or torch tensors for images, and {'video': ...} for a video."
                    )
        return batch

    def _open_video(self, item: dict, opened: dict) -> _VideoFrames:
        """A `{"video": ..., "num_frames": n, "fps": f}` item of `prompt` as its sampled frames (see
        [`~transformers_bagel.video_utils.load_video_frames`]), or a clear error naming the item."""
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
            opened[id(item)] = _VideoFrames(tuple(frames))
        return opened[id(item)]

    def _open_image(self, path, argument: str):
        """An image file given as `argument`, opened (RGB), or a clear error naming the argument and the file."""
        from transformers_bagel.image_processing_bagel import to_rgb_image

        try:
            return to_rgb_image(path)
        except (ValueError, OSError) as error:
            raise ValueError(f"`{argument}`: {error}") from error

    def _image_structure_tokens_in(self, text: str) -> list[str]:
        """The image boundary and placeholder tokens written in `text`: only images may put them in a context."""
        config = self.model.config
        ids = [config.start_of_image_token_id, config.end_of_image_token_id, config.image_token_id, config.latent_token_id]
        return [token for token in self.processor.tokenizer.convert_ids_to_tokens(ids) if token and token in text]

    def check_inputs(
        self,
        height,
        width,
        num_inference_steps,
        timestep_shift,
        cfg_text_scale,
        cfg_img_scale,
        cfg_interval,
        cfg_renorm_type,
        cfg_renorm_min,
        num_images_per_prompt,
        output_type,
        callback_on_step_end_tensor_inputs,
        think=False,
        max_think_tokens=None,
        think_do_sample=False,
        think_temperature=0.3,
        callback_on_step_end=None,
    ):
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(
                "`callback_on_step_end` must be a callable `(pipe, step, timestep, callback_kwargs) -> dict`, got "
                f"{type(callback_on_step_end).__name__}."
            )
        stride = self.latent_downsample
        limit = self.model.config.max_image_size
        for name, value in (("height", height), ("width", width)):
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
            if value % stride:
                raise ValueError(f"`{name}` must be divisible by {stride}, got {value}.")
            if value > limit:
                raise ValueError(
                    f"`{name}`={value} exceeds the model's largest image side {limit} "
                    f"(max_latent_size {self.model.config.max_latent_size} x {stride})."
                )
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if num_inference_steps > MAX_INFERENCE_STEPS:
            raise ValueError(
                f"`num_inference_steps`={num_inference_steps} is beyond {MAX_INFERENCE_STEPS} (BAGEL uses 50; past a "
                "few hundred the Euler steps change nothing but the run time)."
            )
        # Bounds far beyond any useful setting, and tight enough that float32 guidance and the shifted schedule cannot
        # overflow or cancel into NaN images (found by tests/pipelines/bagel/test_hypothesis.py: scales and shifts near 3e38, shifts
        # near 1e-276).
        if (
            not isinstance(timestep_shift, (int, float))
            or isinstance(timestep_shift, bool)
            or not MIN_TIMESTEP_SHIFT <= timestep_shift <= MAX_TIMESTEP_SHIFT
        ):
            raise ValueError(
                f"`timestep_shift` must be a number in [{MIN_TIMESTEP_SHIFT}, {MAX_TIMESTEP_SHIFT}], "
                f"got {timestep_shift!r}."
            )
        for name, value in (("cfg_text_scale", cfg_text_scale), ("cfg_img_scale", cfg_img_scale)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 1.0 <= value <= MAX_GUIDANCE_SCALE:
                raise ValueError(
                    f"`{name}` must be a number in [1.0, {MAX_GUIDANCE_SCALE}] (1.0 disables that guidance), "
                    f"got {value!r}."
                )
        if (
            not isinstance(cfg_interval, (list, tuple))
            or len(cfg_interval) != 2
            or not all(isinstance(v, (int, float)) for v in cfg_interval)
            or not 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0
        ):
            raise ValueError(f"`cfg_interval` must be (start, end) with 0 <= start <= end <= 1, got {cfg_interval!r}.")
        if cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"`cfg_renorm_type` must be one of {RENORM_TYPES}, got {cfg_renorm_type!r}.")
        if not isinstance(cfg_renorm_min, (int, float)) or not 0.0 <= cfg_renorm_min <= 1.0:
            raise ValueError(f"`cfg_renorm_min` must be in [0, 1], got {cfg_renorm_min!r}.")
        if (
            not isinstance(num_images_per_prompt, int)
            or isinstance(num_images_per_prompt, bool)
            or not 1 <= num_images_per_prompt <= MAX_IMAGES_PER_CALL
        ):
            raise ValueError(
                f"`num_images_per_prompt` must be an integer in [1, {MAX_IMAGES_PER_CALL}], got {num_images_per_prompt!r}."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if think:
            if max_think_tokens is not None and (
                not isinstance(max_think_tokens, int) or isinstance(max_think_tokens, bool) or max_think_tokens < 1
            ):
                raise ValueError(f"`max_think_tokens` must be a positive integer, got {max_think_tokens!r}.")
            if think_do_sample and (
                not isinstance(think_temperature, (int, float)) or not 0 < think_temperature < float("inf")
            ):
                raise ValueError(f"`think_temperature` must be a finite number > 0, got {think_temperature!r}.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}."
            )

    # -- contexts -------------------------------------------------------------------------------------------------

    def _load_image(self, item) -> PIL.Image.Image:
        """Any accepted image type -> RGB PIL image resized by the VAE rule (the original inferencer's first step)."""
        return self.processor.image_processor.vae_resize(item)

    def build_contexts(self, items: list, think: bool) -> _Contexts:
        """
        The three contexts of one prompt, exactly as the original `interleave_inference` builds them: the full
        context; the text-guidance context (a snapshot taken before each text and after each image, so it keeps the
        images and drops the last text); the image-guidance context (every text, the thinking prompt included, no
        images). A video item adds each of its frames as a ViT-only image (no VAE latents: it is context to look at,
        not an image to edit), in order.
        """
        full, no_text, no_image = _Context(), _Context(), _Context()
        if think:
            full.segments.append(("text", GEN_THINK_SYSTEM_PROMPT))
            no_image.segments.append(("text", GEN_THINK_SYSTEM_PROMPT))
        image_size, has_images = None, False
        for item in items:
            if isinstance(item, str):
                no_text = full.copy()
                full.segments.append(("text", item))
                no_image.segments.append(("text", item))
            elif isinstance(item, _VideoFrames):
                # A video is seen, not edited: its frames are ViT images only (as in understanding), and do not set
                # the output size. Like images, they are dropped by the image-guidance context.
                for frame in item.frames:
                    full.segments.append(("vit", frame))
                    no_text = full.copy()
                has_images = True
            else:
                image = self._load_image(item)
                full.segments.extend([("vae", image), ("vit", image)])
                image_size = (image.height, image.width)
                has_images = True
                no_text = full.copy()
        return _Contexts(full, no_text, no_image, image_size, has_images)

    def _upcast_cpu_vae(self) -> None:
        """A half-precision VAE on the CPU is cast to float32 once (see `vae_float32_on_cpu`)."""
        vae = self.vae
        if self.vae_float32_on_cpu and vae.device.type == "cpu" and vae.dtype in (torch.bfloat16, torch.float16):
            logger.warning(
                f"The VAE is {vae.dtype} on the CPU, where half-precision convolutions are several times slower than "
                "float32: it now runs in float32 (set `pipe.vae_float32_on_cpu = False` to keep it as it is)."
            )
            vae.to(torch.float32)

    def _encode_vae_image(self, image: PIL.Image.Image, generator, sample_posterior: bool, device) -> torch.Tensor:
        """Clean conditioning latents of one image: `(h * w, patch_latent_dim)` in the normalised latent space."""
        pixels = self.processor.image_processor.preprocess_vae([image])["vae_pixel_values"][0]
        pixels = pixels[None].to(device=device, dtype=self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        latent = posterior.sample(generator) if sample_posterior else posterior.mode()
        latent = (latent - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return pack_latents(latent, self.latent_patch_size)[0]

    def _segment_tokens(self, segments: list, vae_cache: dict, generator, sample_posterior: bool, device):
        """Token ids, ViT images and clean latents (with their grids) of a list of segments, laid out by
        [`BagelSequence`]. Each image is VAE-encoded once per `vae_cache`. `device`: the execution device, looked up
        once per call by the caller (diffusers' `_execution_device` walks every module of every component)."""
        sequence = BagelSequence(self.model.config)
        vit_images, latents, latent_grids = [], [], []
        for kind, value in segments:
            if kind == "text":
                sequence.add_text(self.processor.encode_text(value))
            elif kind == "vae":
                key = id(value)
                if key not in vae_cache:
                    vae_cache[key] = (value, self._encode_vae_image(value, generator, sample_posterior, device))
                tokens = vae_cache[key][1]
                latents.append(tokens)
                latent_grids.append((value.height // self.latent_downsample, value.width // self.latent_downsample))
                sequence.add_image(tokens.shape[0], latent=True)
            else:
                vit_images.append(value)
                gh, gw = self.processor.image_processor.num_vit_patches(value.height, value.width)
                sequence.add_image(gh * gw, latent=False)
        return sequence.input_ids, vit_images, latents, latent_grids

    def _image_inputs(self, tokenized: list, device) -> dict:
        """The ViT patches and clean latents (with their grids) of rows tokenized by `_segment_tokens`, in row order."""
        vit_images = [image for _, images, _, _ in tokenized for image in images]
        latents = [tokens for _, _, row_latents, _ in tokenized for tokens in row_latents]
        latent_grids = [grid for _, _, _, grids in tokenized for grid in grids]
        inputs = {}
        if vit_images:
            vit = self.processor.image_processor.preprocess(vit_images, return_tensors="pt")
            inputs["pixel_values"] = vit["pixel_values"].to(device=device, dtype=self.model.dtype)
            inputs["image_grid_hw"] = vit["image_grid_hw"].to(device)
        if latents:
            inputs["latents"] = torch.cat(latents).to(device=device, dtype=self.model.dtype)
            inputs["latent_grid_hw"] = torch.tensor(latent_grids, device=device)
        return inputs

    def _tokenize_contexts(self, contexts: list[_Context], generator, sample_posterior: bool) -> dict:
        """Token ids (left padded), ViT patches and clean latents of several contexts, in one batch (for `generate`)."""
        config = self.model.config
        vae_cache = {}
        device = self._execution_device
        tokenized = [self._segment_tokens(c.segments, vae_cache, generator, sample_posterior, device) for c in contexts]
        rows = [ids for ids, *_ in tokenized]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), config.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(rows):
            if ids:
                input_ids[i, length - len(ids) :] = torch.tensor(ids)
                attention_mask[i, length - len(ids) :] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        inputs.update(self._image_inputs(tokenized, device))
        return inputs

    def _prefill_rows(
        self, context: BagelContext, span: BagelContextSpan, rows: list[list], vae_cache: dict, generator,
        sample_posterior: bool, device,
    ) -> list[BagelContextSpan]:  # fmt: skip
        """
        Appends the segments of `rows[0]` to `span` (the last context of `context`); each later row is a new context.
        Rows of as many tokens run in one forward (the weights are read once for all), otherwise one after another.
        Returns the span of each row.
        """
        tokenized = [self._segment_tokens(row, vae_cache, generator, sample_posterior, device) for row in rows]
        if len({len(ids) for ids, *_ in tokenized}) > 1:
            grown = []
            for row in tokenized:
                row_span = context.new_span() if grown else span
                grown += self._prefill_tokens(context, [row_span], [row], device) if row[0] else [row_span]
            return grown
        if not tokenized[0][0]:
            return [span] + [context.new_span() for _ in rows[1:]]
        return self._prefill_tokens(context, [span] + [context.new_span()] * (len(rows) - 1), tokenized, device)

    def _prefill_tokens(self, context: BagelContext, spans: list, tokenized: list, device) -> list[BagelContextSpan]:
        """One cache-only forward of tokenized rows of equal length (see `_prefill_rows`)."""
        inputs = self._image_inputs(tokenized, device)
        input_ids = torch.tensor([ids for ids, *_ in tokenized], device=device)
        # Only the cache is wanted: the last layer computes its keys and values, and no logits are computed.
        output = self.model(input_ids=input_ids, context=context, context_spans=spans, cache_only=True, **inputs)
        return list(output.context_spans)

    # -- thinking ---------------------------------------------------------------------------------------------------

    def _think(self, contexts: list[_Contexts], max_think_tokens, think_do_sample, think_temperature, generator):
        """Generates the planning text from each full context (the original's `gen_text`) and appends it."""
        inputs = self._tokenize_contexts([c.full for c in contexts], generator, sample_posterior=False)
        start = torch.full((inputs["input_ids"].shape[0], 1), self.model.config.bos_token_id, device=inputs["input_ids"].device)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], start], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(start)], dim=1)
        sampling = {"do_sample": think_do_sample}
        if think_do_sample:
            sampling.update(temperature=think_temperature, top_k=0, top_p=1.0)
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_think_tokens,
            eos_token_id=self.model.config.eos_token_id,
            pad_token_id=self.model.config.pad_token_id,
            **sampling,
        )
        texts = self.processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
        eos = self.processor.tokenizer.convert_ids_to_tokens(self.model.config.eos_token_id)
        pad = self.processor.tokenizer.convert_ids_to_tokens(self.model.config.pad_token_id)
        thoughts = [text.split(eos)[0].replace(pad, "") for text in texts]
        for i, thought in enumerate(thoughts):
            # The thought goes back into the context as text; only images may hold image slots there.
            found = self._image_structure_tokens_in(thought)
            if found:
                logger.warning(f"The thinking text holds image tokens {found}; they are removed before generating.")
                thoughts[i] = re.sub("|".join(map(re.escape, found)), "", thought)
        for context, thought in zip(contexts, thoughts):
            context.full.segments.append(("text", thought))
        return thoughts

    # -- latents ----------------------------------------------------------------------------------------------------

    def _check_latents_and_generator(self, latents, generator, batch_size, height, width, prompts, per_prompt):
        """`latents` and `generator` against the batch, before any work: shape, dtype, finite values, generator
        count and type."""
        vae_downsample = self.model.config.vae_downsample
        shape = (batch_size, self.model.config.latent_channels, height // vae_downsample, width // vae_downsample)
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise TypeError(f"`latents` must be a torch tensor, got {type(latents).__name__}.")
            if latents.shape[0] != batch_size:
                raise ValueError(
                    f"`latents` holds {latents.shape[0]} images but {batch_size} are requested "
                    f"({prompts} prompts x num_images_per_prompt={per_prompt})."
                )
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            if not latents.is_floating_point():
                raise TypeError(f"`latents` must be a floating-point tensor (Gaussian noise), got {latents.dtype}.")
            if not bool(torch.isfinite(latents).all()):
                raise ValueError("`latents` contains NaN or infinite values.")
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators for {batch_size} images "
                f"({prompts} prompts x num_images_per_prompt={per_prompt}); give one, or one per image."
            )
        for item in generators:
            if item is not None and not isinstance(item, torch.Generator):
                raise TypeError(
                    f"`generator` must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or a list of them, "
                    f"got {type(item).__name__}."
                )

    def _check_positions(self, contexts: list["_Contexts"], think: bool, max_think_tokens: int | None) -> int | None:
        """
        Refuses, before any work, a context that would run past the model's position table (each text token takes a
        position, each image block one), and returns the thinking budget that fits: `max_think_tokens`, or
        `DEFAULT_MAX_THINK_TOKENS` when None, lowered to the positions the longest context leaves (the plan, then the
        image block), as `generate` lowers `max_new_tokens`; a given budget is lowered with one warning.
        """
        limit = self.model.config.text_config.max_position_embeddings
        tokenizer = self.processor.tokenizer
        longest = 0
        for context in {id(c): c for c in contexts}.values():
            # Positions only: an image block takes one whatever its size (its tokens are not needed here).
            sequence = BagelSequence(self.model.config)
            for kind, value in context.full.segments:
                if kind == "text":
                    sequence.add_text(tokenizer.encode(value, add_special_tokens=False))
                else:
                    sequence.add_image(0, latent=kind == "vae")
            longest = max(longest, sequence.position)
        # The image block takes one position; a plan needs its two boundary tokens and at least one token.
        room = limit - longest - 1 - (3 if think else 0)
        if room < 0:
            plan = " and a plan of at least one token" if think else ""
            raise ValueError(
                f"The context takes {longest} positions: with the image{plan} it does not fit the model's {limit} "
                "(text_config.max_position_embeddings); shorten the prompt."
            )
        if not think:
            return max_think_tokens
        budget = DEFAULT_MAX_THINK_TOKENS if max_think_tokens is None else max_think_tokens
        fits = room + 1
        if budget > fits:
            if max_think_tokens is not None:
                logger.warning(
                    f"max_think_tokens={max_think_tokens} would run past the model's {limit} positions after a context "
                    f"of {longest}; the plan gets at most {fits} tokens."
                )
            budget = fits
        return budget

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None) -> torch.Tensor:
        """Initial noise, `(batch, 16, H/8, W/8)` in the normalised latent space, as `dtype` on `device`, packed into
        tokens: drawn with `generator`, or the given `latents` cast. The pipeline integrates in float32."""
        channels = self.model.config.latent_channels
        shape = (batch_size, channels, height // self.model.config.vae_downsample, width // self.model.config.vae_downsample)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            latents = latents.to(device=device, dtype=dtype)
        return pack_latents(latents, self.latent_patch_size)

    def _decode(self, tokens: torch.Tensor, grid: tuple[int, int], output_type: str):
        # One check each after the loop and after the VAE (a synchronisation each): NaN would otherwise come out as a
        # black image.
        if not bool(torch.isfinite(tokens).all()):
            raise RuntimeError(non_finite_message("The denoised latents hold", self.model, "model"))
        latents = unpack_latents(tokens, grid, self.latent_patch_size)
        if output_type == "latent":
            return latents
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        # One image at a time (as diffusers' `vae.enable_slicing()` decodes): a batched convolution rounds differently
        # from a single one, so a seeded image would depend on the images decoded with it.
        latents = latents.to(self.vae.dtype)
        decoded = torch.cat([self.vae.decode(latents[i : i + 1]).sample for i in range(latents.shape[0])])
        if not bool(torch.isfinite(decoded).all()):
            raise RuntimeError(non_finite_message("The VAE's decoded images hold", self.vae, "VAE"))
        # `[-1, 1]` -> `[0, 1]` in float32 (the VAE may be half precision); PIL pixels by truncation (see
        # `BagelVaeImageProcessor`).
        return self.image_processor.postprocess(decoded.float(), output_type=output_type)

    # -- guidance -----------------------------------------------------------------------------------------------

    def prepare_guidance(
        self,
        contexts: list[_Contexts],
        cfg_text_scale: float,
        cfg_img_scale: float,
        cfg_interval: tuple[float, float],
        cfg_renorm_type: str,
        cfg_renorm_min: float,
        generator=None,
        sample_posterior: bool = False,
        cache: Cache | None = None,
        reuse_full_for_image: bool = True,
        batch_invariant: bool = False,
    ) -> "_Guidance":
        """
        Prefills every context the guidance needs into one [`BagelContext`], each token once, as the original does:
        the full context always; the no-text context for text guidance, which is a prefix of the full one (the
        context before the instruction), so it is the full context's first keys and costs nothing more (for
        text-to-image it is empty); the no-image context for image guidance (only with text guidance on, as the
        original), which shares the full context's keys when it is a prefix of it and is prefilled on its own
        otherwise. Contexts are packed one after another, so nothing is padded. A no-image context identical to the
        full one would give the full branch's velocity exactly, so it is not run again unless
        `reuse_full_for_image=False` (TaylorSeer with guidance starting after the first step, where the two branches
        count different steps).

        Args:
            cache (`Cache`, *optional*): the transformers cache to fill (a `DynamicCache` by default).
            batch_invariant (`bool`, defaults to `False`): see `__call__`.
        """
        batch_size = len(contexts)
        use_text = cfg_text_scale > 1.0
        image_reuses_full = all(_is_prefix(c.no_image, c.full) and len(c.no_image.segments) == len(c.full.segments)
                                for c in contexts)  # fmt: skip
        use_image = use_text and cfg_img_scale > 1.0 and not (image_reuses_full and reuse_full_for_image)
        context = BagelContext(cache, batch_invariant=batch_invariant)
        spans = {"cond": [], "text": [], "image": []}
        vae_cache, done = {}, {}
        device = self._execution_device  # once: diffusers walks every module of every component to find it
        for prompt in contexts:
            if id(prompt) not in done:  # num_images_per_prompt repeats one prompt's contexts: prefill them once
                # With the default cache, every prompt after the first is prefilled on its own and appended, so its
                # keys (and a seeded image) are exactly those of the prompt generated alone; prefilled into the shared
                # row, its attention would also run over the earlier prompts' keys (masked out) and round differently.
                alone = BagelContext() if done and cache is None else context
                prompt_spans = self._prefill_prompt(
                    alone, prompt, use_text, use_image, vae_cache, generator, sample_posterior, device
                )
                if alone is not context:
                    offset = context.append_context(alone)
                    prompt_spans = {kind: span.shifted(offset) for kind, span in prompt_spans.items()}
                done[id(prompt)] = prompt_spans
            for kind, span in done[id(prompt)].items():
                spans[kind].append(span)
        return _Guidance(
            context=context,
            spans=spans,
            batch_size=batch_size,
            use_text=use_text,
            use_image=use_image,
            image_reuses_full=image_reuses_full and not use_image,
            cfg_text_scale=cfg_text_scale,
            cfg_img_scale=cfg_img_scale,
            cfg_interval=tuple(cfg_interval),
            cfg_renorm_type=cfg_renorm_type,
            cfg_renorm_min=cfg_renorm_min,
        )

    def _prefill_prompt(
        self, context: BagelContext, prompt: "_Contexts", use_text: bool, use_image: bool, vae_cache: dict, generator,
        sample_posterior: bool, device,
    ) -> dict[str, BagelContextSpan]:  # fmt: skip
        """The spans of one prompt's branches: the full context prefilled once, cut where a guidance context is its
        prefix; a guidance context that is not a prefix is a span of its own, prefilled in the forward of the full
        context's last segment (an edit's instruction after the image and alone: one forward of two rows)."""
        full = prompt.full.segments
        cuts = {"cond": len(full)}
        if use_text and _is_prefix(prompt.no_text, prompt.full):
            cuts["text"] = len(prompt.no_text.segments)
        if use_image and _is_prefix(prompt.no_image, prompt.full):
            cuts["image"] = len(prompt.no_image.segments)
        branches = (("text", use_text, prompt.no_text), ("image", use_image, prompt.no_image))
        separate = [(kind, branch.segments) for kind, needed, branch in branches if needed and kind not in cuts]
        span, done_at = context.new_span(), 0
        at_cut, spans = {0: span}, {}
        for cut in sorted(set(cuts.values())):
            # One forward per segment, as the original prefills: an image block alone sees every earlier key, so its
            # attention needs no mask, and a lone latent block takes the experts by slices (no gather / scatter).
            for index in range(done_at, cut):
                rows = [[full[index]]] + ([segments for _, segments in separate] if index == len(full) - 1 else [])
                span, *others = self._prefill_rows(context, span, rows, vae_cache, generator, sample_posterior, device)
                spans.update(zip((kind for kind, _ in separate), others))
            done_at = max(done_at, cut)
            at_cut[cut] = span
        spans.update({kind: at_cut[cut] for kind, cut in cuts.items()})
        for kind, segments in separate:
            if kind not in spans:  # an empty full context
                spans[kind] = self._prefill_rows(
                    context, context.new_span(), [segments], vae_cache, generator, sample_posterior, device
                )[0]
        return spans

    def guided_velocity(
        self,
        x: torch.Tensor,
        t: float,
        grid: tuple[int, int],
        guidance: "_Guidance",
        taylorseer: dict[str, TaylorSeerState] | None = None,
    ) -> torch.Tensor:
        """
        The velocity of one Euler step: inside `cfg_interval` every branch runs in ONE forward (one query row per
        prompt and branch, each against its own context span) and the branches are combined by the scheduler's
        dual-CFG rule; outside it only the full-context branch runs. With `taylorseer` (one state per branch), the
        branches whose stack runs in full this step share one forward and those predicted by their Taylor factors
        another one, in which no decoder layer runs.
        `x`: `(batch, h * w, patch_latent_dim)` packed latents at flow time `t`.
        """
        g = guidance
        active = ["cond"]
        if g.use_text and self.scheduler.cfg_active(t, g.cfg_interval):
            active += ["text", "image"] if g.use_image else ["text"]
        if taylorseer is None:
            groups = [(active, None)]
        else:
            full = {kind: taylorseer[kind].begin_step() for kind in active}
            groups = [(kinds, TaylorSeerStepCache([taylorseer[k] for k in kinds], g.batch_size))
                      for kinds in ([k for k in active if full[k]], [k for k in active if not full[k]]) if kinds]  # fmt: skip
        velocities = {}
        for kinds, step_cache in groups:
            spans = [span for kind in kinds for span in g.spans[kind]]
            rows = x.repeat(len(kinds), 1, 1) if len(kinds) > 1 else x
            with self._step_cache_context(g, "+".join(kinds)):
                v = self.model.predict_velocity(
                    rows.to(self.model.dtype), t, grid, g.context, spans, step_cache=step_cache
                ).float()
            velocities.update(zip(kinds, v.split(g.batch_size)))
        if taylorseer is not None:
            for kind in active:
                taylorseer[kind].end_step()
        if len(active) == 1:
            return velocities["cond"]
        v_image = velocities.get("image", velocities["cond"] if g.image_reuses_full else None)
        return self.scheduler.apply_guidance(
            velocities["cond"], v_uncond_text=velocities["text"], v_uncond_image=v_image,
            cfg_text_scale=g.cfg_text_scale, cfg_img_scale=g.cfg_img_scale, cfg_renorm_type=g.cfg_renorm_type,
            cfg_renorm_min=g.cfg_renorm_min,
        )  # fmt: skip

    # -- diffusers step caches ---------------------------------------------------------------------------------------

    @property
    def is_cache_enabled(self) -> bool:
        return getattr(self, "_step_cache_config", None) is not None

    def enable_cache(self, config) -> None:
        """
        Applies one of diffusers' step caches to the decoder layers of the denoising steps: a
        [`~diffusers.hooks.FirstBlockCacheConfig`], [`~diffusers.hooks.MagCacheConfig`] or
        [`~diffusers.hooks.TaylorSeerCacheConfig`] (diffusers' own hooks and states, as
        `transformer.enable_cache(config)` on a diffusers model). The hooks are put on the decoder for the denoising
        loop of each call only, with fresh states, so the context prefill and thinking never go through them; each
        group of guidance branches run together is its own cache context. A `TaylorSeerCacheConfig` without
        `cache_identifiers` caches every decoder layer's output. For the original BAGEL's TaylorSeer, pass
        `enable_taylorseer=True` to the call instead.
        """
        if not isinstance(config, STEP_CACHE_CONFIGS):
            names = ", ".join(c.__name__ for c in STEP_CACHE_CONFIGS)
            raise ValueError(f"`config` must be one of diffusers' {names}, got {type(config).__name__}.")
        if self.is_cache_enabled:
            raise ValueError(
                f"Caching has already been enabled with {type(self._step_cache_config).__name__}; call "
                "`disable_cache()` first."
            )
        if isinstance(config, TaylorSeerCacheConfig) and not (config.cache_identifiers or config.use_lite_mode):
            config = copy.copy(config)
            config.cache_identifiers = [r"layers\.\d+"]
        self._step_cache_config = config

    def disable_cache(self) -> None:
        """Removes the step cache set by [`~BagelPipeline.enable_cache`]."""
        if not self.is_cache_enabled:
            logger.warning("Caching techniques have not been enabled, so there's nothing to disable.")
        self._step_cache_config = None

    @contextlib.contextmanager
    def _step_cache_hooks(self, guidance: "_Guidance"):
        """diffusers' hooks of the enabled step cache on the decoder, for one call's denoising loop."""
        config = getattr(self, "_step_cache_config", None)
        if config is None:
            yield
            return
        layers = _DenoisingLayers(self.model.model.language_model.layers)
        layers.enable_cache(config)
        guidance.hooked_decoder = layers
        try:
            yield
        finally:
            guidance.hooked_decoder = None
            layers.disable_cache()

    def _step_cache_context(self, guidance: "_Guidance", name: str):
        if guidance.hooked_decoder is None:
            return contextlib.nullcontext()
        return guidance.hooked_decoder.cache_context(name)

    # -- call -------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @_one_call_at_a_time
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt=None,
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timestep_shift: float = 3.0,
        cfg_text_scale: float | None = None,
        cfg_img_scale: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        cfg_renorm_type: str | None = None,
        cfg_renorm_min: float = 0.0,
        think: bool = False,
        max_think_tokens: int | None = None,
        think_do_sample: bool = False,
        think_temperature: float = 0.3,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        sample_posterior: bool = False,
        enable_taylorseer: bool = False,
        batch_invariant: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        **kwargs,
    ):
        r"""
        Generates images from text, edits images, or both, interleaved.

        Args:
            prompt (`str`, `list[str]`, or a list of interleaved `str` / image / video items):
                A prompt, a batch of prompts, one interleaved sequence such as `[img1, img2, "instruction"]`, or a
                batch of such sequences (a list of lists). A video item is a dict `{"video": path_or_frames,
                "num_frames": n, "fps": f}` (see [`~transformers_bagel.video_utils.load_video_frames`]): its sampled
                frames enter the context as ViT images, in order.
            image (image, `list` of images, or `list` of lists, *optional*):
                Input image(s) to edit (PIL, numpy HWC, torch CHW, or a path), placed before the prompt. With one
                prompt, a list gives it all its images, in order. With a batch of prompts, a list of as many images
                as prompts pairs them in order (one image per prompt), a single image (or a list of one) goes to every
                prompt, and a list of lists gives each prompt its own images; any other count is refused.
            height (`int`, *optional*), width (`int`, *optional*):
                Output size, multiples of 16. Default: 1024 for text-to-image (capped by the model's largest image),
                the VAE-resized size of the (last) input image for editing.
            num_inference_steps (`int`, defaults to 50):
                Euler steps. The original's `num_timesteps=N` corresponds to `N - 1` steps.
            timestep_shift (`float`, defaults to 3.0): shift of the schedule `t' = s t / (1 + (s - 1) t)`.
            cfg_text_scale (`float`, *optional*): text guidance; 4.0 by default.
            cfg_img_scale (`float`, *optional*): image guidance, only applied when text guidance is on; 2.0 for
                editing, 1.5 for text-to-image (as the original app runs it).
            cfg_interval (`tuple[float, float]`, *optional*): guidance is active where `start < t <= end`;
                (0.4, 1.0) for text-to-image, (0.0, 1.0) for editing.
            cfg_renorm_type (`str`, *optional*): `"global"` (text-to-image default), `"channel"` or `"text_channel"`
                (editing default).
            cfg_renorm_min (`float`, defaults to 0.0): lower clamp of the renormalisation factor.
            think (`bool`, defaults to `False`): write a plan first (returned in `text`), then draw from it.
            max_think_tokens (`int`, *optional*), think_do_sample (`bool`), think_temperature (`float`):
                text generation settings of thinking mode. The plan is at most `max_think_tokens` tokens (1000 by
                default), and never more than the model's position table leaves after the context: a larger value is
                lowered with a warning, the default quietly.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator`, *optional*): makes the initial noise reproducible.
            latents (`torch.Tensor` of shape `(batch, 16, H/8, W/8)`, *optional*): initial noise in the normalised
                latent space, used instead of drawing it.
            sample_posterior (`bool`, defaults to `False`): sample the VAE posterior of input images instead of taking
                its mean.
            enable_taylorseer (`bool`, defaults to `False`): the original's TaylorSeer step caching (about 2x fewer
                decoder runs at 50 steps: each guidance branch runs its decoder in full on its first 5 steps and then
                every 3rd, and predicts the other steps from Taylor factors). Its state belongs to this call only.
            batch_invariant (`bool`, defaults to `False`): make each image independent of the other images of the
                batch, bit for bit on CPU (a seeded image is then the same alone or in a batch; `bagel serve` sets
                it). Every prompt's context is always prefilled on its own, the flow time embedded once and each
                image VAE-decoded alone; this adds per-row matmuls for the two boundary tokens of each image, which
                cost a few percent of a step on CPU. GPU GEMM kernels are chosen by shape, so there it narrows the
                differences but promises no bitwise equality.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return a [`BagelPipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called as `callback_on_step_end(pipe, step, timestep, callback_kwargs)` after every denoising step,
                with `callback_kwargs` holding the tensors named by `callback_on_step_end_tensor_inputs`; it may return
                a dict whose `latents` replace the current ones (same shape). Setting `pipe._interrupt = True` in it
                ends the loop after this step, and the latents so far are decoded. The pipeline's properties read in it
                (`num_timesteps`, `cfg_text_scale`, ...) are this call's.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                The tensors passed to `callback_on_step_end`, from `._callback_tensor_inputs` (`"latents"`: the
                current latents, `(batch, 16, H/8, W/8)`). For a `PipelineCallback` or `MultiPipelineCallbacks`, its
                `tensor_inputs` are used instead.

        Examples:

        Returns:
            [`BagelPipelineOutput`] with `images` and `text` (the thinking, or None per image), or a tuple.
        """
        if kwargs:
            raise TypeError(_unknown_arguments_message(kwargs, self.__call__))
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if enable_taylorseer and self.is_cache_enabled:
            raise ValueError(
                "`enable_taylorseer=True` and a diffusers step cache (`enable_cache`) both skip decoder layers; use "
                "one of them (`pipe.disable_cache()`)."
            )
        # numpy / torch integers (sizes read from an array, a config) are integers too.
        height, width, num_inference_steps, num_images_per_prompt, max_think_tokens = (
            _as_int(value) for value in (height, width, num_inference_steps, num_images_per_prompt, max_think_tokens)
        )
        batch = self._normalize_prompts(prompt, image)
        editing = any(not isinstance(item, str) for items in batch for item in items)
        preset = EDIT_PRESET if editing else TEXT_TO_IMAGE_PRESET
        cfg_text_scale = preset["cfg_text_scale"] if cfg_text_scale is None else cfg_text_scale
        cfg_img_scale = preset["cfg_img_scale"] if cfg_img_scale is None else cfg_img_scale
        cfg_interval = preset["cfg_interval"] if cfg_interval is None else cfg_interval
        cfg_renorm_type = preset["cfg_renorm_type"] if cfg_renorm_type is None else cfg_renorm_type

        # The output size, given or taken from the (VAE-resized) input images, before the inputs are checked (once).
        # Building the contexts only resizes the input images; no model runs before the check.
        contexts = [self.build_contexts(items, think) for items in batch]
        sizes = set()
        for ctx in contexts:
            default = ctx.image_size or (self.default_sample_size, self.default_sample_size)
            sizes.add((default[0] if height is None else height, default[1] if width is None else width))
        if len(sizes) > 1:
            raise ValueError(
                f"The prompts of one batch would give images of different sizes {sorted(sizes)}; pass `height` and "
                "`width`, or call the pipeline once per size."
            )
        height, width = sizes.pop()
        self.check_inputs(
            height, width, num_inference_steps, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval,
            cfg_renorm_type, cfg_renorm_min, num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs,
            think, max_think_tokens, think_do_sample, think_temperature, callback_on_step_end,
        )  # fmt: skip
        contexts = [ctx for ctx in contexts for _ in range(num_images_per_prompt)]
        batch_size = len(contexts)
        if batch_size > MAX_IMAGES_PER_CALL:
            raise ValueError(
                f"{len(batch)} prompts x num_images_per_prompt={num_images_per_prompt} = {batch_size} images, over "
                f"{MAX_IMAGES_PER_CALL} per call; split the prompts over several calls."
            )
        self._check_latents_and_generator(latents, generator, batch_size, height, width, len(batch), num_images_per_prompt)
        max_think_tokens = self._check_positions(contexts, think, max_think_tokens)

        self._cfg_text_scale, self._cfg_img_scale = cfg_text_scale, cfg_img_scale
        self._cfg_interval, self._cfg_renorm_type = tuple(cfg_interval), cfg_renorm_type
        self._num_timesteps, self._interrupt = None, False
        self._upcast_cpu_vae()
        device = self._execution_device
        grid = (height // self.latent_downsample, width // self.latent_downsample)
        x = self.prepare_latents(batch_size, height, width, torch.float32, device, generator, latents)

        thoughts = None
        if think:
            thoughts = self._think(contexts, max_think_tokens, think_do_sample, think_temperature, generator)

        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device, timestep_shift=timestep_shift)
        self._num_timesteps = len(scheduler.timesteps)
        # Read the flow times to the host once: `float(sigmas[i])` on an accelerator would synchronise every step.
        sigmas = scheduler.sigmas.tolist()
        # With TaylorSeer each branch counts its own steps: a no-image branch equal to the full one gives the full
        # branch's velocity when both have run the same steps, i.e. when guidance starts at the first step (the
        # flow times decrease, so the guided steps are then the first ones and the branch is not used after them).
        guided_from_start = scheduler.cfg_active(sigmas[0], cfg_interval)
        guidance = self.prepare_guidance(
            contexts, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, generator,
            sample_posterior, reuse_full_for_image=not enable_taylorseer or guided_from_start,
            batch_invariant=batch_invariant,
        )  # fmt: skip
        taylorseer = {kind: TaylorSeerState() for kind in ("cond", "text", "image")} if enable_taylorseer else None
        with self._step_cache_hooks(guidance), self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, timestep in enumerate(scheduler.timesteps):
                if self.interrupt:
                    break
                v = self.guided_velocity(x, sigmas[i], grid, guidance, taylorseer)
                x = scheduler.step(v, timestep, x, return_dict=False)[0]
                if callback_on_step_end is not None:
                    x = self._run_step_callback(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, i, timestep, x, grid
                    )
                progress_bar.update()
        del guidance, taylorseer  # the contexts' caches and Taylor factors are this call's only

        images = self._decode(x, grid, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, thoughts)
        return BagelPipelineOutput(images=images, text=thoughts)

    def _run_step_callback(self, callback, tensor_inputs, step, timestep, x, grid) -> torch.Tensor:
        """Calls `callback_on_step_end` with the tensors it asks for; returns the packed latents, replaced by the ones
        it returns (checked for shape)."""
        callback_kwargs = {}
        if "latents" in (tensor_inputs or ()):
            callback_kwargs["latents"] = unpack_latents(x, grid, self.latent_patch_size)
        callback_outputs = callback(self, step, timestep, callback_kwargs)
        if not callback_outputs or "latents" not in callback_outputs:
            return x
        returned = callback_outputs["latents"]
        p = self.latent_patch_size
        expected = (x.shape[0], x.shape[-1] // (p * p), grid[0] * p, grid[1] * p)
        if not isinstance(returned, torch.Tensor) or tuple(returned.shape) != expected:
            shape = tuple(returned.shape) if isinstance(returned, torch.Tensor) else type(returned).__name__
            raise ValueError(
                f"`callback_on_step_end` returned `latents` of shape {shape} at step {step}; expected {expected}."
            )
        return pack_latents(returned.to(x.dtype), p)


__all__ = [
    "BagelPipeline",
    "BagelVaeImageProcessor",
    "GEN_THINK_SYSTEM_PROMPT",
    "VLM_THINK_SYSTEM_PROMPT",
    "TEXT_TO_IMAGE_PRESET",
    "EDIT_PRESET",
]
