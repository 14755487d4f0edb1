"""LoRA on the generation experts: only `*_moe_gen` linears get adapters, training changes nothing else (the
understanding path's logits stay bit-identical), the saved adapter is a standard PEFT folder that reproduces the
trained outputs in a fresh model, through transformers' `load_adapter` and in a BagelPipeline, and merges."""

import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from diffusers_bagel import BagelPipeline
from transformers_bagel import BagelContext, BagelForConditionalGeneration, BagelProcessor
from transformers_bagel.training import (
    BagelDataCollator,
    BagelTrainer,
    bagel_lora_config,
    bagel_training_arguments,
    edit_sample,
    get_bagel_lora_model,
    load_bagel_lora,
    text_to_image_sample,
    understanding_sample,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(width, height, seed):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _latent(seed, height=4, width=4):
    return torch.randn(16, height, width, generator=torch.Generator().manual_seed(seed))


def _samples():
    samples = []
    for i in range(4):
        t2i = text_to_image_sample(f"picture {i}", None, row=i)
        t2i["segments"][1]["image"], t2i["segments"][1]["latents"] = None, _latent(i)
        samples.append(t2i)
    edit = edit_sample(_image(32, 32, 9), "edit it", None, row=4)
    edit["segments"][0]["latents"] = _latent(10)
    edit["segments"][-1]["image"], edit["segments"][-1]["latents"] = None, _latent(11)
    samples.append(edit)
    samples.append(understanding_sample(_image(42, 28, 12), "what is shown?", "noise", row=5))
    return samples


def _load(converted_dir):
    model = BagelForConditionalGeneration.from_pretrained(converted_dir / "model")
    model.set_attn_implementation("sdpa")
    return model.eval()


@pytest.fixture(scope="module")
def trained(converted_dir, tmp_path_factory):
    """A LoRA run of a few steps, with the probes taken before and after."""
    processor = BagelProcessor.from_pretrained(converted_dir / "processor")
    model = _load(converted_dir)
    collator = BagelDataCollator(processor, model.config, text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0,
                                 vae_cond_dropout_prob=0.0)  # fmt: skip
    probes = _probes(model, collator)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    peft_model = get_bagel_lora_model(model, r=4)
    out = tmp_path_factory.mktemp("lora")
    args = bagel_training_arguments(str(out / "run"), max_steps=8, learning_rate=1e-2, warmup_steps=0,
                                    per_device_train_batch_size=3, use_cpu=True, save_strategy="no",
                                    disable_tqdm=True, logging_steps=1)  # fmt: skip
    BagelTrainer(model=peft_model, args=args, train_dataset=_samples(), data_collator=collator).train()
    peft_model.eval()
    after = _probes(peft_model, collator)
    peft_model.save_pretrained(out / "adapter")
    return {"peft_model": peft_model, "collator": collator, "before": probes, "after": after,
            "base_state": base_state, "adapter": out / "adapter"}  # fmt: skip


@torch.no_grad()
def _probes(model, collator):
    """Understanding logits (ViT image + text, and text only), the generation loss at fixed noise and time, and a
    raw velocity prediction without context."""
    und = collator([understanding_sample(_image(42, 28, 12), "what is shown?", "noise"),
                    understanding_sample(None, "plain text", "only")])  # fmt: skip
    und.pop("labels")
    gen = collator(_samples()[:2])
    noise = [torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (20, 21)]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    x_t = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(3))
    empty = BagelContext()
    return {
        "und_logits": model(**und, use_cache=False, logits_to_keep=0).logits,
        "mse": model(**gen, noise=noise, timesteps=torch.tensor([0.4, 0.7])).mse_loss,
        "velocity": base.predict_velocity(x_t, 0.5, (2, 2), empty, [empty.new_span()]),
    }


def test_adapters_sit_on_generation_experts_only(trained):
    lora_modules = [name for name, module in trained["peft_model"].named_modules() if isinstance(module, LoraLayer)]
    assert len(lora_modules) == 2 * 7  # two layers x (q, k, v, o, gate, up, down)
    assert all("_moe_gen" in name for name in lora_modules)
    extended = bagel_lora_config(r=2, include_latent_projections=True)
    import re

    names = ["model.vae2llm", "llm2vae", "model.language_model.layers.0.self_attn.q_proj_moe_gen",
             "model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.mlp.up_proj",
             "model.vision_model.encoder.layers.0.mlp.fc1"]  # fmt: skip
    matched = [n for n in names if re.fullmatch(extended.target_modules, n)]
    assert matched == names[:3]
    with pytest.raises(ValueError, match="target_modules"):
        bagel_lora_config(target_modules=["q_proj"])


