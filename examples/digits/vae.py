"""Training of the digits VAE: a tiny FLUX-layout `AutoencoderKL` whose latent statistics set its scaling / shift."""

import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm
from transformers.utils import logging

from .configs import digits_vae_config


logger = logging.get_logger(__name__)

__all__ = ["latent_statistics", "train_digits_vae"]


def _pixels(images: np.ndarray) -> torch.Tensor:
    # Same normalisation as BagelImageProcessor (mean 0.5, std 0.5): values in [-1, 1].
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 128) -> tuple[float, float]:
    """`(shift_factor, scaling_factor)` that map the posterior means of `images` to zero mean and unit variance,
    as FLUX's factors do for its training data."""
    vae.eval()
    means = [vae.encode(_pixels(images[i : i + batch_size])).latent_dist.mean for i in range(0, len(images), batch_size)]
    latents = torch.cat(means)
    shift = float(latents.mean())
    return shift, float(1.0 / (latents - shift).std())


def train_digits_vae(
    images: np.ndarray,
    max_steps: int = 1500,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    time_budget_minutes: float | None = None,
    progress: bool = True,
) -> AutoencoderKL:
    """
    Trains the digits autoencoder (config [`digits_vae_config`]) on `images` (`uint8` `(N, 64, 64, 3)`) with an L1 +
    MSE reconstruction loss and a small KL term, AdamW with cosine decay, then sets `shift_factor` and
    `scaling_factor` from the statistics of the training latents ([`latent_statistics`]).

    A hand-written loop rather than `Trainer`: the whole data set is one small tensor in memory and the step is a
    plain autoencoder loss, so a `Trainer` would add a dataset wrapper and a loss subclass for nothing.

    Args:
        images (`np.ndarray`): training images.
        max_steps (`int`): optimiser steps.
        batch_size (`int`), learning_rate (`float`), kl_weight (`float`): optimisation settings.
        seed (`int`): seeds the initialisation and the batches.
        time_budget_minutes (`float`, *optional*): stop early once this much wall time has passed.
        progress (`bool`): show a progress bar.

    Returns:
        The trained [`AutoencoderKL`] in eval mode.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError("`images` must be a uint8 array of shape (N, H, W, 3).")
    if max_steps < 1 or batch_size < 1:
        raise ValueError(f"`max_steps` and `batch_size` must be positive, got {max_steps} and {batch_size}.")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(**digits_vae_config())
    data = _pixels(images)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=max_steps, pct_start=0.05)
    deadline = time.monotonic() + 60 * time_budget_minutes if time_budget_minutes else None
    vae.train()
    bar = tqdm(range(max_steps), desc="vae", disable=not progress)
    for step in bar:
        batch = data[torch.randint(len(data), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        recon_loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = recon_loss + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 10 == 0:
            bar.set_postfix(recon=f"{recon_loss.item():.4f}", kl=f"{kl.item():.2f}")
        if deadline is not None and time.monotonic() > deadline:
            logger.warning(f"VAE time budget reached after {step + 1} steps.")
            break
    shift, scale = latent_statistics(vae, images)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.eval()
    return vae
