"""
`--communication`: what BAGEL would send between GPUs per denoising step, counted from the model's shapes (no GPU, no
multi-GPU machine: nothing is run or timed).

For each way of spreading a step over N GPUs the bytes each GPU sends (and receives) per step are counted with the
ring algorithms' costs, where `S` is the size of the whole tensor the collective produces or reduces:

- all-gather and reduce-scatter: (N - 1) / N x S per GPU;
- all-reduce: 2 (N - 1) / N x S per GPU (a reduce-scatter then an all-gather);
- all-to-all: (N - 1) / N x the GPU's own buffer (S / N): it keeps 1/N of what it holds and sends the rest;
- ring attention: the keys and values each GPU holds go round the ring, N - 1 hops.

Modes (inference: the step's guidance branches run as rows of one forward, each against its own prefilled context):

- `cfg`: guidance branches in parallel. Each GPU runs whole branches (the assignment that minimises the busiest GPU's
  FLOPs) against its own context, then the branches' velocities are all-gathered, one `(h * w, patch_latent_dim)`
  float32 tensor per branch: `guided_velocity` casts each branch's velocity to float32 before the dual-CFG rule (bf16
  would halve a figure that is already negligible). Steps outside `cfg_interval` run the full-context branch only, on
  one GPU, which broadcasts its velocity (as `enable_guidance_parallel` does). Meaningful for N <= branches.
- `tp`: tensor parallelism, both experts' attention and MLP projections sharded Megatron-style (q/k/v/gate/up by
  columns, o/down by rows): two all-reduces per layer of the hidden states of every token of the forward (the rows of
  both experts put back together before each reduce). Needs N to divide the 28 query and the 4 key/value heads.
- `ulysses`: sequence parallelism over the latent block (DeepSpeed-Ulysses): each GPU holds 1/N of each branch's block
  tokens; per layer an all-to-all of q, k and v (sequence-sharded to head-sharded) and one of the attention output
  (back). The context's cached keys and values are sharded by heads like the attention. Same head constraint as `tp`.
- `ring`: sequence parallelism with ring attention: each GPU holds 1/N of the block tokens and passes its block keys
  and values round the ring once per layer; the (cached, step-invariant) context keys and values are held whole on
  every GPU, so they never travel.
- `fsdp`: FSDP2 training (`examples/train.py --fsdp --bf16 --activation_checkpointing`, accelerate's bf16 policy:
  parameters gathered and gradients reduced in bf16): per training step every decoder layer's parameters are
  all-gathered for the forward and again for the backward (`reshard_after_forward=True`), the root unit's (embeddings,
  LM head, latent and ViT connectors) once, and every gradient reduce-scattered. A text-to-image batch never runs the
  ViT, so its layers are neither gathered nor reduced. One step: each GPU trains on one packed batch of
  `examples/train.py`'s default `--max_tokens` (16384) filled with 1024x1024 text-to-image samples; one GPU alone would
  need N such steps (and could not hold the optimiser state of a full fine-tune of the 14.6 B parameters: the speed-up
  is of throughput, N GPUs against N times one GPU's time).

Per step: the prefill of the contexts (once per image), the VAE decode, and gathering the final latents are excluded.
Compute is the step's FLOPs from the model's weight shapes (`count_model`: 2 x weights per token, 4 x heads x
head_dim per (query, key) pair), the count `--meta_only` makes on fake tensors, at `peak_tflops` (the benchmark's
measured H200 bf16 matmul) split evenly over N GPUs (by whole branches for `cfg`). Speed-ups over one GPU: "no
overlap" is one GPU's time over (compute / N + communication), "overlap" over max(compute / N, communication).
"""

import itertools
import math

from diffusers_bagel import FlowMatchEulerScheduler
from diffusers_bagel.defaults import EDIT_PRESET, TEXT_TO_IMAGE_PRESET
from transformers_bagel import BagelForConditionalGeneration, BagelImageProcessor
from transformers_bagel.convert_bagel_to_hf import BAGEL_7B_IMAGE_SIZES

from .flops import FlopModel, count_model
from .generation import schedule


__all__ = ["BANDWIDTHS", "MODES", "communication_report", "communication_table"]


