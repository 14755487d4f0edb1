"""
The `bagel` command: convert an original BAGEL release, generate and edit images, chat about images (streamed), and
push a converted folder to the Hugging Face Hub.

    bagel convert  --input_dir BAGEL-7B-MoT --output_dir bagel-7b-hf
    bagel generate --checkpoint bagel-7b-hf --prompt "A red cat on a wooden table" --output cat.png
    bagel edit     --checkpoint bagel-7b-hf --image cat.png --prompt "Make the cat blue" --output blue.png
    bagel chat     --checkpoint bagel-7b-hf --image cat.png --prompt "What is in this image?"   (or --video clip.mp4)
    bagel push     --folder bagel-7b-hf --repo_id your-name/bagel-7b-hf
    bagel eval     geneval --checkpoint bagel-7b-hf --data evaluation_metadata.jsonl --output_dir geneval_out
    bagel serve    --checkpoint bagel-7b-hf --port 8000   # OpenAI-compatible server (pip install bagel-hf[serve])

`bagel SUBCOMMAND --help` lists every flag of a subcommand with its default.
"""
# This module's docstring is `bagel --help`'s text; it holds the flags of every subcommand (the runners are in
# `cli.py`).

from __future__ import annotations

import argparse
from pathlib import Path

# Only light modules here: torch, transformers and diffusers load once the arguments are read, so that `--help` and
# bad flags answer at once.
from .defaults import (
    CFG_RENORM_TYPES,
    DEFAULT_CFG_RENORM_MIN,
    DEFAULT_MAX_THINK_TOKENS,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_THINK_TEMPERATURE,
    DEFAULT_TIMESTEP_SHIFT,
    EDIT_PRESET,
    MAX_GUIDANCE_SCALE,
    TEXT_TO_IMAGE_PRESET,
)


__all__ = ["DTYPES", "PIPELINE_FLAGS", "build_parser"]

DTYPES = ("float32", "bfloat16", "float16")


# -- argument types ----------------------------------------------------------------------------------------------------


def _bounded_int(text: str, low: int, what: str) -> int:
    """`text` as an integer >= `low`; `what` names it in the error ("a positive integer", "a seed >= 0")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _bounded_int(text, 1, "a positive integer")


def _scale(text: str) -> float:
    """A guidance scale of `bagel eval`, checked against the pipeline's bounds before anything is planned or written
    (a benchmark folder records its settings)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 1.0 <= value <= MAX_GUIDANCE_SCALE:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in [1.0, {MAX_GUIDANCE_SCALE}], got {text!r}")
    return value


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return path


def _seed(text: str) -> int:
    return _bounded_int(text, 0, "an integer seed >= 0")


# -- parser --------------------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows `(default: ...)` only where there is a default worth showing (not for required flags, None or switches)."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, []) or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _add_model_flags(parser, lora: bool = False):
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", required=True, type=Path, help="Converted BAGEL folder (from `bagel convert`).")
    group.add_argument("--device", default=None, help="Device to run on (default: cuda when available, else cpu).")
    group.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="Weights dtype; auto = bfloat16 on CUDA, else float32."
    )
    if lora:
        group.add_argument(
            "--lora", default=None, metavar="ADAPTER",
            help="A LoRA adapter of the generation experts (a folder written by peft, e.g. by examples/train.py or "
                 "examples/train_grpo.py), loaded onto the model.",
        )  # fmt: skip


