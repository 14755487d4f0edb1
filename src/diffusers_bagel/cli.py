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

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

# Only light modules here: torch, transformers and diffusers load once the arguments are read, so that `--help` and
# bad flags answer at once.
from .defaults import EDIT_PRESET, MAX_GUIDANCE_SCALE, MAX_TIMESTEP_SHIFT, MIN_TIMESTEP_SHIFT, RENORM_TYPES
from .defaults import TEXT_TO_IMAGE_PRESET


__all__ = ["main", "build_parser"]

DTYPES = ("float32", "bfloat16", "float16")


# -- loading ---------------------------------------------------------------------------------------------------------


def _load_pipeline(checkpoint, device: str | None = None, dtype: str = "auto"):
    """
    `BagelPipeline.from_pretrained(checkpoint)` for the subcommands' `--checkpoint`, `--device`, `--dtype`, each
    checked with a message naming the flag's value.

    Args:
        checkpoint (`str` or `os.PathLike`): a folder written by `bagel convert` (holds `model_index.json`).
        device (`str`, *optional*): `"cuda"`, `"cpu"`, ...; default: CUDA when available, else CPU.
        dtype (`str`, defaults to `"auto"`): `"auto"` (bfloat16 on CUDA, float32 on CPU), `"float32"`, `"bfloat16"`
            or `"float16"`.
    """
    import torch

    from .pipeline_bagel import BagelPipeline

    folder = Path(checkpoint)
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"{str(folder)!r} is not a converted BAGEL folder (no model_index.json); convert the original release "
            "with `bagel convert --input_dir ORIGINAL --output_dir CONVERTED` first."
        )
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"`dtype` must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise ValueError(f"`device` {device!r} is not a device name (cpu, cuda, cuda:1, mps, ...).") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {device!r} was asked for, but CUDA is not available on this machine; use cpu.")
    if kind == "meta":
        raise ValueError("`device` 'meta' holds no weights; use cpu, cuda, ...")
    try:  # an existing device name this machine lacks (mps, xpu, cuda:7 on one GPU) fails here, not after loading
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"`device` {device!r} is not available on this machine ({str(error).splitlines()[0]}).") from None
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    pipe = BagelPipeline.from_pretrained(str(folder), dtype=torch_dtype)
    return pipe.to(device)


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


