"""
The parts of `examples/benchmark.py` (not part of the library), one job per module; the script holds the command line
and prints the tables. It runs with `examples/` on `sys.path`, so this imports as `benchmarking`.

- `models`: the model sizes (`PRESETS`) and a `BagelPipeline` of random weights built on the device.
- `flops`: the FLOP model of a configuration and FLOPs counted by `FlopCounterMode` (with the CPU's SDPA kernel).
- `timing`: clocks that wait for the device, peak memory, matmul throughput and the device's peak.
- `generation`: text-to-image and editing: prefill, one CFG step, whole calls plain and with each step cache.
- `understanding`: one image and a question prefilled, then greedy decoding through `model.generate`.
- `sequential`: the unoptimised denoising path (every branch alone, no cache), timed against the pipeline's step.
- `fake_tensors`: `--meta_only`, FLOPs and memory of the full-size model on fake weights.
- `targets`: `--targets`, the prepared GPU run against BAGEL-7B's targets.
- `communication`: `--communication`, the bytes between GPUs per denoising step in each multi-GPU mode, counted from
  the model's shapes.
"""
