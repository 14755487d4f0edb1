"""The unoptimised denoising path (every CFG branch alone, its whole context re-run, no cache), timed step by step
against the pipeline's step on the same contexts."""

import numpy as np
import torch

from diffusers_bagel import BagelPipeline

from .generation import GenerationTask, schedule
from .timing import Clock


__all__ = ["SequentialPath", "run_comparison"]


class SequentialPath:
    """
    The unoptimised path: at every step, each CFG branch one after another, each running its whole context plus the
    latent block through `BagelModel.forward` with no cache. Same contexts, branch selection and guidance
    combination as `BagelPipeline.guided_velocity`.
    """

    def __init__(self, pipe: BagelPipeline, contexts, guidance):
        self.pipe, self.guidance = pipe, guidance
        branches = [contexts.full]
        if guidance.use_text:
            branches.append(contexts.no_text)
        if guidance.use_image:
            branches.append(contexts.no_image)
        # Tokenisation, ViT pixels and VAE latents of each context are inputs of the public forward, prepared once
        # (by the pipeline); the model work (ViT, decoder) is redone every step.
        self.inputs = [pipe.encode_contexts([ctx], generator=None, sample_posterior=False) for ctx in branches]

    def _velocity(self, inputs: dict, x: torch.Tensor, t: float, grid: tuple[int, int]) -> torch.Tensor:
        model, config = self.pipe.model, self.pipe.model.config
        device, num_tokens = x.device, x.shape[1]
        block = torch.full((num_tokens + 2,), config.latent_token_id, dtype=torch.long, device=device)
        block[0], block[-1] = config.start_of_image_token_id, config.end_of_image_token_id
        input_ids = torch.cat([inputs["input_ids"][0], block])[None]
        context_latents = inputs.get("latents")
        latents = x[0].to(model.dtype)
        if context_latents is not None:
            latents = torch.cat([context_latents, latents])
        grids = torch.tensor([list(grid)], device=device)
        if context_latents is not None:
            grids = torch.cat([inputs["latent_grid_hw"], grids])
        timesteps = torch.zeros(grids.shape[0], device=device)
        timesteps[-1] = t
        hidden = model.model(
            input_ids=input_ids,
            pixel_values=inputs.get("pixel_values"),
            image_grid_hw=inputs.get("image_grid_hw"),
            latents=latents,
            latent_grid_hw=grids,
            latent_timesteps=timesteps,
            use_cache=False,
        ).last_hidden_state
        return model.llm2vae(hidden[:, -num_tokens - 1 : -1]).float()

    def velocity(self, x: torch.Tensor, t: float, grid: tuple[int, int]) -> torch.Tensor:
        g = self.guidance
        if not (g.use_text and self.pipe.scheduler.cfg_active(t, g.cfg_interval)):
            return self._velocity(self.inputs[0], x, t, grid)
        v_cond, v_text = self._velocity(self.inputs[0], x, t, grid), self._velocity(self.inputs[1], x, t, grid)
        if g.use_image:
            v_image = self._velocity(self.inputs[2], x, t, grid)
        else:
            v_image = v_cond if g.image_reuses_full else None
        return self.pipe.scheduler.apply_guidance(
            v_cond, v_uncond_text=v_text, v_uncond_image=v_image, cfg_text_scale=g.cfg_text_scale,
            cfg_img_scale=g.cfg_img_scale, cfg_renorm_type=g.cfg_renorm_type, cfg_renorm_min=g.cfg_renorm_min,
        )  # fmt: skip


def run_comparison(pipe, task: GenerationTask, contexts, guidance, args, clock: Clock) -> dict:
    """`--compare_steps` denoising steps (the first ones of the schedule, where CFG is on) of both paths over the
    task's contexts, timed."""
    height, width = task.height, task.width
    grid = (height // pipe.latent_downsample, width // pipe.latent_downsample)
    shape = (1, grid[0] * grid[1], pipe.model.config.patch_latent_dim)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(clock.device)
    sigmas = schedule(args.steps)
    steps = min(args.compare_steps, args.steps)
    sequential = SequentialPath(pipe, contexts, guidance)
    paths = {
        "optimised": lambda x, t: pipe.guided_velocity(x, t, grid, guidance),
        "sequential": lambda x, t: sequential.velocity(x, t, grid),
    }
    x = {name: noise for name in paths}
    first_v, times = {}, {name: [] for name in paths}
    with torch.no_grad():
        for velocity in paths.values():
            velocity(noise, sigmas[0])  # warm-up (allocator, kernels)
        # The two paths alternate step by step, so that load from other processes hits both alike.
        for i in range(steps):
            for name, velocity in paths.items():
                start = clock.now()
                v = velocity(x[name], sigmas[i])
                x[name] = x[name] + (sigmas[i + 1] - sigmas[i]) * v
                times[name].append(clock.now() - start)
                first_v.setdefault(name, v)
    best = {name: min(t) for name, t in times.items()}
    median = {name: float(np.median(t)) for name, t in times.items()}
    return {
        "task": task.name,
        "cfg_branches": guidance.num_branches,
        "steps_timed": steps,
        "sequential_s_per_step": best["sequential"],
        "optimised_s_per_step": best["optimised"],
        "speedup": best["sequential"] / best["optimised"],
        "speedup_median": median["sequential"] / median["optimised"],
        "sequential_step_times": times["sequential"],
        "optimised_step_times": times["optimised"],
        "max_abs_dv_step1": float((first_v["optimised"] - first_v["sequential"]).abs().max()),
        "max_abs_v_step1": float(first_v["sequential"].abs().max()),
        "max_abs_dx_final": float((x["optimised"] - x["sequential"]).abs().max()),
    }
