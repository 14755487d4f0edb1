"""Big-model loading on CPU: `device_map="auto"` with a memory cap splits BAGEL between CPU and disk offload
(accelerate hooks on every placed module, the path that also spreads it over several GPUs), and understanding,
generation and editing give exactly the outputs of the plainly loaded model."""

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_bagel import BagelPipeline
from transformers_bagel import BagelForConditionalGeneration


@pytest.fixture(scope="module")
def plain(converted_dir):
    pipe = BagelPipeline.from_pretrained(converted_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def split(converted_dir, tmp_path_factory):
    model = BagelForConditionalGeneration.from_pretrained(
        converted_dir / "model", device_map="auto", max_memory={"cpu": "2MB"},
        offload_folder=str(tmp_path_factory.mktemp("offload")),
    )  # fmt: skip
    pipe = BagelPipeline.from_pretrained(converted_dir, model=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_model_is_really_split(split):
    placements = set(split.model.hf_device_map.values())
    assert placements == {"cpu", "disk"}, split.model.hf_device_map
    assert split.model.lm_head.weight.device.type == "meta"  # offloaded: loaded by its hook at call time


def test_understanding_matches_the_plain_model(plain, split, no_grad):
    ids = torch.tensor([[401, 30, 31, 32, 402, 401]])
    torch.testing.assert_close(split.model(input_ids=ids).logits, plain.model(input_ids=ids).logits, rtol=0, atol=0)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    inputs = plain.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = plain.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(split.model.generate(**inputs, max_new_tokens=6, do_sample=False), expected)


@pytest.mark.parametrize("edit", [False, True])
def test_generation_and_editing_match_the_plain_model(plain, split, edit):
    kwargs = {"height": 32, "width": 32, "num_inference_steps": 3, "output_type": "latent"}
    if edit:
        kwargs = {"image": PIL.Image.new("RGB", (40, 40), (200, 30, 30)), "num_inference_steps": 3, "output_type": "latent"}
    outputs = [
        pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images for pipe in (plain, split)
    ]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
