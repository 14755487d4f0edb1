"""Data configs and training data refuse bad input clearly (issue 23): mixture weights (the epoch rule, weight 0 left
out, non-finite and overflowing weights), config files with syntax errors or wrong encodings named with their line,
data files that are empty, broken or not UTF-8 named with the file and line, non-positive numbers named by field,
`num_frames` on a source without videos, and examples/train.py reading its data before the model loads."""

import json
import logging
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from transformers_bagel.training import (
    MAX_EPOCH_FACTOR,
    BagelMixtureDataset,
    check_mixture_weights,
    load_data_rows,
    load_mixture_config,
    mixture_order,
    original_data_config_to_mixture,
    read_data_config,
    row_to_sample,
)


ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=60, deadline=None)


def _write_jsonl(path, count, answer="a"):
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"{answer}{i}"}) + "\n" for i in range(count)))
    return path


def _config(weight_b=1.0, **b):
    return {
        "sources": [
            {"name": "a", "task": "understanding", "data": "a.jsonl", "weight": 1.0},
            {"name": "b", "task": "understanding", "data": "b.jsonl", "weight": weight_b, **b},
        ]
    }


@pytest.fixture()
def folder(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", 4)
    _write_jsonl(tmp_path / "b.jsonl", 4, "b")
    return tmp_path


# -- weights ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [1e-5, 1e-300, 5e-324])
def test_tiny_weights_are_refused_naming_the_source_before_any_order_is_drawn(folder, weight, monkeypatch):
    def no_interleave(*args, **kwargs):
        raise AssertionError("the mixture order was drawn")

    monkeypatch.setattr(datasets, "interleave_datasets", no_interleave)
    with pytest.raises(ValueError, match=rf"Source 'b' has weight {weight:g} for 4 rows.*'all_exhausted'.*at least") as error:
        BagelMixtureDataset(_config(weight), base_dir=folder)
    assert f"{MAX_EPOCH_FACTOR} x the 8 rows" in str(error.value)


def test_the_smallest_weight_the_message_names_is_accepted(folder):
    with pytest.raises(ValueError, match=r"at least (\S+),") as error:
        BagelMixtureDataset(_config(1e-5), base_dir=folder)
    smallest = float(str(error.value).split("at least ")[1].split(",")[0])
    mixture = BagelMixtureDataset(_config(smallest * 1.01), base_dir=folder)
    assert set(mixture.order) >= {(s, r) for s in (0, 1) for r in range(4)}  # every row once (all_exhausted)


def test_tiny_weights_are_fine_with_the_strategies_that_end(folder):
    for strategy in ("first_exhausted", "all_exhausted_without_replacement"):
        mixture = BagelMixtureDataset({**_config(1e-5), "stopping_strategy": strategy}, base_dir=folder)
        assert len(mixture) <= 8


def test_weight_zero_leaves_the_source_out_with_one_warning(folder, caplog):
    config = _config(0, data="not-there-yet.jsonl")  # a source switched off need not have its data yet
    with caplog.at_level(logging.WARNING):
        mixture = BagelMixtureDataset(config, base_dir=folder)
    assert [source["name"] for source in mixture.sources] == ["a"] and len(mixture) == 4
    assert "source(s) ['b'] have weight 0 and are left out" in caplog.text
    assert caplog.text.count("left out") == 1
    both_off = {"sources": [dict(s, weight=0) for s in _config()["sources"]]}
    with pytest.raises(ValueError, match=r"Every source of the data config has weight 0 \(\['a', 'b'\]\)"):
        load_mixture_config(both_off, base_dir=folder)
    # the keys of a source switched off are still checked
    with pytest.raises(ValueError, match=r"Source 'b': unknown key\(s\) \['wieght'\]"):
        load_mixture_config(_config(0, wieght=1), base_dir=folder)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, float("nan")], r"Source 'b': `weight` must be a finite number > 0, got nan"),
        ([1.0, float("inf")], r"Source 'b': `weight` must be a finite number > 0, got inf"),
        ([1.0, -2.0], r"Source 'b': `weight` must be a finite number > 0, got -2.0"),
        ([1.0, 0.0], r"Source 'b': `weight` must be a finite number > 0, got 0.0"),
        ([1e308, 1e308], r"sum to inf: weights are relative"),
        ([1.0], r"one weight per source"),
    ],
)
def test_mixture_order_refuses_weights_that_make_no_mixture(weights, message):
    with pytest.raises(ValueError, match=message):
        mixture_order([4, 4], weights, seed=0, names=["a", "b"])


