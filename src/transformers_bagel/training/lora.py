"""
LoRA on BAGEL's generation experts with peft.

The adapters go on the `*_moe_gen` linears of every decoder layer (`{q,k,v,o}_proj_moe_gen`,
`mlp_moe_gen.{gate,up,down}_proj`) and, optionally, on `vae2llm` / `llm2vae`. Understanding tokens never pass through
these modules, so the model's text and understanding outputs are exactly those of the base model.

Training:

```python
from transformers_bagel.training import bagel_lora_config, get_bagel_lora_model

model = get_bagel_lora_model(model, bagel_lora_config(r=16))   # a peft.PeftModel; train it with BagelTrainer
model.save_pretrained("my-lora")                                # adapter_config.json + adapter_model.safetensors
```

Inference, into the model or a pipeline (in place: the pipeline keeps calling the same model object):

```python
model = BagelForConditionalGeneration.from_pretrained("BAGEL/model")
model.load_adapter("my-lora")                        # transformers' PEFT integration; or
load_bagel_lora(model, "my-lora")                    # returns the peft.PeftModel wrapping `model`

pipe = BagelPipeline.from_pretrained("BAGEL")
load_bagel_lora(pipe, "my-lora")                     # = PeftModel.from_pretrained(pipe.model, "my-lora")
load_bagel_lora(pipe, "my-lora", merge=True)         # folds the adapter into pipe.model's weights
```
"""

import os
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights
from transformers.utils import logging


logger = logging.get_logger(__name__)

# A full-match regex over module names (peft's rule for a string `target_modules`): only generation-expert linears.
GEN_EXPERT_TARGET_MODULES = (
    r".*language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj_moe_gen|mlp_moe_gen\.(gate|up|down)_proj)"
)
LATENT_PROJECTION_TARGET_MODULES = r".*\b(vae2llm|llm2vae)"


def bagel_lora_config(
    r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    include_latent_projections: bool = False,
    **kwargs,
) -> LoraConfig:
    """
    A `peft.LoraConfig` targeting the generation experts only.

    Args:
        r (`int`, defaults to 16): LoRA rank.
        lora_alpha (`int`, *optional*): scaling numerator; defaults to `r`.
        lora_dropout (`float`, defaults to 0.0): dropout on the LoRA input.
        include_latent_projections (`bool`, defaults to `False`): also adapt `vae2llm` and `llm2vae`.
        **kwargs: any other `LoraConfig` field (e.g. `use_rslora=True`, `init_lora_weights="gaussian"`).
    """
    if "target_modules" in kwargs:
        raise ValueError("bagel_lora_config chooses `target_modules` itself; build a peft.LoraConfig for other targets.")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"The LoRA rank must be a positive integer, got {r!r}.")
    target = GEN_EXPERT_TARGET_MODULES
    if include_latent_projections:
        target = f"(?:{GEN_EXPERT_TARGET_MODULES})|(?:{LATENT_PROJECTION_TARGET_MODULES})"
    return LoraConfig(
        r=r, lora_alpha=lora_alpha if lora_alpha is not None else r, lora_dropout=lora_dropout, target_modules=target, **kwargs
    )


def get_bagel_lora_model(model, config: LoraConfig | None = None, **config_kwargs) -> PeftModel:
    """Wraps `model` in a `peft.PeftModel` with LoRA on the generation experts (config from [`bagel_lora_config`]
    unless given); only the adapter weights are trainable."""
    if config is None:
        config = bagel_lora_config(**config_kwargs)
    elif config_kwargs:
        raise ValueError("Pass either a LoraConfig or keyword arguments for bagel_lora_config, not both.")
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info(f"LoRA on the generation experts: {trainable:,} trainable parameters.")
    return peft_model


def check_bagel_lora_path(adapter_path, subfolder: str | None = None, revision: str | None = None) -> None:
    """
    Refuses, at once and without the network, an adapter path that cannot load: a local-looking path (see below)
    that is not a folder, a folder without `adapter_config.json`, or a Hub repo id while `HF_HUB_OFFLINE` is set
    and the Hub cache does not hold it. Call it before loading a model (`load_bagel_lora` calls it first).

    A path is local, never sent to the Hub, when it is a `PathLike`, is absolute, starts with `.` or `~`, ends with
    a separator, holds the OS's own separator (Windows), is not a valid Hub repo id `namespace/name` (one `/`, the
    Hub's characters), or when its parent folder exists (`runs/` of `runs/missing-lora`). Anything else is a Hub
    repo id, looked up by peft as before (a lookup that fails is reported naming both readings).

    Raises:
        `FileNotFoundError` naming the path and what is missing.
    """
    text = str(adapter_path)
    config_name = "adapter_config.json" if not subfolder else f"{subfolder}/adapter_config.json"
    folder = Path(text).expanduser()
    if folder.is_dir():
        if not (folder / config_name).is_file():
            raise FileNotFoundError(
                f"LoRA adapter folder {text!r} holds no {config_name} (a LoRA run of examples/train.py saves its "
                "adapter in OUTPUT_DIR/final, and in each OUTPUT_DIR/checkpoint-N)."
            )
        return
    if _looks_local(adapter_path):
        # A local-looking path is never sent to the Hub (where it would spend retries before failing the same way).
        raise FileNotFoundError(f"LoRA adapter folder {text!r} does not exist (relative to {os.getcwd()!r}).")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(text, config_name, revision=revision), str):
            raise FileNotFoundError(
                f"LoRA adapter {text!r} does not exist: there is no local folder of that name (relative to "
                f"{os.getcwd()!r}), and HF_HUB_OFFLINE is set while the Hub cache does not hold that repo's "
                f"{config_name}."
            )


