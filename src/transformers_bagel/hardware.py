"""Peak throughput of common accelerators, for utilisation figures (the trainer's `mfu`, `examples/benchmark.py`)."""

import torch


__all__ = ["PEAK_TFLOPS_BF16", "device_peak_tflops"]


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity; the vendors' data sheets) of common accelerators, by a substring
# of the device name; the first match wins (so longer names come before their prefixes).
PEAK_TFLOPS_BF16 = {
    "GH200": 989.4,
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "H800": 989.4,
    "H20": 148.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L20": 119.5,
    "L4": 121.0,
    "MI300X": 1307.0,
}


def device_peak_tflops(device) -> float | None:
    """The dense bf16 peak of a CUDA device from `PEAK_TFLOPS_BF16`, or None (CPU, unknown accelerator)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS_BF16.items():
        if key in name:
            return value
    return None
