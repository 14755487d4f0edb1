"""
Convert a BAGEL checkpoint in the original release layout (`ByteDance-Seed/BAGEL-7B-MoT`: `ema.safetensors`,
`ae.safetensors`, `llm_config.json`, `vit_config.json`, tokenizer files) into one pipeline folder in diffusers layout:

    OUT/model/       BagelForConditionalGeneration (sharded safetensors)
    OUT/processor/   BagelProcessor (tokenizer, image processor, chat template)
    OUT/vae/         diffusers AutoencoderKL (FLUX autoencoder)
    OUT/scheduler/   FlowMatchEulerScheduler
    OUT/model_index.json, OUT/pipeline_bagel.py, OUT/config.json, OUT/processor_config.json   (see pipeline_folder)
    OUT/README.md    Hub model card (from the package's model_card.md)

Usage:

    bagel convert --input_dir ORIG --output_dir OUT
    python -m diffusers_bagel.convert_bagel_to_diffusers --input_dir ORIG --output_dir OUT

The model and its processor are read by `transformers_bagel.convert_bagel_to_hf` (the original loader's corrections,
strict key and shape checks on the weights' header, no pickles), which also writes the model tensor by tensor (memory
holds one tensor, not the checkpoint); this module adds the VAE and the scheduler and writes the folder. The
layering is one way: `diffusers_bagel` assembles pipeline folders from `transformers_bagel`'s parts, never the reverse.
"""

import argparse
import errno
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers.utils import logging
from transformers_bagel.configuration_bagel import BagelConfig
from transformers_bagel.convert_bagel_to_hf import (
    BAGEL_7B_IMAGE_SIZES,
    original_processor,
    read_original_release,
    save_original_model,
)
from transformers_bagel.modeling_bagel import BagelForConditionalGeneration
from transformers_bagel.safetensors_streaming import parse_shard_size

from . import pipeline_folder
from .convert_flux_vae import load_flux_vae
from .scheduling_flow_match_euler import FlowMatchEulerScheduler


logger = logging.get_logger(__name__)

__all__ = ["check_output_dir", "convert", "main", "model_card_text", "write_model_card"]


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


def convert(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = "5GB",
    image_sizes: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """
    Converts `input_dir` (original layout) into `output_dir` (diffusers layout). Returns `output_dir`.

    The folder is written atomically: everything is built in a temporary folder beside `output_dir` and moved into
    place at the end, so a killed conversion (or a NaN tensor found half-way) leaves no half-written folder (and an
    `overwrite` replaces the old folder as a whole: no stale shard or component survives). A non-empty `output_dir`
    is refused unless `overwrite=True`; the input folder is never written. Image sizes not given are the 7B's, lowered
    to what the model's tables hold. Everything that can be checked without reading the weights (configs, tokenizer,
    tensor names and shapes, a truncated file, `max_shard_size`) is checked before anything is written; the model's
    tensors are then streamed: read, cast, checked for NaN / inf and written one at a time, so memory peaks at about
    one tensor, not the checkpoint.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_output_dir(input_dir, output_dir, overwrite)
    parse_shard_size(max_shard_size)

    release = read_original_release(input_dir)  # configs and the weights' header: every check that needs no data
    config = release.config
    processor = original_processor(release.tokenizer, config, image_sizes)
    vae = load_flux_vae(input_dir / "ae.safetensors", params=release.vae_params, dtype=dtype)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.converting-", dir=output_dir.parent))
    try:
        # Tensor by tensor: memory holds one tensor of the checkpoint at a time, never the model.
        save_original_model(release, staging / "model", dtype=dtype, max_shard_size=max_shard_size)
        vae.save_pretrained(staging / "vae")
        FlowMatchEulerScheduler().save_pretrained(staging / "scheduler")
        processor.save_pretrained(staging / "processor")
        write_model_card(staging, model_id=output_dir.name, config=config)
        pipeline_folder.write_pipeline_folder_files(staging)
        _replace_folder(staging, output_dir)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno != errno.ENOSPC:
            raise
        needed = sum(math.prod(entry.shape) for entry in release.tensors.values()) * dtype.itemsize
        raise OSError(
            errno.ENOSPC,
            f"No space left on the device of {str(output_dir.parent)!r} while writing the converted folder; nothing "
            f"was left behind (it is built in a temporary folder there). The weights alone need "
            f"{needed / 1e9:.1f} GB in {str(dtype).replace('torch.', '')}: free that much or choose another "
            "--output_dir",
        ) from error
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
    """`python -m diffusers_bagel.convert_bagel_to_diffusers` and `bagel convert`: the flags, then [`convert`]."""
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
    except OSError as error:  # a broken file, a full disk, a refused permission: one line, no traceback
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"Converted checkpoint written to {out}")


if __name__ == "__main__":
    main()
