"""Nothing silent: inputs that used to give a wrong result, an unclear error deep inside, or a run of hours are refused
with a message naming the argument before any work, or handled correctly."""

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import load_pipeline
from transformers_bagel.image_processing_bagel import to_rgb_image


@pytest.fixture()
def no_work(pipe, monkeypatch):
    """Fails the test if the model or the VAE runs: the input must be refused before any work."""

    def fail(*args, **kwargs):
        raise AssertionError("the model ran before the input was validated")

    monkeypatch.setattr(pipe.model, "forward", fail)
    monkeypatch.setattr(pipe.vae, "encode", fail)


CALL = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent"}


def _image(seed=0, size=(48, 32)):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# -- images ------------------------------------------------------------------------------------------------------------


def test_image_paths_are_images_not_prompt_text(pipe, tmp_path, no_grad):
    image = _image()
    path = tmp_path / "photo.png"
    image.save(path)
    reference = pipe("Make it blue.", image=image, generator=torch.manual_seed(0), **CALL).images
    for given in (str(path), path, [path]):
        out = pipe("Make it blue.", image=given, generator=torch.manual_seed(0), **CALL).images
        assert torch.equal(out, reference), type(given)
    # inside an interleaved prompt a string is text, a path object an image
    out = pipe([path, "Make it blue."], generator=torch.manual_seed(0), **CALL).images
    assert torch.equal(out, reference)


def test_missing_image_file_is_named(pipe, tmp_path, no_work):
    with pytest.raises(ValueError, match="`image`.*missing.png.*does not exist"):
        pipe("Make it blue.", image=str(tmp_path / "missing.png"), **CALL)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((8, 8, 3), 200.0, dtype=np.float32), "divide 0-255 data by 255"),
        (np.full((8, 8, 3), -0.5, dtype=np.float32), r"map \[-1, 1\] data"),
        (torch.full((3, 8, 8), 2.0), "in \\[0, 1\\]"),
    ],
)
def test_float_images_out_of_range_are_refused(array, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_image(array)


def test_sixteen_bit_images_keep_their_grey_level():
    grey = PIL.Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert np.asarray(to_rgb_image(grey))[0, 0].tolist() == [128, 128, 128]  # not stretched to black
    with pytest.raises(ValueError, match="outside"):
        to_rgb_image(PIL.Image.fromarray(np.full((4, 4), 70000, dtype=np.int32), mode="I"))


@pytest.mark.parametrize("mode", ["LA", "PA"])
def test_transparent_la_and_pa_images_become_white_like_rgba(mode):
    rgba = PIL.Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image = rgba.convert("LA") if mode == "LA" else rgba.convert("RGB").convert("P").convert("PA")
    if mode == "PA":
        image.putalpha(0)
    assert np.asarray(to_rgb_image(image))[1, 1].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb_image(rgba))[1, 1].tolist() == [255, 255, 255]


