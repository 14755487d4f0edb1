"""BAGEL: a Mixture-of-Transformer-Experts decoder shared by understanding (text, ViT tokens) and generation (VAE
latent tokens), with a SigLIP NaViT encoder and flow-matching heads."""

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin, LogitsProcessorList
from transformers.masking_utils import and_masks, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import is_flash_attention_requested
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import capture_outputs

from .checkpoint_files import check_weight_files, is_pipeline_root, local_folder
from .configuration_bagel import BagelConfig, BagelTextConfig
from .context_bagel import BagelContext, BagelContextSpan, BagelStepCache, BranchKeys
from .numerics import FiniteLogitsCheck
from .modeling_bagel_vision import (
    BagelVisionModel,
    flattened_grid_position_ids,
    grid_position_ids,
    in_tree_initialize_weights,
    patch_grids,
)


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Routing of tokens to the two experts
# ----------------------------------------------------------------------------------------------------------------------


class ExpertRouting:
    """
    Which tokens use the understanding expert and which the generation expert (`*_moe_gen`).

    Built once per forward from a boolean `gen_token_mask` of shape `(batch, seq)` (True for VAE latent tokens) and
    shared by every layer. Sequences made of one kind of token (text decoding, ViT prefill) take a fast path with no
    gather/scatter; mixed sequences run each expert on its own tokens only. transformers has no MoT routing, so this
    is written here.

    With `detach_und=True` the understanding expert's outputs are detached (the original's `freeze_und`): every
    consumer of understanding-token activations goes through this routing, so no gradient reaches or leaves them.
    """

    def __init__(self, gen_token_mask: torch.Tensor | None, detach_und: bool = False):
        self.detach_und = detach_und
        self.und_index = self.gen_index = None
        if gen_token_mask is None or not bool(gen_token_mask.any()):
            self.kind = "und"
        elif bool(gen_token_mask.all()):
            self.kind = "gen"
        else:
            self.kind = "mixed"
            flat = gen_token_mask.reshape(-1)
            self.gen_index = flat.nonzero().squeeze(1)
            self.und_index = (~flat).nonzero().squeeze(1)

    def __call__(self, hidden_states: torch.Tensor, und: Callable, gen: Callable, token_dims: int = 2) -> torch.Tensor:
        """Applies `und` to understanding tokens and `gen` to generation tokens of `hidden_states`, whose first
        `token_dims` dimensions index tokens."""
        if self.detach_und:
            und_expert = und
            und = lambda x: und_expert(x).detach()  # noqa: E731
        if self.kind == "und":
            return und(hidden_states)
        if self.kind == "gen":
            return gen(hidden_states)
        lead = hidden_states.shape[:token_dims]
        flat = hidden_states.reshape(-1, *hidden_states.shape[token_dims:])
        und_out = und(flat[self.und_index])
        gen_out = gen(flat[self.gen_index])
        out = und_out.new_empty((flat.shape[0], *und_out.shape[1:]))
        out = out.index_copy(0, self.und_index, und_out).index_copy(0, self.gen_index, gen_out.to(und_out.dtype))
        return out.reshape(*lead, *und_out.shape[1:])


class _LatentBlockRouting(ExpertRouting):
    """
    Routing of denoising rows, every row `[<|vision_start|>, h * w latent tokens, <|vision_end|>]`: the generation
    expert runs on the latent tokens and the understanding expert on the two boundary tokens, located by plain slices
    (no index tensors built on the host, no gather / scatter). Each expert sees exactly its own tokens, as in the
    original, so no FLOP is spent on a token's other expert.
    """

    def __init__(self, rows_apart: bool = False):
        self.und_index = self.gen_index = None
        self.kind = "latent_block"
        self.detach_und = False
        self.rows_apart = rows_apart  # see BagelContext(batch_invariant=True)

    def __call__(self, hidden_states: torch.Tensor, und: Callable, gen: Callable, token_dims: int = 2) -> torch.Tensor:
        latent = gen(hidden_states[:, 1:-1])
        with _RowsApart() if self.rows_apart else contextlib.nullcontext():
            ends = und(hidden_states[:, :: hidden_states.shape[1] - 1]).to(latent.dtype)  # positions 0 and -1
        return torch.cat([ends[:, :1], latent, ends[:, 1:]], dim=1)


class _RowsApart(TorchFunctionMode):
    """
    Runs every `linear` on a `(rows, tokens, features)` input as one matmul per row (a batched matmul against the
    broadcast weight) instead of one matmul over all rows' tokens. For the two boundary tokens of each denoising row:
    a CPU GEMM over few rows takes a kernel that rounds differently from one over many, so with a single matmul a row's
    boundary tokens (and, through attention, its image) would depend on how many rows share the forward; per row they
    do not, and a seeded image is the same alone or in a batch (`BagelContext(batch_invariant=True)`). The FLOPs are
    the same, but each row reads the weights again. Quantised weights are left to their own kernels.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Plain weights only: quantised tensor subclasses (torchao) keep their own matmul kernels.
        if func is F.linear and args[0].dim() == 3 and type(args[1]) in (torch.Tensor, nn.Parameter):
            inputs, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            output = torch.matmul(inputs, weight.t().expand(inputs.shape[0], -1, -1))
            return output + bias if bias is not None else output
        return func(*args, **kwargs)


def _is_latent_block(gen_token_mask: torch.Tensor | None) -> bool:
    """Whether every row is `[<|vision_start|>, latent tokens, <|vision_end|>]`, the layout of `_LatentBlockRouting`."""
    if gen_token_mask is None or gen_token_mask.shape[1] < 3:
        return False
    ends = gen_token_mask[:, :: gen_token_mask.shape[1] - 1]
    return bool(gen_token_mask[:, 1:-1].all()) and not bool(ends.any())


def _keys_from(key_start: int | list[int], past_seen: int, device) -> Callable:
    """Mask restriction: keys before `key_start` (other contexts of a packed cache row) are invisible; a list gives
    each new token its own first key (several contexts prefilled in one forward)."""
    if isinstance(key_start, int):

        def inside_span(batch_idx, head_idx, q_idx, kv_idx):
            return kv_idx >= key_start

        return inside_span
    starts = torch.tensor(key_start, device=device)

    def inside_own_span(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx >= starts[q_idx - past_seen]  # mask functions take absolute query indices

    return inside_own_span


def _check_cache_only(cache: Cache | None, denoising: bool, kwargs: dict) -> None:
    """Refuses `cache_only=True` where there is no cache to fill or an output is asked for."""
    if denoising:
        raise ValueError("`cache_only=True` is for prefills; a denoising forward stores nothing in the cache.")
    if cache is None:
        raise ValueError("`cache_only=True` needs a cache to fill: pass `cache` (or `use_cache=True`) or a `context`.")
    asked = [name for name in ("output_hidden_states", "output_attentions") if kwargs.get(name)]
    if asked:
        raise ValueError(f"`cache_only=True` computes no hidden states or attentions, but {asked[0]}=True was passed.")


def flash_attention_segments(
    block_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    past_seen: int,
    key_start: int | list[int],
    shape: tuple[int, int],
) -> list[tuple[int, int, int, int, int, bool]]:
    """
    BAGEL's attention as flash-attention calls without a mask, as the original runs it: each run of text tokens is
    causal and each image block is full, over every earlier key of its row (flash attention's bottom-right causal
    alignment), from `key_start` (one index, or one per new token: a run ends where it changes) and from the row's
    first unpadded key. Returns `(row, q_start, q_end, k_start, k_end, causal)` per segment, key indices in the
    cache's keys (`past_seen` cached tokens, then the new ones). Left padding only (as `generate` pads).
    """
    batch, length = shape
    ids = block_ids.tolist() if block_ids is not None else [[-1] * length for _ in range(batch)]
    starts = key_start if isinstance(key_start, list) else [key_start] * length
    valid = attention_mask.bool().tolist() if attention_mask is not None else None
    segments = []
    for row in range(batch):
        first_key = 0
        first_query = 0
        if valid is not None:
            row_valid = valid[row]
            if True not in row_valid:
                continue
            first_key = row_valid.index(True)
            if not all(row_valid[first_key:]):
                raise ValueError("flash_attention_2 takes left-padded inputs only (the attention mask has a gap).")
            first_query = max(0, first_key - (len(row_valid) - length))
        start = first_query
        while start < length:
            end = start + 1
            while end < length and ids[row][end] == ids[row][start] and starts[end] == starts[start]:
                end += 1
            segments.append((row, start, end, max(starts[start], first_key), past_seen + end, ids[row][start] < 0))
            start = end
    return segments


def pack_latents(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(batch, channels, H, W)` VAE latents -> `(batch, (H/p) * (W/p), p * p * channels)` tokens in BAGEL's
    `(h, w, p, q, c)` order."""
    batch, channels, height, width = latents.shape
    p = patch_size
    tokens = latents.reshape(batch, channels, height // p, p, width // p, p)
    return tokens.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)