def _add_image_flags(parser, preset: dict, size_default: str, output_default: str):
    """The pipeline's arguments as flags. A flag left out is not passed: the pipeline's own default applies (shown
    from its presets where they differ between generating and editing), and the pipeline checks every value."""
    parser.add_argument(
        "--output", type=Path, default=Path(output_default),
        help="PNG path; with several images, _0, _1, ... are added before the suffix.",
    )  # fmt: skip
    group = parser.add_argument_group("sampling")
    group.add_argument("--height", type=int, default=None, help=f"Output height, a multiple of 16 (default: {size_default}).")
    group.add_argument("--width", type=int, default=None, help="Output width (same rules as --height).")
    group.add_argument(
        "--num_inference_steps", "--steps", type=int, default=None,
        help=f"Euler steps, the original's num_timesteps minus one (default: {DEFAULT_NUM_INFERENCE_STEPS}).",
    )  # fmt: skip
    group.add_argument(
        "--timestep_shift", type=float, default=None, help=f"Schedule shift s in st/(1+(s-1)t) (default: {DEFAULT_TIMESTEP_SHIFT})."
    )
    group.add_argument(
        "--cfg_text_scale", type=float, default=None,
        help=f"Text guidance scale, 1 disables it (default: {preset['cfg_text_scale']}).",
    )  # fmt: skip
    group.add_argument(
        "--cfg_img_scale", type=float, default=None,
        help=f"Image guidance scale, 1 disables it; only applied while text guidance is on (default: "
             f"{preset['cfg_img_scale']}).",
    )  # fmt: skip
    group.add_argument(
        "--cfg_interval", type=float, nargs=2, metavar=("START", "END"), default=None,
        help="Guidance is applied at flow times START < t <= END (t runs from 1, noise, to 0, image) (default: "
             f"{list(preset['cfg_interval'])}).",
    )  # fmt: skip
    group.add_argument(
        "--cfg_renorm_type", choices=CFG_RENORM_TYPES, default=None,
        help=f"How the guided velocity is renormalised to the conditional one's norm (default: "
             f"{preset['cfg_renorm_type']}).",
    )  # fmt: skip
    group.add_argument(
        "--cfg_renorm_min", type=float, default=None,
        help=f"Lower clamp of the renormalisation factor, 1 disables it (default: {DEFAULT_CFG_RENORM_MIN}).",
    )  # fmt: skip
    group.add_argument("--seed", type=_seed, default=0, help="Seed of the initial noise (and of thinking's sampling).")
    group.add_argument("--num_images", type=_positive_int, default=1, help="Images per prompt.")
    group.add_argument(
        "--sample_posterior", action="store_true", help="Sample the VAE posterior of input images instead of its mean."
    )
    group.add_argument(
        "--parallel", choices=["cfg", "tp"], default=None,
        help="Run on the processes of `torchrun --nproc_per_node N --no-python bagel ...` (gloo on CPU, nccl on CUDA, "
             "one GPU per process); rank 0 writes the images. cfg: each process runs its guidance branches (N = 2 or "
             "3). tp: tensor parallelism, each process holds 1/N of the decoder's attention and MLP weights (N must "
             "divide the key/value heads: 1, 2 or 4 for the 7B).",
    )  # fmt: skip
    think = parser.add_argument_group("thinking")
    think.add_argument("--think", action="store_true", help="Let BAGEL write a plan first, then draw from it.")
    think.add_argument("--max_think_tokens", type=int, default=None,
                       help=f"Longest plan, in tokens (default: {DEFAULT_MAX_THINK_TOKENS}, or what the model's positions "
                       "leave).")
    think.add_argument("--think_do_sample", action="store_true", help="Sample the plan instead of greedy decoding.")
    think.add_argument(
        "--think_temperature", type=float, default=None, help=f"Sampling temperature of the plan (default: {DEFAULT_THINK_TEMPERATURE})."
    )


# The pipeline arguments of `bagel generate` / `bagel edit` whose flags default to None: a flag left out is not
# passed, so the pipeline's own default applies.
PIPELINE_FLAGS = ("height", "width", "num_inference_steps", "timestep_shift", "cfg_text_scale", "cfg_img_scale",
                   "cfg_interval", "cfg_renorm_type", "cfg_renorm_min", "max_think_tokens", "think_temperature")


