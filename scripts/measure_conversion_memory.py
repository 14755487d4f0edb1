"""
Measures the host memory of converting a BAGEL release (`bagel convert`) and of loading the converted folder, on a
synthetic release of any size (see `make_synthetic_release.py`), and checks that the converted tensors are the
release's bit for bit (renamed, cast).

Each measurement runs in a fresh Python process, which reports its peak resident memory (`VmHWM` of
`/proc/self/status`); a baseline is measured the same way on the tiny reference release
(`tests/fixtures/tiny_bagel_original/`), so the interpreter, torch and the libraries cancel out. It prints the
checkpoint's size, the peak above the baseline of the conversion and of each kind of loading
(`BagelForConditionalGeneration.from_pretrained(folder, subfolder="model")`, `BagelPipeline.from_pretrained(folder)`),
and their ratios: the conversion's to the release's `ema.safetensors`, the loads' to the converted weights.

Usage (about 1 GB of float32 weights converted to bfloat16 in 300 MB shards; everything is written under a
temporary folder and deleted at the end):

    python scripts/measure_conversion_memory.py --hidden_size 1024 --num_layers 16
    python scripts/measure_conversion_memory.py --release_dir /path/to/release --dtype float32 --max_shard_size 5GB

Linux only (`/proc`).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from transformers_bagel.convert_bagel_to_hf import EMA_WEIGHTS_NAME, convert_key
from transformers_bagel.safetensors_streaming import read_safetensors_header, read_tensor


sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_release import DTYPES, TINY_RELEASE, make_synthetic_release  # noqa: E402


__all__ = ["check_bit_identical", "measure", "peak_rss", "weights_bytes"]


def _peak_rss_of_this_process() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line.")


def _run_task(task: str, source: str, target: str | None, dtype: str, max_shard_size: str):
    """One measured task, in this (fresh) process. Returns the modules loaded (none for a conversion)."""
    if task == "convert":
        from diffusers_bagel.convert_bagel_to_diffusers import convert

        convert(source, target, dtype=DTYPES[dtype], max_shard_size=max_shard_size)
        return []
    if task == "load_model":
        from transformers_bagel import BagelForConditionalGeneration

        return [BagelForConditionalGeneration.from_pretrained(source, subfolder="model", dtype=DTYPES[dtype])]
    if task == "load_pipeline":
        from diffusers_bagel import BagelPipeline

        pipe = BagelPipeline.from_pretrained(source, dtype=DTYPES[dtype])
        return [pipe.model, pipe.vae]
    raise ValueError(f"Unknown task {task!r}.")


def _read_every_weight(modules) -> None:
    # from_pretrained may leave weights as views of the memory-mapped shards, resident only once read: read them all,
    # as a first forward would.
    with torch.no_grad():
        for module in modules:
            for tensor in module.state_dict().values():
                tensor.sum()


def _child(task: str, source: str, target: str | None, dtype: str, max_shard_size: str) -> dict:
    """Runs `task` and returns the peaks of this process: after the task, and after reading every loaded weight."""
    modules = _run_task(task, source, target, dtype, max_shard_size)
    peaks = {"peak_rss_bytes": _peak_rss_of_this_process()}
    if modules:
        _read_every_weight(modules)
        peaks["peak_rss_read_bytes"] = _peak_rss_of_this_process()
    return peaks


def peak_rss(task: str, source, target=None, dtype: str = "bfloat16", max_shard_size: str = "300MB") -> dict:
    """
    Peak resident memory, in bytes, of a fresh Python process that imports the libraries and runs `task`:
    `"convert"` (`source` release -> `target` folder), `"load_model"` or `"load_pipeline"` (of the converted folder
    `source`), in `dtype`. Returns `{"peak_rss_bytes": ...}`, plus `"peak_rss_read_bytes"` for the loads: the peak
    once every loaded weight has been read.
    """
    command = [sys.executable, __file__, "--_task", task, "--_source", str(source), "--dtype", dtype,
               "--max_shard_size", max_shard_size] + (["--_target", str(target)] if target else [])  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"The {task} child failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def weights_bytes(model_dir: Path) -> int:
    """Bytes of tensor data in the safetensors files of a converted `model` folder (headers excluded)."""
    headers = [read_safetensors_header(path) for path in model_dir.glob("*.safetensors")]
    return sum(entry.nbytes for header in headers for entry in header.values())


def check_bit_identical(release_dir: Path, model_dir: Path, dtype: torch.dtype) -> int:
    """
    Checks that every tensor of the release's `ema.safetensors`, renamed and cast to `dtype`, is in the converted
    `model_dir` bit for bit (read with `safe_open`, as transformers reads it), and that the folder holds nothing else.
    Returns the number of tensors checked; raises `AssertionError` naming the first difference.
    """
    index = model_dir / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    else:
        with safe_open(str(model_dir / SAFE_WEIGHTS_NAME), framework="pt") as handle:
            weight_map = dict.fromkeys(handle.keys(), SAFE_WEIGHTS_NAME)
    original = read_safetensors_header(release_dir / EMA_WEIGHTS_NAME)
    assert sorted(weight_map) == sorted(convert_key(name) for name in original), "tensor names differ"
    with open(release_dir / EMA_WEIGHTS_NAME, "rb") as source:
        for name, entry in original.items():
            expected = read_tensor(source, entry).to(dtype)
            with safe_open(str(model_dir / weight_map[convert_key(name)]), framework="pt") as handle:
                actual = handle.get_tensor(convert_key(name))
            assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
            assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name
    return len(original)


def measure(
    release_dir: Path, work_dir: Path, dtype: str = "bfloat16", max_shard_size: str = "300MB", loads=("load_model",)
) -> dict:
    """
    Converts the tiny reference (baseline) and `release_dir` into `work_dir`, each in its own process, then runs each
    of `loads` on both converted folders. Returns the sizes, the peaks above the baselines (bytes) and their ratios:
    `convert_*` to the release's `ema.safetensors`, `<load>_*` (after loading) and `<load>_read_*` (after reading every
    weight) to the converted weights.
    """
    baseline_dir, converted_dir = work_dir / "tiny_converted", work_dir / "converted"
    baseline = peak_rss("convert", TINY_RELEASE, baseline_dir, dtype, max_shard_size)["peak_rss_bytes"]
    peak = peak_rss("convert", release_dir, converted_dir, dtype, max_shard_size)["peak_rss_bytes"]
    results = {
        "checkpoint_bytes": (release_dir / EMA_WEIGHTS_NAME).stat().st_size,
        "converted_bytes": weights_bytes(converted_dir / "model"),
        "convert_baseline": baseline,
        "convert_peak": peak,
        "convert_above": peak - baseline,
    }
    results["convert_ratio"] = results["convert_above"] / results["checkpoint_bytes"]
    for task in loads:
        baselines, peaks = peak_rss(task, baseline_dir, dtype=dtype), peak_rss(task, converted_dir, dtype=dtype)
        for stage, key in ((task, "peak_rss_bytes"), (f"{task}_read", "peak_rss_read_bytes")):
            results[f"{stage}_baseline"], results[f"{stage}_peak"] = baselines[key], peaks[key]
            results[f"{stage}_above"] = peaks[key] - baselines[key]
            results[f"{stage}_ratio"] = results[f"{stage}_above"] / results["converted_bytes"]
    return results


def _report(results: dict, loads, dtype: str, max_shard_size: str, tensors: int) -> None:
    mb = 1e6
    print(f"checkpoint (ema.safetensors): {results['checkpoint_bytes'] / mb:.1f} MB; converted to {dtype} in "
          f"{max_shard_size} shards: {results['converted_bytes'] / mb:.1f} MB of weights")  # fmt: skip
    print(f"conversion: peak {results['convert_peak'] / mb:.1f} MB, baseline (tiny release) "
          f"{results['convert_baseline'] / mb:.1f} MB, above baseline {results['convert_above'] / mb:.1f} MB = "
          f"{results['convert_ratio']:.3f}x the checkpoint")  # fmt: skip
    for task in loads:
        for stage, what in ((task, "from_pretrained"), (f"{task}_read", "from_pretrained + every weight read")):
            print(f"{task} ({what}): peak {results[f'{stage}_peak'] / mb:.1f} MB, baseline (tiny converted) "
                  f"{results[f'{stage}_baseline'] / mb:.1f} MB, above baseline {results[f'{stage}_above'] / mb:.1f} "
                  f"MB = {results[f'{stage}_ratio']:.3f}x the converted weights")  # fmt: skip
    print(f"bit-identical: {tensors} tensors of the release, renamed and cast to {dtype}, equal the converted ones")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release_dir", help="An existing release to measure (default: make a synthetic one).")
    parser.add_argument("--hidden_size", type=int, default=1024, help="Synthetic release's decoder width.")
    parser.add_argument("--num_layers", type=int, default=16, help="Synthetic release's decoder layers.")
    parser.add_argument("--intermediate_size", type=int, default=1536, help="Synthetic release's decoder MLP width.")
    parser.add_argument("--release_dtype", choices=sorted(DTYPES), default="float32", help="Synthetic weights' dtype.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="Conversion and loading dtype.")
    parser.add_argument("--max_shard_size", default="300MB", help="Shard size of the conversion (default 300MB).")
    parser.add_argument("--work_dir", help="Folder for the files (default: a temporary folder, deleted at the end).")
    parser.add_argument("--skip_pipeline", action="store_true", help="Measure only the model's from_pretrained.")
    parser.add_argument("--_task", help=argparse.SUPPRESS)
    parser.add_argument("--_source", help=argparse.SUPPRESS)
    parser.add_argument("--_target", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._task:  # a measured child
        print(json.dumps(_child(args._task, args._source, args._target, args.dtype, args.max_shard_size)))
        return

    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bagel_memory_"))
    loads = ("load_model",) if args.skip_pipeline else ("load_model", "load_pipeline")
    try:
        release_dir = Path(args.release_dir) if args.release_dir else make_synthetic_release(
            work_dir / "release", args.hidden_size, args.num_layers, args.intermediate_size, DTYPES[args.release_dtype]
        )  # fmt: skip
        results = measure(release_dir, work_dir, args.dtype, args.max_shard_size, loads)
        tensors = check_bit_identical(release_dir, work_dir / "converted" / "model", DTYPES[args.dtype])
        _report(results, loads, args.dtype, args.max_shard_size, tensors)
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
