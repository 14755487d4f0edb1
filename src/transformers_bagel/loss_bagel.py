"""BAGEL's training objectives: the noised generation targets of flow matching, the next-token cross entropy and the
flow-matching MSE, with transformers' `num_items_in_batch` normalisation."""

import torch
from torch import nn

from .configuration_bagel import BagelConfig
from .modeling_bagel_embeddings import pack_latents


__all__ = ["cross_entropy_loss", "flow_matching_loss", "noise_latent_targets"]


def noise_latent_targets(
    config: BagelConfig,
    latents: torch.Tensor,
    latent_grid_hw: torch.LongTensor,
    noised_latent_images: torch.BoolTensor,
    noise: torch.Tensor | list[torch.Tensor] | None,
    timesteps: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.BoolTensor, torch.Tensor]:
    """Noises the target images' tokens of packed `latents` to `x_t = (1 - t) x0 + t noise` (see
    [`BagelForConditionalGeneration.forward`]); returns (x_t tokens, per-image t, target-token mask, velocity target
    `noise - x0`)."""
    device = latents.device
    lengths = (latent_grid_hw[:, 0] * latent_grid_hw[:, 1]).to(device)
    is_target = noised_latent_images.to(device)
    if is_target.numel() != lengths.numel():
        raise ValueError(
            f"noised_latent_images has {is_target.numel()} entries for {lengths.numel()} latent images."
        )
    num_targets = int(is_target.sum())
    if timesteps is None:
        t = torch.sigmoid(torch.randn(num_targets, device=device))
        shift = config.timestep_shift
        t = shift * t / (1 + (shift - 1) * t)
    else:
        t = torch.as_tensor(timesteps, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() != num_targets or not bool(((t >= 0) & (t <= 1)).all()):  # NaN fails both comparisons
            raise ValueError(f"`timesteps` must hold {num_targets} values in [0, 1] (one per target image).")
    per_image_t = torch.zeros(lengths.numel(), device=device)
    per_image_t[is_target] = t
    token_t = per_image_t.repeat_interleave(lengths)
    target_tokens = is_target.repeat_interleave(lengths)
    clean_targets = latents[target_tokens].float()
    if noise is None:
        packed_noise = torch.randn_like(clean_targets)
    elif isinstance(noise, torch.Tensor) and noise.dim() == 2:
        packed_noise = noise.to(device=device, dtype=torch.float32)
    else:
        target_grids = latent_grid_hw[is_target.to(latent_grid_hw.device)].tolist()
        if len(noise) != num_targets:
            raise ValueError(f"`noise` must hold one tensor per target image ({num_targets}), got {len(noise)}.")
        packed = []
        for tensor, (h, w) in zip(noise, target_grids):
            p = config.latent_patch_size
            expected = (config.latent_channels, h * p, w * p)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"A target image's noise must have shape {expected}, got {tuple(tensor.shape)}.")
            packed.append(pack_latents(tensor[None].to(device=device, dtype=torch.float32), p)[0])
        packed_noise = torch.cat(packed)
    if packed_noise.shape != clean_targets.shape:
        raise ValueError(f"`noise` packs to {tuple(packed_noise.shape)}, expected {tuple(clean_targets.shape)}.")
    t_targets = token_t[target_tokens][:, None]
    noised = latents.clone()
    noised[target_tokens] = ((1 - t_targets) * clean_targets + t_targets * packed_noise).to(latents.dtype)
    return noised, per_image_t, target_tokens, packed_noise - clean_targets


def _normaliser(given, local_count) -> torch.Tensor | int:
    """The count a loss sum is divided by: `given` (a `num_items_in_batch`), else the local count (a mean)."""
    if given is None:
        return local_count
    return given.to(torch.float32) if isinstance(given, torch.Tensor) else float(given)


def cross_entropy_loss(
    lm_head: nn.Module, hidden_states: torch.Tensor, labels: torch.LongTensor, num_items: int | torch.Tensor | None
) -> torch.Tensor:
    """Next-token cross entropy of the labelled positions (`-100`: none), the logits at `i` predicting `labels[i + 1]`;
    only those positions go through the (vocabulary-sized) head. Summed and divided by `num_items`, else averaged."""
    shift_labels = labels[:, 1:]
    keep = shift_labels != -100
    if not bool(keep.any()):
        return hidden_states.sum() * 0.0
    logits_kept = lm_head(hidden_states[:, :-1][keep])
    return nn.functional.cross_entropy(
        logits_kept.float(), shift_labels[keep].to(logits_kept.device), reduction="sum"
    ) / _normaliser(num_items, keep.sum())


def flow_matching_loss(
    prediction: torch.Tensor, velocity_target: torch.Tensor, num_items: int | torch.Tensor | None
) -> torch.Tensor:
    """MSE of the predicted velocities of the target latent tokens: averaged, or (with `num_items`) averaged over the
    channels, summed over the tokens and divided by `num_items`."""
    squared = (prediction.float() - velocity_target.float()).pow(2)
    if num_items is None:
        return squared.mean()
    return squared.mean(-1).sum() / _normaliser(num_items, squared.shape[0])
