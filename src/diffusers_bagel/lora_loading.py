"""
The LoRA methods diffusers users reach for on a pipeline (`load_lora_weights`, `fuse_lora`, `unfuse_lora`,
`set_adapters`, `disable_lora`, `enable_lora`, `unload_lora_weights`, `get_active_adapters`), for BAGEL's adapters.

diffusers' `LoraLoaderMixin` converts checkpoints of diffusers' own denoisers (UNets, DiT transformers) and cannot
place adapters on BAGEL's MoT decoder; BAGEL's adapters are plain peft folders on the generation experts
(`transformers_bagel.training.lora`). These methods keep diffusers' names and meanings and do the work with peft,
on the pipeline's model object in place.
"""

from __future__ import annotations


__all__ = ["BagelLoraLoaderMixin"]


class BagelLoraLoaderMixin:
    """diffusers' LoRA loading API on [`BagelPipeline`], over peft. Adapters go on `pipe.model` in place."""

    def _lora_layers(self) -> list:
        from peft.tuners.lora import LoraLayer  # here: peft and the training package load on first use

        return [module for module in self.model.modules() if isinstance(module, LoraLayer)]

    def _peft_model(self):
        peft_model = getattr(self, "_bagel_peft_model", None)
        if peft_model is None:
            raise ValueError("No LoRA adapter is loaded: call `pipe.load_lora_weights(path)` first.")
        return peft_model

    def load_lora_weights(self, pretrained_model_name_or_path, adapter_name: str | None = None, **kwargs) -> None:
        """
        Loads a BAGEL LoRA adapter (a peft folder, e.g. `examples/train.py --lora`'s `final/`, or a Hub repo id) into
        the pipeline's model and makes it active. `adapter_name` defaults to `default_0`, `default_1`, ... (as
        diffusers names them); `kwargs` (`subfolder`, `revision`, ...) go to peft's loader.
        """
        from transformers_bagel.training.lora import check_bagel_lora_path, load_bagel_lora

        peft_model = getattr(self, "_bagel_peft_model", None)
        loaded = list(peft_model.peft_config) if peft_model is not None else []
        if adapter_name is None:
            adapter_name = f"default_{len(loaded)}"
        if adapter_name in loaded:
            raise ValueError(f"An adapter named {adapter_name!r} is loaded already; choose another `adapter_name`.")
        if peft_model is None:  # load_bagel_lora checks the path first
            self._bagel_peft_model = load_bagel_lora(self, pretrained_model_name_or_path, adapter_name, **kwargs)
        else:
            check_bagel_lora_path(pretrained_model_name_or_path, kwargs.get("subfolder"), kwargs.get("revision"))
            peft_model.load_adapter(pretrained_model_name_or_path, adapter_name=adapter_name, **kwargs)
            peft_model.set_adapter(adapter_name)

    def get_active_adapters(self) -> list[str]:
        """The names of the active adapters (empty when none is loaded)."""
        peft_model = getattr(self, "_bagel_peft_model", None)
        return list(peft_model.active_adapters) if peft_model is not None else []

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Makes `adapter_names` the active adapters, each scaled by its weight (1.0 by default), as diffusers does."""
        peft_model = self._peft_model()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = sorted(set(names) - set(peft_model.peft_config))
        if unknown:
            raise ValueError(f"Unknown adapters {unknown}; loaded: {sorted(peft_model.peft_config)}.")
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"`adapter_weights` holds {len(weights)} weights for {len(names)} adapters.")
        peft_model.base_model.set_adapter(names)
        for layer in self._lora_layers():
            for name, weight in zip(names, weights):
                layer.set_scale(name, 1.0 if weight is None else float(weight))

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        """Folds the active adapters (or `adapter_names`), scaled by `lora_scale`, into the base weights: inference
        then runs at the base model's speed. `unfuse_lora()` takes them out again."""
        self._peft_model()
        if getattr(self, "_bagel_fused_scale", None) is not None:
            raise ValueError("The adapters are fused already; `unfuse_lora()` first.")
        for layer in self._lora_layers():
            layer.scale_layer(lora_scale)
            layer.merge(adapter_names=adapter_names)
        self._bagel_fused_scale = lora_scale

    def unfuse_lora(self) -> None:
        """Takes the fused adapters out of the base weights again (see [`fuse_lora`])."""
        scale = getattr(self, "_bagel_fused_scale", None)
        if scale is None:
            return
        for layer in self._lora_layers():
            layer.unmerge()
            layer.unscale_layer(scale)
        self._bagel_fused_scale = None

    def disable_lora(self) -> None:
        """Runs the base model: the adapters stay loaded but do nothing until `enable_lora()`."""
        self._peft_model().base_model.disable_adapter_layers()

    def enable_lora(self) -> None:
        """Runs the active adapters again after `disable_lora()`."""
        self._peft_model().base_model.enable_adapter_layers()

    def unload_lora_weights(self) -> None:
        """Removes every adapter: `pipe.model` is the base model again (fused adapters are taken out first)."""
        peft_model = getattr(self, "_bagel_peft_model", None)
        if peft_model is None:
            return
        self.unfuse_lora()
        peft_model.unload()
        self._bagel_peft_model = None
