"""BAGEL-7B's decoding and denoising steps run on fake tensors (torch's FakeTensorMode: shapes, dtypes and storage
sizes, no data): a step reads nothing back from the device, so on a GPU it never waits for the host (no
synchronisation per generated token or per denoising step, and CUDA graphs can capture it), and the full-size model is
analysed on any machine. Whatever a step needs to know (the grid, the spans, the positions) comes from the host; a
step that read a value would raise `DataDependentOutputException` here. The FLOPs counted on the fake step equal the
count derived from the configuration's sizes."""

import sys

import pytest
import torch
from conftest import ROOT
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from transformers.cache_utils import DynamicCache

from transformers_bagel import BagelConfig, BagelContext, BagelForConditionalGeneration
from transformers_bagel.context_bagel import BagelContextSpan


# The benchmark's FLOP formula of the CPU's fused attention kernel (FlopCounterMode has none; counted as the CUDA ones)
sys.path.insert(0, str(ROOT / "examples"))
from benchmarking.flops import SDPA_ON_CPU  # noqa: E402


@pytest.fixture(scope="module")
def fake_7b():
    """BAGEL-7B-MoT's configuration in bfloat16 with fake weights (built on the meta device, then made fake)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    config = BagelConfig()
    with torch.device("meta"):
        model = BagelForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    with mode:
        model.to_empty(device="cpu")
    return model.eval(), mode


def _filled_cache(config, mode, rows: int, length: int) -> DynamicCache:
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    cache = DynamicCache(config=text)
    with mode:
        for layer in range(text.num_hidden_layers):
            keys = torch.empty(rows, text.num_key_value_heads, length, head_dim, dtype=torch.bfloat16)
            cache.update(keys, torch.empty_like(keys), layer)
    return cache


def _per_token_flops(model, expert: str) -> int:
    """2 x the decoder weights one token of `expert` ("und" or "gen") passes through (linear layers only)."""
    total = 0
    for name, module in model.model.language_model.layers.named_modules():
        if isinstance(module, torch.nn.Linear) and ("_moe_gen" in name) == (expert == "gen"):
            total += module.weight.numel()
    return 2 * total


def test_7b_decoding_step_reads_nothing_from_the_device(fake_7b):
    model, mode = fake_7b
    config = model.config
    text = config.text_config
    cached = 300
    for rows, mask in ((1, False), (2, True)):  # one sequence; two left-padded ones (a batched `generate`)
        cache = _filled_cache(config, mode, rows, cached)
        with mode, torch.no_grad():
            inputs = {"input_ids": torch.zeros(rows, 1, dtype=torch.long),
                      "position_ids": torch.full((rows, 1), cached)}  # fmt: skip
            if mask:
                inputs["attention_mask"] = torch.ones(rows, cached + 1, dtype=torch.long)
            counter = FlopCounterMode(display=False, custom_mapping=SDPA_ON_CPU)
            with counter:
                # what `generate` passes after the prompt (the sampled token is text, whatever its id)
                output = model(**inputs, cache=cache, use_cache=True, text_only=True, logits_to_keep=1)
        assert output.logits.shape == (rows, 1, text.vocab_size)
        assert output.cache.get_seq_length() == cached + 1
        head_dim = text.hidden_size // text.num_attention_heads
        attention = 4 * text.num_attention_heads * head_dim * (cached + 1) * text.num_hidden_layers
        expected = rows * (_per_token_flops(model, "und") + 2 * model.lm_head.weight.numel() + attention)
        assert counter.get_total_flops() == expected


def test_7b_denoising_step_reads_nothing_from_the_device(fake_7b):
    model, mode = fake_7b
    config = model.config
    text = config.text_config
    context = BagelContext(_filled_cache(config, mode, 1, 9037 + 37))
    context.num_keys = 9037 + 37
    # an edit's three branches at 1024x1024: the full context, the no-text context (its prefix), the no-image one
    spans = [BagelContextSpan(0, 9037, 8), BagelContextSpan(0, 9000, 6), BagelContextSpan(9037, 37, 1)]
    grid = (64, 64)
    with mode, torch.no_grad():
        x = torch.randn(3, grid[0] * grid[1], config.patch_latent_dim, dtype=torch.bfloat16)
        model.predict_velocity(x, 1.0, grid, context, spans)  # the first step builds the step-invariant inputs
        counter = FlopCounterMode(display=False, custom_mapping=SDPA_ON_CPU)
        with counter:
            velocity = model.predict_velocity(x, 0.98, grid, context, spans)
    assert velocity.shape == x.shape
    block = grid[0] * grid[1] + 2
    head_dim = text.hidden_size // text.num_attention_heads
    attention = sum(4 * text.num_attention_heads * head_dim * block * (span.length + block) for span in spans)
    latent_heads = 2 * (model.model.vae2llm.weight.numel() + model.llm2vae.weight.numel())
    expected = 3 * (
        grid[0] * grid[1] * (_per_token_flops(model, "gen") + latent_heads) + 2 * _per_token_flops(model, "und")
    ) + attention * text.num_hidden_layers
    # besides the decoder: the flow-time embedding of one 4-row block, once per step
    time_mlp = 2 * 4 * sum(layer.weight.numel() for layer in model.model.time_embedder.mlp if hasattr(layer, "weight"))
    assert counter.get_total_flops() == expected + time_mlp
