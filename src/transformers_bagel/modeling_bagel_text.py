"""BAGEL's Mixture-of-Transformer-Experts text decoder: understanding tokens (text, ViT patches) and generation tokens
(VAE latents) share every attention but each has its own projections, norms and MLP."""

import contextlib
import os
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.distributed.utils import is_dtensor
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import capture_outputs

from .checkpoint_files import check_weight_files, is_pipeline_root, local_folder
from .configuration_bagel import BagelConfig, BagelTextConfig
from .context_bagel import BranchKeys
from .masking_bagel import text_attention_mask
from .modeling_bagel_embeddings import BagelPositionEmbedding, sincos_2d_position_table
from .modeling_bagel_vision import in_tree_initialize_weights


logger = logging.get_logger(__name__)

__all__ = [
    "BagelAttention",
    "BagelDecoderLayer",
    "BagelDecoderLayers",
    "BagelPreTrainedModel",
    "BagelTextModel",
    "ExpertRouting",
    "check_tensor_parallel_size",
]


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


def check_tensor_parallel_size(config: BagelTextConfig, tp_size: int) -> None:
    """Refuses a tensor-parallel size that does not divide the decoder's key/value heads: every process must hold
    whole heads (its queries' key/value heads among them, and the per-head q/k RMSNorm)."""
    if config.num_key_value_heads % tp_size:
        divisors = [n for n in range(1, config.num_key_value_heads + 1) if config.num_key_value_heads % n == 0]
        raise ValueError(
            f"Tensor parallelism over {tp_size} processes would split BAGEL's attention heads: the decoder has "
            f"{config.num_key_value_heads} key/value heads ({config.num_attention_heads} query heads), so the number "
            f"of processes must divide {config.num_key_value_heads} (one of {divisors})."
        )


def _check_cache_only(cache: Cache | None, denoising: bool, kwargs: dict) -> None:
    """Refuses `cache_only=True` where there is no cache to fill or an output is asked for."""
    if denoising:
        raise ValueError("`cache_only=True` is for prefills; a denoising forward stores nothing in the cache.")
    if cache is None:
        raise ValueError("`cache_only=True` needs a cache to fill: pass `cache` (or `use_cache=True`) or a `context`.")
    asked = [name for name in ("output_hidden_states", "output_attentions") if kwargs.get(name)]
    if asked:
        raise ValueError(f"`cache_only=True` computes no hidden states or attentions, but {asked[0]}=True was passed.")


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


class BagelDecoderLayers(nn.ModuleList):
    """
    The decoder's layer stack as one module (its state-dict keys are a plain `ModuleList`'s: `layers.0.…`). Its
    forward runs every layer; a step cache put on it as a diffusers hook (the pipeline's TaylorSeer) may return its
    output without running them. `compile_denoising` compiles the stack of denoising forwards.
    """

    def __init__(self, config: BagelTextConfig):
        super().__init__([BagelDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self._compiled_denoising = None

    def run_layers(
        self,
        hidden_states: torch.Tensor,
        routing: ExpertRouting,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        branch_keys: BranchKeys | None = None,
        cache_only: bool = False,
        **kwargs,
    ) -> torch.Tensor | None:
        """Every layer, eagerly. With `cache_only`, the last layer only computes its keys and values and None is
        returned."""
        for index, decoder_layer in enumerate(self):
            hidden_states = decoder_layer(
                hidden_states,
                routing,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                cache=cache,
                branch_keys=branch_keys,
                keys_values_only=cache_only and index == len(self) - 1,
                **kwargs,
            )
        return hidden_states

    def forward(self, hidden_states: torch.Tensor, routing: ExpertRouting, **kwargs) -> torch.Tensor | None:
        """The layer stack (see [`~BagelDecoderLayers.run_layers`]); a denoising forward (`branch_keys`) runs the
        compiled stack once `compile_denoising` was called."""
        if kwargs.get("branch_keys") is not None and self._compiled_denoising is not None:
            return self._compiled_denoising(hidden_states, routing, **kwargs)
        return self.run_layers(hidden_states, routing, **kwargs)

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
        self._compiled_denoising = torch.compile(self.run_layers, **options)


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

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        """[`~PreTrainedModel.maybe_distribute_model`], refusing before any weight is read a tensor-parallel size
        that would split an attention head across processes (the key/value heads must divide by it)."""
        if distributed_config is not None and mesh_manager is not None and distributed_config.tp_size > 1:
            check_tensor_parallel_size(model.config.get_text_config(), distributed_config.tp_size)
        return super().maybe_distribute_model(model, distributed_config, mesh_manager)


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
        self.layers = BagelDecoderLayers(config)
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self._checked_flex_on_cpu = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def key_value_heads_per_rank(self) -> int:
        """The key/value heads this process computes and caches: `config.num_key_value_heads`, or its share of them
        when the decoder is tensor-parallel (`k_proj` split by output features into whole heads, see
        `BagelTextConfig.base_model_tp_plan`)."""
        weight = self.layers[0].self_attn.k_proj.weight
        if is_dtensor(weight):
            return weight.to_local().shape[0] // self.layers[0].self_attn.head_dim
        return self.config.num_key_value_heads

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

    def compile_denoising(self, **compile_kwargs) -> None:
        """Compiles the layer stack of denoising forwards (see [`BagelDecoderLayers.compile_denoising`])."""
        self.layers.compile_denoising(**compile_kwargs)

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
            _check_cache_only(cache, branch_keys is not None, kwargs)
        if isinstance(key_start, list) and len(key_start) != inputs_embeds.shape[1]:
            raise ValueError(f"`key_start` lists {len(key_start)} first keys for {inputs_embeds.shape[1]} new tokens.")
        if branch_keys is None:
            causal_mask, attention_kwargs = text_attention_mask(
                self.config, inputs_embeds, attention_mask, cache, block_ids, and_mask_function, key_start
            )
            kwargs.update(attention_kwargs)
        else:
            causal_mask = None  # every row's keys are chosen by `branch_keys`
        if position_ids is None:
            past_seen = int(cache.get_seq_length()) if cache is not None else 0
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
        hidden_states = self.layers(
            hidden_states,
            routing,
            attention_mask=causal_mask,
            position_embeddings=position_embeddings,
            cache=cache,
            branch_keys=branch_keys,
            cache_only=cache_only,
            **kwargs,
        )
        if cache_only:
            return BaseModelOutputWithPast(last_hidden_state=None, cache=cache)
        hidden_states = routing(hidden_states, self.norm, self.norm_moe_gen)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache if use_cache else None
        )
