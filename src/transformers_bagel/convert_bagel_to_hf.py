"""
Read a BAGEL checkpoint in the original release layout (`ByteDance-Seed/BAGEL-7B-MoT`: `ema.safetensors`,
`llm_config.json`, `vit_config.json`, tokenizer files) as transformers objects: [`BagelForConditionalGeneration`]
(`load_original_model`) and its [`BagelProcessor`] (`original_processor`), or write the model's folder tensor by
tensor (`save_original_model`: memory holds one tensor, not the checkpoint). The pipeline folder (these plus the VAE,
the scheduler and `model_index.json`) is written by `diffusers_bagel.convert_bagel_to_diffusers` (`bagel convert`).

Every check of the weights that needs no data (tensor names, shapes, a truncated file) runs on the header of
`ema.safetensors` before any tensor is read (`read_original_release`); NaN / inf are refused tensor by tensor as they
are read.

The original loader's corrections are applied: the ViT config lists one layer more than the model runs, the ViT patch
embedding is stored as a linear layer, and the values `app.py` hard-codes (not stored in any file of the release) are
used when `config.json` / `vae_config.json` are absent. Only safetensors files are read; pickles are never loaded.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, SiglipVisionConfig
from transformers.utils import logging

from .checkpoint_files import check_json_files
from .configuration_bagel import SPECIAL_TOKENS, BagelConfig, BagelTextConfig, special_token_ids
from .image_processing_bagel import BagelImageProcessor
from .modeling_bagel import BagelForConditionalGeneration
from .processing_bagel import BagelProcessor
from .safetensors_streaming import (
    SafetensorsEntry,
    parse_shard_size,
    read_safetensors_header,
    read_tensor,
    save_sharded_safetensors,
)


logger = logging.get_logger(__name__)

EMA_WEIGHTS_NAME = "ema.safetensors"
_FINITE_CHECK_VALUES = 1 << 24  # values checked for NaN / inf at a time (a 16 MB mask)

# Values the original's `app.py` hard-codes for the 7B release; a release folder has no file holding them.
BAGEL_7B_MODEL_VALUES = {
    "latent_patch_size": 2,
    "max_latent_size": 64,
    "vit_max_num_patch_per_side": 70,
    "connector_act": "gelu_pytorch_tanh",
    "interpolate_pos": False,
    "timestep_shift": 1.0,
}
# Image-processor sizes of the 7B (the original's `app.py` and `inferencer.py`).
BAGEL_7B_IMAGE_SIZES = {
    "vae_max_image_size": 1024,
    "vae_min_image_size": 512,
    "vit_max_image_size": 980,
    "vit_min_image_size": 224,
}
# Original key prefix -> HF key prefix (everything else keeps its name).
KEY_PREFIXES = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vit_model.vision_model.", "model.vision_model."),
    ("llm2vae.", "llm2vae."),
    ("vae2llm.", "model.vae2llm."),
    ("time_embedder.", "model.time_embedder."),
    ("latent_pos_embed.", "model.latent_pos_embed."),
    ("vit_pos_embed.", "model.vit_pos_embed."),
    ("connector.", "model.connector."),
]
TEXT_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "attention_dropout",
    "qk_norm",
)
VISION_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)


def convert_key(key: str) -> str:
    """Name of an original `ema.safetensors` tensor in [`BagelForConditionalGeneration`]."""
    for old, new in KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    raise ValueError(f"Unexpected tensor {key!r} in the original checkpoint: no known BAGEL module holds it.")


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _unreadable(path: Path, error: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file (corrupted or truncated?): {error}")


def read_checkpoint_header(path: str | os.PathLike) -> dict[str, SafetensorsEntry]:
    """The tensors of the safetensors file `path` (names, dtypes, shapes, offsets), from its header alone: a file that
    is not a complete safetensors file (truncated, or a header that lies about sizes) is refused here, before any
    tensor is read."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; pickled checkpoints are never loaded.")
    if not path.is_file():
        raise FileNotFoundError(f"Missing checkpoint file {path}.")
    try:
        return read_safetensors_header(path)
    except (OSError, ValueError) as error:
        raise _unreadable(path, error) from error


