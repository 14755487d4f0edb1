"""BAGEL: a Mixture-of-Transformer-Experts decoder shared by understanding (text, ViT tokens) and generation (VAE
latent tokens), with a SigLIP NaViT encoder and flow-matching heads.

The decoder is in `modeling_bagel_text.py`, the token layout and attention masks in `masking_bagel.py`, the input
embedders in `modeling_bagel_embeddings.py`; this module holds the composite models and their outputs:

- `forward`: text, understanding (ViT images), packed training samples and `generate`'s steps, over a transformers
  `Cache`, like every transformers decoder;
- `prefill_context`: prompts prefilled into a [`BagelContext`] (several contexts packed in one cache row);
- `predict_velocity`: one denoising step of latent blocks against the contexts' spans.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
# diffusers loads a pipeline component named `["transformers_bagel.modeling_bagel", "BagelForConditionalGeneration"]` in
# model_index.json by finding its loadable base class (`PreTrainedModel`) in this module's namespace.
from transformers.modeling_utils import PreTrainedModel  # noqa: F401
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_bagel import BagelConfig
from .context_bagel import BagelContext, BagelContextSpan, BranchKeys
from .loss_bagel import cross_entropy_loss, flow_matching_loss, noise_latent_targets
from .masking_bagel import (
    TokenLayout,
    bagel_token_layout,
    check_image_slots,
    check_input_ids,
    check_position_limit,
    packed_sample_mask,
)
from .modeling_bagel_embeddings import (
    BagelConnector,
    BagelPositionEmbedding,
    BagelTimestepEmbedder,
    pack_latents,
    sincos_2d_position_table,
    unpack_latents,
)
from .modeling_bagel_text import (  # BagelDecoderLayer: re-exported, the pipeline registers it with diffusers
    BagelDecoderLayer,  # noqa: F401
    BagelPreTrainedModel,
    BagelTextModel,
    ExpertRouting,
    _LatentBlockRouting,
)
from .modeling_bagel_vision import BagelVisionModel, flattened_grid_position_ids, grid_position_ids, patch_grids
from .numerics import FiniteLogitsCheck


logger = logging.get_logger(__name__)

_CONTEXT_ARGUMENTS = ("context", "context_spans", "update_cache")


def _refuse_context_arguments(kwargs: dict) -> None:
    """`forward` runs over a plain `Cache`; the [`BagelContext`] paths have their own methods."""
    passed = [name for name in _CONTEXT_ARGUMENTS if name in kwargs]
    if passed:
        raise TypeError(
            f"`forward` takes no `{passed[0]}`: prefill a BagelContext with `prefill_context(input_ids, context, "
            "context_spans)` and denoise against it with `predict_velocity(latents, timestep, grid, context, spans)`."
        )


@dataclass
class BagelModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    next_position (`torch.LongTensor` of shape `(batch,)`):
        The position the next token of each row would take (BAGEL's "rope" counter), needed to continue from the cache.
    context_span (`BagelContextSpan`, *optional*):
        After `prefill_context`: the grown span (of the first row).
    context_spans (`tuple[BagelContextSpan, ...]`, *optional*):
        After `prefill_context`: the grown span of each row.
    """

    next_position: torch.LongTensor | None = None
    context_span: BagelContextSpan | None = None
    context_spans: tuple[BagelContextSpan, ...] | None = None


