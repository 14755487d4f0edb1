"""The README's main command: examples/quickstart.py on the shipped digits BAGEL (and on any converted checkpoint)
writes the PNGs it names and answers about a digit."""

import re
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest


pytestmark = pytest.mark.slow  # each test runs the quickstart as a subprocess


ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), *args], capture_output=True, text=True, timeout=600
    )


def _printed_paths(stdout: str) -> dict[str, Path]:
    return {line.split(" ")[0]: Path(line.rsplit(": ", 1)[1]) for line in stdout.splitlines() if line.endswith(".png")}


def test_quickstart_on_the_shipped_digits_model(tmp_path):
    result = _run("--output_dir", str(tmp_path), "--rows", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = _printed_paths(result.stdout)
    assert set(printed) == {"text-to-image", "edit"}, result.stdout
    grid = PIL.Image.open(printed["text-to-image"])
    assert printed["text-to-image"].parent == tmp_path and grid.mode == "RGB" and grid.width == 10 * grid.height
    edit = PIL.Image.open(printed["edit"])
    assert edit.width == 2 * edit.height
    # Held-out sample 0 is a digit the model reads (the checkpoint's held-out understanding accuracy is in EVAL.md).
    match = re.search(r"understanding: .* \(a (\w+)\) A: '(.*)'", result.stdout)
    assert match and match.group(1) == match.group(2), result.stdout


def test_quickstart_on_a_converted_checkpoint(tmp_path):
    result = _run("--checkpoint", "random-tiny", "--output_dir", str(tmp_path), "--steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = _printed_paths(result.stdout)
    assert set(printed) == {"text-to-image", "edit"}, result.stdout
    assert PIL.Image.open(printed["text-to-image"]).size == (256, 256)
    assert PIL.Image.open(printed["edit"]).size == (128, 128)
    assert "understanding: Q:" in result.stdout


def test_quickstart_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    result = _run("--checkpoint", str(tmp_path))
    assert result.returncode == 2 and "not a converted BAGEL folder" in result.stderr
