"""The README's main command: examples/quickstart.py on the built-in tiny model writes the PNGs it names."""

import subprocess
import sys
from pathlib import Path

import PIL.Image


ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_writes_the_images_it_prints(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output_dir", str(tmp_path), "--steps", "2"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    printed = {line.split(":")[0]: line.rsplit(": ", 1)[1] for line in result.stdout.splitlines() if ".png" in line}
    assert set(printed) == {"text-to-image (256x256)", "edit (128x128)"}, result.stdout
    for path in printed.values():
        image = PIL.Image.open(path)
        assert Path(path).parent == tmp_path and image.mode == "RGB"
    assert "understanding: Q:" in result.stdout
