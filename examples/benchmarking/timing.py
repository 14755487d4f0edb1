"""Seconds, peak memory and throughput: clocks that wait for the device, matmul rates and the device's peak."""

import math
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch

from transformers_bagel.hardware import device_peak_tflops


__all__ = ["Clock", "Gemm", "Memory", "device_label", "device_peak", "reference_gemm", "timed"]


class Clock:
    """Wall-clock timestamps that wait for the device's queued work first."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class Memory:
    """Peak memory of a task: the device allocator's peak on CUDA, the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def label(self) -> str:
        return "peak GPU mem (GiB)" if self.device.type == "cuda" else "peak RSS (GiB, process)"

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return kib / 2**20


def timed(fn, repeats: int, clock: Clock):
    """(the last call's result, median seconds) of `repeats` calls of `fn()`."""
    times, result = [], None
    for _ in range(repeats):
        result = None  # free the previous result (a prefilled cache) before the next call
        start = clock.now()
        result = fn()
        times.append(clock.now() - start)
    return result, float(np.median(times))


@dataclass
class Gemm:
    """A measured square matmul throughput."""

    tflops: float
    size: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"measured {self.size}x{self.size} {self.dtype} matmul".replace("torch.", "")


def _measure_gemm(
    device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10, min_seconds: float = 0.0
) -> Gemm:
    """Best of `repeats` (and of at least `min_seconds` of) `size x size` matmuls on `device`, with torch's current
    threads, after one warm-up."""
    clock = Clock(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best, count, began = math.inf, 0, clock.now()
    while count < repeats or clock.now() - began < min_seconds:
        start = clock.now()
        a @ b
        best = min(best, clock.now() - start)
        count += 1
    return Gemm(2 * size**3 / best / 1e12, size, dtype)


def reference_gemm(device: torch.device, dtype: torch.dtype | None = None) -> Gemm:
    """The GEMM the denoising step is compared with: 4096x4096 (bfloat16 unless `dtype`) on CUDA; 1024x1024 (float32
    unless `dtype`) on the CPU, over at least a second (a shared CPU's speed comes and goes)."""
    if device.type == "cuda":
        return _measure_gemm(device, dtype or torch.bfloat16, 4096)
    return _measure_gemm(device, dtype or torch.float32, 1024, min_seconds=1.0)


def device_peak(device: torch.device, dtype: torch.dtype, override: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where the figure comes from): --peak_tflops, the data sheet's dense figure of a known GPU in
    bfloat16 or float16 (`transformers_bagel.hardware.PEAK_TFLOPS_BF16`), or a matmul in `dtype` of the reference
    GEMM's size, measured as `reference_gemm` does."""
    if override is not None:
        return override, "--peak_tflops"
    if dtype in (torch.bfloat16, torch.float16):
        peak = device_peak_tflops(device)
        if peak is not None:
            return peak, f"data sheet, {torch.cuda.get_device_name(device)}, dense {dtype}".replace("torch.", "")
    gemm = reference_gemm(device, dtype)
    return gemm.tflops, gemm.label


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"
