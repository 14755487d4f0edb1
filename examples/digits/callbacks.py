"""`TrainerCallback`s of the digits training: a time budget, and a sample grid written every N steps (on the EMA
weights of the library's [`BagelEMACallback`] when one is given)."""

import time
from pathlib import Path

import PIL.Image
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from transformers_bagel.training.callbacks import BagelEMACallback


logger = logging.get_logger(__name__)

__all__ = ["SampleGridCallback", "TimeBudgetCallback", "image_grid"]


class TimeBudgetCallback(TrainerCallback):
    """Stops training (and lets `Trainer` finish cleanly) once `minutes` of wall time have passed since training
    began."""

    def __init__(self, minutes: float):
        if not minutes > 0:
            raise ValueError(f"`minutes` must be > 0, got {minutes!r}.")
        self.seconds = 60.0 * minutes
        self.start = None
        self.stopped_at_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and time.monotonic() - self.start > self.seconds:
            if self.stopped_at_step is None:
                logger.warning(f"Time budget of {self.seconds / 60:.1f} min reached at step {state.global_step}.")
                self.stopped_at_step = state.global_step
            control.should_training_stop = True
        return control


def image_grid(rows: list[list[PIL.Image.Image]], pad: int = 2, background=(40, 40, 40)) -> PIL.Image.Image:
    """Pastes equally sized images into one grid image, `rows[i][j]` at row i, column j."""
    if not rows or not all(rows) or not all(isinstance(image, PIL.Image.Image) for row in rows for image in row):
        raise ValueError("`rows` must be a non-empty list of non-empty lists of PIL images.")
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    grid = PIL.Image.new("RGB", (columns * (width + pad) + pad, len(rows) * (height + pad) + pad), background)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB"), (pad + j * (width + pad), pad + i * (height + pad)))
    return grid


class SampleGridCallback(TrainerCallback):
    """
    Every `every_n_steps` optimiser steps (and at the end of training), draws `prompts` with [`BagelPipeline`] on the
    current weights (the EMA weights when a [`BagelEMACallback`] is given) and writes a PNG grid, one row per prompt, to
    `output_dir/step_XXXXXX.png`.

    Args:
        pipeline_factory (`Callable[[], BagelPipeline]`): builds the pipeline around the model being trained.
        prompts (`list[str]`): one grid row each.
        output_dir (`str` or `Path`): where the grids go.
        every_n_steps (`int`, defaults to 200).
        images_per_prompt (`int`, defaults to 4), num_inference_steps (`int`, defaults to 12), seed (`int`).
        ema ([`BagelEMACallback`], *optional*): sample with the averaged weights.
        pipeline_kwargs (`dict`, *optional*): more pipeline arguments (`height`, `width`, `timestep_shift`, ...).
    """

    def __init__(
        self,
        pipeline_factory,
        prompts: list[str],
        output_dir,
        every_n_steps: int = 200,
        images_per_prompt: int = 4,
        num_inference_steps: int = 12,
        seed: int = 0,
        ema: BagelEMACallback | None = None,
        pipeline_kwargs: dict | None = None,
    ):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive integer, got {every_n_steps!r}.")
        if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError("`prompts` must be a non-empty list of strings.")
        self.pipeline_factory = pipeline_factory
        self.prompts = list(prompts)
        self.output_dir = Path(output_dir)
        self.every_n_steps = every_n_steps
        self.images_per_prompt = images_per_prompt
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.ema = ema
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self.written: list[Path] = []

    def write_grid(self, step: int, model: torch.nn.Module) -> Path:
        """Draws the grid now and returns its path."""
        was_training = model.training
        model.eval()
        try:
            if self.ema is not None:
                with self.ema.swapped_in():
                    images = self._draw()
            else:
                images = self._draw()
        finally:
            model.train(was_training)
        per = self.images_per_prompt
        grid = image_grid([images[i * per : (i + 1) * per] for i in range(len(self.prompts))])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"step_{step:06d}.png"
        grid.save(path)
        self.written.append(path)
        return path

    def _draw(self) -> list[PIL.Image.Image]:
        pipe = self.pipeline_factory()
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            self.prompts,
            num_images_per_prompt=self.images_per_prompt,
            num_inference_steps=self.num_inference_steps,
            generator=torch.Generator().manual_seed(self.seed),
            **self.pipeline_kwargs,
        ).images

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.every_n_steps == 0:
            self.write_grid(state.global_step, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.every_n_steps != 0:
            self.write_grid(state.global_step, model)
