# Copyright 2025 The bagel-hf authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Output class of [`BagelPipeline`]."""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


__all__ = ["BagelPipelineOutput"]


@dataclass
class BagelPipelineOutput(BaseOutput):
    """
    Output class of the BAGEL image generation / editing pipeline.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images, one per prompt and per `num_images_per_prompt`: a list of PIL images
            (`output_type="pil"`), a `(batch_size, height, width, 3)` array in `[0, 1]` (`"np"`), a
            `(batch_size, 3, height, width)` tensor in `[0, 1]` (`"pt"`), or the VAE latents (`"latent"`).
        text (`list[str | None]`, *optional*):
            The reasoning BAGEL wrote before drawing each image when thinking was enabled (`None` for an image
            generated without it), or `None` when no image was generated with thinking.
        trajectory (`torch.Tensor`, *optional*):
            With `return_trajectory=True`: the packed latents the denoising steps went through, `(num_steps + 1,
            batch_size, num_tokens, channels)` float32 on the call's device (the initial noise, then each step's
            output); `trajectory[i]` is step `i`'s input and `trajectory[i + 1]` its output, as the model and
            [`~FlowMatchEulerScheduler.sde_step`] take them.
        log_probs (`torch.Tensor`, *optional*):
            With `return_trajectory=True`: `(len(sde_steps), batch_size)` float32, the log-probability of each SDE
            step's transition, summed over the image's latent elements; `None` when no SDE step ran.
        timesteps (`torch.Tensor`, *optional*):
            With `return_trajectory=True`: `(num_steps,)`, the timesteps of the steps run (`sigmas * 1000`).
        sde_steps (`tuple[int, ...]`, *optional*):
            With `return_trajectory=True`: the indices of the steps that ran the SDE, in order (rows of `log_probs`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    text: list[str | None] | None = None
    trajectory: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    sde_steps: tuple[int, ...] | None = None
