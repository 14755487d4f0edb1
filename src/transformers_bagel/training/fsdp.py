"""
FSDP2 for BAGEL without the Trainer: shard a model with `torch.distributed.fsdp.fully_shard`, one unit per MoT decoder
layer and per SigLIP encoder layer (the classes in `_no_split_modules`, as the original wraps them), and save / load
sharded checkpoints with `torch.distributed.checkpoint`.

With the Trainer, use `accelerate launch --config_file examples/accelerate/fsdp2.yaml` or
`TrainingArguments(fsdp=True, fsdp_config=bagel_fsdp_config())`: accelerate shards the model itself on accelerators,
and [`BagelTrainer`] has it do the same on CPU (gloo) launches, which accelerate would otherwise train under DDP
(see [`enable_fsdp2_on_cpu`]). Without the Trainer, shard with [`apply_fsdp2`]:

```python
torch.distributed.init_process_group("gloo")                  # "nccl" on GPUs
mesh = init_device_mesh("cpu", (world_size,))
apply_fsdp2(model, mesh)                                      # parameters are now DTensor shards
... train ...
save_sharded_checkpoint(model, "ckpt")                        # every rank writes its shards
# later, in one process:
load_sharded_checkpoint(plain_model, "ckpt")
```
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from transformers.utils import logging


logger = logging.get_logger(__name__)


def fsdp_unit_classes(model) -> set[str]:
    """Names of the module classes each made an FSDP unit: the model's `_no_split_modules`."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    if not classes:
        raise ValueError(f"{type(model).__name__} declares no `_no_split_modules` to wrap.")
    return classes


def apply_fsdp2(model: torch.nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True, **kwargs):
    """
    Shards `model` in place with FSDP2: `fully_shard` on every decoder / ViT encoder layer, then on the root.

    Args:
        model: a [`BagelForConditionalGeneration`] (or a PEFT model wrapping one).
        mesh (`DeviceMesh`, *optional*): defaults to all ranks of the default process group.
        mp_policy (`MixedPrecisionPolicy`, *optional*): e.g. bf16 parameters with fp32 gradient reduction.
        reshard_after_forward (`bool`, defaults to `True`): free the gathered layer after its forward (ZeRO-3).
        **kwargs: forwarded to `fully_shard` (e.g. `offload_policy`).

    Returns:
        The same model, now an `FSDPModule` whose parameters are `DTensor` shards.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, **kwargs)
    options["mp_policy"] = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    classes = fsdp_unit_classes(getattr(model, "get_base_model", lambda: model)())
    units = [module for module in model.modules() if type(module).__name__ in classes]
    if not units:
        raise ValueError(f"No module of the classes {sorted(classes)} was found in the model.")
    for module in units:
        fully_shard(module, **options)
    fully_shard(model, **options)
    logger.info(f"FSDP2: {len(units)} units plus the root.")
    return model


def enable_fsdp2_on_cpu(accelerator, plugin_kwargs: dict | None = None) -> bool:
    """
    Has accelerate shard with FSDP2 on a CPU (gloo) launch, as it does on accelerators. FSDP was requested (an FSDP
    `accelerate launch` config, or `TrainingArguments(fsdp=...)`, both of which set `ACCELERATE_USE_FSDP`), but
    `AcceleratorState.__init__` (accelerate/state.py) turns a multi-process run into `DistributedType.FSDP` only for
    accelerator types (`MULTI_GPU`, `MULTI_XPU`, ...), so a `MULTI_CPU` run would be wrapped in DDP, unsharded. This
    makes the state FSDP with the requested plugin, exactly as that branch does on accelerators; everything after
    (`fsdp2_prepare_model` with `cpu_ram_efficient_loading`, sharded `save_fsdp_model` / `load_fsdp_model`, gradient
    clipping) is accelerate's own, device-agnostic code. Called by [`BagelTrainer`] once its accelerator exists.

    Args:
        accelerator (`Accelerator`): the trainer's accelerator, just created.
        plugin_kwargs (`dict`, *optional*): `TrainingArguments.fsdp_plugin_args`; default: the launch's `FSDP_*`
            environment variables, as `FullyShardedDataParallelPlugin()` reads them.

    Returns:
        Whether the state was switched to FSDP (False when FSDP was not requested or accelerate applies it itself).

    Raises:
        ValueError: FSDP was requested but cannot apply (FSDP1 on CPU, or several processes that accelerate does not
            see as one distributed run): training unsharded instead would be silent.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not requested or getattr(state, "fsdp_plugin", None) is not None:
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(
            f"FSDP was requested, but accelerate set up a {state.distributed_type.value} run "
            f"({int(os.environ.get('WORLD_SIZE', 1))} process(es)) in which it cannot shard: launch with `accelerate "
            "launch --config_file examples/accelerate/fsdp2.yaml` or `torchrun`, and on a machine without an "
            "accelerator train on the CPU (`TrainingArguments(use_cpu=True)`, examples/train.py --use_cpu)."
        )
    plugin = FullyShardedDataParallelPlugin(**(plugin_kwargs or {}))
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"On CPUs BAGEL shards with FSDP2 only; the FSDP config asks for version {plugin.fsdp_version}."
        )
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.info(f"FSDP2 on {state.num_processes} CPU process(es) ({state.backend}).")
    return True