# Bytes per second per GPU and direction: each ring step sends and receives at once.
BANDWIDTHS = {
    "NVLink": (450e9, "NVLink 4 (H100 / H200 SXM): 900 GB/s per GPU in both directions together, 450 GB/s each way "
                      "(NVIDIA's H100 and H200 data sheets); the link rate, which large NCCL messages approach"),
    "PCIe": (50e9, "PCIe Gen5 x16: 64 GB/s each way in theory (32 GT/s x 16 lanes, 128b/130b), about 50 GB/s "
                   "achievable; GPUs without NVLink talk over it"),
}  # fmt: skip
MODES = ("cfg", "tp", "ulysses", "ring", "fsdp")
GPU_COUNTS = (2, 3, 4, 8)
ACTIVATION_BYTES = 2  # bfloat16 hidden states, q / k / v, attention outputs, and FSDP's gathered weights and gradients
VELOCITY_BYTES = 4  # float32: what guided_velocity combines
# Context lengths of the benchmark's prompts (`benchmarking.generation.make_task`, as `--meta_only` counts them): the
# text-to-image prompt's tokens and the edit's instruction's.
T2I_PROMPT_TOKENS = 46
EDIT_INSTRUCTION_TOKENS = 37
IMAGE_MARKERS = 4  # an edited image in a context: start and end markers around its ViT tokens and its VAE tokens
BLOCK_MARKERS = 2  # the latent block of a denoising step: the latent tokens between a start and an end marker
TRAIN_MAX_TOKENS = 16384  # examples/train.py's --max_tokens default: the token budget of one packed batch
TRAIN_FORWARDS = 4  # a training step's FLOPs in forwards: forward, recomputation (activation checkpointing), backward


# -- shapes ------------------------------------------------------------------------------------------------------------


def _cfg_steps(steps: int, cfg_interval) -> int:
    return sum(FlowMatchEulerScheduler.cfg_active(sigma, cfg_interval) for sigma in schedule(steps)[:-1])