def test_mixture_order_refuses_empty_sources_and_bad_seeds():
    with pytest.raises(ValueError, match=r"Source 'b' holds no rows"):
        mixture_order([4, 0], [1.0, 1.0], seed=0, names=["a", "b"])
    with pytest.raises(ValueError, match=r"`seed` must be an integer >= 0, got -1"):
        mixture_order([4, 4], [1.0, 1.0], seed=-1)


@SETTINGS
@given(
    lengths=st.lists(st.integers(1, 40), min_size=2, max_size=4),
    exponents=st.lists(st.one_of(st.floats(-3, 3), st.floats(-290, 6)), min_size=4, max_size=4),
    scale=st.integers(-30, 30),
)
def test_weights_rule_is_relative_and_bounds_the_epoch(lengths, exponents, scale):
    """Accepted or refused by the documented bound only; scaling every weight by a power of two changes neither the
    decision nor the order (weights are relative); an accepted mixture ends, and uses every row."""
    weights = [10.0**e for e in exponents[: len(lengths)]]  # normal floats: scaling by 2**scale is exact
    names = [f"s{i}" for i in range(len(lengths))]
    total = sum(weights)
    expected_epoch = max(n * (total / w) for n, w in zip(lengths, weights))
    accepted = expected_epoch <= MAX_EPOCH_FACTOR * sum(lengths)
    event("accepted" if accepted else "refused")
    scaled = [w * 2.0**scale for w in weights]
    outcomes = []
    for ws in (weights, scaled):
        try:
            check_mixture_weights(lengths, ws, "all_exhausted", names)
            outcomes.append(True)
        except ValueError as error:
            rare = max(range(len(lengths)), key=lambda i: lengths[i] * (sum(ws) / ws[i]))
            assert str(error).startswith(f"Source {names[rare]!r} has weight")
            outcomes.append(False)
    assert outcomes == [accepted, accepted]
    if accepted:
        order = mixture_order(lengths, weights, seed=0, names=names)
        assert order == mixture_order(lengths, scaled, seed=0, names=names)
        assert set(order) == {(s, r) for s, n in enumerate(lengths) for r in range(n)}


# -- config files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("mix.yaml", "sources:\n  - {name: a, task: understanding,\n  - x\n",
         r"mix.yaml', line 3, column 3: not valid YAML: while parsing a flow node"),
        ("mix.yaml", "sources:\n\t- {name: a}\n", r"mix.yaml', line 2, column 1: not valid YAML"),
        ("mix.json", '{"sources": [\n  {"name": "a",}\n]}', r"mix.json', line 2, column 16: not valid JSON"),
        ("mix.yaml", "", r"mix.yaml' is empty"),
    ],
)  # fmt: skip
def test_config_syntax_errors_name_the_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_data_config(tmp_path / name)
    with pytest.raises(ValueError, match=message):
        BagelMixtureDataset(tmp_path / name)


