"""BagelPipeline's diffusers conventions: the rendered example, per-call properties and `_interrupt`, callback objects,
one `check_inputs` per call, `prepare_latents` dtypes, and post-processing through diffusers' `VaeImageProcessor`."""

import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback
from diffusers.image_processor import VaeImageProcessor

from conftest import load_pipeline
from diffusers_bagel import BagelPipeline
from diffusers_bagel.pipeline_bagel import EXAMPLE_DOC_STRING, BagelVaeImageProcessor
from transformers_bagel import pack_latents


DIGITS_CHECKPOINT = Path(__file__).resolve().parents[3] / "checkpoints" / "tiny-bagel-digits"
CALL = {"prompt": "a cat", "height": 32, "width": 48}


def _fresh(pipe) -> BagelPipeline:
    """A new pipeline object on the same components: no call has run on it yet."""
    fresh = BagelPipeline(**pipe.components)
    fresh.set_progress_bar_config(disable=True)
    return fresh


def _decode_like_the_original(pipe, latents: torch.Tensor) -> np.ndarray:
    """The VAE decode of normalised latents, `[-1, 1]` -> `[0, 1]`, as `(batch, H, W, 3)` float32."""
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    return (decoded.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _example_code() -> str:
    return "\n".join(line.strip()[4:] for line in EXAMPLE_DOC_STRING.splitlines() if line.strip().startswith(">>> "))


# -- example docstring --------------------------------------------------------------------------------------------------


def test_call_docstring_holds_the_example():
    doc = BagelPipeline.__call__.__doc__
    code_lines = [line.strip() for line in EXAMPLE_DOC_STRING.splitlines() if line.strip().startswith(">>> ")]
    assert len(code_lines) >= 5
    for line in code_lines:
        assert line in doc
    assert 'pipe("Make the cat blue.", image=image).images[0]' in doc
    # the placeholder was filled (once), between the arguments and the return value
    assert doc.count("Examples:") == 1
    assert doc.index("callback_on_step_end_tensor_inputs") < doc.index("Examples:") < doc.index("Returns:")
    compile(_example_code(), "EXAMPLE_DOC_STRING", "exec")


def test_example_runs_on_the_shipped_checkpoint(monkeypatch):
    """The example's code as written, on the tiny digits checkpoint and the CPU (2 steps a call instead of 50)."""
    call = BagelPipeline.__call__

    def two_steps(self, *args, **kwargs):
        kwargs.setdefault("num_inference_steps", 2)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(BagelPipeline, "__call__", two_steps)
    code = _example_code()
    assert code.count('"bagel-7b-hf"') == 1 and code.count('.to("cuda")') == 1
    code = code.replace('"bagel-7b-hf"', repr(str(DIGITS_CHECKPOINT))).replace('.to("cuda")', "")
    namespace = {}
    exec(code, namespace)  # noqa: S102 - the docstring's own example
    assert namespace["pipe"].model.dtype == torch.bfloat16  # `dtype=` reached the model
    side = namespace["pipe"].default_sample_size
    for name in ("image", "edited", "both"):
        assert isinstance(namespace[name], PIL.Image.Image) and namespace[name].size == (side, side)


# -- properties and interrupt -------------------------------------------------------------------------------------------


def test_properties_hold_each_calls_values(pipe):
    fresh = _fresh(pipe)
    assert fresh.num_timesteps is None and fresh.cfg_text_scale is None and fresh.interrupt is False
    seen = []

    def record(pipeline, step, timestep, kwargs):
        seen.append((pipeline.num_timesteps, pipeline.cfg_text_scale, pipeline.cfg_img_scale, pipeline.cfg_interval,
                     pipeline.cfg_renorm_type, pipeline.interrupt))  # fmt: skip
        return kwargs

    # text-to-image: the preset fills what the call leaves unset
    fresh(**CALL, num_inference_steps=3, cfg_text_scale=5.0, output_type="latent", callback_on_step_end=record)
    assert seen == [(3, 5.0, 1.5, (0.4, 1.0), "global", False)] * 3
    assert (fresh.num_timesteps, fresh.cfg_text_scale, fresh.cfg_img_scale) == (3, 5.0, 1.5)
    assert (fresh.cfg_interval, fresh.cfg_renorm_type) == ((0.4, 1.0), "global")

    # an edit: the edit preset, and the properties now give the most recent call's values
    seen.clear()
    image = PIL.Image.fromarray(np.full((32, 48, 3), 200, dtype=np.uint8))
    fresh("Make it blue.", image=image, num_inference_steps=2, cfg_interval=[0.1, 0.9], output_type="latent",
          callback_on_step_end=record)  # fmt: skip
    assert seen == [(2, 4.0, 2.0, (0.1, 0.9), "text_channel", False)] * 2
    assert (fresh.num_timesteps, fresh.cfg_text_scale, fresh.cfg_img_scale) == (2, 4.0, 2.0)
    assert (fresh.cfg_interval, fresh.cfg_renorm_type) == ((0.1, 0.9), "text_channel")


def test_interrupt_in_callback_stops_after_that_step_and_decodes(pipe, monkeypatch):
    fresh = _fresh(pipe)
    steps, latents_seen = [], []

    def stop_at_step_1(pipeline, step, timestep, kwargs):
        steps.append(step)
        latents_seen.append(kwargs["latents"].clone())
        if step == 1:
            pipeline._interrupt = True
        return kwargs

    forwards = []
    predict_velocity = fresh.model.predict_velocity

    def counting(*args, **kwargs):
        forwards.append(1)
        return predict_velocity(*args, **kwargs)

    monkeypatch.setattr(fresh.model, "predict_velocity", counting)
    call = dict(CALL, num_inference_steps=5, generator=torch.Generator().manual_seed(0))
    out = fresh(**call, output_type="np", callback_on_step_end=stop_at_step_1)
    assert steps == [0, 1] and len(forwards) == 2  # out of the loop after 2 of 5 steps
    assert fresh.interrupt is True and fresh._interrupt is True  # the call's value, kept as the most recent
    # ...and the latents after step 1 are decoded
    assert out.images.shape == (1, 32, 48, 3)
    assert np.array_equal(out.images, _decode_like_the_original(fresh, latents_seen[1]))

    # The next call starts uninterrupted and runs all its steps; its latents differ from the interrupted ones.
    steps.clear()
    full = fresh(**dict(call, generator=torch.Generator().manual_seed(0)), output_type="latent",
                 callback_on_step_end=lambda pipeline, step, timestep, kwargs: steps.append(step) or kwargs)  # fmt: skip
    assert steps == [0, 1, 2, 3, 4] and fresh.interrupt is False
    assert (full.images - latents_seen[1]).abs().max() > 0.1


def test_interrupt_set_from_another_thread_stops_the_running_call(pipe):
    """As with a diffusers pipeline, a "stop" button's thread may set `pipe._interrupt` while a call runs."""
    fresh = _fresh(pipe)
    at_step_0, interrupted, steps = threading.Event(), threading.Event(), []

    def wait_for_the_button(pipeline, step, timestep, kwargs):
        steps.append(step)
        if step == 0:
            at_step_0.set()
            assert interrupted.wait(60)
        return kwargs

    def button():
        assert at_step_0.wait(60)
        fresh._interrupt = True
        interrupted.set()

    thread = threading.Thread(target=button)
    thread.start()
    fresh(**CALL, num_inference_steps=4, output_type="latent", callback_on_step_end=wait_for_the_button)
    thread.join()
    assert steps == [0]


def test_concurrent_calls_run_one_after_another_and_match_calls_run_alone(pipe):
    """Two threads on one pipeline: the calls run one after another (a call's values, the scheduler and step-cache
    hooks live on the pipeline, as in diffusers), each callback reads its own call's values, and each result is
    bit-identical to the same call run alone: never a mix."""
    fresh = _fresh(pipe)
    calls = {
        "a": dict(CALL, prompt="a red cat", num_inference_steps=4, cfg_text_scale=5.0),
        "b": dict(CALL, prompt="a blue dog", num_inference_steps=6, cfg_text_scale=3.0, cfg_renorm_type="channel"),
    }
    order, seen, results, errors = [], {"a": [], "b": []}, {}, []
    started = threading.Barrier(2, timeout=120)

    def callback_for(name):
        def callback(pipeline, step, timestep, kwargs):
            order.append(name)
            seen[name].append((step, pipeline.num_timesteps, pipeline.cfg_text_scale, pipeline.cfg_renorm_type,
                               pipeline.interrupt))  # fmt: skip
            time.sleep(0.02)  # room for the other thread to step in, were calls allowed to overlap
            return kwargs

        return callback

    def worker(name):
        try:
            started.wait()
            results[name] = fresh(**calls[name], output_type="latent", generator=torch.Generator().manual_seed(1),
                                  callback_on_step_end=callback_for(name)).images  # fmt: skip
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert order in (["a"] * 4 + ["b"] * 6, ["b"] * 6 + ["a"] * 4)  # one call, then the other: no interleaving
    assert seen["a"] == [(step, 4, 5.0, "global", False) for step in range(4)]
    assert seen["b"] == [(step, 6, 3.0, "channel", False) for step in range(6)]
    for name, call in calls.items():
        alone = fresh(**call, output_type="latent", generator=torch.Generator().manual_seed(1)).images
        assert torch.equal(results[name], alone), name


def test_a_call_after_an_interrupted_one_starts_uninterrupted_even_on_another_thread(pipe):
    fresh = _fresh(pipe)
    fresh(**CALL, num_inference_steps=3, output_type="latent",
          callback_on_step_end=lambda pipeline, step, t, kwargs: setattr(pipeline, "_interrupt", True) or kwargs)
    assert fresh.interrupt is True
    steps = []
    thread = threading.Thread(target=lambda: fresh(**CALL, num_inference_steps=3, output_type="latent",
                                                   callback_on_step_end=lambda p, step, t, kw: steps.append(step) or kw))
    thread.start()
    thread.join()
    assert steps == [0, 1, 2] and fresh.interrupt is False


# -- callbacks ----------------------------------------------------------------------------------------------------------


class _RecordLatents(PipelineCallback):
    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.seen = getattr(self, "seen", []) + [(step_index, callback_kwargs["latents"].clone())]
        return callback_kwargs


class _ZeroLatentsAt(PipelineCallback):
    """Replaces the latents by zeros at step `cutoff_step_index`."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == self.config.cutoff_step_index:
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return callback_kwargs


def test_pipeline_callback_receives_latents_from_its_tensor_inputs(pipe):
    record = _RecordLatents()
    # a callback object's `tensor_inputs` replace `callback_on_step_end_tensor_inputs` (diffusers' convention)
    out = pipe(**CALL, num_inference_steps=3, output_type="latent", callback_on_step_end=record,
               callback_on_step_end_tensor_inputs=[])  # fmt: skip
    assert [step for step, _ in record.seen] == [0, 1, 2]
    assert record.seen[0][1].shape == (1, 16, 4, 6)
    assert torch.equal(record.seen[-1][1], out.images)  # the latents after the last step are the output
    assert not torch.equal(record.seen[0][1], record.seen[1][1])


def test_multi_pipeline_callbacks_run_in_order_and_replace_latents(pipe):
    record_before, record_after = _RecordLatents(), _RecordLatents()
    callbacks = MultiPipelineCallbacks(
        [record_before, _ZeroLatentsAt(cutoff_step_ratio=None, cutoff_step_index=2), record_after]
    )
    out = pipe(**CALL, num_inference_steps=3, output_type="latent", callback_on_step_end=callbacks)
    assert [step for step, _ in record_before.seen] == [0, 1, 2]
    assert record_before.seen[2][1].abs().max() > 0.1  # the real latents reached the first callback...
    assert torch.equal(record_after.seen[2][1], torch.zeros(1, 16, 4, 6))  # ...the zeros the third one
    assert torch.equal(out.images, torch.zeros(1, 16, 4, 6))  # and replaced the latents


def test_plain_callback_gets_latents_by_default(pipe):
    received = []

    def callback(pipeline, step, timestep, kwargs):
        received.append(sorted(kwargs))
        return {}

    pipe(**CALL, num_inference_steps=2, output_type="latent", callback_on_step_end=callback)
    assert received == [["latents"], ["latents"]]
    received.clear()
    pipe(**CALL, num_inference_steps=2, output_type="latent", callback_on_step_end=callback,
         callback_on_step_end_tensor_inputs=[])  # fmt: skip
    assert received == [[], []]


def test_callback_object_asking_for_other_tensors_is_refused(pipe, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model ran before the callback's tensor inputs were checked")

    monkeypatch.setattr(pipe.model, "forward", fail)
    with pytest.raises(ValueError, match=r"subset of \['latents'\], got \['prompt_embeds'\]"):
        pipe(**CALL, num_inference_steps=2, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    with pytest.raises(TypeError, match="must be a callable"):
        pipe(**CALL, num_inference_steps=2, callback_on_step_end="latents")


# -- checks, latents, post-processing -----------------------------------------------------------------------------------


def test_check_inputs_runs_once_with_the_resolved_size(pipe, monkeypatch):
    checked = []
    check_inputs = pipe.check_inputs

    def recording(height, width, *args, **kwargs):
        checked.append((height, width))
        return check_inputs(height, width, *args, **kwargs)

    monkeypatch.setattr(pipe, "check_inputs", recording)
    pipe(**CALL, num_inference_steps=1, output_type="latent")
    assert checked == [(32, 48)]
    checked.clear()
    image = PIL.Image.fromarray(np.zeros((40, 80, 3), dtype=np.uint8))  # VAE size (32, 80)
    pipe("Make it blue.", image=image, num_inference_steps=1, output_type="latent")
    assert checked == [(32, 80)]
    checked.clear()
    pipe("a cat", width=32, num_inference_steps=1, output_type="latent")
    assert checked == [(pipe.default_sample_size, 32)]


def test_zero_size_is_refused_not_defaulted(pipe):
    with pytest.raises(ValueError, match="`height` must be a positive integer, got 0"):
        pipe("a cat", height=0, width=32, num_inference_steps=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float32])
def test_prepare_latents_honours_dtype(pipe, dtype):
    drawn = pipe.prepare_latents(2, 32, 48, dtype, torch.device("cpu"), torch.Generator().manual_seed(4))
    expected = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(4), dtype=dtype)
    assert drawn.dtype == dtype and drawn.shape == (2, 6, 64)
    assert torch.equal(drawn, pack_latents(expected, 2))
    given = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(5))
    cast = pipe.prepare_latents(2, 32, 48, dtype, torch.device("cpu"), None, given)
    assert cast.dtype == dtype and torch.equal(cast, pack_latents(given.to(dtype), 2))


def test_postprocessing_is_vae_image_processor_with_truncated_pil(pipe):
    assert isinstance(pipe.image_processor, VaeImageProcessor)
    assert pipe.image_processor.config.vae_scale_factor == 16 and pipe.image_processor.config.do_normalize
    call = dict(CALL, num_inference_steps=2)
    latents = pipe(**call, generator=torch.manual_seed(3), output_type="latent").images
    np_images = pipe(**call, generator=torch.manual_seed(3), output_type="np").images
    pt_images = pipe(**call, generator=torch.manual_seed(3), output_type="pt").images
    pil = pipe(**call, generator=torch.manual_seed(3), output_type="pil").images
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    # "np" and "pt": diffusers' own post-processing, the original's numbers
    assert np.array_equal(np_images, VaeImageProcessor().postprocess(decoded, output_type="np"))
    assert np.array_equal(np_images, _decode_like_the_original(pipe, latents))
    assert torch.equal(pt_images, VaeImageProcessor().postprocess(decoded, output_type="pt"))
    # "pil": truncated as the original, where diffusers' `numpy_to_pil` would round many pixels up
    truncated = (np_images[0] * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(pil[0]), truncated)
    rounded = np.asarray(VaeImageProcessor.numpy_to_pil(np_images)[0])
    assert (rounded != truncated).mean() > 0.2


def test_truncating_numpy_to_pil():
    images = np.array([[[0.0, 0.5, 1.0], [0.999, 0.0039, 0.0041]]], dtype=np.float32)  # one 1x2 image
    (image,) = BagelVaeImageProcessor.numpy_to_pil(images)
    assert np.asarray(image).tolist() == [[[0, 127, 255], [254, 0, 1]]]
    assert np.asarray(VaeImageProcessor.numpy_to_pil(images)[0]).tolist() == [[[0, 128, 255], [255, 1, 1]]]
    batch = BagelVaeImageProcessor.numpy_to_pil(np.stack([images, images[:, ::-1]]))
    assert len(batch) == 2 and np.asarray(batch[1]).tolist() == [[[254, 0, 1], [0, 127, 255]]]


def test_every_component_is_required():
    expected, optional = BagelPipeline._get_signature_keys(BagelPipeline)
    assert expected == ["model", "processor", "scheduler", "vae"] and optional == []
    assert BagelPipeline._optional_components == []
