"""The denoising engine: TaylorSeer against the original, prefix-shared contexts, any transformers Cache, per-call
state under concurrency, and bad denoising inputs."""

import threading

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.cache_utils import Cache, DynamicCache, QuantizedLayer, StaticCache

from conftest import assert_close_rel, load_expected, load_pipeline
from diffusers_bagel import BagelPipeline
from diffusers_bagel.taylorseer import TaylorSeerState
from transformers_bagel import BagelContext, unpack_latents


def _taylorseer_call(meta, expected):
    """The fixture's call: 64x64, 20 steps, shift 3, text CFG 4 at every step, global renorm, saved noise."""
    return {
        "prompt": meta["prompt"], "height": 64, "width": 64, "num_inference_steps": 20, "timestep_shift": 3.0,
        "cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "cfg_interval": (0.0, 1.0), "cfg_renorm_type": "global",
        "latents": unpack_latents(expected["init_noise"][None], (4, 4), 2), "output_type": "latent",
    }  # fmt: skip


class LayerRuns:
    """Counts, per denoising step, the rows that ran the first decoder layer in a denoising forward."""

    def __init__(self, pipe):
        self.layer = pipe.model.model.language_model.layers[0]
        self.rows, self.step = {}, 0

    def hook(self, module, args, kwargs):
        if kwargs.get("branch_keys") is not None:  # not the context prefill
            self.rows[self.step] = self.rows.get(self.step, 0) + args[0].shape[0]

    def callback(self, pipe, step, timestep, kwargs):
        self.step = step + 1
        return {}

    def __enter__(self):
        self.handle = self.layer.register_forward_pre_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _full_steps(num_calls: int) -> list[int]:
    """The original's schedule (`modeling/cache_utils/taylorseer.py`): the first 5 calls, then every 3rd."""
    full, counter = [], 0
    for step in range(num_calls):
        if step < 5 or counter == 2:
            full.append(step)
            counter = 0
        else:
            counter += 1
    return full


def test_taylorseer_schedule_is_the_originals():
    meta, _ = load_expected("h_taylorseer_t2i")
    recorded = meta["taylorseer"]["step_types_in_call_order"]
    full = [step for step, kind in recorded[::2] if kind == "full"]
    assert full == _full_steps(20) == [0, 1, 2, 3, 4, 7, 10, 13, 16, 19]
    state = TaylorSeerState()
    decided = []
    for _ in range(20):
        decided.append(state.begin_step())
        state.end_step()
    assert [i for i, is_full in enumerate(decided) if is_full] == full
    assert len(_full_steps(50)) == 20  # "for 50 steps 20 of 50 run in full"


def test_taylorseer_matches_original_and_skips_the_layers(pipe, no_grad):
    meta, expected = load_expected("h_taylorseer_t2i")
    call = _taylorseer_call(meta, expected)
    with LayerRuns(pipe) as runs:
        cached = pipe(**call, enable_taylorseer=True, callback_on_step_end=runs.callback).images
    assert_close_rel(cached, expected["taylorseer_final_latent_unpatchified"], 1e-4)
    assert not pipe.model.model.language_model.layers._diffusers_hook.hooks  # the hook belonged to that call
    # the decoder layers run on the full steps only, both branches (cond and text-uncond) at once
    assert runs.rows == {step: 2 for step in _full_steps(20)}
    plain = pipe(**call).images
    assert_close_rel(plain, expected["plain_final_latent_unpatchified"], 1e-4)
    # TaylorSeer really changes the result, by about as much as in the original
    difference = (cached - plain).abs().max() / plain.abs().max()
    assert 2e-3 < difference < 5e-2


def test_call_after_taylorseer_equals_fresh_call(pipe, converted_dir, no_grad):
    meta, expected = load_expected("h_taylorseer_t2i")
    call = dict(_taylorseer_call(meta, expected), num_inference_steps=8)
    fresh = load_pipeline(converted_dir)
    reference = fresh(**call).images
    pipe(**call, enable_taylorseer=True)
    assert torch.equal(pipe(**call).images, reference)
    assert torch.equal(pipe(**call, enable_taylorseer=True).images, fresh(**call, enable_taylorseer=True).images)


