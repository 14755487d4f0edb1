"""
Training BAGEL with the Hugging Face Trainer.

- `samples`: the sample format (ordered text / ViT image / VAE image segments with loss flags) and builders from
  `datasets` rows (text-to-image, editing, understanding, interleaved), plus the VAE latent cache.
- `collator`: [`BagelDataCollator`] packs samples into one padding-free sequence as the original (block-diagonal
  samples, causal text, bidirectional clean images, hidden noised targets, condition dropout);
  [`BagelPackedDataset`] groups samples under a token budget.
- `mixture`: multi-task training from a data config: [`BagelMixtureDataset`] mixes weighted sources (parquet, JSON
  lines, CSV, image folders) reproducibly with `datasets.interleave_datasets`; [`original_data_config_to_mixture`]
  reads the original's YAML data config.
- `data_files`: config and data files read with errors naming the file and line ([`load_data_rows`]).
- `trainer`: [`BagelTrainer`] (also logs `tokens_per_second` and `mfu`), [`bagel_training_arguments`] (the original's optimiser defaults), [`freeze_modules`],
  [`bagel_fsdp_config`].
- `callbacks`: [`BagelEMACallback`] (EMA of the weights, saved with checkpoints).
- `lora`: LoRA on the generation experts with peft.
- `fsdp`: FSDP2 sharding and sharded checkpoints without the Trainer, and what [`BagelTrainer`] adds to
  accelerate's FSDP2 on CPU launches (sharding there at all, weights streamed into the shards, lenient optimizer
  resume).

The loss itself (`ce_loss`, `mse_loss`) is computed by `BagelForConditionalGeneration.forward`. A full example:
`examples/train.py`.
"""

from .callbacks import EMA_WEIGHTS_NAME, BagelEMACallback, load_ema_weights
from .collator import IGNORE_INDEX, BagelDataCollator, BagelPackedDataset, pad_images
from .fsdp import apply_fsdp2, load_sharded_checkpoint, save_sharded_checkpoint
from .data_files import load_data_rows, read_config_file
from .lora import (
    GEN_EXPERT_TARGET_MODULES,
    bagel_lora_config,
    check_bagel_lora_path,
    get_bagel_lora_model,
    load_bagel_lora,
)
from .mixture import (
    MAX_EPOCH_FACTOR,
    BagelMixtureDataset,
    check_mixture_weights,
    load_mixture_config,
    load_source_rows,
    mixture_order,
    original_data_config_to_mixture,
    read_data_config,
)
from .samples import (
    BagelSampleDataset,
    cache_vae_latents,
    edit_sample,
    load_image,
    row_to_sample,
    samples_from_rows,
    text_segment,
    text_to_image_sample,
    understanding_sample,
    vae_segment,
    validate_sample,
    vit_segment,
)
from .trainer import (
    PEAK_TFLOPS_BF16,
    BagelTrainer,
    bagel_attention_flops_coefficient,
    bagel_flops_per_token,
    bagel_fsdp_config,
    bagel_training_arguments,
    device_peak_tflops,
    freeze_modules,
    latents_from_vae_inputs,
)


__all__ = [
    "MAX_EPOCH_FACTOR",
    "PEAK_TFLOPS_BF16",
    "BagelDataCollator",
    "BagelMixtureDataset",
    "BagelPackedDataset",
    "BagelSampleDataset",
    "BagelTrainer",
    "BagelEMACallback",
    "EMA_WEIGHTS_NAME",
    "GEN_EXPERT_TARGET_MODULES",
    "IGNORE_INDEX",
    "apply_fsdp2",
    "bagel_attention_flops_coefficient",
    "bagel_flops_per_token",
    "bagel_fsdp_config",
    "bagel_lora_config",
    "bagel_training_arguments",
    "cache_vae_latents",
    "check_bagel_lora_path",
    "check_mixture_weights",
    "device_peak_tflops",
    "edit_sample",
    "freeze_modules",
    "get_bagel_lora_model",
    "latents_from_vae_inputs",
    "load_bagel_lora",
    "load_data_rows",
    "load_ema_weights",
    "load_image",
    "load_mixture_config",
    "load_source_rows",
    "load_sharded_checkpoint",
    "mixture_order",
    "original_data_config_to_mixture",
    "pad_images",
    "read_config_file",
    "read_data_config",
    "row_to_sample",
    "samples_from_rows",
    "save_sharded_checkpoint",
    "text_segment",
    "text_to_image_sample",
    "understanding_sample",
    "vae_segment",
    "validate_sample",
    "vit_segment",
]
