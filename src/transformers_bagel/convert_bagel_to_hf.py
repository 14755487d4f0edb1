"""
Convert a BAGEL checkpoint in the original release layout (`ByteDance-Seed/BAGEL-7B-MoT`: `ema.safetensors`,
`ae.safetensors`, `llm_config.json`, `vit_config.json`, tokenizer files) into one folder in diffusers layout:

    OUT/model_index.json, OUT/pipeline_bagel.py, OUT/config.json   (see diffusers_bagel.pipeline_folder)
    OUT/model/       BagelForConditionalGeneration (sharded safetensors)
    OUT/vae/         diffusers AutoencoderKL (FLUX autoencoder)
    OUT/scheduler/   FlowMatchEulerScheduler
    OUT/processor/   BagelProcessor (tokenizer, image processor, chat template)
    OUT/README.md    Hub model card (from the package's model_card.md)

Usage:

    python -m transformers_bagel.convert_bagel_to_hf --input_dir ORIG --output_dir OUT

The original loader's corrections are applied: the ViT config lists one layer more than the model runs, the ViT patch
embedding is stored as a linear layer, and the values `app.py` hard-codes (not stored in any file of the release) are
used when `config.json` / `vae_config.json` are absent. Only safetensors files are read; pickles are never loaded.
"""

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig, SiglipVisionConfig
from transformers.utils import logging

from .configuration_bagel import SPECIAL_TOKENS, BagelConfig, BagelTextConfig, special_token_ids  # noqa: F401 (SPECIAL_TOKENS re-exported)
from .modeling_bagel import BagelForConditionalGeneration


logger = logging.get_logger(__name__)

