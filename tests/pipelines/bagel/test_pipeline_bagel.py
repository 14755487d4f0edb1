"""BagelPipeline: the velocity path against the original's numbers, batched CFG against a sequential reference written
from the original's inference (`inferencer.py` and `modeling/bagel/bagel.py` of ByteDance-Seed/Bagel), batching,
inputs and outputs."""

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import assert_close_rel, load_expected, load_pipeline
from diffusers_bagel import BagelPipelineOutput, FlowMatchEulerScheduler
from transformers_bagel import BagelContext, pack_latents, unpack_latents


def _noise(batch, height, width, seed=0):
    return torch.randn(batch, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


# -- the velocity path against the original ------------------------------------------------------------------------------


def test_one_step_velocity_matches_original(pipe):
    meta, expected = load_expected("c_velocity")
    contexts = [pipe.build_contexts([meta["prompt"]], think=False)]
    grid = (meta["image_hw"][0] // 16, meta["image_hw"][1] // 16)
    x_t = expected["x_t"][None]
    for renorm in ("global", "channel", "text_channel"):
        guidance = pipe.prepare_guidance(contexts, 4.0, 1.0, (0.0, 1.0), renorm, 0.0)
        assert guidance.num_branches == 2
        v = pipe.guided_velocity(x_t, meta["t"], grid, guidance)
        assert_close_rel(v[0], expected[f"v_cfg4_{renorm}"], 1e-4)
    # outside the interval only the conditional branch runs
    guidance = pipe.prepare_guidance(contexts, 4.0, 1.0, (0.8, 1.0), "global", 0.0)
    assert_close_rel(pipe.guided_velocity(x_t, meta["t"], grid, guidance)[0], expected["v_cond"], 1e-4)
    # the two raw branches of the batched forward
    raw = pipe.model.predict_velocity(
        x_t.repeat(2, 1, 1), meta["t"], grid, guidance.context, guidance.spans["cond"] + guidance.spans["text"]
    )
    assert_close_rel(raw[0], expected["v_cond"], 1e-4)
    assert_close_rel(raw[1], expected["v_uncond_text"], 1e-4)


def test_vae_of_converted_folder_matches_original(pipe):
    _, expected = load_expected("f_vae")
    vae = pipe.vae
    posterior = vae.encode(expected["pixel_input"]).latent_dist
    latent = (posterior.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    assert_close_rel(latent, expected["latent_mean_scaled"], 1e-4)
    decoded = vae.decode(expected["latent_mean_scaled"] / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert_close_rel(decoded, expected["decoded"], 1e-4)


# -- an independent, sequential reference of the original's inference (`interleave_inference`, `generate_image`) ----


def _segment_ids(pipe, segments):
    config, tokenizer = pipe.model.config, pipe.processor.tokenizer
    ids, pixels, grids, latents, latent_grids = [], [], [], [], []
    for kind, value in segments:
        if kind == "text":
            ids += [config.bos_token_id] + tokenizer.encode(value) + [config.eos_token_id]
        elif kind == "vae":
            x = pipe.processor.image_processor.preprocess_vae([value])["vae_pixel_values"][0][None]
            z = (pipe.vae.encode(x).latent_dist.mode() - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
            tokens = pack_latents(z, 2)[0]
            latents.append(tokens)
            latent_grids.append([z.shape[2] // 2, z.shape[3] // 2])
            ids += [config.start_of_image_token_id] + [config.latent_token_id] * len(tokens) + [config.end_of_image_token_id]
        else:
            vit = pipe.processor.image_processor.preprocess([value], return_tensors="pt")
            pixels.append(vit["pixel_values"])
            grids.append(vit["image_grid_hw"])
            n = int(vit["image_grid_hw"].prod())
            ids += [config.start_of_image_token_id] + [config.image_token_id] * n + [config.end_of_image_token_id]
    inputs = {"input_ids": torch.tensor([ids])}
    if pixels:
        inputs.update(pixel_values=torch.cat(pixels), image_grid_hw=torch.cat(grids))
    if latents:
        inputs.update(latents=torch.cat(latents), latent_grid_hw=torch.tensor(latent_grids))
    return inputs


def _reference_generate(pipe, contexts, noise, steps, shift, st, si, interval, renorm, renorm_min):
    """One prompt, each context prefilled alone, each branch run one after another, the original's formulas inline."""
    model = pipe.model
    caches = []
    for ctx in contexts:
        context = BagelContext()
        span = context.new_span()
        if ctx.segments:
            span = model.model.prefill_context(**_segment_ids(pipe, ctx.segments), context=context,
                                               context_spans=span).context_span  # fmt: skip
        caches.append((context, [span]))
    grid = (noise.shape[2] // 2, noise.shape[3] // 2)
    x = pack_latents(noise, 2)
    ts = torch.linspace(1, 0, steps + 1)
    ts = shift * ts / (1 + (shift - 1) * ts)
    for i in range(steps):
        t = float(ts[i])
        active = interval[0] < t <= interval[1]
        s_text, s_img = (st, si) if active else (1.0, 1.0)
        v = model.predict_velocity(x, t, grid, *caches[0])
        if s_text > 1.0:
            v_tu = model.predict_velocity(x, t, grid, *caches[1])
            if s_img > 1.0:
                v_iu = model.predict_velocity(x, t, grid, *caches[2])
            if renorm == "text_channel":
                vt_ = v_tu + s_text * (v - v_tu)
                scale = (v.norm(dim=-1, keepdim=True) / (vt_.norm(dim=-1, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)
                vt = vt_ * scale
                v = v_iu + s_img * (vt - v_iu) if s_img > 1.0 else vt
            else:
                vt_ = v_tu + s_text * (v - v_tu)
                v_ = v_iu + s_img * (vt_ - v_iu) if s_img > 1.0 else vt_
                if renorm == "global":
                    scale = (v.norm() / (v_.norm() + 1e-8)).clamp(renorm_min, 1.0)
                else:
                    scale = (v.norm(dim=-1, keepdim=True) / (v_.norm(dim=-1, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)
                v = v_ * scale
        x = x - v * float(ts[i] - ts[i + 1])
    return unpack_latents(x, grid, 2)


def _test_image(size=(80, 40), seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("renorm", ["global", "channel"])
def test_text_to_image_equals_sequential_reference(pipe, renorm, no_grad):
    prompt = "A photo of a red cat sitting on a wooden table."
    noise = _noise(1, 64, 96)
    ctx = pipe.build_contexts([prompt], think=False)
    # image guidance 1.5 with a no-image context equal to the full one, as the original app runs text-to-image
    expected = _reference_generate(pipe, [ctx.full, ctx.no_text, ctx.no_image], noise, 6, 3.0, 4.0, 1.5, (0.4, 1.0), renorm, 0.0)
    out = pipe(
        prompt, height=64, width=96, num_inference_steps=6, latents=noise, cfg_text_scale=4.0, cfg_img_scale=1.5,
        cfg_interval=(0.4, 1.0), cfg_renorm_type=renorm, output_type="latent",
    ).images  # fmt: skip
    assert (out - expected).abs().max() < 1e-5


def test_edit_with_dual_guidance_equals_sequential_reference(pipe, no_grad):
    image = _test_image()
    noise = _noise(1, 32, 80, seed=1)
    ctx = pipe.build_contexts([image, "Make it blue."], think=False)
    assert ctx.image_size == (32, 80)  # VAE rule, banker's rounding: 40 / 16 = 2.5 -> 2 -> 32
    assert [k for k, _ in ctx.full.segments] == ["vae", "vit", "text"]
    assert [k for k, _ in ctx.no_text.segments] == ["vae", "vit"]
    assert [k for k, _ in ctx.no_image.segments] == ["text"]
    expected = _reference_generate(
        pipe, [ctx.full, ctx.no_text, ctx.no_image], noise, 5, 3.0, 4.0, 2.0, (0.0, 1.0), "text_channel", 0.0
    )
    out = pipe("Make it blue.", image=image, num_inference_steps=5, latents=noise, output_type="latent").images
    assert out.shape == (1, 16, 4, 10)
    assert (out - expected).abs().max() < 1e-5


def test_multi_image_interleaved_contexts(pipe):
    a, b = _test_image(seed=1), _test_image((64, 64), seed=2)
    ctx = pipe.build_contexts([a, b, "Combine them."], think=False)
    assert [k for k, _ in ctx.full.segments] == ["vae", "vit", "vae", "vit", "text"]
    assert [k for k, _ in ctx.no_text.segments] == ["vae", "vit", "vae", "vit"]
    assert [k for k, _ in ctx.no_image.segments] == ["text"]
    ctx = pipe.build_contexts(["first", a, "second"], think=False)
    # snapshot after the image, before the last text
    assert [k for k, _ in ctx.no_text.segments] == ["text", "vae", "vit"]
    out = pipe([a, b, "Combine them."], num_inference_steps=2, output_type="pt", generator=torch.manual_seed(0))
    assert out.images.shape == (1, 3, 64, 64)  # the last image's VAE size


def test_batch_of_two_equals_two_single_calls(pipe, no_grad):
    prompts = ["A red cat.", "A blue dog on the grass, photographed at noon."]
    noise = _noise(2, 64, 64, seed=3)
    batched = pipe(prompts, height=64, width=64, num_inference_steps=4, latents=noise, output_type="latent").images
    for i, prompt in enumerate(prompts):
        single = pipe(prompt, height=64, width=64, num_inference_steps=4, latents=noise[i : i + 1], output_type="latent")
        assert (batched[i] - single.images[0]).abs().max() < 1e-5


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_seeded_images_are_the_same_alone_or_in_a_batch(pipe, no_grad, task):
    # Bit for bit, pixels included (`bagel serve` batches concurrent requests): each prompt's context is prefilled on
    # its own, the time is embedded once, and with batch_invariant the boundary tokens of each row run per row.
    prompts = ["A red cat.", "A blue dog on the grass, photographed at noon.", "A cat.", "Two birds."]
    images = None
    if task == "edit":
        sources = [PIL.Image.fromarray(np.full((64, 64, 3), 40 * i + 30, dtype=np.uint8)) for i in range(4)]
        images = [[source] for source in sources]
        prompts = ["Make it red.", "Turn the picture upside down, slowly and carefully.", "Blur it.", "Make it red."]
    options = {"height": 64, "width": 64, "num_inference_steps": 3, "output_type": "np", "cfg_interval": (0.5, 1.0),
               "batch_invariant": True}  # fmt: skip
    batched = pipe(prompts, image=images, generator=[torch.Generator().manual_seed(i) for i in range(4)], **options)
    for i, prompt in enumerate(prompts):
        alone = pipe([prompt], image=None if images is None else [images[i]],
                     generator=[torch.Generator().manual_seed(i)], **options)  # fmt: skip
        assert np.array_equal(batched.images[i], alone.images[0]), f"image {i} differs from the one generated alone"


def test_batched_edits_pair_one_image_per_prompt_and_refuse_other_counts(pipe, no_grad):
    """`pipe([p1, p2], image=[a, b])` edits `a` with `p1` and `b` with `p2` (paired in order, as diffusers pairs a
    batch's images), exactly as `image=[[a], [b]]` and as each edit alone; one image goes to every prompt; a count
    that fits neither is refused before any work, saying how to give a prompt several images."""
    a, b, c = (PIL.Image.fromarray(np.full((64, 64, 3), value, dtype=np.uint8)) for value in (30, 130, 230))
    contexts = [[kind for kind, _ in pipe.build_contexts(items, think=False).full.segments] for items in
                pipe.normalize_prompts(["Make it red.", "Blur it."], [a, b])]  # fmt: skip
    assert contexts == [["vae", "vit", "text"]] * 2  # one image each, not both
    options = {"num_inference_steps": 2, "output_type": "latent"}
    seeds = lambda: [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]  # noqa: E731
    paired = pipe(["Make it red.", "Blur it."], image=[a, b], generator=seeds(), **options).images
    lists = pipe(["Make it red.", "Blur it."], image=[[a], [b]], generator=seeds(), **options).images
    alone = pipe("Blur it.", image=b, generator=torch.Generator().manual_seed(1), **options).images
    assert torch.equal(paired, lists) and (paired[1] - alone[0]).abs().max() < 1e-5
    shared = pipe.normalize_prompts(["Make it red.", "Blur it."], [a])
    assert [[item for item in items if not isinstance(item, str)] for items in shared] == [[a], [a]]
    assert pipe.normalize_prompts("Combine them.", [a, b])[0][:2] == [a, b]  # one prompt: all its images
    with pytest.raises(ValueError, match=r"3 images for 2 prompts: give one image per prompt .* list of image lists"):
        pipe(["Make it red.", "Blur it."], image=[a, b, c], **options)
    with pytest.raises(ValueError, match="mixes images and lists of images"):
        pipe(["Make it red.", "Blur it."], image=[a, [b]], **options)


def test_generator_reproducible_and_output_types(pipe):
    kwargs = {"height": 32, "width": 48, "num_inference_steps": 2}
    first = pipe("a cat", generator=torch.manual_seed(7), output_type="np", **kwargs)
    second = pipe("a cat", generator=torch.manual_seed(7), output_type="np", **kwargs)
    assert isinstance(first, BagelPipelineOutput)
    assert first.images.shape == (1, 32, 48, 3) and first.images.dtype == np.float32
    assert np.array_equal(first.images, second.images)
    pil = pipe("a cat", generator=torch.manual_seed(7), output_type="pil", **kwargs).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (48, 32)
    # uint8 by truncation, as the original
    assert np.array_equal(np.asarray(pil[0]), (first.images[0] * 255).astype(np.uint8))
    images, text = pipe("a cat", generator=torch.manual_seed(7), output_type="pt", return_dict=False, **kwargs)
    assert images.shape == (1, 3, 32, 48) and text is None
    many = pipe(["a cat", "a dog"], num_images_per_prompt=2, generator=torch.manual_seed(0), output_type="latent", **kwargs)
    assert many.images.shape == (4, 16, 4, 6)


def test_callback_sees_and_replaces_latents(pipe):
    seen = []

    def callback(pipeline, step, timestep, kwargs):
        seen.append((step, kwargs["latents"].shape))
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = pipe(
        "a cat", height=32, width=32, num_inference_steps=3, output_type="latent",
        callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"],
    )  # fmt: skip
    assert [s for s, _ in seen] == [0, 1, 2] and seen[0][1] == (1, 16, 4, 4)
    assert torch.equal(out.images, torch.zeros(1, 16, 4, 4))


def test_cfg_branches_outside_interval_are_not_computed(pipe, monkeypatch):
    calls = []
    original = pipe.model.predict_velocity

    def counting(latents, *args, **kwargs):
        calls.append(latents.shape[0])
        return original(latents, *args, **kwargs)

    monkeypatch.setattr(pipe.model, "predict_velocity", counting)
    pipe("a cat", height=32, width=32, num_inference_steps=4, cfg_interval=(0.5, 1.0), cfg_img_scale=1.0, output_type="latent")
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(4, timestep_shift=3.0)
    expected = [2 if 0.5 < float(s) <= 1.0 else 1 for s in scheduler.sigmas[:-1]]
    assert calls == expected and 1 in calls and 2 in calls


def test_caches_do_not_grow_during_denoising(pipe):
    contexts = [pipe.build_contexts(["a cat"], think=False)]
    guidance = pipe.prepare_guidance(contexts, 4.0, 1.0, (0.0, 1.0), "global", 0.0)
    before = guidance.context.cache.get_seq_length()
    x = torch.randn(1, 4, 64)
    for t in (1.0, 0.5):
        pipe.guided_velocity(x, t, (2, 2), guidance)
    assert guidance.context.cache.get_seq_length() == before == guidance.context.num_keys


def test_thinking_mode_returns_text_and_conditions_on_it(pipe):
    out = pipe("a cat", think=True, max_think_tokens=5, height=32, width=32, num_inference_steps=2, output_type="latent")
    assert isinstance(out.text, list) and len(out.text) == 1 and isinstance(out.text[0], str)
    ctx = pipe.build_contexts(["a cat"], think=True)
    assert ctx.full.segments[0][1].startswith("You should first think about the planning process")
    assert ctx.no_image.segments[0] == ctx.full.segments[0]
    # the text-guidance snapshot is taken from the full context just before the prompt: it keeps the system prompt
    assert ctx.no_text.segments == ctx.full.segments[:1]


def test_thinking_text_with_image_tokens_is_used_as_plain_text(pipe):
    """A thought that samples image tokens (random weights do) still conditions the image: the tokens are dropped
    from the text put back into the context instead of being taken for image slots."""
    config = pipe.model.config
    bias = {(config.image_token_id,): 1e4}
    original_generate = pipe.model.generate

    def biased_generate(*args, **kwargs):
        return original_generate(*args, sequence_bias=bias, **kwargs)

    pipe.model.generate = biased_generate
    try:
        out = pipe("a cat", think=True, max_think_tokens=4, height=32, width=32, num_inference_steps=2,
                   output_type="latent", generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        del pipe.model.generate
    assert out.text == [""] and torch.isfinite(out.images).all()


def test_thinking_plans_once_per_prompt_and_each_image_is_conditioned_on_its_plan(pipe, no_grad):
    """With several images per prompt, a greedy plan is the prompt's (its images are those of the prompt generated one
    image at a time); sampled, each image gets a plan of its own and is conditioned on that plan only."""
    noise = _noise(2, 32, 32, seed=4)
    call = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent", "max_think_tokens": 4}
    both = pipe("a cat", think=True, num_images_per_prompt=2, latents=noise, **call)
    assert both.text[0] == both.text[1]
    for i in range(2):
        alone = pipe("a cat", think=True, latents=noise[i : i + 1], **call)
        assert alone.text == [both.text[i]]
        assert (both.images[i] - alone.images[0]).abs().max() < 1e-5
    prefilled = []
    prepare = pipe.prepare_guidance
    pipe.prepare_guidance = lambda contexts, *args, **kwargs: prefilled.append(contexts) or prepare(contexts, *args, **kwargs)
    try:
        torch.manual_seed(0)
        sampled = pipe("a cat", think=True, think_do_sample=True, num_images_per_prompt=2, latents=noise, **call)
    finally:
        del pipe.prepare_guidance
    fulls = [[value for _, value in contexts.full.segments] for contexts in prefilled[0]]
    assert [full[-1] for full in fulls] == sampled.text and fulls[0][:-1] == fulls[1][:-1]
    assert fulls[0][-2] == "a cat"  # the system prompt, the prompt, one plan


def test_contexts_say_where_each_guidance_context_cuts_the_full_one(pipe):
    """`build_contexts` records how many of the full context's first segments each guidance context is, when it opens
    the full context, so the prefill shares those keys without comparing segments."""
    a, b = _test_image(seed=1), _test_image(seed=2)
    for items in (["a cat"], [a, "blue"], ["first", a], ["first", a, "second"], [a], [a, b, "mix"], ["x", "y"]):
        for think in (False, True):
            ctx = pipe.build_contexts(items, think=think)
            full = ctx.full.segments
            assert ctx.no_text.segments == full[: ctx.no_text_cut]
            opens = ctx.no_image.segments == full[: len(ctx.no_image.segments)]
            assert ctx.no_image_cut == (len(ctx.no_image.segments) if opens else None), (items, think)


def test_an_edit_with_thinking_encodes_its_image_once(pipe, monkeypatch, no_grad):
    """Thinking, the position check and the prefill lay the contexts out by one route and share one encoder: the
    input image goes through the VAE once per call."""
    encode = pipe.vae.encode
    calls = []
    monkeypatch.setattr(pipe.vae, "encode", lambda *args, **kwargs: calls.append(1) or encode(*args, **kwargs))
    pipe("Make it blue.", image=_test_image(), think=True, max_think_tokens=3, num_inference_steps=2,
         output_type="latent")  # fmt: skip
    assert len(calls) == 1


# -- bad input ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 40}, "divisible by 16"),
        ({"width": 272}, "exceeds the model's largest image side 256"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"cfg_text_scale": 0.5}, "cfg_text_scale"),
        ({"cfg_img_scale": 0.9}, "cfg_img_scale"),
        ({"cfg_interval": (0.6, 0.4)}, "cfg_interval"),
        ({"cfg_interval": (-0.1, 1.0)}, "cfg_interval"),
        ({"cfg_renorm_type": "local"}, "cfg_renorm_type"),
        ({"latents": torch.zeros(1, 16, 3, 3)}, "`latents` must have shape"),
        ({"output_type": "jpg"}, "output_type"),
        ({"prompt": []}, "empty list"),
        ({"prompt": ""}, "empty"),
        ({"image": 3}, "`image` must be"),
        ({"prompt": ["ok", 3.5]}, "Unsupported input item"),
        ({"prompt": "a <|image_pad|> cat"}, "`prompt` contains \\['<\\|image_pad\\|>'\\]"),
        ({"prompt": ["a cat", "<|vision_start|>"]}, "tokens reserved for image slots"),
    ],
)
def test_bad_input_is_refused_before_any_work(pipe, monkeypatch, kwargs, message):
    def fail(*args, **kw):
        raise AssertionError("the model ran before the input was validated")

    monkeypatch.setattr(pipe.model, "forward", fail)
    monkeypatch.setattr(pipe.vae, "encode", fail)
    call = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 2}
    call.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        pipe(**call)


def test_converted_folder_layout(converted_dir):
    import json

    index = json.loads((converted_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_bagel", "BagelPipeline"]  # diffusers' custom-pipeline form
    assert index["model"] == ["transformers_bagel.modeling_bagel", "BagelForConditionalGeneration"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert (converted_dir / "scheduler" / "scheduler_config.json").is_file()
