"""
The top-level files of a converted BAGEL pipeline folder (beside its `model/`, `vae/`, `scheduler/`, `processor/`).

- `model_index.json` names the pipeline class in diffusers' custom-pipeline form, `["pipeline_bagel",
  "BagelPipeline"]`, and ships `pipeline_bagel.py`, one import line: so `DiffusionPipeline.from_pretrained(folder,
  trust_remote_code=True)` finds `BagelPipeline` (diffusers looks pipeline classes up in its own namespace otherwise).
  `BagelPipeline.from_pretrained(folder)` reads the same index without running that file.
- `config.json` and `processor_config.json` only tell transformers' Auto classes that this is a pipeline folder, so
  that `AutoModelForImageTextToText.from_pretrained(folder)` / `AutoProcessor.from_pretrained(folder)` say to pass
  `subfolder="model"` / `subfolder="processor"` instead of "Unrecognized model" (see `BagelConfig.from_dict` and
  `BagelProcessor.from_pretrained`).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
from transformers_bagel.configuration_bagel import PIPELINE_FOLDER_KEY


__all__ = [
    "CLASS_NAME",
    "PIPELINE_MODULE",
    "PIPELINE_CODE",
    "pipeline_index_class_name",
    "write_pipeline_code_and_pointers",
    "write_pipeline_folder_files",
]

PIPELINE_MODULE = "pipeline_bagel"
"""Module file (without `.py`) the folder ships for diffusers' custom-pipeline loading."""
PIPELINE_CODE = (
    '"""BAGEL\'s pipeline class for `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`: the code is '
    'the installed diffusers_bagel package."""\n\n'
    "from diffusers_bagel import BagelPipeline  # noqa: F401\n"
)
COMPONENTS = {
    "model": ["transformers_bagel.modeling_bagel", "BagelForConditionalGeneration"],
    "processor": ["transformers_bagel.processing_bagel", "BagelProcessor"],
    "scheduler": ["diffusers_bagel.scheduling_flow_match_euler", "FlowMatchEulerScheduler"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.write("\n")


CLASS_NAME = [PIPELINE_MODULE, "BagelPipeline"]
"""The pipeline class as `model_index.json` names it: diffusers' custom-pipeline form."""


def write_pipeline_folder_files(folder) -> None:
    """Writes `model_index.json`, `pipeline_bagel.py` and the root `config.json` / `processor_config.json` into a
    pipeline `folder`."""
    folder = Path(folder)
    index = {"_class_name": CLASS_NAME, "_diffusers_version": diffusers.__version__}
    _write_json(folder / "model_index.json", {**index, **COMPONENTS})
    write_pipeline_code_and_pointers(folder)


def write_pipeline_code_and_pointers(folder) -> None:
    """Writes `pipeline_bagel.py` and the root `config.json` / `processor_config.json` (everything of the folder's top
    level but `model_index.json`)."""
    folder = Path(folder)
    (folder / f"{PIPELINE_MODULE}.py").write_text(PIPELINE_CODE, encoding="utf-8")
    components = {PIPELINE_FOLDER_KEY: {"model": "model", "processor": "processor"}}
    _write_json(folder / "config.json", {"model_type": "bagel", **components})
    _write_json(folder / "processor_config.json", {"processor_class": "BagelProcessor", **components})


def pipeline_index_class_name(config: dict) -> dict:
    """`config` (a loaded `model_index.json`) with a `["pipeline_bagel", name]` class name read as plain `name`, so
    that loading through `BagelPipeline` itself never runs the shipped file."""
    name = config.get("_class_name")
    if isinstance(name, (list, tuple)) and len(name) == 2 and name[0] == PIPELINE_MODULE:
        config["_class_name"] = name[1]
    return config
