"""BagelPipeline: text-to-image, image editing and thinking mode with BAGEL's dual classifier-free guidance."""

import contextlib
import copy
import functools
import json
import os
import threading
from collections.abc import Callable

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

from transformers_bagel.chat import VLM_THINK_SYSTEM_PROMPT
from transformers_bagel.modeling_bagel import (
    BagelDecoderLayer,
    BagelForConditionalGeneration,
    pack_latents,
    unpack_latents,
)
from transformers_bagel.numerics import non_finite_message
from transformers_bagel.processing_bagel import BagelProcessor

from .guidance_parallel import GuidanceParallel
from .pipeline_checks import as_int, check_batch, check_call_arguments, unknown_arguments_message
from .pipeline_contexts import ContextEncoder, Guidance, prefill_guidance
from .pipeline_folder import CLASS_NAME, pipeline_index_class_name, write_pipeline_code_and_pointers
from .pipeline_inputs import (
    Context,
    GuidanceContexts,
    build_contexts,
    guidance_settings,
    normalize_prompts,
    output_size,
)
from .pipeline_output import BagelPipelineOutput
from .pipeline_thinking import check_positions, generate_thinking
from .defaults import (  # the presets and the thinking prompt are re-exported: examples import them from here
    DEFAULT_CFG_RENORM_MIN,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_THINK_TEMPERATURE,
    DEFAULT_TIMESTEP_SHIFT,
    EDIT_PRESET,
    GEN_THINK_SYSTEM_PROMPT,
    TEXT_TO_IMAGE_PRESET,
)
from .lora_loading import BagelLoraLoaderMixin
from .scheduling_flow_match_euler import FlowMatchEulerScheduler
from .sde_sampling import DenoisingSampler, check_sde_arguments
from .taylorseer import TaylorSeerHook, apply_taylorseer, remove_taylorseer


logger = logging.get_logger(__name__)

# diffusers' step caches that apply to BAGEL's decoder layers (block-level hooks; the layer takes and returns
# `hidden_states`). Registering the layer's metadata lets diffusers' own hooks find its hidden states.
STEP_CACHE_CONFIGS = (FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig)
GUIDANCE_PARALLEL_CACHE_MESSAGE = (
    "Guidance parallelism runs each guidance branch on its own process, but a diffusers step cache (`enable_cache`) "
    "decides which layers to skip over all the branches run together; use one of them (`pipe.disable_cache()` or "
    "`pipe.disable_guidance_parallel()`). `enable_taylorseer=True` works with guidance parallelism."
)
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


