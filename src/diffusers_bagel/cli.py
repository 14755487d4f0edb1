"""
The `bagel` command: its entry point ([`main`]) and what each subcommand runs. The flags, and the usage text that
`bagel --help` shows, are in `cli_parser.py`; this module loads torch, transformers and diffusers only once the
arguments are read.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from .cli_parser import DTYPES, PIPELINE_FLAGS, build_parser


__all__ = ["main", "build_parser"]


# -- loading ---------------------------------------------------------------------------------------------------------


def _load_pipeline(checkpoint, device: str | None = None, dtype: str = "auto", tensor_parallel: bool = False):
    """
    `BagelPipeline.from_pretrained(checkpoint)` for the subcommands' `--checkpoint`, `--device`, `--dtype`, each
    checked with a message naming the flag's value.

    Args:
        checkpoint (`str` or `os.PathLike`): a folder written by `bagel convert` (holds `model_index.json`).
        device (`str`, *optional*): `"cuda"`, `"cpu"`, ...; default: CUDA when available, else CPU.
        dtype (`str`, defaults to `"auto"`): `"auto"` (bfloat16 on CUDA, float32 on CPU), `"float32"`, `"bfloat16"`
            or `"float16"`.
        tensor_parallel (`bool`, defaults to `False`): load the model split over the processes of the initialised
            process group (`--parallel tp`, transformers' `tp_plan="auto"`), every other component whole.
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
    components = {}
    if tensor_parallel:
        from transformers import DistributedConfig

        from transformers_bagel import BagelForConditionalGeneration

        components["model"] = BagelForConditionalGeneration.from_pretrained(
            folder, subfolder="model", dtype=torch_dtype, distributed_config=DistributedConfig(tp_plan="auto")
        )
    pipe = BagelPipeline.from_pretrained(str(folder), dtype=torch_dtype, **components)
    return pipe.to(device)


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


# What each `--parallel` choice runs on the processes of a torchrun, for the message when WORLD_SIZE is not set.
PARALLEL_RUNS = {"cfg": "one process per guidance branch", "tp": "the decoder split over the processes"}


@contextlib.contextmanager
def _parallel_group(parallel: str | None, device: str | None):
    """
    For `--parallel cfg` / `tp`: the process group of the `torchrun` that started this process (gloo on CPU, nccl on
    CUDA, where each process takes the GPU of its LOCAL_RANK), destroyed on the way out. Yields the device to load the
    pipeline on and whether this process writes the outputs (rank 0); without `--parallel`, `device` and True.
    """
    if parallel is None:
        yield device, True
        return
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"--parallel {parallel} runs {PARALLEL_RUNS[parallel]} under torchrun: start it as `torchrun "
            f"--nproc_per_node 2 --no-python bagel ... --parallel {parallel}` (WORLD_SIZE is not set)."
        )
    import torch
    import torch.distributed as dist

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and torch.device(device).index is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield device, dist.get_rank() == 0
    finally:
        dist.destroy_process_group()


def _run_image(args, images=None):
    paths = _output_paths(args.output, args.num_images)
    _check_size_fits(args.checkpoint, args.height, args.width)
    if args.lora is not None:
        from transformers_bagel.training.lora import check_bagel_lora_path

        if args.parallel == "tp":
            raise ValueError("--lora and --parallel tp cannot be combined: peft's LoRA layers do not wrap the "
                             "tensor-parallel linears; merge the adapter into a converted folder first.")
        try:
            check_bagel_lora_path(args.lora)
        except FileNotFoundError as error:
            raise ValueError(f"--lora: {error}") from None
    with _parallel_group(args.parallel, args.device) as (device, writes):
        _draw_and_write(args, images, paths, device, writes)


def _draw_and_write(args, images, paths, device, writes: bool):
    import torch

    pipe = _load_pipeline(args.checkpoint, device, args.dtype, args.parallel == "tp")
    if args.lora is not None:
        from transformers_bagel.training.lora import load_bagel_lora

        load_bagel_lora(pipe, args.lora)
    if args.parallel == "cfg":
        pipe.enable_guidance_parallel()
    arguments = {name: getattr(args, name) for name in PIPELINE_FLAGS if getattr(args, name) is not None}
    if "cfg_interval" in arguments:
        arguments["cfg_interval"] = tuple(arguments["cfg_interval"])
    output = pipe(
        args.prompt, image=images, think=args.think, think_do_sample=args.think_do_sample,
        num_images_per_prompt=args.num_images, sample_posterior=args.sample_posterior,
        generator=torch.Generator().manual_seed(args.seed), **arguments,
    )  # fmt: skip
    if not writes:
        return
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
        sampling = {} if args.temperature is None else {"temperature": args.temperature}
        return generate_answer(pipe.model, pipe.processor, messages, args.max_new_tokens, args.do_sample,
                               streamer=streamer, **sampling)  # fmt: skip

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
