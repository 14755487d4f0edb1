"""Shared fixtures: the tiny original checkpoint, its conversion, and the reference outputs of the original code."""

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
DIGITS_CHECKPOINT = ROOT / "checkpoints" / "tiny-bagel-digits"
ORIGINAL_DIR = FIXTURES / "tiny_bagel_original"
EXPECTED_DIR = FIXTURES / "expected"
# Image-processor sizes the reference outputs were produced with (tiny model; the 7B uses 1024/512 and 980/224).
TINY_IMAGE_SIZES = {"vae_max_image_size": 128, "vae_min_image_size": 32, "vit_max_image_size": 112, "vit_min_image_size": 28}


def load_expected(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Returns the json description and the tensors of one reference case."""
    with open(EXPECTED_DIR / f"{name}.json", encoding="utf-8") as handle:
        meta = json.load(handle)
    return meta, load_file(str(EXPECTED_DIR / f"{name}.safetensors"))


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4):
    """Max abs error relative to the largest reference magnitude."""
    actual = actual.detach().float().cpu()
    expected = expected.float()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * max(scale, 1e-12), f"max abs error {err:.3e} > {rtol:.0e} x {scale:.3e}"


@pytest.fixture(scope="session")
def original_model():
    """The tiny original checkpoint loaded straight into BagelForConditionalGeneration (no files written)."""
    from transformers_bagel.convert_bagel_to_hf import load_original_model

    model, tokenizer, _ = load_original_model(ORIGINAL_DIR)
    return model, tokenizer


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory) -> Path:
    """The tiny original checkpoint converted with the converter, once per session."""
    from diffusers_bagel.convert_bagel_to_diffusers import convert

    out = tmp_path_factory.mktemp("converted") / "tiny_bagel"
    convert(ORIGINAL_DIR, out, image_sizes=TINY_IMAGE_SIZES, max_shard_size="1MB")
    return out


def load_pipeline(converted_dir: Path, attn_implementation: str | None = "sdpa"):
    """A fresh BagelPipeline of the converted tiny checkpoint, progress bars off."""
    from diffusers_bagel import BagelPipeline

    pipeline = BagelPipeline.from_pretrained(converted_dir)
    if attn_implementation is not None:
        pipeline.model.set_attn_implementation(attn_implementation)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipe(converted_dir):
    """The converted tiny BAGEL as a BagelPipeline (sdpa, progress bars off), one per test module."""
    return load_pipeline(converted_dir)


@pytest.fixture(scope="module")
def digits_pipe():
    """The shipped digits BAGEL as a BagelPipeline (CPU, float32, progress bars off), one per test module."""
    from diffusers_bagel import BagelPipeline

    if not (DIGITS_CHECKPOINT / "model_index.json").is_file():
        pytest.skip("the digits checkpoint is not shipped in this checkout")
    pipeline = BagelPipeline.from_pretrained(DIGITS_CHECKPOINT)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture()
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on 2 shared cores: one torch thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shrunk_config(converted_dir: Path, num_layers: int = 1):
    """The tiny checkpoint's tokens and tables with an even smaller network (width 32, `num_layers` decoder and ViT
    layers), for training tests that take many steps."""
    from transformers_bagel.configuration_bagel import SPECIAL_TOKENS, BagelConfig

    base = BagelConfig.from_pretrained(converted_dir / "model")
    text = base.text_config.to_dict()
    text.pop("layer_types", None)
    text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)  # fmt: skip
    vision = base.vision_config.to_dict()
    vision.update(hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=1)
    tokens = {field: getattr(base, field) for field in SPECIAL_TOKENS}
    return BagelConfig(text_config=text, vision_config=vision, max_latent_size=8, **tokens)


@pytest.fixture(scope="module")
def processor(converted_dir):
    """The converted tiny checkpoint's processor."""
    from transformers_bagel import BagelProcessor

    return BagelProcessor.from_pretrained(converted_dir / "processor")