def _add_eval_parser(commands, full: bool):
    """The `eval` subcommand. Its benchmarks come from the evaluation package, which loads torch: only when `eval` is
    the subcommand asked for (`full`); otherwise the entry only lists the subcommand."""
    help_text = "Generate a benchmark's images in its official layout."
    if not full:
        commands.add_parser("eval", help=help_text, add_help=False)
        return
    from .evaluation import BENCHMARKS

    evaluate = commands.add_parser(
        "eval", formatter_class=_HelpFormatter, help=help_text,
        description="Seeded, batched, resumable generation for an image benchmark, written where its official\n"
                    "scorer reads it. Defaults are the original BAGEL evaluation's settings (docs/evaluation.md);\n"
                    "a rerun skips finished items. Benchmarks: "
                    + "; ".join(f"{b.name}: --data {b.data_help}" for b in BENCHMARKS.values()),
    )  # fmt: skip
    evaluate.add_argument("benchmark", choices=sorted(BENCHMARKS), help="Which benchmark.")
    _add_model_flags(evaluate)
    evaluate.add_argument("--data", required=True, type=Path, help="The benchmark's input file (see above).")
    evaluate.add_argument("--image_root", type=Path, default=None, help="Folder of the input images (editing).")
    evaluate.add_argument("--output_dir", required=True, type=Path, help="Where the outputs go (and are resumed).")
    evaluate.add_argument("--seed", type=_seed, default=0, help="Run seed; each sample's seed derives from it and its index.")
    evaluate.add_argument("--batch_size", type=_positive_int, default=1, help="Entries per pipeline call.")
    evaluate.add_argument(
        "--n_samples", type=_positive_int, default=None, help="Images per entry (default: the benchmark's, 4 for GenEval)."
    )
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="Only the first N entries.")
    evaluate.add_argument("--think", action="store_true", help="Thinking mode (writes each plan beside its image).")
    evaluate.add_argument("--max_think_tokens", type=_positive_int, default=None, help="Longest plan, in tokens.")
    evaluate.add_argument("--think_do_sample", action="store_true", help="Sample the plan (seeded) instead of greedy.")
    evaluate.add_argument(
        "--num_inference_steps", "--steps", type=_positive_int, default=None,
        help="Euler steps (default: the benchmark's, 49 = the original's 50 timesteps).",
    )  # fmt: skip
    evaluate.add_argument("--resolution", type=_positive_int, default=None, help="Text-to-image output side.")
    evaluate.add_argument("--cfg_text_scale", type=_scale, default=None, help="Override the text guidance scale.")
    evaluate.add_argument("--cfg_img_scale", type=_scale, default=None, help="Override the image guidance scale.")
    evaluate.add_argument("--skip_grid", action="store_true", help="GenEval: do not write grid.png.")
    evaluate.add_argument(
        "--overwrite", action="store_true",
        help="Let a run with other settings than the folder's record (bagel_eval_settings.json) delete that run's "
             "outputs and draw them again (refused otherwise).",
    )  # fmt: skip
    evaluate.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")


def _add_serve_parser(commands):
    serve = commands.add_parser(
        "serve", formatter_class=_HelpFormatter, help="OpenAI-compatible HTTP server with request batching.",
        description="Serve a converted BAGEL with OpenAI's API: /v1/chat/completions (images as base64 data URLs,\n"
                    "streamed with stream=true), /v1/images/generations, /v1/images/edits, /v1/models, /health,\n"
                    "/metrics. Concurrent image requests with the same size and settings share one pipeline call.\n"
                    "Needs the serve extra: pip install bagel-hf[serve].",
    )  # fmt: skip
    _add_model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="Address to bind; anything but loopback deserves --api_key.")
    serve.add_argument("--port", type=int, default=8000, help="TCP port.")
    serve.add_argument("--model_name", default=None, help="Model id of /v1/models (default: the checkpoint's folder name).")
    serve.add_argument(
        "--max_batch_size", type=int, default=8, help="Most images of one batched pipeline call (1: no batching)."
    )
    serve.add_argument("--max_queue", type=int, default=64, help="Requests allowed to wait; more get HTTP 429.")
    serve.add_argument("--batch_wait_ms", type=float, default=10.0, help="How long a request waits for companions.")
    serve.add_argument("--api_key", default=None, help="Require `Authorization: Bearer KEY` (or set BAGEL_API_KEY).")
    serve.add_argument(
        "--request_timeout", type=float, default=600.0, help="Seconds a request may wait and run (then 504)."
    )
    serve.add_argument(
        "--allow_remote_images", action="store_true", help="Fetch http(s) image URLs of chat messages (refused otherwise)."
    )
    serve.add_argument(
        "--image_dir", type=Path, default=None, help="Folder for response_format=url images (that format needs it)."
    )
    serve.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level.")  # fmt: skip