def load_bagel_lora(target, adapter_path: str, adapter_name: str = "default", merge: bool = False, **kwargs):
    """
    Loads a saved adapter into a [`BagelForConditionalGeneration`] or into a `BagelPipeline`'s model, in place.

    Args:
        target: the model, or a pipeline with a `.model`.
        adapter_path (`str`): folder written by `PeftModel.save_pretrained` (or a `Trainer` checkpoint of a LoRA run),
            or a Hub repo id. A path that looks local and does not exist fails at once ([`check_bagel_lora_path`]).
        adapter_name (`str`, defaults to `"default"`).
        merge (`bool`, defaults to `False`): fold the adapter into the base weights (`merge_and_unload`): no LoRA
            modules remain and inference runs at the base model's speed.
        **kwargs: forwarded to `PeftModel.from_pretrained`.

    Returns:
        The `peft.PeftModel` (unmerged) or the merged model. A pipeline's `.model` is the model object in both cases.
    """
    check_bagel_lora_path(adapter_path, kwargs.get("subfolder"), kwargs.get("revision"))
    is_pipeline = not hasattr(target, "predict_velocity") and hasattr(target, "model")
    model = target.model if is_pipeline else target
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_path, adapter_name=adapter_name, **kwargs)
    except ValueError as error:  # peft: "Can't find 'adapter_config.json' at ..." after a failed Hub lookup
        if Path(str(adapter_path)).expanduser().is_dir() or "adapter_config.json" not in str(error):
            raise
        raise FileNotFoundError(
            f"LoRA adapter {str(adapter_path)!r} does not exist: there is no local folder of that name (relative to "
            f"{os.getcwd()!r}), and the Hub lookup of it as a repo id failed ({error})."
        ) from error
    peft_model.eval()
    # peft loads an adapter whose saved weights match no module with a warning only: the model would run unchanged.
    saved = load_peft_weights(str(adapter_path), **{k: kwargs[k] for k in ("subfolder", "revision") if k in kwargs})
    loaded = {name for name, _ in peft_model.named_parameters()}
    matched = [key for key in saved if _with_adapter_name(key, adapter_name) in loaded]
    if not matched:
        raise ValueError(
            f"The adapter in {str(adapter_path)!r} changes nothing in this model: none of its {len(saved)} weights "
            "matches a module (an adapter of another model, or saved with other module names)."
        )
    if not merge:
        return peft_model
    merged = peft_model.merge_and_unload()
    if is_pipeline:
        target.model = merged
    return merged


def _with_adapter_name(saved_key: str, adapter_name: str) -> str:
    """A saved adapter key (peft drops the adapter name: `...lora_A.weight`) as the model names the parameter
    (`...lora_A.<adapter_name>.weight`)."""
    module, leaf = saved_key.rsplit(".", 1)
    return f"{module}.{adapter_name}.{leaf}"


def _looks_local(path) -> bool:
    """Whether `path` names a local folder rather than a Hub repo id (`namespace/name`); see
    [`check_bagel_lora_path`]."""
    if isinstance(path, os.PathLike):
        return True
    text = str(path)
    separators = {os.sep, os.altsep} - {None, "/"}
    return (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.endswith(("/", os.sep))
        or any(separator in text for separator in separators)
        or not _is_repo_id(text)
        or Path(text).parent.is_dir() and Path(text).parent != Path(".")
    )


def _is_repo_id(text: str) -> bool:
    """A valid Hub repo id with a namespace (`owner/name`): adapters have no legacy bare names."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _hub_offline() -> bool:
    """`HF_HUB_OFFLINE`, read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


__all__ = [
    "GEN_EXPERT_TARGET_MODULES",
    "LATENT_PROJECTION_TARGET_MODULES",
    "bagel_lora_config",
    "check_bagel_lora_path",
    "get_bagel_lora_model",
    "load_bagel_lora",
]