def test_training_changes_only_the_adapters(trained):
    base = trained["peft_model"].get_base_model()
    state = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    assert set(state) == set(trained["base_state"])
    assert all(torch.equal(state[k], v) for k, v in trained["base_state"].items())
    # the understanding path is bit-identical; the generation path moved
    assert torch.equal(trained["before"]["und_logits"], trained["after"]["und_logits"])
    assert trained["after"]["mse"] < trained["before"]["mse"]
    assert not torch.allclose(trained["before"]["velocity"], trained["after"]["velocity"])


def test_saved_adapter_reloads_into_a_fresh_model(trained, converted_dir):
    saved = load_file(str(trained["adapter"] / "adapter_model.safetensors"))
    assert saved and all("_moe_gen" in key and "lora_" in key for key in saved)
    assert (trained["adapter"] / "adapter_config.json").is_file()

    reloaded = load_bagel_lora(_load(converted_dir), str(trained["adapter"]))
    probes = _probes(reloaded, trained["collator"])
    for key in ("und_logits", "mse", "velocity"):
        torch.testing.assert_close(probes[key], trained["after"][key], rtol=0, atol=0)

    # transformers' own PEFT integration, in place
    model = _load(converted_dir)
    model.load_adapter(str(trained["adapter"]))
    torch.testing.assert_close(_probes(model, trained["collator"])["velocity"], trained["after"]["velocity"])


def test_adapter_in_the_pipeline_and_merged(trained, converted_dir):
    pipe = BagelPipeline.from_pretrained(converted_dir)
    pipe.model.set_attn_implementation("sdpa")
    model = pipe.model
    load_bagel_lora(pipe, str(trained["adapter"]))
    assert pipe.model is model  # in place: the pipeline calls the same object
    torch.testing.assert_close(_probes(pipe.model, trained["collator"])["velocity"], trained["after"]["velocity"])
    image = pipe("picture 1", height=32, width=32, num_inference_steps=3, output_type="np").images
    assert np.isfinite(image).all()

    merged_pipe = BagelPipeline.from_pretrained(converted_dir)
    merged_pipe.model.set_attn_implementation("sdpa")
    merged = load_bagel_lora(merged_pipe, str(trained["adapter"]), merge=True)
    assert merged_pipe.model is merged
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    probes = _probes(merged, trained["collator"])
    torch.testing.assert_close(probes["velocity"], trained["after"]["velocity"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probes["und_logits"], trained["before"]["und_logits"], rtol=0, atol=0)


# -- adapter paths: a local-looking path never waits on the Hub (issue 23) -------------------------------------------


class _Reached(Exception):
    """Raised by the stand-in for peft's loader: the path was handed on to peft (and from there to the Hub)."""


@pytest.fixture()
def no_hub(monkeypatch, tmp_path):
    """No network: the Hub download and peft's loader are stand-ins; the working directory is an empty folder."""
    import huggingface_hub
    from peft import PeftModel

    def hub(*args, **kwargs):
        raise AssertionError("a local-looking path was sent to the Hub")

    def peft_loader(model, path, **kwargs):
        raise _Reached(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    monkeypatch.setattr(PeftModel, "from_pretrained", peft_loader)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "path",
    ["./runs/missing-lora", "../missing-lora", "~/no-such-lora-folder", "runs/missing-lora/", "runs/a/missing-lora",
     "runs/missing lora", "runs/..lora", "missing-lora"],
)  # fmt: skip
def test_a_local_looking_missing_adapter_fails_at_once(no_hub, path):
    import time

    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=rf"LoRA adapter folder '{re.escape(path)}' does not exist \(relative to"):
        load_bagel_lora(object(), path)
    assert time.perf_counter() - start < 1.0