def build_parser(eval_benchmarks: bool = True) -> argparse.ArgumentParser:
    """The `bagel` argument parser with its subcommands (`eval_benchmarks=False`: the `eval` entry without its flags,
    which need the evaluation package)."""
    parser = argparse.ArgumentParser(prog="bagel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    commands.add_parser(
        "convert", add_help=False,
        help="Convert an original BAGEL release folder into the transformers/diffusers layout (`bagel convert -h`).",
    )  # fmt: skip

    generate = commands.add_parser(
        "generate", formatter_class=_HelpFormatter, help="Text-to-image.",
        description="Generate images from a text prompt and write them as PNG files.",
    )  # fmt: skip
    _add_model_flags(generate, lora=True)
    generate.add_argument("--prompt", required=True, help="What to draw.")
    _add_image_flags(generate, TEXT_TO_IMAGE_PRESET, "1024, capped by the model's largest image side", "bagel_generate.png")

    edit = commands.add_parser(
        "edit", formatter_class=_HelpFormatter, help="Edit images by an instruction.",
        description="Edit one image (or combine several) following an instruction, and write the result as PNG.",
    )  # fmt: skip
    _add_model_flags(edit, lora=True)
    edit.add_argument(
        "--image", type=_existing_file, action="append", required=True,
        help="Input image file; repeat the flag for several images (they come before the prompt, in order).",
    )  # fmt: skip
    edit.add_argument("--prompt", required=True, help="The editing instruction.")
    _add_image_flags(edit, EDIT_PRESET, "the last input image's size after BAGEL's VAE resize", "bagel_edit.png")

    chat = commands.add_parser(
        "chat", formatter_class=_HelpFormatter, help="Ask about images; the answer is streamed.",
        description="Image understanding. With --prompt, answers once; without it, reads one question per line\n"
                    "from standard input and keeps the conversation (an empty line or end of input stops).",
    )  # fmt: skip
    _add_model_flags(chat)
    chat.add_argument(
        "--image", type=_existing_file, action="append", default=[],
        help="Image file to ask about; repeat the flag for several images.",
    )  # fmt: skip
    chat.add_argument(
        "--video", type=Path, default=None,
        help="Video file (PyAV: the `video` extra) or folder of frames to ask about; its frames come after the images.",
    )  # fmt: skip
    chat.add_argument("--num_frames", type=int, default=None, help="Frames taken from --video (default 8).")
    chat.add_argument("--prompt", default=None, help="The question; omit it to chat on standard input.")
    chat.add_argument("--think", action="store_true", help="Let BAGEL reason inside <think> tags before answering.")
    chat.add_argument("--max_new_tokens", type=int, default=None,
                      help="Longest answer, in tokens (default: 512, or what the model's positions leave).")
    chat.add_argument("--do_sample", action="store_true", help="Sample the answer instead of greedy decoding.")
    chat.add_argument("--temperature", type=float, default=None,
                      help="Sampling temperature (default: generate_answer's).")
    chat.add_argument("--seed", type=_seed, default=0, help="Seed for sampling.")

    _add_eval_parser(commands, full=eval_benchmarks)
    _add_serve_parser(commands)

    push = commands.add_parser(
        "push", formatter_class=_HelpFormatter, help="Upload a converted folder to the Hugging Face Hub.",
        description="Create (if needed) a Hub model repository and upload a converted folder to it. The folder's "
                    "README.md model card is rewritten so its usage snippets name the repository. Needs a token "
                    "(`hf auth login` or --token).",
    )  # fmt: skip
    push.add_argument("--folder", required=True, type=Path, help="Converted BAGEL folder (from `bagel convert`).")
    push.add_argument("--repo_id", required=True, help="Target repository, e.g. your-name/bagel-7b-hf.")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--token", default=None, help="Hub token (default: the one saved by `hf auth login`).")
    push.add_argument("--commit_message", default="Upload BAGEL converted with bagel-hf", help="Commit message.")
    return parser
