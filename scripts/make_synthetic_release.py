"""
Writes a synthetic BAGEL release of any size, for measuring the conversion (`bagel convert`) on large checkpoints
without downloading BAGEL-7B-MoT.

The release has the layout and the files of the tiny reference `tests/fixtures/tiny_bagel_original/` (tokenizer,
`config.json`, `vit_config.json`, `vae_config.json`, `ae.safetensors`, ...), with a wider and deeper decoder in
`llm_config.json` (`--hidden_size`, `--num_layers`, `--intermediate_size`); the vision tower and the VAE stay tiny.
`ema.safetensors` holds random weights (normal, std 0.02, from `--seed`) under exactly the names and shapes the
converter expects: those of the model built on the meta device from these configs, renamed back to the original
layout through `KEY_PREFIXES`. It is written tensor by tensor, so a 1 GB release does not need 1 GB of memory.

Usage:

    python scripts/make_synthetic_release.py --output_dir /tmp/bagel_synthetic --hidden_size 1024 --num_layers 16

(about 1.0 GB of float32 weights with the default `--intermediate_size`).
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging

from transformers_bagel.convert_bagel_to_hf import EMA_WEIGHTS_NAME, KEY_PREFIXES, build_config, convert_key
from transformers_bagel.modeling_bagel import BagelForConditionalGeneration
from transformers_bagel.safetensors_streaming import SafetensorsWriter


TINY_RELEASE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_bagel_original"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_STD = 0.02

__all__ = ["TINY_RELEASE", "make_synthetic_release", "original_key", "release_tensor_specs"]


def original_key(key: str) -> str:
    """The name of model tensor `key` in an original `ema.safetensors` (`convert_key` reversed)."""
    for old, new in KEY_PREFIXES:
        if key.startswith(new):
            name = old + key[len(new) :]
            if convert_key(name) == key:
                return name
    raise ValueError(f"No original name maps to {key!r}.")


def release_tensor_specs(release_dir: Path) -> dict[str, tuple[int, ...]]:
    """The original tensor names and shapes the configs of `release_dir` call for, sorted by name (the order
    `safetensors.torch.save_file` writes)."""
    tokenizer = AutoTokenizer.from_pretrained(str(release_dir))
    config, _ = build_config(release_dir, tokenizer)
    with torch.device("meta"):
        model = BagelForConditionalGeneration(config)
    shapes = {original_key(name): tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    return dict(sorted(shapes.items()))


def _write_llm_config(output_dir: Path, hidden_size: int, num_layers: int, intermediate_size: int) -> None:
    llm = json.loads((TINY_RELEASE / "llm_config.json").read_text(encoding="utf-8"))
    heads = llm["num_attention_heads"]
    if hidden_size <= 0 or hidden_size % (2 * heads):
        raise ValueError(f"hidden_size must be a positive multiple of {2 * heads} (the tiny model's {heads} heads, "
                         f"even head size), got {hidden_size}.")  # fmt: skip
    if num_layers <= 0 or intermediate_size <= 0:
        raise ValueError(f"num_layers and intermediate_size must be positive, got {num_layers}, {intermediate_size}.")
    llm.update(hidden_size=hidden_size, num_hidden_layers=num_layers, intermediate_size=intermediate_size)
    (output_dir / "llm_config.json").write_text(json.dumps(llm, indent=2) + "\n", encoding="utf-8")


def _write_random_weights(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    total = sum(torch.Size(shape).numel() for shape in shapes.values()) * dtype.itemsize
    specs = [(name, dtype, shape) for name, shape in shapes.items()]
    with SafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer, logging.tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Writing random weights"
    ) as bar:
        for name, shape in shapes.items():
            tensor = torch.randn(shape, generator=generator).mul_(INIT_STD).to(dtype)
            writer.write(name, tensor)
            bar.update(tensor.nbytes)


def make_synthetic_release(
    output_dir,
    hidden_size: int = 1024,
    num_layers: int = 16,
    intermediate_size: int = 1536,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """
    Writes a synthetic release (see the module's docstring) into `output_dir`, which must not exist or be empty.
    Returns `output_dir`.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"{output_dir} exists and is not an empty folder.")
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_llm_config(output_dir, hidden_size, num_layers, intermediate_size)
    for source in TINY_RELEASE.iterdir():
        if source.name not in ("llm_config.json", EMA_WEIGHTS_NAME):
            shutil.copyfile(source, output_dir / source.name)
    _write_random_weights(output_dir / EMA_WEIGHTS_NAME, release_tensor_specs(output_dir), dtype, seed)
    return output_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Where to write the release (new or empty folder).")
    parser.add_argument("--hidden_size", type=int, default=1024, help="Decoder width (default 1024).")
    parser.add_argument("--num_layers", type=int, default=16, help="Decoder layers (default 16).")
    parser.add_argument("--intermediate_size", type=int, default=1536, help="Decoder MLP width (default 1536).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Weights' dtype (default float32).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default 0).")
    args = parser.parse_args(argv)
    try:
        out = make_synthetic_release(args.output_dir, args.hidden_size, args.num_layers, args.intermediate_size,
                                     DTYPES[args.dtype], args.seed)  # fmt: skip
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    size = (out / EMA_WEIGHTS_NAME).stat().st_size
    print(f"Synthetic release written to {out} ({EMA_WEIGHTS_NAME}: {size / 1e9:.3f} GB)")


if __name__ == "__main__":
    main()
