"""FlowMatchEulerScheduler.sde_step: Flow-GRPO's SDE sampler with log-probabilities, in BAGEL's convention."""

import math

import pytest
import torch

from diffusers_bagel.scheduling_flow_match_euler import FlowMatchEulerScheduler, FlowMatchEulerSDEStepOutput


def _scheduler(steps: int = 6, shift: float = 3.0) -> FlowMatchEulerScheduler:
    scheduler = FlowMatchEulerScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def _reference_transition(x, v, t, t_next, t_second, noise_level):
    """Mean and std of the step, derived here in float64 from the score of `x_t = (1 - t) x0 + t noise` with
    `v = noise - x0`: `score = -(x + (1 - t) v) / t`; the reverse-time SDE `dx = (v - g^2 / 2 score) dt + g dW`
    (dt < 0) has the flow ODE's marginals, with `g = a sqrt(t / (1 - t))` (`1 - t` -> `1 - sigmas[1]` at t = 1)."""
    x, v = x.double(), v.double()
    g = noise_level * math.sqrt(t / (1 - (t_second if t == 1 else t)))
    score = -(x + (1 - t) * v) / t
    dt = t_next - t
    return x + (v - g**2 / 2 * score) * dt, g * math.sqrt(-dt)


@pytest.mark.parametrize("index", [0, 2, 5])
def test_log_prob_equals_an_independent_gaussian_log_density(index):
    scheduler = _scheduler()
    sigmas = scheduler.sigmas.tolist()
    gen = torch.Generator().manual_seed(index)
    x, v = torch.randn(3, 16, 8, generator=gen), torch.randn(3, 16, 8, generator=gen)
    scheduler._step_index = index
    out = scheduler.sde_step(v, scheduler.timesteps[index], x, 0.7, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, FlowMatchEulerSDEStepOutput) and scheduler.step_index == index + 1
    mean, std = _reference_transition(x, v, sigmas[index], sigmas[index + 1], sigmas[1], 0.7)
    torch.testing.assert_close(out.prev_sample_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std_dev.double(), torch.tensor(std, dtype=torch.float64), rtol=1e-6, atol=0)
    expected = torch.distributions.Normal(mean, std).log_prob(out.prev_sample.double()).sum(dim=(1, 2))
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (3,)
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-2)
    # The drawn noise is the generator's: the sample is mean + std * noise.
    noise = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.prev_sample.double(), mean + std * noise.double(), rtol=1e-5, atol=1e-5)


def test_noise_level_zero_is_the_euler_step_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 12, 4, generator=gen)
    velocities = [torch.randn(2, 12, 4, generator=gen) for _ in range(5)]
    euler, sde = _scheduler(5), _scheduler(5)
    x, y = x0, x0
    for t, v in zip(euler.timesteps, velocities):
        x = euler.step(v, t, x, return_dict=False)[0]
        out = sde.sde_step(v, t, y, 0.0)
        y = out.prev_sample
        assert out.log_prob is None and out.std_dev is None and out.prev_sample_mean is y
    assert torch.equal(x, y) and sde.step_index == euler.step_index == 5
    with pytest.raises(ValueError, match="log_prob` is undefined"):
        sde.sde_step(velocities[0], sde.timesteps[0], x0, 0, prev_sample=x0)


