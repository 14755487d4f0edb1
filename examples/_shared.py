"""Helpers shared by the per-task examples: the tiny default checkpoint, a drawn demo picture and common flags."""

import argparse
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch

from quickstart import ROOT, default_checkpoint

from diffusers_bagel import BagelPipeline
from transformers_bagel.image_processing_bagel import to_rgb_image


__all__ = ["ROOT", "base_parser", "checkpoint_from", "demo_image", "load_image", "load_pipeline"]


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every example takes: --checkpoint, --output_dir, --steps, --seed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", type=Path, default=None,
        help="Converted BAGEL folder (default: the tiny test model, converted once into outputs/tiny-bagel).",
    )  # fmt: skip
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "examples", help="Where files go.")
    parser.add_argument("--steps", type=int, default=50, help="Euler steps of image generation.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initial noise.")
    return parser


def checkpoint_from(args) -> Path:
    """The --checkpoint folder, or the tiny model converted on first use (as examples/quickstart.py does)."""
    return args.checkpoint or default_checkpoint(ROOT / "outputs")


def demo_image(width: int = 160, height: int = 120) -> PIL.Image.Image:
    """A small drawn scene (sky, sun, hill, house) so the examples need no image file."""
    image = PIL.Image.new("RGB", (width, height), (120, 180, 235))
    draw = PIL.ImageDraw.Draw(image)
    draw.ellipse((width * 0.70, height * 0.10, width * 0.88, height * 0.34), fill=(250, 210, 60))
    draw.rectangle((0, height * 0.65, width, height), fill=(70, 150, 60))
    draw.rectangle((width * 0.20, height * 0.42, width * 0.45, height * 0.70), fill=(190, 60, 50))
    draw.polygon([(width * 0.17, height * 0.44), (width * 0.325, height * 0.25), (width * 0.48, height * 0.44)], fill=(90, 50, 40))
    return image


def load_image(path) -> PIL.Image.Image:
    """The image at `path` (a file or an http(s) URL, as RGB), or the drawn demo scene when `path` is None."""
    return demo_image() if path is None else to_rgb_image(path)


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(checkpoint, device: str | None = None, dtype: str = "auto") -> BagelPipeline:
    """`BagelPipeline.from_pretrained(checkpoint, dtype=...).to(device)`: by default on CUDA in bfloat16 when it is
    available, else on the CPU in float32. `dtype` is a key of `DTYPES` (argparse `choices`)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for, but CUDA is not available on this machine.")
    torch_dtype = DTYPES[dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return BagelPipeline.from_pretrained(checkpoint, dtype=torch_dtype).to(device)