def match_checkpoint(
    original: dict[str, SafetensorsEntry], expected: dict[str, torch.Size]
) -> dict[str, SafetensorsEntry]:
    """
    Renames the original tensors and checks them against `expected` (the model's tensor shapes by name), refusing
    unknown names, missing or unexpected tensors and wrong shapes. Returns the original tensors by model name, in the
    order of `expected`.
    """
    converted = {}
    for key, entry in original.items():
        new_key = convert_key(key)
        if new_key in converted:
            raise ValueError(f"Two original tensors map to {new_key!r}.")
        converted[new_key] = entry
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "The checkpoint does not match the BAGEL architecture built from its configs. "
            f"Missing tensors: {missing[:20]}{' ...' if len(missing) > 20 else ''}. "
            f"Unexpected tensors: {[converted[key].name for key in unexpected][:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}."
        )
    wrong_shapes = [
        f"{key}: checkpoint {converted[key].shape} vs model {tuple(shape)}"
        for key, shape in expected.items()
        if converted[key].shape != tuple(shape)
    ]
    if wrong_shapes:
        raise ValueError("Tensor shapes do not match the configs: " + "; ".join(wrong_shapes[:20]))
    return {key: converted[key] for key in expected}


def build_config(input_dir: Path, tokenizer) -> tuple[BagelConfig, dict]:
    """BagelConfig from the release folder, and the FLUX autoencoder params stored there (None for the release,
    whose autoencoder uses FLUX's hard-coded params)."""
    for name in ("llm_config.json", "vit_config.json"):
        if not (input_dir / name).is_file():
            raise FileNotFoundError(f"{input_dir} has no {name}: not a BAGEL release folder.")
    llm = _read_json(input_dir / "llm_config.json")
    text_kwargs = {key: llm[key] for key in TEXT_CONFIG_KEYS if key in llm}
    text_kwargs["qk_norm"] = True
    text_kwargs["tie_word_embeddings"] = False
    text_kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 1e6))}
    text_config = BagelTextConfig(**text_kwargs)

    vit = _read_json(input_dir / "vit_config.json")
    vision_kwargs = {key: vit[key] for key in VISION_CONFIG_KEYS if key in vit}
    # The release's vit_config.json counts the layer BAGEL never runs (it uses penultimate-layer features).
    vision_kwargs["num_hidden_layers"] = vit["num_hidden_layers"] - 1
    vision_config = SiglipVisionConfig(**vision_kwargs)

    model_values = dict(BAGEL_7B_MODEL_VALUES)
    if (input_dir / "config.json").is_file():
        stored = _read_json(input_dir / "config.json")
        model_values.update({key: stored[key] for key in BAGEL_7B_MODEL_VALUES if key in stored})
    else:
        logger.info("No config.json: using the 7B values hard-coded by the original app.py.")
    vae_params = None
    if (input_dir / "vae_config.json").is_file():
        vae_params = _read_json(input_dir / "vae_config.json")
    # FLUX autoencoder: 16 latent channels, 8x down-sampling.
    latent_channels = vae_params.get("z_channels", 16) if vae_params else 16
    vae_downsample = vae_params.get("downsample", 8) if vae_params else 8

    try:
        token_ids = special_token_ids(tokenizer)
    except ValueError as error:
        raise ValueError(f"The tokenizer in {input_dir}: {error}") from None

    config = BagelConfig(
        text_config=text_config,
        vision_config=vision_config,
        latent_channels=latent_channels,
        vae_downsample=vae_downsample,
        **model_values,
        **token_ids,
    )
    return config, vae_params


@dataclass
class OriginalRelease:
    """
    An original release folder read and checked up to its weights: tokenizer, configs, and the header of
    `ema.safetensors` matched against the model its configs describe. No tensor data has been read.
    """

    input_dir: Path
    tokenizer: PreTrainedTokenizerBase
    vae_params: dict | None
    """The FLUX autoencoder params of `vae_config.json`; None for the release (FLUX's hard-coded params)."""
    model: BagelForConditionalGeneration
    """The model on the meta device: its architecture, config and generation config, without weights."""
    tensors: dict[str, SafetensorsEntry]
    """The original tensors by their name in `model`, in the order of `model.state_dict()`."""

    @property
    def config(self) -> BagelConfig:
        return self.model.config

    @property
    def weights_path(self) -> Path:
        return self.input_dir / EMA_WEIGHTS_NAME