def test_taylorseer_branches_count_their_own_steps(pipe, no_grad):
    """With guidance off on the late steps, the text-uncond branch stops counting while the cond branch goes on: each
    follows the schedule over its own calls."""
    steps, interval = 14, (0.5, 1.0)
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, timestep_shift=3.0)
    guided = [scheduler.cfg_active(s, interval) for s in scheduler.sigmas[:-1].tolist()]
    assert 5 < sum(guided) < steps  # both regimes are exercised
    with LayerRuns(pipe) as runs:
        pipe("a cat", height=32, width=32, num_inference_steps=steps, cfg_interval=interval, cfg_img_scale=1.0,
             enable_taylorseer=True, output_type="latent", callback_on_step_end=runs.callback)  # fmt: skip
    cond_full = set(_full_steps(steps))
    text_calls = [step for step in range(steps) if guided[step]]
    text_full = {text_calls[k] for k in _full_steps(len(text_calls))}
    expected = {step: (step in cond_full) + (step in text_full) for step in range(steps)}
    assert runs.rows == {step: rows for step, rows in expected.items() if rows}


def test_taylorseer_no_image_branch_equal_to_full_counts_its_own_steps(pipe, no_grad):
    """Text-to-image with image guidance: the no-image context is the full one. When guidance starts at the first
    step, both branches count the same steps while the image branch is used, so its velocity is the cond branch's
    and it is not run; when guidance starts later, the cond branch has counted steps the image branch has not, so
    with TaylorSeer the image branch runs as its own branch (as the original does), over the full context's keys."""
    call = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 12, "cfg_img_scale": 1.5,
            "enable_taylorseer": True, "output_type": "latent", "latents": torch.randn(1, 16, 4, 4)}  # fmt: skip
    with LayerRuns(pipe) as runs:
        late = pipe(**call, cfg_interval=(0.0, 0.8), callback_on_step_end=runs.callback).images
    assert max(runs.rows.values()) == 3
    with LayerRuns(pipe) as runs:
        early = pipe(**call, cfg_interval=(0.4, 1.0), callback_on_step_end=runs.callback).images
    assert max(runs.rows.values()) == 2
    # the reuse is exact: the same call with the image branch run as a branch of its own
    guidance = pipe.prepare_guidance
    pipe.prepare_guidance = lambda *args, **kwargs: guidance(*args, **{**kwargs, "reuse_full_for_image": False})
    try:
        with LayerRuns(pipe) as runs:
            separate = pipe(**call, cfg_interval=(0.4, 1.0), callback_on_step_end=runs.callback).images
    finally:
        del pipe.prepare_guidance
    assert max(runs.rows.values()) == 3
    assert_close_rel(early, separate, 1e-5)
    assert torch.isfinite(late).all()


def _edit_contexts(pipe):
    import numpy as np
    import PIL.Image

    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return pipe.build_contexts([image, "Make it blue."], think=False)


def test_edit_prefills_each_token_once(pipe, no_grad):
    """The text-guidance context of an edit is the full context before the instruction: its keys are the full
    context's first keys, so the image is prefilled once; the no-image context is prefilled alone, unpadded."""
    contexts = _edit_contexts(pipe)
    forwards = []
    handle = pipe.model.model.language_model.register_forward_hook(lambda module, args, out: forwards.append(1))
    try:
        with FlopCounterMode(display=False) as shared:
            guidance = pipe.prepare_guidance([contexts], 4.0, 2.0, (0.0, 1.0), "text_channel", 0.0)
    finally:
        handle.remove()
    # The VAE block, the ViT block, and the instruction after the image and alone (the no-image context) in one
    # forward of two rows.
    assert len(forwards) == 3
    cond, text, image = (guidance.spans[kind][0] for kind in ("cond", "text", "image"))
    assert text.start == cond.start == 0 and 0 < text.length < cond.length
    assert image.start == cond.end and guidance.context.num_keys == cond.length + image.length
    assert image.length == cond.length - text.length and image.next_position == image.length
    with FlopCounterMode(display=False) as alone:
        for segments in (contexts.full, contexts.no_image):
            single = pipe.prepare_guidance(
                [type(contexts)(segments, segments, segments, contexts.image_size, contexts.has_images)],
                1.0, 1.0, (0.0, 1.0), "global", 0.0,
            )  # fmt: skip
            assert single.context.num_keys == single.spans["cond"][0].length
    # The same work as prefilling the two contexts alone, up to the no-image tokens' masked scores against the full
    # context's keys in the shared row and one more one-token logits head (0.01% here).
    assert shared.get_total_flops() <= 1.001 * alone.get_total_flops()


