"""A freshly built BAGEL follows Qwen2's init rules in the decoder and SigLIP's in the ViT (as transformers' own
models of both do), and from_pretrained never re-initialises loaded weights."""

import math

import pytest
import torch
from transformers import AutoConfig

from transformers_bagel import BagelForConditionalGeneration
from transformers_bagel.modeling_bagel import sincos_2d_position_table


@pytest.fixture(scope="module")
def fresh(converted_dir):
    config = AutoConfig.from_pretrained(converted_dir / "model")
    config.text_config.hidden_size, config.text_config.intermediate_size = 256, 512
    config.text_config.num_hidden_layers = 1
    config.vision_config.hidden_size, config.vision_config.intermediate_size = 128, 512
    config.vision_config.num_hidden_layers = 1
    torch.manual_seed(0)
    return BagelForConditionalGeneration._from_config(config)


def _std(tensor):
    return tensor.detach().float().std().item()


def _close(actual, expected, rel=0.05):
    assert abs(actual - expected) <= rel * expected, f"std {actual:.5f}, rule {expected:.5f}"


def test_decoder_and_connectors_follow_qwen2(fresh):
    std = fresh.config.text_config.initializer_range
    layer = fresh.model.language_model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.q_proj_moe_gen, layer.mlp.down_proj, layer.mlp_moe_gen.up_proj,
                   fresh.model.connector.fc1, fresh.model.vae2llm, fresh.llm2vae, fresh.lm_head):  # fmt: skip
        _close(_std(linear.weight), std)
        if linear.bias is not None:
            assert torch.count_nonzero(linear.bias) == 0
    _close(_std(fresh.model.language_model.embed_tokens.weight), std)
    for norm in (layer.input_layernorm, layer.input_layernorm_moe_gen, fresh.model.language_model.norm_moe_gen):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_latent_position_table_is_the_fixed_sincos_table(fresh):
    table = fresh.model.latent_pos_embed
    assert torch.equal(table.pos_embed, sincos_2d_position_table(table.hidden_size, table.side).to(table.pos_embed.dtype))


def test_vision_tower_follows_siglip(fresh):
    vision = fresh.model.vision_model
    hidden = vision.config.hidden_size
    _close(_std(vision.embeddings.position_embedding.weight), hidden**-0.5)
    patch = vision.embeddings.patch_embedding
    # transformers' lecun_normal_ (SigLIP's rule for its patch embedding and plain linear layers): a normal of std
    # sqrt(1 / fan_in) / 0.8796 truncated at +-2.
    _close(_std(patch.weight), math.sqrt(1 / patch.in_features) / 0.87962566103423978)
    assert torch.count_nonzero(patch.bias) == 0
    layer = vision.encoder.layers[0]
    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.out_proj):
        _close(_std(proj.weight), math.sqrt(2 / (proj.in_features + proj.out_features)))  # Xavier uniform
        assert torch.count_nonzero(proj.bias) == 0
    for fc in (layer.mlp.fc1, layer.mlp.fc2):
        _close(_std(fc.weight), math.sqrt(2 / (fc.in_features + fc.out_features)))
        assert 0 < _std(fc.bias) < 1e-5
    for norm in (layer.layer_norm1, vision.post_layernorm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.count_nonzero(norm.bias) == 0


def test_loaded_weights_are_not_reinitialised(converted_dir):
    from safetensors.torch import load_file

    loaded = BagelForConditionalGeneration.from_pretrained(converted_dir / "model")
    saved = {}
    for shard in sorted((converted_dir / "model").glob("*.safetensors")):
        saved.update(load_file(shard))
    state = loaded.state_dict()
    for name in ("model.vision_model.embeddings.position_embedding.weight",
                 "model.vision_model.encoder.layers.0.mlp.fc1.bias", "model.language_model.layers.0.mlp.up_proj.weight"):  # fmt: skip
        assert torch.equal(state[name], saved[name].to(state[name].dtype)), name
