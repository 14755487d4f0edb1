"""
Flow-GRPO on the digits BAGEL: teach it to draw the requested digit without classifier-free guidance.

    python examples/train_grpo.py --adapter_dir checkpoints/tiny-bagel-digits-grpo [--time_budget_minutes 29]

Without CFG (`cfg_text_scale=1`, one branch per step instead of two) the shipped digits model draws the requested
digit about three times in four; with its default guidance, almost always. This script trains a LoRA on the
generation experts with `BagelGRPOTrainer`, the reward being a judge's probability that the image shows the
requested digit, then measures the three settings on held-out seeds and writes ADAPTER_DIR:

- the adapter (`adapter_config.json`, `adapter_model.safetensors`; load it with
  `transformers_bagel.training.load_bagel_lora(pipe, ADAPTER_DIR)` or `bagel generate --lora ADAPTER_DIR`);
- `setting.json`, the exact sampling arguments the adapter is meant for;
- `README.md` with the before / after accuracies per digit, and `eval.json` with the numbers.

Two judges, fitted on disjoint real digits, keep the measurement honest: the reward's (an SVC with probabilities,
fitted on the training split) and the evaluation's (`examples/eval_digits.py`'s SVC, fitted on the held-out split).
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from digits import (
    DIGIT_NAMES,
    DigitClassifier,
    TimeBudgetCallback,
    generation_accuracy,
    image_grid,
    split_digits,
    text_to_image_prompt,
)
from train_digits_vae import positive_float, positive_int

from diffusers_bagel import BagelGRPOConfig, BagelGRPOTrainer, BagelPipeline
from diffusers_bagel.defaults import DEFAULT_TIMESTEP_SHIFT
from transformers_bagel.training.lora import bagel_lora_config


class DigitProbabilityReward:
    """The reward: the judge's probability that each image shows its row's `digit`."""

    __name__ = "digit_probability"

    def __init__(self, judge: DigitClassifier):
        self.judge = judge

    def __call__(self, images, prompts, digit, **columns) -> list[float]:
        probabilities = self.judge.probabilities(images)
        return probabilities[np.arange(len(images)), np.asarray(digit)].tolist()


def prompt_dataset(repeats: int) -> Dataset:
    """The ten prompts, `repeats` times each, with their digit (the reward's extra column)."""
    digits = [digit for _ in range(repeats) for digit in range(10)]
    return Dataset.from_dict({"prompt": [text_to_image_prompt(d) for d in digits], "digit": digits})


def within_digit_spread(images_by_digit: dict) -> float:
    """How varied the images of each digit are: the per-pixel standard deviation over one digit's images, at the
    judge's 8x8 scale (values 0..16), averaged over pixels and digits. A model drawing one image per digit scores 0."""
    return float(np.mean([np.std(DigitClassifier.features(images), axis=0).mean() for images in images_by_digit.values()]))


def evaluate(pipe, judge, setting: dict, per_digit: int, seed: int) -> dict:
    """Generation accuracy and spread under `setting` on `per_digit` images per digit drawn from `seed`."""
    start = time.monotonic()
    result = generation_accuracy(pipe, judge, per_digit, seed=seed, **setting)
    return {
        "accuracy": result.accuracy,
        "spread": within_digit_spread(result.outputs),
        "per_digit": {str(d): v for d, v in result.per_digit.items()},
        "images": per_digit * 10,
        "seconds": round(time.monotonic() - start, 1),
        "result": result,
    }


def write_readme(adapter_dir: Path, numbers: dict, command: str) -> None:
    rows = []
    for name, label in (
        ("without_adapter", "shipped model, this setting (no adapter)"),
        ("with_adapter", "shipped model + this adapter, this setting"),
        ("default_guidance", "shipped model, its default guidance (16 steps)"),
    ):
        entry = numbers[name]
        per = " | ".join(f"{entry['per_digit'][str(d)]:.0%}" for d in range(10))
        rows.append(f"| {label} | **{entry['accuracy']:.1%}** | {entry['spread']:.2f} | {per} |")
    setting = numbers["setting"]
    training = numbers["training"]
    lines = [
        "---",
        "library_name: peft",
        "base_model: tiny-bagel-digits",
        "tags:",
        "  - bagel",
        "  - flow-grpo",
        "  - lora",
        "  - toy",
        "---",
        "",
        "# tiny-bagel-digits-grpo",
        "",
        "A LoRA on the generation experts of `checkpoints/tiny-bagel-digits`, trained with Flow-GRPO "
        "(`diffusers_bagel.BagelGRPOTrainer`) so that the model draws the requested digit **without classifier-free "
        "guidance** (`cfg_text_scale=1`: one decoder pass per step instead of two). The reward was a judge's probability "
        "that the image shows the requested digit.",
        "",
        "```python",
        "import json",
        "from diffusers_bagel import BagelPipeline",
        "from transformers_bagel.training import load_bagel_lora",
        "",
        'pipe = BagelPipeline.from_pretrained("checkpoints/tiny-bagel-digits")',
        'load_bagel_lora(pipe, "checkpoints/tiny-bagel-digits-grpo")',
        'setting = json.load(open("checkpoints/tiny-bagel-digits-grpo/setting.json"))',
        'image = pipe("a handwritten digit seven", **setting).images[0]',
        "```",
        "",
        "or `bagel generate --checkpoint checkpoints/tiny-bagel-digits --lora checkpoints/tiny-bagel-digits-grpo "
        f"--steps {setting['num_inference_steps']} --cfg_text_scale {setting['cfg_text_scale']} "
        '--prompt "a handwritten digit seven"`.',
        "",
        f"`setting.json` (the sampling arguments the adapter is meant for): `{json.dumps(setting)}`.",
        "",
        "## Accuracy on held-out seeds",
        "",
        f"{numbers['per_digit']} images per digit, drawn from seed {numbers['eval_seed']} (training drew its noise "
        "from seeds hashed from the run's seed and step, never this one), judged by an RBF SVC fitted on the real "
        "held-out digits (`examples/eval_digits.py`'s judge; the reward's judge was fitted on the training digits). "
        "Spread: how varied each digit's images are (the per-pixel standard deviation over one digit's images at the "
        f"judge's 8x8 scale, averaged; the real held-out digits: {numbers['real_digits_spread']:.2f}).",
        "",
        "| model and setting | accuracy | spread | " + " | ".join(str(d) for d in range(10)) + " |",
        "|---|---|---|" + "---|" * 10,
        *rows,
        "",
        f"The reward asks for the right digit only, nothing for variety (KL weight `beta` {training['beta']}): the "
        f"spread is {numbers['with_adapter']['spread']:.2f} with the adapter, {numbers['without_adapter']['spread']:.2f} "
        f"without it, {numbers['default_guidance']['spread']:.2f} with guidance. `--beta` > 0 keeps the policy nearer "
        "the model's.",
        "",
        "## Training",
        "",
        "```",
        command,
        "```",
        "",
        f"{training['steps']} optimiser steps of {training['prompts_per_step']} prompts x {training['num_generations']} "
        f"images, {training['num_inference_steps']} SDE steps at noise level {training['sde_noise_level']}, "
        f"LoRA rank {training['lora_rank']}, learning rate {training['learning_rate']}, beta {training['beta']}, seed "
        f"{training['seed']}: {training['train_seconds']:.0f} s of wall time ({training['cpu_seconds']:.0f} s of "
        f"process CPU time) on {training['threads']} CPU threads. Mean reward {training['first_reward']:.3f} over the "
        f"first {training['reward_window']} steps, {training['last_reward']:.3f} over the last "
        f"{training['reward_window']}.",
        "",
        "Sample grid (rows: digits 0-9; left half without the adapter, right half with it, same seeds): `samples.png`.",
        "",
    ]
    (adapter_dir / "README.md").write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/tiny-bagel-digits"),
                        help="The digits BAGEL to adapt (a pipeline folder).")
    parser.add_argument("--adapter_dir", type=Path, default=Path("outputs/digits-grpo/adapter"),
                        help="Where the adapter, setting.json and README.md go.")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/digits-grpo"), help="Trainer's output.")
    parser.add_argument("--time_budget_minutes", type=positive_float, default=29.0,
                        help="Wall-time guard of the training: it stops cleanly when spent (before --max_steps on a slow "
                             "machine; the run then differs from a seeded rerun on a faster one).")
    parser.add_argument("--max_steps", type=positive_int, default=600, help="Optimiser steps.")
    parser.add_argument("--prompts_per_step", type=positive_int, default=10, help="Prompts per optimiser step.")
    parser.add_argument("--num_generations", type=positive_int, default=8,
                        help="Images per prompt: the group whose rewards are normalised together.")
    parser.add_argument("--steps", type=positive_int, default=16, help="Sampling steps (training and setting).")
    parser.add_argument("--cfg_text_scale", type=float, default=1.0, help="Guidance of the setting (1: none).")
    parser.add_argument("--sde_noise_level", type=positive_float, default=0.7, help="Noise level of the SDE sampler.")
    parser.add_argument("--sde_window_size", type=positive_int, default=None,
                        help="Consecutive SDE steps trained on (default: every step).")
    parser.add_argument("--learning_rate", type=positive_float, default=1e-3, help="AdamW's, constant.")
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight to the model without the adapter.")
    parser.add_argument("--lora_rank", type=positive_int, default=16, help="LoRA rank on the generation experts.")
    parser.add_argument("--num_iterations", type=positive_int, default=1,
                        help="Optimiser steps per sampled batch (the clipping acts from the second).")
    parser.add_argument("--epsilon", type=positive_float, default=1e-4, help="Clip range of the policy ratio.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the LoRA's start and of the sampling noise.")
    parser.add_argument("--eval_per_digit", type=positive_int, default=100, help="Evaluation images per digit.")
    parser.add_argument("--eval_seed", type=int, default=1000, help="Seed of the held-out evaluation images.")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.checkpoint / "model_index.json").is_file():
        parser.error(f"{args.checkpoint} is not a pipeline folder (no model_index.json).")
    if not args.cfg_text_scale >= 1.0:
        parser.error(f"--cfg_text_scale must be >= 1 (1: no guidance), got {args.cfg_text_scale}.")
    if args.sde_window_size is not None and args.sde_window_size > args.steps:
        parser.error(f"--sde_window_size ({args.sde_window_size}) exceeds --steps ({args.steps}).")
    try:  # every training setting checked before any work
        config = BagelGRPOConfig(
            output_dir=str(args.output_dir), per_device_train_batch_size=args.prompts_per_step,
            num_generations=args.num_generations, num_inference_steps=args.steps, sde_window_size=args.sde_window_size,
            sde_noise_level=args.sde_noise_level, cfg_text_scale=args.cfg_text_scale,
            timestep_shift=DEFAULT_TIMESTEP_SHIFT,
            beta=args.beta, epsilon=args.epsilon, num_iterations=args.num_iterations, learning_rate=args.learning_rate,
            lr_scheduler_type="constant", warmup_steps=0, max_steps=args.max_steps, logging_steps=5, save_strategy="no",
            report_to=[], seed=args.seed, use_cpu=True, dataloader_num_workers=0, weight_decay=0.0,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    args.adapter_dir.mkdir(parents=True, exist_ok=True)

    split = split_digits(seed=0)  # the shipped model's split
    reward_judge = DigitClassifier(split.train_images, split.train_labels, probability=True)
    eval_judge = DigitClassifier(split.held_out_images, split.held_out_labels)
    setting = {
        "num_inference_steps": args.steps, "cfg_text_scale": args.cfg_text_scale, "timestep_shift": DEFAULT_TIMESTEP_SHIFT
    }  # fmt: skip

    pipe = BagelPipeline.from_pretrained(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    before = evaluate(pipe, eval_judge, setting, args.eval_per_digit, args.eval_seed)
    default = evaluate(pipe, eval_judge, {"num_inference_steps": 16}, args.eval_per_digit, args.eval_seed)
    print(f"before: {before['accuracy']:.1%} in this setting, {default['accuracy']:.1%} with default guidance")

    budget = TimeBudgetCallback(args.time_budget_minutes)
    trainer = BagelGRPOTrainer(
        pipe, DigitProbabilityReward(reward_judge), config,
        train_dataset=prompt_dataset(repeats=max(1, args.max_steps * args.prompts_per_step // 10 + 1)),
        lora_config=bagel_lora_config(r=args.lora_rank), callbacks=[budget],
    )  # fmt: skip
    wall, cpu = time.monotonic(), time.process_time()
    trainer.train()
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    trainer.model.save_pretrained(args.adapter_dir)

    after = evaluate(pipe, eval_judge, setting, args.eval_per_digit, args.eval_seed)
    print(f"after: {after['accuracy']:.1%} in this setting (was {before['accuracy']:.1%}; default guidance "
          f"{default['accuracy']:.1%})")
    for digit in range(10):
        print(f"  {DIGIT_NAMES[digit]:>5}: {before['per_digit'][str(digit)]:.0%} -> {after['per_digit'][str(digit)]:.0%}")

    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    window = max(1, min(4, len(rewards) // 2))
    grid_rows = [before["result"].outputs[d][:6] + after["result"].outputs[d][:6] for d in range(10)]
    image_grid(grid_rows).save(args.adapter_dir / "samples.png")
    numbers = {
        "setting": setting,
        "per_digit": args.eval_per_digit,
        "real_digits_spread": within_digit_spread(
            {d: split.held_out_images[split.held_out_labels == d] for d in range(10)}
        ),
        "eval_seed": args.eval_seed,
        **{name: {k: v for k, v in entry.items() if k != "result"}
           for name, entry in (("without_adapter", before), ("with_adapter", after), ("default_guidance", default))},
        "training": {
            "steps": trainer.state.global_step, "prompts_per_step": args.prompts_per_step,
            "num_generations": args.num_generations, "num_inference_steps": args.steps,
            "sde_noise_level": args.sde_noise_level, "sde_window_size": args.sde_window_size,
            "lora_rank": args.lora_rank, "learning_rate": args.learning_rate, "beta": args.beta, "seed": args.seed,
            "train_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "threads": torch.get_num_threads(),
            "first_reward": float(np.mean(rewards[:window])) if rewards else float("nan"),
            "last_reward": float(np.mean(rewards[-window:])) if rewards else float("nan"),
            "reward_window": window * 5, "reward_log": rewards,
        },
    }  # fmt: skip
    (args.adapter_dir / "setting.json").write_text(json.dumps(setting, indent=2) + "\n")
    (args.adapter_dir / "eval.json").write_text(json.dumps(numbers, indent=2) + "\n")
    write_readme(args.adapter_dir, numbers, shlex.join(["python", "examples/train_grpo.py", *sys.argv[1:]]))
    print(f"wrote {args.adapter_dir}")


if __name__ == "__main__":
    main()
