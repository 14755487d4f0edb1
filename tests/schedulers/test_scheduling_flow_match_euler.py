"""FlowMatchEulerScheduler: BAGEL's shifted Euler schedule and dual-CFG combination."""

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close_rel, load_expected
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_bagel.scheduling_flow_match_euler import FlowMatchEulerScheduler


RENORM_TYPES = ["global", "channel", "text_channel"]


# -- schedule ------------------------------------------------------------------------------------------------------


def test_schedule_by_hand_n3_s3():
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(3)
    # t = 1, 2/3, 1/3 -> 3t / (1 + 2t) = 1, 6/7, 3/5; then the terminal 0.
    expected_sigmas = torch.tensor([1.0, 6 / 7, 3 / 5, 0.0])
    assert scheduler.sigmas.dtype == torch.float32
    assert torch.allclose(scheduler.sigmas, expected_sigmas, atol=1e-7, rtol=0)
    assert torch.allclose(scheduler.timesteps, torch.tensor([1000.0, 6000 / 7, 600.0]), atol=1e-4, rtol=0)
    assert scheduler.num_inference_steps == 3


def test_schedule_equals_parent_with_bagel_sigmas():
    for steps, shift in [(3, 3.0), (50, 3.0), (28, 1.7)]:
        ours = FlowMatchEulerScheduler(shift=shift)
        ours.set_timesteps(steps)
        parent = FlowMatchEulerDiscreteScheduler(shift=shift)
        parent.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
        assert torch.allclose(ours.sigmas, parent.sigmas, atol=1e-7, rtol=0)
        assert torch.allclose(ours.timesteps, parent.timesteps, atol=1e-4, rtol=0)
    # ...whereas the parent's own N-step schedule is a different one (it stops at 1/1000, not 1/N).
    parent = FlowMatchEulerDiscreteScheduler(shift=3.0)
    parent.set_timesteps(50)
    ours = FlowMatchEulerScheduler()
    ours.set_timesteps(50)
    assert parent.sigmas.shape == ours.sigmas.shape
    assert (parent.sigmas - ours.sigmas).abs().max() > 1e-3


def test_schedule_equals_original_generate_image_formula():
    # The original: ts = linspace(1, 0, num_timesteps); ts = s ts / (1 + (s - 1) ts); N = num_timesteps - 1 steps.
    steps, shift = 50, 3.0
    ts = torch.linspace(1, 0, steps + 1)
    ts = shift * ts / (1 + (shift - 1) * ts)
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == steps
    assert torch.allclose(scheduler.sigmas, ts, atol=1e-6, rtol=0)
    assert torch.allclose(scheduler.sigmas[:-1] - scheduler.sigmas[1:], ts[:-1] - ts[1:], atol=1e-6, rtol=0)


def test_timestep_shift_per_call_does_not_stick():
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(3, timestep_shift=1.0)
    assert torch.allclose(scheduler.sigmas, torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]), atol=1e-7, rtol=0)
    scheduler.set_timesteps(3, timestep_shift=2.0)  # 2t / (1 + t): 1, 0.8, 0.5
    assert torch.allclose(scheduler.sigmas, torch.tensor([1.0, 0.8, 0.5, 0.0]), atol=1e-7, rtol=0)
    scheduler.set_timesteps(3)
    assert torch.allclose(scheduler.sigmas, torch.tensor([1.0, 6 / 7, 3 / 5, 0.0]), atol=1e-7, rtol=0)
    assert scheduler.shift == 3.0


def test_step_is_bagel_euler_update():
    torch.manual_seed(0)
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(7)
    x = torch.randn(2, 12, 64)
    for i, timestep in enumerate(scheduler.timesteps):
        v = torch.randn(2, 12, 64)
        dt = scheduler.sigmas[i] - scheduler.sigmas[i + 1]
        expected = x - v * dt
        x_next = scheduler.step(v, timestep, x, return_dict=False)[0]
        assert torch.equal(x_next, expected), f"step {i}"
        assert dt > 0
        x = x_next


