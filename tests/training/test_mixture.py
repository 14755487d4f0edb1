"""Multi-task training from a data config: a text-to-image and an understanding source train together (CE and MSE in
the same run, throughput logged), the source shares follow the weights, a resumed run sees the same batches and
losses, the original BAGEL data YAML converts, bad configs are refused naming the source and key, and
special_token_loss adds exactly the expected labels."""

import io
import json
import logging
import math

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from diffusers import AutoencoderKL

from transformers_bagel import BagelConfig, BagelForConditionalGeneration
from transformers_bagel.training import (
    IGNORE_INDEX,
    BagelDataCollator,
    BagelMixtureDataset,
    BagelPackedDataset,
    BagelTrainer,
    bagel_attention_flops_coefficient,
    bagel_flops_per_token,
    bagel_training_arguments,
    load_mixture_config,
    mixture_order,
    original_data_config_to_mixture,
    read_data_config,
    text_segment,
    text_to_image_sample,
    vae_segment,
    validate_sample,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae(converted_dir):
    return AutoencoderKL.from_pretrained(converted_dir / "vae")


def _image(width, height, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _two_task_files(folder):
    """A text-to-image parquet (image bytes, `caption` column) and an understanding JSON lines file whose image paths
    are relative to an image folder."""
    colors = ["red", "green", "blue", "white"]
    t2i = datasets.Dataset.from_dict(
        {"caption": [f"a {c} square" for c in colors], "image": [_png(_image(32, 32, i)) for i in range(4)]}
    )
    t2i.to_parquet(str(folder / "t2i.parquet"))
    images = folder / "images"
    images.mkdir()
    rows = []
    for i, color in enumerate(colors):
        _image(32, 32, 10 + i).save(images / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": f"colour of {i}?", "answer": f"it is {color}"})
    _write_jsonl(folder / "vqa.jsonl", rows)


def _config(**extra):
    return {
        "sources": [
            {"name": "t2i", "task": "text_to_image", "data": "t2i.parquet", "weight": 1.0, "columns": {"prompt": "caption"}},
            {"name": "vqa", "task": "understanding", "data": "vqa.jsonl", "image_dir": "images", "weight": 1.0},
        ],
        **extra,
    }


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = BagelForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model


class _RecordingTrainer(BagelTrainer):
    """Keeps the packed batch of every training step."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.batches = getattr(self, "batches", [])
        self.batches.append({k: v.clone() for k, v in inputs.items() if k in ("input_ids", "labels", "document_ids")})
        return super().compute_loss(model, inputs, *args, **kwargs)


def _trainer(folder, small_config, processor, vae, output_dir, max_steps, **kwargs):
    mixture = BagelMixtureDataset(_config(), processor.image_processor, seed=0, base_dir=folder)
    collator = BagelDataCollator(processor, small_config, max_tokens=128, seed=0)
    args = bagel_training_arguments(
        str(output_dir), max_steps=max_steps, learning_rate=1e-3, warmup_steps=1, logging_steps=1, save_steps=2,
        seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    return _RecordingTrainer(model=_model(small_config), args=args, train_dataset=BagelPackedDataset(mixture, collator),
                             data_collator=collator, vae=vae, **kwargs)  # fmt: skip


def _log(trainer):
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


# -- training on a mixture -------------------------------------------------------------------------------------------


def test_text_to_image_and_understanding_train_in_the_same_batches(tmp_path, small_config, processor, vae):
    _two_task_files(tmp_path)
    trainer = _trainer(tmp_path, small_config, processor, vae, tmp_path / "out", 3, peak_tflops=1.0)
    packs = trainer.train_dataset
    assert {sample["source"] for pack in (packs[i] for i in range(len(packs))) for sample in pack} == {"t2i", "vqa"}
    assert any(len({sample["source"] for sample in packs[i]}) == 2 for i in range(len(packs)))  # tasks share packs
    trainer.train()
    log = _log(trainer)
    assert set(log) == {1, 2, 3}
    values = [entry[key] for entry in log.values() for key in ("ce_loss", "mse_loss") if key in entry]
    assert values and all(math.isfinite(value) for value in values), log
    assert any("ce_loss" in entry and "mse_loss" in entry for entry in log.values()), log  # one step trains both
    # throughput: tokens of the packed batches per second; mfu from 6 x active parameters per token plus the
    # attention term over each packed sample's squared length, over the given peak of 1 TFLOP/s
    for step, entry in log.items():
        batch = trainer.batches[step - 1]
        tokens = batch["input_ids"].numel()
        squares = int((torch.bincount(batch["document_ids"][0]) ** 2).sum())
        flops = tokens * bagel_flops_per_token(small_config) + squares * bagel_attention_flops_coefficient(small_config)
        assert entry["tokens_per_second"] > 0
        expected = flops / (tokens / entry["tokens_per_second"]) / 1e12
        assert abs(entry["mfu"] - expected) <= 1e-6 + 1e-3 * expected, (step, entry, expected)


def test_cpu_without_a_peak_logs_tokens_per_second_only(tmp_path, small_config, processor, vae):
    _two_task_files(tmp_path)
    trainer = _trainer(tmp_path, small_config, processor, vae, tmp_path / "out", 1)
    trainer.train()
    entry = _log(trainer)[1]
    assert entry["tokens_per_second"] > 0 and "mfu" not in entry


def test_flops_per_token_counts_one_expert():
    config = BagelConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16))  # fmt: skip
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert bagel_flops_per_token(config) == 6 * (2 * per_layer + 64 * config.text_config.vocab_size)
    assert bagel_attention_flops_coefficient(config) == 12 * 2 * 4 * 16


def test_resumed_run_gives_the_same_batches_and_losses(tmp_path, small_config, processor, vae):
    _two_task_files(tmp_path)
    full = _trainer(tmp_path, small_config, processor, vae, tmp_path / "a", 6)
    full.train()
    resumed = _trainer(tmp_path, small_config, processor, vae, tmp_path / "b", 6)
    assert len(full.train_dataset) == 3  # 3 packs per epoch: the resumed run crosses an epoch boundary
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))  # mid-epoch
    assert len(resumed.batches) == 4
    for original, again in zip(full.batches[2:], resumed.batches, strict=True):
        for key in original:
            assert torch.equal(original[key], again[key]), key
    log_full, log_resumed = _log(full), _log(resumed)
    for step in (3, 4, 5, 6):
        assert set(log_resumed[step]) & {"ce_loss", "mse_loss"} == set(log_full[step]) & {"ce_loss", "mse_loss"}
        for key in {"loss", "ce_loss", "mse_loss"} & set(log_full[step]):
            assert abs(log_resumed[step][key] - log_full[step][key]) <= 1e-5 * max(1.0, log_full[step][key]), (step, key)


# -- mixing ----------------------------------------------------------------------------------------------------------


def test_source_shares_follow_the_weights(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(300)])
    _write_jsonl(tmp_path / "b.jsonl", [{"question": f"q{i}", "answer": f"b{i}"} for i in range(300)])
    config = {"sources": [{"name": "a", "task": "understanding", "data": "a.jsonl", "weight": 3.0},
                          {"name": "b", "task": "understanding", "data": "b.jsonl", "weight": 1.0}]}  # fmt: skip
    mixture = BagelMixtureDataset(config, seed=0, base_dir=tmp_path)
    n, p = 200, 0.75
    count = mixture.source_counts(n)["a"]
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 4 * sigma, (count, n * p, sigma)
    assert [mixture[i]["source"] for i in range(20)] == [mixture.source_of(i) for i in range(20)]
    assert mixture[0]["segments"][-1]["text"].startswith(mixture.source_of(0))  # the row of its own source
    # the order depends on the seed only
    again = BagelMixtureDataset(config, seed=0, base_dir=tmp_path)
    assert again.order == mixture.order
    assert BagelMixtureDataset(config, seed=1, base_dir=tmp_path).order != mixture.order
    # every row is used at least once (all_exhausted); first_exhausted stops at the first source to run out
    assert set(mixture.order) >= {(s, r) for s in (0, 1) for r in range(300)}
    first = mixture_order([300, 300], [3.0, 1.0], seed=0, stopping_strategy="first_exhausted")
    assert sum(1 for s, _ in first if s == 0) == 300 and len(first) < len(mixture)


def test_yaml_config_num_rows_and_image_sizes(tmp_path, processor):
    _two_task_files(tmp_path)
    _image(96, 64, 3).save(tmp_path / "images" / "0.png")  # one larger image
    config = _config()
    config["sources"][0]["num_rows"] = 2
    config["sources"][1].update(vit_max_image_size=56, vit_min_image_size=28)
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    mixture = BagelMixtureDataset(tmp_path / "mix.yaml", processor.image_processor, seed=0)
    assert sum(1 for s, _ in mixture.order if s == 0) >= 2 and {r for s, r in mixture.order if s == 0} == {0, 1}
    index = next(i for i, (s, r) in enumerate(mixture.order) if (s, r) == (1, 0))
    image = mixture[index]["segments"][0]["image"]
    assert image.size == (56, 42)  # long side 96 -> 56, multiples of the ViT patch 14
    assert read_data_config(tmp_path / "mix.yaml") == config


# -- the original's format -------------------------------------------------------------------------------------------

ORIGINAL_YAML = """\
t2i_pretrain:
  dataset_names:
  - t2i
  data_dir_list:
  - t2i_parquet
  image_transform_args:
    image_stride: 16
    max_image_size: 128
    min_image_size: 32
  is_mandatory: true
  num_used_data:
  - 1
  weight: 1
unified_edit:
  dataset_names:
  - seedxedit_multi
  image_transform_args:
    image_stride: 16
    max_image_size: 128
    min_image_size: 32
  vit_image_transform_args:
    image_stride: 14
    max_image_size: 112
    min_image_size: 28
  is_mandatory: false
  num_used_data:
  - 10
  weight: 0.5
vlm_sft:
  dataset_names:
  - llava_ov
  jsonl_path_list:
  - vlm/llava_ov_si.jsonl
  data_dir_list:
  - vlm/images
  image_transform_args:
    image_stride: 14
    max_image_size: 112
    min_image_size: 28
    max_pixels: 2_007_040
  frame_sampler_args:
    max_num_frames: 12
    min_num_frames: 8
  is_mandatory: true
  shuffle_lines: true
  shuffle_seed: 0
  num_used_data:
  - 3
  weight: 1
"""


def test_original_data_config_converts(tmp_path, caplog, processor):
    (tmp_path / "original.yaml").write_text(ORIGINAL_YAML)
    info = {"unified_edit": {"seedxedit_multi": {"data_dir": "edit_parquet", "num_files": 10,
                                                 "parquet_info_path": "info.json"}}}  # fmt: skip
    with caplog.at_level(logging.WARNING):
        config = original_data_config_to_mixture(tmp_path / "original.yaml", dataset_info=info)
    assert config == {"sources": [
        {"name": "t2i_pretrain/t2i", "task": "text_to_image", "weight": 1.0, "data": "t2i_parquet", "num_files": 1,
         "max_image_size": 128, "min_image_size": 32},
        {"name": "unified_edit/seedxedit_multi", "task": "edit", "weight": 0.5, "data": "edit_parquet",
         "num_files": 10, "max_image_size": 128, "min_image_size": 32, "vit_max_image_size": 112,
         "vit_min_image_size": 28},
        {"name": "vlm_sft/llava_ov", "task": "understanding", "weight": 1.0, "data": "vlm/llava_ov_si.jsonl",
         "image_dir": "vlm/images", "num_rows": 3, "shuffle": True, "shuffle_seed": 0, "vit_max_image_size": 112,
         "vit_min_image_size": 28, "max_pixels": 2007040, "num_frames": 12},
    ]}  # fmt: skip
    warned = caplog.text
    for key in ("is_mandatory", "parquet_info_path"):
        assert key in warned
    assert "frame_sampler_args" not in warned  # mapped: its largest frame count
    assert "image_stride" not in warned  # the strides match the model's

    # the converted config loads (paths relative to the original YAML's folder)
    (tmp_path / "t2i_parquet").mkdir()
    for k in range(2):
        datasets.Dataset.from_dict({"prompt": [f"p{k}"], "image": [_png(_image(32, 32, k))]}).to_parquet(
            str(tmp_path / "t2i_parquet" / f"part{k}.parquet"))  # fmt: skip
    (tmp_path / "vlm" / "images").mkdir(parents=True)
    _image(32, 32).save(tmp_path / "vlm" / "images" / "x.png")
    _write_jsonl(tmp_path / "vlm" / "llava_ov_si.jsonl", [{"image": "x.png", "question": f"q{i}", "answer": "a"} for i in range(5)])
    config["sources"].pop(1)  # no edit data written
    mixture = BagelMixtureDataset(config, processor.image_processor, seed=0, base_dir=tmp_path)
    assert [len(rows) for rows in mixture.rows] == [1, 3]  # num_used_data: one parquet file; three lines
    assert mixture[0]["segments"]

    # the file itself, read as a data config, is recognised and converted
    assert read_data_config(tmp_path / "original.yaml", dataset_info=info)["sources"][0]["name"] == "t2i_pretrain/t2i"
    with pytest.raises(ValueError, match="original_data_config_to_mixture"):
        load_mixture_config(tmp_path / "original.yaml")
    with pytest.raises(ValueError, match="Group 'my_group'.*group_tasks"):
        original_data_config_to_mixture({"my_group": {"dataset_names": ["x"], "data_dir_list": ["d"], "weight": 1}})


def test_original_config_without_paths_converts_and_names_what_to_fill_in(caplog):
    """The original's example names datasets only (their paths live in its Python DATASET_INFO table)."""
    original = {"vlm_sft": {"dataset_names": ["llava_ov"], "num_used_data": [1000], "weight": 1,
                            "frame_sampler_args": {"max_num_frames": 12, "min_num_frames": 8}}}  # fmt: skip
    with caplog.at_level(logging.WARNING):
        config = original_data_config_to_mixture(original)
    assert config["sources"][0]["data"] is None and config["sources"][0]["num_rows"] == 1000
    assert "'llava_ov': no data path" in caplog.text and "fill it in" in caplog.text
    with pytest.raises(ValueError, match="Source 'vlm_sft/llava_ov': missing key `data`"):
        load_mixture_config(config)


# -- bad configs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda c: c["sources"][0].update(wieght=2), ValueError, r"Source 't2i': unknown key\(s\) \['wieght'\]"),
        (lambda c: c["sources"][1].update(data="nope.jsonl"), FileNotFoundError, r"Source 'vqa': `data` names missing"),
        (lambda c: c["sources"][1].update(image_dir="nope"), FileNotFoundError, r"Source 'vqa': `image_dir`"),
        (lambda c: c["sources"][0].update(weight=float("inf")), ValueError, r"Source 't2i': `weight` must be a finite"),
        (lambda c: c["sources"][0].update(weight=-1.0), ValueError, r"Source 't2i': `weight`"),
        (lambda c: c["sources"][0].update(weight="heavy"), ValueError, r"Source 't2i': `weight`"),
        (lambda c: c["sources"][0].update(weight=float("nan")), ValueError, r"Source 't2i': `weight`"),
        (lambda c: c["sources"][0].pop("weight"), ValueError, r"Source 't2i': missing key `weight`"),
        (lambda c: c["sources"][1].update(task="captioning"), ValueError, r"Source 'vqa': unknown `task` 'captioning'"),
        (lambda c: c["sources"][1].update(name="t2i"), ValueError, r"Source 't2i' appears twice"),
        (lambda c: c["sources"][1].update(num_rows=0), ValueError, r"Source 'vqa': `num_rows` must be a positive"),
        (lambda c: c["sources"][0].update(columns={"caption": "prompt"}), ValueError, r"Source 't2i': unknown column"),
        (lambda c: c["sources"][0].update(min_image_size=64, max_image_size=32), ValueError,
         r"Source 't2i': `min_image_size` \(64\) is larger"),
        (lambda c: c["sources"][0].update(data="t2i.txt"), FileNotFoundError, r"Source 't2i'"),
        (lambda c: c.update(stopping_strategy="never"), ValueError, r"Unknown `stopping_strategy` 'never'"),
        (lambda c: c.update(datasets=[]), ValueError, r"Unknown data config key\(s\) \['datasets'\]"),
        (lambda c: c.update(sources=[]), ValueError, r"non-empty `sources`"),
    ],
)  # fmt: skip
def test_bad_configs_are_refused_naming_the_source_and_key(tmp_path, change, error, message):
    _two_task_files(tmp_path)
    config = _config()
    change(config)
    with pytest.raises(error, match=message):
        load_mixture_config(config, base_dir=tmp_path)


def test_rows_beyond_the_data_and_sizes_beyond_the_processor_are_refused(tmp_path, processor):
    _two_task_files(tmp_path)
    config = _config()
    config["sources"][1]["num_rows"] = 10
    with pytest.raises(ValueError, match=r"Source 'vqa': `num_rows` is 10 but `data` holds 4 rows"):
        BagelMixtureDataset(config, processor.image_processor, base_dir=tmp_path)
    config = _config()
    config["sources"][0]["max_image_size"] = 4096
    with pytest.raises(ValueError, match=r"Source 't2i': `max_image_size` 4096 is outside the image processor's vae"):
        BagelMixtureDataset(config, processor.image_processor, base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"Source 't2i' sets image sizes: pass `image_processor=`"):
        BagelMixtureDataset(config, base_dir=tmp_path)


# -- special-token loss ----------------------------------------------------------------------------------------------


def _collate(processor, config, sample):
    collator = BagelDataCollator(processor, config, text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0,
                                 vae_cond_dropout_prob=0.0)  # fmt: skip
    return collator([sample])


def _t2i_with_answer(special_text=False, special_image=False, **labels):
    latent = torch.zeros(16, 4, 4)
    return {
        "segments": [
            text_segment("a red square", enable_cfg=True, special_token_loss=special_text,
                         special_token_label=labels.get("text")),
            vae_segment(latents=latent, loss=True, special_token_loss=special_image,
                        special_token_label=labels.get("image")),
            text_segment("done", loss=True),
        ],
        "row": 0,
    }  # fmt: skip


def test_special_token_loss_adds_exactly_the_expected_labels(converted_dir, processor):
    config = BagelConfig.from_pretrained(converted_dir / "model")
    # default: no extra keys, and the labels of before (only the loss text and its <|im_end|>)
    assert text_segment("x") == {"type": "text", "text": "x", "loss": False, "enable_cfg": False}
    assert set(vae_segment(latents=torch.zeros(16, 4, 4), loss=True)) == {"type", "image", "loss", "enable_cfg", "latents"}
    plain = _collate(processor, config, _t2i_with_answer())
    ids, labels = plain["input_ids"][0].tolist(), plain["labels"][0].tolist()
    done = processor.encode_text("done")
    assert [label for label in labels if label != IGNORE_INDEX] == [*done, config.eos_token_id]

    ends = [i for i, t in enumerate(ids) if t == config.eos_token_id]  # <|im_end|> of the prompt, of the answer
    vision_end = ids.index(config.end_of_image_token_id)

    # on the prompt: its <|im_end|> predicts the next token, the <|vision_start|> of the generated image
    batch = _collate(processor, config, _t2i_with_answer(special_text=True))
    assert torch.equal(batch["input_ids"], plain["input_ids"])
    diff = [(i, a, b) for i, (a, b) in enumerate(zip(labels, batch["labels"][0].tolist())) if a != b]
    assert diff == [(ends[0] + 1, IGNORE_INDEX, config.start_of_image_token_id)]

    # on the generated image: its <|vision_end|> predicts the <|im_start|> of the answer
    batch = _collate(processor, config, _t2i_with_answer(special_image=True))
    diff = [(i, a, b) for i, (a, b) in enumerate(zip(labels, batch["labels"][0].tolist())) if a != b]
    assert diff == [(vision_end + 1, IGNORE_INDEX, config.bos_token_id)]

    # an explicit label, as a token string or an id
    batch = _collate(processor, config, _t2i_with_answer(special_text=True, special_image=True, text="<|im_end|>",
                                                          image=config.eos_token_id))  # fmt: skip
    diff = [(i, b) for i, (a, b) in enumerate(zip(labels, batch["labels"][0].tolist())) if a != b]
    assert diff == [(ends[0] + 1, config.eos_token_id), (vision_end + 1, config.eos_token_id)]

    # and the model's CE counts exactly these positions more
    assert int((batch["labels"][0, 1:] != IGNORE_INDEX).sum()) == int((plain["labels"][0, 1:] != IGNORE_INDEX).sum()) + 2


def test_special_token_loss_refusals(converted_dir, processor):
    config = BagelConfig.from_pretrained(converted_dir / "model")
    sample = text_to_image_sample("p", None, row=5)
    sample["segments"][1] = vae_segment(latents=torch.zeros(16, 4, 4), loss=True, special_token_loss=True)
    with pytest.raises(ValueError, match=r"asks for special_token_loss but is the last segment \(row 5\)"):
        validate_sample(sample)
    with pytest.raises(ValueError, match="`special_token_loss` is off"):
        text_segment("x", special_token_label="<|vision_start|>")
    with pytest.raises(ValueError, match="is not a token of the tokenizer"):
        _collate(processor, config, _t2i_with_answer(special_text=True, text="<|no_such_token|>"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _collate(processor, config, _t2i_with_answer(special_text=True, text=10**9))


# -- examples/train.py -----------------------------------------------------------------------------------------------


def test_train_example_with_a_dataset_config(converted_dir, tmp_path):
    """examples/train.py --dataset_config (in process, LoRA to keep it short): a two-task mixture trains, and the
    throughput is logged next to the losses."""
    import sys
    from pathlib import Path

    examples = str(Path(__file__).resolve().parents[2] / "examples")
    sys.path.insert(0, examples)
    try:
        from train import main, parse_args
    finally:
        sys.path.remove(examples)
    _two_task_files(tmp_path)
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(_config()))
    out = tmp_path / "run"
    flags = ["--checkpoint", str(converted_dir), "--output_dir", str(out), "--max_steps", "2", "--warmup_steps", "0",
             "--save_steps", "10", "--logging_steps", "1", "--max_tokens", "200", "--use_cpu", "--lora",
             "--lora_rank", "4", "--dataset_config", str(tmp_path / "mix.yaml"), "--peak_tflops", "1"]  # fmt: skip
    main(flags)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and all(math.isfinite(loss) for loss in summary["losses"])
    with pytest.raises(SystemExit):
        parse_args([*flags, "--data", "x.jsonl"])  # one or the other


def test_special_token_label_moves_past_dropped_segments(converted_dir, processor, caplog):
    """With condition dropout the label goes to the next segment kept; with nothing kept after it, it is skipped with a
    warning."""
    config = BagelConfig.from_pretrained(converted_dir / "model")
    image = _image(32, 32)
    sample = {"segments": [text_segment("look", loss=True, special_token_loss=True),
                           {"type": "vit_image", "image": image, "enable_cfg": True}], "row": "dropped"}  # fmt: skip
    kept = BagelDataCollator(processor, config, vit_cond_dropout_prob=0.0)([sample])
    ends = kept["input_ids"][0].tolist().index(config.eos_token_id)
    assert kept["labels"][0, ends + 1] == config.start_of_image_token_id
    dropped = BagelDataCollator(processor, config, vit_cond_dropout_prob=1.0)
    with caplog.at_level(logging.WARNING):
        batch = dropped([sample])
    assert batch["input_ids"].shape[1] == ends + 1  # only the text is left
    plain = dropped([{**sample, "segments": [text_segment("look", loss=True), sample["segments"][1]]}])
    assert torch.equal(batch["labels"], plain["labels"])
    assert "special_token_loss segment is the last one kept" in caplog.text and "row dropped" in caplog.text


def test_video_rows_take_the_source_frame_count(tmp_path, processor):
    clip = tmp_path / "clips" / "c0"
    clip.mkdir(parents=True)
    for i in range(5):
        _image(32, 32, i).save(clip / f"{i}.png")
    _write_jsonl(tmp_path / "videos.jsonl", [{"video": "c0", "question": "what?", "answer": "digits"}])
    config = {"sources": [{"name": "clips", "task": "understanding", "data": "videos.jsonl", "image_dir": "clips", "weight": 1,
                           "num_frames": 2}]}  # fmt: skip
    sample = BagelMixtureDataset(config, processor.image_processor, seed=0, base_dir=tmp_path)[0]
    assert [segment["type"] for segment in sample["segments"]] == ["vit_image", "vit_image", "text", "text"]
    with pytest.raises(ValueError, match="Source 'clips': `num_frames`"):
        load_mixture_config({"sources": [dict(config["sources"][0], num_frames=0)]}, base_dir=tmp_path)