@pytest.fixture(scope="module")
def small_config(converted_dir):
    """`shrunk_config` with one layer."""
    return shrunk_config(converted_dir, num_layers=1)


def check_rows_prefilled_together(model, rows: list[dict]) -> None:
    """Prefilling `rows` (each a dict of one-row model inputs of equal length) in one forward, the first extending an
    earlier context and the others starting new ones, stores what one forward per row stores (same spans and
    positions, keys to float rounding), and denoising against the spans gives the same velocities."""
    from transformers_bagel import BagelContext

    first = torch.tensor([[401, 30, 31, 402]])
    together = {"input_ids": torch.cat([row["input_ids"] for row in rows])}
    for name in ("pixel_values", "image_grid_hw", "latents", "latent_grid_hw"):
        if any(name in row for row in rows):
            together[name] = torch.cat([row[name] for row in rows if name in row])
    contexts, spans = [], []
    for merged in (False, True):
        context = BagelContext()
        span = model.prefill_context(input_ids=first, context=context, context_spans=context.new_span()).context_span
        if merged:
            new = [span] + [context.new_span()] * (len(rows) - 1)
            grown = model.prefill_context(**together, context=context, context_spans=new, cache_only=True).context_spans
            grown = list(grown)
        else:
            grown = [model.prefill_context(**rows[0], context=context, context_spans=span).context_span]
            grown += [model.prefill_context(**row, context=context, context_spans=context.new_span()).context_span
                      for row in rows[1:]]
        contexts.append(context)
        spans.append(grown)
    assert spans[0] == spans[1]
    assert contexts[0].num_keys == contexts[1].num_keys == 4 + sum(row["input_ids"].shape[1] for row in rows)
    for alone, merged in zip(contexts[0].cache.layers, contexts[1].cache.layers, strict=True):
        assert_close_rel(merged.keys, alone.keys, 1e-5)
        assert_close_rel(merged.values, alone.values, 1e-5)
    x_t = torch.randn(len(rows), 4, model.config.patch_latent_dim, generator=torch.Generator().manual_seed(3))
    velocities = [model.predict_velocity(x_t, 0.6, (2, 2), context, grown) for context, grown in zip(contexts, spans)]
    assert_close_rel(velocities[1], velocities[0], 1e-5)


def with_attn(model, implementation):
    model.set_attn_implementation(implementation)
    return model


def mixed_inputs(config, seed=0):
    """text, a ViT image block (2x3 patches), text, a clean VAE image block (2x2 tokens), text."""
    generator = torch.Generator().manual_seed(seed)
    ids = (
        [401, 30, 31, 402]
        + [config.start_of_image_token_id] + [config.image_token_id] * 6 + [config.end_of_image_token_id]
        + [401, 40, 41, 42, 402]
        + [config.start_of_image_token_id] + [config.latent_token_id] * 4 + [config.end_of_image_token_id]
        + [401, 50, 51]
    )
    patch_dim = config.vision_config.num_channels * config.vision_config.patch_size**2
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.randn(6, patch_dim, generator=generator),
        "image_grid_hw": torch.tensor([[2, 3]]),
        "latents": torch.randn(4, config.patch_latent_dim, generator=generator),
        "latent_grid_hw": torch.tensor([[2, 2]]),
    }


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's process group or torchrun."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *command: str, no_python: bool = False):
    """Runs `torchrun --nproc_per_node NPROC COMMAND` (a Python script and its arguments; with `no_python`, an
    executable) with one torch thread per process, as torchrun sets by default, and returns the finished process, its
    output captured."""
    import os
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                "127.0.0.1", "--master_port", str(free_port()), *(["--no-python"] if no_python else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *command], capture_output=True, text=True, timeout=600, env=env)


def torchrun_bagel(nproc: int, *args: str):
    """Runs `bagel ARGS` under [`torchrun`]."""
    import os
    import sys

    return torchrun(nproc, os.path.join(os.path.dirname(sys.executable), "bagel"), *args, no_python=True)