def test_fifty_steps_reach_sigma_zero_and_the_data():
    # Along the straight path x_t = t * noise + (1 - t) * data, BAGEL's velocity (noise - data) is constant, so
    # Euler integration from t = 1 lands exactly on the data once sigma reaches 0.
    generator = torch.Generator().manual_seed(1)
    data, noise = torch.randn(1, 24, 64, generator=generator), torch.randn(1, 24, 64, generator=generator)
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(50)
    assert scheduler.sigmas[0].item() == 1.0 and scheduler.sigmas[-1].item() == 0.0
    assert len(scheduler.sigmas) == 51 and bool((scheduler.sigmas[1:] < scheduler.sigmas[:-1]).all())
    x = noise.clone()
    for timestep in scheduler.timesteps:
        x = scheduler.step(noise - data, timestep, x).prev_sample
    assert scheduler.step_index == 50
    assert_close_rel(x, data, rtol=1e-5)


def test_set_timesteps_device_and_order():
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(4, device="cpu", timestep_shift=3.0)
    assert scheduler.timesteps.device.type == "cpu"
    assert torch.allclose(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)


@pytest.mark.parametrize("steps", [0, -2, 2.5, True, "50", None])
def test_rejects_bad_num_inference_steps(steps):
    scheduler = FlowMatchEulerScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(steps)


@pytest.mark.parametrize("shift", [0, -1.0, float("nan"), float("inf"), "3"])
def test_rejects_bad_timestep_shift(shift):
    with pytest.raises(ValueError, match="timestep_shift"):
        FlowMatchEulerScheduler().set_timesteps(10, timestep_shift=shift)
    with pytest.raises(ValueError, match="shift"):
        FlowMatchEulerScheduler(shift=shift)


def test_save_load_and_swap_with_parent(tmp_path):
    scheduler = FlowMatchEulerScheduler(shift=2.5)
    scheduler.save_pretrained(tmp_path)
    reloaded = FlowMatchEulerScheduler.from_pretrained(tmp_path)
    assert type(reloaded) is FlowMatchEulerScheduler and reloaded.config.shift == 2.5
    reloaded.set_timesteps(5)
    scheduler.set_timesteps(5)
    assert torch.equal(reloaded.sigmas, scheduler.sigmas)

    # The parent reads the same folder/config, shift included (our default 3.0 differs from its 1.0).
    parent = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert type(parent) is FlowMatchEulerDiscreteScheduler and parent.config.shift == 2.5
    default_swap = FlowMatchEulerDiscreteScheduler.from_config(FlowMatchEulerScheduler().config)
    assert default_swap.config.shift == 3.0
    default_swap.set_timesteps(sigmas=np.linspace(1, 0, 6)[:-1].tolist())
    ours = FlowMatchEulerScheduler()
    ours.set_timesteps(5)
    assert torch.allclose(default_swap.sigmas, ours.sigmas, atol=1e-7, rtol=0)

    back = FlowMatchEulerScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=1.5).config)
    assert type(back) is FlowMatchEulerScheduler and back.config.shift == 1.5
    assert FlowMatchEulerDiscreteScheduler in FlowMatchEulerScheduler().compatibles


# -- guidance interval ---------------------------------------------------------------------------------------------


def test_cfg_active_boundaries():
    scheduler = FlowMatchEulerScheduler()
    assert scheduler.cfg_active(0.4, (0.4, 1.0)) is False  # lower end excluded
    assert scheduler.cfg_active(1.0, (0.4, 1.0)) is True  # upper end included
    assert scheduler.cfg_active(0.4000001, [0.4, 1.0]) is True
    assert scheduler.cfg_active(0.3999, (0.4, 1.0)) is False
    assert scheduler.cfg_active(1.0, (0.0, 0.9)) is False
    assert scheduler.cfg_active(0.0, (0.0, 1.0)) is False
    assert scheduler.cfg_active(torch.tensor(0.5), (0.4, 1.0)) is True
    with pytest.raises(ValueError, match="cfg_interval"):
        scheduler.cfg_active(0.5, (0.4,))


