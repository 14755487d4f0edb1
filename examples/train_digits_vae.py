"""
Train the tiny FLUX-layout VAE of the digits BAGEL on scikit-learn's digits (64x64 RGB, train split only).

    python examples/train_digits_vae.py --output_dir outputs/digits/vae [--vae_max_steps 400] [--time_budget_minutes 6]

The autoencoder is diffusers' `AutoencoderKL` with FLUX's latent space (16 channels, 8x downsampling, no quant convs);
after training, `shift_factor` and `scaling_factor` are set from the statistics of the training latents. Prints the
held-out reconstruction error and how often a classifier fitted on real held-out digits recognises the held-out
reconstructions.
"""

import argparse
import time
from pathlib import Path

import torch
from digits import DigitClassifier, split_digits, train_digits_vae


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_vae_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--vae_max_steps", type=positive_int, default=400, help="VAE optimiser steps.")
    parser.add_argument("--vae_batch_size", type=positive_int, default=32)
    parser.add_argument("--vae_learning_rate", type=positive_float, default=2e-3)
    parser.add_argument("--vae_kl_weight", type=float, default=1e-4)


@torch.no_grad()
def report_vae(vae, split) -> dict:
    """Held-out reconstruction MSE (pixels in [-1, 1]) and classifier accuracy on the reconstructions."""
    pixels = torch.from_numpy(split.held_out_images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    mse = float((reconstruction - pixels).pow(2).mean())
    images = ((reconstruction + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    classifier = DigitClassifier(split.held_out_images, split.held_out_labels)
    return {"held_out_mse": mse, "reconstruction_accuracy": classifier.accuracy(images, split.held_out_labels)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/digits/vae"))
    parser.add_argument("--time_budget_minutes", type=positive_float, default=None, help="Stop early after this long.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's).")
    add_vae_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    split = split_digits(seed=args.seed)
    start, cpu_start = time.monotonic(), time.process_time()
    vae = train_digits_vae(
        split.train_images,
        max_steps=args.vae_max_steps,
        batch_size=args.vae_batch_size,
        learning_rate=args.vae_learning_rate,
        kl_weight=args.vae_kl_weight,
        seed=args.seed,
        time_budget_minutes=args.time_budget_minutes,
    )
    wall, cpu = time.monotonic() - start, time.process_time() - cpu_start
    vae.save_pretrained(args.output_dir)
    stats = report_vae(vae, split)
    print(f"saved {args.output_dir} ({sum(p.numel() for p in vae.parameters()):,} parameters)")
    print(f"shift_factor={vae.config.shift_factor:.4f} scaling_factor={vae.config.scaling_factor:.4f}")
    print(f"held-out reconstruction MSE {stats['held_out_mse']:.4f}, recognised {stats['reconstruction_accuracy']:.1%}")
    print(f"training took {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU (all threads)")


if __name__ == "__main__":
    main()
