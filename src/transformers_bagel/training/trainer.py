"""Trainer integration: VAE encoding in the training step, the original's optimiser defaults, freezing options."""

import torch
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from ..modeling_bagel import pack_latents


logger = logging.get_logger(__name__)


@torch.no_grad()
def encode_vae_batch(
    vae,
    vae_pixel_values: torch.Tensor,
    latent_grid_hw: torch.LongTensor,
    patch_size: int,
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Encodes a zero-padded batch of images with the frozen VAE, as the original training step does (one padded batch,
    posterior sampled by default), and packs each image's latent region into tokens.

    Returns:
        `torch.Tensor` of shape `(total_latent_tokens, patch_size**2 * latent_channels)`, normalised
        (`(z - shift_factor) * scaling_factor`).
    """
    pixels = vae_pixel_values.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.sample(generator) if sample_posterior else posterior.mode()
    latents = (latents.float() - vae.config.shift_factor) * vae.config.scaling_factor
    tokens = []
    for latent, (h, w) in zip(latents, latent_grid_hw.tolist()):
        region = latent[:, : h * patch_size, : w * patch_size]
        tokens.append(pack_latents(region[None], patch_size)[0])
    return torch.cat(tokens)


def bagel_training_arguments(output_dir: str, **overrides) -> TrainingArguments:
    """
    `TrainingArguments` with the original training script's defaults: AdamW (betas 0.9/0.95, eps 1e-15), lr 1e-4,
    no weight decay, gradient clipping at 1.0, constant schedule after warm-up, and `remove_unused_columns=False`
    (the collator's keys are not all in `forward`'s signature as Trainer sees it). Any argument may be overridden.
    """
    defaults = dict(
        learning_rate=1e-4,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-15,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=2000,
        per_device_train_batch_size=1,
        remove_unused_columns=False,
        report_to="none",
    )
    defaults.update(overrides)
    return TrainingArguments(output_dir=output_dir, **defaults)


def freeze_modules(model, freeze_vit: bool = False, freeze_und: bool = False, freeze_llm: bool = False) -> list[str]:
    """
    The original's freeze options: `freeze_vit` (SigLIP encoder and connector), `freeze_und` (the understanding
    expert of every decoder layer, embeddings, final `norm` and `lm_head`), `freeze_llm` (the whole decoder).
    Returns the names of the frozen parameters.
    """
    frozen = []
    for name, param in model.named_parameters():
        is_vit = ".vision_model." in f".{name}" or ".connector." in f".{name}"
        is_llm = ".language_model." in f".{name}" or name.startswith("lm_head")
        is_und = is_llm and "moe_gen" not in name
        if (freeze_vit and is_vit) or (freeze_llm and is_llm) or (freeze_und and is_und):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


class BagelTrainer(Trainer):
    """
    `Trainer` for BAGEL. When the collator hands raw VAE images (`vae_pixel_values`), the frozen `vae` encodes them
    on the training device inside the step; with a latent cache the batch already holds `latents`. Logs `ce_loss` and
    `mse_loss` next to `loss`.

    Args:
        vae (`AutoencoderKL`, *optional*): the frozen FLUX autoencoder (needed unless every batch holds `latents`).
        sample_posterior (`bool`, defaults to `True`): sample the VAE posterior as the original; `False` takes the
            mean.
        **kwargs: everything `Trainer` takes.
    """

    def __init__(self, *args, vae=None, sample_posterior: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.vae = vae
        self.sample_posterior = sample_posterior
        if vae is not None:
            vae.requires_grad_(False)
            vae.eval()
        self._component_losses = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        pixels = inputs.pop("vae_pixel_values", None)
        if pixels is not None:
            if self.vae is None:
                raise ValueError("The batch holds raw VAE images: pass `vae=` to BagelTrainer or cache the latents.")
            if self.vae.device != pixels.device:
                self.vae.to(pixels.device)
            unwrapped = self.accelerator.unwrap_model(model)
            inputs["latents"] = encode_vae_batch(
                self.vae, pixels, inputs["latent_grid_hw"], unwrapped.config.latent_patch_size, self.sample_posterior
            ).to(pixels.device)
        outputs = model(**inputs)
        loss = outputs.loss
        for name in ("ce_loss", "mse_loss"):
            value = getattr(outputs, name, None)
            if value is not None:
                self._component_losses.setdefault(name, []).append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        for name, values in self._component_losses.items():
            if values:
                logs[name] = round(sum(values) / len(values), 6)
        self._component_losses = {}
        super().log(logs, *args, **kwargs)


__all__ = ["BagelTrainer", "bagel_training_arguments", "encode_vae_batch", "freeze_modules"]