def test_scoring_a_stored_transition_gives_the_sampled_log_prob_and_gradients():
    scheduler = _scheduler(4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 6, generator=gen)
    trajectory, velocities, log_probs = [x], [], []
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 10, 6, generator=gen)
        if i == 1:  # an Euler step in between: both keep the step index
            x = scheduler.step(v, t, x, return_dict=False)[0]
        else:
            x, log_prob, _, _ = scheduler.sde_step(v, t, x, 0.5, generator=gen, return_dict=False)
            log_probs.append(log_prob)
        trajectory.append(x)
        velocities.append(v)
    assert scheduler.step_index == 4
    # Scoring locates the step by timestep and leaves the step index alone, in any order.
    for k, i in reversed(list(enumerate([0, 2, 3]))):
        v = velocities[i].clone().requires_grad_(True)
        out = scheduler.sde_step(v, scheduler.timesteps[i], trajectory[i], 0.5, prev_sample=trajectory[i + 1])
        assert torch.equal(out.prev_sample, trajectory[i + 1]) and scheduler.step_index == 4
        torch.testing.assert_close(out.log_prob, log_probs[k], rtol=1e-6, atol=1e-4)
        out.log_prob.sum().backward()
        assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
    # One timestep per sample: each sample's own step.
    both = scheduler.sde_step(
        torch.stack([velocities[0][0], velocities[3][1]]),
        torch.stack([scheduler.timesteps[0], scheduler.timesteps[3]]),
        torch.stack([trajectory[0][0], trajectory[3][1]]),
        0.5,
        prev_sample=torch.stack([trajectory[1][0], trajectory[4][1]]),
    )
    torch.testing.assert_close(both.log_prob, torch.stack([log_probs[0][0], log_probs[2][1]]), rtol=1e-6, atol=1e-4)


def test_seeded_sde_steps_reproduce_and_differ_from_euler():
    runs = []
    for _ in range(2):
        scheduler = _scheduler(3)
        x = torch.ones(1, 4, 4)
        for t in scheduler.timesteps:
            x = scheduler.sde_step(torch.zeros_like(x), t, x, 0.7, generator=torch.Generator().manual_seed(5))[0]
        runs.append(x)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], torch.ones(1, 4, 4))


def _gaussian_velocity(x, t, mu, s):
    """The exact velocity `E[noise - x0 | x_t]` for data `x0 ~ N(mu, s^2)` (per element), in closed form."""
    var = (1 - t) ** 2 * s**2 + t**2
    centred = x - (1 - t) * mu
    return t * centred / var - (mu + (1 - t) * s**2 * centred / var)


def test_sde_marginals_match_the_data_on_a_gaussian_toy():
    mu, s, steps = 0.8, 0.5, 200
    scheduler = _scheduler(steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4000, generator=gen, dtype=torch.float32)
    sigmas = scheduler.sigmas.tolist()
    halfway = None
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.sde_step(_gaussian_velocity(x, sigmas[i], mu, s), t, x, 0.7, generator=gen).prev_sample
        if i == steps // 2:  # an intermediate marginal: N((1 - t) mu, (1 - t)^2 s^2 + t^2)
            halfway = (x.mean().item(), x.var().item(), sigmas[i + 1])
    mean, var, t = halfway
    assert abs(mean - (1 - t) * mu) < 0.03 and abs(var / ((1 - t) ** 2 * s**2 + t**2) - 1) < 0.05
    assert abs(x.mean().item() - mu) < 0.03 and abs(x.var().item() / s**2 - 1) < 0.05


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_level": -0.1}, "finite number >= 0"),
        ({"noise_level": float("nan")}, "finite number >= 0"),
        ({"noise_level": float("inf")}, "finite number >= 0"),
        ({"noise_level": True}, "finite number >= 0"),
        ({"model_output": torch.zeros(1, 4, 3)}, "`model_output` has shape"),
        ({"prev_sample": torch.zeros(1, 4, 3)}, "`prev_sample` has shape"),
        ({"prev_sample": torch.zeros(1, 4, 2), "generator": torch.Generator()}, "cannot be combined"),
        ({"prev_sample": torch.zeros(1, 4, 2), "timestep": 123.0}, "not one of the scheduler's `timesteps`"),
        ({"prev_sample": torch.zeros(1, 4, 2), "timestep": torch.tensor([1000.0, 1000.0])}, "one per sample"),
    ],
)
def test_bad_input_is_refused(kwargs, message):
    scheduler = _scheduler(3)
    call = {"model_output": torch.zeros(1, 4, 2), "timestep": scheduler.timesteps[0], "sample": torch.zeros(1, 4, 2),
            "noise_level": 0.7}  # fmt: skip
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        scheduler.sde_step(**call)
    assert scheduler.step_index is None  # refused before any work


def test_sde_step_needs_a_schedule():
    with pytest.raises(ValueError, match="set_timesteps"):
        FlowMatchEulerScheduler().sde_step(torch.zeros(1, 2), 1000.0, torch.zeros(1, 2), 0.7)
