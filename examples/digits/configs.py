"""Sizes of the tiny digits BAGEL: decoder, vision encoder, VAE and image processor for 64x64 images."""

from transformers.utils import logging

from transformers_bagel.configuration_bagel import SPECIAL_TOKENS, BagelConfig
from transformers_bagel.image_processing_bagel import BagelImageProcessor


logger = logging.get_logger(__name__)

__all__ = ["DIGITS_IMAGE_SIZE", "digits_bagel_config", "digits_image_processor", "digits_vae_config"]

DIGITS_IMAGE_SIZE = 64
# The ViT sees 16x16-pixel patches (2x2 pixels of the original 8x8 digit): a 4x4 grid, 16 tokens per image.
VIT_PATCH_SIZE = 16
# VAE downsampling 8 times latent patch 2: a 64x64 image is an 8x8x16 latent, 4x4 = 16 generation tokens.
VAE_DOWNSAMPLE = 8
LATENT_PATCH_SIZE = 2


def digits_vae_config(latent_channels: int = 16) -> dict:
    """
    `AutoencoderKL` arguments of the digits VAE: FLUX's layout (16 latent channels, 8x downsampling through four
    blocks, no quant convs) at a tiny width. `scaling_factor` / `shift_factor` are placeholders that the VAE training
    script replaces with the statistics of the training latents.
    """
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 8, 16, 32],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": latent_channels,
        "norm_num_groups": 8,
        "sample_size": DIGITS_IMAGE_SIZE,
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def digits_bagel_config(
    vocab_size: int,
    token_ids: dict[str, int],
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 384,
    vit_hidden_size: int = 64,
    vit_layers: int = 2,
    initializer_range: float = 0.06,
) -> BagelConfig:
    """
    A BAGEL config of a few million parameters for 64x64 digits.

    Args:
        vocab_size (`int`): the tokenizer's size (the embedding is rounded up to a multiple of 8).
        token_ids (`dict`): ids of BAGEL's special tokens, keyed by the config field (`bos_token_id`, `eos_token_id`,
            `start_of_image_token_id`, `end_of_image_token_id`, `image_token_id`, `latent_token_id`, `pad_token_id`).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the MoT decoder.
        vit_hidden_size, vit_layers: the SigLIP NaViT encoder.
        initializer_range (`float`, defaults to 0.06): standard deviation of the initial weights of every linear
            layer outside the ViT. BAGEL's 0.02 suits wide pretrained models; at width 128 it leaves the connector's
            output far below the fixed sin-cos position table added to it, and the ViT content reaches the decoder
            only slowly (measured: 600 understanding-only steps give 86-88% held-out accuracy at 0.02, 96-97% at
            0.06).
    """
    needed = tuple(SPECIAL_TOKENS)
    missing = [name for name in needed if name not in token_ids]
    if missing:
        raise ValueError(f"`token_ids` lacks {missing}; it needs {list(needed)}.")
    side = DIGITS_IMAGE_SIZE // VIT_PATCH_SIZE
    text_config = {
        "vocab_size": -(-vocab_size // 8) * 8,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_attention_heads,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "initializer_range": initializer_range,
    }
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": vit_hidden_size,
        "intermediate_size": 4 * vit_hidden_size,
        "num_hidden_layers": vit_layers,
        "num_attention_heads": max(1, vit_hidden_size // 32),
        "num_channels": 3,
        "image_size": DIGITS_IMAGE_SIZE,
        "patch_size": VIT_PATCH_SIZE,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }
    return BagelConfig(
        text_config=text_config,
        vision_config=vision_config,
        latent_patch_size=LATENT_PATCH_SIZE,
        max_latent_size=DIGITS_IMAGE_SIZE // (VAE_DOWNSAMPLE * LATENT_PATCH_SIZE),
        latent_channels=16,
        vae_downsample=VAE_DOWNSAMPLE,
        vit_max_num_patch_per_side=side,
        timestep_shift=1.0,
        **{name: token_ids[name] for name in needed},
    )


def digits_image_processor() -> BagelImageProcessor:
    """The image processor for 64x64 digits: both transforms keep a 64x64 image as it is (VAE stride 16, ViT patch
    16), so training (ViT on the raw image) and inference (VAE rule first) see the same pixels."""
    return BagelImageProcessor(
        vit_max_image_size=DIGITS_IMAGE_SIZE,
        vit_min_image_size=DIGITS_IMAGE_SIZE,
        vit_patch_size=VIT_PATCH_SIZE,
        vit_max_num_patch_per_side=DIGITS_IMAGE_SIZE // VIT_PATCH_SIZE,
        vae_max_image_size=DIGITS_IMAGE_SIZE,
        vae_min_image_size=DIGITS_IMAGE_SIZE,
        vae_stride=VAE_DOWNSAMPLE * LATENT_PATCH_SIZE,
        max_pixels=DIGITS_IMAGE_SIZE * DIGITS_IMAGE_SIZE,
    )
