"""diffusers' step caches (FirstBlockCache, MagCache, TaylorSeerCache) on the denoising steps' decoder layers, and
diffusers' offloading hooks on the pipeline."""

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

from conftest import assert_close_rel, load_pipeline



CALL = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 20, "cfg_interval": (0.0, 1.0),
        "output_type": "latent"}  # fmt: skip


def _pipe(converted_dir):
    return load_pipeline(converted_dir, attn_implementation=None)


@pytest.fixture(scope="module")
def pipe(converted_dir):
    return _pipe(converted_dir)


def _run(pipe, **kwargs):
    return pipe(**{**CALL, **kwargs}, generator=torch.Generator().manual_seed(0)).images


class GenMlpRuns:
    """Counts the forwards of one decoder layer's generation-expert MLP: it runs when the layer computes, not when a
    step cache returns its output."""

    def __init__(self, pipe):
        self.mlp = pipe.model.model.language_model.layers[1].mlp_moe_gen
        self.count = 0

    def __enter__(self):
        self.handle = self.mlp.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize(
    ("config", "max_runs"),
    [
        (FirstBlockCacheConfig(threshold=0.2), 10),
        (TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=3, taylor_factors_dtype=torch.float32), 12),
        (MagCacheConfig(num_inference_steps=20, mag_ratios=[1.0] + [1.003] * 19, threshold=0.06), 12),
    ],
    ids=["first_block", "taylorseer", "mag"],
)
def test_diffusers_step_caches_skip_decoder_layers(pipe, config, max_runs, no_grad):
    with GenMlpRuns(pipe) as plain_runs:
        plain = _run(pipe)
    assert plain_runs.count == 20  # the context prefill runs no latent token through the generation expert
    pipe.enable_cache(config)
    try:
        assert pipe.is_cache_enabled
        with GenMlpRuns(pipe) as runs:
            cached = _run(pipe)
        with pytest.raises(ValueError, match="already been enabled"):
            pipe.enable_cache(config)
        with pytest.raises(ValueError, match="enable_taylorseer"):
            _run(pipe, enable_taylorseer=True)
    finally:
        pipe.disable_cache()
    assert 0 < runs.count <= max_runs
    error = ((cached - plain).abs().max() / plain.abs().max()).item()
    assert 0 < error < 0.2
    # the hooks and their states belonged to that call: the next one is the plain pipeline again
    assert torch.equal(_run(pipe), plain)
    assert not pipe.is_cache_enabled


def test_mag_cache_calibration_changes_nothing(pipe, no_grad):
    plain = _run(pipe)
    pipe.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=20))
    try:
        assert torch.equal(_run(pipe), plain)
    finally:
        pipe.disable_cache()


def test_enable_cache_refuses_other_configs(pipe):
    with pytest.raises(ValueError, match="FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig"):
        pipe.enable_cache({"threshold": 0.1})


@pytest.mark.parametrize(
    "offload",
    [
        lambda p, tmp: p.enable_model_cpu_offload(device="cpu"),
        lambda p, tmp: p.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"),
                                              offload_type="block_level", num_blocks_per_group=1),
        lambda p, tmp: p.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"),
                                              offload_type="leaf_level", offload_to_disk_path=str(tmp)),
    ],
    ids=["model_cpu_offload", "group_offload_block_level", "group_offload_leaf_level_disk"],
)
def test_offloading_hooks_give_the_plain_pipeline_outputs(converted_dir, offload, tmp_path, no_grad):
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(1))
    edit = {"prompt": "Make it blue.", "image": image, "num_inference_steps": 3}
    reference = _pipe(converted_dir)
    plain, edit_plain = _run(reference, num_inference_steps=3), _run(reference, **edit)
    offloaded = _pipe(converted_dir)
    offload(offloaded, tmp_path)
    assert torch.equal(_run(offloaded, num_inference_steps=3), plain)
    # An edit runs the VAE encoder's convolutions on copies the hooks make: their kernels may round differently in
    # the last bit (5e-6 of 4.8 measured with model offload).
    assert_close_rel(_run(offloaded, **edit), edit_plain, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate's sequential offload needs an accelerator")
def test_sequential_cpu_offload_on_gpu(converted_dir, no_grad):
    plain = _run(_pipe(converted_dir).to("cuda"), num_inference_steps=3)
    offloaded = _pipe(converted_dir)
    offloaded.enable_sequential_cpu_offload()
    assert torch.allclose(_run(offloaded, num_inference_steps=3), plain, atol=1e-5)
    streamed = _pipe(converted_dir)
    streamed.enable_group_offload(torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=True)  # fmt: skip
    assert torch.allclose(_run(streamed, num_inference_steps=3), plain, atol=1e-5)
