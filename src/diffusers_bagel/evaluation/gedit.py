"""
GEdit-Bench (`stepfun-ai/GEdit-Bench`, a Hugging Face dataset with the columns `key`, `task_type`,
`instruction_language`, `instruction`, `input_image`). `--data` is a local copy: the dataset's downloaded folder (its
parquet files), a parquet file, or a folder written by `datasets.save_to_disk`; nothing is downloaded. Output, as the
original BAGEL script writes it and `eval/gen/gedit/test_gedit_score.py` reads it (`--save_path S` with OUT =
S/gen_image):

    OUT/fullset/<task_type>/<instruction_language>/<key>.png          the edited image
    OUT/fullset/<task_type>/<instruction_language>/<key>_SRCIMG.png   the input image, as the scorer compares to it

`task_type`, `instruction_language` and `key` name folders and files: each must be a plain name (see `paths`).
"""

from __future__ import annotations

from pathlib import Path

from diffusers.utils import logging

from ._inputs import check_name, check_single_sample, require_field
from .editing import _edit_settings
from .runner import Benchmark, EvalItem


logger = logging.get_logger(__name__)

__all__ = ["load_gedit_dataset", "load_gedit", "GEDIT"]

_COLUMNS = ("key", "task_type", "instruction_language", "instruction", "input_image")


def load_gedit_dataset(data):
    """The local GEdit-Bench dataset at `data` (its `train` split), with its columns checked."""
    import datasets

    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data {str(path)!r}: no such file or folder (a local copy of stepfun-ai/GEdit-Bench).")
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            dataset = datasets.load_from_disk(str(path))
        elif path.is_file():
            dataset = datasets.load_dataset("parquet", data_files=str(path))
        else:
            dataset = datasets.load_dataset(str(path))
    except Exception as error:  # datasets raises many kinds; name the file
        raise ValueError(f"--data {str(path)!r} could not be read as a GEdit-Bench dataset ({error}).") from error
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"--data {str(path)!r} has no 'train' split (splits: {sorted(dataset)}).")
        dataset = dataset["train"]
    missing = [column for column in _COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(f"--data {str(path)!r} lacks the GEdit-Bench columns {missing}.")
    return dataset


def load_gedit(data, image_root=None, n_samples: int = 1) -> list[EvalItem]:
    """The entries of a local GEdit-Bench copy, in dataset order."""
    check_single_sample("gedit", n_samples)
    dataset = load_gedit_dataset(data)
    text_columns = dataset.select_columns(["key", "task_type", "instruction_language", "instruction"])
    items = []
    for index, row in enumerate(text_columns):
        where = f"{data}: row {index}"
        task_type = check_name(require_field(row, "task_type", where), "task_type", where)
        language = check_name(require_field(row, "instruction_language", where), "instruction_language", where)
        folder = f"fullset/{task_type}/{language}"
        key = check_name(require_field(row, "key", where, (str, int)), "key", where)

        def load_images(index=index):
            from transformers_bagel.image_processing_bagel import to_rgb_image

            return [to_rgb_image(dataset[index]["input_image"])]

        def source(_out, index=index):
            return dataset[index]["input_image"]

        size = dataset[index]["input_image"].size
        items.append(
            EvalItem(
                index=index,
                prompt=require_field(row, "instruction", where),
                outputs=[f"{folder}/{key}.png"],
                load_images=load_images,
                size_key=(size,),
                extra_files={f"{folder}/{key}_SRCIMG.png": source},
                source=where,
            )
        )
    if not items:
        raise ValueError(f"--data {str(data)!r} holds no rows.")
    return items


GEDIT = Benchmark(
    name="gedit",
    load=load_gedit,
    task="edit",
    # eval/gen/gedit/gen_images_gedit.py: text CFG 4, image CFG 1.5, guidance on t in (0.4, 1], text_channel renorm.
    pipeline_kwargs=_edit_settings(1.5, (0.4, 1.0)),
    think=False,
    n_samples=1,
    resolution=None,
    data_help="a local copy of the stepfun-ai/GEdit-Bench dataset (folder of parquet files, parquet file, or save_to_disk folder)",
    source="ByteDance-Seed/Bagel eval/gen/gedit/gen_images_gedit.py and test_gedit_score.py",
)
