"""
The image-editing benchmarks whose inputs are JSON files next to image folders: ImgEdit (singleturn), KRIS-Bench and
RISEBench. Each writes the layout its scorer (the versions shipped in ByteDance-Seed/Bagel `eval/gen/`) reads:

    imgedit   OUT/<key>.png                  --data Benchmark/singleturn/singleturn.json (a JSON object
                                             key -> {"id": image path under --image_root, "prompt", "edit_type"});
                                             --image_root defaults to the JSON file's folder
    kris      OUT/<type>/<id>.png            --data final_data.json (a JSON list of {"id", "type", "ori_img" (a file
                                             name or a list of them, under IMAGE_ROOT/<type>/), "ins_en"});
                                             --image_root is the KRIS_Bench folder (default: KRIS_Bench next to the
                                             JSON file). The scorers read `--results_dir R` with OUT = R/bagel
    rise      OUT/<category>/<index>.png     --data datav2_total_w_subtask.json (a JSON list of {"index",
                                             "category", "image" (a path under --image_root), "instruction"});
                                             --image_root defaults to the JSON file's folder

With --think, the plan of each image is written beside it as `.txt`, as the original scripts do. Ids, keys, types
and categories that name output files or folders must be plain names, and input image paths must stay under
--image_root (see `paths`).
"""

from __future__ import annotations

from pathlib import Path

from diffusers.utils import logging

from ._inputs import (
    check_name,
    check_single_sample,
    confined_path,
    entry_where,
    image_loader,
    image_size,
    read_json_entries,
    require_field,
)
from .runner import Benchmark, EvalItem, original_settings


logger = logging.get_logger(__name__)

__all__ = ["load_imgedit", "load_kris", "load_rise", "IMGEDIT", "KRIS", "RISE"]


def _root(data, image_root, default_name: str | None = None) -> Path:
    if image_root is not None:
        root = Path(image_root)
    else:
        root = Path(data).parent
        if default_name is not None and (root / default_name).is_dir():
            root = root / default_name
    if not root.is_dir():
        raise ValueError(f"--image_root {str(root)!r} is not a folder.")
    return root


def _edit_item(index: int, prompt: str, output: str, paths: list[Path], where: str) -> EvalItem:
    sizes = tuple(image_size(path, where) for path in paths)
    return EvalItem(
        index=index, prompt=prompt, outputs=[output], load_images=image_loader(paths), size_key=sizes[-1:], source=where
    )


def load_imgedit(data, image_root=None, n_samples: int = 1) -> list[EvalItem]:
    """The entries of ImgEdit-Bench's `singleturn.json` (in the file's key order; each key names an output file)."""
    check_single_sample("imgedit", n_samples)
    entries, lines = read_json_entries(data, "ImgEdit's Benchmark/singleturn/singleturn.json")
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"--data {str(data)!r}: expected a non-empty JSON object key -> ImgEdit entry.")
    root = _root(data, image_root)
    items = []
    for index, (key, entry) in enumerate(entries.items()):
        where = entry_where(data, lines, index, key)
        name = check_name(key, "key", where)
        path = confined_path(root, require_field(entry, "id", where), "id", where)
        items.append(_edit_item(index, require_field(entry, "prompt", where), f"{name}.png", [path], where))
    return items


def load_kris(data, image_root=None, n_samples: int = 1) -> list[EvalItem]:
    """The entries of KRIS-Bench's `final_data.json` (one or several input images per entry)."""
    check_single_sample("kris", n_samples)
    entries, lines = read_json_entries(data, "KRIS-Bench's final_data.json")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--data {str(data)!r}: expected a non-empty JSON list of KRIS-Bench entries.")
    root = _root(data, image_root, "KRIS_Bench")
    items = []
    for index, entry in enumerate(entries):
        where = entry_where(data, lines, index)
        category = check_name(require_field(entry, "type", where), "type", where)
        entry_id = check_name(require_field(entry, "id", where, (str, int)), "id", where)
        names = require_field(entry, "ori_img", where, (str, list))
        names = [names] if isinstance(names, str) else names
        if not names or not all(isinstance(name, str) and name for name in names):
            raise ValueError(f"{where}: 'ori_img' must be a file name or a non-empty list of file names.")
        paths = [confined_path(root / category, name, "ori_img", where) for name in names]
        prompt = require_field(entry, "ins_en", where)
        items.append(_edit_item(index, prompt, f"{category}/{entry_id}.png", paths, where))
    return items


def load_rise(data, image_root=None, n_samples: int = 1) -> list[EvalItem]:
    """The entries of RISEBench's `datav2_total_w_subtask.json`."""
    check_single_sample("rise", n_samples)
    entries, lines = read_json_entries(data, "RISEBench's datav2_total_w_subtask.json")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--data {str(data)!r}: expected a non-empty JSON list of RISEBench entries.")
    root = _root(data, image_root)
    items = []
    for index, entry in enumerate(entries):
        where = entry_where(data, lines, index)
        category = check_name(require_field(entry, "category", where), "category", where)
        entry_index = check_name(require_field(entry, "index", where, (str, int)), "index", where)
        path = confined_path(root, require_field(entry, "image", where), "image", where)
        prompt = require_field(entry, "instruction", where)
        items.append(_edit_item(index, prompt, f"{category}/{entry_index}.png", [path], where))
    return items


def _edit_settings(cfg_img_scale: float, cfg_interval=(0.0, 1.0)) -> dict:
    """The original editing scripts' settings: "text_channel" renormalisation."""
    return original_settings("text_channel", cfg_img_scale, cfg_interval)


IMGEDIT = Benchmark(
    name="imgedit",
    load=load_imgedit,
    task="edit",
    pipeline_kwargs=_edit_settings(1.5),
    think=False,
    n_samples=1,
    resolution=None,
    data_help="ImgEdit-Bench's Benchmark/singleturn/singleturn.json",
    source="ByteDance-Seed/Bagel eval/gen/gen_images_mp_imgedit.py, eval/gen/imgedit/basic_bench.py, EVAL.md",
)
KRIS = Benchmark(
    name="kris",
    load=load_kris,
    task="edit",
    pipeline_kwargs=_edit_settings(1.5),
    think=True,
    n_samples=1,
    resolution=None,
    data_help="KRIS-Bench's final_data.json (ByteDance-Seed/Bagel eval/gen/kris/final_data.json)",
    source="ByteDance-Seed/Bagel eval/gen/gen_images_mp_kris.py, eval/gen/kris/metrics_common.py, EVAL.md",
)
RISE = Benchmark(
    name="rise",
    load=load_rise,
    task="edit",
    pipeline_kwargs=_edit_settings(2.0),
    think=True,
    n_samples=1,
    resolution=None,
    data_help="RISEBench's data/datav2_total_w_subtask.json",
    source="ByteDance-Seed/Bagel eval/gen/gen_images_mp_rise.py, eval/gen/rise/gpt_eval.py, EVAL.md",
)