def test_config_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "mix.yaml").write_bytes("sources: []\n# d\u00e9j\u00e0 vu\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"mix.yaml' is not UTF-8 text \(byte 0xe9 on line 2, perhaps Latin-1\)"):
        load_mixture_config(tmp_path / "mix.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(TypeError, match=r"list.yaml' must hold a mapping"):
        load_mixture_config(tmp_path / "list.yaml")


# -- data files ------------------------------------------------------------------------------------------------------


def _files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": "a"}\n\n{"question": "q" "answer": "a"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "latin.jsonl").write_bytes(
        '{"question": "q", "answer": "a"}\n{"question": "caf\u00e9?", "answer": "a"}\n'.encode("latin-1")
    )
    (tmp_path / "list.jsonl").write_text('{"question": "q", "answer": "a"}\n[1, 2]\n')
    (tmp_path / "header.csv").write_text("question,answer\n")
    (tmp_path / "fields.csv").write_text("question,answer\nq,a\nq,a,extra\n")
    (tmp_path / "latin.csv").write_bytes("question,answer\ncaf\u00e9,a\n".encode("latin-1"))
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("broken.jsonl", r"Source 'b': the file '.*broken.jsonl', line 3: not valid JSON"),
        ("empty.jsonl", r"Source 'b': the file '.*empty.jsonl' is empty \(no rows\)"),
        ("latin.jsonl", r"Source 'b': the file '.*latin.jsonl' is not UTF-8 text \(byte 0xe9 on line 2"),
        ("list.jsonl", r"Source 'b': the file '.*list.jsonl', line 2: a JSON line must be an object"),
        ("header.csv", r"Source 'b': the file '.*header.csv' holds no rows"),
        ("fields.csv", r"Source 'b': the file '.*fields.csv', line 3: 3 fields where the header has 2"),
        ("latin.csv", r"Source 'b': the file '.*latin.csv' is not UTF-8 text \(byte 0xe9 on line 2"),
        ("bad.parquet", r"Source 'b': the file '.*bad.parquet' is not a readable parquet file"),
    ],
)
def test_broken_data_files_are_named_with_the_source_file_and_line(folder, data, message):
    _files(folder)
    with pytest.raises(ValueError, match=message):
        BagelMixtureDataset(_config(data=data), base_dir=folder)


