"""Flow-GRPO on BAGEL's image generation (`BagelGRPOTrainer`): advantages, the clipped surrogate, the KL, zero
advantage giving no update, seeded and resumed runs reproducing, bad settings refused."""

import math

import numpy as np
import pytest
import torch
from conftest import load_pipeline

from diffusers_bagel.grpo import BagelGRPOConfig, BagelGRPOTrainer, clipped_surrogate, gaussian_kl, group_advantages


datasets = pytest.importorskip("datasets")
pytest.importorskip("peft")

PROMPTS = ["a cat", "a dog"]


def brightness(images, prompts, **kwargs):
    """A toy reward: the mean pixel value of each image."""
    return [float(np.asarray(image, dtype=np.float32).mean()) / 255 for image in images]


def constant(images, prompts, **kwargs):
    return [0.5] * len(images)


def _config(tmp_path, **overrides) -> BagelGRPOConfig:
    options = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=1, num_generations=2, num_inference_steps=3,
        sde_window_size=2, height=32, width=32, cfg_interval=[0.5, 1.0], max_steps=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, lr_scheduler_type="constant",
    )  # fmt: skip
    options.update(overrides)
    return BagelGRPOConfig(**options)


def _trainer(converted_dir, tmp_path, reward_funcs=brightness, **overrides) -> BagelGRPOTrainer:
    pipe = load_pipeline(converted_dir)  # a fresh model per run: the trainer adds a LoRA to it
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS})
    return BagelGRPOTrainer(pipe, reward_funcs, _config(tmp_path, **overrides), train_dataset=dataset)


def _lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}


def _logged(trainer, key) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


# -- the loss's pieces, by hand ---------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 0.1, 0.1, 0.1, 0.1])
    advantages = group_advantages(rewards, num_generations=2, epsilon=1e-4)
    # group 1: mean 2, population std 1; groups 2 and 3: equal rewards, exactly 0
    torch.testing.assert_close(advantages[:2], torch.tensor([-1.0, 1.0]) / (1 + 1e-4))
    assert torch.equal(advantages[2:], torch.zeros(4))
    three = group_advantages(torch.tensor([0.0, 3.0, 6.0]), num_generations=3, epsilon=0.0)
    torch.testing.assert_close(three, torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(3 / 2))


def test_clipped_surrogate_and_clip_fraction_by_hand():
    old = torch.zeros(4)
    log_prob = torch.log(torch.tensor([1.0, 1.2, 0.8, 1.05]))
    advantages = torch.tensor([1.0, 1.0, -1.0, 2.0])
    loss, ratio, clipped = clipped_surrogate(log_prob, old, advantages, epsilon=0.1)
    torch.testing.assert_close(ratio, torch.tensor([1.0, 1.2, 0.8, 1.05]))
    assert clipped.tolist() == [False, True, True, False]
    # -min(r A, clip(r) A): 1 -> -1; 1.2 -> -1.1 (clipped); 0.8 with A = -1 -> -min(-0.8, -0.9) = 0.9; 1.05 * 2 -> -2.1
    torch.testing.assert_close(loss, torch.tensor([-1.0, -1.1, 0.9, -2.1]))
    # a zero advantage: zero loss, zero gradient
    log_prob = torch.randn(3, requires_grad=True)
    loss, _, _ = clipped_surrogate(log_prob, torch.zeros(3), torch.zeros(3), epsilon=0.2)
    loss.sum().backward()
    assert torch.equal(loss.detach(), torch.zeros(3)) and torch.equal(log_prob.grad, torch.zeros(3))


def test_gaussian_kl_is_the_closed_form():
    mean, ref = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    std = torch.tensor(2.0)
    torch.testing.assert_close(gaussian_kl(mean, ref, std), torch.tensor([5.0 / 8.0]))
    p = torch.distributions.Normal(mean, std)
    q = torch.distributions.Normal(ref, std)
    torch.testing.assert_close(gaussian_kl(mean, ref, std), torch.distributions.kl_divergence(p, q).sum(dim=1))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_generations": 1}, "group of one"),
        ({"sde_noise_level": 0.0}, "no log-probabilities"),
        ({"sde_window_size": 4}, "sde_window_size"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
        ({"num_iterations": 0}, "num_iterations"),
    ],
)
def test_bad_config_is_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


def test_bad_trainer_arguments_are_refused(converted_dir, tmp_path):
    with pytest.raises(ValueError, match="`prompt` column"):
        BagelGRPOTrainer(
            load_pipeline(converted_dir), brightness, _config(tmp_path),
            train_dataset=datasets.Dataset.from_dict({"text": PROMPTS}),
        )  # fmt: skip
    with pytest.raises(ValueError, match="reward_weights"):
        _trainer(converted_dir, tmp_path, reward_weights=[1.0, 2.0])


# -- runs on the tiny model -------------------------------------------------------------------------------------------


def test_first_step_has_ratio_one_and_zero_kl(converted_dir, tmp_path):
    trainer = _trainer(converted_dir, tmp_path, beta=0.1, epsilon=1e-6)
    batch = trainer._generate_and_score({"prompt": PROMPTS[:1]}, seed=0)
    assert batch["samples"].shape[:2] == (2, 2) and batch["old_log_probs"].shape == (2, 2)
    guidance, grid = trainer._guidance(batch["prompts"])
    args, pipe = trainer.args, trainer.pipeline
    for j in range(2):
        x, x_next = batch["samples"][:, j], batch["next_samples"][:, j]
        sigma, timestep = float(batch["sigmas"][j]), batch["timesteps"][j]
        step = pipe.scheduler.sde_step(
            pipe.guided_velocity(x, sigma, grid, guidance), timestep, x, args.sde_noise_level, prev_sample=x_next
        )
        torch.testing.assert_close(step.log_prob, batch["old_log_probs"][:, j], rtol=1e-6, atol=1e-4)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert _logged_metric(trainer, "kl") == 0.0  # the fresh LoRA (B = 0) is the reference exactly
    assert _logged_metric(trainer, "clip_ratio") == 0.0
    assert torch.isfinite(loss)


