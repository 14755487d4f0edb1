"""
Fine-tune BAGEL with the Hugging Face Trainer: full fine-tuning or LoRA on the generation experts (--lora), on
text-to-image, editing, understanding or interleaved data read with `datasets`.

    python examples/train.py --checkpoint CONVERTED_DIR --data train.jsonl --image_dir images/ --task text_to_image \\
        --output_dir runs/t2i --max_steps 10000 --bf16 --activation_checkpointing

Data: a JSON lines / JSON / CSV / parquet file, or a folder for the `imagefolder` builder (images plus a
metadata.jsonl). Columns per task (rename with --columns role=column):
  text_to_image  prompt, image                    edit           source (one or a list), instruction, target
  understanding  image (optional), question, answer   interleaved  segments (the sample format)
Images are paths (relative to --image_dir), bytes, or datasets Image values. Without --data a small drawn synthetic
text-to-image set is used; without --checkpoint the tiny random-weight test model (converted on first use).

Several tasks at once from a data config (weighted sources mixed reproducibly and packed into the same batches;
see transformers_bagel.training.mixture for the keys; an original BAGEL data YAML with dataset groups is converted).
Weights are relative; a source of weight 0 is left out with a warning; a weight so small that one epoch would run
past 100x the rows of all sources is refused (see transformers_bagel.training.mixture, "Weights"). The data config
and the data are read before the model loads, so a bad file fails at once, naming the file and line:

    python examples/train.py --checkpoint CONVERTED_DIR --dataset_config mix.yaml --output_dir runs/mix

    # mix.yaml
    sources:
      - {name: t2i, task: text_to_image, data: t2i.parquet, weight: 1.0}
      - {name: vqa, task: understanding, data: vqa.jsonl, image_dir: images/, weight: 1.0}

Logs carry ce_loss, mse_loss, tokens_per_second and, given --peak_tflops or on a known GPU, mfu.

Several processes or machines with FSDP2 (decoder and ViT layers sharded, as the original; sharded checkpoints;
the weights read once per machine), on GPUs or CPUs (see the README, "Training on several processes or machines"):

    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/train.py --checkpoint BAGEL-7B-MoT-hf \
        --data train.parquet --task edit --max_tokens 16384 --output_dir runs/edit
    torchrun --nproc_per_node 8 examples/train.py ... --fsdp --bf16        # FSDP2 from --fsdp instead of a config

(--fsdp sets `fsdp=True` with `fsdp_config=bagel_fsdp_config()`, full-state-dict checkpoints. Resume with
--resume_from_checkpoint (a checkpoint folder, or "last").) A LoRA run saves a standard PEFT adapter in
OUTPUT_DIR/final; load it with `transformers_bagel.training.load_bagel_lora(pipe, path)` or
`PeftModel.from_pretrained(model, path)`. A full run saves the model there (and EMA weights in checkpoints).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
TASKS = ("text_to_image", "edit", "understanding", "interleaved")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows each flag's default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    add = parser.add_argument
    # model and data
    add("--checkpoint", type=Path, default=None, help="Converted BAGEL folder (model/, processor/, vae/). Default: tiny test model.")
    add("--data", default=None, help="Data file (.jsonl/.json/.csv/.parquet) or imagefolder directory. Default: synthetic.")
    add("--task", choices=TASKS, default="text_to_image", help="How rows become samples.")
    add("--image_dir", type=Path, default=None, help="Base folder of relative image paths in the data.")
    add("--columns", nargs="*", default=[], metavar="ROLE=COLUMN", help="Column renames, e.g. prompt=caption.")
    add("--dataset_config", type=Path, default=None,
        help="Data config YAML/JSON of several weighted sources (instead of --data/--task); the original's format too.")
    add("--stopping_strategy", choices=("all_exhausted", "first_exhausted", "all_exhausted_without_replacement"),
        default="all_exhausted", help="When the mixture of --dataset_config ends (unless the config sets it).")
    add("--output_dir", type=Path, default=ROOT / "outputs" / "train", help="Checkpoints and the final model go here.")
    # what trains
    add("--lora", action="store_true", help="Train LoRA adapters on the generation experts only (else full fine-tune).")
    add("--lora_rank", type=int, default=16, help="LoRA rank.")
    add("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank).")
    add("--lora_latent_projections", action="store_true", help="Also put LoRA on vae2llm and llm2vae.")
    add("--freeze_vit", action="store_true", help="Freeze the SigLIP encoder (full fine-tune).")
    add("--freeze_und", action="store_true", help="Freeze the understanding expert (full fine-tune).")
    add("--freeze_llm", action="store_true", help="Freeze the whole language model (full fine-tune).")
    # optimisation (the original's defaults)
    add("--max_steps", type=int, default=1000, help="Optimiser steps.")
    add("--learning_rate", type=float, default=1e-4, help="Peak learning rate.")
    add("--warmup_steps", type=int, default=None,
        help="Linear warm-up steps (default: the original's 2000, capped at a tenth of --max_steps).")
    add("--lr_scheduler", choices=("constant", "cosine"), default="constant", help="Schedule after warm-up.")
    add("--min_lr", type=float, default=1e-7, help="Final learning rate of the cosine schedule.")
    add("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimiser step.")
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    add("--ema", type=float, default=0.9999, help="EMA decay saved with checkpoints (0 disables).")
    add("--ce_weight", type=float, default=1.0, help="Weight of the text cross-entropy.")
    add("--mse_weight", type=float, default=1.0, help="Weight of the flow-matching MSE.")
    add("--timestep_shift", type=float, default=None, help="Training timestep shift (default: the model config's).")
    # packing and data augmentation
    add("--max_tokens", type=int, default=16384, help="Token budget of one packed batch.")
    add("--text_dropout", type=float, default=0.1, help="Text condition dropout (CFG training).")
    add("--vit_dropout", type=float, default=0.3, help="ViT condition dropout.")
    add("--vae_dropout", type=float, default=0.3, help="Clean VAE image condition dropout.")
    add("--cache_latents", action="store_true", help="Encode images with the VAE once, before training (datasets.map).")
    add("--vae_mean", action="store_true", help="Use the VAE posterior mean instead of a sample.")
    # scale-out and bookkeeping
    add("--bf16", action="store_true", help="bf16 mixed precision.")
    add("--activation_checkpointing", "--gradient_checkpointing", action="store_true",
        help="Recompute decoder / ViT layer activations in the backward pass to save memory.")  # fmt: skip
    add("--fsdp", action="store_true",
        help="FSDP2 over the decoder and ViT layers (under torchrun / accelerate launch; or use the "
             "examples/accelerate/fsdp2.yaml config).")  # fmt: skip
    add("--use_cpu", action="store_true", help="Train on the CPU even when an accelerator is present.")
    add("--save_steps", type=int, default=500, help="Checkpoint every N steps.")
    add("--logging_steps", type=int, default=10, help="Log every N steps.")
    add("--resume_from_checkpoint", default=None, help='Checkpoint folder to resume from, or "last".')
    add("--seed", type=int, default=0, help="Seed of initialisation, sampling order and condition dropout.")
    add("--peak_tflops", type=float, default=None,
        help="Peak TFLOP/s of one device for the logged mfu (default: known GPUs' dense bf16 peak; none on CPU).")
    return parser


def synthetic_rows(count: int = 16):
    """Drawn coloured shapes with matching captions: a small text-to-image set that needs no files."""
    import datasets
    import PIL.Image
    import PIL.ImageDraw

    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
    rows = {"prompt": [], "image": []}
    for index in range(count):
        name, color = list(colors.items())[index % len(colors)]
        shape = "circle" if index % 2 else "square"
        image = PIL.Image.new("RGB", (64, 64), (255, 255, 255))
        draw = PIL.ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)((12, 12, 52, 52), fill=color)
        rows["prompt"].append(f"a {name} {shape}")
        rows["image"].append(image)
    return datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"prompt": datasets.Value("string"), "image": datasets.Image()}))  # fmt: skip


def load_rows(data: str):
    """The rows of --data; a file that does not read (not UTF-8, a broken JSON line, no rows, ...) is named with its
    line."""
    from transformers_bagel.training import load_data_rows

    path = Path(data)
    if not path.exists():
        raise SystemExit(f"--data {data}: no such file or folder.")
    if path.is_dir():
        return load_data_rows("imagefolder", [str(path)], where=f"--data {data}")
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
    if builder is None:
        raise SystemExit(f"--data {data}: expected a .jsonl/.json/.csv/.parquet file or an imagefolder directory.")
    return load_data_rows(builder, [str(path)], where=f"--data {data}")


def parse_columns(pairs) -> dict:
    columns = {}
    for pair in pairs:
        role, sep, column = pair.partition("=")
        if not sep or not role or not column:
            raise SystemExit(f"--columns takes ROLE=COLUMN pairs, got {pair!r}.")
        columns[role] = column
    return columns


# Flags that must be positive (counts, sizes, rates) and those that are probabilities in [0, 1].
_POSITIVE_FLAGS = ("max_steps", "lora_rank", "lora_alpha", "learning_rate", "gradient_accumulation_steps",
                   "max_grad_norm", "max_tokens", "timestep_shift", "save_steps", "logging_steps")  # fmt: skip
_PROBABILITY_FLAGS = ("text_dropout", "vit_dropout", "vae_dropout")


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses a zero, negative or non-finite number where the run needs a positive one, naming the flag, before
    anything loads."""
    import math

    for name in _POSITIVE_FLAGS:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{name} must be a positive number, got {value}.")
    for name in _PROBABILITY_FLAGS:
        value = getattr(args, name)
        if not 0 <= value <= 1:
            parser.error(f"--{name} is a probability: it must be in [0, 1], got {value}.")
    if not 0 <= args.ema < 1:
        parser.error(f"--ema is a decay: it must be in [0, 1) (0 disables it), got {args.ema}.")
    if args.min_lr < 0 or not math.isfinite(args.min_lr):
        parser.error(f"--min_lr must be a finite number >= 0, got {args.min_lr}.")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_numbers(parser, args)
    if args.warmup_steps is None:
        args.warmup_steps = min(2000, args.max_steps // 10)
    elif not 0 <= args.warmup_steps <= args.max_steps:
        parser.error(
            f"--warmup_steps {args.warmup_steps} must be in [0, --max_steps {args.max_steps}]: a longer warm-up keeps "
            "the learning rate near 0 for the whole run."
        )
    if args.dataset_config is not None:
        if args.data is not None or args.columns or args.cache_latents:
            parser.error("--dataset_config names its data, columns and tasks itself: drop --data / --columns / "
                         "--cache_latents.")  # fmt: skip
        if not args.dataset_config.is_file():
            parser.error(f"--dataset_config {args.dataset_config}: no such file.")
    if args.image_dir is not None and not args.image_dir.is_dir():
        parser.error(f"--image_dir {args.image_dir}: no such folder.")
    if args.cache_latents and args.task not in ("text_to_image", "edit"):
        parser.error("--cache_latents applies to text_to_image and edit data.")
    if args.lora and (args.freeze_vit or args.freeze_und or args.freeze_llm):
        parser.error("--freeze_* apply to full fine-tuning; --lora trains the adapters only.")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak_tflops must be positive, got {args.peak_tflops}.")
    if args.bf16 and (args.use_cpu or not torch.cuda.is_available() or not torch.cuda.is_bf16_supported()):
        parser.error("--bf16 needs a CUDA GPU with bfloat16 support (none is used here); drop --bf16 to train in float32.")
    return args


def load_mixture(args, image_processor):
    """The samples of --dataset_config: our format, or the original's dataset groups converted first."""
    from transformers_bagel.training import BagelMixtureDataset, read_data_config

    config = read_data_config(args.dataset_config)
    mixture = BagelMixtureDataset(config, image_processor, seed=args.seed, stopping_strategy=args.stopping_strategy,
                                  base_dir=args.dataset_config.parent)  # fmt: skip
    counts = mixture.source_counts()
    print(f"mixture of {len(mixture)} samples per epoch: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return mixture


def main(argv=None):
    args = parse_args(argv)
    from diffusers import AutoencoderKL

    from transformers_bagel import BagelForConditionalGeneration, BagelProcessor
    from transformers_bagel.training import (
        BagelDataCollator,
        BagelEMACallback,
        BagelPackedDataset,
        BagelSampleDataset,
        BagelTrainer,
        bagel_fsdp_config,
        bagel_training_arguments,
        cache_vae_latents,
        freeze_modules,
        get_bagel_lora_model,
    )

    checkpoint = args.checkpoint
    if checkpoint is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quickstart import default_checkpoint

        checkpoint = default_checkpoint(ROOT / "outputs")
    columns = parse_columns(args.columns)
    processor = BagelProcessor.from_pretrained(checkpoint / "processor")
    # The data before the model: a bad data config or data file (syntax, encoding, weights, sizes) fails at once.
    if args.dataset_config is not None:
        samples = load_mixture(args, processor.image_processor)
        rows = samples
    else:
        rows = synthetic_rows() if args.data is None else load_rows(args.data)
    extra = {}
    if args.lr_scheduler == "cosine":
        extra = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": args.min_lr}}
    if args.fsdp:
        extra.update(fsdp=True, fsdp_config=bagel_fsdp_config(args.activation_checkpointing))
    training_args = bagel_training_arguments(
        str(args.output_dir),
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        activation_checkpointing=args.activation_checkpointing and not args.fsdp,  # FSDP checkpoints its units
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        use_cpu=args.use_cpu or torch.accelerator.current_accelerator() is None,  # gloo processes on a CPU machine
        dataloader_num_workers=0,
        **extra,
    )
    torch.manual_seed(args.seed)
    # The training arguments set up the process group first: under an FSDP launch with cpu_ram_efficient_loading
    # (examples/accelerate/fsdp2.yaml) only local rank 0 then reads the weights; the others load on `meta` and
    # receive their shards from it when the trainer shards the model.
    model = BagelForConditionalGeneration.from_pretrained(checkpoint / "model", dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(checkpoint / "vae")
    if args.timestep_shift is not None:
        model.config.timestep_shift = args.timestep_shift

    if args.cache_latents:
        names = {"text_to_image": ["image"], "edit": ["source", "target"]}[args.task]
        rows = cache_vae_latents(rows, vae, processor.image_processor, [columns.get(n, n) for n in names], args.image_dir)
    collator = BagelDataCollator(
        processor,
        model.config,
        max_tokens=args.max_tokens,
        text_cond_dropout_prob=args.text_dropout,
        vit_cond_dropout_prob=args.vit_dropout,
        vae_cond_dropout_prob=args.vae_dropout,
        seed=args.seed,
    )
    if args.dataset_config is None:
        samples = BagelSampleDataset(rows, args.task, columns, args.image_dir)
    train_dataset = BagelPackedDataset(samples, collator)
    print(f"{len(rows)} {'samples' if args.dataset_config is not None else 'rows'} -> {len(train_dataset)} packed batches of <= {args.max_tokens} tokens")

    if args.lora:
        model = get_bagel_lora_model(
            model, r=args.lora_rank, lora_alpha=args.lora_alpha, include_latent_projections=args.lora_latent_projections
        )
    else:
        freeze_modules(model, freeze_vit=args.freeze_vit, freeze_und=args.freeze_und, freeze_llm=args.freeze_llm)

    callbacks = [BagelEMACallback(args.ema)] if args.ema > 0 else []
    trainer = BagelTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        vae=vae,
        sample_posterior=not args.vae_mean,
        ce_weight=args.ce_weight,
        mse_weight=args.mse_weight,
        peak_tflops=args.peak_tflops,
        callbacks=callbacks,
    )
    resume = args.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    final = args.output_dir / "final"
    if args.lora:
        trainer.save_model(str(final))  # a standard PEFT adapter
    elif trainer.is_fsdp_enabled and "SHARDED" in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
        # Trainer.save_model writes no weights for sharded-state-dict FSDP: gather them (every rank takes part).
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
        if trainer.is_world_process_zero():
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(final / "model", state_dict=state_dict)
    else:
        trainer.save_model(str(final / "model"))  # the converted layout: loads with BagelPipeline.from_pretrained
    if trainer.is_world_process_zero():
        if not args.lora:
            from diffusers_bagel.pipeline_folder import write_pipeline_folder_files

            processor.save_pretrained(final / "processor")
            vae.save_pretrained(final / "vae")
            if (checkpoint / "scheduler").is_dir():
                shutil.copytree(checkpoint / "scheduler", final / "scheduler", dirs_exist_ok=True)
            # model_index.json, pipeline_bagel.py and the Auto pointers: the folder loads by every route (BagelPipeline,
            # DiffusionPipeline with trust_remote_code, `bagel push`) as a converted one does.
            write_pipeline_folder_files(final)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        summary = {"steps": trainer.state.global_step, "train_loss": result.training_loss, "losses": losses}
        (args.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        # A run shorter than --logging_steps logs no loss: Trainer's mean training loss then stands for it.
        final_loss = losses[-1] if losses else result.training_loss
        print(f"trained {trainer.state.global_step} steps, final loss {final_loss:.4f}")
        print(f"{'LoRA adapter' if args.lora else 'model'}: {final}")

if __name__ == "__main__":
    main()