@pytest.mark.parametrize("cache_class", ["dynamic", "static", "quantized"])
def test_any_cache_class(pipe, cache_class, no_grad):
    """Prefill and denoising go through the Cache API only: DynamicCache, StaticCache and a quantized cache (the
    KIVI-style QuantizedLayer with a float16 round trip as its quantizer) give the velocities of the default cache."""
    contexts = _edit_contexts(pipe)
    config = pipe.model.config.text_config
    if cache_class == "dynamic":
        cache = DynamicCache()
    elif cache_class == "static":
        cache = StaticCache(config=config, max_cache_len=256)
    else:

        class HalfLayer(QuantizedLayer):
            def _quantize(self, tensor, axis):
                return tensor.half()

            def _dequantize(self, q_tensor):
                return q_tensor.float()

        cache = Cache(layers=[HalfLayer(residual_length=8) for _ in range(config.num_hidden_layers)])
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    reference = pipe.prepare_guidance([contexts], 4.0, 2.0, (0.0, 1.0), "text_channel", 0.0)
    guidance = pipe.prepare_guidance([contexts], 4.0, 2.0, (0.0, 1.0), "text_channel", 0.0, cache=cache)
    assert guidance.context.cache is cache
    for t in (0.9, 0.5):
        expected = pipe.guided_velocity(x, t, (4, 4), reference)
        actual = pipe.guided_velocity(x, t, (4, 4), guidance)
        assert_close_rel(actual, expected, 1e-5 if cache_class != "quantized" else 2e-2)
    assert int(cache.get_seq_length()) == guidance.context.num_keys


@pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers' offloaded cache streams need CUDA")
def test_offloaded_cache_on_gpu(converted_dir, no_grad):
    gpu = BagelPipeline.from_pretrained(converted_dir).to("cuda")
    gpu.set_progress_bar_config(disable=True)
    call = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 3, "output_type": "latent"}
    contexts = [gpu.build_contexts(["a cat"], think=False)]
    plain = gpu.prepare_guidance(contexts, 4.0, 1.0, (0.0, 1.0), "global", 0.0)
    offloaded = gpu.prepare_guidance(contexts, 4.0, 1.0, (0.0, 1.0), "global", 0.0, cache=DynamicCache(offloading=True))
    x = torch.randn(1, 4, 64, device="cuda")
    assert_close_rel(gpu.guided_velocity(x, 0.7, (2, 2), offloaded), gpu.guided_velocity(x, 0.7, (2, 2), plain), 1e-5)
    assert gpu(**call).images.isfinite().all()


def test_concurrent_calls_equal_sequential_calls(pipe):
    """Per-call state: four threads on one pipeline (text-to-image and an edit, plain and TaylorSeer) get exactly what
    the same calls give one after another."""
    contexts = _edit_contexts(pipe)
    image = contexts.full.segments[0][1]
    calls = [
        {"prompt": "a red cat", "height": 32, "width": 48, "num_inference_steps": 6},
        {"prompt": "a blue dog", "height": 48, "width": 32, "num_inference_steps": 7, "enable_taylorseer": True},
        {"prompt": "Make it blue.", "image": image, "num_inference_steps": 6},
        {"prompt": "a green bird", "height": 32, "width": 32, "num_inference_steps": 9, "enable_taylorseer": True},
    ]
    for seed, call in enumerate(calls):
        call.update(output_type="latent", generator=torch.Generator().manual_seed(seed))

    def run(call):
        call = dict(call, generator=torch.Generator().manual_seed(call["generator"].initial_seed()))
        return pipe(**call).images

    sequential = [run(call) for call in calls]
    results, errors = [None] * len(calls), []

    def worker(i):
        try:
            results[i] = run(calls[i])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for got, want in zip(results, sequential):
        assert torch.equal(got, want)


def test_bad_denoising_inputs_are_refused(pipe, no_grad):
    model = pipe.model
    context = BagelContext()
    span = model.prefill_context(torch.tensor([[401, 30, 402]]), context, context.new_span()).context_span
    x = torch.randn(2, 4, 64)
    with pytest.raises(ValueError, match="2 spans for 1 rows|holds 1 spans for 2 rows"):
        model.predict_velocity(x, 0.5, (2, 2), context, [span])
    with pytest.raises(ValueError, match="grid 2x3 needs 6"):
        model.predict_velocity(x, 0.5, (2, 3), context, [span, span])
    with pytest.raises(ValueError, match="must be \\(rows, h \\* w, patch_latent_dim\\)"):
        model.predict_velocity(x[0], 0.5, (2, 2), context, [span])
    with pytest.raises(TypeError, match="prefill_context.*predict_velocity"):
        model(input_ids=torch.tensor([[401]]), context=context, context_spans=span)
    with pytest.raises(TypeError, match="takes no `update_cache`"):
        model.model(input_ids=torch.tensor([[401]]), update_cache=False)
    with pytest.raises(ValueError, match="each row of `input_ids` to its own span: got 2 rows and 1 spans"):
        model.prefill_context(torch.tensor([[401], [401]]), context, context.new_span())
    with pytest.raises(ValueError, match="Only the first row of a prefill may extend a context"):
        model.prefill_context(torch.tensor([[401], [401]]), context, [context.new_span(), span])
    with pytest.raises(ValueError, match="Only the last context"):
        other = model.prefill_context(torch.tensor([[401]]), context, context.new_span()).context_span
        model.prefill_context(torch.tensor([[30]]), context, span)
    assert other.start == span.end
    with pytest.raises(TypeError, match="must be a transformers Cache"):
        BagelContext(cache={})