def unpack_latents(tokens: torch.Tensor, grid_hw: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Inverse of [`pack_latents`]: `(batch, h * w, p * p * channels)` -> `(batch, channels, h * p, w * p)`."""
    batch = tokens.shape[0]
    (h, w), p = grid_hw, patch_size
    channels = tokens.shape[-1] // (p * p)
    latents = tokens.reshape(batch, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return latents.reshape(batch, channels, h * p, w * p)


# ----------------------------------------------------------------------------------------------------------------------
# Small modules
# ----------------------------------------------------------------------------------------------------------------------


def sincos_2d_position_table(hidden_size: int, side: int) -> torch.Tensor:
    """
    Fixed 2-D sin-cos table of shape `(side * side, hidden_size)` for positions `row * side + col`: the first half of
    the features encodes the column, the second half the row, each as `[sin, cos]` over 10000^(-2i/d) frequencies
    (computed in float64 like the original's numpy code, returned as float32).
    """
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32), indexing="ij")

    def encode(coords):
        angles = np.einsum("m,d->md", coords.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return torch.from_numpy(np.concatenate([encode(cols), encode(rows)], axis=1)).float()


class BagelPositionEmbedding(nn.Module):
    """
    Fixed 2-D sin-cos table indexed by flattened 2-D ids. A persistent buffer: it is saved with the weights under the
    release's key (`*.pos_embed`), and unlike a frozen parameter it cannot become trainable again (loading resets a
    parameter's `requires_grad`) or reach an optimiser or a LoRA / FSDP wrapper.
    """

    def __init__(self, side: int, hidden_size: int):
        super().__init__()
        self.side = side
        self.hidden_size = hidden_size
        self.register_buffer("pos_embed", torch.zeros(side * side, hidden_size), persistent=True)

    def forward(self, position_ids: torch.LongTensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class BagelTimestepEmbedder(nn.Module):
    """DiT-style embedding of flow time t in [0, 1]: a 256-d `[cos, sin]` sinusoid, then Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def sinusoid(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        exponent = -np.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
        angles = timesteps.float()[:, None] * torch.exp(exponent)[None]
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if self.frequency_embedding_size % 2:
            embedding = torch.nn.functional.pad(embedding, (0, 1))
        return embedding

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(timesteps).to(self.mlp[0].weight.dtype))


class BagelConnector(nn.Module):
    """MLP from ViT features to the decoder width: fc1 -> activation -> fc2."""

    def __init__(self, in_features: int, out_features: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[activation]
        self.fc2 = nn.Linear(out_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


# ----------------------------------------------------------------------------------------------------------------------
# Mixture-of-Transformer-Experts decoder
# ----------------------------------------------------------------------------------------------------------------------


class BagelAttention(nn.Module):
    """
    Joint attention over all tokens, with per-expert projections: understanding tokens use `{q,k,v,o}_proj` and
    `{q,k}_norm`, generation tokens their `*_moe_gen` twins. q/k RMSNorm (over the head dim) runs before RoPE.
    """

    def __init__(self, config: BagelTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_out = config.num_attention_heads * self.head_dim
        kv_out = config.num_key_value_heads * self.head_dim
        hidden = config.hidden_size
        # Understanding expert (Qwen2's projections)
        self.q_proj = nn.Linear(hidden, q_out, bias=True)
        self.k_proj = nn.Linear(hidden, kv_out, bias=True)
        self.v_proj = nn.Linear(hidden, kv_out, bias=True)
        self.o_proj = nn.Linear(q_out, hidden, bias=False)
        # Generation expert: same shapes, its own weights
        self.q_proj_moe_gen = nn.Linear(hidden, q_out, bias=True)
        self.k_proj_moe_gen = nn.Linear(hidden, kv_out, bias=True)
        self.v_proj_moe_gen = nn.Linear(hidden, kv_out, bias=True)
        self.o_proj_moe_gen = nn.Linear(q_out, hidden, bias=False)
        # q/k RMSNorm over the head dim, one pair per expert (none without qk_norm)
        self.q_norm = Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.q_norm_moe_gen = Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm_moe_gen = Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: ExpertRouting,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        branch_keys: BranchKeys | None = None,
        segments: list[tuple[int, int, int, int, int, bool]] | None = None,
        keys_values_only: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`keys_values_only=True`: the tokens' keys and values go into `cache` and nothing else is computed (no
        query, attention or output projection); returns `(None, None)`."""
        batch, seq_len = hidden_states.shape[:2]

        def heads(x):
            return x.view(batch, seq_len, -1, self.head_dim)

        key = routing(heads(routing(hidden_states, self.k_proj, self.k_proj_moe_gen)), self.k_norm, self.k_norm_moe_gen)
        value = heads(routing(hidden_states, self.v_proj, self.v_proj_moe_gen)).transpose(1, 2)
        key = key.transpose(1, 2)
        cos, sin = position_embeddings
        if keys_values_only:
            # Qwen2's RoPE rotates a query and a key together: the key stands in for the query that is not needed.
            _, key = apply_rotary_pos_emb(key, key, cos, sin)
            cache.update(key, value, self.layer_idx)
            return None, None
        query = routing(heads(routing(hidden_states, self.q_proj, self.q_proj_moe_gen)), self.q_norm, self.q_norm_moe_gen)
        query, key = apply_rotary_pos_emb(query.transpose(1, 2), key, cos, sin)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = 0.0 if not self.training else self.attention_dropout
        if branch_keys is not None:
            attn_output = self._attend_to_spans(query, key, value, branch_keys, attention_interface, **kwargs)
            attn_weights = None
        else:
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
            if segments is not None:
                attn_output, attn_weights = self._attend_by_segments(
                    query, key, value, segments, attention_interface, dropout, **kwargs
                )
            else:
                attn_output, attn_weights = attention_interface(
                    self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
                )
        attn_output = attn_output.reshape(batch, seq_len, -1).contiguous()
        attn_output = routing(attn_output, self.o_proj, self.o_proj_moe_gen)
        return attn_output, attn_weights

    def _attend_by_segments(self, query, key, value, segments, attention_interface, dropout, **kwargs):
        """Mask-free attention (flash attention) of each segment of [`flash_attention_segments`]; padding rows get
        zeros."""
        batch, heads, length, head_dim = query.shape
        output = query.new_zeros(batch, length, heads, head_dim)
        for row, q_start, q_end, k_start, k_end, causal in segments:
            segment, _ = attention_interface(
                self, query[row : row + 1, :, q_start:q_end], key[row : row + 1, :, k_start:k_end],
                value[row : row + 1, :, k_start:k_end], None, dropout=dropout, scaling=self.scaling, is_causal=causal,
                **kwargs,
            )  # fmt: skip
            output[row, q_start:q_end] = segment[0]
        return output, None

    def _attend_to_spans(self, query, key, value, branch_keys, attention_interface, **kwargs):
        """
        Denoising rows against a packed [`BagelContext`]: row r attends to the cached keys of its span (gathered once
        per call by `branch_keys`) and to its own block, bidirectionally, without storing anything. One unmasked
        attention call per group of rows whose spans have the same length: nothing is padded.
        """
        outputs = []
        for (first, last, _), cached in zip(branch_keys.groups, branch_keys.context_key_values[self.layer_idx]):
            group_key, group_value = key[first:last], value[first:last]
            if cached is not None:
                group_key = torch.cat([cached[0].to(group_key.dtype), group_key], dim=2)
                group_value = torch.cat([cached[1].to(group_value.dtype), group_value], dim=2)
            output, _ = attention_interface(
                self, query[first:last], group_key, group_value, None, dropout=0.0, scaling=self.scaling,
                is_causal=False, **kwargs,
            )  # fmt: skip
            outputs.append(output)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


class BagelDecoderLayer(GradientCheckpointingLayer):
    """One MoT layer: both layernorms and the MLP exist per expert; attention is joint."""

    def __init__(self, config: BagelTextConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = BagelAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def _und_mlp(self, hidden_states):
        return self.mlp(self.post_attention_layernorm(hidden_states))

    def _gen_mlp(self, hidden_states):
        return self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(hidden_states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: ExpertRouting,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        branch_keys: BranchKeys | None = None,
        keys_values_only: bool = False,
        **kwargs,
    ) -> torch.Tensor | None:
        """`keys_values_only=True` (the last layer of a cache-only prefill): only the layer's keys and values are
        computed, into `cache`; returns None."""
        residual = hidden_states
        hidden_states = routing(hidden_states, self.input_layernorm, self.input_layernorm_moe_gen)
        hidden_states, _ = self.self_attn(
            hidden_states,
            routing=routing,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            branch_keys=branch_keys,
            keys_values_only=keys_values_only,
            **kwargs,
        )
        if keys_values_only:
            return None
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = routing(hidden_states, self._und_mlp, self._gen_mlp)
        return residual + hidden_states


class BagelPreTrainedModel(PreTrainedModel):
    config: BagelConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["BagelDecoderLayer", "SiglipEncoderLayer"]
    _skip_keys_device_placement = ["cache"]
    # Flash attention takes no mask: BAGEL then runs one mask-free call per segment (causal text runs, full image
    # blocks, denoising rows against their own context), as the original does (`flash_attention_segments`).
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": BagelDecoderLayer, "attentions": BagelAttention}

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, output_loading_info: bool = False, **kwargs):
        """
        [`~PreTrainedModel.from_pretrained`], refusing weights that do not fit the configuration: missing, unexpected
        or mismatched tensors (a `config.json` whose layer count disagrees with the checkpoint would otherwise load with
        a log line and give a different model). `strict=False` loads anyway, as transformers does. A truncated shard
        of a local folder is named before anything is read.
        """
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(where, (str, os.PathLike)) and not kwargs.get("subfolder") and is_pipeline_root(where):
            raise ValueError(
                f"{str(where)!r} is a converted BAGEL pipeline folder: load the model from its `model` subfolder "
                f"({cls.__name__}.from_pretrained(path, subfolder='model')), or the whole pipeline with "
                "BagelPipeline.from_pretrained(path)."
            )
        folder = local_folder(where, kwargs.get("subfolder"))
        if folder is not None:
            check_weight_files(folder)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {
            kind.replace("_", " "): sorted(str(key) for key in info.get(kind) or [])
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if info.get(kind)
        }
        if strict and problems:
            listed = "; ".join(f"{len(keys)} {kind} (e.g. {', '.join(keys[:3])})" for kind, keys in problems.items())
            raise ValueError(
                f"The weights in {str(where)!r} do not fit its configuration: {listed}. Check config.json (layer "
                "counts, sizes) against the checkpoint, or pass strict=False to load anyway."
            )
        return (model, info) if output_loading_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        """Qwen2's rules (normal linear layers and embeddings of std `initializer_range`, zero biases, unit RMSNorms,
        RoPE tables) and the fixed sin-cos latent position table; the ViT follows SigLIP's (its own `_init_weights`)."""
        super()._init_weights(module)
        if isinstance(module, BagelPositionEmbedding):
            init.copy_(module.pos_embed, sincos_2d_position_table(module.hidden_size, module.side))

    def _initialize_weights(self, module, is_custom_code: bool = False):
        in_tree_initialize_weights(super(), module)


class BagelTextModel(BagelPreTrainedModel):
    """
    The MoT decoder. Plain Qwen2 behaviour when every token is an understanding token and positions are consecutive;
    BAGEL's composite model passes its own position ids, image-block ids and expert routing.
    """

    config: BagelTextConfig
    input_modalities = ("text",)

    def __init__(self, config: BagelTextConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([BagelDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self._compiled_denoising = None
        self._checked_flex_on_cpu = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _warn_if_flex_heads_too_small(self) -> None:
        """torch's compiled CPU flex-attention kernel (torch 2.13) returns wrong values for heads under 32 features when
        the queries do not start at key 0 (a prefill after cached keys), however the mask is built: said once per
        model. BAGEL's heads have 128 features; only tiny test models are concerned."""
        if self._checked_flex_on_cpu:
            return
        self._checked_flex_on_cpu = True
        head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        if head_dim < 32:
            logger.warning(
                f"flex_attention on the CPU with heads of {head_dim} features: torch's compiled CPU flex kernel "
                "returns wrong attention for heads under 32 features once queries follow cached keys (seen with torch "
                "2.13). Use attn_implementation='sdpa' or 'eager' for this model on the CPU."
            )

    def decoder_layers(
        self,
        hidden_states: torch.Tensor,
        routing: ExpertRouting,
        attention_mask,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None,
        branch_keys: BranchKeys | None,
        cache_only: bool = False,
        **kwargs,
    ) -> torch.Tensor | None:
        """The layer stack (every forward runs it; `compile_denoising` compiles it for denoising forwards). With
        `cache_only`, the last layer only computes its keys and values and None is returned."""
        layers = self.layers[: self.config.num_hidden_layers]
        for index, decoder_layer in enumerate(layers):
            if cache_only and index == len(layers) - 1:
                kwargs["keys_values_only"] = True
            hidden_states = decoder_layer(
                hidden_states,
                routing,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                cache=cache,
                branch_keys=branch_keys,
                **kwargs,
            )
        return hidden_states

    def compile_denoising(self, **compile_kwargs) -> None:
        """
        Compiles the layer stack of denoising forwards with `torch.compile(fullgraph=True, dynamic=False)` (keyword
        arguments are passed on and override those). A denoising step reads no cache and builds no mask (the context's
        keys, RoPE tables and routing are gathered once per call), so the stack compiles to one graph without breaks,
        reused at every step of a call; a new graph is built only for a new number of rows or context lengths (guidance
        switched off by `cfg_interval`, another image size). Prefill and text generation stay eager.
        `compile_denoising(disable=True)` turns it off again.
        """
        if compile_kwargs.pop("disable", False):
            self._compiled_denoising = None
            return
        options = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        self._compiled_denoising = torch.compile(self.decoder_layers, **options)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        gen_token_mask: torch.BoolTensor | None = None,
        block_ids: torch.LongTensor | None = None,
        and_mask_function: Callable | None = None,
        key_start: int | list[int] = 0,
        routing: ExpertRouting | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        branch_keys: BranchKeys | None = None,
        step_cache: BagelStepCache | None = None,
        cache_only: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        gen_token_mask (`torch.BoolTensor` of shape `(batch, seq)`, *optional*):
            True where a token is a VAE latent token (generation expert). Default: all understanding tokens.
        block_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            Image block of each token (`-1` for causal text tokens). Tokens of one block attend to each other
            bidirectionally.
        and_mask_function (`Callable`, *optional*):
            Extra mask restriction (packed training samples, noised images hidden from later tokens).
        key_start (`int` or `list[int]`, defaults to 0):
            Keys before this index are invisible to the new tokens (contexts packed one after another in one cache row);
            a list gives the first visible key of each new token (several contexts prefilled in one forward).
        routing (`ExpertRouting`, *optional*):
            Prebuilt expert routing (instead of `gen_token_mask`), kept across denoising steps by [`BagelContext`].
        position_embeddings (`tuple[torch.Tensor, torch.Tensor]`, *optional*):
            Prebuilt RoPE `(cos, sin)` of `position_ids`.
        branch_keys (`BranchKeys`, *optional*):
            Denoising rows against a packed [`BagelContext`]: each row attends to its own context span and itself
            (no mask is built), and `cache` is left as it was.
        step_cache (`BagelStepCache`, *optional*):
            Step caching (TaylorSeer): when it holds a prediction of the layer stack's output, the layers are skipped.
        cache_only (`bool`, defaults to `False`):
            Only fill `cache` (a prefill whose outputs are not needed): the last layer computes its keys and values and
            nothing after them, and `last_hidden_state` is None.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.config._attn_implementation == "flex_attention" and inputs_embeds.device.type == "cpu":
            self._warn_if_flex_heads_too_small()
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache_only:
            _check_cache_only(cache, branch_keys is not None or step_cache is not None, kwargs)
        if isinstance(key_start, list) and len(key_start) != inputs_embeds.shape[1]:
            raise ValueError(f"`key_start` lists {len(key_start)} first keys for {inputs_embeds.shape[1]} new tokens.")
        hides_keys = any(key_start) if isinstance(key_start, list) else bool(key_start)
        past_seen = int(cache.get_seq_length()) if cache is not None else 0
        segments = None
        if block_ids is not None and not bool((block_ids >= 0).any()):
            block_ids = None
        one_full_block = (
            branch_keys is None and block_ids is not None and not hides_keys and attention_mask is None
            and and_mask_function is None and bool((block_ids == block_ids[:, :1]).all())
            # and the cache returns only filled keys (a static cache returns its unused slots too, to be masked)
            and (cache is None or cache.get_mask_sizes(block_ids.shape[1], 0)[0] == past_seen + block_ids.shape[1])
        )  # fmt: skip
        if branch_keys is not None:
            causal_mask = None  # every row's keys are chosen by `branch_keys`
        elif one_full_block:
            # The new tokens are one image block (a prefill of one image, as the original prefills them): each sees
            # every key, so no mask is built and the attention runs unmasked.
            causal_mask = None
            kwargs["is_causal"] = False
        elif is_flash_attention_requested(self.config) and (block_ids is not None or hides_keys or and_mask_function):
            # Flash attention takes no mask: the original's formulation, one call per segment (causal text runs, full
            # image blocks, bottom-right aligned over every earlier key).
            if and_mask_function is not None:
                raise ValueError(
                    "flash_attention_2 cannot run packed training samples (per-sample and noised-image masks); use "
                    "attn_implementation='sdpa' or 'flex_attention' for training."
                )
            causal_mask = None
            segments = flash_attention_segments(block_ids, attention_mask, past_seen, key_start, inputs_embeds.shape[:2])
        else:
            if hides_keys:
                hidden_keys = _keys_from(key_start, past_seen, inputs_embeds.device)
                and_mask_function = and_masks(*filter(None, (hidden_keys, and_mask_function)))
            if block_ids is not None and cache is not None:
                # The mask functions index blocks by absolute key position: cached tokens are never in a new block
                # (and a static cache's unused slots neither).
                kv_length = cache.get_mask_sizes(inputs_embeds.shape[1], 0)[0]
                before, after = past_seen, kv_length - past_seen - block_ids.shape[1]
                block_ids = torch.cat(
                    [block_ids.new_full((block_ids.shape[0], before), -1), block_ids,
                     block_ids.new_full((block_ids.shape[0], max(after, 0)), -1)], dim=1,
                )  # fmt: skip
            # position_ids=None on purpose: image blocks repeat one position, which transformers would mistake for
            # packed sequences.
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=None,
                block_sequence_ids=block_ids,
                and_mask_function=and_mask_function,
            )
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past_seen
        if routing is None:
            detach_und = self.config.freeze_und and torch.is_grad_enabled()
            if not detach_und and _is_latent_block(gen_token_mask):
                routing = _LatentBlockRouting()  # one latent block per row: the experts by slices
            else:
                routing = ExpertRouting(gen_token_mask, detach_und=detach_und)
        hidden_states = inputs_embeds
        if position_embeddings is None:
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        predicted = step_cache.cached_output() if step_cache is not None else None
        if predicted is not None:
            hidden_states = predicted.to(hidden_states.dtype)
        else:
            run_layers = self.decoder_layers
            if branch_keys is not None and self._compiled_denoising is not None:
                run_layers = self._compiled_denoising
            if segments is not None:
                kwargs["segments"] = segments
            if cache_only:
                kwargs["cache_only"] = True
            hidden_states = run_layers(hidden_states, routing, causal_mask, position_embeddings, cache, branch_keys, **kwargs)
            if cache_only:
                return BaseModelOutputWithPast(last_hidden_state=None, cache=cache)
            if step_cache is not None:
                step_cache.store(hidden_states)
        hidden_states = routing(hidden_states, self.norm, self.norm_moe_gen)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache if use_cache else None
        )


# ----------------------------------------------------------------------------------------------------------------------
# Token layout: positions, image blocks, experts
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenLayout:
    """BAGEL's per-token structure, derived from `input_ids`."""

    position_ids: torch.LongTensor
    block_ids: torch.LongTensor
    gen_token_mask: torch.BoolTensor
    next_position: torch.LongTensor


def bagel_token_layout(
    input_ids: torch.LongTensor,
    config: BagelConfig,
    attention_mask: torch.Tensor | None = None,
    position_offset: torch.Tensor | int = 0,
    text_only: bool = False,
) -> TokenLayout:
    """
    Positions and image blocks of BAGEL: text tokens advance the position by one; an image block
    (`<|vision_start|>` ... `<|vision_end|>`, boundary tokens included) shares one position and advances it by one.
    Padding (attention_mask == 0) does not advance it.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, seq)`).
        config ([`BagelConfig`]).
        attention_mask (`torch.Tensor` of shape `(batch, seq)`, *optional*): 1 for real tokens.
        position_offset (`int` or `torch.Tensor` of shape `(batch,)`): position of the first token (a cached context's
            next position).
        text_only (`bool`, defaults to `False`): every token is text, whatever its id (tokens sampled by `generate`):
            no image blocks, no latent tokens, each token advances the position.
    """
    if text_only:
        is_start = is_end = is_latent = torch.zeros_like(input_ids, dtype=torch.bool)
    else:
        is_start = input_ids == config.start_of_image_token_id
        is_end = input_ids == config.end_of_image_token_id
        is_latent = input_ids == config.latent_token_id
    starts_so_far = is_start.long().cumsum(-1)
    ends_before = is_end.long().cumsum(-1) - is_end.long()
    inside = (starts_so_far - ends_before) > 0
    advance = (~inside | is_end).long()
    if attention_mask is not None:
        advance = advance * attention_mask[:, -input_ids.shape[1] :].long()
    offset = torch.as_tensor(position_offset, device=input_ids.device).reshape(-1, 1)
    running = advance.cumsum(-1)
    position_ids = running - advance + offset
    block_ids = torch.where(inside, starts_so_far, torch.full_like(starts_so_far, -1))
    return TokenLayout(
        position_ids=position_ids,
        block_ids=block_ids,
        gen_token_mask=is_latent,
        next_position=running[:, -1] + offset[:, 0] if input_ids.shape[1] else offset[:, 0].expand(input_ids.shape[0]),
    )


def packed_sample_mask(
    layout: TokenLayout, document_ids: torch.LongTensor | None, noised_latent_images: torch.BoolTensor | None
) -> Callable:
    """
    Mask restriction for packed training sequences (combined with the causal mask and bidirectional image blocks):
    a token sees only tokens of its own sample, and a noised target image block is seen by no token outside it.
    """
    block_ids = layout.block_ids
    noise_block = torch.full_like(block_ids, -1)
    if noised_latent_images is not None and bool(noised_latent_images.any()):
        # The k-th latent block (in sequence order) holds the k-th latent image.
        latent_blocks = torch.unique_consecutive(block_ids[layout.gen_token_mask])
        if latent_blocks.numel() != noised_latent_images.numel():
            raise ValueError(
                f"noised_latent_images has {noised_latent_images.numel()} entries for {latent_blocks.numel()} latent "
                "image blocks."
            )
        noised_blocks = latent_blocks[noised_latent_images.to(latent_blocks.device)]
        is_noised = torch.isin(block_ids, noised_blocks)
        noise_block = torch.where(is_noised, block_ids, noise_block)
    documents = document_ids if document_ids is not None else torch.zeros_like(block_ids)

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        same_sample = documents[batch_idx, q_idx] == documents[batch_idx, kv_idx]
        kv_noise = noise_block[batch_idx, kv_idx]
        visible = (kv_noise < 0) | (kv_noise == block_ids[batch_idx, q_idx])
        return same_sample & visible

    return inner_mask


# ----------------------------------------------------------------------------------------------------------------------
# Composite model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class BagelModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    next_position (`torch.LongTensor` of shape `(batch,)`):
        The position the next token of each row would take (BAGEL's "rope" counter), needed to continue from the cache.
    context_span (`BagelContextSpan`, *optional*):
        After a prefill into a [`BagelContext`]: the grown span (of the first row).
    context_spans (`tuple[BagelContextSpan, ...]`, *optional*):
        After a prefill into a [`BagelContext`]: the grown span of each row.
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
    velocity (`torch.FloatTensor` of shape `(total_latent_tokens, patch_latent_dim)`, *optional*): flow velocity of
        the latent tokens of a denoising forward.
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
    velocity: torch.FloatTensor | None = None


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

    @staticmethod
    def _check_slots(input_ids: torch.LongTensor, token_id: int, sizes: list[int], what: str, name: str):
        """
        Refuses images whose token counts (`sizes`, from `name`) do not match the placeholder blocks of `input_ids`,
        block by block (one image per run of `token_id`, in order): not only the total, which a wrong grid or a wrong
        number of images can meet while giving every image the wrong patches. One read from the device (a prefill's,
        once per call).
        """
        edges = F.pad(input_ids == token_id, (1, 1)).to(torch.int8).diff(dim=1)  # +1 where a run starts, -1 after it
        starts, ends = (edges == 1).nonzero()[:, 1], (edges == -1).nonzero()[:, 1]
        runs = (ends - starts).tolist()
        if runs != sizes:
            raise ValueError(
                f"input_ids hold {len(runs)} {what} blocks of {runs} placeholder tokens (id {token_id}), but `{name}` "
                f"describes {len(sizes)} {what}s of {sizes} tokens; the processor's placeholders and the images must "
                "match."
            )

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
        context: BagelContext | None = None,
        context_spans: BagelContextSpan | list[BagelContextSpan] | None = None,
        update_cache: bool = True,
        step_cache: BagelStepCache | None = None,
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
        context (`BagelContext`, *optional*):
            Contexts packed in one cache row, instead of `cache`. With `update_cache=True` (prefill) each row of
            `input_ids` is appended to its span of `context_spans` and sees nothing of the other contexts; the rows run
            in one forward and are stored one after another (rows after the first start new contexts, from empty
            spans); the output's `context_spans` are the grown spans (`context_span` the first). With
            `update_cache=False` (denoising) every row of `input_ids` is one latent block `[<|vision_start|>, h * w
            latent tokens, <|vision_end|>]` that attends to its own span of `context_spans` and to itself, and the cache
            is left as it was.
        context_spans (`BagelContextSpan` or `list[BagelContextSpan]`, *optional*):
            The span each row extends (prefill), or the span of each row (denoising).
        update_cache (`bool`, defaults to `True`):
            With a `context`: prefill (True) or denoise (False), see there.
        step_cache (`BagelStepCache`, *optional*):
            Denoising step caching (TaylorSeer): may replace the decoder layers' output by a prediction.
        document_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            Packed training: the sample each token belongs to. Tokens attend only within their sample.
        noised_latent_images (`torch.BoolTensor` of shape `(num_latent_images,)`, *optional*):
            Packed training: which latent images are noised targets. Their blocks are invisible to every other token
            (they only see themselves and what precedes them).
        text_only (`bool`, defaults to `False`):
            Treat every token of `input_ids` as text, image placeholder and boundary ids included, as the original
            does with sampled tokens. `generate` sets it after the prompt, so a sampled `<|image_pad|>` or
            `<|vision_start|>` is embedded as the text token it is instead of being taken for an image slot.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if text_only and (pixel_values is not None or latents is not None):
            raise ValueError("`text_only=True` takes no `pixel_values` or `latents`: every token is read as text.")
        if input_ids is None and (pixel_values is not None or latents is not None):
            raise ValueError("Images need `input_ids` with placeholder tokens; `inputs_embeds` alone cannot place them.")
        if context is not None:
            return self._forward_with_context(
                input_ids, attention_mask, position_ids, cache, pixel_values, image_grid_hw, latents, latent_grid_hw,
                latent_timesteps, context, context_spans, update_cache, step_cache, document_ids, noised_latent_images,
                text_only, **kwargs,
            )  # fmt: skip
        if not update_cache or context_spans is not None or step_cache is not None:
            raise ValueError("`update_cache=False`, `context_spans` and `step_cache` need a `context` (BagelContext).")
        if use_cache is None:
            use_cache = self.config.text_config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        cached = cache is not None and int(cache.get_seq_length()) > 0
        if cached and position_ids is None and input_ids is not None:
            raise ValueError(
                "Continuing from a `cache` needs `position_ids`: BAGEL positions do not follow the number of cached "
                "tokens (an image block shares one position). Start from the previous output's `next_position`, or "
                "prefill into a `BagelContext`, which keeps them."
            )
        return self._embed_and_decode(
            input_ids, inputs_embeds, attention_mask, position_ids, 0, cache, use_cache, pixel_values, image_grid_hw,
            latents, latent_grid_hw, latent_timesteps, document_ids, noised_latent_images, text_only, 0, **kwargs,
        )  # fmt: skip

    def _check_input_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, read_values: bool) -> None:
        """Refuses ids the embedding table cannot hold and masks that do not fit them, before the embedding's
        IndexError or a broadcast error deep inside. Shapes and dtypes are always checked; the id values only with
        `read_values` (one read of two numbers from the device): not for the tokens `generate` sampled, which come
        from the model's own vocabulary, so that a decoding step reads nothing back."""
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be (batch, sequence), got shape {tuple(input_ids.shape)}.")
        if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise TypeError(f"`input_ids` must hold integer token ids, got {input_ids.dtype}.")
        if not input_ids.numel():
            raise ValueError(
                f"`input_ids` of shape {tuple(input_ids.shape)} holds no tokens: give at least one (a prompt from "
                "`processor.apply_chat_template(..., add_generation_prompt=True)` ends with `<|im_start|>`)."
            )
        if read_values:
            vocab = self.language_model.embed_tokens.num_embeddings
            low, high = (int(value) for value in torch.stack(torch.aminmax(input_ids)).tolist())  # one host read
            if low < 0 or high >= vocab:
                raise ValueError(f"`input_ids` holds ids in [{low}, {high}], outside the vocabulary [0, {vocab}).")
        if attention_mask is not None and (
            attention_mask.dim() != 2
            or attention_mask.shape[0] != input_ids.shape[0]
            or attention_mask.shape[1] < input_ids.shape[1]
        ):
            raise ValueError(
                f"`attention_mask` of shape {tuple(attention_mask.shape)} does not fit `input_ids` of shape "
                f"{tuple(input_ids.shape)} (expected (batch, cached + new tokens))."
            )

    def _check_position_limit(self, max_position: int) -> None:
        limit = self.config.text_config.max_position_embeddings
        if max_position >= limit:
            raise ValueError(
                f"The sequence reaches position {max_position}, beyond the model's limit of {limit} positions "
                "(text_config.max_position_embeddings); shorten the prompt."
            )

    def _embed_and_decode(
        self, input_ids, inputs_embeds, attention_mask, position_ids, position_offset, cache, use_cache, pixel_values,
        image_grid_hw, latents, latent_grid_hw, latent_timesteps, document_ids, noised_latent_images, text_only,
        key_start, **kwargs,
    ) -> BagelModelOutputWithPast:
        """Embeds text, ViT and latent tokens, builds BAGEL's layout and mask, and runs the decoder (every forward but
        denoising)."""
        if input_ids is not None:
            # `text_only` tokens (generate's decoding steps) are text by definition: no image block, no latent token,
            # and their ids come from the model's vocabulary; `generate` checked the prompt and the room left in the
            # position table once per call. So a decoding step reads nothing back from the device.
            self._check_input_ids(input_ids, attention_mask, read_values=not text_only)
            layout = bagel_token_layout(input_ids, self.config, attention_mask, position_offset, text_only=text_only)
            if position_ids is None:
                position_ids = layout.position_ids
            block_ids, gen_token_mask = (None, None) if text_only else (layout.block_ids, layout.gen_token_mask)
            if position_ids.numel() and not text_only:
                self._check_position_limit(int(position_ids.max()))
            inputs_embeds = self.language_model.embed_tokens(input_ids)
        else:
            layout, block_ids, gen_token_mask = None, None, None
            hidden = self.config.text_config.hidden_size
            if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden):
                raise ValueError(
                    f"`inputs_embeds` must be (batch, sequence, {hidden}) (text_config.hidden_size), got shape "
                    f"{tuple(inputs_embeds.shape)}."
                )

        if pixel_values is not None:
            if image_grid_hw is None:
                raise ValueError("`pixel_values` needs `image_grid_hw` (the patch grid of each image).")
            sizes = self.vision_model.check_patches(pixel_values, image_grid_hw)
            if pixel_values.is_floating_point() and not bool(torch.isfinite(pixel_values).all()):
                raise ValueError("`pixel_values` hold NaN or infinite values: the images or their preprocessing are broken.")
            self._check_slots(input_ids, self.config.image_token_id, sizes, "image", "image_grid_hw")
            features = self.get_image_features(pixel_values, image_grid_hw)
            mask = (input_ids == self.config.image_token_id)[..., None]
            inputs_embeds = inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))
        elif input_ids is not None and not text_only and bool((input_ids == self.config.image_token_id).any()):
            raise ValueError("input_ids contain image placeholder tokens but no `pixel_values` were given.")
        if latents is not None:
            if latent_grid_hw is None:
                raise ValueError("`latents` needs `latent_grid_hw` (the token grid of each latent image).")
            if latent_timesteps is None:
                latent_timesteps = torch.zeros(latent_grid_hw.shape[0], device=latents.device)
            grids = patch_grids(latent_grid_hw)  # read once: the check and the position ids use it
            sizes = [rows * cols for rows, cols in grids]
            self._check_slots(input_ids, self.config.latent_token_id, sizes, "latent image", "latent_grid_hw")
            latent_position_ids = grid_position_ids(
                grids, self.config.max_latent_size, self.config.interpolate_pos, latents.device
            )
            features = self.get_latent_embeddings(latents, latent_grid_hw, latent_timesteps, latent_position_ids)
            mask = (input_ids == self.config.latent_token_id)[..., None]
            inputs_embeds = inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))
        elif gen_token_mask is not None and bool(gen_token_mask.any()):
            raise ValueError("input_ids contain latent placeholder tokens but no `latents` were given.")

        and_mask_function = None
        if document_ids is not None or noised_latent_images is not None:
            if layout is None:
                raise ValueError("Packed training inputs need `input_ids`.")
            and_mask_function = packed_sample_mask(layout, document_ids, noised_latent_images)

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            gen_token_mask=gen_token_mask,
            block_ids=block_ids,
            and_mask_function=and_mask_function,
            key_start=key_start,
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

    def _forward_with_context(
        self, input_ids, attention_mask, position_ids, cache, pixel_values, image_grid_hw, latents, latent_grid_hw,
        latent_timesteps, context, context_spans, update_cache, step_cache, document_ids, noised_latent_images,
        text_only, **kwargs,
    ) -> BagelModelOutputWithPast:
        """Prefill into, or denoise against, a [`BagelContext`] (see `forward`)."""
        if not isinstance(context, BagelContext):
            raise TypeError(f"`context` must be a BagelContext, got {type(context).__name__}.")
        if cache is not None:
            raise ValueError("Pass either `cache` or `context` (which holds its cache), not both.")
        if input_ids is None:
            raise ValueError("A `context` forward needs `input_ids`.")
        if attention_mask is not None or position_ids is not None:
            raise ValueError("A `context` keeps its own positions and masks: pass no `attention_mask` / `position_ids`.")
        spans = (context_spans,) if isinstance(context_spans, BagelContextSpan) else tuple(context_spans or ())
        if not spans or not all(isinstance(span, BagelContextSpan) for span in spans):
            raise ValueError("A `context` forward needs `context_spans` (BagelContextSpan, or one per row).")

        if update_cache:
            if step_cache is not None:
                raise ValueError("`step_cache` applies to denoising (`update_cache=False`), not to a prefill.")
            return self._prefill_context(
                input_ids, pixel_values, image_grid_hw, latents, latent_grid_hw, latent_timesteps, context, spans,
                document_ids, noised_latent_images, text_only, **kwargs,
            )  # fmt: skip

        if pixel_values is not None or document_ids is not None or noised_latent_images is not None or text_only:
            raise ValueError("A denoising forward (`update_cache=False`) takes latent blocks only.")
        if latents is None or latent_grid_hw is None:
            raise ValueError("A denoising forward needs `latents` and `latent_grid_hw`.")
        step = self._denoising_step_inputs(input_ids, latent_grid_hw, spans, context)
        if latent_timesteps is None:
            latent_timesteps = torch.zeros(input_ids.shape[0], device=latents.device)
        features = self.get_latent_embeddings(
            latents, latent_grid_hw, latent_timesteps, step.latent_position_ids, step.token_image_index
        )
        inputs_embeds = self.language_model.embed_tokens(input_ids)
        inputs_embeds = inputs_embeds.masked_scatter(step.latent_mask[..., None], features.to(inputs_embeds.dtype))
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=step.position_ids,
            cache=context.cache,
            use_cache=False,
            routing=step.routing,
            position_embeddings=step.position_embeddings,
            branch_keys=step.branch_keys,
            step_cache=step_cache,
            **kwargs,
        )
        return BagelModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )  # fmt: skip

    def _prefill_context(
        self, input_ids, pixel_values, image_grid_hw, latents, latent_grid_hw, latent_timesteps, context, spans,
        document_ids, noised_latent_images, text_only, **kwargs,
    ) -> BagelModelOutputWithPast:  # fmt: skip
        """
        Row r of `input_ids` is appended to `spans[r]`, all rows in one forward: the rows are laid one after another
        in the cache row, and each token sees its own span's keys and the earlier tokens of its row only. The first
        span may hold keys (then it must be the context's last); the others must be empty: they start new contexts.
        """
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
        if rows > 1 and (document_ids is not None or noised_latent_images is not None):
            raise ValueError("Packed training inputs are prefilled one row at a time.")
        starts = [spans[0].start] + [context.num_keys + row * length for row in range(1, rows)]
        position_ids, key_start = None, starts[0]
        if rows > 1:
            # Each row's own positions (from its span's next position); block ids and experts from the packed row.
            offsets = torch.tensor([span.next_position for span in spans], device=input_ids.device)
            layout = bagel_token_layout(input_ids, self.config, None, offsets, text_only)
            position_ids = layout.position_ids.reshape(1, -1)
            key_start = [start for start in starts for _ in range(length)]
        outputs = self._embed_and_decode(
            input_ids.reshape(1, -1), None, None, position_ids, spans[0].next_position, context.cache, True,
            pixel_values, image_grid_hw, latents, latent_grid_hw, latent_timesteps, document_ids, noised_latent_images,
            text_only, key_start, **kwargs,
        )  # fmt: skip
        context.num_keys += rows * length
        if rows > 1:
            outputs.next_position = layout.next_position
        outputs.context_spans = tuple(
            BagelContextSpan(start, span.length + length, int(position))
            for start, span, position in zip(starts, spans, outputs.next_position.tolist())
        )
        outputs.context_span = outputs.context_spans[0]
        return outputs

    def _denoising_step_inputs(
        self, input_ids, latent_grid_hw, spans, context: BagelContext, grid: tuple[int, int] | None = None
    ) -> "_DenoisingInputs":
        """The step-invariant inputs of denoising rows against `context`, built on the first step of a call and kept by
        the context for the next ones. `grid`: the `(h, w)` of every row when the caller wrote `input_ids` and
        `latent_grid_hw` itself (`predict_velocity`): then nothing is read back from the device to check them."""
        dtype = self.language_model.embed_tokens.weight.dtype
        key = (id(input_ids), id(latent_grid_hw), spans, context.num_keys, input_ids.device, dtype,
               self.config.text_config._attn_implementation)  # fmt: skip
        return context.step_inputs(key, lambda: self._denoising_inputs(input_ids, latent_grid_hw, spans, context, grid))

    def _denoising_inputs(self, input_ids, latent_grid_hw, spans, context, grid=None) -> "_DenoisingInputs":
        """The step-invariant inputs of denoising rows (checked once, then kept by the context; see
        `_denoising_step_inputs`)."""
        config = self.config
        rows, length = input_ids.shape
        if grid is None:
            grids = latent_grid_hw.tolist()  # one read per call, to check what the caller passed
            if len(grids) != rows or any(grid != grids[0] for grid in grids):
                raise ValueError(
                    f"A denoising forward takes one latent image per row, all of one grid: {rows} rows, grids {grids}."
                )
            grid = tuple(grids[0])
            block = torch.tensor(
                [config.start_of_image_token_id] + [config.latent_token_id] * (grid[0] * grid[1])
                + [config.end_of_image_token_id], device=input_ids.device,
            )  # fmt: skip
            if length != grid[0] * grid[1] + 2 or not bool((input_ids == block).all()):
                raise ValueError(
                    "Every row of a denoising forward must be `[<|vision_start|>, h * w latent tokens, "
                    f"<|vision_end|>]` for the grid {grid}."
                )
        num_tokens = grid[0] * grid[1]
        if len(spans) != rows:
            raise ValueError(f"`context_spans` holds {len(spans)} spans for {rows} rows.")
        for span in spans:
            if span.start < 0 or span.end > context.num_keys:
                raise ValueError(f"{span} is outside the context's {context.num_keys} cached keys.")
        self._check_position_limit(max(span.next_position for span in spans))
        device = input_ids.device
        position_ids = torch.tensor([[span.next_position] for span in spans], device=device).expand(rows, length)
        text_model = self.language_model
        shape_only = torch.empty((rows, length, 1), dtype=text_model.embed_tokens.weight.dtype, device=device)
        branch_keys = BranchKeys(spans)
        text_config = config.text_config
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        empty = torch.empty((1, text_config.num_key_value_heads, 0, head_dim), dtype=shape_only.dtype, device=device)
        branch_keys.gather(context.cache, text_config.num_hidden_layers, empty, empty)
        return _DenoisingInputs(
            input_ids=input_ids,
            latent_grid_hw=latent_grid_hw,
            position_ids=position_ids,
            position_embeddings=text_model.rotary_emb(shape_only, position_ids),
            latent_position_ids=grid_position_ids(
                [grid] * rows, config.max_latent_size, config.interpolate_pos, device
            ),
            token_image_index=torch.arange(rows, device=device).repeat_interleave(num_tokens),
            latent_mask=input_ids == config.latent_token_id,
            routing=_LatentBlockRouting(rows_apart=context.batch_invariant),
            branch_keys=branch_keys,
        )


