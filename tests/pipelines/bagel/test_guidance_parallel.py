"""Guidance branches on several processes (`pipe.enable_guidance_parallel()`, `bagel ... --parallel cfg` under
torchrun): each rank runs its branches against the contexts only it prefilled, and every rank's images are bit for bit
the single-process call with `batch_invariant=True` (CPU, float32, gloo)."""

import os

import numpy as np
import PIL.Image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import DIGITS_CHECKPOINT, free_port, load_pipeline, torchrun_bagel
from diffusers_bagel import BagelPipeline
from diffusers_bagel.guidance_parallel import assign_branches


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

TINY, DIGITS = "tiny", "digits"
OPTIONS = {"height": 64, "width": 64, "output_type": "np", "batch_invariant": True}
# name -> (model, call arguments): text-to-image (2 branches, guidance on part of the steps) and editing (3 branches,
# and once with TaylorSeer: 8 steps, so that steps 5 and 6 are predicted from the Taylor factors).
CASES = {
    "t2i": (TINY, {"prompt": "A red cat.", "num_inference_steps": 4, "cfg_interval": (0.5, 1.0)}),
    "edit": (TINY, {"prompt": "Make it red.", "edit": True, "num_inference_steps": 3}),
    "edit_taylorseer": (TINY, {"prompt": "Make it red.", "edit": True, "num_inference_steps": 8,
                               "enable_taylorseer": True}),  # fmt: skip
    "digits": (DIGITS, {"prompt": "a handwritten digit seven", "num_inference_steps": 3}),
}
WORLD_CASES = {2: ["t2i", "edit", "edit_taylorseer", "digits"], 3: ["t2i", "edit", "digits"]}


def _source_image() -> PIL.Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return PIL.Image.fromarray(np.stack([x * 4, y * 4, 255 - x * 2], axis=-1).astype(np.uint8))


def _call(pipe, case: str):
    arguments = dict(CASES[case][1])
    image = _source_image() if arguments.pop("edit", False) else None
    return pipe(image=image, generator=torch.Generator().manual_seed(0), **arguments, **OPTIONS).images


def _load(model: str, converted_dir):
    if model == DIGITS:
        pipe = BagelPipeline.from_pretrained(DIGITS_CHECKPOINT)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load_pipeline(converted_dir)


def _count_prefilled_tokens(pipe) -> list[int]:
    """Counts the tokens every prefill of `pipe`'s model writes into a context (one total per call)."""
    counts = [0]
    prefill = pipe.model.prefill_context

    def counting(input_ids, *args, **kwargs):
        counts[0] += input_ids.numel()
        return prefill(input_ids, *args, **kwargs)

    pipe.model.prefill_context = counting
    return counts