def denoising_tasks(config, height: int, width: int, steps: int, image_sizes: dict = BAGEL_7B_IMAGE_SIZES) -> dict:
    """Per task, the guided step's branches (each branch's context length), the latent block's tokens and the number
    of guided steps of a `steps`-step call with the task's preset: text-to-image (full context, no text; its no-image
    branch reuses the full one's velocity) and editing an image of the same size (full, no text, no image), resized
    by the image processor's `image_sizes`."""
    processor = BagelImageProcessor(
        vit_patch_size=config.vision_config.patch_size,
        vae_stride=config.latent_downsample,
        vit_max_num_patch_per_side=config.vit_max_num_patch_per_side,
        **image_sizes,
    )
    stride = config.latent_downsample
    vae_width, vae_height = processor.get_resize_size(width, height, "vae")
    rows, cols = processor.num_vit_patches(height, width)
    image_tokens = rows * cols + (vae_height // stride) * (vae_width // stride) + IMAGE_MARKERS
    return {
        "t2i": {"contexts": (T2I_PROMPT_TOKENS, 0), "latent_tokens": (height // stride) * (width // stride),
                "guided_steps": _cfg_steps(steps, TEXT_TO_IMAGE_PRESET["cfg_interval"])},
        "edit": {"contexts": (image_tokens + EDIT_INSTRUCTION_TOKENS, image_tokens, EDIT_INSTRUCTION_TOKENS),
                 "latent_tokens": (vae_height // stride) * (vae_width // stride),
                 "guided_steps": _cfg_steps(steps, EDIT_PRESET["cfg_interval"])},
    }  # fmt: skip


def branch_flops(flops: FlopModel, block: int, context: int) -> float:
    """One guidance branch of a denoising step: the block through the generation expert, and its attention to itself
    and its context (every (query, key) pair, as `FlopCounterMode` counts the kernels)."""
    return block * flops.gen_token + block * (block + context) * flops.attn_per_key


def fsdp_units(model: BagelForConditionalGeneration) -> dict:
    """Parameters of FSDP2's units (`bagel_fsdp_config`): the decoder layers, the ViT encoder layers, and the root
    (everything else). Works on the meta device."""
    # Imported here: `transformers_bagel.training` loads datasets and peft, which the other benchmarks (and the GPU
    # machine of scripts/gpu_benchmark.sh, which has no datasets) do without.
    from transformers_bagel.training import bagel_fsdp_config

    layer_classes = bagel_fsdp_config()["transformer_layer_cls_to_wrap"]
    units = {"decoder_layers": 0, "vit_layers": 0}
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            part = "decoder_layers" if type(module).__name__ == "BagelDecoderLayer" else "vit_layers"
            units[part] += sum(p.numel() for p in module.parameters())
    units["root"] = sum(p.numel() for p in model.parameters()) - units["decoder_layers"] - units["vit_layers"]
    return units


# -- bytes per GPU -----------------------------------------------------------------------------------------------------


def cfg_bytes(branches: int, latent_tokens: int, patch_dim: int, n: int) -> float:
    """All-gather of the branches' float32 velocities; with more branches than GPUs each GPU's share is padded to the
    largest (all_gather needs equal shapes). One branch: its GPU broadcasts the velocity, which every other GPU
    receives whole."""
    if branches == 1:
        return latent_tokens * patch_dim * VELOCITY_BYTES
    return (n - 1) * math.ceil(branches / n) * latent_tokens * patch_dim * VELOCITY_BYTES


def tp_bytes(tokens: int, hidden: int, layers: int, n: int) -> float:
    """Two all-reduces of the hidden states per layer (after the row-parallel o_proj and down_proj)."""
    return layers * 2 * 2 * (n - 1) / n * tokens * hidden * ACTIVATION_BYTES


def ulysses_bytes(tokens: int, q_width: int, kv_width: int, layers: int, n: int) -> float:
    """Per layer, all-to-alls of each GPU's 1/N of the tokens: q, k, v in, the attention output back."""
    return layers * (n - 1) / n * tokens / n * (2 * q_width + 2 * kv_width) * ACTIVATION_BYTES


def ring_bytes(tokens: int, kv_width: int, layers: int, n: int) -> float:
    """Per layer, each GPU's block keys and values (1/N of the tokens) sent N - 1 hops round the ring."""
    return layers * (n - 1) * tokens / n * 2 * kv_width * ACTIVATION_BYTES


def fsdp_bytes(units: dict, n: int) -> float:
    """A training step without the ViT: decoder layers gathered twice (forward, backward), the root once, every
    gradient reduce-scattered."""
    gathered = 2 * units["decoder_layers"] + units["root"]
    reduced = units["decoder_layers"] + units["root"]
    return (n - 1) / n * (gathered + reduced) * ACTIVATION_BYTES


# -- the report --------------------------------------------------------------------------------------------------------


def _busiest_rank(branch_costs: list[float], n: int) -> float:
    """The least possible FLOPs of the busiest GPU when whole branches are assigned to `n` GPUs."""
    best = math.inf
    for assignment in itertools.product(range(n), repeat=len(branch_costs)):
        load = [0.0] * n
        for rank, cost in zip(assignment, branch_costs):
            load[rank] += cost
        best = min(best, max(load))
    return best


def _speedups(one_gpu: float, compute: float, comm: dict) -> dict:
    return {
        link: {"no_overlap": one_gpu / (compute + seconds), "overlap": one_gpu / max(compute, seconds)}
        for link, seconds in comm.items()
    }


def _seconds(num_bytes: float) -> dict:
    return {link: num_bytes / bandwidth for link, (bandwidth, _) in BANDWIDTHS.items()}


def _inference_row(mode: str, task: str, spec: dict, flops: FlopModel, config, n: int, steps: int, peak: float):
    text = config.text_config
    layers, hidden, heads, kv_heads = (text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
                                       text.num_key_value_heads)  # fmt: skip
    head_dim = hidden // heads
    block = spec["latent_tokens"] + BLOCK_MARKERS
    patch_dim = config.latent_patch_size**2 * config.latent_channels
    shapes = {"guided": spec["contexts"], "unguided": spec["contexts"][:1]}
    figures = {}
    for kind, contexts in shapes.items():
        costs = [branch_flops(flops, block, context) for context in contexts]
        tokens = block * len(contexts)
        if mode == "cfg":
            compute = _busiest_rank(costs, n)
            num_bytes = cfg_bytes(len(contexts), spec["latent_tokens"], patch_dim, n)
            collectives = 1
        else:
            compute = sum(costs) / n
            num_bytes = {"tp": lambda: tp_bytes(tokens, hidden, layers, n),
                         "ulysses": lambda: ulysses_bytes(tokens, heads * head_dim, kv_heads * head_dim, layers, n),
                         "ring": lambda: ring_bytes(tokens, kv_heads * head_dim, layers, n)}[mode]()  # fmt: skip
            collectives = layers * {"tp": 2, "ulysses": 4, "ring": n - 1}[mode]
        figures[kind] = {"flops": sum(costs), "compute_s": compute / peak, "bytes_per_gpu": num_bytes,
                         "collectives": collectives, "comm_s": _seconds(num_bytes)}  # fmt: skip
    guided, unguided = figures["guided"], figures["unguided"]
    one_gpu = guided["flops"] / peak
    row = {"mode": mode, "task": task, "gpus": n, **guided, "one_gpu_s": one_gpu,
           "speedup": _speedups(one_gpu, guided["compute_s"], guided["comm_s"]), "unguided": unguided}  # fmt: skip
    # The whole denoising of one image: `guided_steps` guided steps and the rest unguided.
    counts = {"guided": spec["guided_steps"], "unguided": steps - spec["guided_steps"]}
    image_one_gpu = sum(counts[k] * figures[k]["flops"] / peak for k in counts)
    row["image_speedup"] = {
        link: {
            "no_overlap": image_one_gpu / sum(counts[k] * (figures[k]["compute_s"] + figures[k]["comm_s"][link])
                                              for k in counts),
            "overlap": image_one_gpu / sum(counts[k] * max(figures[k]["compute_s"], figures[k]["comm_s"][link])
                                           for k in counts),
        }
        for link in BANDWIDTHS
    }  # fmt: skip
    return row


def _fsdp_row(units: dict, flops: FlopModel, n: int, height: int, width: int, config, peak: float) -> dict:
    stride = config.latent_downsample
    sample = (height // stride) * (width // stride) + BLOCK_MARKERS + T2I_PROMPT_TOKENS
    samples = max(1, TRAIN_MAX_TOKENS // sample)
    forward = branch_flops(flops, sample - T2I_PROMPT_TOKENS, T2I_PROMPT_TOKENS)
    forward += T2I_PROMPT_TOKENS * flops.und_token + T2I_PROMPT_TOKENS**2 * flops.attn_per_key
    step_flops = TRAIN_FORWARDS * samples * forward
    compute = step_flops / peak
    num_bytes = fsdp_bytes(units, n)
    comm = _seconds(num_bytes)
    layers = config.text_config.num_hidden_layers
    return {"mode": "fsdp", "task": f"train t2i ({samples} x {width}x{height} per GPU)", "gpus": n,
            "flops": step_flops, "compute_s": compute, "bytes_per_gpu": num_bytes,
            "collectives": 3 * layers + 2, "comm_s": comm, "one_gpu_s": n * compute,
            "speedup": _speedups(n * compute, compute, comm), "image_speedup": None}  # fmt: skip


def communication_report(
    model: BagelForConditionalGeneration,
    height: int,
    width: int,
    steps: int,
    peak_tflops: float,
    image_sizes: dict = BAGEL_7B_IMAGE_SIZES,
) -> dict:
    """Every mode's communication and implied speed-up for `model`'s configuration (a meta-device model is enough) at
    `height` x `width`, `steps` denoising steps and `peak_tflops` per GPU; `image_sizes` are the image processor's
    (BAGEL-7B's by default), which size the edited image in the editing task's context."""
    config = model.config
    flops = count_model(model)
    text = config.text_config
    peak = peak_tflops * 1e12
    tasks = denoising_tasks(config, height, width, steps, image_sizes)
    rows = []
    for mode in MODES[:-1]:
        for task, spec in tasks.items():
            for n in GPU_COUNTS:
                if mode == "cfg" and n > len(spec["contexts"]):
                    continue
                if mode in ("tp", "ulysses") and (text.num_attention_heads % n or text.num_key_value_heads % n):
                    continue
                rows.append(_inference_row(mode, task, spec, flops, config, n, steps, peak))
    units = fsdp_units(model)
    rows += [_fsdp_row(units, flops, n, height, width, config, peak) for n in GPU_COUNTS]
    return {
        "image": f"{width}x{height}", "steps": steps, "peak_tflops": peak_tflops,
        "bandwidths": {link: {"bytes_per_s": b, "source": source} for link, (b, source) in BANDWIDTHS.items()},
        "tasks": tasks, "fsdp_units": units, "rows": rows,
    }  # fmt: skip


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def communication_table(report: dict) -> tuple[list[str], list[list]]:
    """(headers, rows) of the markdown table `examples/benchmark.py --communication` prints."""
    headers = ["mode", "task", "N", "MB per GPU per step", "collectives", "NVLink ms", "PCIe ms", "compute ms per GPU",
               "speed-up NVLink", "speed-up PCIe", "50-step image NVLink", "50-step image PCIe"]  # fmt: skip
    if report["steps"] != 50:
        headers[-2:] = [f"{report['steps']}-step image NVLink", f"{report['steps']}-step image PCIe"]

    def pair(speedup):
        return "-" if speedup is None else f"{speedup['no_overlap']:.2f}x / {speedup['overlap']:.2f}x"

    table = []
    for r in report["rows"]:
        image = r["image_speedup"] or {}
        table.append([r["mode"], r["task"], r["gpus"], f"{r['bytes_per_gpu'] / 1e6:.1f}", r["collectives"],
                      _ms(r["comm_s"]["NVLink"]), _ms(r["comm_s"]["PCIe"]),
                      _ms(r["compute_s"]), pair(r["speedup"]["NVLink"]), pair(r["speedup"]["PCIe"]),
                      pair(image.get("NVLink")), pair(image.get("PCIe"))])  # fmt: skip
    return headers, table