def read_original_release(input_dir: str | os.PathLike) -> OriginalRelease:
    """
    Reads an original release folder's configs, tokenizer and `ema.safetensors` header, and refuses, before any tensor
    is read, a folder that is not a release or whose tensors do not match the model its configs describe (unknown,
    missing or unexpected tensors, wrong shapes, a truncated or inconsistent safetensors file).
    """
    input_dir = Path(input_dir)
    for name in ("llm_config.json", "vit_config.json", EMA_WEIGHTS_NAME):  # before the tokenizer's own, vaguer error
        if not (input_dir / name).is_file():
            raise FileNotFoundError(f"{input_dir} has no {name}: not a BAGEL release folder.")
    # Qwen2's tokenizer: tokenizer.json, or vocab.json with merges.txt. Without them transformers would build a
    # tokenizer of the added tokens alone (or ask for sentencepiece), and the conversion would go on with it.
    if not (input_dir / "tokenizer.json").is_file() and not all(
        (input_dir / name).is_file() for name in ("vocab.json", "merges.txt")
    ):
        raise FileNotFoundError(
            f"{input_dir} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt (download the "
            "release again)."
        )
    check_json_files(input_dir, ["tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json"])
    tokenizer = AutoTokenizer.from_pretrained(str(input_dir))
    config, vae_params = build_config(input_dir, tokenizer)
    header = read_checkpoint_header(input_dir / EMA_WEIGHTS_NAME)
    with torch.device("meta"):
        model = BagelForConditionalGeneration(config)
    tensors = match_checkpoint(header, {key: value.shape for key, value in model.state_dict().items()})
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return OriginalRelease(
        input_dir=input_dir, tokenizer=tokenizer, vae_params=vae_params, model=model, tensors=tensors
    )


def _is_finite(tensor: torch.Tensor) -> bool:
    # In slices: `isfinite` of the whole tensor would allocate a mask of one byte per value (545 MB for the 7B's
    # embeddings), more than the tensor in flight itself.
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(_FINITE_CHECK_VALUES))


def _non_finite_error(path: Path, names: list[str], dtype: torch.dtype) -> ValueError:
    cause = "" if dtype in (torch.float32, torch.bfloat16) else f" (or values beyond {dtype}'s range)"
    return ValueError(
        f"{len(names)} tensors of {path} hold NaN or inf{cause}: "
        f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}. The checkpoint is corrupt."
    )