@dataclass
class BagelCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): total training loss, `ce_weight * ce_loss + mse_weight * mse_loss`.
    ce_loss (`torch.FloatTensor`, *optional*): next-token cross entropy on text labels.
    mse_loss (`torch.FloatTensor`, *optional*): flow-matching MSE on noised latent tokens.
    logits (`torch.FloatTensor` of shape `(batch, seq, vocab)`): language-model logits.
    next_position (`torch.LongTensor` of shape `(batch,)`): see [`BagelModelOutputWithPast`].
    context_span (`BagelContextSpan`, *optional*), context_spans (`tuple[BagelContextSpan, ...]`, *optional*): see
        [`BagelModelOutputWithPast`].
    """

    loss: torch.FloatTensor | None = None
    ce_loss: torch.FloatTensor | None = None
    mse_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    next_position: torch.LongTensor | None = None
    context_span: BagelContextSpan | None = None
    context_spans: tuple[BagelContextSpan, ...] | None = None


@dataclass
class _DenoisingInputs:
    """What a denoising step needs besides the latents and the time, the same at every step of a call: built once per
    context, rows, grid and spans, and kept by the [`BagelContext`]."""

    boundary_ids: torch.LongTensor  # (rows, 2): each row's `<|vision_start|>` and `<|vision_end|>`
    latent_grid_hw: torch.LongTensor  # (rows, 2)
    position_ids: torch.LongTensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    latent_position_ids: torch.LongTensor
    token_image_index: torch.LongTensor
    routing: ExpertRouting
    branch_keys: BranchKeys


class BagelModel(BagelPreTrainedModel):
    """
    BAGEL without heads: embeds text, ViT patches (understanding) and VAE latents (generation) into one sequence and
    runs the MoT decoder over it. ViT patches sit at `image_token_id` placeholders and latent tokens at
    `latent_token_id` placeholders of `input_ids`.
    """

    def __init__(self, config: BagelConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.language_model = BagelTextModel(config.text_config)
        self.vision_model = BagelVisionModel(config.vision_config)
        self.connector = BagelConnector(config.vision_config.hidden_size, hidden, config.connector_act)
        self.vit_pos_embed = BagelPositionEmbedding(config.vit_max_num_patch_per_side, hidden)
        self.latent_pos_embed = BagelPositionEmbedding(config.max_latent_size, hidden)
        self.time_embedder = BagelTimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(config.patch_latent_dim, hidden)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_hw: torch.LongTensor) -> torch.Tensor:
        """ViT features of packed patches, projected to the decoder width, plus the fixed 2-D position table:
        `(total_patches, hidden)`."""
        position_ids = flattened_grid_position_ids(
            image_grid_hw, self.config.vit_max_num_patch_per_side, self.config.interpolate_pos, pixel_values.device
        )
        features = self.vision_model(pixel_values, image_grid_hw, position_ids=position_ids).last_hidden_state
        return self.connector(features) + self.vit_pos_embed(position_ids).to(features.dtype)

    def get_latent_embeddings(
        self,
        latents: torch.Tensor,
        latent_grid_hw: torch.LongTensor,
        latent_timesteps: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        token_image_index: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """
        Decoder inputs of packed latent tokens: `vae2llm(x) + time_embedder(t) + latent_pos_embed(ids)`.

        Args:
            latents (`torch.Tensor` of shape `(total_tokens, patch_latent_dim)`): packed latent patches.
            latent_grid_hw (`torch.LongTensor` of shape `(num_images, 2)`): token grid of each latent image.
            latent_timesteps (`torch.Tensor` of shape `(1,)`, `(num_images,)` or `(total_tokens,)`): flow time t of
                all images, of each image (0 for a clean conditioning image) or of each token.
            position_ids (`torch.LongTensor` of shape `(total_tokens,)`, *optional*): the 2-D position ids of the
                tokens, when already known (denoising steps keep them); derived from `latent_grid_hw` otherwise.
            token_image_index (`torch.LongTensor` of shape `(total_tokens,)`, *optional*): the image of each token,
                likewise.
        """
        if position_ids is None:
            position_ids = flattened_grid_position_ids(
                latent_grid_hw, self.config.max_latent_size, self.config.interpolate_pos, latents.device
            )
        latent_timesteps = torch.as_tensor(latent_timesteps, device=latents.device).reshape(-1)
        num_images = latent_grid_hw.shape[0]
        if latent_timesteps.shape[0] == 1:
            # One time for every image (denoising): embedded once and broadcast to every token, so an image's inputs
            # do not depend on how many images share the call (a matmul over more rows may round differently). As a
            # block of 4 equal rows: CPU GEMMs over 1-3 rows round differently with the weights' memory alignment
            # (weights mapped from safetensors sit 8 bytes off a 64-byte line, moved copies do not).
            time_embeds = self.time_embedder(latent_timesteps.expand(4))[:1]
        else:
            time_embeds = self.time_embedder(latent_timesteps)
        if latent_timesteps.shape[0] not in (1, latents.shape[0]):
            # One time per image: embed it once and give it to the image's tokens.
            if token_image_index is None:
                lengths = (latent_grid_hw[:, 0] * latent_grid_hw[:, 1]).to(latents.device)
                token_image_index = torch.arange(num_images, device=latents.device).repeat_interleave(
                    lengths, output_size=latents.shape[0]
                )
            time_embeds = time_embeds[token_image_index]
        dtype = self.vae2llm.weight.dtype
        return self.vae2llm(latents.to(dtype)) + time_embeds + self.latent_pos_embed(position_ids).to(dtype)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        latents: torch.Tensor | None = None,
        latent_grid_hw: torch.LongTensor | None = None,
        latent_timesteps: torch.Tensor | None = None,
        use_cache: bool | None = None,
        document_ids: torch.LongTensor | None = None,
        noised_latent_images: torch.BoolTensor | None = None,
        text_only: bool = False,
        **kwargs,
    ) -> BagelModelOutputWithPast:
        r"""
        pixel_values (`torch.Tensor` of shape `(total_patches, 3 * patch_size**2)`, *optional*):
            ViT patches of all images (see [`BagelImageProcessor`]).
        image_grid_hw (`torch.LongTensor` of shape `(num_images, 2)`, *optional*):
            Patch grid of each ViT image.
        latents (`torch.Tensor` of shape `(total_latent_tokens, patch_latent_dim)`, *optional*):
            Packed VAE latent tokens (normalised latent space, `(h, w, p, q, c)` order).
        latent_grid_hw (`torch.LongTensor` of shape `(num_latent_images, 2)`, *optional*):
            Token grid of each latent image.
        latent_timesteps (`torch.Tensor` of shape `(num_latent_images,)`, *optional*):
            Flow time of each latent image; 0 (clean) by default.
        document_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            Packed training: the sample each token belongs to. Tokens attend only within their sample.
        noised_latent_images (`torch.BoolTensor` of shape `(num_latent_images,)`, *optional*):
            Packed training: which latent images are noised targets. Their blocks are invisible to every other token
            (they only see themselves and what precedes them).
        text_only (`bool`, defaults to `False`):
            Treat every token of `input_ids` as text, image placeholder and boundary ids included, as the original
            does with sampled tokens. `generate` sets it after the prompt, so a sampled `<|image_pad|>` or
            `<|vision_start|>` is embedded as the text token it is instead of being taken for an image slot.

        Contexts packed in one cache row (the diffusers pipeline's) are prefilled with [`~BagelModel.prefill_context`]
        and denoised against with [`~BagelModel.denoising_forward`].
        """
        _refuse_context_arguments(kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if text_only and (pixel_values is not None or latents is not None):
            raise ValueError("`text_only=True` takes no `pixel_values` or `latents`: every token is read as text.")
        if input_ids is None and (pixel_values is not None or latents is not None):
            raise ValueError("Images need `input_ids` with placeholder tokens; `inputs_embeds` alone cannot place them.")
        if use_cache is None:
            use_cache = self.config.text_config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        if cache is not None and int(cache.get_seq_length()) > 0 and position_ids is None and input_ids is not None:
            raise ValueError(
                "Continuing from a `cache` needs `position_ids`: BAGEL positions do not follow the number of cached "
                "tokens (an image block shares one position). Start from the previous output's `next_position`, or "
                "prefill into a `BagelContext`, which keeps them."
            )
        layout = None
        if input_ids is not None:
            # `text_only` tokens (generate's decoding steps) are text by definition: no image block, no latent token,
            # and their ids come from the model's vocabulary; `generate` checked the prompt and the room left in the
            # position table once per call. So a decoding step reads nothing back from the device.
            check_input_ids(input_ids, attention_mask, self.language_model.embed_tokens.num_embeddings, not text_only)
            layout = bagel_token_layout(input_ids, self.config, attention_mask, text_only=text_only)
            if position_ids is None:
                position_ids = layout.position_ids
            if position_ids.numel() and not text_only:
                check_position_limit(int(position_ids.max()), self.config.text_config.max_position_embeddings)
            inputs_embeds = self._embed(
                input_ids, text_only, pixel_values=pixel_values, image_grid_hw=image_grid_hw, latents=latents,
                latent_grid_hw=latent_grid_hw, latent_timesteps=latent_timesteps,
            )  # fmt: skip
        else:
            hidden = self.config.text_config.hidden_size
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden:
                raise ValueError(
                    f"`inputs_embeds` must be (batch, sequence, {hidden}) (text_config.hidden_size), got shape "
                    f"{tuple(inputs_embeds.shape)}."
                )
        return self._decode(
            inputs_embeds, layout, position_ids=position_ids, text_only=text_only, attention_mask=attention_mask,
            cache=cache, use_cache=use_cache, document_ids=document_ids, noised_latent_images=noised_latent_images,
            **kwargs,
        )  # fmt: skip

    def prefill_context(
        self,
        input_ids: torch.LongTensor,
        context: BagelContext,
        context_spans: BagelContextSpan | list[BagelContextSpan],
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        latents: torch.Tensor | None = None,
        latent_grid_hw: torch.LongTensor | None = None,
        latent_timesteps: torch.Tensor | None = None,
        cache_only: bool = False,
        **kwargs,
    ) -> BagelModelOutputWithPast:
        """
        Prefills rows of `input_ids` into a [`BagelContext`]: row r is appended to `context_spans[r]` and sees its own
        span's keys and the earlier tokens of its row only. The rows run in one forward and are stored one after
        another in the context's cache row; the first span may hold keys (then it must be the context's last), the
        others must be empty (from `context.new_span()`): they start new contexts. The output's `context_spans` are
        the grown spans (`context_span` the first).

        Args:
            input_ids (`torch.LongTensor` of shape `(rows, seq)`): the tokens of each row (one length for all).
            context ([`BagelContext`]): the contexts to grow.
            context_spans (`BagelContextSpan` or `list[BagelContextSpan]`): the span each row extends.
            pixel_values, image_grid_hw, latents, latent_grid_hw, latent_timesteps: the images of the rows, in order
                (see `forward`).
            cache_only (`bool`, defaults to `False`): only fill the context's cache (a prefill whose outputs are not
                needed): the last layer computes its keys and values and nothing after them; `last_hidden_state` is
                None.
        """
        if not isinstance(context, BagelContext):
            raise TypeError(f"`context` must be a BagelContext, got {type(context).__name__}.")
        spans = (context_spans,) if isinstance(context_spans, BagelContextSpan) else tuple(context_spans or ())
        if not spans or not all(isinstance(span, BagelContextSpan) for span in spans):
            raise ValueError("A `context` prefill needs `context_spans` (BagelContextSpan, or one per row).")
        check_input_ids(input_ids, None, self.language_model.embed_tokens.num_embeddings, True)
        rows, length = input_ids.shape
        if len(spans) != rows:
            raise ValueError(
                f"A prefill appends each row of `input_ids` to its own span: got {rows} rows and {len(spans)} spans."
            )
        context.check_extendable(spans[0])
        if any(span.length for span in spans[1:]):
            raise ValueError(
                "Only the first row of a prefill may extend a context; the others start new ones (empty spans from "
                "`context.new_span()`)."
            )
        packed = input_ids.reshape(1, -1)  # the rows one after another in the context's cache row
        starts = [spans[0].start] + [context.num_keys + row * length for row in range(1, rows)]
        # Each row's positions from its span's next position; image blocks and experts from the packed row.
        offsets = torch.tensor([span.next_position for span in spans], device=input_ids.device)
        positions = bagel_token_layout(input_ids, self.config, None, offsets)
        position_ids = positions.position_ids.reshape(1, -1)
        if position_ids.numel():
            check_position_limit(int(position_ids.max()), self.config.text_config.max_position_embeddings)
        inputs_embeds = self._embed(
            packed, False, pixel_values=pixel_values, image_grid_hw=image_grid_hw, latents=latents,
            latent_grid_hw=latent_grid_hw, latent_timesteps=latent_timesteps,
        )  # fmt: skip
        outputs = self._decode(
            inputs_embeds, bagel_token_layout(packed, self.config), position_ids=position_ids, cache=context.cache,
            use_cache=True, key_start=[start for start in starts for _ in range(length)] if rows > 1 else starts[0],
            cache_only=cache_only, **kwargs,
        )  # fmt: skip
        context.num_keys += rows * length
        outputs.next_position = positions.next_position
        outputs.context_spans = tuple(
            BagelContextSpan(start, span.length + length, int(position))
            for start, span, position in zip(starts, spans, positions.next_position.tolist())
        )
        outputs.context_span = outputs.context_spans[0]
        return outputs

    def denoising_forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        latent_grid_hw: tuple[int, int],
        context: BagelContext,
        context_spans: list[BagelContextSpan],
        **kwargs,
    ) -> BagelModelOutputWithPast:
        """
        One denoising step of latent blocks against a [`BagelContext`]: row r is the block `[<|vision_start|>, h * w
        latent tokens, <|vision_end|>]` of `latents[r]` at flow time `timestep`, attending to the keys of
        `context_spans[r]` and to itself (bidirectionally); the cache is left as it was. The step-invariant inputs
        (boundary ids, RoPE tables, latent position ids, routing, the spans' keys) are built on a call's first step and
        kept by the context for the next ones. `last_hidden_state` is `(rows, h * w + 2, hidden)`.

        Args:
            latents (`torch.Tensor` of shape `(rows, h * w, patch_latent_dim)`): packed noisy latents x_t.
            timestep (`float` or `torch.Tensor` of shape `(1,)` or `(rows,)`): flow time t in [0, 1] (1 = noise).
            latent_grid_hw (`tuple[int, int]`): token grid (h, w) of the image.
            context ([`BagelContext`]): the prefilled contexts.
            context_spans (`list[BagelContextSpan]`): the context of each row (an empty span for no context).
        """
        if latents.dim() != 3:
            raise ValueError(f"`latents` must be (rows, h * w, patch_latent_dim), got shape {tuple(latents.shape)}.")
        rows, num_tokens = latents.shape[:2]
        height, width = (int(side) for side in latent_grid_hw)
        if height * width != num_tokens:
            raise ValueError(f"latents hold {num_tokens} tokens but the grid {height}x{width} needs {height * width}.")
        device = latents.device
        spans = tuple(context_spans)
        dtype = self.language_model.embed_tokens.weight.dtype
        key = ("denoising", rows, height, width, spans, context.num_keys, device, dtype,
               self.config.text_config._attn_implementation)  # fmt: skip
        step = context.step_inputs(key, lambda: self._denoising_inputs(rows, (height, width), spans, context, device))
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(device=device, dtype=torch.float32).reshape(-1)
            if timestep.shape[0] != 1:
                timestep = timestep.expand(rows)
        else:
            # One time for all rows, embedded once. torch.full passes the value to the kernel: no blocking
            # host-to-device copy (torch.tensor would make one).
            timestep = torch.full((1,), float(timestep), device=device)
        features = self.get_latent_embeddings(
            latents.reshape(rows * num_tokens, -1), step.latent_grid_hw, timestep, step.latent_position_ids,
            step.token_image_index,
        )  # fmt: skip
        ends = self.language_model.embed_tokens(step.boundary_ids)
        features = features.to(ends.dtype).reshape(rows, num_tokens, -1)
        inputs_embeds = torch.cat([ends[:, :1], features, ends[:, 1:]], dim=1)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=step.position_ids,
            use_cache=False,
            routing=step.routing,
            position_embeddings=step.position_embeddings,
            branch_keys=step.branch_keys,
            **kwargs,
        )
        return BagelModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )  # fmt: skip

    def _denoising_inputs(self, rows: int, grid: tuple[int, int], spans: tuple, context: BagelContext, device):
        """The step-invariant inputs of `rows` latent blocks of `grid` against `spans` (see `denoising_forward`)."""
        config = self.config
        if len(spans) != rows:
            raise ValueError(f"`context_spans` holds {len(spans)} spans for {rows} rows.")
        for span in spans:
            if span.start < 0 or span.end > context.num_keys:
                raise ValueError(f"{span} is outside the context's {context.num_keys} cached keys.")
        limit = config.text_config.max_position_embeddings
        check_position_limit(max(span.next_position for span in spans), limit)
        length = grid[0] * grid[1] + 2
        position_ids = torch.tensor([[span.next_position] for span in spans], device=device).expand(rows, length)
        text_model = self.language_model
        shape_only = torch.empty((rows, length, 1), dtype=text_model.embed_tokens.weight.dtype, device=device)
        branch_keys = BranchKeys(spans)
        text_config = config.text_config
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        kv_heads = text_model.key_value_heads_per_rank()  # the cache's heads: a share under tensor parallelism
        empty = torch.empty((1, kv_heads, 0, head_dim), dtype=shape_only.dtype, device=device)
        branch_keys.gather(context.cache, text_config.num_hidden_layers, empty, empty)
        return _DenoisingInputs(
            boundary_ids=torch.tensor([[config.start_of_image_token_id, config.end_of_image_token_id]] * rows,
                                      device=device),  # fmt: skip
            latent_grid_hw=torch.tensor([grid] * rows, device=device),
            position_ids=position_ids,
            position_embeddings=text_model.rotary_emb(shape_only, position_ids),
            latent_position_ids=grid_position_ids([grid] * rows, config.max_latent_size, config.interpolate_pos,
                                                  device),  # fmt: skip
            token_image_index=torch.arange(rows, device=device).repeat_interleave(grid[0] * grid[1]),
            routing=_LatentBlockRouting(rows_apart=context.batch_invariant),
            branch_keys=branch_keys,
        )

    def _embed(
        self,
        input_ids: torch.LongTensor,
        text_only: bool,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        latents: torch.Tensor | None = None,
        latent_grid_hw: torch.LongTensor | None = None,
        latent_timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder inputs of `input_ids`: token embeddings, with the ViT features and the latent tokens of the
        images at their placeholders (checked against them)."""
        inputs_embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            if image_grid_hw is None:
                raise ValueError("`pixel_values` needs `image_grid_hw` (the patch grid of each image).")
            sizes = self.vision_model.check_patches(pixel_values, image_grid_hw)
            if pixel_values.is_floating_point() and not bool(torch.isfinite(pixel_values).all()):
                raise ValueError("`pixel_values` hold NaN or infinite values: the images or their preprocessing are broken.")
            check_image_slots(input_ids, self.config.image_token_id, sizes, "image", "image_grid_hw")
            features = self.get_image_features(pixel_values, image_grid_hw)
            mask = (input_ids == self.config.image_token_id)[..., None]
            inputs_embeds = inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))
        elif not text_only and bool((input_ids == self.config.image_token_id).any()):
            raise ValueError("input_ids contain image placeholder tokens but no `pixel_values` were given.")
        if latents is not None:
            if latent_grid_hw is None:
                raise ValueError("`latents` needs `latent_grid_hw` (the token grid of each latent image).")
            if latent_timesteps is None:
                latent_timesteps = torch.zeros(latent_grid_hw.shape[0], device=latents.device)
            grids = patch_grids(latent_grid_hw)  # read once: the check and the position ids use it
            sizes = [rows * cols for rows, cols in grids]
            check_image_slots(input_ids, self.config.latent_token_id, sizes, "latent image", "latent_grid_hw")
            latent_position_ids = grid_position_ids(
                grids, self.config.max_latent_size, self.config.interpolate_pos, latents.device
            )
            features = self.get_latent_embeddings(latents, latent_grid_hw, latent_timesteps, latent_position_ids)
            mask = (input_ids == self.config.latent_token_id)[..., None]
            inputs_embeds = inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))
        elif not text_only and bool((input_ids == self.config.latent_token_id).any()):
            raise ValueError("input_ids contain latent placeholder tokens but no `latents` were given.")
        return inputs_embeds

    def _decode(
        self,
        inputs_embeds: torch.Tensor,
        layout: TokenLayout | None,
        position_ids: torch.LongTensor | None,
        text_only: bool = False,
        document_ids: torch.LongTensor | None = None,
        noised_latent_images: torch.BoolTensor | None = None,
        **kwargs,
    ) -> BagelModelOutputWithPast:
        """Runs the decoder over `inputs_embeds` laid out as `layout` (image blocks and experts; none with
        `text_only` or without a layout), with the packed-sample mask of training inputs. `kwargs` go to
        [`BagelTextModel.forward`]."""
        and_mask_function = None
        if document_ids is not None or noised_latent_images is not None:
            if layout is None:
                raise ValueError("Packed training inputs need `input_ids`.")
            and_mask_function = packed_sample_mask(layout, document_ids, noised_latent_images)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            gen_token_mask=layout.gen_token_mask if layout is not None and not text_only else None,
            block_ids=layout.block_ids if layout is not None and not text_only else None,
            and_mask_function=and_mask_function,
            **kwargs,
        )
        if layout is not None and position_ids is layout.position_ids:
            next_position = layout.next_position
        elif position_ids is not None and position_ids.shape[-1]:
            next_position = position_ids.max(-1).values + 1
        else:
            next_position = None
        return BagelModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            next_position=next_position,
        )


