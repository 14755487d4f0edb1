"""A converted folder loads through every route a transformers / diffusers user tries: `BagelPipeline` (no code from
the folder is run), `DiffusionPipeline` (diffusers' custom-pipeline convention, with `trust_remote_code=True`), and the
Auto classes, which name the subfolder to pass instead of failing with "Unrecognized model"."""

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import dynamic_modules_utils
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from conftest import load_pipeline
from diffusers_bagel import BagelPipeline
from diffusers_bagel.pipeline_folder import PIPELINE_CODE
from transformers_bagel import BagelForConditionalGeneration, BagelProcessor


CALL = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent"}


def test_folder_ships_diffusers_custom_pipeline_index(converted_dir):
    index = json.loads((converted_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_bagel", "BagelPipeline"]
    assert (converted_dir / "pipeline_bagel.py").read_text() == PIPELINE_CODE


def test_diffusion_pipeline_route_gives_the_same_pipeline(converted_dir, tmp_path, monkeypatch, no_grad):
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(converted_dir)
    pipeline = DiffusionPipeline.from_pretrained(converted_dir, trust_remote_code=True)
    assert type(pipeline) is BagelPipeline
    pipeline.model.set_attn_implementation("sdpa")
    pipeline.set_progress_bar_config(disable=True)
    reference = load_pipeline(converted_dir)
    image = pipeline("a cat", generator=torch.manual_seed(3), **CALL).images
    assert torch.equal(image, reference("a cat", generator=torch.manual_seed(3), **CALL).images)


def test_bagel_pipeline_runs_no_code_from_the_folder(converted_dir, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(converted_dir, folder)
    (folder / "pipeline_bagel.py").write_text("raise RuntimeError('the folder code ran')\n")
    assert type(BagelPipeline.from_pretrained(folder)) is BagelPipeline


@pytest.mark.parametrize(
    "load",
    [
        AutoConfig.from_pretrained,
        AutoModel.from_pretrained,
        AutoModelForImageTextToText.from_pretrained,
        BagelForConditionalGeneration.from_pretrained,
    ],
)
def test_model_routes_at_the_folder_root_name_the_subfolder(converted_dir, load):
    with pytest.raises(ValueError, match="subfolder='model'"):
        load(converted_dir)


@pytest.mark.parametrize("load", [AutoProcessor.from_pretrained, BagelProcessor.from_pretrained])
def test_processor_routes_at_the_folder_root_name_the_subfolder(converted_dir, load):
    with pytest.raises(ValueError, match="subfolder='processor'"):
        load(converted_dir)


def test_auto_classes_load_the_subfolders(converted_dir):
    model = AutoModelForImageTextToText.from_pretrained(converted_dir, subfolder="model")
    assert type(model) is BagelForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(converted_dir, subfolder="processor")) is BagelProcessor
    assert AutoConfig.from_pretrained(converted_dir, subfolder="model").model_type == "bagel"


def test_a_saved_pipeline_folder_loads_by_every_route(converted_dir, tmp_path, monkeypatch, no_grad):
    """`pipe.save_pretrained(folder)` (what a fine-tune or `bagel push` ships) writes the custom-pipeline index and
    its code file like a converted folder: `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`,
    `BagelPipeline.from_pretrained` and the Auto classes' pointers all work and give the same image."""
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    reference = load_pipeline(converted_dir)
    reference.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_bagel", "BagelPipeline"]
    assert (saved / "pipeline_bagel.py").read_text() == PIPELINE_CODE
    expected = reference("a cat", generator=torch.manual_seed(3), **CALL).images
    for load in (lambda: DiffusionPipeline.from_pretrained(saved, trust_remote_code=True),
                 lambda: BagelPipeline.from_pretrained(saved)):  # fmt: skip
        pipeline = load()
        assert type(pipeline) is BagelPipeline
        pipeline.model.set_attn_implementation("sdpa")
        pipeline.set_progress_bar_config(disable=True)
        assert torch.equal(pipeline("a cat", generator=torch.manual_seed(3), **CALL).images, expected)
    with pytest.raises(ValueError, match="subfolder='model'"):
        AutoModelForImageTextToText.from_pretrained(saved)
