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
"""
Conversion of BAGEL's FLUX autoencoder (`ae.safetensors`, original FLUX / LDM key names) to a diffusers
[`AutoencoderKL`].

BAGEL hard-codes the autoencoder hyper-parameters (`FLUX_AE_PARAMS`) instead of shipping a config. The mapping of
the weights is diffusers' own `convert_ldm_vae_checkpoint`; this module adds the config, strict key checking (the
original loader uses `strict=False` and only prints what did not match) and safetensors-only reading.
"""

import os
import re

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.utils import logging
from safetensors import SafetensorError
from safetensors.torch import load_file


logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

__all__ = ["FLUX_AE_PARAMS", "convert_flux_vae_state_dict", "flux_vae_config", "load_flux_vae"]

FLUX_AE_PARAMS = {
    "resolution": 256,
    "in_channels": 3,
    "downsample": 8,
    "ch": 128,
    "out_ch": 3,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "z_channels": 16,
    "scale_factor": 0.3611,
    "shift_factor": 0.1159,
}
"""The FLUX autoencoder parameters BAGEL-7B-MoT uses (hard-coded in the original `load_ae`)."""

_NORM_GROUPS = 32  # the FLUX AE's GroupNorm always has 32 groups


def _check_int(params: dict, name: str, minimum: int = 1) -> int:
    value = params[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"FLUX AE parameter `{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def flux_vae_config(params: dict | None = None) -> dict:
    """
    Builds the [`AutoencoderKL`] config equivalent to a FLUX autoencoder.

    Args:
        params (`dict`, *optional*):
            FLUX AE parameters (`resolution`, `in_channels`, `downsample`, `ch`, `out_ch`, `ch_mult`,
            `num_res_blocks`, `z_channels`, `scale_factor`, `shift_factor`), e.g. a tiny checkpoint's
            `vae_config.json`. Missing entries take the values of [`FLUX_AE_PARAMS`]; `None` gives the 7B VAE.

    Returns:
        `dict`: keyword arguments for `AutoencoderKL(**config)` / `AutoencoderKL.from_config(config)`.

    Raises:
        `ValueError`: on unknown parameters, or values the FLUX architecture cannot have (`ch` not a multiple of
        the 32 GroupNorm groups, a `downsample` that does not match `ch_mult`, ...).
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(FLUX_AE_PARAMS))
    if unknown:
        raise ValueError(f"Unknown FLUX AE parameters {unknown}; expected a subset of {sorted(FLUX_AE_PARAMS)}.")
    params = {**FLUX_AE_PARAMS, **params}

    ch = _check_int(params, "ch")
    if ch % _NORM_GROUPS:
        raise ValueError(f"FLUX AE `ch` must be a multiple of {_NORM_GROUPS} (GroupNorm with 32 groups), got {ch}.")
    ch_mult = params["ch_mult"]
    if (
        not isinstance(ch_mult, (list, tuple))
        or not ch_mult
        or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in ch_mult)
    ):
        raise ValueError(f"FLUX AE `ch_mult` must be a non-empty list of positive ints, got {ch_mult!r}.")
    for name in ("resolution", "in_channels", "out_ch", "num_res_blocks", "z_channels", "downsample"):
        _check_int(params, name)
    if params["downsample"] != 2 ** (len(ch_mult) - 1):
        raise ValueError(
            f"FLUX AE `downsample` ({params['downsample']}) must be 2 ** (len(ch_mult) - 1) = "
            f"{2 ** (len(ch_mult) - 1)} for ch_mult={list(ch_mult)}."
        )
    for name in ("scale_factor", "shift_factor"):
        if not isinstance(params[name], (int, float)) or isinstance(params[name], bool):
            raise ValueError(f"FLUX AE parameter `{name}` must be a number, got {params[name]!r}.")
    if params["scale_factor"] == 0:
        raise ValueError("FLUX AE `scale_factor` must be non-zero.")

    num_blocks = len(ch_mult)
    return {
        "in_channels": params["in_channels"],
        "out_channels": params["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * num_blocks,
        "up_block_types": ["UpDecoderBlock2D"] * num_blocks,
        "block_out_channels": [ch * mult for mult in ch_mult],
        "layers_per_block": params["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": params["z_channels"],
        "norm_num_groups": _NORM_GROUPS,
        "sample_size": params["resolution"],
        "scaling_factor": float(params["scale_factor"]),
        "shift_factor": float(params["shift_factor"]),
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


# diffusers name -> FLUX name, used only to name the original keys a checkpoint should have (error messages).
_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _flux_name(diffusers_key: str, num_blocks: int) -> str:
    key = re.sub(r"\.conv_norm_out\.", ".norm_out.", diffusers_key)
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = re.sub(
        r"\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
        lambda m: f".mid.attn_1.{_ATTENTION_NAMES[m[1]]}.",
        key,
    )
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    # diffusers numbers the decoder's up blocks from the lowest resolution, FLUX from the highest.
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.", key
    )
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.",
        key,
    )
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def _empty_vae(config: dict) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(**config)


def convert_flux_vae_state_dict(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """
    Renames (and reshapes) a FLUX autoencoder state dict into [`AutoencoderKL`] parameters.

    The mapping is diffusers' `convert_ldm_vae_checkpoint` (`encoder.down.{l}.block.{b}` ->
    `encoder.down_blocks.{l}.resnets.{b}`, decoder up blocks in reverse order, `nin_shortcut` -> `conv_shortcut`,
    `mid.attn_1.{q,k,v,proj_out}` 1x1 convs -> `to_{q,k,v}` / `to_out.0` linears, ...). Before converting, the keys
    and shapes are checked against the architecture `config` describes, since the diffusers helper silently skips
    what it does not know.

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            The original weights, FLUX names without any prefix (`encoder.conv_in.weight`, ...).
        config (`dict`):
            The [`AutoencoderKL`] config, e.g. from [`flux_vae_config`].

    Returns:
        `dict[str, torch.Tensor]`: the diffusers state dict (tensors are shared with `state_dict` where possible).

    Raises:
        `ValueError`: naming the missing or unexpected original keys, or the tensors whose shapes do not fit.
    """
    num_blocks = len(config["down_block_types"])
    target = _empty_vae(config).state_dict()
    expected = {_flux_name(key, num_blocks): key for key in target}
    if len(expected) != len(target):  # guards the naming rules above against collisions
        raise RuntimeError("Internal error: the FLUX names of the AutoencoderKL parameters are not unique.")

    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "The FLUX autoencoder weights do not match the configured architecture "
            f"(block_out_channels={list(config['block_out_channels'])}, "
            f"layers_per_block={config['layers_per_block']}, latent_channels={config['latent_channels']}): "
            f"missing keys {missing}, unexpected keys {unexpected}."
        )

    converted = convert_ldm_vae_checkpoint(state_dict, config)

    # The helper drops what it does not recognise; after the check above, anything off here is a mapping bug.
    if set(converted) != set(target) or any(value is None for value in converted.values()):
        lost = sorted(set(target) - {key for key, value in converted.items() if value is not None})
        extra = sorted(set(converted) - set(target))
        raise RuntimeError(f"convert_ldm_vae_checkpoint produced an incomplete mapping: lost {lost}, extra {extra}.")

    mismatched = [
        f"{_flux_name(key, num_blocks)}: {tuple(state_dict[_flux_name(key, num_blocks)].shape)} "
        f"(expected {tuple(target[key].shape)} as {key})"
        for key, value in converted.items()
        if value.shape != target[key].shape
    ]
    if mismatched:
        raise ValueError(f"FLUX autoencoder tensors with the wrong shape: {mismatched}.")
    return converted


def load_flux_vae(
    ae_path: str | os.PathLike, params: dict | None = None, dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """
    Loads BAGEL's original FLUX autoencoder (`ae.safetensors`) as a diffusers [`AutoencoderKL`].

    Only safetensors files are read (nothing is unpickled), and the weights must match the architecture exactly.

    Args:
        ae_path (`str` or `os.PathLike`):
            Path of the original `ae.safetensors`.
        params (`dict`, *optional*):
            FLUX AE parameters (see [`flux_vae_config`]); defaults to [`FLUX_AE_PARAMS`] (BAGEL-7B-MoT).
        dtype (`torch.dtype`, defaults to `torch.float32`):
            The dtype of the returned model's weights.

    Returns:
        [`AutoencoderKL`]: the autoencoder in eval mode; `encode(x).latent_dist.mean` is BAGEL's (unscaled) latent
        mean and latents are normalised as `(z - shift_factor) * scaling_factor`.

    Raises:
        `FileNotFoundError`: if `ae_path` does not exist.
        `ValueError`: if the file is not a readable safetensors file, or its keys or shapes do not match.
    """
    ae_path = os.fspath(ae_path)
    if not os.path.isfile(ae_path):
        raise FileNotFoundError(f"FLUX autoencoder weights not found: {ae_path}")
    try:
        state_dict = load_file(ae_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"{ae_path} is not a readable safetensors file ({type(error).__name__}: {error}). Only safetensors "
            "autoencoder weights are supported."
        ) from error

    config = flux_vae_config(params)
    converted = convert_flux_vae_state_dict(state_dict, config)
    converted = {key: value.to(dtype=dtype).contiguous() for key, value in converted.items()}

    vae = _empty_vae(config)
    result = vae.load_state_dict(converted, strict=True, assign=True)
    if result.missing_keys or result.unexpected_keys:  # unreachable with strict=True; kept as a hard guarantee
        raise ValueError(f"missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}")
    left_on_meta = [name for name, tensor in (*vae.named_parameters(), *vae.named_buffers()) if tensor.is_meta]
    if left_on_meta:
        raise RuntimeError(f"AutoencoderKL tensors not filled by the checkpoint: {left_on_meta}")
    logger.info(f"Loaded the FLUX autoencoder from {ae_path} ({len(state_dict)} tensors).")
    return vae.eval()
