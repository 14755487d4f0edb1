"""FLOPs of BAGEL: per-token FLOPs from a configuration's weight shapes, and FLOPs counted by `FlopCounterMode`."""

from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from transformers_bagel import BagelForConditionalGeneration


__all__ = ["SDPA_ON_CPU", "FlopModel", "count_flops", "count_model"]


@dataclass
class FlopModel:
    """Per-token FLOPs of each path, from the model's weight shapes (2 FLOPs per multiply-add)."""

    gen_token: float  # one latent token through the generation expert of every layer (+ vae2llm, llm2vae)
    und_token: float  # one text / ViT token through the understanding expert of every layer
    lm_head: float  # one token's logits
    vit_patch: float  # one patch through the ViT (+ patch embedding, connector), attention excluded
    attn_per_key: float  # decoder attention, per (query, key) pair, all layers: 4 * heads * head_dim * layers
    vit_attn_per_key: float  # the same for the ViT
    params: dict = field(default_factory=dict)


def _linear_params(modules) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in modules)


def count_model(model: BagelForConditionalGeneration) -> FlopModel:
    """Parameter counts by part and per-token FLOPs (works on the meta device)."""
    lm = model.model.language_model
    gen_linear = und_linear = 0
    for layer in lm.layers:
        attn = layer.self_attn
        und_linear += _linear_params([attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj])
        und_linear += _linear_params([layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj])
        gen_mlp = layer.mlp_moe_gen
        gen_attn = [attn.q_proj_moe_gen, attn.k_proj_moe_gen, attn.v_proj_moe_gen, attn.o_proj_moe_gen]
        gen_linear += _linear_params(gen_attn)
        gen_linear += _linear_params([gen_mlp.gate_proj, gen_mlp.up_proj, gen_mlp.down_proj])
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vision = model.config.vision_config
    vit_linear = sum(
        p.numel()
        for n, p in model.model.vision_model.named_parameters()
        if n.endswith("weight") and p.dim() == 2 and "position" not in n
    )
    connector = _linear_params([model.model.connector.fc1, model.model.connector.fc2])
    latent_io = _linear_params([model.model.vae2llm, model.llm2vae])

    def numel(prefixes):
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))

    layers_all = numel("model.language_model.layers.")
    gen_layers = sum(p.numel() for n, p in lm.layers.named_parameters() if "_moe_gen" in n)
    gen_all = gen_layers + lm.norm_moe_gen.weight.numel()
    und_all = layers_all - gen_layers + lm.norm.weight.numel()
    embeddings = lm.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    params = {
        "total": sum(p.numel() for p in model.parameters()),
        "decoder_understanding_expert": und_all,
        "decoder_generation_expert": gen_all,
        "embed_tokens_and_lm_head": embeddings,
        "vit": numel("model.vision_model."),
        "connector_heads_tables": numel(("model.connector.", "model.vae2llm.", "llm2vae.", "model.time_embedder.",
                                         "model.latent_pos_embed.", "model.vit_pos_embed.")),
        # What one token touches: one expert of the decoder, plus the embedding table and the LM head (as the
        # published "7B active" counts Qwen2.5-7B).
        "active_per_token": und_all + embeddings,
    }
    return FlopModel(
        gen_token=2.0 * (gen_linear + latent_io),
        und_token=2.0 * und_linear,
        lm_head=2.0 * model.lm_head.weight.numel(),
        vit_patch=2.0 * (vit_linear + connector),
        attn_per_key=4.0 * text.num_attention_heads * head_dim * text.num_hidden_layers,
        vit_attn_per_key=4.0 * vision.hidden_size * vision.num_hidden_layers,
        params=params,
    )


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


SDPA_ON_CPU = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}
"""`FlopCounterMode(custom_mapping=SDPA_ON_CPU)` counts the CPU's fused SDPA kernel, which it has no formula for, as it
counts the CUDA ones (every (query, key) pair the kernel computes)."""


def count_flops(model: BagelForConditionalGeneration, fn):
    """(the result of `fn()`, the FLOPs it ran), counted by `FlopCounterMode` at the real shapes. Compiled code runs
    eagerly under the counter, so that every op is seen (FLOPs do not depend on compilation). FlopCounterMode cannot
    run flex_attention (a higher-order op, pytorch/pytorch#134385): a flex_attention model is counted on sdpa, whose
    kernels compute the same (query, key) pairs."""
    implementation = model.config.text_config._attn_implementation
    if implementation == "flex_attention":
        model.set_attn_implementation("sdpa")
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_ON_CPU)
    try:
        with torch.compiler.set_stance("force_eager"), counter:
            result = fn()
    finally:
        if implementation == "flex_attention":
            model.set_attn_implementation(implementation)
    return result, counter.get_total_flops()
