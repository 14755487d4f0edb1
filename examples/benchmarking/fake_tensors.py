"""`--meta_only`: counted FLOPs and memory of a whole generation at a configuration's full size, on fake weights
(torch's `FakeTensorMode`: real shapes, dtypes and storage sizes, no data; nothing is allocated or computed)."""

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffusers_bagel import FlowMatchEulerScheduler

from .flops import count_flops
from .generation import branch_lengths, kv_cache_bytes, make_task, prefill, schedule
from .models import build_pipeline
from .understanding import understanding_inputs


__all__ = ["analyse_on_fake_tensors"]


class LiveBytes(TorchDispatchMode):
    """
    Bytes of the tensor storages created inside the mode and still alive, and their peak. Fake tensors have storages
    of their real sizes (and no data), so under fake weights this is the activation memory of a call, allocated
    nowhere. Views share their base's storage and count once; a storage counts until it is freed.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = weakref.WeakSet()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result lives in an input's storage (a weight's, say): nothing new.
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage._cdata not in inputs and storage not in self._seen:
                    self._seen.add(storage)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, storage.nbytes())
                    self.peak = max(self.peak, self.live)
        return out


def fake_weights(module: torch.nn.Module, fake_mode: FakeTensorMode) -> torch.nn.Module:
    """`module`, built on the meta device, with every parameter and buffer a fake tensor on the CPU: real shapes,
    dtypes and storage sizes, no data. Real inputs then run through it (`allow_non_fake_inputs`): whatever touches a
    weight is fake, while the token ids, positions and image grids stay real, so the model reads its layout as it
    does on a real run."""
    with fake_mode:
        return module.to_empty(device="cpu")


def analyse_on_fake_tensors(args, peak_tflops: float) -> dict:
    """
    Counted FLOPs and memory of a whole generation at the configuration's full size, on fake weights (nothing is
    allocated or computed): for text-to-image and editing, the context prefill, one step with every guidance branch
    (t = 1) and one with the full context only, the number of guided steps of the schedule, the KV cache, the activation
    peak, the VAE decode; for understanding, the prefill of one image and a question and one decoding step. The floor
    of a task is its FLOPs over `peak_tflops`.
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    pipe = build_pipeline(args.config, torch.device("meta"), args.dtype, args.attn, args.num_layers)
    fake_weights(pipe.model, fake_mode)
    fake_weights(pipe.vae, fake_mode)
    model = pipe.model
    sigmas = schedule(args.steps)
    grid = (args.height // pipe.latent_downsample, args.width // pipe.latent_downsample)
    report = {
        "config": args.config, "dtype": str(args.dtype).replace("torch.", ""), "image": f"{args.width}x{args.height}",
        "steps": args.steps, "peak_tflops": peak_tflops,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "vae_param_bytes": sum(p.numel() * p.element_size() for p in pipe.vae.parameters()),
        "kv_cache_bytes": {}, "peak_activation_bytes": {}, "activation_peaks": {}, "floor_s": {},
    }  # fmt: skip
    latents = torch.zeros(1, model.config.latent_channels, grid[0] * pipe.latent_patch_size,
                          grid[1] * pipe.latent_patch_size, dtype=args.dtype)  # fmt: skip
    with torch.no_grad(), LiveBytes() as live:
        _, report["vae_decode_flops"] = count_flops(model, lambda: pipe.vae.decode(latents))
    vae_peak = live.peak

    for name in ("t2i", "edit"):
        task = make_task(name, args)
        contexts = pipe.build_contexts(task.items, think=False)
        with torch.no_grad():
            with LiveBytes() as live:
                guidance, prefill_flops = count_flops(model, lambda: prefill(pipe, contexts, task.preset))
            kv_bytes = kv_cache_bytes(guidance.context)
            prefill_peak = live.peak - kv_bytes  # beyond the finished cache: the prefill's transient memory
            x = pipe.prepare_latents(1, args.height, args.width, torch.float32, torch.device("cpu"),
                                     torch.manual_seed(args.seed))  # fmt: skip
            pipe.guided_velocity(x, sigmas[0], grid, guidance)  # builds the context's step-invariant inputs
            with LiveBytes() as live:
                _, step_flops = count_flops(model, lambda: pipe.guided_velocity(x, sigmas[0], grid, guidance))
            step_peak = live.peak
            cond = guidance.spans["cond"]
            _, unguided_flops = count_flops(
                model, lambda: model.predict_velocity(x.to(args.dtype), sigmas[0], grid, guidance.context, cond)
            )
        guided_steps = sum(guidance.use_text and FlowMatchEulerScheduler.cfg_active(sigma, guidance.cfg_interval)
                           for sigma in sigmas[:-1])  # fmt: skip
        total = (prefill_flops + guided_steps * step_flops + (args.steps - guided_steps) * unguided_flops
                 + report["vae_decode_flops"])  # fmt: skip
        report[name] = {
            "prefill_flops": prefill_flops, "step_flops": step_flops, "unguided_step_flops": unguided_flops,
            "guided_steps": guided_steps, "cfg_branches": guidance.num_branches,
            "context_tokens": branch_lengths(guidance), "total_flops": total,
        }  # fmt: skip
        report["kv_cache_bytes"][name] = kv_bytes
        report["peak_activation_bytes"][name] = max(prefill_peak, step_peak, vae_peak)
        report["activation_peaks"][name] = {"prefill": prefill_peak, "step": step_peak, "vae_decode": vae_peak}
        report["floor_s"][name] = total / (peak_tflops * 1e12)

    report["understand"] = analyse_understanding_on_fake_tensors(pipe, args)
    return report


def analyse_understanding_on_fake_tensors(pipe, args) -> dict:
    """FLOPs of the prefill of one image and a question, and of one decoding step after it (fake weights)."""
    model = pipe.model
    inputs = understanding_inputs(pipe, args)
    with torch.no_grad():
        output, prefill_flops = count_flops(model, lambda: model(**inputs, use_cache=True, logits_to_keep=1))
        token = torch.zeros((1, 1), dtype=torch.long)
        position = output.next_position[:, None]
        _, step_flops = count_flops(model, lambda: model(input_ids=token, position_ids=position, cache=output.cache,
                                                         text_only=True, use_cache=True))  # fmt: skip
    return {"context_tokens": int(inputs["input_ids"].shape[1]), "prefill_flops": prefill_flops,
            "decode_step_flops": step_flops}  # fmt: skip
