"""Tensor parallelism through transformers (`from_pretrained(..., tp_plan="auto")` under torchrun): the plan on
`BagelTextConfig` shards both experts' attention and MLP projections and nothing else, each of two processes (CPU,
gloo) holds half of them, and generation, the pipeline and `bagel generate --parallel tp` give the single process's
tokens and images (within 1e-4, float32)."""

import os
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from transformers import DistributedConfig
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

from conftest import DIGITS_CHECKPOINT, free_port, torchrun_bagel
from transformers_bagel import BagelConfig, BagelForConditionalGeneration
from transformers_bagel.chat import understanding_messages
from transformers_bagel.modeling_bagel_text import check_tensor_parallel_size


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

WORLD = 2
TINY, DIGITS = "tiny", "digits"
# name -> pipeline call: text-to-image on the tiny model (ViT-free), an edit (ViT, three guidance branches) and digits.
CALLS = {
    TINY: [{"prompt": "A red cat.", "num_inference_steps": 3}, {"prompt": "Make it red.", "num_inference_steps": 2,
                                                               "edit": True}],  # fmt: skip
    DIGITS: [{"prompt": "a handwritten digit seven", "num_inference_steps": 3}],
}
COLWISE = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
ROWWISE = {"o_proj", "down_proj"}


def _image() -> PIL.Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return PIL.Image.fromarray(np.stack([x * 4, y * 4, 255 - x * 2], axis=-1).astype(np.uint8))


def _folder(name: str, converted_dir):
    return DIGITS_CHECKPOINT if name == DIGITS else converted_dir


def _load_model(folder, **kwargs):
    with warnings.catch_warnings():  # transformers 5.24 prefers distributed_config=DistributedConfig(tp_plan="auto")
        warnings.filterwarnings("ignore", "Passing `tp_plan` directly", FutureWarning)
        model = BagelForConditionalGeneration.from_pretrained(folder, subfolder="model", **kwargs)
    model.set_attn_implementation("sdpa")
    return model


def _outputs(name: str, model, converted_dir) -> dict:
    """Greedy answers of a batch of two conversations (one with an image) and the pipeline's images of `CALLS[name]`,
    the pipeline built around `model`."""
    from diffusers_bagel import BagelPipeline

    pipe = BagelPipeline.from_pretrained(_folder(name, converted_dir), model=model)
    pipe.set_progress_bar_config(disable=True)
    conversations = [understanding_messages("What is in the image?", [_image()], []),
                     understanding_messages("Say something.", [], [])]  # fmt: skip
    inputs = pipe.processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    images = []
    for call in CALLS[name]:
        call = dict(call)
        image = _image() if call.pop("edit", False) else None
        generator = torch.Generator().manual_seed(0)
        images.append(pipe(image=image, height=64, width=64, output_type="np", generator=generator, **call).images)
    return {"tokens": tokens, "images": images}


def _projection_bytes(model) -> tuple[int, int]:
    """Bytes of the decoder layers' projection weights and biases: (this process's shards, the whole tensors)."""
    local = full = 0
    for name, param in model.model.language_model.layers.named_parameters():
        if name.split(".")[-2].removesuffix("_moe_gen") in COLWISE | ROWWISE:
            local += param.to_local().nbytes if hasattr(param, "to_local") else param.nbytes
            full += param.numel() * param.element_size()
    return local, full


