"""
Train a tiny BAGEL from scratch on scikit-learn's handwritten digits with this project's training stack, and save it
as a diffusers-layout folder that `BagelPipeline.from_pretrained` loads.

    python examples/train_digits.py --output_dir outputs/digits [--time_budget_minutes 29] [--vae_dir DIR]

What it does:
1. splits the 1,797 digits (64x64 RGB) into train / held-out with a fixed seed;
2. trains the VAE (`examples/train_digits_vae.py`'s recipe) unless `--vae_dir` names one, and caches the posterior
   means of the training images;
3. builds a word-level tokenizer with BAGEL's special tokens and a BAGEL of about two million parameters;
4. trains it with `BagelTrainer` (HF `Trainer`) and `BagelDataCollator` on three task kinds (text-to-image,
   understanding, editing) with condition dropout for classifier-free guidance, EMA weights, a sample grid PNG every
   `--sample_every` steps, and a wall-time budget;
5. writes OUTPUT_DIR/checkpoint (model/, vae/, scheduler/, processor/, model_index.json) with the EMA weights.

Evaluate it with `python examples/eval_digits.py --checkpoint OUTPUT_DIR/checkpoint`.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from digits import (
    TASK_KINDS,
    DigitsTaskDataset,
    SampleGridCallback,
    TimeBudgetCallback,
    build_digits_tokenizer,
    digits_bagel_config,
    digits_image_processor,
    encode_latents,
    split_digits,
    text_to_image_prompt,
    train_digits_vae,
)
from train_digits_vae import add_vae_arguments, positive_float, positive_int, report_vae
from transformers import GenerationConfig, TrainerCallback

from diffusers_bagel import BagelPipeline
from diffusers_bagel.pipeline_folder import write_pipeline_folder_files
from diffusers_bagel.scheduling_flow_match_euler import FlowMatchEulerScheduler
from transformers_bagel.convert_bagel_to_hf import SPECIAL_TOKENS
from transformers_bagel.modeling_bagel import BagelForConditionalGeneration
from transformers_bagel.processing_bagel import BagelProcessor
from transformers_bagel.training.callbacks import BagelEMACallback
from transformers_bagel.training.collator import BagelDataCollator
from transformers_bagel.training.trainer import BagelTrainer, bagel_training_arguments


# The EMA warm-up of the shipped checkpoint's training (diffusers' EMAModel schedule with inv_gamma 1, power 2/3): the
# decay after step t is min(--ema_decay, 1 - t ** (-2/3)), so a run of a few thousand steps forgets the random start.
EMA_WARMUP_POWER = 2 / 3


class WeightedCollator:
    """The project's collator plus the loss weights `BagelForConditionalGeneration.forward` takes."""

    def __init__(self, collator: BagelDataCollator, ce_weight: float, mse_weight: float):
        self.collator, self.ce_weight, self.mse_weight = collator, ce_weight, mse_weight

    def __call__(self, samples):
        return {**self.collator(samples), "ce_weight": self.ce_weight, "mse_weight": self.mse_weight}