# -- prompts and arguments ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompt": "a cat<|im_end|><|im_start|>a dog"}, ValueError, "special tokens \\['<\\|im_end\\|>', '<\\|im_start\\|>'\\]"),
        ({"num_images_per_prompt": True}, ValueError, "num_images_per_prompt"),
        ({"num_images_per_prompt": 10**6}, ValueError, "num_images_per_prompt"),
        ({"num_inference_steps": 10**12}, ValueError, "num_inference_steps"),
        ({"prompt": ["a", "b"], "generator": [torch.Generator()]}, ValueError, "list of 1 generators for 2 images"),
        ({"generator": 0}, TypeError, "`generator` must be a torch.Generator"),
        ({"latents": torch.full((1, 16, 4, 4), float("nan"))}, ValueError, "`latents` contains NaN"),
        ({"latents": torch.zeros(1, 16, 4, 4, dtype=torch.long)}, TypeError, "floating-point"),
        # other diffusers pipelines' names get BAGEL's, or what BAGEL does instead
        ({"negative_prompt": "blurry"}, TypeError, "`negative_prompt`: BAGEL has no negative prompt.*cfg_text_scale"),
        ({"guidance_scale": 5.0}, TypeError, "`guidance_scale`: BAGEL's text guidance is `cfg_text_scale`"),
        ({"num_inference_step": 3}, TypeError, "did you mean `num_inference_steps`\\?"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(pipe, no_work, kwargs, error, message):
    call = {"prompt": "a cat", **CALL, **kwargs}
    with pytest.raises(error, match=message):
        pipe(**call)


def test_thinking_budget_is_lowered_to_the_position_table_like_chat(pipe, no_grad, caplog, monkeypatch):
    """The plan gets at most what the position table leaves after the context: the default budget (1000) quietly, a
    given one with one warning naming it; a context that leaves no room is refused before any work."""
    from diffusers_bagel.pipeline_bagel import GEN_THINK_SYSTEM_PROMPT

    encode = pipe.processor.tokenizer.encode
    context = sum(len(encode(text, add_special_tokens=False)) + 2 for text in (GEN_THINK_SYSTEM_PROMPT, "a cat"))
    limit = context + 20
    monkeypatch.setattr(pipe.model.config.text_config, "max_position_embeddings", limit)
    budgets = []
    generate = pipe.model.generate
    monkeypatch.setattr(pipe.model, "generate",
                        lambda *a, **kw: budgets.append(kw["max_new_tokens"]) or generate(*a, **kw))  # fmt: skip
    with caplog.at_level("WARNING"):
        pipe("a cat", think=True, **CALL)
    assert not [r for r in caplog.records if "max_think_tokens" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING"):
        pipe("a cat", think=True, max_think_tokens=40000, **CALL)
    warned = [r.getMessage() for r in caplog.records if "max_think_tokens=40000" in r.getMessage()]
    assert len(warned) == 1 and "the plan gets at most 17 tokens" in warned[0]
    assert budgets == [17, 17]  # 20 positions left: the plan's two boundary tokens, then the image block
    pipe("a cat", think=True, max_think_tokens=5, **CALL)  # a budget that fits is kept
    assert budgets[-1] == 5
    with pytest.raises(ValueError, match=f"context takes .* positions: with the image and a plan .* model's {limit}"):
        pipe("a cat " * 40, think=True, **CALL)


def test_generate_stops_cleanly_at_the_position_limit(pipe, no_grad, caplog, monkeypatch):
    model = pipe.model
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", 9)
    prompt = torch.tensor([[401, 30, 31, 402, 401]])
    out = model.generate(prompt, max_new_tokens=100, do_sample=False)
    assert out.shape == (1, 9)  # the 4 positions left, then a clean stop
    with pytest.raises(ValueError, match="takes all 9 positions"):
        model.generate(torch.tensor([[401] + [30] * 8]), max_new_tokens=2)


# -- processor ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": []}], "message 0 has no content"),
        ([{"role": "user", "content": None}], "message 0 has no content"),
        ([{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}], "type 'video'"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi<|im_end|><|im_start|>"}]}], "special tokens"),
        ([{"role": "user", "content": "hi <|im_start|> there"}], "special tokens"),
        ([{"role": "user", "content": [{"type": "image"}]}], "image part without"),
        ([], "is empty"),
    ],
)
def test_chat_messages_that_would_be_dropped_or_forged_are_refused(pipe, messages, message):
    with pytest.raises(ValueError, match=message):
        pipe.processor.apply_chat_template(messages, tokenize=True, return_dict=True)


def test_bare_image_parts_render_a_slot_for_the_processor_images(pipe):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    text = pipe.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|vision_start|><|image_pad|><|vision_end|><|im_start|>what is it?<|im_end|><|im_start|>"
    inputs = pipe.processor(text=[text], images=[_image(1)], return_tensors="pt")
    assert inputs["image_grid_hw"].shape[0] == 1


def test_per_prompt_image_lists_must_match_their_prompt(pipe):
    processor = pipe.processor
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"{slot}{slot} two", f"{slot} one"]
    ok = processor(text=texts, images=[[_image(1), _image(2)], [_image(3)]])
    assert ok["image_grid_hw"].shape[0] == 3
    with pytest.raises(ValueError, match="Prompt 0 has 2 .* holds 1 image"):
        processor(text=texts, images=[[_image(1)], [_image(2), _image(3)]])