class BagelForConditionalGeneration(BagelPreTrainedModel, GenerationMixin):
    """
    BAGEL with its two heads: `lm_head` (text logits, used by `generate`) and `llm2vae` (flow velocity of latent
    tokens, used by the diffusers pipeline through [`~BagelForConditionalGeneration.predict_velocity`]).
    """

    _tied_weights_keys = {}

    def __init__(self, config: BagelConfig):
        super().__init__(config)
        self.model = BagelModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.llm2vae = nn.Linear(config.text_config.hidden_size, config.patch_latent_dim)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def compile_denoising(self, **compile_kwargs) -> None:
        """Compiles the decoder layers of denoising steps (see [`BagelDecoderLayers.compile_denoising`])."""
        self.model.language_model.compile_denoising(**compile_kwargs)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        latents: torch.Tensor | None = None,
        latent_grid_hw: torch.LongTensor | None = None,
        latent_timesteps: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        document_ids: torch.LongTensor | None = None,
        noised_latent_images: torch.BoolTensor | None = None,
        noise: torch.Tensor | list[torch.Tensor] | None = None,
        timesteps: torch.Tensor | None = None,
        ce_weight: float = 1.0,
        mse_weight: float = 1.0,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache_only: bool = False,
        **kwargs,
    ) -> BagelCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            Text labels aligned with `input_ids` (`-100` = no loss); the logits at position i predict `labels[i + 1]`,
            as in every transformers causal LM. The cross entropy is averaged over the labelled tokens.
        document_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            Packed training: sample index of each token (block-diagonal attention).
        noised_latent_images (`torch.BoolTensor` of shape `(num_latent_images,)`, *optional*):
            Which latent images are generation targets: they are noised to `x_t = (1 - t) x0 + t noise`, hidden from
            other tokens, and trained with the flow-matching MSE against `noise - x0`. `latents` then holds the clean
            `x0` of every latent image.
        noise (`torch.Tensor` or `list[torch.Tensor]`, *optional*):
            The noise of each target image, each of shape `(latent_channels, H/8, W/8)` (or already packed
            `(total_target_tokens, patch_latent_dim)`). Drawn with `torch.randn` when omitted.
        timesteps (`torch.Tensor` of shape `(num_target_images,)`, *optional*):
            Flow time t in [0, 1] of each target image, used as given. When omitted, t = sigmoid(randn) shifted by
            `config.timestep_shift`, as the original training.
        ce_weight (`float`, defaults to 1.0), mse_weight (`float`, defaults to 1.0):
            `loss = ce_weight * ce_loss + mse_weight * mse_loss`.
        num_items_in_batch (`int`, `torch.Tensor` or `dict`, *optional*):
            transformers' loss normaliser: the cross entropy is its sum over the labelled tokens divided by this count
            instead of their mean (as every transformers causal LM). A dict `{"ce": n_text_tokens, "mse":
            n_latent_tokens}` normalises both losses (the MSE's sum over target latent tokens, averaged over their
            channels, divided by `"mse"`); [`BagelTrainer`] passes the original's global token counts this way.
        cache_only (`bool`, defaults to `False`):
            Only fill the cache (a prefill whose logits are not needed): the last decoder layer computes its keys and
            values and nothing after them, and no logits are returned. The cache holds exactly what a full forward
            stores.

        See [`BagelModel.forward`] for the other arguments; contexts packed in one cache row are prefilled with
        [`~BagelForConditionalGeneration.prefill_context`] and denoised with
        [`~BagelForConditionalGeneration.predict_velocity`].
        """
        _refuse_context_arguments(kwargs)
        normalisers = kwargs.pop("num_items_in_batch", None)  # a loss argument: never passed on to the layers
        if normalisers is not None and not isinstance(normalisers, dict):
            normalisers = {"ce": normalisers}
        normalisers = normalisers or {}
        if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"`labels` of shape {tuple(labels.shape)} must be aligned with `input_ids` of shape "
                f"{tuple(input_ids.shape)} (-100 where there is no target)."
            )
        training_targets = noised_latent_images is not None and bool(noised_latent_images.any())
        if cache_only and (labels is not None or training_targets):
            raise ValueError("`cache_only=True` computes no outputs, so no loss: pass no `labels` / noised targets.")
        if cache_only:
            kwargs["cache_only"] = True
        if training_targets:
            if latents is None or latent_grid_hw is None:
                raise ValueError("`noised_latent_images` needs the clean `latents` and their `latent_grid_hw`.")
            latents, latent_timesteps, target_tokens, velocity_target = noise_latent_targets(
                self.config, latents, latent_grid_hw, noised_latent_images, noise, timesteps
            )

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_grid_hw=image_grid_hw,
            latents=latents,
            latent_grid_hw=latent_grid_hw,
            latent_timesteps=latent_timesteps,
            use_cache=use_cache,
            document_ids=document_ids,
            noised_latent_images=noised_latent_images,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state

        ce_loss = mse_loss = logits = None
        if labels is not None:
            ce_loss = cross_entropy_loss(self.lm_head, hidden_states, labels, normalisers.get("ce"))
        elif not cache_only:  # a cache-only prefill has no hidden states to read
            logits = self._logits(hidden_states, logits_to_keep)
        if training_targets:
            latent_hidden = hidden_states[input_ids == self.config.latent_token_id]
            prediction = self.llm2vae(latent_hidden[target_tokens])
            mse_loss = flow_matching_loss(prediction, velocity_target, normalisers.get("mse"))

        loss = None
        if ce_loss is not None or mse_loss is not None:
            loss = 0.0
            if ce_loss is not None:
                loss = loss + ce_weight * ce_loss
            if mse_loss is not None:
                loss = loss + mse_weight * mse_loss
        return BagelCausalLMOutputWithPast(
            loss=loss,
            ce_loss=ce_loss,
            mse_loss=mse_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            next_position=outputs.next_position,
        )

    def _logits(self, hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return self.lm_head(hidden_states[:, slice_indices, :])

    def prefill_context(
        self,
        input_ids: torch.LongTensor,
        context: BagelContext,
        context_spans: BagelContextSpan | list[BagelContextSpan],
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        latents: torch.Tensor | None = None,
        latent_grid_hw: torch.LongTensor | None = None,
        latent_timesteps: torch.Tensor | None = None,
        cache_only: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> BagelCausalLMOutputWithPast:
        """
        [`BagelModel.prefill_context`] with the language-model head: the logits of the prefilled tokens, unless
        `cache_only=True` (a prefill whose logits are not needed, as a guidance context's: only the cache is filled).
        """
        outputs = self.model.prefill_context(
            input_ids, context, context_spans, pixel_values=pixel_values, image_grid_hw=image_grid_hw,
            latents=latents, latent_grid_hw=latent_grid_hw, latent_timesteps=latent_timesteps, cache_only=cache_only,
            **kwargs,
        )  # fmt: skip
        return BagelCausalLMOutputWithPast(
            logits=None if cache_only else self._logits(outputs.last_hidden_state, logits_to_keep),
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            next_position=outputs.next_position,
            context_span=outputs.context_span,
            context_spans=outputs.context_spans,
        )

    # -- generation -----------------------------------------------------------------------------------------------

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """
        [`~GenerationMixin.generate`], stopping cleanly at the model's position table: a `max_new_tokens` (or
        `max_length`) that would run past `text_config.max_position_embeddings` is lowered to what fits, with a
        warning, instead of failing after the tokens that fit were generated; a prompt that fills the table already is
        refused before any work. NaN or +inf logits at the first new token (non-finite weights or inputs) raise a
        `RuntimeError` naming the parameters to blame, instead of decoding token 0 for ever.
        """
        input_ids = kwargs.get("input_ids", inputs)
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.dtype in (torch.long, torch.int):
            limit = self.config.text_config.max_position_embeddings
            room = self.position_room(input_ids, kwargs.get("attention_mask"))
            if room <= 0:
                raise ValueError(
                    f"The prompt takes all {limit} positions of the model (text_config.max_position_embeddings): "
                    "shorten it to leave room for new tokens."
                )
            config = generation_config if generation_config is not None else self.generation_config
            requested = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
            if requested is None:
                max_length = kwargs.get("max_length", getattr(config, "max_length", None))
                requested = max_length - input_ids.shape[1] if max_length is not None else None
            if requested is not None and requested > room:
                logger.warning(
                    f"max_new_tokens={requested} would run past the model's {limit} positions; generating at most "
                    f"{room} new tokens."
                )
                kwargs["max_new_tokens"] = room
                kwargs.pop("max_length", None)
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(FiniteLogitsCheck(self))
        return super().generate(inputs, generation_config=generation_config, logits_processor=processors, **kwargs)

    def position_room(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> int:
        """The positions of the model's table (`text_config.max_position_embeddings`) left after the prompt
        `input_ids` (its longest row; an image block takes one position): the most tokens `generate` can add. One
        read from the device."""
        limit = self.config.text_config.max_position_embeddings
        if not input_ids.shape[1]:
            return limit
        return limit - int(bagel_token_layout(input_ids, self.config, attention_mask).next_position.max())

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        if input_ids is None or input_ids.dtype not in (torch.long, torch.int):
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        return bagel_token_layout(input_ids, self.config, model_kwargs.get("attention_mask")).position_ids

    def prepare_inputs_for_generation(self, *args, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and model_inputs.get("use_cache", True):
            for key in ("pixel_values", "image_grid_hw", "latents", "latent_grid_hw", "latent_timesteps"):
                model_inputs.pop(key, None)
            # Sampled tokens are text whatever their id (the original embeds them as text too).
            model_inputs["text_only"] = True
        return model_inputs

    # -- image generation API (used by diffusers_bagel.BagelPipeline) -------------------------------------------------

    def predict_velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        latent_grid_hw: tuple[int, int],
        context: BagelContext,
        context_spans: list[BagelContextSpan],
    ) -> torch.Tensor:
        """
        Flow velocity (`noise - clean` direction) of latent blocks at time `timestep`, each against its context span:
        `llm2vae` of the latent tokens' hidden states of [`BagelModel.denoising_forward`] (one denoising step).

        Args:
            latents (`torch.Tensor` of shape `(rows, h * w, patch_latent_dim)`): packed noisy latents x_t, one row per
                (prompt, guidance branch).
            timestep (`float` or `torch.Tensor` of shape `(rows,)`): flow time t in [0, 1] (1 = noise).
            latent_grid_hw (`tuple[int, int]`): token grid (h, w) of the image.
            context (`BagelContext`): the prefilled contexts.
            context_spans (`list[BagelContextSpan]`): the context of each row (an empty span for no context).

        Returns:
            `torch.Tensor` of shape `(rows, h * w, patch_latent_dim)`.
        """
        hidden_states = self.model.denoising_forward(latents, timestep, latent_grid_hw, context, context_spans)
        return self.llm2vae(hidden_states.last_hidden_state[:, 1:-1])  # the latent tokens, not the two boundaries


__all__ = [
    "BagelPreTrainedModel",
    "BagelTextModel",
    "BagelModel",
    "BagelForConditionalGeneration",
    "BagelModelOutputWithPast",
    "BagelCausalLMOutputWithPast",
    "bagel_token_layout",
    "pack_latents",
    "unpack_latents",
    "sincos_2d_position_table",
]