def _worker(rank, world, port, converted_dir, cases, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        pipes, results = {}, {}
        for case in cases:
            model = CASES[case][0]
            if model not in pipes:
                pipes[model] = _load(model, converted_dir)
                pipes[model].enable_guidance_parallel()
            counts = _count_prefilled_tokens(pipes[model])
            images = _call(pipes[model], case)
            del pipes[model].model.prefill_context  # the counting wrapper
            results[case] = {"images": images, "prefilled": counts[0]}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def _context_lengths(pipe, case: str) -> dict[str, int]:
    """Tokens of the full context, of its prefix that is the no-text context, and of the no-image context."""
    arguments = CASES[case][1]
    items = pipe.normalize_prompts(arguments["prompt"], _source_image() if arguments.get("edit") else None)[0]
    contexts = pipe.build_contexts(items, think=False)
    encoder = pipe._context_encoder()
    length = lambda segments: len(encoder.layout(segments).input_ids)  # noqa: E731
    return {"cond": length(contexts.full.segments), "text": length(contexts.full.segments[: contexts.no_text_cut]),
            "image": length(contexts.no_image.segments)}  # fmt: skip


@pytest.mark.slow  # spawns 2 and 3 processes
@pytest.mark.parametrize("world", [2, 3])
def test_parallel_images_equal_the_single_process_call(converted_dir, pipe, digits_pipe, one_thread, tmp_path, world):
    # One torch thread everywhere: the VAE's convolutions round differently with other thread counts.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cases = WORLD_CASES[world]
    mp.spawn(_worker, args=(world, free_port(), converted_dir, cases, tmp_path), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
    pipes = {TINY: pipe, DIGITS: digits_pipe}
    for case in cases:
        single_pipe = pipes[CASES[case][0]]
        counts = _count_prefilled_tokens(single_pipe)
        expected = _call(single_pipe, case)
        del single_pipe.model.prefill_context
        for rank, results in enumerate(ranks):
            assert np.array_equal(results[case]["images"], expected), f"{case}: rank {rank} differs from one process"
        # Each rank prefilled the contexts of its own branches only (assign_branches): the full context for "cond",
        # the full context's prefix for "text" (empty for text-to-image), the no-image context for "image".
        lengths = _context_lengths(single_pipe, case)
        branches = ["cond", "text", "image"] if CASES[case][1].get("edit") else ["cond", "text"]
        owners = assign_branches(branches, world)
        for rank, results in enumerate(ranks):
            mine = [branch for branch in branches if owners[branch] == rank]
            wanted = max((lengths[b] for b in mine if b != "image"), default=0) + lengths["image"] * ("image" in mine)
            assert results[case]["prefilled"] == wanted, (case, rank, mine, results[case]["prefilled"])
        assert counts[0] == lengths["cond"] + lengths["image"] * ("image" in branches)  # one process: all of them


def test_branch_assignment():
    assert assign_branches(["cond", "text"], 2) == {"cond": 0, "text": 1}
    assert assign_branches(["cond", "text"], 3) == {"cond": 0, "text": 1}  # rank 2 idles
    assert assign_branches(["cond", "text", "image"], 3) == {"cond": 0, "text": 1, "image": 2}
    # the full-context branch attends the most keys: it runs alone, the two cheaper ones share rank 1
    assert assign_branches(["cond", "text", "image"], 2) == {"cond": 0, "text": 1, "image": 1}
    assert assign_branches(["cond", "text", "image"], 1) == {"cond": 0, "text": 0, "image": 0}
    assert assign_branches(["cond"], 3) == {"cond": 0}


def test_refused_without_an_initialised_process_group(pipe):
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        pipe.enable_guidance_parallel()
    assert pipe.guidance_parallel is None


@pytest.fixture()
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_one_process_group_equals_batch_invariant_and_refusals(pipe, one_process_group):
    """A group of one process runs every branch itself through the parallel path (prefill, exchange): the single
    call's images. A step cache is refused, and so is a call after the group is gone."""
    from diffusers.hooks import FirstBlockCacheConfig

    expected = _call(pipe, "edit")
    pipe.enable_guidance_parallel()
    try:
        assert pipe.guidance_parallel.world_size == 1
        assert np.array_equal(_call(pipe, "edit"), expected)
        pipe.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        try:
            with pytest.raises(ValueError, match="a diffusers step cache"):
                _call(pipe, "edit")
        finally:
            pipe.disable_cache()
        dist.destroy_process_group()
        with pytest.raises(ValueError, match="process group was destroyed"):
            _call(pipe, "edit")
    finally:
        pipe.disable_guidance_parallel()
    assert pipe.guidance_parallel is None


def test_cli_parallel_needs_torchrun(tmp_path, monkeypatch, capsys):
    from diffusers_bagel.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--checkpoint", str(DIGITS_CHECKPOINT), "--prompt", "x", "--output", str(tmp_path / "x.png"),
              "--parallel", "cfg"])  # fmt: skip
    assert exit_.value.code == 2
    assert "--parallel cfg runs one process per guidance branch under torchrun" in capsys.readouterr().err


@pytest.mark.slow  # a real torchrun of two processes
def test_cli_under_torchrun_writes_the_single_process_png(digits_pipe, one_thread, tmp_path):
    output = tmp_path / "seven.png"
    result = torchrun_bagel(2, "generate", "--checkpoint", str(DIGITS_CHECKPOINT), "--prompt",
                            "a handwritten digit seven", "--steps", "3", "--seed", "5", "--output", str(output),
                            "--parallel", "cfg")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1, result.stdout  # rank 0 only
    expected = digits_pipe("a handwritten digit seven", num_inference_steps=3, batch_invariant=True,
                           generator=torch.Generator().manual_seed(5)).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(PIL.Image.open(output)), np.asarray(expected))