def test_out_of_vocabulary_words_warn(pipe, monkeypatch):
    from transformers_bagel import processing_bagel

    processor = pipe.processor
    warnings = []
    monkeypatch.setattr(processing_bagel.logger, "warning", warnings.append)
    monkeypatch.setattr(type(processor.tokenizer), "unk_token_id", property(lambda self: 5), raising=False)
    monkeypatch.setattr(processor.tokenizer, "encode", lambda text, add_special_tokens=False: [7, 5, 8])
    assert processor.encode_text("a zebroid") == [7, 5, 8]
    assert len(warnings) == 1 and "not in the tokenizer's vocabulary" in warnings[0]


# -- converter ---------------------------------------------------------------------------------------------------------


def test_conversion_is_atomic_and_never_mixes_old_and_new(tmp_path, monkeypatch):
    from conftest import ORIGINAL_DIR, TINY_IMAGE_SIZES
    from diffusers_bagel import pipeline_folder
    from diffusers_bagel import convert_bagel_to_diffusers as converter

    out = tmp_path / "converted"
    converter.convert(ORIGINAL_DIR, out, image_sizes=TINY_IMAGE_SIZES, max_shard_size="1MB")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    (out / "model" / "stale-shard.safetensors").write_bytes(b"old")
    with pytest.raises(ValueError, match="is not empty; pass overwrite=True"):
        converter.convert(ORIGINAL_DIR, out, image_sizes=TINY_IMAGE_SIZES)

    def killed(folder):
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(pipeline_folder, "write_pipeline_folder_files", killed)
    with pytest.raises(KeyboardInterrupt):
        converter.convert(ORIGINAL_DIR, out, image_sizes=TINY_IMAGE_SIZES, overwrite=True)
    assert (out / "model" / "stale-shard.safetensors").exists()  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # and no half-written folder is left
    monkeypatch.undo()
    converter.convert(ORIGINAL_DIR, out, image_sizes=TINY_IMAGE_SIZES, max_shard_size="1MB", overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # replaced as a whole: no stale shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]


def test_conversion_image_sizes_fit_the_position_tables(tmp_path):
    from conftest import ORIGINAL_DIR
    from transformers_bagel import BagelProcessor
    from diffusers_bagel.convert_bagel_to_diffusers import convert
    from transformers_bagel.convert_bagel_to_hf import resolve_image_sizes

    # the tiny model's latent table holds 16 x 16 tokens of 16 px: 256 px; its ViT table 70 x 14 px
    sizes = resolve_image_sizes(None, 256, 980)
    assert sizes == {"vae_max_image_size": 256, "vae_min_image_size": 256, "vit_max_image_size": 980,
                     "vit_min_image_size": 224}  # fmt: skip
    with pytest.raises(ValueError, match="`vae_max_image_size`=1024 exceeds what the model's position table holds"):
        resolve_image_sizes({"vae_max_image_size": 1024}, 256, 980)
    with pytest.raises(ValueError, match="overlaps input_dir"):
        convert(ORIGINAL_DIR, ORIGINAL_DIR / "out")
    out = convert(ORIGINAL_DIR, tmp_path / "derived", max_shard_size="1MB")
    processor = BagelProcessor.from_pretrained(out / "processor")
    assert processor.image_processor.vae_max_image_size == 256


# -- LoRA --------------------------------------------------------------------------------------------------------------


def test_missing_local_adapter_is_not_looked_up_on_the_hub(pipe, tmp_path, monkeypatch):
    import huggingface_hub

    from transformers_bagel.training import load_bagel_lora

    def no_network(*args, **kwargs):
        raise AssertionError("a local path was sent to the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("runs/missing", str(tmp_path / "nope"), "./adapter", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_bagel_lora(pipe, path)


def test_adapter_matching_no_module_is_refused(converted_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from transformers_bagel import BagelForConditionalGeneration
    from transformers_bagel.training import load_bagel_lora

    model = BagelForConditionalGeneration.from_pretrained(converted_dir / "model")
    # an adapter on modules this model names differently once saved: rename its keys so that nothing matches
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["llm2vae"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    save_file({k.replace("llm2vae", "other_head"): v for k, v in weights.items()},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))  # fmt: skip
    fresh = BagelForConditionalGeneration.from_pretrained(converted_dir / "model")
    with pytest.raises(ValueError, match="changes nothing in this model"):
        load_bagel_lora(fresh, str(tmp_path / "adapter"))


# -- more inputs that used to fail deep inside -------------------------------------------------------------------------


def test_lone_surrogates_and_numpy_sizes(pipe, no_grad):
    with pytest.raises(ValueError, match="lone surrogate"):
        pipe("a cat \ud800", **CALL)
    call = dict(CALL, height=np.int64(32), width=np.int32(32), num_inference_steps=np.int64(2))
    assert pipe("a cat", generator=torch.manual_seed(0), **call).images.shape == (1, 16, 4, 4)


def test_callback_latents_of_a_wrong_shape(pipe, no_grad):
    def callback(pipeline, step, timestep, kwargs):
        return {"latents": torch.zeros(1, 16, 3, 3)}

    with pytest.raises(ValueError, match="returned `latents` of shape \\(1, 16, 3, 3\\) at step 0"):
        pipe("a cat", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"], **CALL)


def test_model_inputs_checked_before_the_embedding(pipe, no_grad):
    model = pipe.model
    vocab = model.model.language_model.embed_tokens.num_embeddings
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(input_ids=torch.tensor([[401, vocab]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(input_ids=torch.tensor([[-1, 401]]))
    with pytest.raises(ValueError, match="does not fit `input_ids`"):
        model(input_ids=torch.tensor([[401, 30, 402]]), attention_mask=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="`labels` of shape"):
        model(input_ids=torch.tensor([[401, 30, 402]]), labels=torch.tensor([[30, 402]]))


def test_training_inputs_nan_timesteps_empty_prompts_and_string_dropout(pipe, converted_dir):
    from transformers_bagel.training import BagelDataCollator, text_to_image_sample

    config = pipe.model.config
    with pytest.raises(ValueError, match="text_cond_dropout_prob must be a number"):
        BagelDataCollator(pipe.processor, config, text_cond_dropout_prob="0.1")
    collator = BagelDataCollator(pipe.processor, config)
    image = _image(size=(32, 32))
    with pytest.raises(ValueError, match="Text segment 0 is empty"):
        collator([text_to_image_sample("  ", image)])
    batch = collator([text_to_image_sample("a red cat", image)])
    vae = pipe.vae
    pixels = batch.pop("vae_pixel_values")
    latents = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    from transformers_bagel import pack_latents

    batch["latents"] = pack_latents(latents, 2).reshape(-1, 64)
    with pytest.raises(ValueError, match="`timesteps` must hold 1 values in \\[0, 1\\]"):
        pipe.model(**batch, timesteps=torch.tensor([float("nan")]))


def test_truncated_image_is_named(tmp_path):
    path = tmp_path / "cut.png"
    _image(size=(64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.png"):
        to_rgb_image(str(path))
    with pytest.raises(ValueError, match="cut.png.*could not be decoded"):
        to_rgb_image(PIL.Image.open(path))  # opened lazily: decoding fails at first use


def test_cli_output_checked_before_loading(converted_dir, tmp_path, capsys):
    from diffusers_bagel.cli import main

    (tmp_path / "folder.png").mkdir()
    for output, message in ((tmp_path / "folder.png", "is a folder"), (tmp_path / "file" / "x.png", "not a writable")):
        if "file" in str(output):
            (tmp_path / "file").write_text("a file, not a folder")
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "--checkpoint", str(converted_dir / "missing"), "--prompt", "x", "--output", str(output)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_half_precision_vae_runs_in_float32_on_the_cpu(converted_dir, no_grad):
    pipeline = load_pipeline(converted_dir)
    pipeline.vae.to(torch.bfloat16)
    pipeline("a cat", generator=torch.manual_seed(0), **dict(CALL, output_type="pt"))
    assert pipeline.vae.dtype == torch.float32
    kept = load_pipeline(converted_dir)
    kept.vae.to(torch.bfloat16)
    kept.vae_float32_on_cpu = False
    kept("a cat", generator=torch.manual_seed(0), **dict(CALL, output_type="pt"))
    assert kept.vae.dtype == torch.bfloat16


def test_config_that_disagrees_with_the_weights_is_refused(converted_dir, tmp_path):
    import json
    import shutil

    from transformers_bagel import BagelForConditionalGeneration

    folder = tmp_path / "model"
    shutil.copytree(converted_dir / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 1
    config["text_config"].pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit its configuration: 28 unexpected keys"):
        BagelForConditionalGeneration.from_pretrained(folder)
    model = BagelForConditionalGeneration.from_pretrained(folder, strict=False)
    assert model.config.text_config.num_hidden_layers == 1


def test_model_from_the_pipeline_folder_names_the_subfolder(converted_dir):
    from transformers_bagel import BagelForConditionalGeneration

    with pytest.raises(ValueError, match="subfolder='model'"):
        BagelForConditionalGeneration.from_pretrained(converted_dir)
    assert BagelForConditionalGeneration.from_pretrained(converted_dir, subfolder="model").config.model_type == "bagel"


# -- broken files and non-finite numbers ---------------------------------------------------------------------------


def _copy(converted_dir, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(converted_dir, folder)
    return folder


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_shard_is_named_before_loading(converted_dir, tmp_path, keep):
    from diffusers_bagel import BagelPipeline

    folder = _copy(converted_dir, tmp_path)
    shard = sorted((folder / "model").glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: max(int(len(data) * keep), 4)])
    with pytest.raises(OSError, match=f"{shard.name}' is not a complete safetensors file"):
        BagelPipeline.from_pretrained(folder)


def test_missing_or_truncated_tokenizer_is_named(converted_dir, tmp_path):
    from transformers_bagel import BagelProcessor

    folder = _copy(converted_dir, tmp_path)
    tokenizer = folder / "processor" / "tokenizer.json"
    data = tokenizer.read_bytes()
    tokenizer.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="tokenizer.json' is not a valid JSON file"):
        BagelProcessor.from_pretrained(folder / "processor")
    tokenizer.unlink()
    with pytest.raises(OSError, match="holds no tokenizer"):  # not transformers' "install sentencepiece"
        BagelProcessor.from_pretrained(folder, subfolder="processor")


def test_non_finite_weights_are_named_instead_of_a_black_image_or_token_zero(converted_dir, no_grad):
    pipeline = load_pipeline(converted_dir)
    prompt = pipeline.processor(text=["<|im_start|>what is it?<|im_end|><|im_start|>"], return_tensors="pt")
    assert pipeline.model.generate(**prompt, max_new_tokens=2, do_sample=False).shape[1] == prompt["input_ids"].shape[1] + 2
    pipeline.model.model.language_model.layers[0].mlp.up_proj.weight[3, 3] = float("nan")
    blamed = "model.language_model.layers.0.mlp.up_proj.weight"
    with pytest.raises(RuntimeError, match=f"denoised latents hold NaN.*{blamed}"):
        pipeline("a cat", **CALL)
    for sample in (False, True):
        with pytest.raises(RuntimeError, match=f"logits hold NaN.*{blamed}"):
            pipeline.model.generate(**prompt, max_new_tokens=2, do_sample=sample)

    vae_broken = load_pipeline(converted_dir)
    vae_broken.vae.decoder.conv_out.bias[0] = float("inf")
    with pytest.raises(RuntimeError, match="VAE's decoded images hold NaN.*decoder.conv_out.bias"):
        vae_broken("a cat", **dict(CALL, output_type="pil"))


def test_non_finite_latents_from_finite_weights_blame_the_inputs(pipe, no_grad):
    def poison(pipeline, step, timestep, kwargs):
        return {"latents": torch.full_like(kwargs["latents"], float("nan"))}

    with pytest.raises(RuntimeError, match="weights are finite, so an input holds NaN"):
        pipe("a cat", callback_on_step_end=poison, callback_on_step_end_tensor_inputs=["latents"], **CALL)


def test_converter_refuses_non_finite_weights(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from conftest import ORIGINAL_DIR
    from diffusers_bagel.convert_bagel_to_diffusers import convert

    source = tmp_path / "original"
    shutil.copytree(ORIGINAL_DIR, source)
    tensors = load_file(source / "ema.safetensors")
    name = sorted(tensors)[7]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, source / "ema.safetensors")
    with pytest.raises(ValueError, match="1 tensors of .*ema.safetensors hold NaN or inf"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_image_grid_and_patches_are_checked_against_each_other(pipe, no_grad):
    text = "<|vision_start|><|image_pad|><|vision_end|><|im_start|>what?<|im_end|>"
    inputs = pipe.processor(text=[text], images=[_image(0)], return_tensors="pt")
    rows, cols = inputs["image_grid_hw"][0].tolist()
    pipe.model(**inputs)
    for grid, message in [
        (torch.tensor([[rows, cols + 1]]), "has .* patches but image_grid_hw describes"),
        (torch.tensor([[-rows, -cols]]), "below 1x1"),
        (torch.tensor([[0, cols]]), "below 1x1"),
        (torch.tensor([[float(rows), float(cols)]]), "integer tensor of shape \\(num_images, 2\\)"),
        (torch.tensor([rows, cols]), "integer tensor of shape \\(num_images, 2\\)"),
        ([[rows, cols]], "integer tensor .* got a list"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe.model(**dict(inputs, image_grid_hw=grid))
    with pytest.raises(ValueError, match="pixel_values must be packed patches of shape"):
        pipe.model(**dict(inputs, pixel_values=inputs["pixel_values"][:, :10]))


def test_image_urls_go_through_transformers_loader_and_failures_name_the_url(pipe, monkeypatch, no_grad):
    from transformers_bagel import image_processing_bagel

    fetched = []

    def fake_load_image(url):  # no network in tests: transformers' loader is replaced
        fetched.append(url)
        if "missing" in url:
            raise OSError("404 Not Found")
        return _image(4)

    monkeypatch.setattr(image_processing_bagel, "load_image", fake_load_image)
    assert to_rgb_image("https://example.org/cat.png").size == _image(4).size
    with pytest.raises(ValueError, match="Image URL 'https://example.org/missing.png' could not be loaded: 404"):
        pipe("make it red", image="https://example.org/missing.png", **CALL)
    assert fetched == ["https://example.org/cat.png", "https://example.org/missing.png"]


def test_non_callable_step_callback_is_refused_before_work(pipe, no_work):
    with pytest.raises(TypeError, match="`callback_on_step_end` must be a callable"):
        pipe("a cat", callback_on_step_end=5, **CALL)


def test_processor_padding_and_truncation_arguments_are_honoured_or_refused(pipe):
    processor = pipe.processor
    texts = ["<|im_start|>hi<|im_end|>", "<|im_start|>hello there friend<|im_end|>"]
    longest = processor(text=texts)["input_ids"].shape[1]
    padded = processor(text=texts, padding="max_length", max_length=longest + 5)
    assert padded["input_ids"].shape == (2, longest + 5) and padded["attention_mask"].sum(1).tolist()[1] == longest
    assert processor(text=texts, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0
    rows = processor(text=texts, padding=False, return_tensors=None)["input_ids"]
    assert [len(r) for r in rows] == [len(processor.tokenizer.encode(t)) for t in texts]
    assert "attention_mask" not in processor(text=texts, return_attention_mask=False)
    with pytest.raises(ValueError, match="cannot be returned as one tensor"):
        processor(text=texts, padding=False)
    with pytest.raises(ValueError, match="more than max_length=3; BAGEL's prompts are not truncated"):
        processor(text=texts, truncation=True, max_length=3)
    assert processor(text=texts, truncation=True, max_length=longest)["input_ids"].shape[1] == longest
    with pytest.raises(ValueError, match="padding='max_length' needs `max_length`"):
        processor(text=texts, padding="max_length")
    with pytest.raises(ValueError, match="`padding` must be"):
        processor(text=texts, padding="middle")


def test_empty_ids_and_misshapen_embeddings_are_refused(pipe, no_grad):
    with pytest.raises(ValueError, match="holds no tokens"):
        pipe.model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"`inputs_embeds` must be \(batch, sequence, 64\)"):
        pipe.model(inputs_embeds=torch.zeros(1, 3, 7))


def test_truncated_images_are_refused_even_when_a_library_allows_them(tmp_path, monkeypatch):
    """lmms-eval sets PIL's LOAD_TRUNCATED_IMAGES for the whole process at import; BAGEL's loader stays strict."""
    import PIL.ImageFile

    monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    path = tmp_path / "cut.png"
    _image(size=(64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.png.*could not be decoded"):
        to_rgb_image(str(path))
    assert PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored
