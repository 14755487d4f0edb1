"""BagelTrainer end to end on a very small model: a few hundred steps make the loss fall, a resumed run continues the
same curve (losses and EMA), the EMA callback follows its recursion and is saved with checkpoints, gradient
accumulation divides per micro-batch, freezing options, and examples/train.py as a user runs it."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from transformers_bagel import BagelForConditionalGeneration
from transformers_bagel.training import (
    BagelDataCollator,
    BagelEMACallback,
    BagelTrainer,
    bagel_training_arguments,
    freeze_modules,
    load_ema_weights,
    text_to_image_sample,
    understanding_sample,
)


ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = BagelForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model


def _dataset():
    """Four text-to-image samples whose latent depends on the prompt, and four question-answer samples."""
    colors = ["red", "green", "blue", "white"]
    samples = []
    for i, color in enumerate(colors):
        latent = torch.full((16, 4, 4), float(i) - 1.5)
        latent[i::4] *= -1.0
        sample = text_to_image_sample(f"a {color} square", None, row=i)
        sample["segments"][1]["image"], sample["segments"][1]["latents"] = None, latent
        samples.append(sample)
        samples.append(understanding_sample(None, f"the colour of {i}?", f"it is {color}", row=4 + i))
    return samples


class _LossAndParams(TrainerCallback):
    """Records the trainable parameters after every optimiser step (before the EMA callback's update)."""

    def __init__(self):
        self.params = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def _trainer(model, processor, output_dir, max_steps, callbacks=(), **overrides):
    args = bagel_training_arguments(
        str(output_dir), max_steps=max_steps, learning_rate=2e-3, warmup_steps=10, logging_steps=1, save_steps=100,
        per_device_train_batch_size=4, seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, **overrides,
    )  # fmt: skip
    collator = BagelDataCollator(processor, model.config, text_cond_dropout_prob=0.1, seed=0)
    return BagelTrainer(model=model, args=args, train_dataset=_dataset(), data_collator=collator,
                        callbacks=list(callbacks))  # fmt: skip


def _losses(trainer):
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


@pytest.mark.slow
def test_loss_falls_resume_continues_and_ema_is_saved(small_config, processor, tmp_path):
    recorder, ema = _LossAndParams(), BagelEMACallback(decay=0.9)
    first = _trainer(_model(small_config), processor, tmp_path / "a", 200, callbacks=[recorder, ema])
    initial = {n: p.detach().clone() for n, p in first.model.named_parameters() if p.requires_grad}
    first.train()
    log = _losses(first)
    assert set(log) == set(range(1, 201))

    def mean(key, steps):
        return sum(log[s][key] for s in steps) / len(steps)

    first10, last10 = range(1, 11), range(191, 201)
    assert mean("loss", last10) < 0.5 * mean("loss", first10), (mean("loss", first10), mean("loss", last10))
    assert mean("ce_loss", last10) < 0.1 * mean("ce_loss", first10)
    assert mean("mse_loss", last10) < 0.7 * mean("mse_loss", first10)
    assert all("ce_loss" in log[s] and "mse_loss" in log[s] for s in (1, 200))
    # loss = ce + mse as logged
    assert abs(log[200]["loss"] - log[200]["ce_loss"] - log[200]["mse_loss"]) < 1e-4

    # EMA: ema_0 = initial weights, ema_k = d * ema_{k-1} + (1 - d) * w_k, saved in each checkpoint folder
    expected = {n: p.clone() for n, p in initial.items()}
    for step, params in enumerate(recorder.params, start=1):
        for name in expected:
            expected[name] = 0.9 * expected[name] + 0.1 * params[name]
        if step == 100:
            saved = load_file(str(tmp_path / "a" / "checkpoint-100" / "ema.safetensors"))
            assert set(saved) == set(expected)
            for name in expected:
                torch.testing.assert_close(saved[name], expected[name], rtol=1e-5, atol=1e-6)
    final_ema = load_file(str(tmp_path / "a" / "checkpoint-200" / "ema.safetensors"))

    # a run resumed from step 100 continues the same curve, and its EMA too
    resumed = _trainer(_model(small_config, seed=1), processor, tmp_path / "b", 200, callbacks=[BagelEMACallback(0.9)])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-100"))
    log_b = {step: entry for step, entry in _losses(resumed).items() if step > 100}  # 1-100: the restored history
    assert set(log_b) == set(range(101, 201))
    for step in range(101, 201):
        assert abs(log_b[step]["loss"] - log[step]["loss"]) <= 1e-5 * max(1.0, log[step]["loss"]), step
    resumed_ema = load_file(str(tmp_path / "b" / "checkpoint-200" / "ema.safetensors"))
    for name, value in final_ema.items():
        torch.testing.assert_close(resumed_ema[name], value, rtol=1e-5, atol=1e-6)

    # the averaged weights load back into a model by name
    fresh = _model(small_config, seed=2)
    assert sorted(load_ema_weights(fresh, str(tmp_path / "a" / "checkpoint-200"))) == sorted(final_ema)
    torch.testing.assert_close(fresh.lm_head.weight, final_ema["lm_head.weight"])


def test_gradient_accumulation_divides_each_micro_batch(small_config, processor, tmp_path):
    """Like the original (`loss / gradient_accumulation_steps`), not a token-weighted mean over micro-batches."""
    model = _model(small_config)
    trainer = _trainer(model, processor, tmp_path, 2, gradient_accumulation_steps=4)
    batch = trainer.data_collator(_dataset()[:3])
    torch.manual_seed(0)
    full = trainer.compute_loss(model, dict(batch)).item()
    torch.manual_seed(0)
    trainer.current_gradient_accumulation_steps = 4
    step = trainer.training_step(model, dict(batch)).item()
    assert abs(step - full / 4) < 1e-6 * full
    assert trainer.model_accepts_loss_kwargs is False


def test_activation_checkpointing_gives_the_same_gradients(small_config, processor):
    batch = BagelDataCollator(processor, small_config, text_cond_dropout_prob=0.0)(_dataset()[:4])
    grads = []
    for checkpointing in (False, True):
        model = _model(small_config)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.language_model.layers[0].gradient_checkpointing
        torch.manual_seed(5)
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


def test_freeze_und_detaches_understanding_activations_as_the_original(small_config, processor):
    """`freeze_und` as the original: values unchanged; no gradient reaches text embeddings, ViT, connector or the
    understanding expert even where they would train; the generation expert's gradient from a text-to-image target
    (whose text context does not depend on it) is unchanged."""
    config = copy.deepcopy(small_config)
    t2i = [sample for sample in _dataset() if sample["segments"][-1]["type"] == "vae_image"][:2]
    und = [sample for sample in _dataset() if sample["segments"][-1]["type"] == "text"][:1]
    collate = BagelDataCollator(processor, config, text_cond_dropout_prob=0.0)
    runs = []
    for freeze in (False, True):
        model = _model(copy.deepcopy(config))
        model.train()
        if freeze:
            freeze_modules(model, freeze_und=True)
            assert model.model.language_model.config.freeze_und
            model.requires_grad_(True)  # prove the detaching, not only requires_grad=False
        torch.manual_seed(3)
        out = model(**collate(t2i + und))
        (out.mse_loss + out.ce_loss).backward()
        runs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (frozen, frozen_grads) = runs
    assert torch.equal(plain.mse_loss, frozen.mse_loss) and torch.equal(plain.ce_loss, frozen.ce_loss)
    und_params = [n for n in frozen_grads if n.startswith(("model.vision_model", "model.connector"))
                  or n == "model.language_model.embed_tokens.weight"
                  or (".language_model.layers." in n and "moe_gen" not in n)]  # fmt: skip
    assert und_params and all(frozen_grads[n] is None or not frozen_grads[n].any() for n in und_params)
    for name in ("model.language_model.embed_tokens.weight", "model.language_model.layers.0.self_attn.q_proj.weight"):
        assert plain_grads[name].abs().sum() > 0  # without the option they do learn
    assert frozen_grads["lm_head.weight"].abs().sum() > 0  # the head still learns from the detached states
    gen_params = [n for n in frozen_grads if "moe_gen" in n and "layers.0." in n]
    for name in gen_params:
        torch.testing.assert_close(frozen_grads[name], plain_grads[name], rtol=1e-5, atol=1e-8)
    assert not copy.deepcopy(config).text_config.freeze_und  # the flag lives on the trained model's config only


def test_freeze_options(small_config):
    small_config = copy.deepcopy(small_config)
    model = _model(small_config)
    frozen = freeze_modules(model, freeze_vit=True)
    assert frozen and all(".vision_model." in name for name in frozen)
    assert not model.model.latent_pos_embed.pos_embed.requires_grad
    model = _model(small_config)
    frozen = set(freeze_modules(model, freeze_und=True))
    assert "model.language_model.layers.0.mlp.up_proj.weight" in frozen
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in frozen
    assert "model.language_model.norm.weight" in frozen
    assert not any("moe_gen" in name for name in frozen)
    model = _model(small_config)
    frozen = set(freeze_modules(model, freeze_llm=True))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in frozen and "model.language_model.layers.0.mlp_moe_gen.up_proj.weight" in frozen
    assert trainable == {n for n, _ in model.named_parameters() if not n.startswith(("model.language_model", "lm_head"))
                         and not n.endswith("pos_embed.pos_embed")}  # fmt: skip


def test_optimiser_and_schedule_defaults_of_the_original(small_config, processor, tmp_path):
    model = _model(small_config)
    args = bagel_training_arguments(str(tmp_path), max_steps=4000, use_cpu=True)  # the defaults themselves
    trainer = BagelTrainer(model=model, args=args, train_dataset=_dataset(),
                           data_collator=BagelDataCollator(processor, model.config))  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=4000)
    optimizer = trainer.optimizer
    assert type(optimizer).__name__ == "AdamW"
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-15 and group["weight_decay"] == 0.0
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(trainer.model.model.latent_pos_embed.pos_embed) not in trained  # fixed tables stay out
    assert trainer.args.max_grad_norm == 1.0
    rates = []
    for _ in range(2500):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        optimizer.step()
        trainer.lr_scheduler.step()
    assert rates[0] == 0.0 and abs(rates[1000] - 0.5e-4) < 1e-12 and rates[2000] == rates[2499] == 1e-4


def test_trainer_refuses_dropped_columns(small_config, processor, tmp_path):
    model = _model(small_config)
    args = bagel_training_arguments(str(tmp_path), remove_unused_columns=True, use_cpu=True)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        BagelTrainer(model=model, args=args, train_dataset=_dataset(),
                     data_collator=BagelDataCollator(processor, model.config))  # fmt: skip


def _example_main():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from train import build_parser, main
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return build_parser, main


def _example_flags(converted_dir, out):
    return ["--checkpoint", str(converted_dir), "--output_dir", str(out), "--max_steps", "3", "--warmup_steps", "0",
            "--save_steps", "2", "--logging_steps", "1", "--max_tokens", "200", "--use_cpu"]  # fmt: skip


@pytest.mark.slow
def test_train_example_full_fine_tune_as_a_subprocess(converted_dir, tmp_path, monkeypatch):
    """examples/train.py on the tiny checkpoint and its synthetic data, as a user runs it; the result loads as a
    pipeline, with the frozen ViT unchanged and the generation expert trained."""
    out = tmp_path / "full"
    command = [sys.executable, str(ROOT / "examples" / "train.py"), *_example_flags(converted_dir, out), "--freeze_vit",
               "--activation_checkpointing"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    assert (out / "checkpoint-2" / "ema.safetensors").is_file()
    from diffusers import DiffusionPipeline
    from diffusers.utils import dynamic_modules_utils

    from diffusers_bagel import BagelPipeline

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    pipe = BagelPipeline.from_pretrained(out / "final")
    # ...and by diffusers' own route, as a fine-tune pushed with `bagel push` is opened
    assert type(DiffusionPipeline.from_pretrained(out / "final", trust_remote_code=True)) is BagelPipeline
    original = BagelForConditionalGeneration.from_pretrained(converted_dir / "model")
    changed = pipe.model.model.language_model.layers[0].mlp_moe_gen.up_proj.weight
    assert not torch.equal(changed, original.model.language_model.layers[0].mlp_moe_gen.up_proj.weight)
    vit = original.model.vision_model.state_dict()
    assert all(torch.equal(v, vit[k]) for k, v in pipe.model.model.vision_model.state_dict().items())


def test_train_example_lora_with_latent_cache(converted_dir, tmp_path):
    """The --lora path (in process, to spare a second interpreter start): a standard adapter comes out."""
    _, main = _example_main()
    out = tmp_path / "lora"
    main([*_example_flags(converted_dir, out), "--lora", "--lora_rank", "4", "--cache_latents", "--vae_mean"])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3
    assert (out / "final" / "adapter_config.json").is_file() and (out / "final" / "adapter_model.safetensors").is_file()
    assert not (out / "final" / "model.safetensors").exists()
    ema = load_file(str(out / "checkpoint-2" / "ema.safetensors"))
    assert ema and all("lora_" in name for name in ema)  # only the adapters train


def test_train_example_help_names_every_flag():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), "--help"], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0
    build_parser, _ = _example_main()
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            assert action.option_strings[0] in result.stdout
    assert "accelerate launch" in result.stdout and "torchrun" in result.stdout


