"""examples/app.py without a browser: the example prompts fit the loaded tokenizer, the page names the model, and
errors shown on the page carry no server paths (test_app_browser.py drives the served page itself)."""

import sys
from pathlib import Path

import pytest


pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[app]')")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import app  # noqa: E402

from conftest import load_pipeline  # noqa: E402
from diffusers_bagel import BagelPipeline  # noqa: E402


DIGITS = ROOT / "checkpoints" / "tiny-bagel-digits"


def test_examples_follow_the_tokenizer_and_the_page_names_the_model(converted_dir):
    digits = BagelPipeline.from_pretrained(DIGITS)
    examples = app.pick_examples(digits.processor)
    assert examples["t2i"] == "a handwritten digit seven" and examples["understand"] == "Which digit is this?"
    tokenizer = digits.processor.tokenizer
    for text in examples.values():
        assert tokenizer.unk_token_id not in tokenizer.encode(text, add_special_tokens=False)
    line = app.describe_model(digits, DIGITS.name)
    assert "tiny-bagel-digits" in line and "M parameters" in line and "torch.float32 on cpu" in line

    general = load_pipeline(converted_dir)  # the test tokenizer is a BPE one: every word is known
    assert app.pick_examples(general.processor)["t2i"] == app.EXAMPLES[0]["t2i"]


def test_page_errors_hide_server_paths_and_internal_failures():
    refused = app.public_error(ValueError("'/srv/models/secret/photo.png' is truncated; see https://example.org/a/b"))
    assert refused.message == "'photo.png' is truncated; see https://example.org/a/b"
    internal = app.public_error(RuntimeError("CUDA error in /usr/lib/python3/site-packages/torch/x.py"))
    assert "/usr/lib" not in internal.message and "RuntimeError" in internal.message and "server log" in internal.message


def test_api_names_every_input_and_seeds_mean_what_the_cli_means():
    digits = BagelPipeline.from_pretrained(DIGITS)
    demo = app.build_demo(digits, 4)
    endpoints = demo.get_api_info()["named_endpoints"]
    t2i = [p["parameter_name"] for p in endpoints["/text_to_image"]["parameters"]]
    edit = [p["parameter_name"] for p in endpoints["/edit"]["parameters"]]
    assert t2i[:4] == ["prompt", "think", "seed", "num_inference_steps"] and "cfg_text_scale" in t2i
    assert edit[:3] == ["image", "prompt", "think"] and "cfg_img_scale" in edit
    assert not [name for name in t2i + edit if name.startswith("param_")]
    # 0 is a seed, as for `bagel generate --seed 0`; -1 draws a random one
    assert app._generator(0).initial_seed() == 0 and app._generator(-1) is None