def test_a_missing_adapter_under_an_existing_folder_fails_at_once(no_hub):
    (no_hub / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'runs/missing-lora' does not exist"):
        load_bagel_lora(object(), "runs/missing-lora")
    (no_hub / "runs" / "edit-lora").mkdir()  # the run's output folder, not its adapter
    with pytest.raises(FileNotFoundError, match=r"'runs/edit-lora' holds no adapter_config.json .*OUTPUT_DIR/final"):
        load_bagel_lora(object(), "runs/edit-lora")


def test_offline_a_hub_id_outside_the_cache_fails_at_once(no_hub, monkeypatch):
    import huggingface_hub

    cached = {}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, **kw: cached.get((repo, name)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'runs/missing-lora' does not exist: .*HF_HUB_OFFLINE is set"):
        load_bagel_lora(object(), "runs/missing-lora")
    cached[("someone/bagel-lora", "adapter_config.json")] = "/cache/adapter_config.json"
    with pytest.raises(_Reached):  # in the cache: peft loads it offline
        load_bagel_lora(object(), "someone/bagel-lora")


def test_hub_ids_still_go_to_the_hub_and_a_failed_lookup_names_both_readings(no_hub, monkeypatch):
    from peft import PeftModel

    with pytest.raises(_Reached):
        load_bagel_lora(object(), "runs/missing-lora")  # no `runs/` here, online: a valid repo id
    with pytest.raises(_Reached):
        load_bagel_lora(object(), "someone/bagel-lora")

    def not_found(model, path, **kwargs):
        raise ValueError(f"Can't find 'adapter_config.json' at '{path}'")

    monkeypatch.setattr(PeftModel, "from_pretrained", not_found)
    with pytest.raises(FileNotFoundError, match=r"no local folder of that name .* the Hub lookup of it as a repo id"):
        load_bagel_lora(object(), "someone/bagel-lora")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab-_./~ \\:", min_size=1, max_size=12))
def test_only_valid_repo_ids_are_sent_to_the_hub(path):
    """Property: a path that is not local-looking is a valid `namespace/name` repo id; every other path is decided
    locally (in the empty test folder it does not exist: FileNotFoundError, with the Hub never called)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from transformers_bagel.training.lora import _looks_local

    if not _looks_local(path):
        assert path.count("/") == 1
        validate_repo_id(path)
        return
    try:
        validate_repo_id(path)
        valid = path.count("/") == 1
    except HFValidationError:
        valid = False
    assert not valid or path.startswith((".", "~")) or path.endswith("/") or Path(path).parent.is_dir()


def test_diffusers_lora_methods_on_the_pipeline(trained, converted_dir):
    """`pipe.load_lora_weights` / `fuse_lora` / `unfuse_lora` / `set_adapters` / `disable_lora` / `enable_lora` /
    `unload_lora_weights`, as a diffusers user calls them: the loaded adapter gives what `load_bagel_lora` gives,
    fused to float rounding, and scaled by 0, disabled or unloaded the base model (to float rounding)."""
    call = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent"}

    def latents(pipeline):
        return pipeline("picture 1", generator=torch.Generator().manual_seed(0), **call).images

    def fresh():
        pipeline = BagelPipeline.from_pretrained(converted_dir, model=_load(converted_dir))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    base = latents(fresh())
    reference = fresh()
    load_bagel_lora(reference, trained["adapter"])
    adapted = latents(reference)
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the image

    pipe = fresh()
    with pytest.raises(ValueError, match="No LoRA adapter is loaded"):
        pipe.fuse_lora()
    pipe.load_lora_weights(trained["adapter"])
    assert pipe.get_active_adapters() == ["default_0"]
    assert torch.equal(latents(pipe), adapted)
    pipe.set_adapters("default_0", 0.0)
    assert (latents(pipe) - base).abs().max() < 1e-5
    pipe.set_adapters(["default_0"], [1.0])
    pipe.disable_lora()  # peft's wrapper runs the base layer on a contiguous copy of its input: rounding may differ
    assert (latents(pipe) - base).abs().max() < 1e-5
    pipe.enable_lora()
    assert torch.equal(latents(pipe), adapted)
    with pytest.raises(ValueError, match="Unknown adapters \\['other'\\]"):
        pipe.set_adapters("other")
    pipe.fuse_lora()
    assert (latents(pipe) - adapted).abs().max() < 1e-4
    pipe.unfuse_lora()  # the base weights are back, to float rounding (W + dW - dW)
    assert (latents(pipe) - adapted).abs().max() < 1e-4
    model = pipe.model
    pipe.unload_lora_weights()
    assert pipe.model is model and not pipe.get_active_adapters()
    assert not [m for m in pipe.model.modules() if isinstance(m, LoraLayer)]
    assert (latents(pipe) - base).abs().max() < 1e-4