def _converted_tensor(release: OriginalRelease, handle, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The model tensor `name`: read alone from the release's open `ema.safetensors` `handle`, cast to `dtype`, and
    refused when it holds NaN or inf (checked after the cast, which may overflow float16)."""
    try:
        tensor = read_tensor(handle, release.tensors[name]).to(dtype)
    except (OSError, ValueError) as error:  # the file changed since its header was checked
        raise _unreadable(release.weights_path, error) from error
    if not _is_finite(tensor):
        raise _non_finite_error(release.weights_path, [name], dtype)
    return tensor


def load_original_model(input_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """
    Builds [`BagelForConditionalGeneration`] from an original release folder, refusing a checkpoint whose tensors do
    not match the model exactly (missing or unexpected keys, wrong shapes, NaN / inf values). The tensors are read one
    at a time into the model built on the meta device, so memory peaks at about the weights in `dtype`. Returns
    `(model, tokenizer, vae_params)`.
    """
    release = read_original_release(input_dir)
    model = release.model
    with open(release.weights_path, "rb") as handle:
        state_dict = {name: _converted_tensor(release, handle, name, dtype) for name in release.tensors}
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Non-persistent buffers (RoPE inverse frequencies) are not in the checkpoint: rebuild them off the meta device.
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            module.inv_freq = inv_freq
            module.original_inv_freq = inv_freq.clone()
    model.config.dtype = dtype
    model.eval()
    return model, release.tokenizer, release.vae_params


def save_original_model(
    release: OriginalRelease,
    save_directory: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = "5GB",
) -> Path:
    """
    Writes the folder `load_original_model(...)[0].save_pretrained(save_directory, max_shard_size=...)` would write
    (`config.json`, `generation_config.json`, the safetensors shards and their index), without ever holding the
    model: each tensor is read from the release, renamed, cast to `dtype`, checked for NaN / inf and written into its
    shard before the next one is read. `save_directory` must not hold safetensors files yet. Returns it.
    """
    save_directory = Path(save_directory)
    model = release.model
    specs = {name: (dtype, entry.shape) for name, entry in release.tensors.items()}
    parse_shard_size(max_shard_size)  # a bad size is refused before anything is written
    # What save_pretrained stores with the config: the weights' dtype as a string and the class.
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    save_directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(save_directory)
    model.generation_config.save_pretrained(save_directory)
    with open(release.weights_path, "rb") as handle:
        save_sharded_safetensors(
            save_directory,
            specs,
            lambda name: _converted_tensor(release, handle, name, dtype),
            max_shard_size=max_shard_size,
            index_metadata={"total_parameters": model.num_parameters()},
            desc="Converting tensors",
        )
    return save_directory


def resolve_image_sizes(image_sizes: dict | None, max_image_size: int, vit_max_image_size: int) -> dict:
    """The image processor's sizes: given ones are checked against the model's position tables; missing ones are
    the 7B's, lowered to what the tables hold (a small model's latent table holds less than 1024 px)."""
    tables = {"vae_max_image_size": max_image_size, "vit_max_image_size": vit_max_image_size}
    given = dict(image_sizes or {})
    unknown = sorted(set(given) - set(BAGEL_7B_IMAGE_SIZES))
    if unknown:
        raise ValueError(f"Unknown image sizes {unknown}; known: {sorted(BAGEL_7B_IMAGE_SIZES)}.")
    sizes = {}
    for name, default in BAGEL_7B_IMAGE_SIZES.items():
        value = given.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        sizes[name] = value if value is not None else default
    for kind in ("vae", "vit"):
        top, low = f"{kind}_max_image_size", f"{kind}_min_image_size"
        limit = tables[top]
        if sizes[top] > limit:
            if top in given:
                raise ValueError(
                    f"`{top}`={sizes[top]} exceeds what the model's position table holds ({limit} px); lower it."
                )
            logger.warning(f"{top} lowered from {sizes[top]} to {limit}, the largest side the model's table holds.")
            sizes[top] = limit
        if sizes[low] > sizes[top]:
            if low in given:
                raise ValueError(f"`{low}`={sizes[low]} is larger than `{top}`={sizes[top]}.")
            logger.warning(f"{low} lowered from {sizes[low]} to {sizes[top]}, the {top} of this model.")
            sizes[low] = sizes[top]
    return sizes


def original_processor(tokenizer, config: BagelConfig, image_sizes: dict | None = None) -> BagelProcessor:
    """The [`BagelProcessor`] of a converted release: its tokenizer and an image processor whose sizes are
    `image_sizes` checked against (or, when missing, the 7B's lowered to) the model's position tables."""
    sizes = resolve_image_sizes(
        image_sizes, config.max_image_size, config.vit_max_num_patch_per_side * config.vision_config.patch_size
    )
    image_processor = BagelImageProcessor(
        vit_patch_size=config.vision_config.patch_size,
        vae_stride=config.latent_downsample,
        vit_max_num_patch_per_side=config.vit_max_num_patch_per_side,
        **sizes,
    )
    return BagelProcessor(image_processor=image_processor, tokenizer=tokenizer)


if __name__ == "__main__":
    raise SystemExit(
        "The conversion writes a diffusers pipeline folder: run `bagel convert --input_dir ORIG --output_dir OUT` "
        "(or python -m diffusers_bagel.convert_bagel_to_diffusers)."
    )


__all__ = [
    "BAGEL_7B_IMAGE_SIZES",
    "EMA_WEIGHTS_NAME",
    "SPECIAL_TOKENS",
    "OriginalRelease",
    "build_config",
    "convert_key",
    "load_original_model",
    "match_checkpoint",
    "original_processor",
    "read_checkpoint_header",
    "read_original_release",
    "resolve_image_sizes",
    "save_original_model",
]
