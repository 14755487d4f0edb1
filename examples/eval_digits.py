"""
Evaluate a digits BAGEL on the held-out digits: generation, understanding and editing accuracy.

    python examples/eval_digits.py --checkpoint checkpoints/tiny-bagel-digits [--per_digit 20] [--write_eval_md]

(a) generation: `--per_digit` images of each digit drawn with `BagelPipeline` from "a handwritten digit <name>";
(b) understanding: "Which digit is this?" about every held-out image, answered by `model.generate` on
    `BagelProcessor.apply_chat_template`;
(c) editing: `--per_digit` held-out images of other digits per target, edited with "change the digit to <name>".
Generated and edited images are judged by an SVC fitted on the real held-out digits (downscaled to 8x8). Prints the
three accuracies, writes a per-digit grid PNG (generated images, then source/edited pairs) and a JSON of the numbers.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from digits import (
    DigitClassifier,
    editing_accuracy,
    generation_accuracy,
    results_grid,
    split_digits,
    understanding_accuracy,
)

from diffusers_bagel import BagelPipeline


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def evaluate(pipe, split, per_digit: int, steps: int, seed: int, understanding_limit: int | None, **pipeline_kwargs):
    """Runs the three evaluations; returns `(numbers, generation result, editing result, understanding result)`."""
    classifier = DigitClassifier(split.held_out_images, split.held_out_labels)
    numbers = {"classifier_accuracy_on_real_train_digits": classifier.accuracy(split.train_images, split.train_labels)}
    timings = {}
    start = time.monotonic()
    generation = generation_accuracy(pipe, classifier, per_digit, num_inference_steps=steps, seed=seed, **pipeline_kwargs)
    timings["generation_seconds"] = time.monotonic() - start
    start = time.monotonic()
    images, labels = split.held_out_images, split.held_out_labels
    if understanding_limit:
        images, labels = images[:understanding_limit], labels[:understanding_limit]
    understanding = understanding_accuracy(pipe.model, pipe.processor, images, labels)
    timings["understanding_seconds"] = time.monotonic() - start
    start = time.monotonic()
    editing = editing_accuracy(
        pipe, classifier, split.held_out_images, split.held_out_labels, per_digit, num_inference_steps=steps, seed=seed,
        **pipeline_kwargs,
    )  # fmt: skip
    timings["editing_seconds"] = time.monotonic() - start
    numbers.update(
        generation_accuracy=generation.accuracy,
        understanding_accuracy=understanding.accuracy,
        editing_accuracy=editing.accuracy,
        generation_per_digit=generation.per_digit,
        understanding_per_digit=understanding.per_digit,
        editing_per_digit=editing.per_digit,
        generated_images=sum(len(v) for v in generation.outputs.values()),
        understanding_questions=len(labels),
        edited_images=sum(len(v) for v in editing.outputs.values()),
        **{k: round(v, 1) for k, v in timings.items()},
    )
    return numbers, generation, editing, understanding


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="A digits BAGEL folder (diffusers layout).")
    parser.add_argument("--per_digit", type=positive_int, default=20, help="Generated / edited images per digit.")
    parser.add_argument("--steps", type=positive_int, default=16, help="Euler steps.")
    parser.add_argument("--timestep_shift", type=float, default=3.0, help="Schedule shift (the pipeline's default).")
    parser.add_argument("--cfg_text_scale", type=float, default=None, help="Default: the pipeline's preset.")
    parser.add_argument("--cfg_img_scale", type=float, default=None, help="Default: the pipeline's preset.")
    parser.add_argument("--understanding_limit", type=positive_int, default=None, help="Ask about the first N only.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split_seed", type=int, default=0, help="Seed of the train / held-out split (as training).")
    parser.add_argument("--output_dir", type=Path, default=None, help="Grid and JSON (default: outputs/eval_digits).")
    parser.add_argument("--write_eval_md", action="store_true", help="Also write CHECKPOINT/EVAL.md.")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.checkpoint / "model_index.json").is_file():
        parser.error(f"{args.checkpoint} is not a pipeline folder (no model_index.json).")
    output_dir = args.output_dir or Path("outputs") / "eval_digits"
    output_dir.mkdir(parents=True, exist_ok=True)

    pipe = BagelPipeline.from_pretrained(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    guidance = {k: v for k, v in (("cfg_text_scale", args.cfg_text_scale), ("cfg_img_scale", args.cfg_img_scale)) if v}
    split = split_digits(seed=args.split_seed)
    start = time.monotonic()
    numbers, generation, editing, _ = evaluate(
        pipe, split, args.per_digit, args.steps, args.seed, args.understanding_limit,
        timestep_shift=args.timestep_shift, **guidance,
    )  # fmt: skip
    numbers["settings"] = {
        "per_digit": args.per_digit, "steps": args.steps, "timestep_shift": args.timestep_shift, "seed": args.seed,
        **guidance,
    }  # fmt: skip
    numbers["total_seconds"] = round(time.monotonic() - start, 1)
    grid_path = output_dir / "eval_grid.png"
    results_grid(generation, editing).save(grid_path)
    (output_dir / "eval.json").write_text(json.dumps(numbers, indent=2))

    print(f"classifier (SVC fitted on real held-out digits) on the real train digits: "
          f"{numbers['classifier_accuracy_on_real_train_digits']:.1%}")
    print(f"generation accuracy:    {numbers['generation_accuracy']:.1%} ({numbers['generated_images']} images)")
    print(f"understanding accuracy: {numbers['understanding_accuracy']:.1%} ({numbers['understanding_questions']} held-out images)")
    print(f"editing accuracy:       {numbers['editing_accuracy']:.1%} ({numbers['edited_images']} edits)")
    print(f"grid: {grid_path}")
    if args.write_eval_md:
        path = write_eval_md(args.checkpoint, numbers, args)
        print(f"wrote {path}")


def write_eval_md(checkpoint: Path, numbers: dict, args) -> Path:
    """The numbers beside the checkpoint, with the command that produced them."""
    def table(name):
        per = numbers[name]
        return " | ".join(f"{per.get(d, per.get(str(d), float('nan'))):.0%}" for d in range(10))

    settings = numbers["settings"]
    lines = [
        "# tiny-bagel-digits: evaluation",
        "",
        "Held-out digits (scikit-learn `load_digits`, stratified 20% split, seed "
        f"{args.split_seed}); judge: an RBF SVC fitted on the real held-out digits downscaled to 8x8 "
        f"({numbers['classifier_accuracy_on_real_train_digits']:.1%} on the real train digits).",
        "",
        "```",
        f"python examples/eval_digits.py --checkpoint {checkpoint} --per_digit {settings['per_digit']} "
        f"--steps {settings['steps']} --timestep_shift {settings['timestep_shift']} --seed {settings['seed']} "
        "--write_eval_md",
        "```",
        "",
        "| task | accuracy | n |",
        "|---|---|---|",
        f"| generation (text-to-image, classified) | {numbers['generation_accuracy']:.1%} | {numbers['generated_images']} |",
        f"| understanding (answer names the digit) | {numbers['understanding_accuracy']:.1%} | "
        f"{numbers['understanding_questions']} |",
        f"| editing (edited image classified as the requested digit) | {numbers['editing_accuracy']:.1%} | "
        f"{numbers['edited_images']} |",
        "",
        "Per digit (0..9):",
        "",
        "| task | " + " | ".join(str(d) for d in range(10)) + " |",
        "|---|" + "---|" * 10,
        f"| generation | {table('generation_per_digit')} |",
        f"| understanding | {table('understanding_per_digit')} |",
        f"| editing | {table('editing_per_digit')} |",
        "",
        f"Pipeline settings: {settings['steps']} Euler steps, timestep_shift {settings['timestep_shift']}, the "
        "pipeline's guidance presets unless listed: "
        + json.dumps({k: v for k, v in settings.items() if k.startswith("cfg")}) + ".",
        "",
        f"Evaluation time: {numbers['total_seconds']:.0f} s on CPU.",
        "",
    ]
    path = checkpoint / "EVAL.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    main()
