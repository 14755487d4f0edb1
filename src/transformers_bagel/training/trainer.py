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
import os
import time

import torch
from accelerate.utils.constants import OPTIMIZER_NAME as FSDP_OPTIMIZER_NAME
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ..hardware import PEAK_TFLOPS_BF16, device_peak_tflops
from ..modeling_bagel import pack_latents
from .callbacks import BagelEMACallback
from .collator import IGNORE_INDEX
from .fsdp import enable_fsdp2_on_cpu, load_sharded_optimizer, shard_from_checkpoint


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
    `state_dict_type="SHARDED_STATE_DICT"` is passed. Use with `fsdp=True` under `torchrun` / `accelerate launch`, or
    launch with `examples/accelerate/fsdp2.yaml` instead (the same units); on CPU launches [`BagelTrainer`] applies it
    through accelerate too (see `transformers_bagel.training.fsdp.enable_fsdp2_on_cpu`).
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


def bagel_flops_per_token(config) -> float:
    """
    Training FLOPs per token of BAGEL, from the model config: `6 * N`, with `N` the parameters one token passes
    through in the language model. A mixture-of-transformers token uses ONE expert per layer (the understanding or
    the generation twin, of equal size), so `N` counts one expert: per layer the attention projections
    (`q`, `o`: `d x d`; `k`, `v`: `d x kv_heads * head_dim`) and the SwiGLU MLP (`3 x d x ffn`), plus the output
    projection (`d x vocab`). Not counted here: the embedding lookup (no matmul) and norms, the SigLIP encoder of
    ViT tokens and the frozen VAE. The attention scores are counted apart, per packed sample, by
    [`bagel_attention_flops_coefficient`].
    """
    text = config.text_config if hasattr(config, "text_config") else config
    d, layers, ffn = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or d // text.num_attention_heads
    q_o = 2 * d * text.num_attention_heads * head_dim
    k_v = 2 * d * text.num_key_value_heads * head_dim
    active = layers * (q_o + k_v + 3 * d * ffn) + d * text.vocab_size
    return 6.0 * active