def test_cfg_active_over_a_schedule():
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(10)
    active = [scheduler.cfg_active(s, (0.4, 1.0)) for s in scheduler.sigmas[:-1]]
    expected = [float(s) > 0.4 for s in scheduler.sigmas[:-1]]
    assert active == expected and 0 < sum(active) < 10


# -- dual CFG combination ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("renorm_type", RENORM_TYPES)
def test_apply_guidance_matches_original_fixture(renorm_type):
    _, tensors = load_expected("c_velocity")
    v_cond, v_text = tensors["v_cond"], tensors["v_uncond_text"]
    expected = tensors[f"v_cfg4_{renorm_type}"]
    out = FlowMatchEulerScheduler.apply_guidance(
        v_cond, v_uncond_text=v_text, cfg_text_scale=4.0, cfg_renorm_type=renorm_type, cfg_renorm_min=0.0
    )
    assert_close_rel(out, expected, rtol=1e-5)
    batched = FlowMatchEulerScheduler().apply_guidance(
        v_cond[None], v_text[None], cfg_text_scale=4, cfg_renorm_type=renorm_type, cfg_renorm_min=0
    )
    assert_close_rel(batched[0], expected, rtol=1e-5)
    # The reference is really renormalised (plain CFG would be off), so the renorm is exercised.
    plain = v_text + 4.0 * (v_cond - v_text)
    assert (plain - expected).abs().max() > 0.1 * expected.abs().max()


def _reference_guidance(v, v_t, v_i, st, si, renorm_type, renorm_min):
    """The original's guidance combination (`_forward_flow` of ByteDance-Seed/Bagel's `modeling/bagel/bagel.py`)
    spelled out token by token in float64, for one unbatched image."""
    v, v_t = v.double(), v_t.double()
    v_i = v_i.double() if v_i is not None else None
    if st <= 1:
        return v
    num_tokens = v.shape[0]
    text = v_t + st * (v - v_t)
    if renorm_type == "text_channel":
        rows = []
        for n in range(num_tokens):
            ratio = math.sqrt(float((v[n] ** 2).sum())) / (math.sqrt(float((text[n] ** 2).sum())) + 1e-8)
            rows.append(text[n] * min(max(ratio, renorm_min), 1.0))
        text = torch.stack(rows)
        return v_i + si * (text - v_i) if si > 1 else text
    guided = v_i + si * (text - v_i) if si > 1 else text
    if renorm_type == "global":
        ratio = math.sqrt(float((v**2).sum())) / (math.sqrt(float((guided**2).sum())) + 1e-8)
        return guided * min(max(ratio, renorm_min), 1.0)
    rows = []
    for n in range(num_tokens):
        ratio = math.sqrt(float((v[n] ** 2).sum())) / (math.sqrt(float((guided[n] ** 2).sum())) + 1e-8)
        rows.append(guided[n] * min(max(ratio, renorm_min), 1.0))
    return torch.stack(rows)


def _branches(batch, tokens=10, channels=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 3.0, batch)[:, None, None]  # different magnitudes per image
    v = torch.randn(batch, tokens, channels, generator=generator) * scales
    v_t = v + 0.8 * torch.randn(batch, tokens, channels, generator=generator)
    v_i = v + 0.8 * torch.randn(batch, tokens, channels, generator=generator)
    return v, v_t, v_i


@pytest.mark.parametrize("renorm_type", RENORM_TYPES)
@pytest.mark.parametrize("st,si,renorm_min", [(4.0, 2.0, 0.0), (3.0, 1.5, 0.5), (4.0, 1.0, 0.0), (2.5, 1.0, 0.9)])
def test_apply_guidance_matches_reference(renorm_type, st, si, renorm_min):
    v, v_t, v_i = _branches(1)
    out = FlowMatchEulerScheduler.apply_guidance(
        v[0], v_t[0], v_i[0], cfg_text_scale=st, cfg_img_scale=si, cfg_renorm_type=renorm_type,
        cfg_renorm_min=renorm_min,
    )
    expected = _reference_guidance(v[0], v_t[0], v_i[0], st, si, renorm_type, renorm_min)
    assert out.dtype == torch.float32
    assert_close_rel(out, expected.float(), rtol=1e-5)