def _logged_metric(trainer, key) -> float:
    return trainer._metrics[key][-1]


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_constant_reward_gives_zero_advantage_and_no_update(converted_dir, tmp_path, beta):
    trainer = _trainer(converted_dir, tmp_path, reward_funcs=constant, beta=beta, max_steps=1)
    before = _lora_weights(trainer)
    trainer.train()
    after = _lora_weights(trainer)
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert _logged(trainer, "reward_std") == [0.0] and _logged(trainer, "kl") == [0.0]


def test_two_step_run_is_finite_logged_and_reproducible(converted_dir, tmp_path):
    runs, initial = [], None
    for k in range(2):
        rewards = [brightness, constant]
        trainer = _trainer(converted_dir, tmp_path / str(k), reward_funcs=rewards, reward_weights=[1, 2])
        initial = _lora_weights(trainer)
        trainer.train()
        runs.append(trainer)
    first, second = runs
    for key in ("loss", "reward", "reward_std", "rewards/brightness/mean", "kl", "clip_ratio"):
        values = _logged(first, key)
        assert len(values) == 2 and all(math.isfinite(v) for v in values), key
        assert values == _logged(second, key), key
    assert all(v > 0 for v in _logged(first, "sampling_seconds") + _logged(first, "training_seconds"))
    assert _logged(first, "rewards/constant/mean") == [0.5, 0.5]
    # the two steps drew different noise: the rewards differ
    assert _logged(first, "reward")[0] != _logged(first, "reward")[1]
    a, b = _lora_weights(first), _lora_weights(second)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert any(not torch.equal(a[name], initial[name]) for name in a)  # the rewards differ: the LoRA learned


def test_reused_samples_move_the_ratio_and_are_clipped(converted_dir, tmp_path):
    trainer = _trainer(converted_dir, tmp_path, num_iterations=2, epsilon=1e-6)
    trainer.train()
    # step 2 trains on step 1's samples after one update: its ratios leave [1 - 1e-6, 1 + 1e-6]
    assert len(_logged(trainer, "reward")) == 1 and len(_logged(trainer, "sampling_seconds")) == 2
    clip = _logged(trainer, "clip_ratio")
    assert clip[0] == 0.0 and clip[1] > 0.0


def test_resumed_run_gives_the_unbroken_runs_second_step(converted_dir, tmp_path):
    # A constant learning rate: the broken run's scheduler (saved in its checkpoint) decays over its 1 step otherwise.
    # beta > 0: after the first update the KL, and so the loss, is not 0
    unbroken = _trainer(converted_dir, tmp_path / "unbroken", beta=0.1)
    unbroken.train()
    broken = _trainer(converted_dir, tmp_path / "broken", beta=0.1, save_strategy="steps", save_steps=1, max_steps=1)
    broken.train()
    resumed = _trainer(converted_dir, tmp_path / "broken", beta=0.1, save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "broken" / "checkpoint-1"))
    assert _logged(unbroken, "kl")[1] > 0 and _logged(unbroken, "loss")[1] != 0
    for key in ("loss", "reward", "kl", "clip_ratio"):
        assert _logged(resumed, key) == _logged(unbroken, key), key  # step 1's entry comes from the checkpoint
    a, b = _lora_weights(unbroken), _lora_weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)


DDP_SCRIPT = '''
import sys

import datasets
import numpy as np
import torch

from diffusers_bagel import BagelPipeline
from diffusers_bagel.grpo import BagelGRPOConfig, BagelGRPOTrainer

folder, out = sys.argv[1], sys.argv[2]
pipe = BagelPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
args = BagelGRPOConfig(
    output_dir=out, per_device_train_batch_size=1, num_generations=2, num_inference_steps=3, sde_window_size=2,
    height=32, width=32, cfg_interval=[0.5, 1.0], max_steps=2, learning_rate=1e-2, save_strategy="no", report_to=[],
    seed=0, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant",
)
reward = lambda images, prompts, **columns: [float(np.asarray(image, dtype=np.float32).mean()) / 255 for image in images]
trainer = BagelGRPOTrainer(pipe, reward, args, train_dataset=datasets.Dataset.from_dict({"prompt": ["a cat", "a dog"]}))
lora = lambda: {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}
initial = lora()
trainer.train()
torch.save({"initial": initial, "final": lora(), "world": trainer.accelerator.num_processes},
           f"{out}/rank{trainer.args.process_index}.pt")
'''


@pytest.mark.slow
def test_two_processes_under_ddp_keep_one_adapter(converted_dir, tmp_path):
    """Under torchrun (DDP, gloo) each process samples its own images, and the gradients are averaged over the
    processes: both end with the same adapter, which moved."""
    from conftest import torchrun

    script = tmp_path / "grpo_ddp.py"
    script.write_text(DDP_SCRIPT)
    result = torchrun(2, str(script), str(converted_dir), str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["world"] == 2
    names = ranks[0]["final"].keys()
    assert all(torch.equal(ranks[0]["final"][name], ranks[1]["final"][name]) for name in names)
    assert any(not torch.equal(ranks[0]["final"][name], ranks[0]["initial"][name]) for name in names)