def bagel_attention_flops_coefficient(config) -> float:
    """Training FLOPs of the attention scores and their weighted sum per squared sample length:
    `12 * layers * heads * head_dim` (forward `QK^T` and `AV`, `2 * 2 * L^2 * heads * head_dim` per layer, times 3 for
    the backward), counted over each packed sample's full `L x L` square as the original's MFU does (the packed mask
    is block-diagonal, so samples do not attend to each other)."""
    text = config.text_config if hasattr(config, "text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 12.0 * text.num_hidden_layers * text.num_attention_heads * head_dim


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
    - `ce_loss` and `mse_loss` are logged beside `loss`, with the throughput since the previous log:
      `tokens_per_second` (packed tokens of all processes, padding-free, per second of wall time) and `mfu` (model
      FLOPs utilisation: `(tokens * flops_per_token + attention_coefficient * sum of squared sample lengths) /
      seconds / (num_processes * peak)`, by [`bagel_flops_per_token`] and [`bagel_attention_flops_coefficient`]; the
      peak is `peak_tflops` or the device's dense bf16 peak from `PEAK_TFLOPS_BF16`;
      without either, e.g. on a CPU, whose peak depends on cores, vector units and clocks, only tokens/s is logged);
    - a seeded [`BagelDataCollator`] gets the epoch, and a [`BagelEMACallback`] among the callbacks resumes its averages
      from the checkpoint given to `train(resume_from_checkpoint=...)`.
    - under FSDP (an FSDP `accelerate launch` config or `fsdp=` arguments) on CPU processes, which accelerate would
      train under DDP, the run is sharded with FSDP2 through accelerate's own code, the weights streamed from the
      checkpoint files into the shards (`enable_fsdp2_on_cpu`, `shard_from_checkpoint`); a sharded optimizer
      checkpoint resumes even when some parameters never had a gradient (`load_sharded_optimizer`).

    Args:
        vae (`AutoencoderKL`, *optional*): the FLUX autoencoder; frozen and put in eval mode here.
        sample_posterior (`bool`, defaults to `True`): sample the VAE posterior (original) or take its mean.
        ce_weight, mse_weight (`float`, defaults to 1.0): loss weights.
        peak_tflops (`float`, *optional*): peak TFLOP/s of one device, for `mfu` (default: looked up for CUDA
            devices of `PEAK_TFLOPS_BF16`).
        flops_per_token (`float`, *optional*): dense training FLOPs per token (default: [`bagel_flops_per_token`] of
            the model config); the attention term is added to it.
        **kwargs: everything `Trainer` takes.
    """

    def __init__(
        self,
        *args,
        vae=None,
        sample_posterior: bool = True,
        ce_weight: float = 1.0,
        mse_weight: float = 1.0,
        peak_tflops: float | None = None,
        flops_per_token: float | None = None,
        **kwargs,
    ):
        for name, value in (("peak_tflops", peak_tflops), ("flops_per_token", flops_per_token)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        super().__init__(*args, **kwargs)
        freeze_modules(self.model)  # only the fixed sin-cos position tables; the optimiser is built later
        if self._fsdp_on_cpu:  # stream the weights into the shards (accelerate's path holds them all on rank 0)
            self.model = self.model_wrapped = shard_from_checkpoint(self.accelerator, self.model)
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
        self.peak_tflops = peak_tflops
        self.flops_per_token = flops_per_token
        self._tokens_since_log = 0
        self._square_lengths_since_log = 0
        self._log_clock = None
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(_CollatorEpochCallback(self.data_collator))

    def create_accelerator_and_postprocess(self) -> None:
        # accelerate applies FSDP on accelerators only: on a CPU launch that asks for it, shard through its code too.
        super().create_accelerator_and_postprocess()
        self._fsdp_on_cpu = enable_fsdp2_on_cpu(self.accelerator, self.args.fsdp_plugin_args)
        if self._fsdp_on_cpu:
            self.is_fsdp_enabled = True
            if self.accelerator.state.fsdp_plugin.activation_checkpointing and self.args.activation_checkpointing:
                raise ValueError(
                    "`fsdp_config['activation_checkpointing']` and the `activation_checkpointing` training argument "
                    "can't both be set: use FSDP's activation checkpointing under FSDP."
                )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # A sharded FSDP2 checkpoint may lack the state of parameters that never had a gradient; read it leniently.
        folder = os.path.join(checkpoint, f"{FSDP_OPTIMIZER_NAME}_0") if checkpoint else None
        if folder is None or not self.accelerator.is_fsdp2 or not os.path.isdir(folder):
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_sharded_optimizer(self.model, self.optimizer, folder)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

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
        if model.training:
            if self._log_clock is None:
                self._log_clock = time.perf_counter()
            self._tokens_since_log += int(inputs["input_ids"].numel())
            documents = inputs.get("document_ids")
            if documents is not None:
                lengths = torch.unique_consecutive(documents.flatten(), return_counts=True)[1]
            else:
                lengths = torch.tensor([inputs["input_ids"].shape[-1]] * inputs["input_ids"].shape[0])
            self._square_lengths_since_log += int((lengths.long() ** 2).sum())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _record(self, name: str, value: torch.Tensor, model):
        if model.training:  # evaluation losses are reported by `evaluate` itself
            self._component_losses.setdefault(name, []).append(float(value.detach()))

    def _throughput(self) -> dict:
        """`tokens_per_second` (all processes) and `mfu` since the previous training log; one all-gather of the token
        count in multi-process runs (every process logs at the same steps)."""
        now = time.perf_counter()
        start, tokens, squares = self._log_clock, self._tokens_since_log, self._square_lengths_since_log
        self._log_clock, self._tokens_since_log, self._square_lengths_since_log = now, 0, 0
        world = self.accelerator.num_processes
        if world > 1:
            counts = torch.tensor([[float(tokens), float(squares)]], device=self.accelerator.device)
            tokens, squares = self.accelerator.gather(counts).sum(0).tolist()
        if start is None or now <= start or tokens == 0:
            return {}
        seconds = now - start
        out = {"tokens_per_second": round(tokens / seconds, 2)}
        peak = self.peak_tflops if self.peak_tflops is not None else device_peak_tflops(self.args.device)
        if peak is None:
            logger.info_once(
                "mfu is not logged: no peak throughput is known for this device (a CPU's depends on its cores, vector "
                "units and clocks); pass `peak_tflops=` (examples/train.py --peak_tflops) to log it."
            )
            return out
        config = self.accelerator.unwrap_model(self.model).config
        if self.flops_per_token is None:
            self.flops_per_token = bagel_flops_per_token(config)
        flops = tokens * self.flops_per_token + squares * bagel_attention_flops_coefficient(config)
        out["mfu"] = round(flops / seconds / (world * peak * 1e12), 6)
        return out

    def log(self, logs: dict, *args, **kwargs):
        for name, values in self._component_losses.items():
            if values and "loss" in logs:
                logs[name] = round(sum(values) / len(values), 6)
        if "loss" in logs:
            self._component_losses = {}
            logs.update(self._throughput())
        super().log(logs, *args, **kwargs)


__all__ = [
    "PEAK_TFLOPS_BF16",
    "BagelTrainer",
    "bagel_attention_flops_coefficient",
    "bagel_flops_per_token",
    "device_peak_tflops",
    "bagel_training_arguments",
    "bagel_fsdp_config",
    "freeze_modules",
    "latents_from_vae_inputs",
]