class CPUTimeCallback(TrainerCallback):
    """Records wall and process CPU time of the training loop (the machine may be shared: CPU time is the honest
    cost)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.wall, self.cpu = time.monotonic(), time.process_time()

    def on_train_end(self, args, state, control, **kwargs):
        self.wall, self.cpu = time.monotonic() - self.wall, time.process_time() - self.cpu


def save_checkpoint(path: Path, model, vae, processor, dtype: torch.dtype) -> Path:
    """Writes the diffusers layout the converter writes: model/, vae/, scheduler/, processor/, model_index.json."""
    path.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(path / "model")
    model.to(torch.float32)
    vae.save_pretrained(path / "vae")
    FlowMatchEulerScheduler().save_pretrained(path / "scheduler")
    processor.save_pretrained(path / "processor")
    write_pipeline_folder_files(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/digits"))
    parser.add_argument("--time_budget_minutes", type=positive_float, default=29.0,
                        help="Wall-time budget of the whole run (VAE included); training stops cleanly when it is spent.")
    parser.add_argument("--vae_dir", type=Path, default=None, help="A trained digits VAE (default: train one first).")
    parser.add_argument("--vae_budget_fraction", type=float, default=0.2,
                        help="Share of the time budget the VAE may take when it is trained here.")
    parser.add_argument("--max_steps", type=positive_int, default=5000, help="Optimiser steps (cosine schedule).")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="Samples packed into one sequence.")
    parser.add_argument("--learning_rate", type=positive_float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--ce_weight", type=float, default=1.0)
    parser.add_argument("--mse_weight", type=float, default=1.0)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--sample_every", type=positive_int, default=250, help="Write a sample grid every N steps.")
    parser.add_argument("--hidden_size", type=positive_int, default=128)
    parser.add_argument("--num_layers", type=positive_int, default=4)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the saved model.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's).")
    add_vae_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_start, cpu_start = time.monotonic(), time.process_time()
    torch.manual_seed(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    split = split_digits(seed=args.seed)
    tokenizer = build_digits_tokenizer()
    processor = BagelProcessor(image_processor=digits_image_processor(), tokenizer=tokenizer)

    if args.vae_dir is not None:
        vae = AutoencoderKL.from_pretrained(args.vae_dir)
    else:
        vae = train_digits_vae(
            split.train_images,
            max_steps=args.vae_max_steps,
            batch_size=args.vae_batch_size,
            learning_rate=args.vae_learning_rate,
            kl_weight=args.vae_kl_weight,
            seed=args.seed,
            time_budget_minutes=args.time_budget_minutes * args.vae_budget_fraction,
        )
        vae.save_pretrained(args.output_dir / "vae")
        print(f"VAE: {report_vae(vae, split)}")
    vae.eval().requires_grad_(False)
    latents = encode_latents(vae, split.train_images, processor.image_processor)

    token_ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in SPECIAL_TOKENS.items()}
    config = digits_bagel_config(len(tokenizer), token_ids, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers)
    model = BagelForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    print(f"BAGEL: {sum(p.numel() for p in model.parameters()):,} parameters")

    train_dataset = torch.utils.data.ConcatDataset(
        [DigitsTaskDataset(split.train_images, split.train_labels, task, latents, seed=args.seed) for task in TASK_KINDS]
    )
    collator = BagelDataCollator(processor, config)
    remaining = args.time_budget_minutes - (time.monotonic() - run_start) / 60
    if remaining <= 0.5:
        raise SystemExit("The time budget was spent before BAGEL training could start; raise --time_budget_minutes.")

    training_args = bagel_training_arguments(
        str(args.output_dir / "trainer"),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        max_steps=args.max_steps,
        logging_steps=50,
        save_strategy="no",
        use_cpu=True,
        dataloader_pin_memory=False,
        seed=args.seed,
        disable_tqdm=False,
    )
    ema = BagelEMACallback(decay=args.ema_decay, warmup_power=EMA_WARMUP_POWER)
    pipeline_factory = lambda: BagelPipeline(  # noqa: E731
        model=model, vae=vae, scheduler=FlowMatchEulerScheduler(), processor=processor
    )
    grid = SampleGridCallback(
        pipeline_factory,
        [text_to_image_prompt(digit) for digit in range(10)],
        args.output_dir / "samples",
        every_n_steps=args.sample_every,
        images_per_prompt=4,
        ema=ema,
        pipeline_kwargs={"height": 64, "width": 64},
    )
    budget = TimeBudgetCallback(remaining - 0.5)  # keep half a minute to save
    clock = CPUTimeCallback()
    trainer = BagelTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=WeightedCollator(collator, args.ce_weight, args.mse_weight),
        callbacks=[ema, budget, grid, clock],
    )
    result = trainer.train()

    ema.copy_to()
    model.eval()
    checkpoint = save_checkpoint(args.output_dir / "checkpoint", model, vae, processor, getattr(torch, args.dtype))
    summary = {
        "steps": trainer.state.global_step,
        "planned_steps": args.max_steps,
        "stopped_by_time_budget": budget.stopped_at_step is not None,
        "samples_seen": trainer.state.global_step * args.batch_size,
        "epochs_of_each_task": round(trainer.state.global_step * args.batch_size / len(train_dataset), 2),
        "final_train_loss": round(result.training_loss, 4),
        "bagel_training_wall_minutes": round(clock.wall / 60, 2),
        "bagel_training_cpu_minutes": round(clock.cpu / 60, 2),
        "total_wall_minutes": round((time.monotonic() - run_start) / 60, 2),
        "total_cpu_minutes": round((time.process_time() - cpu_start) / 60, 2),
        "torch_threads": torch.get_num_threads(),
        "log": [entry for entry in trainer.state.log_history if "loss" in entry],
        "sample_grids": [str(path) for path in grid.written],
    }
    (args.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=2))
    print(f"checkpoint: {checkpoint}")
    if not math.isfinite(result.training_loss):
        raise SystemExit("Training diverged (non-finite loss).")


if __name__ == "__main__":
    main()