def test_reference_cases_exercise_the_clamps():
    # Guard for the test above: with these inputs the renorm factor is below 1 (clamped by max=1 or by the min).
    v, v_t, v_i = _branches(1)
    unclamped = _reference_guidance(v[0], v_t[0], v_i[0], 4.0, 2.0, "global", -1.0)
    plain = v_i[0].double() + 2.0 * (v_t[0].double() + 4.0 * (v[0].double() - v_t[0].double()) - v_i[0].double())
    factor = float(unclamped.norm() / plain.norm())
    assert 0.1 < factor < 0.9
    clamped = _reference_guidance(v[0], v_t[0], v_i[0], 4.0, 2.0, "global", 0.95)
    assert torch.allclose(clamped, 0.95 * plain)


def test_text_channel_has_no_renorm_after_image_guidance():
    v, v_t, v_i = _branches(1)
    out = FlowMatchEulerScheduler.apply_guidance(
        v[0], v_t[0], v_i[0], cfg_text_scale=4.0, cfg_img_scale=3.0, cfg_renorm_type="text_channel"
    )
    # Renormalised text guidance first...
    text = v_t[0] + 4.0 * (v[0] - v_t[0])
    text = text * (v[0].norm(dim=-1, keepdim=True) / (text.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0, 1)
    assert_close_rel(out, v_i[0] + 3.0 * (text - v_i[0]), rtol=1e-6)
    # ...and nothing after: some tokens end up longer than the conditional velocity, which a renorm forbids.
    assert bool((out.norm(dim=-1) > v[0].norm(dim=-1) * 1.01).any())
    channel = FlowMatchEulerScheduler.apply_guidance(
        v[0], v_t[0], v_i[0], cfg_text_scale=4.0, cfg_img_scale=3.0, cfg_renorm_type="channel"
    )
    assert bool((channel.norm(dim=-1) <= v[0].norm(dim=-1) * (1 + 1e-5)).all())


@pytest.mark.parametrize("renorm_type", RENORM_TYPES)
@pytest.mark.parametrize("si", [1.0, 2.0])
def test_batch_of_two_equals_single_calls(renorm_type, si):
    v, v_t, v_i = _branches(2)
    kwargs = {"cfg_text_scale": 4.0, "cfg_img_scale": si, "cfg_renorm_type": renorm_type, "cfg_renorm_min": 0.0}
    batched = FlowMatchEulerScheduler.apply_guidance(v, v_t, v_i, **kwargs)
    singles = torch.stack([FlowMatchEulerScheduler.apply_guidance(v[b], v_t[b], v_i[b], **kwargs) for b in range(2)])
    assert batched.shape == (2, 10, 16)
    assert_close_rel(batched, singles, rtol=1e-6)
    if renorm_type == "global":
        # One norm per image, not over the whole batch (the original's whole-tensor norm would mix them).
        flat = [t.reshape(20, 16) for t in (v, v_t, v_i)]
        whole = _reference_guidance(*flat, 4.0, si, "global", 0.0)
        assert (whole.float().reshape(2, 10, 16) - batched).abs().max() > 1e-3


def test_no_guidance_when_text_scale_at_most_one():
    v, v_t, v_i = _branches(2)
    for st in (1.0, 0.5):
        out = FlowMatchEulerScheduler.apply_guidance(v, v_t, v_i, cfg_text_scale=st, cfg_img_scale=3.0)
        assert torch.equal(out, v)
    # No unconditional branches needed then.
    assert torch.equal(FlowMatchEulerScheduler.apply_guidance(v, cfg_text_scale=1.0, cfg_img_scale=2.0), v)


def test_image_branch_only_needed_with_image_guidance():
    v, v_t, _ = _branches(1)
    out = FlowMatchEulerScheduler.apply_guidance(v, v_t, None, cfg_text_scale=4.0, cfg_img_scale=1.0)
    expected = _reference_guidance(v[0], v_t[0], None, 4.0, 1.0, "global", 0.0)
    assert_close_rel(out[0], expected.float(), rtol=1e-5)
    with pytest.raises(ValueError, match="v_uncond_image"):
        FlowMatchEulerScheduler.apply_guidance(v, v_t, None, cfg_text_scale=4.0, cfg_img_scale=2.0)
    with pytest.raises(ValueError, match="v_uncond_text"):
        FlowMatchEulerScheduler.apply_guidance(v, None, v, cfg_text_scale=4.0, cfg_img_scale=2.0)


def test_apply_guidance_rejects_bad_arguments():
    v, v_t, v_i = _branches(1)
    with pytest.raises(ValueError, match=r"\['global', 'channel', 'text_channel'\]"):
        FlowMatchEulerScheduler.apply_guidance(v, v_t, v_i, cfg_text_scale=4.0, cfg_renorm_type="tensor")
    with pytest.raises(ValueError, match="shape"):
        FlowMatchEulerScheduler.apply_guidance(v, v_t[:, :5], cfg_text_scale=4.0)
    with pytest.raises(ValueError, match="v_cond"):
        FlowMatchEulerScheduler.apply_guidance(v[0, 0], v_t[0, 0], cfg_text_scale=4.0)
    with pytest.raises(ValueError, match="cfg_text_scale"):
        FlowMatchEulerScheduler.apply_guidance(v, v_t, cfg_text_scale=float("nan"))


# -- config: the parent's, with BAGEL's default shift ------------------------------------------------------------------

SHIPPED_SCHEDULER = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-bagel-digits" / "scheduler"
# The float32 schedules of the shipped config, as the scheduler gave them before it used the parent's `set_shift`
# and signature (3 steps; its own shift 3.0, then a per-call 2.5).
SHIPPED_SIGMAS_N3 = [1.0, 0.8571428060531616, 0.5999999642372131, 0.0]
SHIPPED_TIMESTEPS_N3 = [1000.0, 857.142822265625, 599.9999389648438]
SHIPPED_SIGMAS_N3_SHIFT_2_5 = [1.0, 0.8333333730697632, 0.5555555820465088, 0.0]
SHIPPED_TIMESTEPS_N3_SHIFT_2_5 = [1000.0, 833.3333740234375, 555.5556030273438]


def _bagel_schedule(steps, shift):
    """The parent's schedule for BAGEL's unshifted grid `linspace(1, 0, N + 1)[:-1]`."""
    parent = FlowMatchEulerDiscreteScheduler(shift=shift)
    parent.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    return parent.sigmas, parent.timesteps


@pytest.mark.parametrize("source", ["shipped", "converted"])
def test_saved_scheduler_configs_load_with_identical_schedules(source, converted_dir):
    folder = SHIPPED_SCHEDULER if source == "shipped" else converted_dir / "scheduler"
    scheduler = FlowMatchEulerScheduler.from_pretrained(folder)
    assert type(scheduler) is FlowMatchEulerScheduler and scheduler.config.shift == 3.0
    scheduler.set_timesteps(3)
    assert torch.equal(scheduler.sigmas, torch.tensor(SHIPPED_SIGMAS_N3))
    assert torch.equal(scheduler.timesteps, torch.tensor(SHIPPED_TIMESTEPS_N3))
    scheduler.set_timesteps(3, timestep_shift=2.5)
    assert torch.equal(scheduler.sigmas, torch.tensor(SHIPPED_SIGMAS_N3_SHIFT_2_5))
    assert torch.equal(scheduler.timesteps, torch.tensor(SHIPPED_TIMESTEPS_N3_SHIFT_2_5))
    assert scheduler.shift == 3.0
    for steps, shift in [(1, None), (28, None), (50, None), (50, 1.0), (7, 4.5)]:
        scheduler.set_timesteps(steps, timestep_shift=shift)
        sigmas, timesteps = _bagel_schedule(steps, 3.0 if shift is None else shift)
        assert torch.equal(scheduler.sigmas, sigmas) and torch.equal(scheduler.timesteps, timesteps)


def test_saved_config_is_the_shipped_one(tmp_path):
    """What the converter writes (`FlowMatchEulerScheduler().save_pretrained`) is, key for key, the shipped file."""
    FlowMatchEulerScheduler().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    shipped = json.loads((SHIPPED_SCHEDULER / "scheduler_config.json").read_text())
    saved.pop("_diffusers_version")
    shipped.pop("_diffusers_version")
    assert saved == shipped


def test_config_round_trip_keeps_every_option(tmp_path):
    options = {"num_train_timesteps": 500, "shift": 2.5, "shift_terminal": 0.1, "stochastic_sampling": True,
               "base_image_seq_len": 128, "time_shift_type": "linear"}  # fmt: skip
    scheduler = FlowMatchEulerScheduler(**options)
    scheduler.save_pretrained(tmp_path)
    for cls in (FlowMatchEulerScheduler, FlowMatchEulerDiscreteScheduler):
        reloaded = cls.from_pretrained(tmp_path)
        assert type(reloaded) is cls
        assert {key: reloaded.config[key] for key in options} == options
    reloaded = FlowMatchEulerScheduler.from_config(scheduler.config)
    assert dict(reloaded.config) == dict(scheduler.config)
    scheduler.set_timesteps(6)
    reloaded.set_timesteps(6)
    assert torch.equal(reloaded.sigmas, scheduler.sigmas)
    assert float(scheduler.sigmas[-2]) == pytest.approx(0.1)  # `shift_terminal` reached the schedule
    # positional arguments are the parent's, in its order
    positional = FlowMatchEulerScheduler(500, 2.5).config
    assert dict(positional) == dict(FlowMatchEulerScheduler(num_train_timesteps=500).config, shift=2.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'timestep_shift'"):
        FlowMatchEulerScheduler(timestep_shift=3.0)


def test_signature_is_the_parents_with_bagels_shift():
    ours = inspect.signature(FlowMatchEulerScheduler.__init__).parameters
    parent = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    assert list(ours) == list(parent)
    assert {name: p.default for name, p in ours.items()} == dict(
        {name: p.default for name, p in parent.items()}, shift=3.0
    )
    assert FlowMatchEulerDiscreteScheduler().config.shift == 1.0 and FlowMatchEulerScheduler().config.shift == 3.0


def test_set_shift_is_the_default_of_later_schedules():
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_shift(2.0)  # 2t / (1 + t): 1, 0.8, 0.5
    scheduler.set_timesteps(3)
    assert torch.allclose(scheduler.sigmas, torch.tensor([1.0, 0.8, 0.5, 0.0]), atol=1e-7, rtol=0)
    scheduler.set_timesteps(3, timestep_shift=1.0)
    assert torch.allclose(scheduler.sigmas, torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]), atol=1e-7, rtol=0)
    assert scheduler.shift == 2.0 and scheduler.config.shift == 3.0
    with pytest.raises(ValueError, match="timestep_shift"):
        scheduler.set_timesteps(3, timestep_shift=-1.0)
    # a schedule the parent refuses leaves the shift as it was
    with pytest.raises(ValueError, match="same length"):
        scheduler.set_timesteps(3, timestep_shift=1.5, sigmas=[1.0, 0.5])
    assert scheduler.shift == 2.0


def test_renorm_types_are_defined_once():
    from diffusers_bagel import cli_parser, pipeline_checks
    from diffusers_bagel.scheduling_flow_match_euler import CFG_RENORM_TYPES

    assert pipeline_checks.CFG_RENORM_TYPES is CFG_RENORM_TYPES is cli_parser.CFG_RENORM_TYPES
    assert list(CFG_RENORM_TYPES) == RENORM_TYPES
