"""Property-based input validation: random sizes, scales, intervals, image modes and types, and prompts thrown at the
pipeline, the processor and the image processor. Every call either succeeds (and then gives finite pixels and
consistent shapes) or raises ValueError / TypeError with a message; never another exception, never a NaN image."""

import math
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffusers_bagel import BagelPipeline


# 200 fixed examples per property in CI (derandomized: a run cannot fail on an example the previous one never saw).
# For hunting: BAGEL_HYPOTHESIS_EXPLORE=1 draws fresh random examples, BAGEL_HYPOTHESIS_EXAMPLES=N draws more.
EXPLORE = os.environ.get("BAGEL_HYPOTHESIS_EXPLORE") == "1"
SETTINGS = settings(
    max_examples=max(200, int(os.environ.get("BAGEL_HYPOTHESIS_EXAMPLES", "200"))),
    deadline=None,
    derandomize=not EXPLORE,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16",
         "I;16B", "I;16L", "F"]  # fmt: skip
ACCEPTED = (ValueError, TypeError)


# NaN reaching a cast (numpy's "invalid value encountered in cast") is a silent garbage image: fail on it.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _refused(error):
    message = str(error)
    assert len(message) > 10, f"{type(error).__name__} without a useful message: {error!r}"
    # Messages of Python or a library deep inside, not ours naming the argument and what is allowed.
    assert not re.search(
        r"object is not (iterable|subscriptable|callable)|unsupported operand|has no attribute|positional argument|"
        r"cannot unpack|not supported between instances|can't multiply|must be real number",
        message,
    ), f"unclear {type(error).__name__}: {message}"
    event(f"refused: {message[:40]}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of calls on tensors of a few kilobytes: thread start-up costs more than it saves (4x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- strategies ------------------------------------------------------------------------------------------------------


@st.composite
def pil_images(draw, max_side=48):
    """A PIL image of any mode and size, with random bytes (so F images may hold NaN or infinities)."""
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    length = len(PIL.Image.new(mode, size).tobytes())
    seed = draw(st.integers(0, 2**32 - 1))
    data = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
    image = PIL.Image.frombytes(mode, size, data)
    if mode == "P" and draw(st.booleans()):
        image.info["transparency"] = draw(st.integers(0, 255))
    return image


@st.composite
def arrays(draw, max_side=48):
    """numpy arrays and torch tensors of many shapes and dtypes, some with NaN or out-of-range values."""
    h, w = draw(st.integers(0, max_side)), draw(st.integers(1, max_side))
    shape = draw(st.sampled_from([(h, w), (h, w, 1), (h, w, 3), (h, w, 4), (h, w, 2), (h, w, 5), (h,), (2, h, w, 3)]))
    dtype = draw(st.sampled_from(["uint8", "float32", "float64", "int32", "bool", "float16"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    array = (rng.random(shape) * draw(st.sampled_from([1.0, 255.0, -3.0]))).astype(dtype)
    if dtype.startswith("float") and array.size and draw(st.booleans()):
        array.flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if draw(st.booleans()):
        tensor = torch.from_numpy(array.copy())
        return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor
    return array


images = st.one_of(pil_images(), arrays())
junk = st.sampled_from([3, 2.5, b"bytes", {"image": 1}, object(), [], ""])
bad_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-5.0, 1.0),
    st.integers(-3, 0),
    st.booleans(),
    st.sampled_from(["4", None, 1e300, -1e-300]),
)


@st.composite
def mostly(draw, valid, invalid, p_invalid=0.08):
    """`valid` most of the time, `invalid` sometimes: most calls are valid but for one or two arguments."""
    # sampled_from draws uniformly; a float or integer strategy would favour its bounds.
    use_invalid = draw(st.sampled_from(range(100))) < round(100 * p_invalid)
    return draw(invalid if use_invalid else valid)


prompts = mostly(
    st.one_of(
        st.text(min_size=1, max_size=24).filter(str.strip),
        st.lists(st.text(min_size=1, max_size=8).filter(str.strip), min_size=1, max_size=2),
        st.lists(st.one_of(st.text(min_size=1, max_size=8), pil_images(32)), min_size=1, max_size=3),
        st.sampled_from(["<|image_pad|>", "<|vision_pad|> x", "<|im_end|>", "a cat", "<think>"]),
    ),
    st.one_of(st.sampled_from(["", "   ", "\n", None]), st.lists(st.text(max_size=4), max_size=2), junk),
)
# Default sizes (None) are rarer: text-to-image then draws the tiny model's largest image, the slow case.
sides = mostly(
    st.sampled_from([16, 32, 48, 64]), st.one_of(st.none(), st.integers(-16, 72), st.sampled_from([32.0, True, 4096]))
)
scales = mostly(st.one_of(st.none(), st.floats(1.0, 10.0), st.integers(1, 8)), bad_numbers)


# -- pipeline -----------------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    prompt=prompts,
    image=mostly(st.one_of(st.none(), pil_images(40), st.lists(pil_images(32), min_size=1, max_size=2)), st.one_of(arrays(), st.just([]), junk), 0.3),
    height=sides,
    width=sides,
    num_inference_steps=mostly(st.integers(1, 2), st.one_of(st.integers(-1, 0), st.sampled_from([1.0, None, True]))),
    timestep_shift=mostly(st.floats(0.1, 10.0), bad_numbers),
    cfg_text_scale=scales,
    cfg_img_scale=scales,
    cfg_interval=mostly(
        st.one_of(st.none(), st.tuples(st.floats(0, 0.5), st.floats(0.5, 1)), st.lists(st.floats(0, 1), min_size=2, max_size=2).map(sorted)),
        st.one_of(st.tuples(bad_numbers, bad_numbers), st.lists(st.floats(0, 1), max_size=3), st.sampled_from(["0.4", 0.4])),
    ),
    cfg_renorm_type=mostly(st.sampled_from([None, "global", "channel", "text_channel"]), st.sampled_from(["local", "", 1, "GLOBAL"])),
    cfg_renorm_min=mostly(st.floats(0.0, 1.0), bad_numbers),
    num_images_per_prompt=mostly(st.integers(1, 2), st.sampled_from([0, -1, 1.0, None])),
    think=st.booleans(),
    max_think_tokens=mostly(st.integers(1, 3), st.sampled_from([0, -1, 2.0, None])),
)
def test_pipeline_accepts_or_refuses_clearly(pipe, prompt, image, **kwargs):
    try:
        output = pipe(prompt, image=image, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs)
    except ACCEPTED as error:
        _refused(error)
        return
    event("accepted")
    images = output.images
    assert images.ndim == 4 and images.shape[-1] == 3 and images.shape[0] >= 1
    assert np.isfinite(images).all(), "NaN or infinite pixels"
    assert images.min() >= 0.0 and images.max() <= 1.0
    if kwargs["height"] is not None:
        assert images.shape[1] == kwargs["height"]
    if kwargs["width"] is not None:
        assert images.shape[2] == kwargs["width"]


# -- processor -----------------------------------------------------------------------------------------------------------

VIT_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
VAE_BLOCK = "<|vision_start|><|vision_pad|><|vision_end|>"
segments = st.sampled_from(
    ["hello", " ", VIT_BLOCK, "<|image_pad|>", "<|vision_pad|>", VAE_BLOCK, "<|im_start|>", "<|im_end|>", "é漢字", "\n"]
)
texts = st.lists(segments, max_size=5).map("".join)


@st.composite
def processor_inputs(draw):
    """Prompts whose placeholders match the images given (mostly), with an argument spoiled now and then; VAE slots
    and `vae_images`, which the processor refuses, appear too."""
    rows = draw(st.lists(st.tuples(st.text(max_size=6), st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=3))
    text = [f"{words}{VIT_BLOCK * n_vit}{VAE_BLOCK * n_vae}" for words, n_vit, n_vae in rows]
    vit = [draw(pil_images(40)) for _, n, _ in rows for _ in range(n)]
    vae = [draw(pil_images(40)) for _, _, n in rows for _ in range(n)]
    kwargs = {"text": text[0] if len(text) == 1 and draw(st.booleans()) else text, "images": vit or None,
              "vae_images": vae or None, "return_tensors": "pt", "padding_side": draw(st.sampled_from(["left", "right"]))}
    for name, spoiled in (
        ("text", st.one_of(texts, st.lists(texts, max_size=3), st.none(), junk)),
        ("images", st.one_of(st.none(), images, st.lists(st.one_of(images, st.none()), max_size=3), junk)),
        ("vae_images", st.one_of(st.none(), images, st.lists(st.one_of(images, st.none()), max_size=3), junk)),
        ("return_tensors", st.sampled_from([None, "np", "tf"])),
        ("padding_side", st.sampled_from(["middle", None])),
    ):
        kwargs[name] = draw(mostly(st.just(kwargs[name]), spoiled, 0.15))
    return kwargs


@SETTINGS
@given(kwargs=processor_inputs())
def test_processor_accepts_or_refuses_clearly(pipe, kwargs):
    try:
        out = pipe.processor(**kwargs)
    except ACCEPTED as error:
        _refused(error)
        return
    event("accepted")
    text = kwargs["text"]
    ids = torch.as_tensor(out["input_ids"])
    mask = torch.as_tensor(out["attention_mask"])
    assert ids.shape == mask.shape and ids.ndim == 2
    rows = [text] if isinstance(text, str) else list(text)
    assert ids.shape[0] == len(rows)
    config = pipe.model.config
    vit_tokens = int((ids == config.image_token_id).sum())
    if "pixel_values" in out:
        grid = out["image_grid_hw"]
        assert vit_tokens == int((grid[:, 0] * grid[:, 1]).sum()) == out["pixel_values"].shape[0]
        assert torch.isfinite(out["pixel_values"]).all()
        assert out["pixel_values"].abs().max() <= 1.0 + 1e-6
    else:
        assert vit_tokens == 0
    # VAE slots and `vae_images` are refused (the pipeline and the collator fill them): never in an accepted output.
    assert int((ids == config.latent_token_id).sum()) == 0 and "vae_pixel_values" not in out


@SETTINGS
@given(image=st.one_of(images, junk), target=st.sampled_from(["vit", "vae"]))
def test_image_processor_resizes_any_image_to_the_bagel_grid(pipe, image, target):
    image_processor = pipe.processor.image_processor
    try:
        if target == "vit":
            out = image_processor.preprocess(image)
            pixels, (rows, cols) = out["pixel_values"], out["image_grid_hw"][0].tolist()
            assert pixels.shape == (rows * cols, 3 * image_processor.vit_patch_size**2)
            side = image_processor.vit_max_image_size
            assert max(rows, cols) * image_processor.vit_patch_size <= side
        else:
            out = image_processor.preprocess_vae(image)
            pixels = out["vae_pixel_values"][0]
            height, width = out["vae_image_sizes"][0].tolist()
            assert pixels.shape == (3, height, width)
            assert height % image_processor.vae_stride == 0 and width % image_processor.vae_stride == 0
            assert max(height, width) <= image_processor.vae_max_image_size
    except ACCEPTED as error:
        _refused(error)
        return
    event("accepted")
    assert torch.isfinite(pixels).all() and not math.isnan(float(pixels.sum()))
