"""examples/app.py in a real headless Chromium driven by Playwright: the served page generates an image, edits an
uploaded one with thinking on, and answers a question about an uploaded image, each matching the pipeline's own
output for the same inputs."""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch


pytestmark = pytest.mark.slow  # a headless browser against a served app


ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
# How Chromium must start on these machines: headless, as root, with nothing trying to reach the network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEPS = 2

if not Path(CHROMIUM).is_file():
    pytest.skip(f"Chromium is not installed at {CHROMIUM} (Debian package `chromium`)", allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api", reason="the `playwright` package is not installed")
pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[app]')")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(converted_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = dict(os.environ, GRADIO_TEMP_DIR=str(log.parent / "gradio"), GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "app.py"), "--checkpoint", str(converted_dir),
             "--port", str(port), "--num_inference_steps", str(STEPS)],
            stdout=handle, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer on {url} within 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser_page(app_url, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright_sync.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        page = context.new_page()
        page.set_default_timeout(120_000)
        yield page
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A 60x45 picture with structure (a gradient and a square), saved as PNG for upload."""
    y, x = np.mgrid[0:45, 0:60]
    pixels = np.stack([x * 4, y * 5, 255 - x * 4], axis=-1).astype(np.uint8)
    pixels[10:30, 20:40] = (250, 250, 30)
    path = tmp_path_factory.mktemp("upload") / "picture.png"
    PIL.Image.fromarray(pixels).save(path)
    return path


def _open(page, url, tab):
    page.goto(url, wait_until="networkidle")
    page.get_by_role("tab", name=tab).click()


def _shown_image(page, selector) -> PIL.Image.Image:
    image = page.locator(f"{selector} img")
    image.wait_for()
    # A fresh connection: uvicorn closes idle keep-alive connections that Playwright's request context would reuse.
    with urllib.request.urlopen(image.get_attribute("src"), timeout=30) as response:
        body = response.read()
    return PIL.Image.open(io.BytesIO(body)).convert("RGB")


def _assert_same_pixels(shown: PIL.Image.Image, expected: PIL.Image.Image):
    assert shown.size == expected.size
    # The server and this process may split float sums differently across threads: allow a flip of the uint8
    # truncation, not a different picture.
    diff = np.abs(np.asarray(shown, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def _set_slider(page, selector, value):
    """Sets a slider through its range input. Right after an accordion opens, Gradio mounts its content again and
    a value typed in too early is lost: set it, let it settle, and set it again until it holds."""
    range_input = page.locator(f"{selector} input[type=range]")
    range_input.wait_for(state="visible")
    for _ in range(20):
        range_input.fill(str(value))
        page.wait_for_timeout(300)
        if range_input.input_value() == str(value) == page.locator(f"{selector} input[type=number]").input_value():
            return
    pytest.fail(f"the slider {selector} did not keep the value {value}")


def _wait_done(page):
    """Gradio marks running outputs as pending; wait until none is."""
    page.wait_for_function("() => document.querySelectorAll('.pending, .generating').length === 0")


def test_text_to_image_shows_the_generated_image(browser_page, app_url, pipe):
    page = browser_page
    _open(page, app_url, "Text to Image")
    page.locator("#t2i-prompt textarea").fill("A blue dog on a beach.")
    page.get_by_text("Inference hyperparameters").first.click()
    _set_slider(page, "#t2i-seed", 7)
    page.locator("#t2i-generate").click()
    shown = _shown_image(page, "#t2i-image")
    expected = pipe("A blue dog on a beach.", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7))
    assert shown.size == (pipe.default_sample_size, pipe.default_sample_size)
    _assert_same_pixels(shown, expected.images[0])


def test_edit_with_thinking_shows_plan_and_image(browser_page, app_url, pipe, picture):
    page = browser_page
    _open(page, app_url, "Image Edit")
    page.locator("#edit-input input[type=file]").set_input_files(str(picture))
    page.locator("#edit-input img").wait_for()
    page.locator("#edit-prompt textarea").fill("Make the square red.")
    page.locator("#edit-think input[type=checkbox]").check()
    page.locator("#edit-thinking textarea").wait_for()  # the toggle shows the thinking box
    page.get_by_text("Inference hyperparameters").nth(1).click()
    _set_slider(page, "#edit-seed", 3)
    # A short thought keeps the test fast (the random tiny model otherwise writes up to the 1000-token default).
    _set_slider(page, "#edit-max-think", 64)
    page.locator("#edit-submit").click()
    shown = _shown_image(page, "#edit-image")
    _wait_done(page)
    expected = pipe(
        "Make the square red.", image=PIL.Image.open(picture), think=True, max_think_tokens=64,
        num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert page.locator("#edit-thinking textarea").input_value() == expected.text[0]
    _assert_same_pixels(shown, expected.images[0])


def test_understanding_answers_a_question_about_an_uploaded_image(browser_page, app_url, pipe, picture):
    from transformers_bagel.chat import generate_answer, understanding_messages

    page = browser_page
    _open(page, app_url, "Image Understanding")
    page.locator("#und-input input[type=file]").set_input_files(str(picture))
    page.locator("#und-input img").wait_for()
    page.locator("#und-question textarea").fill("What colour is the square?")
    page.locator("#und-submit").click()
    messages = understanding_messages("What colour is the square?", [PIL.Image.open(picture)])
    expected = generate_answer(pipe.model, pipe.processor, messages, 512)
    assert expected.strip(), "the tiny model gave an empty answer; the check below would prove nothing"
    page.wait_for_function(
        "expected => document.querySelector('#und-answer textarea').value === expected", arg=expected
    )
