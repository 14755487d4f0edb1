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
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    text: list[str | None] | None = None
