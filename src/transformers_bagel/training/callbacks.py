"""
[`BagelEMACallback`]: an exponential moving average of the trained weights, as the original training keeps (decay
0.9999, updated after every optimiser step), saved as `ema.safetensors` in every checkpoint folder and restored when
training resumes from one.

```python
ema = BagelEMACallback(decay=0.9999)
trainer = BagelTrainer(..., callbacks=[ema])
trainer.train()                                  # checkpoint-*/ema.safetensors
load_ema_weights(model, "out/checkpoint-1000")   # the averaged weights, into a model for inference
ema.copy_to()                                    # or: the averaged weights into the trained model itself
```
"""

import contextlib
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging


logger = logging.get_logger(__name__)

EMA_WEIGHTS_NAME = "ema.safetensors"


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter; a collective for DTensors."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class BagelEMACallback(TrainerCallback):
    """
    Keeps `ema = decay * ema + (1 - decay) * param` (in float32) for every trainable parameter, updated on each
    optimiser step, and writes it to `<checkpoint>/ema.safetensors` (keys are the model's parameter names) whenever the
    Trainer saves. Frozen parameters are left out: their average is the parameter itself. Under FSDP2 the averages
    stay sharded like the parameters and are gathered only to be saved.

    Short runs can warm the average up (`warmup_power`, diffusers' `EMAModel(use_ema_warmup=True, inv_gamma=1)`
    schedule): the decay after optimiser step `t` is then `min(decay, 1 - t ** -warmup_power)`, 0 at the first step,
    so the average forgets the initial weights at once and follows the early, fast-moving weights closely.
    [`~BagelEMACallback.swapped_in`] runs code (e.g. sampling) on the averaged weights during training and
    [`~BagelEMACallback.copy_to`] installs them in the model for good.

    Args:
        decay (`float`, defaults to 0.9999): the original's decay (with `warmup_power`, the largest decay).
        resume_from_checkpoint (`str`, *optional*): a checkpoint folder whose `ema.safetensors` seeds the averages
            (set automatically by [`BagelTrainer.train`]`(resume_from_checkpoint=...)`).
        warmup_power (`float`, *optional*): the warm-up exponent (diffusers' `power`: with 2/3 the decay reaches
            0.999 after about 31,600 steps, with 3/4 after 10,000); `None` (the original) keeps the decay constant.
            The warm-up counts the Trainer's `global_step`, so a resumed run continues its schedule.
    """

    def __init__(
        self, decay: float = 0.9999, resume_from_checkpoint: str | None = None, warmup_power: float | None = None
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"The EMA decay must be in [0, 1], got {decay}.")
        if warmup_power is not None and not warmup_power > 0:
            raise ValueError(f"`warmup_power` must be > 0 (or None for a constant decay), got {warmup_power!r}.")
        self.decay = decay
        self.warmup_power = warmup_power
        self.resume_from_checkpoint = resume_from_checkpoint
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self.shadow: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("BagelEMACallback needs the Trainer's model.")
        named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        self.shadow = [param.detach().float().clone() for param in self.params]
        if self.resume_from_checkpoint:
            path = os.path.join(self.resume_from_checkpoint, EMA_WEIGHTS_NAME)
            if os.path.isfile(path):
                self._load(load_file(path))
                logger.info(f"Resumed the EMA weights from {path}")
            else:
                logger.warning(f"{path} does not exist: the EMA restarts from the current weights.")

    def _load(self, saved: dict[str, torch.Tensor]):
        missing = [name for name in self.names if name not in saved]
        if missing:
            raise ValueError(f"The saved EMA lacks {len(missing)} trained parameter(s), e.g. {missing[:3]}.")
        for index, (name, shadow) in enumerate(zip(self.names, self.shadow)):
            value = saved[name].to(device=shadow.device, dtype=torch.float32)
            if hasattr(shadow, "device_mesh"):  # FSDP2: keep the local shard of the full saved tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, shadow.device_mesh, shadow.placements)
            self.shadow[index] = value

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimiser step `step` (counted from 1): `decay`, or with `warmup_power`
        `min(decay, 1 - step ** -warmup_power)`."""
        if self.warmup_power is None:
            return self.decay
        if step < 1:
            raise ValueError(f"Optimiser steps count from 1, got {step!r}.")
        return min(self.decay, 1.0 - step**-self.warmup_power)

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        if not self.shadow:
            return
        decay = self.decay if self.warmup_power is None else self.decay_at(state.global_step)  # `state` may be None
        torch._foreach_mul_(self.shadow, decay)
        torch._foreach_add_(self.shadow, [param.detach().float() for param in self.params], alpha=1.0 - decay)

    def _check_started(self):
        if not self.params:
            raise ValueError("The EMA has no weights yet: it starts with training (`on_train_begin`).")

    @torch.no_grad()
    def copy_to(self):
        """Replaces the trained parameters by their averages (in the parameters' dtype), e.g. before saving."""
        self._check_started()
        for param, shadow in zip(self.params, self.shadow):
            param.copy_(shadow)

    @contextlib.contextmanager
    def swapped_in(self):
        """Context manager: inside it the model holds the averaged weights, after it its own trained weights again
        (exactly)."""
        self._check_started()
        with torch.no_grad():
            trained = [param.detach().clone() for param in self.params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, trained):
                    param.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages as full CPU tensors keyed by parameter name (a collective under FSDP2: call on all ranks)."""
        return {name: _full(shadow).detach().cpu().contiguous() for name, shadow in zip(self.names, self.shadow)}

    def on_save(self, args, state, control, **kwargs):
        weights = self.state_dict()
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save_file(weights, os.path.join(folder, EMA_WEIGHTS_NAME), metadata={"decay": str(self.decay)})


@torch.no_grad()
def load_ema_weights(model: torch.nn.Module, checkpoint_dir: str) -> list[str]:
    """
    Copies `<checkpoint_dir>/ema.safetensors` into `model`'s parameters of the same names (the model the callback saw:
    a PEFT model for LoRA runs). Returns the names loaded; unknown names are refused.
    """
    saved = load_file(os.path.join(checkpoint_dir, EMA_WEIGHTS_NAME))
    params = dict(model.named_parameters())
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise ValueError(f"The EMA file names parameters the model does not have, e.g. {unknown[:3]}.")
    for name, value in saved.items():
        params[name].copy_(value.to(params[name].dtype))
    return sorted(saved)


__all__ = ["BagelEMACallback", "load_ema_weights", "EMA_WEIGHTS_NAME"]
