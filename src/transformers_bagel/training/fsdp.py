"""
FSDP2 for BAGEL without the Trainer: shard a model with `torch.distributed.fsdp.fully_shard`, one unit per MoT decoder
layer and per SigLIP encoder layer (the classes in `_no_split_modules`, as the original wraps them), and save / load
sharded checkpoints with `torch.distributed.checkpoint`.

With the Trainer on GPUs, use `TrainingArguments(fsdp=True, fsdp_config=bagel_fsdp_config())`
instead. accelerate applies FSDP only on accelerators (on CPU it silently falls back to DDP), so CPU runs and tests
shard with [`apply_fsdp2`]:

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


def save_sharded_checkpoint(model: torch.nn.Module, checkpoint_dir: str):
    """Writes the (sharded) model state with `torch.distributed.checkpoint`; call on every rank."""
    dcp.save(get_model_state_dict(model), checkpoint_id=str(checkpoint_dir))


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


__all__ = ["apply_fsdp2", "fsdp_unit_classes", "save_sharded_checkpoint", "load_sharded_checkpoint"]