# Values `app.py` hard-codes for the 7B release (SPEC section 2); a release folder has no file holding them.
BAGEL_7B_MODEL_VALUES = {
    "latent_patch_size": 2,
    "max_latent_size": 64,
    "vit_max_num_patch_per_side": 70,
    "connector_act": "gelu_pytorch_tanh",
    "interpolate_pos": False,
    "timestep_shift": 1.0,
}
# Image-processor sizes of the 7B (SPEC section 4).
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


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames every original tensor; the values are the same tensor objects (bit-exact)."""
    converted = {}
    for key, value in original.items():
        new_key = convert_key(key)
        if new_key in converted:
            raise ValueError(f"Two original tensors map to {new_key!r}.")
        converted[new_key] = value
    return converted


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; pickled checkpoints are never loaded.")
    if not path.is_file():
        raise FileNotFoundError(f"Missing checkpoint file {path}.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (corrupted or truncated?): {error}") from error


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


def load_original_model(input_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """
    Builds [`BagelForConditionalGeneration`] from an original release folder, refusing a checkpoint whose tensors do
    not match the model exactly (missing or unexpected keys, wrong shapes, NaN / inf values). Returns `(model, tokenizer, vae_params)`.
    """
    input_dir = Path(input_dir)
    for name in ("llm_config.json", "vit_config.json", "ema.safetensors"):  # before the tokenizer's own, vaguer error
        if not (input_dir / name).is_file():
            raise FileNotFoundError(f"{input_dir} has no {name}: not a BAGEL release folder.")
    tokenizer = AutoTokenizer.from_pretrained(str(input_dir))
    config, vae_params = build_config(input_dir, tokenizer)
    original = _read_safetensors(input_dir / "ema.safetensors")
    state_dict = convert_state_dict(original)

    with torch.device("meta"):
        model = BagelForConditionalGeneration(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        to_original = {convert_key(key): key for key in original}
        raise ValueError(
            "The checkpoint does not match the BAGEL architecture built from its configs. "
            f"Missing tensors: {missing[:20]}{' ...' if len(missing) > 20 else ''}. "
            f"Unexpected tensors: {[to_original[key] for key in unexpected][:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}."
        )
    wrong_shapes = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    if wrong_shapes:
        raise ValueError("Tensor shapes do not match the configs: " + "; ".join(wrong_shapes[:20]))
    state_dict = {key: value.to(dtype) for key, value in state_dict.items()}
    non_finite = [key for key, value in state_dict.items() if not bool(torch.isfinite(value).all())]
    if non_finite:
        cause = "" if dtype in (torch.float32, torch.bfloat16) else f" (or values beyond {dtype}'s range)"
        raise ValueError(
            f"{len(non_finite)} tensors of {input_dir / 'ema.safetensors'} hold NaN or inf{cause}: "
            f"{', '.join(non_finite[:5])}{' ...' if len(non_finite) > 5 else ''}. The checkpoint is corrupt."
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Non-persistent buffers (RoPE inverse frequencies) are not in the checkpoint: rebuild them off the meta device.
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            module.inv_freq = inv_freq
            module.original_inv_freq = inv_freq.clone()
    model.config.dtype = dtype
    model.eval()
    return model, tokenizer, vae_params


def check_output_dir(input_dir: Path, output_dir: Path, overwrite: bool) -> None:
    """Refuses, before any work, an output folder that is the input folder (or inside it, or holds it), a file, a
    non-empty folder unless `overwrite`, or a place that cannot be written."""
    source, target = input_dir.resolve(), output_dir.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ValueError(
            f"output_dir {str(output_dir)!r} overlaps input_dir {str(input_dir)!r}: the conversion never writes into "
            "its input; choose another folder."
        )
    if target.exists() and not target.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} is a file, not a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(
            f"output_dir {str(output_dir)!r} is not empty; pass overwrite=True (--overwrite) to replace it as a whole."
        )
    existing = next(parent for parent in (target, *target.parents) if parent.exists())
    if not os.access(existing, os.W_OK):
        raise ValueError(f"output_dir {str(output_dir)!r} cannot be written ({str(existing)!r} is read-only).")


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
            sizes[low] = sizes[top]
    return sizes


def convert(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "5GB",
    image_sizes: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """
    Converts `input_dir` (original layout) into `output_dir` (diffusers layout). Returns `output_dir`.

    The folder is written atomically: everything is built in a temporary folder beside `output_dir` and moved into
    place at the end, so a killed conversion leaves no half-written folder (and an `overwrite` replaces the old folder
    as a whole: no stale shard or component survives). A non-empty `output_dir` is refused unless `overwrite=True`;
    the input folder is never written. Image sizes not given are the 7B's, lowered to what the model's tables hold.
    """
    from diffusers_bagel import pipeline_folder
    from diffusers_bagel.convert_flux_vae import load_flux_vae
    from diffusers_bagel.scheduling_flow_match_euler import FlowMatchEulerScheduler

    from .image_processing_bagel import BagelImageProcessor
    from .processing_bagel import BagelProcessor

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_output_dir(input_dir, output_dir, overwrite)

    model, tokenizer, vae_params = load_original_model(input_dir, dtype=dtype)
    config = model.config
    sizes = resolve_image_sizes(
        image_sizes, config.max_image_size, config.vit_max_num_patch_per_side * config.vision_config.patch_size
    )
    vae = load_flux_vae(input_dir / "ae.safetensors", params=vae_params, dtype=dtype)
    image_processor = BagelImageProcessor(
        vit_patch_size=config.vision_config.patch_size,
        vae_stride=config.latent_downsample,
        vit_max_num_patch_per_side=config.vit_max_num_patch_per_side,
        **sizes,
    )
    processor = BagelProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.converting-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging / "model", max_shard_size=max_shard_size)
        vae.save_pretrained(staging / "vae")
        FlowMatchEulerScheduler().save_pretrained(staging / "scheduler")
        processor.save_pretrained(staging / "processor")
        write_model_card(staging, model_id=output_dir.name, config=config)
        pipeline_folder.write_pipeline_folder_files(staging)  # model_index.json, pipeline_bagel.py, config.json
        _replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(f"Converted {input_dir} into {output_dir}")
    return output_dir


def _replace_folder(new: Path, target: Path) -> None:
    """Moves `new` to `target`, replacing a previous `target` as a whole (renames on one filesystem)."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_model_card(output_dir: str | os.PathLike, model_id: str | None = None, config: BagelConfig | None = None) -> Path:
    """
    Writes the Hub model card (`README.md`, from the `model_card.md` template shipped with this package) into a
    converted folder. `model_id` is the name the usage snippets load from: the Hub repo id when pushing, the folder
    name by default; `config` (read from `model/config.json` when omitted) gives the model's size. Returns the card's
    path.
    """
    output_dir = Path(output_dir)
    if config is None:
        config = BagelConfig.from_pretrained(output_dir / "model")
    path = output_dir / "README.md"
    path.write_text(model_card_text(model_id or output_dir.name, config), encoding="utf-8")
    return path