def test_train_example_refuses_frictions_and_shows_defaults():
    build_parser, _ = _example_main()
    module = sys.modules[build_parser.__module__]
    assert module.parse_args(["--max_steps", "1000"]).warmup_steps == 100  # the original's 2000, capped at 10%
    assert module.parse_args(["--max_steps", "50000"]).warmup_steps == 2000
    for argv, message in ((["--max_steps", "10", "--warmup_steps", "20"], "--warmup_steps 20 must be in"),
                          (["--bf16", "--use_cpu"], "--bf16 needs a CUDA GPU")):  # fmt: skip
        result = subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), *argv], capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
    help_text = subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), "--help"], capture_output=True,
                               text=True, timeout=120).stdout  # fmt: skip
    assert "(default: 1000)" in help_text and "(default: 0.0001)" in help_text


def test_multi_process_normalisation_uses_the_global_token_counts(small_config, processor, tmp_path):
    """Two processes, as the original: each loss is `sum * world / total` with the token counts of both processes
    (the other process's counts come from a stand-in gather)."""
    from types import SimpleNamespace

    model = _model(small_config)
    trainer = _trainer(model, processor, tmp_path, 1)
    batch = trainer.data_collator(_dataset()[:4])
    ce_local = int((batch["labels"][:, 1:] != -100).sum())
    grid = batch["latent_grid_hw"][batch["noised_latent_images"]]
    mse_local = int((grid[:, 0] * grid[:, 1]).sum())
    other = torch.tensor([[3.0 * ce_local, 5.0 * mse_local]])  # the other process holds 3x / 5x the tokens
    trainer.accelerator = SimpleNamespace(
        num_processes=2, device=torch.device("cpu"), gather=lambda local: torch.cat([local, other]),
        unwrap_model=lambda m: m,
    )  # fmt: skip
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(batch), return_outputs=True)[1]
    torch.manual_seed(0)
    mean = model(**batch)
    torch.testing.assert_close(loss.ce_loss, mean.ce_loss * ce_local * 2 / (4 * ce_local), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.mse_loss, mean.mse_loss * mse_local * 2 / (6 * mse_local), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.loss, loss.ce_loss + loss.mse_loss)


def test_model_takes_transformers_num_items_in_batch(small_config, processor, tmp_path):
    model = _model(small_config)
    batch = _trainer(model, processor, tmp_path, 1).data_collator(_dataset()[1::2])  # understanding samples only
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    mean = model(**batch).ce_loss
    torch.testing.assert_close(model(**batch, num_items_in_batch=4 * labelled).ce_loss, mean / 4)
    torch.testing.assert_close(model(**batch, num_items_in_batch=torch.tensor(2 * labelled)).ce_loss, mean / 2)
