"""Every per-task example in examples/ runs as a user would run it (a subprocess, small step counts) and writes or
prints what it says; one runs with no checkpoint flag at all, on the tiny default."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest


pytestmark = pytest.mark.slow  # each test runs an example as a subprocess


ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _run(script, *args) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _printed_images(stdout) -> dict[str, tuple[tuple[int, int], Path]]:
    """`label (WxH): path` lines -> {label: ((W, H), path)}."""
    found = {}
    for label, width, height, path in re.findall(r"^(.+) \((\d+)x(\d+)\): (.+\.png)$", stdout, flags=re.M):
        found[label] = ((int(width), int(height)), Path(path))
    return found


@pytest.fixture(scope="module")
def image_processor(converted_dir):
    from transformers_bagel import BagelImageProcessor

    return BagelImageProcessor.from_pretrained(converted_dir / "processor")


@pytest.fixture(scope="module")
def default_side(converted_dir):
    import json

    config = json.loads((converted_dir / "model" / "config.json").read_text())
    return min(1024, config["max_latent_size"] * config["latent_patch_size"] * config["vae_downsample"])


def _assert_png(size_and_path, folder):
    size, path = size_and_path
    assert path.parent == folder and path.is_file()
    image = PIL.Image.open(path)
    assert image.format == "PNG" and image.size == size
    return image


def test_text_to_image_runs_with_no_checkpoint_flag(tmp_path, default_side):
    # The tiny default: converted into outputs/tiny-bagel on first use (shared with examples/quickstart.py).
    printed = _printed_images(_run("text_to_image.py", "--output_dir", tmp_path, "--steps", 1))
    assert list(printed) == ["text-to-image"]
    assert _assert_png(printed["text-to-image"], tmp_path).size == (default_side, default_side)


def test_text_to_image_takes_its_size_flags(converted_dir, tmp_path):
    stdout = _run(
        "text_to_image.py", "--checkpoint", converted_dir, "--output_dir", tmp_path, "--steps", 2,
        "--height", 48, "--width", 80, "--prompt", "A green field.",
    )  # fmt: skip
    assert _assert_png(_printed_images(stdout)["text-to-image"], tmp_path).size == (80, 48)


def test_edit_keeps_the_vae_resized_size_of_its_input(converted_dir, tmp_path, image_processor):
    printed = _printed_images(_run("edit.py", "--checkpoint", converted_dir, "--output_dir", tmp_path, "--steps", 2))
    assert set(printed) == {"input", "edit"}
    source = _assert_png(printed["input"], tmp_path)
    edited = _assert_png(printed["edit"], tmp_path)
    assert edited.size == image_processor.get_resize_size(*source.size, "vae")
    assert edited.size != source.size, "the drawn input should need resizing on the tiny model"


def test_understand_streams_both_answers_of_the_conversation(converted_dir, tmp_path):
    stdout = _run("understand.py", "--checkpoint", converted_dir, "--max_new_tokens", 20)
    answers = ast.literal_eval(stdout.rsplit("answers: ", 1)[1])
    assert len(answers) == 2 and all(answers)
    # What was streamed token by token is the decoded answer, for each turn.
    assert f"Q: What is in this image?\nA: {answers[0]}\n" in stdout
    assert f"Q: What colour is the roof?\nA: {answers[1]}\n" in stdout


def test_think_prints_a_plan_an_image_and_a_reasoned_answer(converted_dir, tmp_path, default_side):
    stdout = _run(
        "think.py", "--checkpoint", converted_dir, "--output_dir", tmp_path, "--steps", 2, "--max_think_tokens", 24
    )
    plan = ast.literal_eval(re.search(r"^plan: (.*)$", stdout, flags=re.M).group(1))
    reasoning = ast.literal_eval(re.search(r"^reasoned answer: (.*)$", stdout, flags=re.M).group(1))
    assert plan and reasoning
    image = _assert_png(_printed_images(stdout)["thinking text-to-image"], tmp_path)
    assert image.size == (default_side, default_side)
