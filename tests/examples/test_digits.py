"""The digits BAGEL of the examples (`examples/digits`): data builders, tokenizer, training callbacks, and the shipped
checkpoint's accuracy."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch


pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install -e '.[digits]')")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from digits import (  # noqa: E402
    BAGEL_SPECIAL_TOKENS,
    DIGIT_NAMES,
    TASK_KINDS,
    DigitClassifier,
    DigitsTaskDataset,
    TimeBudgetCallback,
    answer_text,
    build_digits_tokenizer,
    digit_from_text,
    digits_bagel_config,
    digits_image_processor,
    downscale_digit,
    editing_accuracy,
    edit_instruction,
    generation_accuracy,
    image_grid,
    load_digits_images,
    split_digits,
    text_to_image_prompt,
    understanding_accuracy,
)
from transformers_bagel.convert_bagel_to_hf import SPECIAL_TOKENS  # noqa: E402
from transformers_bagel.modeling_bagel import BagelForConditionalGeneration  # noqa: E402
from transformers_bagel.processing_bagel import BagelProcessor  # noqa: E402
from transformers_bagel.training.callbacks import BagelEMACallback  # noqa: E402
from transformers_bagel.training.collator import BagelDataCollator  # noqa: E402


CHECKPOINT = ROOT / "checkpoints" / "tiny-bagel-digits"


@pytest.fixture(scope="module")
def split():
    return split_digits()


@pytest.fixture(scope="module")
def tokenizer():
    return build_digits_tokenizer()


# -- data --------------------------------------------------------------------------------------------------------------


def test_digits_are_upscaled_rgb_and_downscale_back_to_the_originals():
    from sklearn.datasets import load_digits

    images, labels = load_digits_images()
    original = load_digits()
    assert images.shape == (1797, 64, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, original.target)
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
    features = np.stack([downscale_digit(image) for image in images[:50]])
    # The box-downscaled 64x64 image is its original 8x8 digit up to the bicubic blur (mean error ~0.8 of 16), far
    # from any other digit (~3.6).
    error = np.abs(features - original.images[:50].reshape(50, -1)).mean()
    other = np.abs(features[:-1] - original.images[1:50].reshape(49, -1)).mean()
    assert error < 1.0 < 3.0 < other
    assert np.corrcoef(features.ravel(), original.images[:50].ravel())[0, 1] > 0.98


def test_split_is_fixed_stratified_and_disjoint(split):
    assert len(split.train_images) == 1437 and len(split.held_out_images) == 360
    counts = np.bincount(split.held_out_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 20% of each digit's ~180 images
    again = split_digits()
    np.testing.assert_array_equal(again.held_out_labels, split.held_out_labels)
    np.testing.assert_array_equal(again.held_out_images, split.held_out_images)
    train = {image.tobytes() for image in split.train_images}
    assert not any(image.tobytes() in train for image in split.held_out_images)
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_digits(held_out_fraction=1.5)


def test_prompts_and_answers():
    assert text_to_image_prompt(7) == "a handwritten digit seven"
    assert edit_instruction(3) == "change the digit to three"
    assert answer_text(np.int64(0)) == "zero"
    assert [digit_from_text(f" {name}.") for name in DIGIT_NAMES] == list(range(10))
    assert digit_from_text("no idea") is None
    with pytest.raises(ValueError, match="0..9"):
        text_to_image_prompt(10)
    with pytest.raises(TypeError):
        digit_from_text(7)


def test_task_samples(split):
    images, labels = split.train_images[:40], split.train_labels[:40]
    latents = torch.randn(40, 16, 8, 8)
    t2i = DigitsTaskDataset(images, labels, "text_to_image", latents)[3]
    assert [s["type"] for s in t2i["segments"]] == ["text", "vae_image"]
    assert t2i["segments"][0]["text"] == text_to_image_prompt(labels[3]) and t2i["segments"][0]["enable_cfg"]
    assert t2i["segments"][1]["loss"] and torch.equal(t2i["segments"][1]["latents"], latents[3])

    und = DigitsTaskDataset(images, labels, "understanding")[5]
    assert [s["type"] for s in und["segments"]] == ["vit_image", "text", "text"]
    assert und["segments"][2] == {"type": "text", "text": answer_text(labels[5]), "loss": True, "enable_cfg": False}

    edits = DigitsTaskDataset(images, labels, "edit", latents, seed=1)
    targets = []
    for _ in range(30):
        sample = edits[0]
        kinds = [s["type"] for s in sample["segments"]]
        assert kinds == ["vae_image", "vit_image", "text", "vae_image"]
        target_label = digit_from_text(sample["segments"][2]["text"])
        assert target_label != labels[0]
        target_index = [i for i in range(40) if torch.equal(latents[i], sample["segments"][3]["latents"])]
        assert len(target_index) == 1 and labels[target_index[0]] == target_label
        assert torch.equal(sample["segments"][0]["latents"], latents[0])
        targets.append(target_label)
    assert len(set(targets)) > 3  # new pairs at every read

    with pytest.raises(ValueError, match="latent"):
        DigitsTaskDataset(images, labels, "edit")
    with pytest.raises(ValueError, match="Unknown task"):
        DigitsTaskDataset(images, labels, "caption")


# -- tokenizer ---------------------------------------------------------------------------------------------------------


def test_tokenizer_holds_bagel_tokens_and_round_trips(tokenizer, tmp_path):
    assert [tokenizer.convert_tokens_to_ids(t) for t in BAGEL_SPECIAL_TOKENS] == list(range(7))
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.encode("Which digit is this?", add_special_tokens=False)
    assert len(ids) == 5 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "which digit is this ?"
    assert tokenizer.encode("a giraffe", add_special_tokens=False)[1] == tokenizer.unk_token_id
    text = "<|vision_start|><|image_pad|><|vision_end|><|im_start|>seven<|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == "seven"

    processor = BagelProcessor(image_processor=digits_image_processor(), tokenizer=tokenizer)
    processor.save_pretrained(tmp_path)
    reloaded = BagelProcessor.from_pretrained(tmp_path)
    assert reloaded.tokenizer.encode(text) == tokenizer.encode(text)
    assert reloaded.latent_token_id == 5 and reloaded.image_token_id == 6
    with pytest.raises(ValueError, match="unique"):
        build_digits_tokenizer(["seven", "seven"])


def test_collator_packs_all_three_tasks_into_one_trainable_batch(split, tokenizer):
    processor = BagelProcessor(image_processor=digits_image_processor(), tokenizer=tokenizer)
    token_ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in SPECIAL_TOKENS.items()}
    config = digits_bagel_config(len(tokenizer), token_ids, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, vit_hidden_size=32, vit_layers=1)  # fmt: skip
    images, labels = split.train_images[:8], split.train_labels[:8]
    latents = torch.randn(8, 16, 8, 8)
    samples = [DigitsTaskDataset(images, labels, task, latents)[i] for i, task in enumerate(TASK_KINDS)]
    batch = BagelDataCollator(processor, config, text_cond_dropout_prob=0, vit_cond_dropout_prob=0,
                              vae_cond_dropout_prob=0)(samples)  # fmt: skip
    # 64x64 digits: 16 latent tokens and 16 ViT patches per image.
    assert batch["latent_grid_hw"].tolist() == [[4, 4]] * 3
    assert batch["noised_latent_images"].tolist() == [True, False, True]
    assert batch["image_grid_hw"].tolist() == [[4, 4]] * 2
    assert batch["latents"].shape == (48, 64)
    labelled = batch["labels"][batch["labels"] != -100].tolist()
    assert labelled == [tokenizer.convert_tokens_to_ids(answer_text(labels[1])), token_ids["eos_token_id"]]
    torch.manual_seed(0)
    model = BagelForConditionalGeneration(config)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.ce_loss > 0 and out.mse_loss > 0
    out.loss.backward()
    assert model.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.llm2vae.weight.grad.abs().sum() > 0


# -- callbacks ---------------------------------------------------------------------------------------------------------


def test_ema_callback_averages_and_swaps_back():
    """The digits training's EMA: the library's callback with the warm-up, sampled from with `swapped_in`."""
    from transformers import TrainerControl, TrainerState

    model = torch.nn.Linear(2, 2)
    ema = BagelEMACallback(decay=0.9, warmup_power=2 / 3)
    state, control = TrainerState(), TrainerControl()
    ema.on_train_begin(None, state, control, model=model)
    start = model.weight.detach().clone()
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        state.global_step += 1
        ema.on_step_end(None, state, control)
    trained = model.weight.detach().clone()
    with ema.swapped_in():
        averaged = model.weight.detach().clone()
    assert torch.equal(model.weight, trained)
    assert (averaged > start).all() and (averaged < trained).all()
    ema.copy_to()
    assert torch.equal(model.weight, averaged)


def test_ema_warmup_follows_diffusers_ema_model():
    """The warm-up is diffusers' `EMAModel(use_ema_warmup=True, inv_gamma=1, power=2/3)`, the EMA the shipped
    checkpoint was trained with: same decays, same averages up to float rounding."""
    from diffusers.training_utils import EMAModel
    from transformers import TrainerControl, TrainerState

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    reference = EMAModel(list(model.parameters()), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    ema = BagelEMACallback(decay=0.999, warmup_power=2 / 3)
    state, control = TrainerState(), TrainerControl()
    ema.on_train_begin(None, state, control, model=model)
    for _ in range(300):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.01)
        state.global_step += 1
        reference.step(list(model.parameters()))
        ema.on_step_end(None, state, control)
        assert ema.decay_at(state.global_step) == reference.cur_decay_value
    for ours, theirs in zip(ema.shadow, reference.shadow_params):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_time_budget_callback_stops_training():
    from transformers import TrainerControl, TrainerState

    callback = TimeBudgetCallback(minutes=1e-6)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control)
    callback.start -= 1.0
    state.global_step = 7
    assert callback.on_step_end(None, state, control).should_training_stop
    assert callback.stopped_at_step == 7


def test_image_grid_layout():
    import PIL.Image

    tiles = [[PIL.Image.new("RGB", (4, 4), (255, 0, 0))] * 3, [PIL.Image.new("RGB", (4, 4), (0, 255, 0))]]
    grid = image_grid(tiles, pad=1)
    assert grid.size == (3 * 5 + 1, 2 * 5 + 1)
    assert grid.getpixel((1, 1)) == (255, 0, 0) and grid.getpixel((1, 6)) == (0, 255, 0)
    assert grid.getpixel((6, 6)) == (40, 40, 40)


# -- the shipped checkpoint --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_pipe():
    from diffusers_bagel import BagelPipeline

    if not (CHECKPOINT / "model_index.json").is_file():
        pytest.fail(f"The shipped checkpoint {CHECKPOINT} is missing.")
    pipe = BagelPipeline.from_pretrained(CHECKPOINT)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_checkpoint_layout_and_size():
    names = {path.name for path in CHECKPOINT.iterdir()}
    assert {"model_index.json", "model", "vae", "scheduler", "processor", "EVAL.md"} <= names
    total = sum(path.stat().st_size for path in CHECKPOINT.rglob("*") if path.is_file())
    assert total < 15 * 2**20


def test_shipped_checkpoint_draws_reads_and_edits_digits(shipped_pipe, split):
    """The shipped checkpoint scores 99.5% / 99.7% / 100% on the full evaluation (EVAL.md); on this small sample it
    draws, reads and edits every digit. The bounds leave room for a few thread-order flips, not for a regression."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    classifier = DigitClassifier(split.held_out_images, split.held_out_labels)
    generation = generation_accuracy(shipped_pipe, classifier, images_per_digit=3, num_inference_steps=12, seed=1)
    assert generation.accuracy >= 0.9, generation.per_digit
    assert shipped_pipe.model.config.text_config.vocab_size < 64
    understanding = understanding_accuracy(
        shipped_pipe.model, shipped_pipe.processor, split.held_out_images[:60], split.held_out_labels[:60]
    )
    assert understanding.accuracy >= 0.95, understanding.outputs
    editing = editing_accuracy(
        shipped_pipe, classifier, split.held_out_images, split.held_out_labels, 2, num_inference_steps=12, seed=1
    )
    assert editing.accuracy >= 0.85, editing.per_digit