def _worker(rank, port, converted_dir, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    try:
        results = {}
        for name in (TINY, DIGITS):
            # tp_plan="auto" initialises the gloo group from the variables above
            model = _load_model(_folder(name, converted_dir), tp_plan="auto")
            sharded = [n for n, p in model.named_parameters() if hasattr(p, "to_local")]
            outside = [n for n in sharded if not n.startswith("model.language_model.layers.")]
            results[name] = {"bytes": _projection_bytes(model), "sharded_outside_decoder": outside,
                             **_outputs(name, model, converted_dir)}  # fmt: skip
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()



@pytest.mark.slow  # spawns two processes
def test_two_processes_hold_half_the_projections_and_give_the_single_process_outputs(converted_dir, one_thread,
                                                                                    tmp_path):  # fmt: skip
    if not (DIGITS_CHECKPOINT / "model_index.json").is_file():
        pytest.skip("the digits checkpoint is not shipped in this checkout")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(free_port(), converted_dir, tmp_path), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for name in (TINY, DIGITS):
        expected = _outputs(name, _load_model(_folder(name, converted_dir)), converted_dir)
        for rank, results in enumerate(ranks):
            local, full = results[name]["bytes"]
            assert local * WORLD == full, (name, rank, local, full)  # both experts' projections, split in halves
            assert results[name]["sharded_outside_decoder"] == []  # embeddings, ViT, connector, heads: whole tensors
            assert torch.equal(results[name]["tokens"], expected["tokens"]), (name, rank)
            for got, want in zip(results[name]["images"], expected["images"], strict=True):
                assert np.abs(got - want).max() <= 1e-4, (name, rank, np.abs(got - want).max())


def test_plan_shards_every_decoder_projection_of_both_experts_and_nothing_else(converted_dir):
    config = BagelConfig.from_pretrained(converted_dir / "model")
    with torch.device("meta"):
        model = BagelForConditionalGeneration(config)
    plan = model.tp_plan
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    styles = {name: plan.get(replace_layer_number_by_wildcard(name)) for name in linears}
    decoder = {name for name in linears if name.startswith("model.language_model.layers.")}
    for name in decoder:  # q/k/v/gate/up by output features, o/down by input features, in both experts
        kind = name.split(".")[-1].removesuffix("_moe_gen")
        assert styles[name] == ("colwise" if kind in COLWISE else "rowwise"), name
    assert len(decoder) == config.text_config.num_hidden_layers * 2 * 7
    assert {name for name in linears - decoder if styles[name] is not None} == set()  # ViT, connector, heads
    assert plan["model.language_model.embed_tokens"] == "replicate"  # not transformers' default vocabulary split
    names = {replace_layer_number_by_wildcard(name) for name, _ in model.named_modules()}
    assert set(plan) <= names, set(plan) - names  # no rule names a missing module


def test_a_size_that_splits_heads_is_refused_before_loading(converted_dir):
    config = BagelConfig.from_pretrained(converted_dir / "model")  # 2 key/value heads, 4 query heads
    for size in (1, 2):
        check_tensor_parallel_size(config.text_config, size)
    with pytest.raises(ValueError, match=r"over 3 processes would split .* must divide 2 \(one of \[1, 2\]\)"):
        check_tensor_parallel_size(config.text_config, 3)
    with torch.device("meta"):
        model = BagelForConditionalGeneration(config)
    # from_pretrained's hook between building the model (on meta) and reading the weights
    with pytest.raises(ValueError, match="over 4 processes would split"):
        BagelForConditionalGeneration.maybe_distribute_model(model, DistributedConfig(tp_size=4), object())


def test_cli_parallel_tp_needs_torchrun(tmp_path, monkeypatch, capsys):
    from diffusers_bagel.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--checkpoint", str(DIGITS_CHECKPOINT), "--prompt", "x", "--output", str(tmp_path / "x.png"),
              "--parallel", "tp"])  # fmt: skip
    assert exit_.value.code == 2
    assert "--parallel tp runs the decoder split over the processes under torchrun" in capsys.readouterr().err


@pytest.mark.slow  # a real torchrun of two processes
def test_cli_under_torchrun_writes_the_single_process_png(digits_pipe, one_thread, tmp_path):
    output = tmp_path / "seven.png"
    result = torchrun_bagel(WORLD, "generate", "--checkpoint", str(DIGITS_CHECKPOINT), "--prompt",
                            "a handwritten digit seven", "--steps", "3", "--seed", "5", "--output", str(output),
                            "--parallel", "tp")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1, result.stdout  # rank 0 only
    expected = digits_pipe("a handwritten digit seven", num_inference_steps=3,
                           generator=torch.Generator().manual_seed(5)).images[0]  # fmt: skip
    difference = np.abs(np.asarray(PIL.Image.open(output), dtype=int) - np.asarray(expected, dtype=int))
    assert difference.max() <= 1  # 8-bit rounding of values within 1e-4