class CheckpointTensors(Mapping):
    """The tensors of a `save_pretrained` safetensors folder (one file or an index of shards) by state-dict key, each
    read from its file when asked for and held nowhere: a state dict that costs no memory until used."""

    def __init__(self, folder):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: folder / name for key, name in weight_map.items()}
        else:
            with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), folder / "model.safetensors")

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def __contains__(self, key) -> bool:
        return key in self.files

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def shard_from_checkpoint(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """
    FSDP2 sharding with `cpu_ram_efficient_loading` that streams the weights from the checkpoint files, for CPU
    processes, where the shards live in host memory too. accelerate's `fsdp2_prepare_model` broadcasts local rank
    0's loaded model, whose full state dict it holds until every shard is made: rank 0 then peaks at the full model
    plus its shard (the weights plus the shards of all ranks: twice the model on one machine). Here every rank moves
    the model to `meta`, accelerate shards it there (`fsdp2_prepare_model` with the plugin's settings, activation
    checkpointing first as `Accelerator.prepare` does), and accelerate's `fsdp2_load_full_state_dict` broadcasts
    rank 0's tensors read one at a time from the files the model was loaded from ([`CheckpointTensors`]): the
    machine's peak is about the shards plus one tensor per process.

    Returns the sharded model (an `FSDPModule`, which `Accelerator.prepare` then keeps as it is), or the model
    unchanged when the plugin does not ask for memory-efficient loading or the model's state dict does not match
    the files of `model.name_or_path` (e.g. a PEFT wrapper or a model built in memory): accelerate's own path then
    loads it.
    """
    from accelerate.utils import fsdp2_apply_ac, fsdp2_load_full_state_dict, fsdp2_prepare_model
    from accelerate.utils.modeling import get_non_persistent_buffers

    plugin = accelerator.state.fsdp_plugin
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if not plugin.cpu_ram_efficient_loading or not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return model
    tensors = CheckpointTensors(folder)  # headers only
    if set(model.state_dict()) - set(tensors):
        logger.info(f"The model's state dict does not match {folder}: accelerate fills the shards from rank 0.")
        return model
    non_persistent = get_non_persistent_buffers(model, recurse=True, fqns=True)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers() if name in non_persistent}
    model = model.to(torch.device("meta"))
    if plugin.activation_checkpointing:
        model = fsdp2_apply_ac(accelerator, model)
    plugin.cpu_ram_efficient_loading = False  # shard on meta only: the weights come from the files below
    try:
        model = fsdp2_prepare_model(accelerator, model)
    finally:
        plugin.cpu_ram_efficient_loading = True
    fsdp2_load_full_state_dict(accelerator, model, tensors if accelerator.is_main_process else {})
    for name, buffer in buffers.items():
        parent, _, leaf = name.rpartition(".")
        model.get_submodule(parent).register_buffer(leaf, buffer.to(accelerator.device), persistent=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    logger.info(f"FSDP2: sharded on meta and loaded from {folder}, one tensor at a time.")
    return model


def save_sharded_checkpoint(model: torch.nn.Module, checkpoint_dir: str):
    """Writes the (sharded) model state with `torch.distributed.checkpoint`; call on every rank."""
    dcp.save(get_model_state_dict(model), checkpoint_id=str(checkpoint_dir))


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint_dir: str):
    """
    Loads an optimizer state written by accelerate's `save_fsdp_optimizer` (a `torch.distributed.checkpoint` folder
    under the key `"optimizer"`, e.g. a Trainer checkpoint's `optimizer_0`) into the optimizer of a sharded `model`, on
    any number of processes. Parameters that had no state when it was saved (they never received a gradient, e.g.
    the generation expert in an understanding-only run) are left without state, as in the uninterrupted run.

    accelerate's own `load_fsdp_optimizer` (accelerate/utils/fsdp_utils.py) fails on such checkpoints ("Missing key in
    checkpoint state_dict"): `get_optimizer_state_dict` gives every parameter a state before loading, which a strict
    `DefaultLoadPlanner()` then requires from the checkpoint. A `DefaultLoadPlanner(allow_partial_load=True)` there
    (and dropping the states not read) would unblock it.
    """
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    reader = dcp.FileSystemReader(str(checkpoint_dir))
    saved = list(reader.read_metadata().state_dict_metadata)
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    state = state["optimizer"]
    state["state"] = {
        name: value
        for name, value in state["state"].items()
        if any(key.startswith(f"optimizer.state.{name}.") for key in saved)
    }
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(strict=False))
    return optimizer


def load_sharded_checkpoint(model: torch.nn.Module, checkpoint_dir: str):
    """
    Loads a checkpoint written by [`save_sharded_checkpoint`] into `model`: an unsharded model in a single process
    (no process group needed), or a sharded one on every rank (any world size: the checkpoint is resharded).
    """
    state_dict = get_model_state_dict(model)
    single = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dcp.load(state_dict, checkpoint_id=str(checkpoint_dir), no_dist=single)
    set_model_state_dict(model, state_dict)
    return model


__all__ = [
    "CheckpointTensors",
    "apply_fsdp2",
    "enable_fsdp2_on_cpu",
    "fsdp_unit_classes",
    "load_sharded_checkpoint",
    "load_sharded_optimizer",
    "save_sharded_checkpoint",
    "shard_from_checkpoint",
]
