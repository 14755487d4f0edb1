"""
Trainer integration for BAGEL: [`BagelTrainer`] (VAE latents in the training step, the original's loss
normalisation, `ce_loss` / `mse_loss` logging, dropout epochs), [`bagel_training_arguments`] (the original's optimiser
defaults), [`freeze_modules`] (its freeze options) and [`bagel_fsdp_config`] (FSDP2 through `TrainingArguments`).

```python
model = BagelForConditionalGeneration.from_pretrained("BAGEL-7B-MoT/model")
collator = BagelDataCollator(processor, model.config, max_tokens=16384)
args = bagel_training_arguments("out", max_steps=1000, bf16=True, fsdp=True,
                                fsdp_config=bagel_fsdp_config(activation_checkpointing=True))
trainer = BagelTrainer(model=model, args=args, train_dataset=BagelPackedDataset(samples, collator),
                       data_collator=collator, vae=vae, callbacks=[BagelEMACallback()])
trainer.train()
```
"""

import math

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ..modeling_bagel import pack_latents
from .callbacks import BagelEMACallback
from .collator import IGNORE_INDEX


logger = logging.get_logger(__name__)


@torch.no_grad()
def latents_from_vae_inputs(
    vae,
    latent_grid_hw: torch.LongTensor,
    patch_size: int,
    vae_pixel_values: torch.Tensor | None = None,
    vae_moments: torch.Tensor | None = None,
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Clean latent tokens of a batch's VAE images, from either zero-padded pixels (encoded here by the frozen `vae`, one
    padded batch as the original) or cached posterior moments ([`cache_vae_latents`]). The latent is a posterior sample
    (the original's behaviour) or its mean (`sample_posterior=False`), normalised as `(z - shift) * scale`, cropped to
    each image's grid and packed.

    Returns:
        `torch.Tensor` of shape `(total_latent_tokens, patch_size**2 * latent_channels)`, float32.
    """
    if (vae_pixel_values is None) == (vae_moments is None):
        raise ValueError("Pass exactly one of `vae_pixel_values` and `vae_moments`.")
    if vae is None:
        raise ValueError(
            "The batch holds VAE images or cached VAE moments: pass the autoencoder (`vae=` to BagelTrainer), which "
            "encodes the images and gives the latent shift and scaling factors."
        )
    if vae_pixel_values is not None:
        parameter = next(vae.parameters())
        posterior = vae.encode(vae_pixel_values.to(device=parameter.device, dtype=parameter.dtype)).latent_dist
    else:
        posterior = DiagonalGaussianDistribution(vae_moments.float())
    latents = posterior.sample(generator) if sample_posterior else posterior.mode()
    latents = (latents.float() - vae.config.shift_factor) * vae.config.scaling_factor
    tokens = []
    for latent, (h, w) in zip(latents, latent_grid_hw.tolist()):
        tokens.append(pack_latents(latent[None, :, : h * patch_size, : w * patch_size], patch_size)[0])
    return torch.cat(tokens)


def bagel_training_arguments(output_dir: str, **overrides) -> TrainingArguments:
    """
    `TrainingArguments` with the original training script's defaults: AdamW with betas (0.9, 0.95) and eps 1e-15,
    lr 1e-4, no weight decay, gradient clipping at 1.0, 2000 warm-up steps then a constant rate, one packed batch per
    device step, and `remove_unused_columns=False` (the collator's keys must reach the model). Any argument may be
    overridden, e.g. `lr_scheduler_type="cosine_with_min_lr"`, `lr_scheduler_kwargs={"min_lr": 1e-7}` for the
    original's cosine option.
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


def bagel_fsdp_config(activation_checkpointing: bool = False, **overrides) -> dict:
    """
    `TrainingArguments.fsdp_config` for FSDP2 on BAGEL: each MoT decoder layer (`BagelDecoderLayer`) and each SigLIP
    encoder layer (`SiglipEncoderLayer`) is its own unit, as the original wraps them. With
    `activation_checkpointing=True` FSDP checkpoints each unit (prefer it to the `activation_checkpointing` training
    argument under FSDP). Checkpoints are full, HF-loadable state dicts unless
    `state_dict_type="SHARDED_STATE_DICT"` is passed. Use with `fsdp=True` on accelerators (accelerate applies FSDP
    only there; on CPU see `transformers_bagel.training.fsdp`).
    """
    config = {
        "version": 2,
        "transformer_layer_cls_to_wrap": ["BagelDecoderLayer", "SiglipEncoderLayer"],
        "reshard_after_forward": True,
        "activation_checkpointing": activation_checkpointing,
        "cpu_ram_efficient_loading": False,
    }
    config.update(overrides)
    return config


def _is_vit(name: str) -> bool:
    return ".vision_model." in f".{name}"


def _is_llm(name: str) -> bool:
    return ".language_model." in f".{name}" or ".lm_head." in f".{name}"


def _is_und_expert(name: str) -> bool:
    # The understanding expert's weights inside the decoder layers and the final norm (not `norm_moe_gen`).
    return ".language_model." in f".{name}" and "moe_gen" not in name and (".layers." in name or ".norm." in name)


def freeze_modules(model, freeze_vit: bool = False, freeze_und: bool = False, freeze_llm: bool = False) -> list[str]:
    """
    The original's freeze options, as `requires_grad=False`. (The fixed 2-D sin-cos tables `vit_pos_embed` /
    `latent_pos_embed` are buffers, never trained.)

    - `freeze_vit`: the SigLIP encoder (not the connector);
    - `freeze_llm`: the whole language model (embeddings, both experts of every layer, final norms, `lm_head`);
    - `freeze_und`: the understanding expert of every decoder layer and its final norm, and, as the original, the
      understanding tokens' activations are detached (`text_config.freeze_und`): no gradient reaches the text
      embeddings, the ViT or the connector through them, and the generation loss does not flow back through them.

    Returns the names of the parameters frozen.
    """
    frozen = []
    for name, param in model.named_parameters():
        if (freeze_vit and _is_vit(name)) or (freeze_llm and _is_llm(name)) or (freeze_und and _is_und_expert(name)):
            param.requires_grad_(False)
            frozen.append(name)
    if freeze_und:
        model.config.text_config.freeze_und = True  # the decoder's own config object: it detaches und activations
    if freeze_vit or freeze_llm or freeze_und:
        logger.info(f"Froze {len(frozen)} parameter tensors.")
    return frozen


class _CollatorEpochCallback(TrainerCallback):
    """Tells the collator the epoch, which keys its seeded condition dropout (reproducible across resumes)."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


class BagelTrainer(Trainer):
    """
    `Trainer` for BAGEL:

    - batches holding raw VAE images (`vae_pixel_values`) or cached posterior moments (`vae_moments`) get their clean
      latents in the training step from the frozen `vae` (posterior sample as the original, or the mean);
    - the loss is the model's own, `ce_weight * CE + mse_weight * MSE`, each a mean over its tokens (CE over labelled
      tokens, MSE over target latent tokens and channels); in multi-process runs the trainer passes the token counts
      summed over all processes as the model's `num_items_in_batch`, as the original normalises (`sum * world /
      total`); gradient accumulation divides by the number of micro-batches, as the original;
    - `ce_loss` and `mse_loss` are logged beside `loss`;
    - a seeded [`BagelDataCollator`] gets the epoch, and a [`BagelEMACallback`] among the callbacks resumes its averages
      from the checkpoint given to `train(resume_from_checkpoint=...)`.

    Args:
        vae (`AutoencoderKL`, *optional*): the FLUX autoencoder; frozen and put in eval mode here.
        sample_posterior (`bool`, defaults to `True`): sample the VAE posterior (original) or take its mean.
        ce_weight, mse_weight (`float`, defaults to 1.0): loss weights.
        **kwargs: everything `Trainer` takes.
    """

    def __init__(self, *args, vae=None, sample_posterior: bool = True, ce_weight: float = 1.0, mse_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        freeze_modules(self.model)  # only the fixed sin-cos position tables; the optimiser is built later
        if self.args.remove_unused_columns:
            raise ValueError(
                "BagelTrainer needs TrainingArguments(remove_unused_columns=False): the collator's keys (e.g. "
                "`vae_pixel_values`) must reach the training step."
            )
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False)
            vae.eval()
        self.sample_posterior = sample_posterior
        self.ce_weight = ce_weight
        self.mse_weight = mse_weight
        # The model's forward takes **kwargs, so Trainer would assume it normalises by `num_items_in_batch` itself and
        # would pass that count down to the attention kernels; BAGEL normalises per micro-batch like the original.
        self.model_accepts_loss_kwargs = False
        self._component_losses: dict[str, list[float]] = {}
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(_CollatorEpochCallback(self.data_collator))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool) and checkpoint:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, BagelEMACallback):
                callback.resume_from_checkpoint = checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _latents(self, model, inputs: dict) -> dict:
        pixels = inputs.pop("vae_pixel_values", None)
        moments = inputs.pop("vae_moments", None)
        if pixels is None and moments is None:
            return inputs
        if self.vae is not None and next(self.vae.parameters()).device != inputs["latent_grid_hw"].device:
            self.vae.to(inputs["latent_grid_hw"].device)
        config = self.accelerator.unwrap_model(model).config
        inputs["latents"] = latents_from_vae_inputs(
            self.vae,
            inputs["latent_grid_hw"],
            config.latent_patch_size,
            vae_pixel_values=pixels,
            vae_moments=moments,
            sample_posterior=self.sample_posterior,
        )
        return inputs

    def _loss_normalisers(self, inputs: dict) -> dict | None:
        """The original's normalisation of a multi-process run, as the model's `num_items_in_batch`: each loss sum is
        divided by its token count summed over all processes, over the number of processes (`sum * world / total`).
        None in single-process runs (each loss is then its micro-batch mean, as the original). This is what Trainer
        lacks: its own `num_items_in_batch` counts text labels only, and over the accumulated micro-batches."""
        world = self.accelerator.num_processes
        if world <= 1:
            return None
        device = self.accelerator.device
        labels, noised = inputs.get("labels"), inputs.get("noised_latent_images")
        ce = (labels[:, 1:] != IGNORE_INDEX).sum() if labels is not None else torch.zeros((), device=device)
        if noised is not None:
            grid = inputs["latent_grid_hw"]
            mse = (grid[:, 0] * grid[:, 1])[noised.to(grid.device)].sum()
        else:
            mse = torch.zeros((), device=device)
        # One gather of both counts, the same shape on every process whatever its batch holds.
        totals = self.accelerator.gather(torch.stack([ce.float().to(device), mse.float().to(device)])[None]).sum(0)
        return {"ce": (totals[0] / world).clamp(min=1 / world), "mse": (totals[1] / world).clamp(min=1 / world)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer's `num_items_in_batch` is not used: the original normalises per micro-batch (see `__init__`).
        inputs = self._latents(model, dict(inputs))
        normalisers = self._loss_normalisers(inputs)
        if normalisers is not None:
            inputs["num_items_in_batch"] = normalisers
        outputs = model(**inputs, ce_weight=self.ce_weight, mse_weight=self.mse_weight)
        if outputs.loss is None:
            raise ValueError("The batch has neither text labels nor target images: there is no loss to train on.")
        for name in ("ce_loss", "mse_loss"):
            if getattr(outputs, name) is not None:
                self._record(name, getattr(outputs, name), model)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _record(self, name: str, value: torch.Tensor, model):
        if model.training:  # evaluation losses are reported by `evaluate` itself
            self._component_losses.setdefault(name, []).append(float(value.detach()))

    def log(self, logs: dict, *args, **kwargs):
        for name, values in self._component_losses.items():
            if values and "loss" in logs:
                logs[name] = round(sum(values) / len(values), 6)
        if "loss" in logs:
            self._component_losses = {}
        super().log(logs, *args, **kwargs)


__all__ = [
    "BagelTrainer",
    "bagel_training_arguments",
    "bagel_fsdp_config",
    "freeze_modules",
    "latents_from_vae_inputs",
]