@pytest.mark.slow
def test_compiled_denoising_step_is_one_graph(converted_dir, no_grad):
    """`compile_denoising()`: a 5-step call compiles the layer stack once (fullgraph, no break, no recompilation
    across steps) and matches eager."""
    from torch._dynamo.utils import counters

    pipeline = load_pipeline(converted_dir)
    call = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 5, "cfg_interval": (0.0, 1.0),
            "output_type": "latent"}  # fmt: skip
    eager = pipeline(**call, generator=torch.Generator().manual_seed(0)).images
    torch._dynamo.reset()
    counters.clear()
    pipeline.model.compile_denoising()
    try:
        compiled = pipeline(**call, generator=torch.Generator().manual_seed(0)).images
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"] and not counters["recompiles"]
        assert_close_rel(compiled, eager, 1e-5)
    finally:
        pipeline.model.compile_denoising(disable=True)
        torch._dynamo.reset()


def test_cache_only_prefill_stores_the_same_keys_without_the_last_layers_work(pipe, no_grad):
    """`cache_only=True` (the pipeline's context prefills): every layer's keys and values are exactly those of a full
    forward, while the last layer runs no query, attention, output projection or MLP and no logits are computed."""
    model = pipe.model
    contexts = _edit_contexts(pipe)
    inputs = pipe.encode_contexts([contexts.full], None, sample_posterior=False)
    inputs.pop("attention_mask")
    num_tokens = inputs["input_ids"].shape[1]
    last = model.model.language_model.layers[-1]
    skipped = [last.self_attn.q_proj, last.self_attn.q_proj_moe_gen, last.self_attn.o_proj, last.self_attn.o_proj_moe_gen,
               last.mlp, last.mlp_moe_gen, model.lm_head]  # fmt: skip
    calls = []
    handles = [module.register_forward_hook(lambda *_: calls.append(1)) for module in skipped]
    try:
        with FlopCounterMode(display=False) as full_flops:
            full = model(**inputs, cache=DynamicCache(), use_cache=True)
        assert calls
        calls.clear()
        with FlopCounterMode(display=False) as kv_flops:
            kv = model(**inputs, cache=DynamicCache(), use_cache=True, cache_only=True)
        assert not calls
    finally:
        for handle in handles:
            handle.remove()
    assert kv.logits is None and full.logits is not None
    for full_layer, kv_layer in zip(full.cache.layers, kv.cache.layers, strict=True):
        assert torch.equal(full_layer.keys, kv_layer.keys) and torch.equal(full_layer.values, kv_layer.values)
    config = model.config.text_config
    q_and_o = 2 * config.hidden_size * config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    per_token = 2 * (q_and_o + 3 * config.hidden_size * config.intermediate_size)  # multiply-adds of the skipped linears
    assert full_flops.get_total_flops() - kv_flops.get_total_flops() >= per_token * num_tokens

    # The context path (a prefill into a BagelContext) gives the same keys too.
    context = BagelContext()
    span = model.prefill_context(**inputs, context=context, context_spans=context.new_span(), cache_only=True)
    span = span.context_span
    assert span.length == num_tokens
    for full_layer, context_layer in zip(full.cache.layers, context.cache.layers, strict=True):
        assert torch.equal(full_layer.keys, context_layer.keys)


def test_cache_only_is_refused_where_it_cannot_apply(pipe, no_grad):
    model = pipe.model
    ids = torch.tensor([[401, 30, 402]])
    with pytest.raises(ValueError, match="needs a cache to fill"):
        model(input_ids=ids, use_cache=False, cache_only=True)
    with pytest.raises(ValueError, match="no loss"):
        model(input_ids=ids, labels=ids, cache_only=True)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        model(input_ids=ids, use_cache=True, cache_only=True, output_hidden_states=True)
    context = BagelContext()
    span = model.prefill_context(ids, context, context.new_span(), cache_only=True).context_span
    assert span.length == 3 and context.num_keys == 3
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        model.prefill_context(ids, context, span, cache_only=True, output_hidden_states=True)
