"""The benchmarked model sizes and a `BagelPipeline` of random weights built directly on the device."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, SiglipVisionConfig

from diffusers_bagel import BagelPipeline, FlowMatchEulerScheduler
from diffusers_bagel.convert_flux_vae import flux_vae_config
from transformers_bagel import BagelConfig, BagelForConditionalGeneration, BagelImageProcessor, BagelProcessor
from transformers_bagel.configuration_bagel import BagelTextConfig
from transformers_bagel.convert_bagel_to_hf import BAGEL_7B_IMAGE_SIZES, SPECIAL_TOKENS


__all__ = ["PRESETS", "TOKENIZER_DIR", "build_config", "build_pipeline", "quantize_linears"]


ROOT = Path(__file__).resolve().parents[2]
# The tiny test checkpoint's tokenizer holds BAGEL's special tokens; the prompt's token count differs from Qwen2.5's,
# which only changes the (short) text part of the contexts.
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "tiny_bagel_original"

# Model sizes. "7b" is BAGEL-7B-MoT as ByteDance-Seed/Bagel releases it: Qwen2.5-7B MoT decoder, SigLIP so400m
# (26 layers), FLUX VAE.
PRESETS = {
    "tiny": {
        "text": {"vocab_size": 416, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2},
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2},
        "max_latent_size": 16,
        "vae": {"ch": 32, "ch_mult": [1, 2, 2, 2]},
        "image_sizes": {"vae_max_image_size": 128, "vae_min_image_size": 32, "vit_max_image_size": 112,
                        "vit_min_image_size": 28},
        "default_size": 64,
    },
    "small": {
        "text": {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
                 "num_attention_heads": 8, "num_key_value_heads": 2},
        "vision": {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 3},
        "max_latent_size": 32,
        "vae": {"ch": 32, "ch_mult": [1, 2, 2, 2]},
        "image_sizes": {"vae_max_image_size": 512, "vae_min_image_size": 128, "vit_max_image_size": 490,
                        "vit_min_image_size": 112},
        "default_size": 256,
    },
    "7b": {
        "text": {},  # BagelTextConfig defaults are the 7B's
        "vision": {},  # BagelConfig's default vision config is the 7B's
        "max_latent_size": 64,
        "vae": None,  # FLUX's own parameters
        "image_sizes": dict(BAGEL_7B_IMAGE_SIZES),
        "default_size": 1024,
    },
}


def build_config(preset: str, tokenizer, num_layers: int | None = None) -> BagelConfig:
    """The preset's BagelConfig (with `num_layers` decoder layers if given), with the special-token ids of
    `tokenizer`."""
    spec = PRESETS[preset]
    token_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in SPECIAL_TOKENS.items()}
    text_spec = dict(spec["text"], **({"num_hidden_layers": num_layers} if num_layers else {}))
    text = BagelTextConfig(**text_spec)
    vision = SiglipVisionConfig(**{**BagelConfig().vision_config.to_dict(), **spec["vision"]})
    return BagelConfig(text_config=text, vision_config=vision, max_latent_size=spec["max_latent_size"], **token_ids)


def build_pipeline(
    preset: str, device: torch.device, dtype: torch.dtype, attn: str, num_layers: int | None = None
) -> BagelPipeline:
    """A BagelPipeline of the preset's sizes with random weights, created directly on `device` in `dtype`."""
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = build_config(preset, tokenizer, num_layers)
    spec = PRESETS[preset]
    with torch.device(device):
        model = BagelForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # create the VAE's weights in `dtype` (no float32 copy first)
        try:
            vae = AutoencoderKL(**flux_vae_config(spec["vae"]))
        finally:
            torch.set_default_dtype(previous)
    model.eval()
    vae.eval()
    image_processor = BagelImageProcessor(
        vit_patch_size=config.vision_config.patch_size,
        vae_stride=config.latent_downsample,
        vit_max_num_patch_per_side=config.vit_max_num_patch_per_side,
        **spec["image_sizes"],
    )
    processor = BagelProcessor(image_processor=image_processor, tokenizer=tokenizer)
    pipe = BagelPipeline(model=model, vae=vae, scheduler=FlowMatchEulerScheduler(), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quantize_linears(module: torch.nn.Module, scheme: str) -> None:
    """torchao weight-only quantisation, in place, of every linear layer of `module` (`--quantize`: the MoT decoder's
    layers, understanding and generation experts; `--targets`: the whole model, LM head and ViT included, only the
    embedding table staying in the model's dtype)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if scheme == "int8" else Int4WeightOnlyConfig(group_size=128)
    quantize_(module, config)