def _finite_float(text: str, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise argparse.ArgumentTypeError(f"expected a number {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f"expected a number <= {high}, got {value}")
    return value


def _scale(text: str) -> float:
    return _finite_float(text, low=1.0, high=MAX_GUIDANCE_SCALE)


def _shift(text: str) -> float:
    return _finite_float(text, low=MIN_TIMESTEP_SHIFT, high=MAX_TIMESTEP_SHIFT)


def _unit(text: str) -> float:
    return _finite_float(text, low=0.0, high=1.0)


def _positive_float(text: str) -> float:
    return _finite_float(text, low=0.0, low_open=True)


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


def _add_model_flags(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", required=True, type=Path, help="Converted BAGEL folder (from `bagel convert`).")
    group.add_argument("--device", default=None, help="Device to run on (default: cuda when available, else cpu).")
    group.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="Weights dtype; auto = bfloat16 on CUDA, else float32."
    )


def _add_image_flags(parser, preset: dict, size_default: str, output_default: str):
    parser.add_argument(
        "--output", type=Path, default=Path(output_default),
        help="PNG path; with several images, _0, _1, ... are added before the suffix.",
    )  # fmt: skip
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--height", type=_positive_int, default=None, help=f"Output height, a multiple of 16 (default: {size_default})."
    )
    group.add_argument("--width", type=_positive_int, default=None, help="Output width (same rules as --height).")
    group.add_argument(
        "--num_inference_steps", "--steps", type=_positive_int, default=50,
        help="Euler steps (the original's num_timesteps minus one).",
    )  # fmt: skip
    group.add_argument("--timestep_shift", type=_shift, default=3.0, help="Schedule shift s in st/(1+(s-1)t).")
    group.add_argument(
        "--cfg_text_scale", type=_scale, default=preset["cfg_text_scale"], help="Text guidance scale (1 disables it)."
    )
    group.add_argument(
        "--cfg_img_scale", type=_scale, default=preset["cfg_img_scale"],
        help="Image guidance scale (1 disables it; only applied while text guidance is on).",
    )  # fmt: skip
    group.add_argument(
        "--cfg_interval", type=_unit, nargs=2, metavar=("START", "END"), default=list(preset["cfg_interval"]),
        help="Guidance is applied at flow times START < t <= END (t runs from 1, noise, to 0, image).",
    )  # fmt: skip
    group.add_argument(
        "--cfg_renorm_type", choices=RENORM_TYPES, default=preset["cfg_renorm_type"],
        help="How the guided velocity is renormalised to the conditional one's norm.",
    )  # fmt: skip
    group.add_argument(
        "--cfg_renorm_min", type=_unit, default=0.0, help="Lower clamp of the renormalisation factor (1 disables it)."
    )
    group.add_argument("--seed", type=_seed, default=0, help="Seed of the initial noise (and of thinking's sampling).")
    group.add_argument("--num_images", type=_positive_int, default=1, help="Images per prompt.")
    group.add_argument(
        "--sample_posterior", action="store_true", help="Sample the VAE posterior of input images instead of its mean."
    )
    think = parser.add_argument_group("thinking")
    think.add_argument("--think", action="store_true", help="Let BAGEL write a plan first, then draw from it.")
    think.add_argument("--max_think_tokens", type=_positive_int, default=None,
                       help="Longest plan, in tokens (default: 1000, or what the model's positions leave).")
    think.add_argument("--think_do_sample", action="store_true", help="Sample the plan instead of greedy decoding.")
    think.add_argument("--think_temperature", type=_positive_float, default=0.3, help="Sampling temperature of the plan.")


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
    serve.add_argument("--port", type=_positive_int, default=8000, help="TCP port.")
    serve.add_argument("--model_name", default=None, help="Model id of /v1/models (default: the checkpoint's folder name).")
    serve.add_argument(
        "--max_batch_size", type=_positive_int, default=8, help="Most images of one batched pipeline call (1: no batching)."
    )
    serve.add_argument("--max_queue", type=_positive_int, default=64, help="Requests allowed to wait; more get HTTP 429.")
    serve.add_argument("--batch_wait_ms", type=_finite_float, default=10.0, help="How long a request waits for companions.")
    serve.add_argument("--api_key", default=None, help="Require `Authorization: Bearer KEY` (or set BAGEL_API_KEY).")
    serve.add_argument(
        "--request_timeout", type=_positive_float, default=600.0, help="Seconds a request may wait and run (then 504)."
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
    _add_model_flags(generate)
    generate.add_argument("--prompt", required=True, help="What to draw.")
    _add_image_flags(generate, TEXT_TO_IMAGE_PRESET, "1024, capped by the model's largest image side", "bagel_generate.png")

    edit = commands.add_parser(
        "edit", formatter_class=_HelpFormatter, help="Edit images by an instruction.",
        description="Edit one image (or combine several) following an instruction, and write the result as PNG.",
    )  # fmt: skip
    _add_model_flags(edit)
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
    chat.add_argument("--num_frames", type=_positive_int, default=None, help="Frames taken from --video (default 8).")
    chat.add_argument("--prompt", default=None, help="The question; omit it to chat on standard input.")
    chat.add_argument("--think", action="store_true", help="Let BAGEL reason inside <think> tags before answering.")
    chat.add_argument("--max_new_tokens", type=_positive_int, default=None,
                      help="Longest answer, in tokens (default: 512, or what the model's positions leave).")
    chat.add_argument("--do_sample", action="store_true", help="Sample the answer instead of greedy decoding.")
    chat.add_argument("--temperature", type=_positive_float, default=0.3, help="Sampling temperature.")
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


# -- subcommands ---------------------------------------------------------------------------------------------------------


# Image files `--output` may name: lossless PNG (the default), JPEG and WebP (written at quality 95).
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _output_paths(output: Path, count: int) -> list[Path]:
    """The image paths to write, checked before any work: a .png / .jpg / .webp name, not a folder, in a writable
    place."""
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise ValueError(
            f"--output must name an image file ending in {', '.join(OUTPUT_FORMATS)}, got {str(output)!r}."
        )
    paths = [output] if count == 1 else [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]
    for path in paths:
        if path.is_dir():
            raise ValueError(f"--output {str(path)!r} is a folder; give an image file path (e.g. out.png).")
        existing = next(parent for parent in path.resolve().parents if parent.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ValueError(f"--output {str(path)!r} cannot be written ({str(existing)!r} is not a writable folder).")
    return paths


def _check_size_fits(checkpoint: Path, height: int | None, width: int | None) -> None:
    """Refuses, before the weights load, a --height / --width the converted model cannot draw (read from its
    `model/config.json`): above its largest image side, or not a multiple of its latent patch in pixels."""
    config_path = Path(checkpoint) / "model" / "config.json"
    if (height is None and width is None) or not config_path.is_file():
        return  # the pipeline's own check (or the loader's message about the folder) covers it
    from transformers_bagel import BagelConfig

    try:
        config = BagelConfig.from_pretrained(config_path.parent)
    except (ValueError, OSError):
        return  # a broken config is named by the loader
    step, largest = config.latent_downsample, config.max_image_size  # the sizes the pipeline checks against
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and (value > largest or value % step):
            raise ValueError(
                f"{flag} {value}: this model draws sides that are multiples of {step} up to {largest} px "
                f"({config_path})."
            )


def _run_image(args, images=None):
    import torch

    paths = _output_paths(args.output, args.num_images)
    _check_size_fits(args.checkpoint, args.height, args.width)
    pipe = _load_pipeline(args.checkpoint, args.device, args.dtype)
    output = pipe(
        args.prompt,
        image=images,
        height=args.height,
        width=args.width,
        num_inference_steps=args.num_inference_steps,
        timestep_shift=args.timestep_shift,
        cfg_text_scale=args.cfg_text_scale,
        cfg_img_scale=args.cfg_img_scale,
        cfg_interval=tuple(args.cfg_interval),
        cfg_renorm_type=args.cfg_renorm_type,
        cfg_renorm_min=args.cfg_renorm_min,
        think=args.think,
        max_think_tokens=args.max_think_tokens,
        think_do_sample=args.think_do_sample,
        think_temperature=args.think_temperature,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
        sample_posterior=args.sample_posterior,
    )
    if output.text:
        print(f"thinking: {output.text[0]}")
    for image, path in zip(output.images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image_format = OUTPUT_FORMATS[path.suffix.lower()]
        image.save(path, format=image_format, **({} if image_format == "PNG" else {"quality": 95}))
        print(f"wrote {path} ({image.width}x{image.height})")


def _open_images(paths) -> list:
    from transformers_bagel.image_processing_bagel import to_rgb_image

    images = []
    for path in paths:
        try:
            images.append(to_rgb_image(path))
        except ValueError as error:
            raise ValueError(f"--image: {error}") from error
    return images


def _run_edit(args):
    _run_image(args, images=_open_images(args.image))


def _run_chat(args):
    import torch
    from transformers import TextStreamer

    from transformers_bagel.chat import generate_answer, understanding_messages

    images = _open_images(args.image)
    frames = None
    if args.video is not None:  # decoded before the model loads: a bad video fails at once
        from transformers_bagel.video_utils import load_video_frames

        try:
            frames = load_video_frames(args.video, num_frames=args.num_frames)
        except (ValueError, ImportError) as error:
            raise ValueError(f"--video: {error}") from error
    elif args.num_frames is not None:
        raise ValueError("--num_frames needs --video.")
    pipe = _load_pipeline(args.checkpoint, args.device, args.dtype)
    streamer = TextStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(args.seed)

    def turn(question, history):
        # The frames are sampled already (--num_frames): the processor keeps them all instead of sampling again.
        count = None if frames is None else len(frames)
        messages = understanding_messages(question, images, history, think=args.think, video=frames, num_frames=count)
        return generate_answer(
            pipe.model, pipe.processor, messages, args.max_new_tokens, args.do_sample, args.temperature, streamer
        )

    if args.prompt is not None:
        turn(args.prompt, [])
        return
    history = []
    while True:
        sys.stdout.write("> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        question = line.strip()
        history.append((question, turn(question, history)))


def _run_push(args):
    from huggingface_hub import CommitOperationAdd, HfApi

    from .convert_bagel_to_diffusers import model_card_text

    folder = args.folder
    if not (folder / "model_index.json").is_file() or not (folder / "model" / "config.json").is_file():
        raise ValueError(
            f"{str(folder)!r} is not a converted BAGEL folder (needs model_index.json and model/config.json)."
        )
    if args.repo_id.count("/") != 1 or any(not part for part in args.repo_id.split("/")):
        raise ValueError(f"--repo_id must look like owner/name, got {args.repo_id!r}.")
    # The card names the repo in its snippets: it is uploaded from memory, the local folder is left as it is.
    from transformers_bagel import BagelConfig

    card = model_card_text(args.repo_id, BagelConfig.from_pretrained(folder / "model")).encode("utf-8")
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() != "README.md"
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    api = HfApi(token=args.token)
    try:
        url = api.create_repo(args.repo_id, private=args.private, repo_type="model", exist_ok=True)
        api.create_commit(repo_id=args.repo_id, repo_type="model", operations=operations,
                          commit_message=args.commit_message)  # fmt: skip
    except Exception as error:  # network, authentication, permissions: one line, not the HTTP stack
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"could not upload to the Hub repo {args.repo_id!r} ({type(error).__name__}: {reason}).") from error
    print(f"uploaded {folder} to {url}")


def _run_eval(args):
    from .evaluation import plan_benchmark, run_plan

    if args.skip_grid and args.benchmark != "geneval":
        raise ValueError("--skip_grid applies to geneval only.")
    options = {"skip_grid": True} if args.skip_grid else {}
    # Everything is checked before the model loads (input files, output paths, the folder's settings record), and
    # nothing is written yet.
    plan = plan_benchmark(
        args.benchmark, args.data, args.output_dir, image_root=args.image_root, seed=args.seed,
        batch_size=args.batch_size, n_samples=args.n_samples, think=args.think, limit=args.limit,
        resolution=args.resolution, checkpoint=args.checkpoint, dtype=args.dtype, device=args.device,
        overwrite=args.overwrite, load_options=options,
        num_inference_steps=args.num_inference_steps, cfg_text_scale=args.cfg_text_scale,
        cfg_img_scale=args.cfg_img_scale, max_think_tokens=args.max_think_tokens,
        think_do_sample=args.think_do_sample or None,
    )  # fmt: skip
    pipe = None
    if plan.pending:  # the model loads only when something is left to draw
        pipe = _load_pipeline(args.checkpoint, args.device, args.dtype)
        pipe.set_progress_bar_config(disable=True)
    else:
        print(f"{args.benchmark}: all {len(plan.items)} entries are already complete in {args.output_dir}; nothing "
              "to draw (the model is not loaded).")  # fmt: skip
    summary = run_plan(pipe, plan, progress=not args.no_progress)
    print(f"{args.benchmark}: wrote {len(summary.written)} files, {summary.skipped} entries already complete -> "
          f"{args.output_dir}")  # fmt: skip


def _run_serve(args):
    try:
        from .serving import ServerConfig, check_port, resolve_api_key, run_server
    except ImportError as error:
        raise ValueError(f"the server needs the serve extra ({error.name} is missing): pip install bagel-hf[serve]") from error

    # Every setting, the key and the port are checked before the model loads.
    config = ServerConfig(
        model_name=args.model_name or Path(args.checkpoint).resolve().name,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        api_key=resolve_api_key(args.api_key),  # an empty --api_key or BAGEL_API_KEY is refused, never "no key"
        request_timeout=args.request_timeout,
        allow_remote_images=args.allow_remote_images,
        image_dir=args.image_dir,
        batch_wait=args.batch_wait_ms / 1000.0,
    )
    check_port(args.host, args.port)
    pipe = _load_pipeline(args.checkpoint, args.device, args.dtype)
    run_server(pipe, config, host=args.host, port=args.port, log_level=args.log_level)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bagel` command. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(eval_benchmarks=argv[:1] == ["eval"])
    if argv[:1] == ["convert"]:
        # The converter owns its flags; one parser, one --help, no copy of them here.
        from .convert_bagel_to_diffusers import main as convert_main

        try:
            convert_main(argv[1:], prog="bagel convert")
        except (ValueError, FileNotFoundError) as error:
            parser.exit(2, f"bagel convert: error: {error}\n")
        return 0
    args = parser.parse_args(argv)
    runners = {"generate": _run_image, "edit": _run_edit, "chat": _run_chat, "push": _run_push, "eval": _run_eval,
               "serve": _run_serve}
    try:
        runners[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.exit(2, f"bagel {args.command}: error: {error}\n")
    except OSError as error:  # a full disk, a permission denied, ...: one line, no traceback
        parser.exit(1, f"bagel {args.command}: error: {_os_error_message(error)}\n")
    return 0


def _os_error_message(error: OSError) -> str:
    """`error` as one line naming the file and, for a full disk or a refused permission, what to do."""
    import errno

    where = f" ({error.filename})" if error.filename else ""
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        return f"no space left on the device{where}: free some space or write elsewhere."
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: choose a place you can write."
    return f"{reason}{where}."


if __name__ == "__main__":
    sys.exit(main())
