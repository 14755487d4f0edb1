"""
Quick start on the built-in default, the tiny BAGEL trained on handwritten digits that ships in
checkpoints/tiny-bagel-digits: it draws one of every digit from text, reads a held-out digit, and edits it into another.

    python examples/quickstart.py [--output_dir outputs/quickstart]
    python examples/quickstart.py --checkpoint CONVERTED_DIR [--prompt ...] [--edit_prompt ...] [--question ...]

With --checkpoint (a converted BAGEL folder, e.g. the 7B) it generates from --prompt, edits the result with
--edit_prompt and answers --question about it. `--checkpoint random-tiny` uses the random-weight tiny BAGEL of the tests
(original release layout, converted once into outputs/tiny-bagel): its pictures are noise; the point is the whole path.
"""

import argparse
from pathlib import Path

import torch

from diffusers_bagel import BagelPipeline
from transformers_bagel.chat import generate_answer, understanding_messages
from diffusers_bagel.convert_bagel_to_diffusers import convert


ROOT = Path(__file__).resolve().parent.parent
DIGITS_CHECKPOINT = ROOT / "checkpoints" / "tiny-bagel-digits"
TINY_ORIGINAL = ROOT / "tests" / "fixtures" / "tiny_bagel_original"
TINY_SIZES = {"vae_max_image_size": 128, "vae_min_image_size": 32, "vit_max_image_size": 112, "vit_min_image_size": 28}


def default_checkpoint(output_root: Path) -> Path:
    """The random-weight tiny BAGEL of the tests, converted once into `output_root/tiny-bagel` (any image size)."""
    converted = output_root / "tiny-bagel"
    if not (converted / "model_index.json").is_file():
        convert(TINY_ORIGINAL, converted, image_sizes=TINY_SIZES)
    return converted


def resolve_checkpoint(value: str | None, parser: argparse.ArgumentParser, default: Path = DIGITS_CHECKPOINT) -> Path:
    """A `--checkpoint` value as a folder: None -> `default`, `random-tiny` -> the random test model (converted on
    first use), anything else must be a converted BAGEL folder (refused through `parser.error` otherwise)."""
    if value is None:
        return default
    if value == "random-tiny":
        return default_checkpoint(ROOT / "outputs")
    checkpoint = Path(value)
    if not (checkpoint / "model_index.json").is_file():
        parser.error(f"--checkpoint {checkpoint} is not a converted BAGEL folder (no model_index.json)")
    return checkpoint


def ask(pipe, image, question: str, max_new_tokens: int = 16) -> str:
    """Greedy answer of the model to `question` about `image` (the CLI's chat path)."""
    messages = understanding_messages(question, [image])
    return generate_answer(pipe.model, pipe.processor, messages, max_new_tokens=max_new_tokens).strip()


def digits_demo(args):
    """The shipped digits BAGEL: a grid of generated digits 0-9, an answer about a held-out digit, an edit of it."""
    from digits import (
        DIGIT_NAMES,
        UNDERSTANDING_QUESTION,
        edit_instruction,
        image_grid,
        split_digits,
        text_to_image_prompt,
        to_pil,
    )

    pipe = BagelPipeline.from_pretrained(DIGITS_CHECKPOINT)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    rows = [
        pipe([text_to_image_prompt(digit) for digit in range(10)], num_inference_steps=args.steps, generator=generator).images
        for _ in range(args.rows)
    ]
    grid_path = args.output_dir / "generated_digits.png"
    image_grid(rows).resize((10 * 66 * 2, args.rows * 66 * 2), resample=0).save(grid_path)

    split = split_digits()
    sample, label = to_pil(split.held_out_images[args.sample_index]), int(split.held_out_labels[args.sample_index])
    sample_path = args.output_dir / "held_out_digit.png"
    sample.save(sample_path)
    reply = ask(pipe, sample, UNDERSTANDING_QUESTION, max_new_tokens=4)
    target = (label + 3) % 10
    edited = pipe(edit_instruction(target), image=sample, num_inference_steps=args.steps, generator=generator).images[0]
    edited_path = args.output_dir / "edited_digit.png"
    image_grid([[sample, edited]]).resize((2 * 66 * 2, 66 * 2), resample=0).save(edited_path)

    print(f"checkpoint: {DIGITS_CHECKPOINT}")
    print(f"text-to-image (rows of digits zero..nine, {args.rows} per digit): {grid_path}")
    print(f"understanding: Q: {UNDERSTANDING_QUESTION!r} about {sample_path} (a {DIGIT_NAMES[label]}) A: {reply!r}")
    print(f"edit ({edit_instruction(target)!r}, source left, edit right): {edited_path}")


def checkpoint_demo(args, checkpoint: Path):
    """Any converted checkpoint: generate from --prompt, edit it with --edit_prompt, answer --question about it."""
    pipe = BagelPipeline.from_pretrained(checkpoint)
    generated = pipe(args.prompt, num_inference_steps=args.steps, generator=torch.manual_seed(args.seed)).images[0]
    generated_path = args.output_dir / "generated.png"
    generated.save(generated_path)
    edited = pipe(
        args.edit_prompt, image=generated, num_inference_steps=args.steps, generator=torch.manual_seed(args.seed)
    ).images[0]
    edited_path = args.output_dir / "edited.png"
    edited.save(edited_path)
    reply = ask(pipe, generated, args.question)

    print(f"checkpoint: {checkpoint}")
    print(f"text-to-image ({generated.width}x{generated.height}): {generated_path}")
    print(f"edit ({edited.width}x{edited.height}): {edited_path}")
    print(f"understanding: Q: {args.question!r} A: {reply!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", default=None,
        help="Converted BAGEL folder, or `random-tiny` (default: the shipped digits BAGEL).",
    )  # fmt: skip
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "quickstart", help="Where PNGs go.")
    parser.add_argument("--prompt", default="A photo of a red cat sitting on a wooden table.")
    parser.add_argument("--edit_prompt", default="Make the cat blue.")
    parser.add_argument("--question", default="What is in this image?")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: 16 for digits, 20 otherwise).")
    parser.add_argument("--rows", type=int, default=3, help="Digits: generated images per digit in the grid.")
    parser.add_argument("--sample_index", type=int, default=0, help="Digits: which held-out digit to read and edit.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be a positive integer")
    if args.rows < 1:
        parser.error("--rows must be a positive integer")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    checkpoint = resolve_checkpoint(args.checkpoint, parser)
    if checkpoint == DIGITS_CHECKPOINT:
        args.steps = args.steps or 16
        digits_demo(args)
    else:
        args.steps = args.steps or 20
        checkpoint_demo(args, checkpoint)


if __name__ == "__main__":
    main()
