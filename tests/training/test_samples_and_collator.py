"""Training data: sample builders and their sequence plans, rows from parquet / JSON lines + image folder /
imagefolder, the packing collator (positions, labels, documents, condition dropout, token budget), the VAE latent
cache and posterior sampling, and bad data refused with the row named."""

import io
import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL

from transformers_bagel import BagelConfig, BagelProcessor, pack_latents
from transformers_bagel.training import (
    IGNORE_INDEX,
    BagelDataCollator,
    BagelPackedDataset,
    BagelSampleDataset,
    cache_vae_latents,
    edit_sample,
    latents_from_vae_inputs,
    load_image,
    row_to_sample,
    samples_from_rows,
    text_segment,
    text_to_image_sample,
    understanding_sample,
    vae_segment,
    vit_segment,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(converted_dir):
    config = BagelConfig.from_pretrained(converted_dir / "model")
    processor = BagelProcessor.from_pretrained(converted_dir / "processor")
    vae = AutoencoderKL.from_pretrained(converted_dir / "vae")
    return config, processor, vae


def _image(width, height, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _no_dropout(processor, config, **kwargs):
    return BagelDataCollator(processor, config, text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0,
                             vae_cond_dropout_prob=0.0, **kwargs)  # fmt: skip


def _plan(sample):
    return [(s["type"], s.get("loss", False), s.get("enable_cfg", False)) for s in sample["segments"]]


# -- builders --------------------------------------------------------------------------------------------------------


def test_builders_follow_the_original_sequence_plans():
    image = _image(32, 32)
    assert _plan(text_to_image_sample("p", image)) == [("text", False, True), ("vae_image", True, False)]
    assert _plan(edit_sample([image, image], "i", image)) == [
        ("vae_image", False, True), ("vit_image", False, True),
        ("vae_image", False, True), ("vit_image", False, True),
        ("text", False, True), ("vae_image", True, False),
    ]  # fmt: skip
    assert _plan(understanding_sample(image, "q", "a")) == [
        ("vit_image", False, False), ("text", False, False), ("text", True, False)
    ]  # fmt: skip
    assert _plan(understanding_sample(None, "q", "a")) == [("text", False, False), ("text", True, False)]


def test_collator_layout_positions_labels_documents(parts):
    """Positions: text +1 per token, a clean image block +1, a noised target +0; labels: the text tokens and
    <|im_end|> of loss segments; documents: one id per sample."""
    config, processor, _ = parts
    tok = processor.tokenizer
    sample = {
        "segments": [
            text_segment("a b"),
            vae_segment(latents=torch.zeros(16, 4, 4), loss=True),  # 2x2 latent tokens
            vae_segment(latents=torch.zeros(16, 2, 4)),  # clean, 1x2 tokens
            text_segment("c", loss=True),
        ],
        "row": 5,
    }
    batch = _no_dropout(processor, config)([sample, understanding_sample(None, "q", "d")])
    ab, c = tok.encode("a b", add_special_tokens=False), tok.encode("c", add_special_tokens=False)
    q, d = tok.encode("q", add_special_tokens=False), tok.encode("d", add_special_tokens=False)
    bos, eos, s, e, lat = (config.bos_token_id, config.eos_token_id, config.start_of_image_token_id,
                           config.end_of_image_token_id, config.latent_token_id)  # fmt: skip
    first = [bos, *ab, eos, s, lat, lat, lat, lat, e, s, lat, lat, e, bos, *c, eos]
    second = [bos, *q, eos, bos, *d, eos]
    assert batch["input_ids"][0].tolist() == first + second
    n = len(ab) + 2
    positions = [*range(n), *[n] * 6, *[n] * 4, *range(n + 1, n + 1 + len(c) + 2)]
    positions += [*range(len(q) + 2), *range(len(q) + 2, len(q) + 2 + len(d) + 2)]
    assert batch["position_ids"][0].tolist() == positions
    ignore = IGNORE_INDEX
    labels = [ignore] * (n + 6 + 4) + [ignore, *c, eos] + [ignore] * (len(q) + 2) + [ignore, *d, eos]
    assert batch["labels"][0].tolist() == labels
    assert batch["document_ids"][0].tolist() == [0] * len(first) + [1] * len(second)
    assert batch["latent_grid_hw"].tolist() == [[2, 2], [1, 2]]
    assert batch["noised_latent_images"].tolist() == [True, False]
    assert batch["latents"].shape == (6, 64)


def test_condition_dropout_drops_marked_segments(parts):
    """Dropped text takes no position; a dropped image still advances the position, as the original."""
    config, processor, _ = parts
    sample = edit_sample(_image(32, 32, 1), "make it red", None, row=0)
    sample["segments"][0]["image"], sample["segments"][0]["latents"] = None, torch.zeros(16, 4, 4)
    sample["segments"][-1]["image"], sample["segments"][-1]["latents"] = None, torch.zeros(16, 4, 4)
    all_dropped = BagelDataCollator(processor, config, text_cond_dropout_prob=1.0, vit_cond_dropout_prob=1.0,
                                    vae_cond_dropout_prob=1.0)(sample)  # fmt: skip
    # only the target remains, at position 2 (clean VAE + ViT dropped: +1 each; text dropped: +0)
    assert all_dropped["position_ids"][0].tolist() == [2] * 6
    assert all_dropped["noised_latent_images"].tolist() == [True]
    assert "pixel_values" not in all_dropped


def test_seeded_dropout_is_reproducible_and_keyed_by_epoch(parts):
    config, processor, _ = parts
    samples = [text_to_image_sample(f"prompt {i}", None, row=i) for i in range(24)]
    for sample in samples:
        sample["segments"][1]["image"], sample["segments"][1]["latents"] = None, torch.zeros(16, 2, 2)

    def kept(collator):
        return int((collator(samples)["input_ids"] == config.bos_token_id).sum())

    a = BagelDataCollator(processor, config, text_cond_dropout_prob=0.5, seed=3)
    b = BagelDataCollator(processor, config, text_cond_dropout_prob=0.5, seed=3)
    first = kept(a)
    assert first == kept(b) == kept(a)  # same seed, epoch and rows: same draws, call after call
    assert 0 < first < 24
    epochs = set()
    for epoch in range(1, 6):
        a.set_epoch(epoch)
        epochs.add(tuple(a(samples)["document_ids"][0].tolist()))
    assert len(epochs) > 1  # other epochs, other draws


def test_token_budget_is_enforced_with_the_row_named(parts):
    config, processor, _ = parts
    long = text_to_image_sample("a long prompt " * 3, None, row=17)
    long["segments"][1]["image"], long["segments"][1]["latents"] = None, torch.zeros(16, 8, 8)  # 16 + 2 tokens
    collator = _no_dropout(processor, config, max_tokens=20)
    with pytest.raises(ValueError, match=r"longer than the token budget of 20 \(row 17\)"):
        collator([long])
    with pytest.raises(ValueError, match=r"longer than the token budget of 20 \(row 17\)"):
        BagelPackedDataset([long], collator)


def test_packed_dataset_groups_samples_under_the_budget(parts):
    config, processor, _ = parts
    samples = []
    for i in range(7):
        sample = text_to_image_sample("x", None, row=i)
        sample["segments"][1]["image"], sample["segments"][1]["latents"] = None, torch.zeros(16, 4, 4 * (1 + i % 3))
        samples.append(sample)
    collator = _no_dropout(processor, config, max_tokens=40)
    packed = BagelPackedDataset(samples, collator)
    assert [i for pack in packed.packs for i in pack] == list(range(7))  # order kept, nothing lost
    assert all(length <= 40 for length in packed.lengths)
    for index in range(len(packed)):
        batch = collator([packed[index]])  # a DataLoader with batch_size=1 hands the pack in a list
        assert batch["input_ids"].shape[1] == packed.lengths[index]
    with pytest.raises(ValueError, match="positive token budget"):
        BagelPackedDataset(samples, _no_dropout(processor, config))


# -- rows from datasets ----------------------------------------------------------------------------------------------


def test_rows_from_parquet_jsonl_and_imagefolder(parts, tmp_path):
    config, processor, _ = parts
    collator = _no_dropout(processor, config)
    images = [_image(40, 32, i) for i in range(3)]

    # parquet with image bytes (a datasets Image column)
    table = datasets.Dataset.from_dict(
        {"prompt": ["a", "b", "c"], "image": [{"bytes": _png(im), "path": None} for im in images]}
    ).cast_column("image", datasets.Image())
    table.to_parquet(str(tmp_path / "t2i.parquet"))
    rows = datasets.load_dataset("parquet", data_files=str(tmp_path / "t2i.parquet"), split="train")
    samples = list(samples_from_rows(rows, "text_to_image"))
    assert [s["segments"][0]["text"] for s in samples] == ["a", "b", "c"]
    assert np.array_equal(np.asarray(samples[1]["segments"][1]["image"]), np.asarray(images[1]))

    # JSON lines with paths relative to an image folder (editing, a list of sources)
    (tmp_path / "img").mkdir()
    for i, im in enumerate(images):
        im.save(tmp_path / "img" / f"{i}.png")
    with open(tmp_path / "edit.jsonl", "w") as handle:
        handle.write(json.dumps({"src": ["0.png", "1.png"], "instruction": "swap", "target": "2.png"}) + "\n")
    rows = datasets.load_dataset("json", data_files=str(tmp_path / "edit.jsonl"), split="train")
    dataset = BagelSampleDataset(rows, "edit", columns={"source": "src"}, image_dir=tmp_path / "img")
    sample = dataset[0]
    assert [s["type"] for s in sample["segments"]][:4] == ["vae_image", "vit_image", "vae_image", "vit_image"]
    batch = collator([sample])
    assert batch["noised_latent_images"].tolist() == [False, False, True]
    assert batch["vae_pixel_values"].shape[0] == 3 and batch["image_grid_hw"].shape[0] == 2

    # imagefolder with a metadata file (understanding, answer from the metadata)
    folder = tmp_path / "folder"
    folder.mkdir()
    images[0].save(folder / "cat.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "cat.png", "q": "what?", "a": "a cat"}) + "\n")
    rows = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    sample = row_to_sample(rows[0], "understanding", 0, columns={"question": "q", "answer": "a"})
    assert [s["type"] for s in sample["segments"]] == ["vit_image", "text", "text"]
    assert collator([sample])["pixel_values"].shape[1] == 3 * 14 * 14


def test_interleaved_rows_and_unknown_tasks(parts):
    row = {"segments": [{"type": "text", "text": "hi", "loss": True}, {"type": "vit_image", "image": _image(28, 28)}]}
    sample = row_to_sample(row, "interleaved", 4)
    assert sample["row"] == 4 and sample["segments"][1]["image"].size == (28, 28)
    with pytest.raises(ValueError, match="Unknown task 'video'"):
        row_to_sample(row, "video", 0)
    with pytest.raises(ValueError, match=r"Row 3 lacks the column\(s\) \['prompt'\]"):
        row_to_sample({"image": _image(28, 28)}, "text_to_image", 3)
    with pytest.raises(ValueError, match="type 'audio'"):
        row_to_sample({"segments": [{"type": "audio"}]}, "interleaved", 0)


# -- bad data --------------------------------------------------------------------------------------------------------


def test_bad_images_are_refused_with_the_row(parts, tmp_path):
    config, processor, _ = parts
    with pytest.raises(ValueError, match=r"Missing image in column 'image' \(row 2\)"):
        row_to_sample({"prompt": "p", "image": None}, "text_to_image", 2)
    with pytest.raises(ValueError, match=r"Image file .*nope.png' does not exist \(row 8\)"):
        row_to_sample({"prompt": "p", "image": "nope.png"}, "text_to_image", 8, image_dir=tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"Image file .*broken.png' could not be decoded: .* \(row 9\)"):
        row_to_sample({"prompt": "p", "image": "broken.png"}, "text_to_image", 9, image_dir=tmp_path)
    with pytest.raises(ValueError, match=r"Image data of 7 bytes could not be decoded: .* \(row 1\)"):
        load_image({"bytes": b"garbage", "path": None}, 1)
    # a datasets Image column whose bytes do not decode: the dataset names the row
    rows = datasets.Dataset.from_dict({"prompt": ["a", "b"], "image": [{"bytes": _png(_image(28, 28)), "path": None},
                                       {"bytes": b"garbage", "path": None}]}).cast_column("image", datasets.Image())  # fmt: skip
    dataset = BagelSampleDataset(rows, "text_to_image")
    dataset[0]
    with pytest.raises(ValueError, match="Row 1 could not be read"):
        dataset[1]
    with pytest.raises(TypeError, match="Unsupported image type"):
        load_image(3.5, 0)


def test_target_larger_than_the_latent_table_is_refused(parts):
    config, processor, _ = parts
    side = config.max_latent_size  # 16 tokens = 256 px for the tiny model
    sample = text_to_image_sample("p", None, row=11)
    sample["segments"][1]["image"], sample["segments"][1]["latents"] = None, torch.zeros(16, 2 * side + 2, 4)
    with pytest.raises(ValueError, match=rf"exceeds the latent position table \({side}x{side} tokens.*\(row 11\)"):
        _no_dropout(processor, config)([sample])
    with pytest.raises(ValueError, match=r"must have shape \(16, H, W\)"):
        sample["segments"][1]["latents"] = torch.zeros(8, 4, 4)
        _no_dropout(processor, config)([sample])


# -- VAE: in the step or cached ahead of time ------------------------------------------------------------------------


def test_latent_cache_matches_encoding_in_the_step(parts):
    """cache_vae_latents (a datasets.map step) stores the posterior; the latents drawn from it equal those from
    encoding the images in the step: the mean exactly, samples as mean + std * noise."""
    config, processor, vae = parts
    images = [_image(48, 40, 1), _image(64, 32, 2)]
    rows = datasets.Dataset.from_dict({"prompt": ["a", "b"], "image": [_png(im) for im in images]})
    cached = cache_vae_latents(rows, vae, processor.image_processor, image_columns=["image"], batch_size=2)
    assert "image_vae_moments" in cached.column_names
    collator = _no_dropout(processor, config)
    from_cache = collator([row_to_sample(cached[i], "text_to_image", i) for i in range(2)])
    in_step = collator([row_to_sample(rows[i], "text_to_image", i) for i in range(2)])
    assert "vae_moments" in from_cache and "vae_pixel_values" in in_step
    assert torch.equal(from_cache["latent_grid_hw"], in_step["latent_grid_hw"])

    p = config.latent_patch_size
    mean_cached = latents_from_vae_inputs(vae, from_cache["latent_grid_hw"], p, vae_moments=from_cache["vae_moments"],
                                          sample_posterior=False)  # fmt: skip
    # the reference: each image encoded alone, posterior mean, normalised, packed
    expected = []
    for image in images:
        pixels = processor.image_processor.preprocess_vae(image)["vae_pixel_values"][0][None]
        with torch.no_grad():
            z = vae.encode(pixels).latent_dist.mode()
        expected.append(pack_latents((z - vae.config.shift_factor) * vae.config.scaling_factor, p)[0])
    torch.testing.assert_close(mean_cached, torch.cat(expected), rtol=1e-4, atol=1e-5)

    # posterior samples: mean + std * eps with the generator's eps
    moments = from_cache["vae_moments"]
    draw = latents_from_vae_inputs(vae, from_cache["latent_grid_hw"], p, vae_moments=moments,
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    again = latents_from_vae_inputs(vae, from_cache["latent_grid_hw"], p, vae_moments=moments,
                                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    other = latents_from_vae_inputs(vae, from_cache["latent_grid_hw"], p, vae_moments=moments,
                                    generator=torch.Generator().manual_seed(1))  # fmt: skip
    torch.testing.assert_close(draw, again)
    assert not torch.allclose(draw, other)
    mean, logvar = moments.chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    manual = ((mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps) - vae.config.shift_factor) * vae.config.scaling_factor
    manual = torch.cat([pack_latents(m[None, :, : h * p, : w * p], p)[0]
                        for m, (h, w) in zip(manual, from_cache["latent_grid_hw"].tolist())])  # fmt: skip
    torch.testing.assert_close(draw, manual, rtol=1e-5, atol=1e-6)

    # in the step (one zero-padded batch, as the original): the image with the padded-to size matches its lone encode
    step_mean = latents_from_vae_inputs(vae, in_step["latent_grid_hw"], p, vae_pixel_values=in_step["vae_pixel_values"],
                                        sample_posterior=False)  # fmt: skip
    assert step_mean.shape == mean_cached.shape
    with pytest.raises(ValueError, match="mixes VAE inputs"):
        collator([row_to_sample(cached[0], "text_to_image", 0), row_to_sample(rows[1], "text_to_image", 1)])
