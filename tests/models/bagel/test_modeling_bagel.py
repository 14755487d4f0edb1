"""The MoT model against the original implementation's outputs, and its structural guarantees."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ORIGINAL_DIR, assert_close_rel, check_rows_prefilled_together, load_expected, mixed_inputs, with_attn
from transformers_bagel import BagelContext
from transformers_bagel.configuration_bagel import BagelConfig
from transformers_bagel.convert_bagel_to_hf import convert_key, load_original_model
from transformers_bagel.modeling_bagel import BagelForConditionalGeneration, bagel_token_layout


ATTN_IMPLEMENTATIONS = ["eager", "sdpa", "flex_attention"]


@pytest.fixture()
def static_flex():
    # CPU inductor fails to build flex_attention kernels once dynamo switches to dynamic shapes (torch 2.13): keep
    # every shape static in tests.
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, cache_size_limit=64):
        yield


# -- fidelity to the original -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ATTN_IMPLEMENTATIONS)
def test_text_prefill_logits_match_original(original_model, implementation, static_flex, no_grad):
    model, _ = original_model
    _, expected = load_expected("a_text_logits")
    out = with_attn(model, implementation)(input_ids=expected["input_ids"][None])
    assert_close_rel(out.logits[0], expected["logits"], 1e-4)
    layout = bagel_token_layout(expected["input_ids"][None], model.config)
    assert torch.equal(layout.position_ids[0], expected["position_ids"])


def test_greedy_generate_matches_original(original_model, no_grad):
    model, _ = original_model
    meta, expected = load_expected("a_text_logits")
    prompt = torch.cat([expected["input_ids"], torch.tensor([meta["new_token_ids"]["bos_token_id"]])])[None]
    out = with_attn(model, "sdpa").generate(
        prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    # The original returns the start token followed by 7 generated tokens; step i's logits pick token i + 1.
    assert out.sequences[0, prompt.shape[1] - 1 : prompt.shape[1] + 7].tolist() == expected["greedy_token_ids"].tolist()
    for step, logits in enumerate(out.logits):
        assert_close_rel(logits[0], expected["greedy_step_logits"][step], 1e-4)


def test_sampled_image_tokens_are_decoded_as_text(original_model, no_grad):
    """A sampled `<|image_pad|>` / `<|vision_start|>` is a text token (the original embeds every sampled id as text):
    generation goes on, each token advances the position, and the logits equal one text-only forward."""
    model, _ = original_model
    config = model.config
    with_attn(model, "sdpa")
    inputs = mixed_inputs(config)
    forced = [config.image_token_id, config.start_of_image_token_id, config.image_token_id, config.latent_token_id]
    prompt_len = inputs["input_ids"].shape[1]
    # A logits bias that overwhelms the model's own preference forces the sampled token.
    out = model.generate(
        **inputs, max_new_tokens=4, do_sample=False, sequence_bias={(config.image_token_id,): 1e4},
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    generated = out.sequences[0, prompt_len:].tolist()
    assert generated == [config.image_token_id] * 4
    # Reference: the prompt with its images, then the sampled ids read as text with positions advancing by one.
    context = model.model(**inputs, use_cache=True)
    position = int(context.next_position[0])
    tail = torch.tensor([generated[:3]])
    reference = model(
        input_ids=tail, cache=context.cache, text_only=True,
        position_ids=torch.arange(position, position + 3)[None],
    ).logits  # fmt: skip
    for step in range(1, 4):
        assert_close_rel(out.logits[step][0], reference[0, step - 1], 1e-4)
    layout = bagel_token_layout(torch.tensor([forced]), config, position_offset=5, text_only=True)
    assert layout.position_ids.tolist() == [[5, 6, 7, 8]] and not layout.gen_token_mask.any()
    assert (layout.block_ids == -1).all() and layout.next_position.tolist() == [9]
    with pytest.raises(ValueError, match="text_only"):
        model(**inputs, text_only=True)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_velocity_matches_original(original_model, implementation, no_grad):
    model, tokenizer = original_model
    meta, expected = load_expected("c_velocity")
    with_attn(model, implementation)
    ids = [meta["new_token_ids"]["bos_token_id"]] if "new_token_ids" in meta else [401]
    ids = ids + tokenizer.encode(meta["prompt"]) + [402]
    context = BagelContext()
    span = model.model.prefill_context(torch.tensor([ids]), context, context.new_span()).context_span
    assert context.cache.get_seq_length() == context.num_keys == span.length == meta["kv_lens"][0]
    assert [span.next_position] == meta["ropes"]
    x_t = expected["x_t"][None]
    grid = (meta["image_hw"][0] // 16, meta["image_hw"][1] // 16)
    v_cond = model.predict_velocity(x_t, meta["t"], grid, context, [span])
    assert_close_rel(v_cond[0], expected["v_cond"], 1e-4)
    v_uncond = model.predict_velocity(x_t, meta["t"], grid, context, [context.new_span()])
    assert_close_rel(v_uncond[0], expected["v_uncond_text"], 1e-4)
    assert context.cache.get_seq_length() == meta["kv_lens"][0], "a velocity step must not grow the cache"


def test_packed_contexts_equal_single_contexts(original_model, no_grad):
    """Contexts of different lengths packed in one cache row, one denoising row per context (and a prefix span of
    the first): each row equals the same context prefilled and denoised alone, and nothing is padded."""
    model, tokenizer = original_model
    meta, expected = load_expected("c_velocity")
    with_attn(model, "sdpa")
    ids = [401] + tokenizer.encode(meta["prompt"]) + [402]
    short = [401] + tokenizer.encode("a dog") + [402]
    context = BagelContext()
    first = model.prefill_context(torch.tensor([ids[:4]]), context, context.new_span()).context_span
    full = model.prefill_context(torch.tensor([ids[4:]]), context, first).context_span
    second = model.prefill_context(torch.tensor([short]), context, context.new_span()).context_span
    assert (first.start, first.length, full.length, second.start, second.length) == (0, 4, len(ids), len(ids), len(short))
    assert context.num_keys == context.cache.get_seq_length() == len(ids) + len(short)
    assert (full.next_position, second.next_position) == (len(ids), len(short))
    with pytest.raises(ValueError, match="Only the last context"):
        model.prefill_context(torch.tensor([short]), context, full)
    x_t = expected["x_t"][None].expand(4, -1, -1)
    spans = [full, second, context.new_span(), first]
    packed = model.predict_velocity(x_t, 0.7, (4, 6), context, spans)
    assert (packed[0] - expected["v_cond"]).abs().max() < 1e-5
    assert (packed[2] - expected["v_uncond_text"]).abs().max() < 1e-5
    for row, tokens in ((1, short), (3, ids[:4])):
        alone = BagelContext()
        span = model.prefill_context(torch.tensor([tokens]), alone, alone.new_span()).context_span
        assert (packed[row] - model.predict_velocity(x_t[:1], 0.7, (4, 6), alone, [span])[0]).abs().max() < 1e-5


# -- attention structure ------------------------------------------------------------------------------------------------


def test_attention_implementations_agree_on_mixed_sequence(original_model, static_flex, no_grad):
    model, _ = original_model
    inputs = mixed_inputs(model.config)
    outputs = {impl: with_attn(model, impl)(**inputs).logits for impl in ATTN_IMPLEMENTATIONS}
    assert (outputs["eager"] - outputs["sdpa"]).abs().max() < 1e-5
    assert (outputs["eager"] - outputs["flex_attention"]).abs().max() < 1e-5


def test_attention_implementations_agree_on_packed_contexts_and_denoising(original_model, static_flex, no_grad):
    """Prefill into one packed cache row (a context with images, then a second context isolated from it) and
    denoising rows against spans of it: eager, sdpa and flex_attention agree."""
    model, _ = original_model
    inputs = mixed_inputs(model.config)
    x_t = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(5))
    velocities = {}
    for implementation in ATTN_IMPLEMENTATIONS:
        with_attn(model, implementation)
        context = BagelContext()
        first = model.prefill_context(**inputs, context=context, context_spans=context.new_span()).context_span
        second = model.prefill_context(torch.tensor([[401, 60, 61, 402]]), context, context.new_span()).context_span
        velocities[implementation] = model.predict_velocity(x_t, 0.6, (2, 2), context, [first, second, context.new_span()])
    with_attn(model, "sdpa")
    assert (velocities["eager"] - velocities["sdpa"]).abs().max() < 1e-5
    assert (velocities["eager"] - velocities["flex_attention"]).abs().max() < 1e-5


@pytest.mark.parametrize("implementation", ATTN_IMPLEMENTATIONS)
def test_text_causal_and_image_blocks_bidirectional(original_model, implementation, static_flex, no_grad):
    model, _ = original_model
    with_attn(model, implementation)
    config = model.config
    inputs = mixed_inputs(config)
    base = model(**inputs).logits[0]
    vit_start = 4  # index of <|vision_start|> of the ViT block (6 patches at 5..10, <|vision_end|> at 11)

    # Changing the last text token changes nothing before it: text is causal.
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][0, -1] = 77
    out = model(**changed).logits[0]
    assert torch.equal(out[:-1], base[:-1]) or (out[:-1] - base[:-1]).abs().max() < 1e-6
    assert (out[-1] - base[-1]).abs().max() > 1e-3

    # Changing the last ViT patch changes the first patch and the start token of the same block (bidirectional),
    # but nothing before the block.
    pixels = inputs["pixel_values"].clone()
    pixels[-1] += 1.0
    out = model(**dict(inputs, pixel_values=pixels)).logits[0]
    assert (out[:vit_start] - base[:vit_start]).abs().max() < 1e-6
    assert (out[vit_start] - base[vit_start]).abs().max() > 1e-4
    assert (out[vit_start + 1] - base[vit_start + 1]).abs().max() > 1e-4


def test_position_ids_share_one_position_per_image_block(original_model):
    model, _ = original_model
    inputs = mixed_inputs(model.config)
    layout = bagel_token_layout(inputs["input_ids"], model.config)
    expected = [0, 1, 2, 3] + [4] * 8 + [5, 6, 7, 8, 9] + [10] * 6 + [11, 12, 13]
    assert layout.position_ids[0].tolist() == expected
    assert layout.next_position.tolist() == [14]
    assert layout.gen_token_mask[0].nonzero().squeeze(1).tolist() == [18, 19, 20, 21]
    # left padding does not advance positions
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), inputs["input_ids"]], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(inputs["input_ids"])], 1)
    layout = bagel_token_layout(padded, model.config, mask)
    assert layout.position_ids[0, 3:].tolist() == expected


def test_generation_expert_only_sees_latent_tokens(original_model, no_grad):
    """Perturbing every *_moe_gen weight changes latent tokens' outputs but leaves a text+ViT sequence untouched."""
    model, _ = original_model
    with_attn(model, "sdpa")
    inputs = mixed_inputs(model.config)
    text_vit = {k: inputs[k] for k in ("pixel_values", "image_grid_hw")}
    text_vit["input_ids"] = inputs["input_ids"][:, :16]
    before_und = model(**text_vit).logits
    before_mixed = model(**inputs).logits
    saved = {n: p.clone() for n, p in model.named_parameters() if "moe_gen" in n}
    try:
        for name, param in model.named_parameters():
            if "moe_gen" in name:
                param.add_(0.05)
        assert torch.equal(model(**text_vit).logits, before_und)
        assert (model(**inputs).logits[0, 18:] - before_mixed[0, 18:]).abs().max() > 1e-4
    finally:
        for name, param in model.named_parameters():
            if name in saved:
                param.copy_(saved[name])