def test_imagefolder_metadata_that_is_not_utf8_is_named(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    PIL.Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "0.png")
    (images / "metadata.jsonl").write_bytes('{"file_name": "0.png", "text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"--data x: the file '.*metadata.jsonl' is not UTF-8 text .*Latin-1"):
        load_data_rows("imagefolder", [str(images)], where="--data x")
    (images / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "ok"}\n{"file_name": \n')
    with pytest.raises(ValueError, match=r"the file '.*metadata.jsonl', line 2: not valid JSON"):
        load_data_rows("imagefolder", [str(images)], where="--data x")


# -- numbers and frames ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["num_rows", "num_frames", "max_image_size", "min_image_size", "vit_max_image_size", "max_pixels"]
)
@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_non_positive_numbers_are_refused_naming_the_field(folder, key, value):
    with pytest.raises(ValueError, match=rf"Source 'b': `{key}` must be a positive integer, got {value!r}"):
        load_mixture_config(_config(**{key: value}), base_dir=folder)


def test_original_config_numbers_are_refused_naming_the_group_and_field():
    base = {"dataset_names": ["d"], "jsonl_path_list": ["d.jsonl"], "weight": 1.0}
    for extra, message in (
        ({"image_transform_args": {"max_image_size": -512}}, r"`image_transform_args.max_image_size` must be a positive"),
        ({"image_transform_args": {"max_pixels": "lots"}}, r"`image_transform_args.max_pixels` must be a positive"),
        ({"num_used_data": [0]}, r"`num_used_data\[0\]` must be a positive integer, got 0"),
        ({"frame_sampler_args": {"max_num_frames": 0}}, r"`frame_sampler_args.max_num_frames` must be a positive"),
        ({"shuffle_lines": True, "shuffle_seed": -1}, r"`shuffle_seed` must be an integer >= 0"),
    ):
        with pytest.raises(ValueError, match=r"Group 'vlm_sft': " + message):
            original_data_config_to_mixture({"vlm_sft": {**base, **extra}})


def test_num_frames_needs_a_source_with_videos(folder, caplog):
    config = {"sources": [{"name": "t2i", "task": "text_to_image", "data": "a.jsonl", "weight": 1, "num_frames": 8}]}
    with pytest.raises(ValueError, match=r"Source 't2i': `num_frames` samples .* a 'text_to_image' source has no video"):
        load_mixture_config(config, base_dir=folder)
    with pytest.raises(ValueError, match=r"`num_frames` .* 'edit' rows have no video \(row 3\)"):
        row_to_sample({"source": "x", "instruction": "y", "target": "z"}, "edit", 3, num_frames=4)
    # the original's frame_sampler_args on a group without videos is dropped with a warning, not turned into an error
    with caplog.at_level(logging.WARNING):
        converted = original_data_config_to_mixture({"t2i_pretrain": {
            "dataset_names": ["d"], "data_dir_list": ["d"], "weight": 1.0, "frame_sampler_args": {"max_num_frames": 8}}})  # fmt: skip
    assert "num_frames" not in converted["sources"][0] and "reads no video" in caplog.text


# -- examples/train.py -----------------------------------------------------------------------------------------------


def _train_module():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return train


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_config(1e-5), r"Source 'b' has weight 1e-05"),
        (_config(data="broken.jsonl"), r"Source 'b': the file '.*broken.jsonl', line 3"),
        (_config(num_frames=0), r"Source 'b': `num_frames` must be a positive integer"),
    ],
)
def test_train_example_refuses_bad_data_before_the_model_loads(converted_dir, folder, monkeypatch, config, message):
    from transformers_bagel import BagelForConditionalGeneration

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(BagelForConditionalGeneration, "from_pretrained", no_model)
    _files(folder)
    (folder / "mix.yaml").write_text(yaml.safe_dump(config))
    train = _train_module()
    with pytest.raises(ValueError, match=message):
        train.main(["--checkpoint", str(converted_dir), "--dataset_config", str(folder / "mix.yaml"), "--use_cpu",
                    "--output_dir", str(folder / "run")])  # fmt: skip
    with pytest.raises(ValueError, match=r"--data .*latin.jsonl: the file .* is not UTF-8"):
        train.main(["--checkpoint", str(converted_dir), "--data", str(folder / "latin.jsonl"), "--task", "understanding",
                    "--use_cpu", "--output_dir", str(folder / "run")])  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max_tokens", "0"], "--max_tokens must be a positive number, got 0"),
        (["--lora_rank", "-4"], "--lora_rank must be a positive number, got -4"),
        (["--learning_rate", "nan"], "--learning_rate must be a positive number, got nan"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive number"),
        (["--timestep_shift", "0"], "--timestep_shift must be a positive number"),
        (["--text_dropout", "1.5"], "--text_dropout is a probability"),
        (["--ema", "1"], "--ema is a decay"),
        (["--image_dir", "no/such/folder"], "--image_dir no/such/folder: no such folder"),
        (["--cache_latents", "--task", "understanding"], "--cache_latents applies to text_to_image and edit"),
    ],
)
def test_train_example_refuses_non_positive_numbers_naming_the_flag(flags, message, capsys):
    train = _train_module()
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_train_example_weight_zero_source_is_left_out(converted_dir, folder, caplog):
    """A weight-0 source in examples/train.py's data config: left out with one warning, and the run reads the rest."""
    train = _train_module()
    (folder / "mix.yaml").write_text(yaml.safe_dump(_config(0, data="missing.jsonl")))
    args = train.parse_args(["--dataset_config", str(folder / "mix.yaml"), "--use_cpu"])
    with caplog.at_level(logging.WARNING):
        mixture = train.load_mixture(args, image_processor=None)
    assert mixture.source_counts() == {"a": 4} and "['b'] have weight 0" in caplog.text
