"""BAGEL for diffusers: `BagelPipeline` and BAGEL's flow-matching scheduler.

The package loads lazily, as diffusers and transformers do: `import diffusers_bagel` (and so the `bagel` command's
`--help`) imports nothing heavy, and the first use of `BagelPipeline`, `BagelPipelineOutput` or
`FlowMatchEulerScheduler` imports them with `transformers_bagel`, which registers the model, so the components named
in a converted folder's `model_index.json` are resolvable."""

import importlib


__all__ = ["BagelGRPOConfig", "BagelGRPOTrainer", "BagelPipeline", "BagelPipelineOutput", "FlowMatchEulerScheduler"]

_MODULES = {
    "BagelGRPOConfig": ".grpo",
    "BagelGRPOTrainer": ".grpo",
    "BagelPipeline": ".pipeline_bagel",
    "BagelPipelineOutput": ".pipeline_output",
    "FlowMatchEulerScheduler": ".scheduling_flow_match_euler",
}


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module("transformers_bagel")  # registers the model with transformers' Auto classes
    value = getattr(importlib.import_module(_MODULES[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *__all__])