def model_card_text(model_id: str, config: BagelConfig) -> str:
    """The Hub model card (from the `model_card.md` template shipped with this package) for `model_id`, describing
    the model of `config`: BAGEL-7B-MoT's card for the 7B, the model's own size otherwise."""
    from importlib.resources import files

    if not isinstance(model_id, str) or not model_id.strip() or any(c.isspace() for c in model_id):
        raise ValueError(f"`model_id` must be a repo id or folder name without spaces, got {model_id!r}.")
    with torch.device("meta"):
        meta = BagelForConditionalGeneration(config)
    total = sum(p.numel() for p in meta.parameters())
    # Active per token, as "7B active" counts it: one expert of the decoder, the embeddings and the LM head.
    active = sum(p.numel() for n, p in meta.model.language_model.named_parameters() if "_moe_gen" not in n)
    active += meta.lm_head.weight.numel()
    text = config.text_config
    is_7b = (text.hidden_size, text.num_hidden_layers) == (3584, 28)

    def billions(count):
        return f"{count / 1e9:.1f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"

    if is_7b:
        intro = (
            "This folder is [ByteDance-Seed/BAGEL-7B-MoT](https://huggingface.co/ByteDance-Seed/BAGEL-7B-MoT) "
            "converted by the\n`bagel-hf` project into the layout of `transformers` and `diffusers`. The weights are "
            "the original ones, renamed\ntensor by tensor; nothing was retrained."
        )
        base_model = "base_model: ByteDance-Seed/BAGEL-7B-MoT\n"
    else:
        intro = (
            f"This folder is a BAGEL model ({text.num_hidden_layers} decoder layers of width {text.hidden_size}) in "
            "the layout of `transformers` and\n`diffusers`, written by the `bagel-hf` project. It is not "
            "ByteDance-Seed/BAGEL-7B-MoT: the usage below is the same,\nthe published evaluation numbers are the "
            "7B's, not this model's."
        )
        base_model = ""
    size = f"{billions(active)} parameters are active per token, {billions(total)} in total."
    local_dir = model_id.rsplit("/", 1)[-1] if "/" in model_id else model_id
    download = f"huggingface-cli download {model_id} --local-dir {local_dir}\n" if "/" in model_id else ""
    template = files(__package__).joinpath("model_card.md").read_text(encoding="utf-8")
    values = {"model_id": model_id, "intro": intro, "base_model": base_model, "size": size, "local_dir": local_dir,
              "download": download}  # fmt: skip
    for key, value in values.items():
        template = template.replace("{{ " + key + " }}", value)
    return template


def _parse_dtype(name: str) -> torch.dtype:
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise argparse.ArgumentTypeError(f"--dtype must be one of {sorted(choices)}, got {name!r}")
    return choices[name]


def _parse_shard_size(value: str) -> str:
    if not re.fullmatch(r"\d+(KB|MB|GB)", value):
        raise argparse.ArgumentTypeError(f"--max_shard_size must look like 500MB or 5GB, got {value!r}")
    return value


def main(argv=None, prog=None):
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input_dir", required=True, help="Folder of the original release (ema.safetensors, ...).")
    parser.add_argument("--output_dir", required=True, help="Where to write the converted folder.")
    parser.add_argument("--dtype", type=_parse_dtype, default=torch.float32, help="float32 (default), bfloat16, float16.")
    parser.add_argument("--max_shard_size", type=_parse_shard_size, default="5GB", help="Safetensors shard size.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace a non-empty --output_dir as a whole (refused otherwise).")
    for name, default in BAGEL_7B_IMAGE_SIZES.items():
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"Image processor {name} (default {default}, lowered to what the model's position "
                                 "table holds).")
    args = parser.parse_args(argv)
    sizes = {name: getattr(args, name) for name in BAGEL_7B_IMAGE_SIZES if getattr(args, name) is not None}
    for name, value in sizes.items():
        if value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    try:
        out = convert(args.input_dir, args.output_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      image_sizes=sizes, overwrite=args.overwrite)  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"Converted checkpoint written to {out}")


if __name__ == "__main__":
    main()


__all__ = [
    "check_output_dir",
    "resolve_image_sizes",
    "convert",
    "convert_key",
    "convert_state_dict",
    "load_original_model",
    "build_config",
    "write_model_card",
    "model_card_text",
    "main",
]
