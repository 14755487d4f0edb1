"""
Flow-GRPO (Liu et al. 2025) for BAGEL's image generation, on `transformers.Trainer`: [`BagelGRPOConfig`] and
[`BagelGRPOTrainer`].

Each training step samples `num_generations` images per prompt with the pipeline's SDE sampler (the SDE on a window
of `sde_window_size` steps, the others Euler steps, as Flow-GRPO trains on fewer transitions than it samples), scores
them with the reward functions, normalises the rewards within each prompt's group, and minimises the clipped
surrogate of the stored transitions' policy ratios plus `beta` times the KL to the reference policy (the model with
its LoRA adapter switched off: no second copy of the model).
"""

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.utils import logging
from transformers import Trainer, TrainingArguments, set_seed

from .defaults import DEFAULT_CFG_RENORM_MIN
from .pipeline_inputs import guidance_settings, output_size


logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

__all__ = [
    "BagelGRPOConfig",
    "BagelGRPOTrainer",
    "clipped_surrogate",
    "gaussian_kl",
    "group_advantages",
]

RewardFunc = Callable[..., list[float]]


@dataclass
class BagelGRPOConfig(TrainingArguments):
    r"""
    [`BagelGRPOTrainer`]'s arguments: `transformers.TrainingArguments` plus the sampling and loss settings (trl's
    GRPO names where they fit). `per_device_train_batch_size` counts prompts; each gets `num_generations` images.

    Args:
        num_generations (`int`, defaults to 4): images per prompt (G), the group the rewards are normalised over; >= 2.
        beta (`float`, defaults to 0.0): weight of the KL to the reference policy (the adapter switched off).
        epsilon (`float`, defaults to 1e-4): the ratio's clip range `[1 - epsilon, 1 + epsilon]` (Flow-GRPO's small
            value: the ratios are of whole-image Gaussian densities).
        sde_noise_level (`float`, defaults to 0.7): the SDE's noise level `a` (see `FlowMatchEulerScheduler.sde_step`);
            > 0.
        num_inference_steps (`int`, defaults to 10): sampling steps in training (fewer than at inference).
        sde_window_size (`int`, *optional*): the number of consecutive SDE steps, the transitions trained on; its
            start is drawn each step from the run's seed. Default: every step.
        timestep_shift (`float`, defaults to 3.0), cfg_text_scale (`float`, *optional*), cfg_interval (`tuple`,
            *optional*), cfg_renorm_type (`str`, *optional*): the pipeline's guidance settings (text-to-image presets
            by default).
        height (`int`, *optional*), width (`int`, *optional*): image size; the pipeline's default when unset.
        reward_weights (`list[float]`, *optional*): one weight per reward function; all 1 by default.
        num_iterations (`int`, defaults to 1): optimisation steps on each sampled batch (trl's name). From the second
            on, the policy has moved since the sampling, the ratios differ from 1 and the clipping acts; the
            dataloader's batches of those steps are skipped.
        advantage_epsilon (`float`, defaults to 1e-4): `(r - mean) / (std + advantage_epsilon)`.
    """

    num_generations: int = field(default=4, metadata={"help": "Images per prompt (the group), >= 2."})
    beta: float = field(default=0.0, metadata={"help": "KL weight to the reference policy (adapter off)."})
    epsilon: float = field(default=1e-4, metadata={"help": "Clip range of the policy ratio."})
    sde_noise_level: float = field(default=0.7, metadata={"help": "The SDE's noise level, > 0."})
    num_inference_steps: int = field(default=10, metadata={"help": "Sampling steps in training."})
    sde_window_size: int | None = field(default=None, metadata={"help": "Consecutive SDE steps trained on."})
    timestep_shift: float = field(default=3.0, metadata={"help": "Shift of the timestep schedule."})
    cfg_text_scale: float | None = field(default=None, metadata={"help": "Text guidance scale."})
    cfg_interval: list[float] | None = field(default=None, metadata={"help": "Guidance interval (start, end)."})
    cfg_renorm_type: str | None = field(default=None, metadata={"help": "CFG renormalisation type."})
    height: int | None = field(default=None, metadata={"help": "Image height."})
    width: int | None = field(default=None, metadata={"help": "Image width."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward function."})
    num_iterations: int = field(
        default=1, metadata={"help": "Optimisation steps per sampled batch (ratios move from 1 after the first)."}
    )
    advantage_epsilon: float = field(default=1e-4, metadata={"help": "Added to the group std."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the prompts and extra columns go to the reward functions."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(
                f"`num_generations` must be an integer >= 2, got {self.num_generations!r}: the advantages are the "
                "rewards normalised within each prompt's group of images, and a group of one has no spread."
            )
        if not self.sde_noise_level > 0:
            raise ValueError(
                f"`sde_noise_level` must be > 0, got {self.sde_noise_level!r}: with noise level 0 the steps are "
                "deterministic Euler steps, which have no log-probabilities to train on."
            )
        if not isinstance(self.num_iterations, int) or self.num_iterations < 1:
            raise ValueError(f"`num_iterations` must be a positive integer, got {self.num_iterations!r}.")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {self.num_inference_steps!r}.")
        window = self.sde_window_size
        if window is not None and not (isinstance(window, int) and 1 <= window <= self.num_inference_steps):
            raise ValueError(
                f"`sde_window_size` must be an integer in [1, num_inference_steps={self.num_inference_steps}], "
                f"got {window!r}."
            )
        if self.beta < 0 or self.epsilon <= 0:
            raise ValueError(f"`beta` must be >= 0 and `epsilon` > 0, got beta={self.beta}, epsilon={self.epsilon}.")
        if self.remove_unused_columns:
            raise ValueError("`remove_unused_columns` must be False: the trainer reads the `prompt` column itself.")


def group_advantages(rewards: torch.Tensor, num_generations: int, epsilon: float = 1e-4) -> torch.Tensor:
    """
    GRPO's advantages: each reward minus its group's mean, over the group's std (the population std, as Flow-GRPO)
    plus `epsilon`. `rewards` is `(num_prompts * num_generations,)`, each prompt's group consecutive. A group of equal
    rewards gives exactly 0 (the rewards are first shifted by the group's first one, which is exact).
    """
    groups = rewards.reshape(-1, num_generations)
    shifted = groups - groups[:, :1]
    centered = shifted - shifted.mean(dim=1, keepdim=True)
    return (centered / (shifted.std(dim=1, unbiased=False, keepdim=True) + epsilon)).reshape(-1)


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    PPO's clipped surrogate, per transition: `-min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A)` with
    `ratio = exp(log_prob - old_log_prob)`. Returns `(loss, ratio, clipped)`, `clipped` marking `|ratio - 1| >
    epsilon` (Flow-GRPO's clip fraction). A zero advantage gives a zero loss and a zero gradient.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantages
    return -torch.minimum(unclipped, clipped), ratio, (ratio - 1.0).abs() > epsilon


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """
    The KL between the policy's and the reference's transitions, per sample. Both are Gaussians with the same
    covariance `std^2 I` (the SDE's noise does not depend on the model), so

        KL(N(m, s^2 I) || N(m_ref, s^2 I)) = ||m - m_ref||^2 / (2 s^2),

    the trace and log-determinant terms cancelling. This is the exact KL, summed over the latent's elements like the
    scheduler's log-probabilities (Flow-GRPO averages it over the elements: its `beta` is ours times their number).
    """
    return ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).sum(dim=1)


def _collate_prompts(features: list[dict]) -> dict[str, list]:
    """Passes the dataset's rows through as lists, one per column (`prompt` and any column the rewards read)."""
    return {key: [feature[key] for feature in features] for key in features[0]}


class BagelGRPOTrainer(Trainer):
    r"""
    Flow-GRPO on a [`BagelPipeline`]'s image generation, with LoRA on the generation experts.

    Args:
        pipeline ([`BagelPipeline`]): the pipeline. Unless `model` is given, its model gets a LoRA on the
            generation experts (`transformers_bagel.training.get_bagel_lora_model` with `lora_config`, or the
            default), its initial weights drawn from `args.seed`; peft adds the adapter in place, so the pipeline keeps
            calling the same model object, now adapted.
        reward_funcs (callable or list of callables): `f(images, prompts, **columns) -> list[float]`, one float per
            image; `images` are PIL images, `prompts` the prompt of each image (repeated `num_generations` times), and
            `columns` the dataset's other columns, repeated likewise. The reward is their sum weighted by
            `args.reward_weights`.
        args ([`BagelGRPOConfig`]): the settings.
        train_dataset (`datasets.Dataset`): the prompts, in a `prompt` column.
        model (`peft.PeftModel`, *optional*): a LoRA model already wrapping `pipeline.model` (e.g. from
            `load_bagel_lora(pipe, path)`, to continue training an adapter).
        lora_config (`peft.LoraConfig`, *optional*): the LoRA to add when `model` is not given.
        **kwargs: the other `transformers.Trainer` arguments (`callbacks`, `optimizers`, ...).

    Each step logs `kl`, `clip_ratio`, `sampling_seconds` and `training_seconds`, and each sampling step `reward` and
    `reward_std` (and `rewards/<name>/mean` and `/std` per function). The sampling noise of a step comes from a
    generator seeded by `(args.seed, global_step, micro-step, process index)`, so a seeded run (and a run resumed from
    a checkpoint, saved at a multiple of `num_iterations`) reproduces.

    The loss's graph holds every trained transition of the micro-batch at once (one backward per micro-step, as
    `Trainer` runs it): size `per_device_train_batch_size`, `num_generations` and `sde_window_size` to the memory.
    """

    def __init__(
        self,
        pipeline,
        reward_funcs: RewardFunc | list[RewardFunc],
        args: BagelGRPOConfig,
        train_dataset=None,
        model=None,
        lora_config=None,
        **kwargs,
    ):
        from peft import PeftModel

        if not isinstance(args, BagelGRPOConfig):
            raise ValueError(f"`args` must be a BagelGRPOConfig, got {type(args).__name__}.")
        reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not reward_funcs or not all(callable(f) for f in reward_funcs):
            raise ValueError("`reward_funcs` must be one callable or a non-empty list of callables.")
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(reward_funcs)
        if len(weights) != len(reward_funcs):
            raise ValueError(f"`reward_weights` has {len(weights)} weights for {len(reward_funcs)} reward functions.")
        if train_dataset is not None and "prompt" not in train_dataset.column_names:
            raise ValueError(f"`train_dataset` needs a `prompt` column, it has {train_dataset.column_names}.")
        if model is None:
            if isinstance(pipeline.model, PeftModel):
                raise ValueError("Pass the PeftModel as `model=` and its base model as the pipeline's `model`.")
            from transformers_bagel.training import get_bagel_lora_model

            set_seed(args.seed)  # the LoRA's initial weights are drawn: a seeded run starts from the same ones
            model = get_bagel_lora_model(pipeline.model, lora_config)
        elif not isinstance(model, PeftModel) or model.get_base_model() is not pipeline.model:
            raise ValueError("`model` must be the peft.PeftModel wrapping `pipeline.model`.")
        self.pipeline = pipeline
        self.reward_funcs = reward_funcs
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self._metrics = defaultdict(list)
        self._micro_step = (-1, 0)  # (global step, micro-steps run in it)
        self._buffer = {}  # (sampling step, micro-step) -> samples, reused for `num_iterations` steps
        kwargs.setdefault("data_collator", _collate_prompts)
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a mean: Trainer divides it by the accumulation steps
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "BagelGRPOTrainer runs on one process or under DDP (`torchrun` / `accelerate launch` without FSDP or "
                "DeepSpeed): its loss calls the pipeline's model directly, which FSDP's and DeepSpeed's wrappers would "
                "not see. The LoRA's weights are small; replicate them."
            )

    # -- sampling ----------------------------------------------------------------------------------------------------

    def _sampling_seed(self, step: int, micro: int) -> int:
        """The seed of a micro-step's sampling: `(seed, global step, micro-step, process index)` hashed."""
        words = [self.args.seed, step, micro, self.args.process_index]
        return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)

    def _sde_steps(self, generator: torch.Generator) -> list[int]:
        """The window of SDE steps (the trained transitions), its start drawn from `generator`."""
        steps, size = self.args.num_inference_steps, self.args.sde_window_size
        if size is None or size == steps:
            return list(range(steps))
        start = int(torch.randint(0, steps - size + 1, (1,), generator=generator))
        return list(range(start, start + size))

    @torch.no_grad()
    def _generate_and_score(self, inputs: dict[str, list], seed: int) -> dict:
        """Samples the group of each prompt (adapter on) from `seed`, scores it, and returns the transitions to train
        on."""
        args, pipe = self.args, self.pipeline
        prompts = inputs["prompt"]
        generator = torch.Generator().manual_seed(seed)
        sde_steps = self._sde_steps(generator)
        out = pipe(
            prompts, height=args.height, width=args.width, num_inference_steps=args.num_inference_steps,
            timestep_shift=args.timestep_shift, cfg_text_scale=args.cfg_text_scale, cfg_interval=args.cfg_interval,
            cfg_renorm_type=args.cfg_renorm_type, num_images_per_prompt=args.num_generations, generator=generator,
            sde_noise_level=args.sde_noise_level, sde_steps=sde_steps, return_trajectory=True, output_type="pil",
        )  # fmt: skip
        G = args.num_generations
        columns = {key: [value for value in values for _ in range(G)] for key, values in inputs.items()}
        repeated = columns.pop("prompt")
        per_func = torch.zeros(len(out.images), len(self.reward_funcs))
        for k, func in enumerate(self.reward_funcs):
            values = func(out.images, repeated, **columns)
            if len(values) != len(out.images):
                raise ValueError(
                    f"Reward function {_name(func)} returned {len(values)} values for {len(out.images)} images."
                )
            per_func[:, k] = torch.tensor([float(v) for v in values])
        rewards = (per_func * self.reward_weights).sum(dim=1)
        for k, func in enumerate(self.reward_funcs):
            self._metrics[f"rewards/{_name(func)}/mean"].append(per_func[:, k].mean().item())
            self._metrics[f"rewards/{_name(func)}/std"].append(per_func[:, k].std(unbiased=False).item())
        self._metrics["reward"].append(rewards.mean().item())
        self._metrics["reward_std"].append(rewards.std(unbiased=False).item())
        index = torch.tensor(out.sde_steps)
        return {
            "prompts": prompts,
            "samples": out.trajectory[index].transpose(0, 1),  # (batch, transitions, tokens, channels)
            "next_samples": out.trajectory[index + 1].transpose(0, 1),
            "timesteps": out.timesteps[index],
            "sigmas": pipe.scheduler.sigmas[index],
            "old_log_probs": out.log_probs.transpose(0, 1),  # (batch, transitions)
            "advantages": group_advantages(rewards, G, args.advantage_epsilon),
            "rewards": rewards,
        }

    def _guidance(self, prompts: list):
        """The prefilled guidance contexts of `prompts`, each repeated `num_generations` times, as the pipeline's call
        builds them (no gradients: the context tokens do not pass through the adapted generation experts), and the
        latent grid of the images."""
        args, pipe = self.args, self.pipeline
        batch = pipe.normalize_prompts(prompts)
        cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type = guidance_settings(
            batch, args.cfg_text_scale, None, args.cfg_interval, args.cfg_renorm_type
        )
        contexts = [pipe.build_contexts(items, False) for items in batch]
        height, width = output_size(contexts, args.height, args.width, pipe.default_sample_size)
        contexts = [context for context in contexts for _ in range(args.num_generations)]
        with torch.no_grad():
            guidance = pipe.prepare_guidance(
                contexts, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, DEFAULT_CFG_RENORM_MIN
            )
        return guidance, (height // pipe.latent_downsample, width // pipe.latent_downsample)

    # -- training ----------------------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        batch = self._sampled_batch(inputs)
        sampled = time.perf_counter()
        loss = super().training_step(model, batch, num_items_in_batch)
        self._average_gradients_over_processes()
        self._metrics["sampling_seconds"].append(sampled - start)
        self._metrics["training_seconds"].append(time.perf_counter() - sampled)
        return loss

    def _average_gradients_over_processes(self) -> None:
        """
        Under DDP, averages the trainable parameters' gradients over the processes once per optimiser step (on the
        accumulation's last micro-step), as DDP's own reducer would. DDP's reducer never runs here: the loss calls
        the pipeline's model, not the DDP wrapper's `forward`, and without this each process would step on its own
        gradients and the replicas would drift apart. One all-reduce (accelerate's `reduce`) of the flattened
        gradients (LoRA weights only).
        """
        if self.accelerator.num_processes == 1 or not self.accelerator.sync_gradients:
            return
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        for parameter in parameters:
            if parameter.grad is None:  # no gradient on this process: a zero one, so every process sends as much
                parameter.grad = torch.zeros_like(parameter)
        grads = [parameter.grad for parameter in parameters]
        mean = self.accelerator.reduce(torch.cat([grad.reshape(-1) for grad in grads]), reduction="mean")
        for grad, part in zip(grads, mean.split([grad.numel() for grad in grads])):
            grad.copy_(part.view_as(grad))

    def _sampled_batch(self, inputs: dict[str, list]) -> dict:
        """This micro-step's samples: drawn on every `num_iterations`-th step, reused (with their old log-probs) on
        the steps between, whose dataloader batches are skipped."""
        step = self.state.global_step
        micro = self._micro_step[1] + 1 if self._micro_step[0] == step else 0
        self._micro_step = (step, micro)
        generation = step - step % self.args.num_iterations
        if (generation, micro) in self._buffer:
            return self._buffer[(generation, micro)]
        if generation != step:
            logger.warning(
                f"Step {step} reuses the samples of step {generation}, which this trainer did not draw (a run resumed "
                "between them): sampling them again from the current policy. Save checkpoints every "
                "`num_iterations` steps to resume exactly."
            )
        self.model.eval()  # sampling: no dropout
        batch = self._generate_and_score(inputs, self._sampling_seed(generation, micro))
        if self.args.num_iterations > 1:
            self._buffer = {key: value for key, value in self._buffer.items() if key[0] == generation}
            self._buffer[(generation, micro)] = batch
        return batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The clipped surrogate of the stored transitions (their velocities recomputed with gradients, adapter on)
        plus `beta` times the KL to the adapter-free reference, averaged over images and transitions."""
        if return_outputs:
            raise ValueError("BagelGRPOTrainer computes a loss only.")
        args, pipe = self.args, self.pipeline
        guidance, grid = self._guidance(inputs["prompts"])
        advantages = inputs["advantages"]
        losses, kls, clipped = [], [], []
        for j, (timestep, sigma) in enumerate(zip(inputs["timesteps"], inputs["sigmas"].tolist())):
            x, x_next = inputs["samples"][:, j], inputs["next_samples"][:, j]
            velocity = pipe.guided_velocity(x, sigma, grid, guidance)
            step = pipe.scheduler.sde_step(velocity, timestep, x, args.sde_noise_level, prev_sample=x_next)
            loss, _, clip = clipped_surrogate(step.log_prob, inputs["old_log_probs"][:, j], advantages, args.epsilon)
            if args.beta > 0:
                with torch.no_grad(), self.model.disable_adapter():
                    ref_velocity = pipe.guided_velocity(x, sigma, grid, guidance)
                    ref = pipe.scheduler.sde_step(ref_velocity, timestep, x, args.sde_noise_level, prev_sample=x_next)
                kl = gaussian_kl(step.prev_sample_mean, ref.prev_sample_mean, step.std_dev)
                loss = loss + args.beta * kl
                kls.append(kl.detach())
            losses.append(loss)
            clipped.append(clip.float())
        loss = torch.stack(losses).mean()
        self._metrics["kl"].append(torch.stack(kls).mean().item() if kls else 0.0)
        self._metrics["clip_ratio"].append(torch.stack(clipped).mean().item())
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the means of this logging interval's GRPO metrics to `logs`."""
        if "loss" in logs:  # training logs; the evaluation's have their own keys
            logs.update({key: float(np.mean(values)) for key, values in self._metrics.items() if values})
            self._metrics.clear()
        super().log(logs, start_time)


def _name(func) -> str:
    return getattr(func, "__name__", type(func).__name__)