class _DenoisingLayers(torch.nn.Module, CacheMixin):
    """A holder of the decoder's layer stack (the same module, as its child `layers`) that diffusers' `CacheMixin` can
    put its step-cache hooks on: `enable_cache`, `cache_context` and `disable_cache` are diffusers' own, applied to
    BAGEL's layers. diffusers' block caches look for a `ModuleList` child named `layers` of the module they are given,
    and the decoder belongs to a transformers model, so the stack itself cannot be that module."""

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

    def normalize_prompts(self, prompt, image=None) -> list[list]:
        """
        Each batch element of a call's `prompt` and `image` (see `__call__`) as an ordered list of items (str, image,
        video frames): `image` items first, then the prompt's, with files opened and every text checked. Raises the
        call's `ValueError` / `TypeError` for input it refuses, before any model runs.
        """
        return normalize_prompts(prompt, image, self.processor, self.model.config)

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
        think_temperature=DEFAULT_THINK_TEMPERATURE,
        callback_on_step_end=None,
    ):
        """Refuses, before any work, the arguments of a call that the model cannot run or that are out of bounds (see
        `__call__`); the server runs it on a request's values before queueing it."""
        check_call_arguments(
            self.model.config, self._callback_tensor_inputs, height, width, num_inference_steps, timestep_shift,
            cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, num_images_per_prompt,
            output_type, callback_on_step_end_tensor_inputs, think, max_think_tokens, think_do_sample,
            think_temperature, callback_on_step_end,
        )  # fmt: skip

    # -- contexts -------------------------------------------------------------------------------------------------

    def build_contexts(self, items: list, think: bool) -> GuidanceContexts:
        """
        The three contexts of one prompt, exactly as the original `interleave_inference` builds them: the full
        context; the text-guidance context (a snapshot taken before each text and after each image, so it keeps the
        images and drops the last text); the image-guidance context (every text, the thinking prompt included, no
        images), with where each guidance context is cut in the full one. A video item adds each of its frames as a
        ViT-only image (no VAE latents: it is context to look at, not an image to edit), in order. `items`: one batch
        element of [`~BagelPipeline.normalize_prompts`].
        """
        return build_contexts(items, think, self.processor.image_processor)

    def encode_contexts(self, contexts: list[Context], generator=None, sample_posterior: bool = False) -> dict:
        """Token ids (left padded, with their `attention_mask`), ViT patches and clean latents of several contexts
        (e.g. `build_contexts(...).full`), in one batch: the inputs of the model's `generate` or `forward`."""
        return self._context_encoder(generator, sample_posterior).batch(contexts)

    def _context_encoder(self, generator=None, sample_posterior: bool = False, device=None) -> ContextEncoder:
        # diffusers' `_execution_device` walks every module of every component: a call looks it up once.
        device = self._execution_device if device is None else device
        return ContextEncoder(self.model, self.vae, self.processor, device, generator, sample_posterior)

    def _upcast_cpu_vae(self) -> None:
        """A half-precision VAE on the CPU is cast to float32 once (see `vae_float32_on_cpu`)."""
        vae = self.vae
        if self.vae_float32_on_cpu and vae.device.type == "cpu" and vae.dtype in (torch.bfloat16, torch.float16):
            logger.warning(
                f"The VAE is {vae.dtype} on the CPU, where half-precision convolutions are several times slower than "
                "float32: it now runs in float32 (set `pipe.vae_float32_on_cpu = False` to keep it as it is)."
            )
            vae.to(torch.float32)

    # -- latents and images ---------------------------------------------------------------------------------------

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
        contexts: list[GuidanceContexts],
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
        encoder: ContextEncoder | None = None,
    ) -> Guidance:
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
            encoder (`ContextEncoder`, *optional*): the call's encoder of contexts (its tokenised texts and encoded
                images are reused); by default a new one with `generator` and `sample_posterior`.

        With guidance parallelism enabled, this process prefills only the contexts of its own branches.
        """
        encoder = self._context_encoder(generator, sample_posterior) if encoder is None else encoder
        return prefill_guidance(
            encoder, contexts, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, cache,
            reuse_full_for_image, batch_invariant, self.guidance_parallel,
        )  # fmt: skip

    def guided_velocity(
        self,
        x: torch.Tensor,
        t: float,
        grid: tuple[int, int],
        guidance: Guidance,
        taylorseer: TaylorSeerHook | None = None,
    ) -> torch.Tensor:
        """
        The velocity of one Euler step: inside `cfg_interval` every branch runs in ONE forward (one query row per
        prompt and branch, each against its own context span) and the branches are combined by the scheduler's
        dual-CFG rule; outside it only the full-context branch runs. With `taylorseer` (the call's TaylorSeer hook on
        the decoder layers, one state per branch), the branches whose stack runs in full this step share one forward
        and those predicted by their Taylor factors another one, in which no decoder layer runs. With guidance
        parallelism (see [`~BagelPipeline.enable_guidance_parallel`]) this process runs its own branches only and
        receives the others' velocities, so every process combines the same ones.
        `x`: `(batch, h * w, patch_latent_dim)` packed latents at flow time `t`.
        """
        g = guidance
        active = ["cond"]
        if g.use_text and self.scheduler.cfg_active(t, g.cfg_interval):
            active += ["text", "image"] if g.use_image else ["text"]
        local = g.local_branches(active)  # with guidance parallelism, this process's share
        if taylorseer is None:
            groups = [local] if local else []
        else:
            groups = [kinds for kinds in taylorseer.begin_step(local) if kinds]
        velocities = {}
        for kinds in groups:
            spans = [span for kind in kinds for span in g.spans[kind]]
            rows = x.repeat(len(kinds), 1, 1) if len(kinds) > 1 else x
            branches = taylorseer.branches(kinds) if taylorseer is not None else contextlib.nullcontext()
            with self._denoising_cache_context(g, "+".join(kinds)), branches:
                v = self.model.predict_velocity(rows.to(self.model.dtype), t, grid, g.context, spans).float()
            velocities.update(zip(kinds, v.split(g.batch_size)))
        if taylorseer is not None:
            taylorseer.end_step(local)
        if g.parallel is not None:
            velocities = g.parallel.exchange(velocities, active, g.owners, like=x)
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
        return getattr(self, "_denoising_cache_config", None) is not None

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
                f"Caching has already been enabled with {type(self._denoising_cache_config).__name__}; call "
                "`disable_cache()` first."
            )
        if isinstance(config, TaylorSeerCacheConfig) and not (config.cache_identifiers or config.use_lite_mode):
            config = copy.copy(config)
            config.cache_identifiers = [r"layers\.\d+"]
        self._denoising_cache_config = config

    def disable_cache(self) -> None:
        """Removes the step cache set by [`~BagelPipeline.enable_cache`]."""
        if not self.is_cache_enabled:
            logger.warning("Caching techniques have not been enabled, so there's nothing to disable.")
        self._denoising_cache_config = None

    @contextlib.contextmanager
    def _denoising_cache_hooks(self, guidance: Guidance, taylorseer: bool = False):
        """The step cache's hooks on the decoder layers for one call's denoising loop, removed afterwards: diffusers'
        hooks of the cache set by `enable_cache`, or with `taylorseer` the original's TaylorSeer (yielded)."""
        layers = self.model.model.language_model.layers
        config = getattr(self, "_denoising_cache_config", None)
        if taylorseer:
            hook = apply_taylorseer(layers, rows_per_branch=guidance.batch_size)
            try:
                yield hook
            finally:
                remove_taylorseer(layers)
            return
        if config is None:
            yield None
            return
        wrapper = _DenoisingLayers(layers)
        wrapper.enable_cache(config)
        guidance.hooked_decoder = wrapper
        try:
            yield None
        finally:
            guidance.hooked_decoder = None
            wrapper.disable_cache()

    def _denoising_cache_context(self, guidance: Guidance, name: str):
        if guidance.hooked_decoder is None:
            return contextlib.nullcontext()
        return guidance.hooked_decoder.cache_context(name)

    # -- guidance parallelism ---------------------------------------------------------------------------------------

    @property
    def guidance_parallel(self) -> GuidanceParallel | None:
        """The processes sharing each call's guidance branches (see `enable_guidance_parallel`), or None."""
        return getattr(self, "_guidance_parallel", None)

    def enable_guidance_parallel(self, process_group: "torch.distributed.ProcessGroup | None" = None) -> None:
        """
        Runs the guidance branches of each denoising step on the processes of `process_group` (the default group
        when None), as [`torchrun`](https://pytorch.org/docs/stable/elastic/run.html) starts them: every process
        loads the whole pipeline and makes the same call (same prompt, inputs and settings), and each runs its share
        of the branches (`"cond"`: the full context, `"text"`: without the text, `"image"`: without the images)
        against the contexts only it prefills. One branch per process while there are processes enough (rank 0
        "cond", rank 1 "text", rank 2 "image"; more processes idle); with three branches on two processes rank 0 runs
        "cond" alone (it attends the most keys) and rank 1 "text" and "image". After each step's
        forwards the velocities are gathered (one `(batch, h * w, patch_latent_dim)` float32 tensor per branch) and
        every process combines them alike, so all hold the same latents and the same images; outside `cfg_interval`
        the process running "cond" broadcasts its velocity. The initial noise is rank 0's (broadcast once), thinking
        mode writes its plan on every process, and every process decodes the images (write them from rank 0).

        A branch's velocity is computed as with `batch_invariant=True`, whose rows do not depend on one another:
        each image of a call is then bit for bit, on CPU in float32, the single-process
        `pipe(..., batch_invariant=True)` with the same inputs and seed, run with as many torch threads (the VAE's
        convolutions round by thread count; the latents do not). On GPUs GEMM kernels are chosen by shape, so there it
        is close, not bitwise. `enable_taylorseer=True` is supported (TaylorSeer counts each branch's steps
        on its own process); diffusers' step caches (`enable_cache`) decide over all the branches run together and
        are refused.

        diffusers' `enable_parallelism(config=ParallelConfig(...))` shards one model's attention or weights over a
        device mesh; this splits a pipeline's denoising loop instead (every process holds the whole model), so it is
        a pipeline switch in the `enable_*` / `disable_*` form of `enable_cache`, taking the process group that
        torch's collectives take.

        Raises `ValueError` unless `torch.distributed` is initialised (`torch.distributed.init_process_group`), or
        with a step cache enabled.
        """
        if self.is_cache_enabled:
            raise ValueError(GUIDANCE_PARALLEL_CACHE_MESSAGE)
        self._guidance_parallel = GuidanceParallel(process_group)

    def disable_guidance_parallel(self) -> None:
        """Back to running every guidance branch in this process (see `enable_guidance_parallel`)."""
        self._guidance_parallel = None

    def _check_guidance_parallel(self) -> None:
        """Refuses, before any work, a call in guidance-parallel mode that cannot run."""
        if self.guidance_parallel is None:
            return
        self.guidance_parallel.check_initialized()
        if self.is_cache_enabled:
            raise ValueError(GUIDANCE_PARALLEL_CACHE_MESSAGE)

    def _shared_initial_latents(self, x: torch.Tensor) -> torch.Tensor:
        """With guidance parallelism, rank 0's initial latents on every process (every process then denoises the
        same image even where the generators differ)."""
        if self.guidance_parallel is not None:
            x = x.contiguous()
            self.guidance_parallel.broadcast_from_first(x)
        return x

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
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        timestep_shift: float = DEFAULT_TIMESTEP_SHIFT,
        cfg_text_scale: float | None = None,
        cfg_img_scale: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        cfg_renorm_type: str | None = None,
        cfg_renorm_min: float = DEFAULT_CFG_RENORM_MIN,
        think: bool = False,
        max_think_tokens: int | None = None,
        think_do_sample: bool = False,
        think_temperature: float = DEFAULT_THINK_TEMPERATURE,
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
        sde_noise_level: float = 0.0,
        sde_steps: list[int] | None = None,
        return_trajectory: bool = False,
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
                differences but promises no bitwise equality. A guidance context that is not a prefix of the full one
                (an edit's no-image context) is prefilled on its own too, so that each guidance branch's velocity is
                the same whichever branches run with it (as guidance parallelism runs them).
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
            sde_noise_level (`float`, defaults to 0.0): with a value > 0, the steps sample Flow-GRPO's SDE, whose
                marginals are the flow ODE's, with this noise level (0.7 in Flow-GRPO; see
                [`~FlowMatchEulerScheduler.sde_step`]), on the guided velocity; the noise comes from `generator`. 0
                runs the Euler steps. Not with guidance parallelism.
            sde_steps (`list[int]`, *optional*): the step indices that sample the SDE (e.g. a window of a few steps,
                as Flow-GRPO trains on); the others are Euler steps. Default: every step when `sde_noise_level > 0`.
            return_trajectory (`bool`, defaults to `False`): also return the packed latents of every step
                (`trajectory`), the SDE steps' log-probabilities (`log_probs`), the `timesteps` and the `sde_steps`
                run, for reinforcement learning; not with TaylorSeer or a step cache. A step callback must not replace
                the latents then.

        Examples:

        Returns:
            [`BagelPipelineOutput`] with `images` and `text` (the thinking, or None per image), and with
            `return_trajectory=True` `trajectory`, `log_probs`, `timesteps` and `sde_steps`; or a tuple of them.
        """
        # 1. Check inputs and resolve the defaults. Building the contexts only resizes the input images: no model runs
        # before every check has passed.
        if kwargs:
            raise TypeError(unknown_arguments_message(kwargs, self.__call__))
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if enable_taylorseer and self.is_cache_enabled:
            raise ValueError(
                "`enable_taylorseer=True` and a diffusers step cache (`enable_cache`) both skip decoder layers; use "
                "one of them (`pipe.disable_cache()`)."
            )
        self._check_guidance_parallel()
        # numpy / torch integers (sizes read from an array, a config) are integers too.
        height, width, num_inference_steps, num_images_per_prompt, max_think_tokens = (
            as_int(value) for value in (height, width, num_inference_steps, num_images_per_prompt, max_think_tokens)
        )
        batch = self.normalize_prompts(prompt, image)
        cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type = guidance_settings(
            batch, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type
        )
        contexts = [self.build_contexts(items, think) for items in batch]
        height, width = output_size(contexts, height, width, self.default_sample_size)
        self.check_inputs(
            height, width, num_inference_steps, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval,
            cfg_renorm_type, cfg_renorm_min, num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs,
            think, max_think_tokens, think_do_sample, think_temperature, callback_on_step_end,
        )  # fmt: skip
        sde_steps = check_sde_arguments(
            sde_noise_level, sde_steps, return_trajectory, num_inference_steps,
            step_cache=enable_taylorseer or self.is_cache_enabled, guidance_parallel=self.guidance_parallel is not None,
        )  # fmt: skip
        contexts = [ctx for ctx in contexts for _ in range(num_images_per_prompt)]
        check_batch(
            self.model.config, latents, generator, len(contexts), height, width, len(batch), num_images_per_prompt
        )
        device = self._execution_device
        encoder = self._context_encoder(generator, sample_posterior, device)
        max_think_tokens = check_positions(encoder, contexts, think, max_think_tokens)

        # 2. This call's values behind the properties; a half-precision VAE on the CPU upcast.
        self._cfg_text_scale, self._cfg_img_scale = cfg_text_scale, cfg_img_scale
        self._cfg_interval, self._cfg_renorm_type = tuple(cfg_interval), cfg_renorm_type
        self._num_timesteps, self._interrupt = None, False
        self._upcast_cpu_vae()

        # 3. Prepare the latents: the noise is drawn before the contexts are encoded, whose VAE posterior samples
        # (`sample_posterior`) come next from the same generator.
        grid = (height // self.latent_downsample, width // self.latent_downsample)
        x = self._shared_initial_latents(
            self.prepare_latents(len(contexts), height, width, torch.float32, device, generator, latents)
        )

        # 4. Prepare the timesteps.
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device, timestep_shift=timestep_shift)
        self._num_timesteps = len(scheduler.timesteps)
        # Read the flow times to the host once: `float(sigmas[i])` on an accelerator would synchronise every step.
        sigmas = scheduler.sigmas.tolist()

        # 5. Encode the conditioning: thinking mode's plan, then every guidance context prefilled into one cache.
        thoughts = None
        if think:
            thoughts, contexts = generate_thinking(
                encoder, contexts, max_think_tokens, think_do_sample, think_temperature
            )
        # With TaylorSeer each branch counts its own steps: a no-image branch equal to the full one gives the full
        # branch's velocity when both have run the same steps, i.e. when guidance starts at the first step (the
        # flow times decrease, so the guided steps are then the first ones and the branch is not used after them).
        guided_from_start = scheduler.cfg_active(sigmas[0], cfg_interval)
        guidance = self.prepare_guidance(
            contexts, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, encoder=encoder,
            reuse_full_for_image=not enable_taylorseer or guided_from_start, batch_invariant=batch_invariant,
        )  # fmt: skip

        # 6. Denoising loop: Euler steps, or SDE steps (recording the trajectory when asked).
        sampler = DenoisingSampler(scheduler, x, sde_noise_level, sde_steps, generator, record=return_trajectory)
        with self._denoising_cache_hooks(guidance, enable_taylorseer) as taylorseer, self.progress_bar(
            total=num_inference_steps
        ) as progress_bar:
            for i, timestep in enumerate(scheduler.timesteps):
                if self.interrupt:
                    break
                v = self.guided_velocity(x, sigmas[i], grid, guidance, taylorseer)
                x = sampler.step(i, v, timestep, x)
                if callback_on_step_end is not None:
                    x = self._run_step_callback(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, i, timestep, x, grid
                    )
                progress_bar.update()
        del guidance, taylorseer  # the contexts' caches and Taylor factors are this call's only

        # 7. Decode, offload, return.
        images = self._decode(x, grid, output_type)
        self.maybe_free_model_hooks()
        trajectory = sampler.outputs(x)  # empty unless `return_trajectory`
        if not return_dict:
            return (images, thoughts, *trajectory.values())
        return BagelPipelineOutput(images=images, text=thoughts, **trajectory)

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
