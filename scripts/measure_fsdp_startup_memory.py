"""
Host memory of an FSDP2 start-up with `cpu_ram_efficient_loading`: is the checkpoint read once per machine, not once
per process?

Builds a random-weight BAGEL of at least `--megabytes` MB (the tiny test model's tokens and tables, a wider and
deeper network), saves it in float32 with `save_pretrained`, then starts `--num_processes` CPU processes with
`accelerate launch --config_file examples/accelerate/fsdp2.yaml` (gloo). Each process loads the model as
examples/train.py does (`from_pretrained` after the process group exists: under that config local rank 0 reads the
weights and the others build the model on `meta`) and shards it as `BagelTrainer` does on CPUs (`enable_fsdp2_on_cpu`,
`shard_from_checkpoint`: sharded on `meta`, rank 0 broadcasting the checkpoint's tensors one at a time into every
rank's shards, then `Accelerator.prepare`).

How memory is counted: each process reads its peak resident set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) once
after the interpreter, torch, transformers and the process group are set up (the baseline) and once after the model
is loaded and sharded; its start-up cost is the difference. The figure checked is the sum of these differences over
the processes, against the model's bytes (parameters and buffers); loading once per process would cost at least
`num_processes` times those bytes.

    python scripts/measure_fsdp_startup_memory.py                   # about 520 MB of float32 weights, 2 processes
    python scripts/measure_fsdp_startup_memory.py --megabytes 100 --bound 1.6
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "accelerate" / "fsdp2.yaml"


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def build_model(folder: Path, megabytes: float) -> int:
    """A random BAGEL of at least `megabytes` MB of float32 weights, saved in `folder`; returns its bytes."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    from quickstart import default_checkpoint

    from transformers_bagel import BagelForConditionalGeneration
    from transformers_bagel.configuration_bagel import SPECIAL_TOKENS, BagelConfig

    base = BagelConfig.from_pretrained(default_checkpoint(ROOT / "outputs") / "model")
    hidden, ffn = 768, 2048
    # per decoder layer: two experts (understanding, generation) of attention (q, o: d x d; k, v: d x d/2) and MLP
    per_layer = 2 * (3 * hidden * hidden + 3 * hidden * ffn) * 4
    layers = max(2, -(-int(megabytes * 2**20) // per_layer))
    text = base.text_config.to_dict()
    text.pop("layer_types", None)
    text.update(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=12,
                num_key_value_heads=6, head_dim=64)  # fmt: skip
    vision = base.vision_config.to_dict()
    vision.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    tokens = {field: getattr(base, field) for field in SPECIAL_TOKENS}
    config = BagelConfig(text_config=text, vision_config=vision, max_latent_size=8, **tokens)
    torch.manual_seed(0)
    model = BagelForConditionalGeneration(config).float()
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    model.save_pretrained(folder)
    return size


def worker(folder: Path, out: Path):
    """One process: baseline, load as examples/train.py, shard as BagelTrainer, peak; writes its figures."""
    import gc

    import torch
    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    from transformers_bagel import BagelForConditionalGeneration
    from transformers_bagel.training.fsdp import enable_fsdp2_on_cpu, shard_from_checkpoint

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)  # the process group, as TrainingArguments sets it up before the model loads
    gc.collect()
    baseline = _peak_rss_bytes()
    model = BagelForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    loaded_on = str(next(model.parameters()).device)
    after_load = _peak_rss_bytes()
    if not enable_fsdp2_on_cpu(accelerator):
        raise SystemExit("FSDP2 was not enabled: launch this through `accelerate launch` with the fsdp2.yaml config.")
    model = shard_from_checkpoint(accelerator, model)  # as BagelTrainer does on CPUs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    gc.collect()
    peak = _peak_rss_bytes()
    params = list(model.parameters())
    record = {
        "rank": accelerator.process_index,
        "loaded_on": loaded_on,
        "baseline": baseline,
        "after_load": after_load,
        "peak": peak,
        "sharded": all(isinstance(p, DTensor) for p in params),
        "local_bytes": sum(p.to_local().numel() * p.element_size() for p in params),
        "finite": all(bool(torch.isfinite(p.to_local()).all()) for p in params),
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(megabytes: float, num_processes: int = 2, workdir: Path | None = None) -> dict:
    """Builds the model, runs the processes and returns the figures (bytes) and the ratio checked."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(workdir or tmp)
        folder, out = workdir / "model", workdir / "figures"
        out.mkdir(parents=True, exist_ok=True)
        model_bytes = build_model(folder, megabytes)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
                   "--num_processes", str(num_processes), "--main_process_port", str(_free_port()),
                   str(Path(__file__).resolve()), "--worker", str(folder), "--out", str(out)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"The processes failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(num_processes)]
    costs = [r["peak"] - r["baseline"] for r in ranks]
    return {"model_bytes": model_bytes, "ranks": ranks, "costs": costs, "ratio": sum(costs) / model_bytes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=520, help="Least size of the float32 model.")
    parser.add_argument("--num_processes", type=int, default=2, help="CPU processes (gloo).")
    parser.add_argument("--bound", type=float, default=1.6, help="Largest sum of start-up costs, in model sizes.")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker, args.out)
    figures = measure(args.megabytes, args.num_processes)
    mb = 2**20
    print(f"model: {figures['model_bytes'] / mb:.1f} MB of float32 parameters and buffers")
    for rank, cost in zip(figures["ranks"], figures["costs"]):
        print(f"rank {rank['rank']}: loaded on {rank['loaded_on']}, baseline peak RSS {rank['baseline'] / mb:.1f} MB, "
              f"after from_pretrained {rank['after_load'] / mb:.1f} MB, after sharding {rank['peak'] / mb:.1f} MB: "
              f"start-up {cost / mb:.1f} MB; local shard {rank['local_bytes'] / mb:.1f} MB")  # fmt: skip
    print(f"sum of start-up costs: {sum(figures['costs']) / mb:.1f} MB = {figures['ratio']:.2f}x the model "
          f"(bound {args.bound}x; loading once per process would be >= {args.num_processes}x)")  # fmt: skip
    if not all(r["sharded"] and r["finite"] for r in figures["ranks"]):
        raise SystemExit("The model is not fully sharded with finite weights on every rank.")
    if figures["ratio"] >= args.bound:
        raise SystemExit(f"Start-up memory {figures['ratio']:.2f}x the model is over the bound {args.bound}x.")


if __name__ == "__main__":
    main()
