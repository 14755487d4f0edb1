"""BagelImageProcessor and BagelProcessor: BAGEL's resize rule, patch order, image modes, placeholders, the chat
template, and the understanding path end to end through the Auto classes."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.activations import ACT2FN

from conftest import ORIGINAL_DIR, TINY_IMAGE_SIZES, assert_close_rel, load_expected
from transformers_bagel import BagelImageProcessor, BagelProcessor
from transformers_bagel.image_processing_bagel import bagel_resize_size, to_rgb_image
from transformers_bagel.processing_bagel import BAGEL_CHAT_TEMPLATE


def _image(width, height, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ORIGINAL_DIR)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return BagelProcessor(BagelImageProcessor(vit_patch_size=14, **TINY_IMAGE_SIZES), tokenizer)


# -- the resize rule (the original's data/transforms.py) -------------------------------------------------------------


@pytest.mark.parametrize(
    "size, limits, expected",
    [
        ((1024, 768), (1024, 512, 16), (1024, 768)),  # already fits
        ((2048, 1024), (1024, 512, 16), (1024, 512)),  # long edge capped
        ((300, 200), (1024, 512, 16), (768, 512)),  # short edge raised to the minimum
        ((80, 40), (128, 32, 16), (80, 32)),  # 40 / 16 = 2.5 rounds half to even: 2 -> 32, not 48
        ((80, 56), (128, 32, 16), (80, 64)),  # 3.5 rounds half to even: 4 -> 64
        ((4000, 100), (1024, 512, 16), (1024, 32)),  # min-edge scale, then pixel budget, then long-edge cap
        ((1024, 1024), (980, 224, 14), (980, 980)),  # the ViT after the VAE resize
        ((10, 10), (980, 224, 14), (224, 224)),
    ],
)
def test_resize_rule(size, limits, expected):
    assert bagel_resize_size(*size, *limits, max_pixels=14 * 14 * 9 * 1024) == expected


def test_pixel_budget_scale_is_the_area_ratio_applied_to_each_side():
    # The original's quirk: over budget, each side is multiplied by budget / area (an area ratio, not its square
    # root). 3000x3000 -> 3008x3008 (divisible by 16) -> x 1e6 / 3008**2 = 332.4 -> 336.
    assert bagel_resize_size(3000, 3000, 4096, 16, 16, max_pixels=1_000_000) == (336, 336)


def test_vit_patches_are_flattened_in_p_q_c_order():
    ip = BagelImageProcessor(vit_patch_size=14, resize_with_vae_rule_first=False, **TINY_IMAGE_SIZES)
    image = _image(56, 28)
    out = ip.preprocess([image], return_tensors="pt")
    assert out["image_grid_hw"].tolist() == [[2, 4]]
    pixels = torch.from_numpy(np.array(image)).float() / 255 * 2 - 1  # (H, W, C), normalised with mean=std=0.5
    # c h p w q -> h w p q c, as the original's `patchify` (data/data_utils.py)
    chw = pixels.permute(2, 0, 1)
    expected = chw.reshape(3, 2, 14, 4, 14).permute(1, 3, 2, 4, 0).reshape(8, 14 * 14 * 3)
    torch.testing.assert_close(out["pixel_values"], expected, rtol=0, atol=1e-6)


def test_vit_input_is_resized_with_the_vae_rule_first_at_inference():
    ip = BagelImageProcessor(vit_patch_size=14, **TINY_IMAGE_SIZES)
    image = _image(200, 90)
    vae = ip.vae_resize(image)
    assert vae.size == (128, 64)
    # ViT rule on the VAE-resized image (128x64 -> 112x56), not on the raw image (200x90 -> 112x56 too, but 250x90
    # would differ); the grid and the pixels both follow the two-step path
    assert ip.num_vit_patches(90, 200) == (4, 8)
    expected = np.asarray(vae.resize((112, 56), PIL.Image.Resampling.BICUBIC), dtype=np.float32) / 255 * 2 - 1
    out = ip.preprocess(image)
    first = out["pixel_values"][0].reshape(14, 14, 3).numpy()
    np.testing.assert_allclose(first, expected[:14, :14], atol=1e-6)
    raw = ip.preprocess(image, resize_with_vae_rule_first=False)
    assert not torch.equal(raw["pixel_values"], out["pixel_values"])


def test_vae_transform_sizes_and_range():
    ip = BagelImageProcessor(**TINY_IMAGE_SIZES)
    out = ip.preprocess_vae([_image(80, 40), _image(200, 200, seed=1)])
    assert out["vae_image_sizes"].tolist() == [[32, 80], [128, 128]]
    for pixels in out["vae_pixel_values"]:
        assert pixels.min() >= -1 and pixels.max() <= 1


# -- image modes and types ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "HSV"])
def test_every_image_mode_becomes_rgb(mode):
    image = _image(40, 30).convert("L").convert(mode) if mode in ("I", "I;16", "F") else _image(40, 30).convert(mode)
    rgb = to_rgb_image(image)
    assert rgb.mode == "RGB" and rgb.size == (40, 30)


def test_transparent_pixels_become_white():
    rgba = PIL.Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgb = np.asarray(to_rgb_image(rgba))
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[1, 1].tolist() == [255, 255, 255]


def test_high_bit_depth_images_keep_their_contrast():
    array = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = PIL.Image.fromarray(array)
    assert image.mode.startswith("I;16")
    rgb = np.asarray(to_rgb_image(image))
    assert rgb.min() == 0 and rgb.max() == 255


def test_arrays_tensors_and_paths(tmp_path):
    image = _image(20, 10)
    array = np.asarray(image)
    path = tmp_path / "x.png"
    image.save(path)
    for item in (array, array / 255.0, torch.from_numpy(array).permute(2, 0, 1), str(path), path):
        assert np.array_equal(np.asarray(to_rgb_image(item)), array)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (42, TypeError, "PIL images, numpy arrays"),
        (np.zeros((2, 3, 5, 5), dtype=np.uint8), ValueError, "shape"),
        (np.full((4, 4, 3), np.nan), ValueError, "NaN"),
        (np.zeros((4, 4, 3), dtype=np.int64), ValueError, "dtype"),
        ("/no/such/image.png", ValueError, "does not exist"),
    ],
)
def test_bad_images_are_refused_with_a_message(bad, error, message):
    with pytest.raises(error, match=message):
        to_rgb_image(bad)


def test_undecodable_file_is_refused(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="could not be decoded"):
        to_rgb_image(path)


def test_inconsistent_sizes_are_refused():
    with pytest.raises(ValueError, match="vit_max_num_patch_per_side"):
        BagelImageProcessor(vit_max_image_size=1400, vit_max_num_patch_per_side=70)
    with pytest.raises(ValueError, match="vae_min_image_size"):
        BagelImageProcessor(vae_min_image_size=2048)


# -- processor ----------------------------------------------------------------------------------------------------------


def test_chat_template_reproduces_the_original_prompt(processor):
    meta, expected = load_expected("a_text_logits")
    messages = [{"role": "user", "content": [{"type": "text", "text": meta["prompt"]}]}]
    ids = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)
    assert ids["input_ids"][0].tolist() == expected["input_ids"].tolist()
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>{meta['prompt']}<|im_end|><|im_start|>"


def test_image_placeholders_expand_to_the_patch_count(processor):
    image = _image(80, 40)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    rows, cols = out["image_grid_hw"][0].tolist()
    ids = out["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == rows * cols == out["pixel_values"].shape[0]
    start, end = ids.index(processor.token_ids["start_of_image_token_id"]), ids.index(processor.token_ids["end_of_image_token_id"])
    assert end - start - 1 == rows * cols
    assert ids[-1] == processor.token_ids["bos_token_id"]


def test_vae_slots_are_left_to_the_pipeline_and_the_collator(processor):
    with pytest.raises(ValueError, match="fills ViT image slots only"):
        processor(text="<|vision_start|><|vision_pad|><|vision_end|>")
    with pytest.raises(ValueError, match="BagelPipeline runs, and training batches .* BagelDataCollator"):
        processor(text="a", vae_images=[_image(80, 40)])


def test_batches_are_left_padded(processor, tokenizer):
    out = processor(text=["<|im_start|>a<|im_end|>", "<|im_start|>a longer prompt<|im_end|>"])
    assert out["attention_mask"][0].tolist()[0] == 0 and out["attention_mask"][0].tolist()[-1] == 1
    assert out["input_ids"][0, 0].item() == tokenizer.pad_token_id


def test_placeholder_and_image_counts_must_agree(processor):
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> placeholder\\(s\\) but 2 image"):
        processor(text="<|vision_start|><|image_pad|><|vision_end|>", images=[_image(30, 30), _image(30, 30)])


def test_missing_special_tokens_are_named(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "<|im_start|>": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    with pytest.raises(ValueError, match="<\\|im_end\\|>"):
        BagelProcessor(BagelImageProcessor(), tok)


def test_processor_round_trips_through_auto_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, BagelProcessor)
    assert loaded.chat_template == BAGEL_CHAT_TEMPLATE
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    image = _image(64, 48)
    a = processor(text="<|image_pad|>", images=image)
    b = loaded(text="<|image_pad|>", images=image)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


# -- the understanding path end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auto_loaded(converted_dir):
    model = AutoModelForImageTextToText.from_pretrained(converted_dir, subfolder="model")
    model.set_attn_implementation("sdpa")
    processor = AutoProcessor.from_pretrained(converted_dir, subfolder="processor")
    return model.eval(), processor


def test_chat_template_path_reproduces_original_logits_and_greedy_tokens(auto_loaded, no_grad):
    model, processor = auto_loaded
    meta, expected = load_expected("a_text_logits")
    messages = [{"role": "user", "content": [{"type": "text", "text": meta["prompt"]}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt_len = expected["input_ids"].shape[0]
    out = model(**inputs)
    assert_close_rel(out.logits[0, :prompt_len], expected["logits"], 1e-4)
    generated = model.generate(**inputs, max_new_tokens=7, do_sample=False)
    # the original's 8 greedy tokens are the start token followed by 7 generated ones
    assert generated[0, prompt_len:].tolist() == expected["greedy_token_ids"].tolist()


def _reference_image_features(model, pixel_values, grid_hw):
    """ViT -> connector -> + vit_pos_embed, one image at a time with plain tensor ops (the original's
    `modeling/bagel/bagel.py`)."""
    inner = model.model
    vision = inner.vision_model
    cfg = vision.config
    act = ACT2FN[cfg.hidden_act]
    side = model.config.vit_max_num_patch_per_side
    outputs, offset = [], 0
    for rows, cols in grid_hw.tolist():
        n = rows * cols
        ids = (torch.arange(rows)[:, None] * side + torch.arange(cols)[None, :]).flatten()
        x = vision.embeddings.patch_embedding(pixel_values[offset : offset + n])
        x = x + vision.embeddings.position_embedding.weight[ids]
        heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        for layer in vision.encoder.layers:
            h = torch.nn.functional.layer_norm(x, (cfg.hidden_size,), layer.layer_norm1.weight, layer.layer_norm1.bias, cfg.layer_norm_eps)
            q, k, v = (p(h).view(n, heads, dim).transpose(0, 1) for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
            attn = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5, dim=-1) @ v
            x = x + layer.self_attn.out_proj(attn.transpose(0, 1).reshape(n, -1))
            h = torch.nn.functional.layer_norm(x, (cfg.hidden_size,), layer.layer_norm2.weight, layer.layer_norm2.bias, cfg.layer_norm_eps)
            x = x + layer.mlp.fc2(act(layer.mlp.fc1(h)))
        x = vision.post_layernorm(x)
        x = inner.connector(x) + inner.vit_pos_embed.pos_embed[ids]
        outputs.append(x)
        offset += n
    return torch.cat(outputs)  # fmt: skip


def test_packed_vit_features_equal_one_image_at_a_time(auto_loaded, no_grad):
    model, processor = auto_loaded
    images = [_image(112, 56, seed=1), _image(42, 98, seed=2), _image(70, 70, seed=3)]
    vit = processor.image_processor.preprocess(images, return_tensors="pt")
    assert len({tuple(g) for g in vit["image_grid_hw"].tolist()}) == 3  # different sizes, packed without padding
    features = model.model.get_image_features(vit["pixel_values"], vit["image_grid_hw"])
    assert_close_rel(features, _reference_image_features(model, vit["pixel_values"], vit["image_grid_hw"]), 1e-5)


def test_image_question_prefilled_at_once_equals_context_by_context(auto_loaded, no_grad):
    """The original fills its cache one context segment at a time (image block, then text); one forward over the
    templated prompt must give the same logits at the generation start and the same greedy answer."""
    from transformers import DynamicCache

    model, processor = auto_loaded
    image = _image(90, 60, seed=4)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = inputs["input_ids"]
    end = ids[0].tolist().index(processor.token_ids["end_of_image_token_id"]) + 1
    full = model(**inputs).logits[0, -1]

    cache = DynamicCache(config=model.config)
    first = model(
        input_ids=ids[:, :end], pixel_values=inputs["pixel_values"], image_grid_hw=inputs["image_grid_hw"],
        cache=cache, use_cache=True,
    )  # fmt: skip
    rest = model(
        input_ids=ids[:, end:], cache=first.cache, position_ids=first.next_position[:, None] + torch.arange(ids.shape[1] - end)[None],
        use_cache=True,
    )  # fmt: skip
    assert_close_rel(rest.logits[0, -1], full, 1e-5)
    # positions: the whole image block shares position 0, the text starts at 1
    assert first.next_position.tolist() == [1]
    answer = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert answer.shape[1] > ids.shape[1]
