"""BagelPipeline with SDE sampling (`sde_noise_level`, `sde_steps`) and `return_trajectory` for reinforcement
learning: the default call unchanged, log-probabilities recomputable, seeded calls reproducible."""

import numpy as np
import pytest
import torch

from diffusers_bagel import BagelPipelineOutput


OPTIONS = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 3, "cfg_interval": (0.5, 1.0)}


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture()
def velocities(pipe, monkeypatch):
    """The guided velocities of each step of the next call, as the sampler receives them."""
    seen = []
    guided_velocity = pipe.guided_velocity

    def record(*args, **kwargs):
        seen.append(guided_velocity(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(pipe, "guided_velocity", record)
    return seen


def test_noise_level_zero_is_the_default_call_bit_for_bit(pipe, no_grad):
    plain = pipe(**OPTIONS, generator=_seed(), output_type="latent").images
    zero = pipe(**OPTIONS, generator=_seed(), output_type="latent", sde_noise_level=0.0, return_trajectory=True)
    assert torch.equal(plain, zero.images) and zero.log_probs is None and zero.sde_steps == ()
    assert zero.trajectory.shape[:2] == (4, 1) and zero.trajectory.dtype == torch.float32
    default = pipe(**OPTIONS, generator=_seed(), output_type="np")
    assert default.trajectory is None and default.log_probs is None and default.timesteps is None
    assert len(pipe(**OPTIONS, generator=_seed(), return_dict=False)) == 2


def test_seeded_sde_call_reproduces_and_its_log_probs_are_recomputable(pipe, velocities, no_grad):
    out = pipe(**OPTIONS, generator=_seed(3), output_type="np", sde_noise_level=0.7, return_trajectory=True)
    again = pipe(**OPTIONS, generator=_seed(3), output_type="np", sde_noise_level=0.7, return_trajectory=True)
    plain = pipe(**OPTIONS, generator=_seed(3), output_type="np")
    assert isinstance(out, BagelPipelineOutput)
    assert np.array_equal(out.images, again.images) and torch.equal(out.log_probs, again.log_probs)
    assert not np.array_equal(out.images, plain.images)
    assert out.sde_steps == (0, 1, 2) and out.log_probs.shape == (3, 1) and out.log_probs.dtype == torch.float32
    assert torch.isfinite(out.log_probs).all()
    assert torch.equal(out.timesteps, pipe.scheduler.timesteps)
    # Training's recomputation: score each stored transition under the velocity of its input (the guided one).
    for k, i in enumerate(out.sde_steps):
        scored = pipe.scheduler.sde_step(
            velocities[i], out.timesteps[i], out.trajectory[i], 0.7, prev_sample=out.trajectory[i + 1]
        )
        torch.testing.assert_close(scored.log_prob, out.log_probs[k], rtol=1e-6, atol=1e-4)


def test_sde_on_a_subset_of_steps_with_several_images_per_prompt(pipe, velocities, no_grad):
    out = pipe(**OPTIONS, num_images_per_prompt=2, generator=_seed(1), output_type="latent", sde_noise_level=0.9,
               sde_steps=[1], return_trajectory=True)  # fmt: skip
    assert out.sde_steps == (1,) and out.log_probs.shape == (1, 2)
    scheduler = pipe.scheduler
    for i in (0, 2):  # the other steps are BAGEL's Euler steps
        euler = out.trajectory[i] + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * velocities[i]
        assert torch.equal(out.trajectory[i + 1], euler)
    euler = out.trajectory[1] + (scheduler.sigmas[2] - scheduler.sigmas[1]) * velocities[1]
    assert not torch.equal(out.trajectory[2], euler)  # step 1 is the SDE's
    images, text, trajectory, log_probs, timesteps, sde_steps = pipe(
        **OPTIONS, num_images_per_prompt=2, generator=_seed(1), output_type="latent", sde_noise_level=0.9,
        sde_steps=[1], return_trajectory=True, return_dict=False,
    )  # fmt: skip
    assert torch.equal(images, out.images) and torch.equal(log_probs, out.log_probs) and sde_steps == (1,)


def test_sde_images_are_the_same_alone_or_in_a_batch(pipe, no_grad):
    prompts = ["A red cat.", "Two birds."]
    options = {**OPTIONS, "output_type": "np", "batch_invariant": True}
    options.update(sde_noise_level=0.7, return_trajectory=True)
    options.pop("prompt")
    batched = pipe(prompts, generator=[_seed(i) for i in range(2)], **options)
    for i, prompt in enumerate(prompts):
        alone = pipe([prompt], generator=[_seed(i)], **options)
        assert np.array_equal(batched.images[i], alone.images[0])
        assert torch.equal(batched.log_probs[:, i], alone.log_probs[:, 0])


def test_a_callback_may_not_replace_recorded_latents(pipe, no_grad):
    def replace(pipeline, step, timestep, callback_kwargs):
        return {"latents": callback_kwargs["latents"] + 1}

    def keep(pipeline, step, timestep, callback_kwargs):
        return callback_kwargs  # the same latents, unpacked and packed again: accepted

    pipe(**OPTIONS, sde_noise_level=0.7, return_trajectory=True, callback_on_step_end=keep)
    with pytest.raises(ValueError, match="replaced the latents before step 1"):
        pipe(**OPTIONS, sde_noise_level=0.7, return_trajectory=True, callback_on_step_end=replace)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sde_noise_level": -0.5}, "`sde_noise_level` must be a finite number >= 0"),
        ({"sde_noise_level": float("nan")}, "`sde_noise_level` must be a finite number >= 0"),
        ({"sde_noise_level": "0.7"}, "`sde_noise_level` must be a finite number >= 0"),
        ({"sde_steps": [0]}, "`sde_steps` needs `sde_noise_level > 0`"),
        ({"sde_noise_level": 0.7, "sde_steps": [3]}, r"step indices in \[0, 3\)"),
        ({"sde_noise_level": 0.7, "sde_steps": []}, "non-empty"),
        ({"sde_noise_level": 0.7, "sde_steps": [1, 1]}, "lists a step twice"),
        ({"sde_noise_level": 0.7, "sde_steps": 1}, "must be a list of step indices"),
        ({"return_trajectory": "yes"}, "`return_trajectory` must be a bool"),
        ({"return_trajectory": True, "enable_taylorseer": True}, "approximations that training cannot recompute"),
    ],
)
def test_bad_sde_input_is_refused_before_any_work(pipe, monkeypatch, kwargs, message):
    def fail(*args, **kw):
        raise AssertionError("the model ran before the input was validated")

    monkeypatch.setattr(pipe.model, "prefill_context", fail)
    monkeypatch.setattr(pipe.model, "predict_velocity", fail)
    with pytest.raises(ValueError, match=message):
        pipe(**OPTIONS, **kwargs)


def test_sde_sampling_works_with_taylorseer_without_a_trajectory(pipe, no_grad):
    out = pipe(**{**OPTIONS, "num_inference_steps": 8}, generator=_seed(), output_type="np", sde_noise_level=0.5,
               enable_taylorseer=True)  # fmt: skip
    assert np.isfinite(out.images).all() and out.log_probs is None