# -- conversion and serialisation ---------------------------------------------------------------------------------------


def test_every_original_tensor_maps_to_exactly_one_tensor_bit_exact(original_model):
    model, _ = original_model
    original = load_file(str(ORIGINAL_DIR / "ema.safetensors"))
    converted = model.state_dict()
    mapped = {convert_key(key): key for key in original}
    assert len(mapped) == len(original) == len(converted) == 111
    assert set(mapped) == set(converted)
    for new_key, old_key in mapped.items():
        assert converted[new_key].dtype == original[old_key].dtype
        assert torch.equal(converted[new_key], original[old_key]), new_key


def test_save_and_reload_gives_identical_outputs(original_model, tmp_path, no_grad):
    model, _ = original_model
    with_attn(model, "sdpa")
    inputs = mixed_inputs(model.config)
    model.save_pretrained(tmp_path, max_shard_size="500KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1, "expected a sharded checkpoint"
    reloaded = BagelForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def _copy_original(tmp_path):
    target = tmp_path / "orig"
    shutil.copytree(ORIGINAL_DIR, target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def test_converter_refuses_missing_and_unexpected_tensors(tmp_path):
    target = _copy_original(tmp_path)
    tensors = load_file(str(target / "ema.safetensors"))
    tensors.pop("language_model.model.layers.0.mlp_moe_gen.up_proj.weight")
    save_file(tensors, str(target / "ema.safetensors"))
    with pytest.raises(ValueError, match=r"Missing tensors: \['model.language_model.layers.0.mlp_moe_gen.up_proj"):
        load_original_model(target)
    tensors = load_file(str(ORIGINAL_DIR / "ema.safetensors"))
    tensors["vit_model.vision_model.head.probe"] = torch.zeros(1)
    save_file(tensors, str(target / "ema.safetensors"))
    with pytest.raises(ValueError, match=r"Unexpected tensors: \['vit_model.vision_model.head.probe'\]"):
        load_original_model(target)
    tensors = load_file(str(ORIGINAL_DIR / "ema.safetensors"))
    tensors["mystery.weight"] = torch.zeros(1)
    save_file(tensors, str(target / "ema.safetensors"))
    with pytest.raises(ValueError, match="mystery.weight"):
        load_original_model(target)


def test_converter_refuses_corrupted_checkpoint(tmp_path):
    target = _copy_original(tmp_path)
    data = (target / "ema.safetensors").read_bytes()
    (target / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_original_model(target)


def test_converter_refuses_wrong_shapes(tmp_path):
    target = _copy_original(tmp_path)
    (target / "llm_config.json").write_text(
        (ORIGINAL_DIR / "llm_config.json").read_text().replace('"intermediate_size": 128', '"intermediate_size": 96')
    )
    with pytest.raises(ValueError, match="shapes do not match"):
        load_original_model(target)


# -- input validation ---------------------------------------------------------------------------------------------------


def test_placeholder_count_must_match_images(original_model, no_grad):
    model, _ = original_model
    inputs = mixed_inputs(model.config)
    with pytest.raises(ValueError, match=r"1 image blocks of \[6\] placeholder tokens .* 1 images of \[5\] tokens"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"][:5], image_grid_hw=torch.tensor([[1, 5]])))
    # The same number of patches as two images: every count matches in total, but not image by image.
    assert inputs["image_grid_hw"].prod(-1).tolist() == [6]
    with pytest.raises(ValueError, match=r"1 image blocks of \[6\] .* `image_grid_hw` describes 2 images of \[3, 3\]"):
        model(**dict(inputs, image_grid_hw=torch.tensor([[1, 3], [1, 3]])))
    with pytest.raises(ValueError, match=r"`latent_grid_hw` describes 2 latent images of \[2, 2\]"):
        model(**dict(inputs, latent_grid_hw=torch.tensor([[1, 2], [2, 1]])))
    poisoned = inputs["pixel_values"].clone()
    poisoned[3, 7] = float("nan")
    with pytest.raises(ValueError, match="`pixel_values` hold NaN or infinite values"):
        model(**dict(inputs, pixel_values=poisoned))
    with pytest.raises(ValueError, match="image_grid_hw describes"):
        model(**dict(inputs, image_grid_hw=torch.tensor([[2, 2]])))
    with pytest.raises(ValueError, match="no `pixel_values`"):
        model(input_ids=inputs["input_ids"][:, :16])
    with pytest.raises(ValueError, match="no `latents`"):
        model(**{k: v for k, v in inputs.items() if k not in ("latents", "latent_grid_hw")})


def test_images_too_large_for_position_tables_are_refused(original_model, no_grad):
    model, _ = original_model
    config = model.config
    side = config.max_latent_size + 1
    ids = [config.start_of_image_token_id] + [config.latent_token_id] * side + [config.end_of_image_token_id]
    with pytest.raises(ValueError, match=r"does not fit the 16x16 position table"):
        model(
            input_ids=torch.tensor([ids]),
            latents=torch.zeros(side, config.patch_latent_dim),
            latent_grid_hw=torch.tensor([[1, side]]),
        )


def test_prompt_longer_than_position_limit_is_refused(original_model, no_grad):
    model, _ = original_model
    limit = model.config.text_config.max_position_embeddings
    model.config.text_config.max_position_embeddings = 10
    try:
        with pytest.raises(ValueError, match="beyond the model's limit of 10 positions"):
            model(input_ids=torch.arange(20, 32)[None])
    finally:
        model.config.text_config.max_position_embeddings = limit


def test_config_refuses_inconsistent_values():
    with pytest.raises(ValueError, match="BagelConfig.connector_act"):
        BagelConfig(connector_act="not-an-activation")
    with pytest.raises(ValueError, match="BagelConfig.vit_max_num_patch_per_side"):
        BagelConfig(vit_max_num_patch_per_side=64)
    with pytest.raises(ValueError, match="BagelConfig.latent_token_id"):
        BagelConfig(latent_token_id=10**7)
    with pytest.raises(ValueError, match="BagelConfig.latent_token_id=151654 is invalid: must differ from image_token_id"):
        BagelConfig(image_token_id=151654)
    with pytest.raises(ValueError, match="BagelConfig.max_latent_size"):
        BagelConfig(max_latent_size=0)
    # negative or zero sizes are named before they reach torch (a negative width used to read as a head-count error)
    for section, field, value in (("text_config", "hidden_size", -64), ("text_config", "num_hidden_layers", 0),
                                  ("vision_config", "patch_size", -14), ("text_config", "vocab_size", 0)):  # fmt: skip
        with pytest.raises(ValueError, match=f"BagelConfig.{section}.{field}={value} is invalid: must be a positive"):
            BagelConfig(**{section: {field: value}})
    config = BagelConfig()
    assert config.max_image_size == 1024 and config.patch_latent_dim == 64 and config.latent_downsample == 16
    assert config.vision_config.num_hidden_layers == 26


def test_position_tables_stay_fixed_after_from_pretrained(converted_dir):
    """The sin-cos tables are buffers: saved under the release's keys, loaded with their values, never trainable."""
    model = BagelForConditionalGeneration.from_pretrained(converted_dir / "model")
    names = {name for name, _ in model.named_parameters()}
    assert not any(name.endswith("pos_embed") for name in names)
    state = model.state_dict()
    assert {"model.vit_pos_embed.pos_embed", "model.latent_pos_embed.pos_embed"} <= set(state)
    original = load_file(str(ORIGINAL_DIR / "ema.safetensors"))
    assert torch.equal(state["model.latent_pos_embed.pos_embed"], original["latent_pos_embed.pos_embed"].float())
    assert torch.equal(state["model.vit_pos_embed.pos_embed"], original["vit_pos_embed.pos_embed"].float())
    model.train()
    assert all(not table.requires_grad for table in (model.model.vit_pos_embed.pos_embed, model.model.latent_pos_embed.pos_embed))


def test_cache_argument_and_its_deprecated_name(original_model, no_grad):
    """transformers 5.24 names the KV cache `cache`; the old `past_key_values=` still works, with a warning."""
    model, _ = original_model
    with_attn(model, "sdpa")
    ids = torch.tensor([[401, 30, 31, 32, 402, 401]])
    full = model(input_ids=ids).logits
    positions = torch.tensor([[4, 5]])
    continued = model(
        input_ids=ids[:, 4:], cache=model(input_ids=ids[:, :4], use_cache=True).cache, position_ids=positions
    ).logits
    assert_close_rel(continued, full[:, 4:], 1e-5)
    with pytest.warns(FutureWarning, match="past_key_values"):
        old_name = model(
            input_ids=ids[:, 4:], past_key_values=model(input_ids=ids[:, :4], use_cache=True).cache,
            position_ids=positions,
        )  # fmt: skip
    assert torch.equal(old_name.logits, continued)
    # Without positions a continuation would have to guess them from the key count, which an image block breaks.
    with pytest.raises(ValueError, match="needs `position_ids`"):
        model(input_ids=ids[:, 4:], cache=model(input_ids=ids[:, :4], use_cache=True).cache)


@pytest.mark.parametrize(
    "implementation", ["eager", "sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)]  # flex compiles
)
def test_rows_prefilled_in_one_forward_equal_rows_prefilled_alone(original_model, implementation, static_flex, no_grad):
    """`context_spans` with several rows: text rows (an edit's instruction after its image and alone), and rows with a
    ViT and a VAE block each (block ids and positions of each row kept apart). flex_attention runs the text rows only:
    torch's compiled CPU flex kernel is wrong for the tiny model's 16-feature heads once queries follow cached keys, one
    row per forward already (see `test_flex_attention_with_small_heads_on_cpu_is_warned_about`)."""
    model, _ = original_model
    with_attn(model, implementation)
    try:
        text = {"input_ids": torch.tensor([[401, 40, 41, 42, 402]])}
        check_rows_prefilled_together(model, [text, text])
        if implementation != "flex_attention":
            check_rows_prefilled_together(model, [mixed_inputs(model.config, seed) for seed in (1, 2, 3)])
        with pytest.raises(ValueError, match="`key_start` lists 2 first keys for 3 new tokens"):
            model.model.language_model(input_ids=torch.tensor([[401, 30, 402]]), key_start=[0, 0])
    finally:
        with_attn(model, "sdpa")


def test_flex_attention_with_small_heads_on_cpu_is_warned_about(converted_dir, caplog, no_grad):
    """torch's compiled CPU flex kernel is wrong for heads under 32 features after cached keys (the tiny model's are
    16): the model says so once, on its first flex forward."""
    import logging

    from transformers_bagel import BagelForConditionalGeneration

    model = BagelForConditionalGeneration.from_pretrained(converted_dir / "model", attn_implementation="flex_attention")
    with caplog.at_level(logging.WARNING):
        model(input_ids=torch.tensor([[401, 30, 402]]))
        model(input_ids=torch.tensor([[401, 31, 402]]))
    warned = [record for record in caplog.records if "flex_attention on the CPU with heads of 16" in record.getMessage()]
    assert len(warned) == 1
    caplog.clear()
    model.set_attn_implementation("sdpa")
    with caplog.at_level(logging.WARNING):
        model(input_ids=torch.tensor([[401, 30, 402]]))
    assert "flex_attention" not in caplog.text