@dataclass
class _DenoisingInputs:
    """What a denoising forward needs besides `latents` and `latent_timesteps`: the same at every step, kept by the
    [`BagelContext`] (the input tensors are held so that the memo key's object ids stay theirs)."""

    input_ids: torch.LongTensor
    latent_grid_hw: torch.LongTensor
    position_ids: torch.LongTensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    latent_position_ids: torch.LongTensor
    token_image_index: torch.LongTensor
    latent_mask: torch.BoolTensor
    routing: ExpertRouting
    branch_keys: BranchKeys


def _normaliser(given, local_count) -> torch.Tensor | int:
    """The count a loss sum is divided by: `given` (a `num_items_in_batch`), else the local count (a mean)."""
    if given is None:
        return local_count
    return given.to(torch.float32) if isinstance(given, torch.Tensor) else float(given)


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
        """Compiles the decoder layers of denoising steps (see [`BagelTextModel.compile_denoising`])."""
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
        context: BagelContext | None = None,
        context_spans: BagelContextSpan | list[BagelContextSpan] | None = None,
        update_cache: bool = True,
        step_cache: BagelStepCache | None = None,
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
        context (`BagelContext`, *optional*), context_spans, update_cache, step_cache:
            Prefill into, or denoise against, contexts packed in one cache (see [`BagelModel.forward`]). A denoising
            forward (`update_cache=False`) returns `velocity` (the flow velocity `llm2vae(h)` of every latent token,
            `(rows * h * w, patch_latent_dim)`, in the order of `latents`) and no logits.
        cache_only (`bool`, defaults to `False`):
            Only fill the cache or `context` (a prefill whose logits are not needed, as a guidance context's): the last
            decoder layer computes its keys and values and nothing after them, and no logits are returned. The cache
            holds exactly what a full forward stores.

        See [`BagelModel.forward`] for the other arguments.
        """
        denoising = context is not None and not update_cache
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
            latents, latent_timesteps, target_tokens, velocity_target = self._noise_targets(
                latents, latent_grid_hw, noised_latent_images, noise, timesteps
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
            context=context,
            context_spans=context_spans,
            update_cache=update_cache,
            step_cache=step_cache,
            document_ids=document_ids,
            noised_latent_images=noised_latent_images,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state

        ce_loss = mse_loss = logits = velocity = None
        if denoising:
            # Rows are checked latent blocks: the latent tokens are everything but the two boundary tokens.
            velocity = self.llm2vae(hidden_states[:, 1:-1]).reshape(-1, self.config.patch_latent_dim)
        elif labels is not None:
            # Only the labelled positions go through the (vocabulary-sized) head.
            shift_labels = labels[:, 1:]
            keep = shift_labels != -100
            if bool(keep.any()):
                logits_kept = self.lm_head(hidden_states[:, :-1][keep])
                ce_loss = nn.functional.cross_entropy(
                    logits_kept.float(), shift_labels[keep].to(logits_kept.device), reduction="sum"
                ) / _normaliser(normalisers.get("ce"), keep.sum())
            else:
                ce_loss = hidden_states.sum() * 0.0
        elif not cache_only:  # a cache-only prefill has no hidden states to read
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, slice_indices, :])
        if training_targets:
            latent_hidden = hidden_states[input_ids == self.config.latent_token_id]
            prediction = self.llm2vae(latent_hidden[target_tokens])
            squared = (prediction.float() - velocity_target.float()).pow(2)
            if normalisers.get("mse") is None:
                mse_loss = squared.mean()
            else:
                mse_loss = squared.mean(-1).sum() / _normaliser(normalisers["mse"], squared.shape[0])

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
            context_span=outputs.context_span,
            context_spans=outputs.context_spans,
            velocity=velocity,
        )

    def _noise_targets(self, latents, latent_grid_hw, noised_latent_images, noise, timesteps):
        """Noises the target images' tokens; returns (x_t tokens, per-image t, target-token mask, velocity target)."""
        config = self.config
        device = latents.device
        lengths = (latent_grid_hw[:, 0] * latent_grid_hw[:, 1]).to(device)
        is_target = noised_latent_images.to(device)
        if is_target.numel() != lengths.numel():
            raise ValueError(
                f"noised_latent_images has {is_target.numel()} entries for {lengths.numel()} latent images."
            )
        num_targets = int(is_target.sum())
        if timesteps is None:
            t = torch.sigmoid(torch.randn(num_targets, device=device))
            shift = config.timestep_shift
            t = shift * t / (1 + (shift - 1) * t)
        else:
            t = torch.as_tensor(timesteps, dtype=torch.float32, device=device).reshape(-1)
            if t.numel() != num_targets or not bool(((t >= 0) & (t <= 1)).all()):  # NaN fails both comparisons
                raise ValueError(f"`timesteps` must hold {num_targets} values in [0, 1] (one per target image).")
        per_image_t = torch.zeros(lengths.numel(), device=device)
        per_image_t[is_target] = t
        token_t = per_image_t.repeat_interleave(lengths)
        target_tokens = is_target.repeat_interleave(lengths)
        clean_targets = latents[target_tokens].float()
        if noise is None:
            packed_noise = torch.randn_like(clean_targets)
        elif isinstance(noise, torch.Tensor) and noise.dim() == 2:
            packed_noise = noise.to(device=device, dtype=torch.float32)
        else:
            target_grids = latent_grid_hw[is_target.to(latent_grid_hw.device)].tolist()
            if len(noise) != num_targets:
                raise ValueError(f"`noise` must hold one tensor per target image ({num_targets}), got {len(noise)}.")
            packed = []
            for tensor, (h, w) in zip(noise, target_grids):
                p = config.latent_patch_size
                expected = (config.latent_channels, h * p, w * p)
                if tuple(tensor.shape) != expected:
                    raise ValueError(f"A target image's noise must have shape {expected}, got {tuple(tensor.shape)}.")
                packed.append(pack_latents(tensor[None].to(device=device, dtype=torch.float32), p)[0])
            packed_noise = torch.cat(packed)
        if packed_noise.shape != clean_targets.shape:
            raise ValueError(f"`noise` packs to {tuple(packed_noise.shape)}, expected {tuple(clean_targets.shape)}.")
        t_targets = token_t[target_tokens][:, None]
        noised = latents.clone()
        noised[target_tokens] = ((1 - t_targets) * clean_targets + t_targets * packed_noise).to(latents.dtype)
        return noised, per_image_t, target_tokens, packed_noise - clean_targets

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
        step_cache: BagelStepCache | None = None,
    ) -> torch.Tensor:
        """
        Flow velocity (`noise - clean` direction) of latent blocks at time `timestep`: a denoising `forward` (see there)
        with the block's token ids built once per context and grid, so that every step passes the same objects and
        the context's step-invariant inputs are reused.

        Args:
            latents (`torch.Tensor` of shape `(rows, h * w, patch_latent_dim)`): packed noisy latents x_t, one row per
                (prompt, guidance branch).
            timestep (`float` or `torch.Tensor` of shape `(rows,)`): flow time t in [0, 1] (1 = noise).
            latent_grid_hw (`tuple[int, int]`): token grid (h, w) of the image.
            context (`BagelContext`): the prefilled contexts.
            context_spans (`list[BagelContextSpan]`): the context of each row (an empty span for no context).
            step_cache (`BagelStepCache`, *optional*): TaylorSeer or another step cache.

        Returns:
            `torch.Tensor` of shape `(rows, h * w, patch_latent_dim)`.
        """
        if latents.dim() != 3:
            raise ValueError(f"`latents` must be (rows, h * w, patch_latent_dim), got shape {tuple(latents.shape)}.")
        rows, num_tokens = latents.shape[:2]
        height, width = (int(side) for side in latent_grid_hw)
        if height * width != num_tokens:
            raise ValueError(f"latents hold {num_tokens} tokens but the grid {height}x{width} needs {height * width}.")
        device = latents.device
        config = self.config

        def block():
            ids = [config.start_of_image_token_id] + [config.latent_token_id] * num_tokens + [config.end_of_image_token_id]
            return (torch.tensor([ids] * rows, device=device), torch.tensor([[height, width]] * rows, device=device))

        input_ids, grid = context.step_inputs(("latent_block", rows, height, width, device), block)
        # The step-invariant inputs from the grid known here, so that no step reads the ids back to check them.
        self.model._denoising_step_inputs(input_ids, grid, tuple(context_spans), context, grid=(height, width))
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(device=device, dtype=torch.float32).reshape(-1)
            if timestep.shape[0] != 1:
                timestep = timestep.expand(rows)
        else:
            # One time for all rows, embedded once. torch.full passes the value to the kernel: no blocking
            # host-to-device copy (torch.tensor would make one).
            timestep = torch.full((1,), float(timestep), device=device)
        output = self(
            input_ids=input_ids,
            latents=latents.reshape(rows * num_tokens, -1),
            latent_grid_hw=grid,
            latent_timesteps=timestep,
            context=context,
            context_spans=list(context_spans),
            update_cache=False,
            step_cache=step_cache,
        )
        return output.velocity.reshape(rows, num_tokens, -1)


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
