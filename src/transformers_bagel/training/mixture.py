"""
Multi-task training from one data config: several sources (text-to-image, editing, understanding, interleaved data
sets), each with a sampling weight, mixed reproducibly into one stream of samples that the existing packing
([`BagelPackedDataset`] / [`BagelDataCollator`]) groups into batches, so samples of every task share the batches.

```yaml
seed: 0                                  # optional: seed of the mixing order (defaults to the one given in code)
stopping_strategy: all_exhausted         # optional: datasets.interleave_datasets' strategy
sources:
  - {name: t2i, task: text_to_image, data: t2i.parquet, weight: 1.0}
  - {name: vqa, task: understanding, data: vqa.jsonl, image_dir: images/, weight: 1.0, columns: {question: q}}
  - {name: edit, task: edit, data: edit.parquet, weight: 0.5, max_image_size: 512, num_rows: 10000}
```

```python
from transformers_bagel.training import BagelDataCollator, BagelMixtureDataset, BagelPackedDataset

mixture = BagelMixtureDataset("mix.yaml", image_processor=processor.image_processor, seed=0)
collator = BagelDataCollator(processor, model.config, max_tokens=16384, seed=0)
train_dataset = BagelPackedDataset(mixture, collator)
```

Keys of a source (anything else is refused, naming the source and the key):

| key | meaning |
|---|---|
| `name` | unique name, used in errors and in each sample's `row` / `source` |
| `task` | `text_to_image`, `edit`, `understanding` or `interleaved` (see [`row_to_sample`]) |
| `data` | a `.parquet` / `.jsonl` / `.json` / `.csv` file, a list of them, or a folder (its data files of one kind, else the `imagefolder` builder); relative paths are resolved against the config file's folder |
| `builder`, `split` | force a `datasets` builder (`parquet`, `json`, `csv`, `imagefolder`); the split (`train`) |
| `image_dir` | base folder of relative image paths in the rows |
| `weight` | sampling weight (>= 0; relative), normalised over the sources into `interleave_datasets` probabilities; 0 leaves the source out (see "Weights") |
| `num_rows` | use the first N rows (after `shuffle`, if set) |
| `num_files` | of a folder, use the first N data files (sorted), as the original's `num_used_data` of parquet groups |
| `shuffle`, `shuffle_seed` | shuffle the source's rows first (seed defaults to the mixture's) |
| `columns` | column renames, `{role: column}` (see [`row_to_sample`]) |
| `max_image_size`, `min_image_size` | VAE image sizes of this source (the original's `image_transform_args`) |
| `vit_max_image_size`, `vit_min_image_size` | ViT image sizes (`vit_image_transform_args`) |
| `max_pixels` | pixel budget of this source's images |
| `num_frames` | frames taken from each row's `video` (understanding sources only; see [`row_to_sample`]) |

Per-source image sizes resize the images of the source's samples with BAGEL's rule (both sides multiples of the
stride) before the collator's image processor sees them; they can only narrow the processor's own range, and a size
outside it is refused.

Mixing: each source is read once with `datasets`; the order of the mixture is drawn by
`datasets.interleave_datasets(probabilities=weights / sum, seed=seed, stopping_strategy=...)` over small
`(source, row)` index datasets, so the sources need no common schema and no image is decoded to mix. Each draw picks a
source with its probability, independently, so over N samples the share of a source is binomial around its weight
share. `all_exhausted` (default) keeps drawing until every row of every source was used at least once (sources with a
small weight are not truncated; frequent ones repeat), `first_exhausted` stops at the first source that runs out,
`all_exhausted_without_replacement` uses every row once.

Weights: only their ratios matter (each source's share of the draws is `weight / sum(weights)`). A weight must be
a finite number >= 0 and their sum finite. A source of weight 0 is left out of the mixture with one warning naming it
(as the original's converter below leaves out groups of weight 0, and as `interleave_datasets` never draws a dataset
of probability 0); its `data` is not read and need not exist; a config whose sources all have weight 0 is refused.
With `all_exhausted`, an epoch lasts until every row of the rarest source (largest `rows / share`) was drawn once:
about `max(rows / share)` samples. A tiny weight makes that unbounded (1e-5 on a few rows: hundreds of thousands of
samples; 1e-300: no end), so a mixture whose expected epoch is longer than `MAX_EPOCH_FACTOR` (100) times the rows
of all sources together is refused before any order is drawn, naming the source, its weight and the smallest weight
that fits ([`check_mixture_weights`]). `first_exhausted` and `all_exhausted_without_replacement` have no such bound
(their epochs are at most the rows of all sources).

Errors in the files themselves name the file and the line: YAML / JSON syntax errors in the config, bytes that are
not UTF-8 (a Latin-1 file), a broken JSON line or CSV row, a parquet file that does not open, a source without rows
(see [`~data_files.load_data_rows`]).

Resumption: the mixture is a map-style dataset whose order depends only on the config and the seed, and
[`BagelPackedDataset`] packs it greedily in that order, so the packs are the same in every run. The Trainer then
samples packs with its seeded sampler and, on `train(resume_from_checkpoint=...)`, restores its RNG states and skips
the batches already seen in the epoch (`accelerate.skip_first_batches`); the collator's seeded condition dropout is
keyed by `(seed, epoch, row)`, where `row` names the mixture item (`"<source>:<row> @<position>"`), so a resumed run
gets the same next batches, dropout and noise as an uninterrupted one. The order is the same every epoch (the
Trainer reshuffles the packs per epoch).

[`original_data_config_to_mixture`] reads the original repository's YAML data config (groups `t2i_pretrain`,
`unified_edit`, `vlm_sft` with `dataset_names`, `data_dir_list` / `jsonl_path_list` or a `dataset_info` table,
`num_used_data`, `weight`, `image_transform_args`, ...) into this format, warning about what it cannot map.
"""

import copy
import math
from pathlib import Path

import datasets
import PIL.Image
import torch
from transformers.utils import logging

from ..image_processing_bagel import bagel_resize_size
from .data_files import load_data_rows, read_config_file
from .samples import DEFAULT_COLUMNS, TASKS, row_to_sample


logger = logging.get_logger(__name__)

MIXTURE_KEYS = ("sources", "seed", "stopping_strategy")
SOURCE_KEYS = (
    "name",
    "task",
    "data",
    "builder",
    "split",
    "image_dir",
    "weight",
    "num_rows",
    "num_files",
    "shuffle",
    "shuffle_seed",
    "columns",
    "max_image_size",
    "min_image_size",
    "vit_max_image_size",
    "vit_min_image_size",
    "max_pixels",
    "num_frames",
)
STOPPING_STRATEGIES = ("all_exhausted", "first_exhausted", "all_exhausted_without_replacement")
# With `all_exhausted`, the longest an epoch may be, in times the rows of all sources together (see "Weights").
MAX_EPOCH_FACTOR = 100
BUILDERS = ("parquet", "json", "csv", "imagefolder")
_SUFFIX_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_SIZE_KEYS = ("max_image_size", "min_image_size", "vit_max_image_size", "vit_min_image_size", "max_pixels")
_POSITIVE_INT_KEYS = ("num_rows", "num_files", "num_frames", *_SIZE_KEYS)


# -- the config ------------------------------------------------------------------------------------------------------


def _read_config_file(path: Path) -> dict:
    return read_config_file(path, "Data config")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_seed(value) -> bool:
    """A seed numpy and `datasets` take: an integer >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _data_files(name: str, data, base_dir: Path, builder: str | None, num_files: int | None) -> tuple[str, list[str]]:
    """The `datasets` builder and data files of one source's `data`; errors name the source."""
    entries = data if isinstance(data, (list, tuple)) else [data]
    if not entries or not all(isinstance(entry, (str, Path)) for entry in entries):
        raise ValueError(f"Source {name!r}: `data` must be a path or a list of paths, got {data!r}.")
    paths = [Path(entry) if Path(entry).is_absolute() else base_dir / entry for entry in entries]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise FileNotFoundError(f"Source {name!r}: `data` names missing file(s) {missing}.")
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        kinds = {}
        for file in sorted(folder.iterdir()):
            if file.suffix in _SUFFIX_BUILDERS and file.name != "metadata.jsonl":
                kinds.setdefault(_SUFFIX_BUILDERS[file.suffix], []).append(str(file))
        if builder == "imagefolder" or (builder is None and not kinds):
            if num_files is not None:
                raise ValueError(f"Source {name!r}: `num_files` applies to a folder of data files, not an image folder.")
            return "imagefolder", [str(folder)]
        if builder is None:
            if len(kinds) > 1:
                raise ValueError(
                    f"Source {name!r}: the folder {str(folder)!r} holds data files of several kinds "
                    f"({sorted(kinds)}); set `builder`."
                )
            builder = next(iter(kinds))
        files = kinds.get(builder, [])
        if not files:
            raise FileNotFoundError(f"Source {name!r}: the folder {str(folder)!r} holds no {builder} files.")
        if num_files is not None:
            if num_files > len(files):
                raise ValueError(f"Source {name!r}: `num_files` is {num_files} but {str(folder)!r} holds {len(files)}.")
            files = files[:num_files]
        return builder, files
    if any(path.is_dir() for path in paths):
        raise ValueError(f"Source {name!r}: `data` may name one folder or a list of files, not a list with folders.")
    if num_files is not None:
        raise ValueError(f"Source {name!r}: `num_files` applies to a folder (`data: some/folder`).")
    if builder is None:
        suffixes = {path.suffix for path in paths}
        unknown = sorted(suffixes - set(_SUFFIX_BUILDERS))
        if unknown:
            raise ValueError(
                f"Source {name!r}: `data` has file type(s) {unknown}; expected {sorted(_SUFFIX_BUILDERS)} or set "
                "`builder`."
            )
        kinds = {_SUFFIX_BUILDERS[suffix] for suffix in suffixes}
        if len(kinds) > 1:
            raise ValueError(f"Source {name!r}: `data` mixes file kinds {sorted(kinds)}; use one source per kind.")
        builder = kinds.pop()
    return builder, [str(path) for path in paths]


def _source_weight(name: str, weight) -> float:
    """A source's weight: a finite number >= 0 (0 leaves the source out; see "Weights")."""
    if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
        raise ValueError(
            f"Source {name!r}: `weight` must be a finite number >= 0 (0 leaves the source out), got {weight!r}."
        )
    return float(weight)


def _validate_source(source, index: int, base_dir: Path, names: set) -> dict | None:
    """One source of a data config, checked and resolved; `None` for a source of weight 0 (left out: its name, keys
    and task are checked, its data is not)."""
    if not isinstance(source, dict):
        raise TypeError(f"Source {index} of the data config must be a mapping, got {type(source).__name__}.")
    name = source.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"Source {index} of the data config needs a `name` string.")
    if name in names:
        raise ValueError(f"Source {name!r} appears twice in the data config: source names must be unique.")
    unknown = sorted(set(source) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"Source {name!r}: unknown key(s) {unknown}; the keys are {list(SOURCE_KEYS)}.")
    names.add(name)
    for key in ("task", "weight"):
        if source.get(key) is None:
            raise ValueError(f"Source {name!r}: missing key `{key}`.")
    task = source["task"]
    if task not in TASKS:
        raise ValueError(f"Source {name!r}: unknown `task` {task!r}; expected one of {TASKS}.")
    weight = _source_weight(name, source["weight"])
    if weight == 0:
        return None  # left out (load_mixture_config warns once); its data need not exist
    if source.get("data") is None:
        raise ValueError(f"Source {name!r}: missing key `data`.")
    for key in _POSITIVE_INT_KEYS:
        value = source.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"Source {name!r}: `{key}` must be a positive integer, got {value!r}.")
    if source.get("num_frames") is not None and task != "understanding":
        raise ValueError(
            f"Source {name!r}: `num_frames` samples the frames of a `video` column, which only understanding sources "
            f"read; a {task!r} source has no video: remove `num_frames`."
        )
    for low, high in (("min_image_size", "max_image_size"), ("vit_min_image_size", "vit_max_image_size")):
        if source.get(low) is not None and source.get(high) is not None and source[low] > source[high]:
            raise ValueError(f"Source {name!r}: `{low}` ({source[low]}) is larger than `{high}` ({source[high]}).")
    builder = source.get("builder")
    if builder is not None and builder not in BUILDERS:
        raise ValueError(f"Source {name!r}: unknown `builder` {builder!r}; expected one of {BUILDERS}.")
    split = source.get("split", "train")
    if not isinstance(split, str):
        raise ValueError(f"Source {name!r}: `split` must be a string, got {split!r}.")
    for key in ("shuffle",):
        if source.get(key) is not None and not isinstance(source[key], bool):
            raise ValueError(f"Source {name!r}: `{key}` must be true or false, got {source[key]!r}.")
    if source.get("shuffle_seed") is not None and not _is_seed(source["shuffle_seed"]):
        raise ValueError(f"Source {name!r}: `shuffle_seed` must be an integer >= 0, got {source['shuffle_seed']!r}.")
    columns = source.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise ValueError(f"Source {name!r}: `columns` must map roles to column names, got {columns!r}.")
    bad_roles = sorted(set(columns) - set(DEFAULT_COLUMNS))
    if bad_roles:
        raise ValueError(f"Source {name!r}: unknown column role(s) {bad_roles} in `columns`; the roles are "
                         f"{sorted(DEFAULT_COLUMNS)}.")  # fmt: skip
    image_dir = source.get("image_dir")
    if image_dir is not None:
        if not isinstance(image_dir, (str, Path)):
            raise ValueError(f"Source {name!r}: `image_dir` must be a path, got {image_dir!r}.")
        image_dir = Path(image_dir) if Path(image_dir).is_absolute() else base_dir / image_dir
        if not image_dir.is_dir():
            raise FileNotFoundError(f"Source {name!r}: `image_dir` {str(image_dir)!r} is not a folder.")
    builder, files = _data_files(name, source["data"], base_dir, builder, source.get("num_files"))
    return {
        **{key: source.get(key) for key in SOURCE_KEYS},
        "weight": weight,
        "split": split,
        "columns": dict(columns) or None,
        "image_dir": None if image_dir is None else str(image_dir),
        "builder": builder,
        "data_files": files,
        "shuffle": bool(source.get("shuffle", False)),
    }


def load_mixture_config(config, base_dir: str | Path | None = None) -> dict:
    """
    Reads and validates a data config.

    Args:
        config (`str`, `Path` or `dict`): a YAML / JSON file, or the config itself.
        base_dir (`str` or `Path`, *optional*): folder that relative paths are resolved against; defaults to the
            config file's folder (a dict: the working directory).

    Returns:
        `dict` with `sources` (each with all keys of `SOURCE_KEYS`, plus the resolved `builder` and `data_files`;
        sources of weight 0 left out, with one warning naming them), `seed` and `stopping_strategy` (None where the
        config leaves them out).

    Raises:
        `ValueError` / `FileNotFoundError` / `TypeError` naming the source and the key at fault, or the file, line and
        column of a config file that does not parse (or is not UTF-8).
    """
    if isinstance(config, (str, Path)):
        path = Path(config)
        base_dir = path.parent if base_dir is None else base_dir
        config = _read_config_file(path)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    if not isinstance(config, dict):
        raise TypeError(f"A data config must be a mapping with a `sources` list, got {type(config).__name__}.")
    unknown = sorted(set(config) - set(MIXTURE_KEYS))
    if unknown:
        hint = (
            " (this looks like the original BAGEL format: convert it with `original_data_config_to_mixture`)"
            if any(isinstance(value, dict) and "dataset_names" in value for value in config.values())
            else ""
        )
        raise ValueError(f"Unknown data config key(s) {unknown}; the keys are {list(MIXTURE_KEYS)}{hint}.")
    sources = config.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ValueError("The data config needs a non-empty `sources` list.")
    seed = config.get("seed")
    if seed is not None and not _is_seed(seed):
        raise ValueError(f"The data config's `seed` must be an integer >= 0, got {seed!r}.")
    strategy = config.get("stopping_strategy")
    if strategy is not None and strategy not in STOPPING_STRATEGIES:
        raise ValueError(f"Unknown `stopping_strategy` {strategy!r}; expected one of {STOPPING_STRATEGIES}.")
    names = set()
    checked = [_validate_source(source, index, base_dir, names) for index, source in enumerate(sources)]
    kept = [source for source in checked if source is not None]
    left_out = [source["name"] for source, result in zip(sources, checked) if result is None]
    if not kept:
        raise ValueError(f"Every source of the data config has weight 0 ({left_out}): there is nothing to train on.")
    if left_out:
        logger.warning(f"Data config: source(s) {left_out} have weight 0 and are left out of the mixture.")
    return {"sources": kept, "seed": seed, "stopping_strategy": strategy}


def load_source_rows(source: dict, seed: int = 0) -> datasets.Dataset:
    """The rows of one validated source ([`load_mixture_config`]) as a `datasets.Dataset`: loaded with its builder,
    shuffled if asked, and cut to `num_rows`. A file that does not read, or no rows, is named with the source
    ([`load_data_rows`])."""
    name = source["name"]
    rows = load_data_rows(source["builder"], source["data_files"], source["split"], where=f"Source {name!r}")
    if source.get("shuffle"):
        shuffle_seed = source.get("shuffle_seed")
        rows = rows.shuffle(seed=seed if shuffle_seed is None else shuffle_seed)
    num_rows = source.get("num_rows")
    if num_rows is not None:
        if num_rows > len(rows):
            raise ValueError(f"Source {name!r}: `num_rows` is {num_rows} but `data` holds {len(rows)} rows.")
        rows = rows.select(range(num_rows))
    return rows


def check_mixture_weights(
    lengths: list[int], weights: list[float], stopping_strategy: str = "all_exhausted", names: list[str] | None = None
) -> None:
    """
    Refuses weights that do not make a sane mixture, naming the source and its weight (see "Weights" in the module
    docstring): each weight a finite number > 0, their sum finite, each source with rows, and with `all_exhausted`
    an expected epoch (`max_i rows_i / share_i` draws) of at most [`MAX_EPOCH_FACTOR`] times the rows of all sources
    together.

    Args:
        lengths (`list[int]`): rows of each source.
        weights (`list[float]`): weight of each source (relative: only their ratios matter).
        stopping_strategy (`str`): see [`mixture_order`].
        names (`list[str]`, *optional*): the sources' names, for the messages (default: `source 0`, `source 1`, ...).

    Raises:
        `ValueError` naming the source, its weight and rows, the epoch it would make and the smallest weight that
        fits.
    """
    names = [f"source {i}" for i in range(len(lengths))] if names is None else list(names)
    if not lengths or len(weights) != len(lengths) or len(names) != len(lengths):
        raise ValueError(f"A mixture needs one weight per source: got {len(lengths)} sources, {len(weights)} weights.")
    for name, length, weight in zip(names, lengths, weights):
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"Source {name!r} holds no rows ({length!r}).")
        if not _is_number(weight) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"Source {name!r}: `weight` must be a finite number > 0, got {weight!r}.")
    total = float(sum(weights))
    if not math.isfinite(total):
        raise ValueError(f"The weights {list(weights)} sum to {total}: weights are relative, scale them down.")
    if stopping_strategy == "all_exhausted":
        _check_epoch_length(lengths, weights, names, total)


def _check_epoch_length(lengths: list[int], weights: list[float], names: list[str], total: float) -> None:
    """`all_exhausted` draws until every row of every source was used once: about `rows / share` draws for each
    source, the longest of which is the epoch. Refused beyond `MAX_EPOCH_FACTOR` times the rows of all sources."""
    epochs = [length * (total / weight) for length, weight in zip(lengths, weights)]  # inf when the share underflows
    rare = max(range(len(epochs)), key=epochs.__getitem__)
    rows = sum(lengths)
    if epochs[rare] <= MAX_EPOCH_FACTOR * rows:
        return
    name, weight, length, epoch = names[rare], weights[rare], lengths[rare], epochs[rare]
    others = total - weight
    smallest = length * others / (MAX_EPOCH_FACTOR * rows - length)
    repeats = max((w / total) * epoch / n for i, (n, w) in enumerate(zip(lengths, weights)) if i != rare)
    if math.isfinite(epoch):
        repeat = f"the other sources' rows would repeat about {_count(repeats)} times each"
        size = f"about {_count(epoch)} samples ({repeat})"
    else:
        size = "without end (its share of the draws rounds to 0)"
    raise ValueError(
        f"Source {name!r} has weight {weight:g} for {length} rows: with stopping_strategy 'all_exhausted' an epoch "
        f"lasts until each of its rows was drawn once, {size}, more than {MAX_EPOCH_FACTOR} x the {rows} rows of "
        "all sources. Weights are "
        f"relative: give {name!r} a weight of at least {smallest:.3g}, cut the other sources with `num_rows`, or use "
        "stopping_strategy 'first_exhausted' or 'all_exhausted_without_replacement'."
    )


def _count(value: float) -> str:
    return f"{value:,.0f}" if value < 1e12 else f"{value:.3g}"


def mixture_order(
    lengths: list[int],
    weights: list[float],
    seed: int,
    stopping_strategy: str = "all_exhausted",
    names: list[str] | None = None,
) -> list[tuple[int, int]]:
    """
    The `(source, row)` pairs of a mixture, in order: `datasets.interleave_datasets` over one small index dataset
    per source, with probabilities `weights / sum(weights)`, the seed and the stopping strategy. Depends only on its
    arguments. The weights are checked first ([`check_mixture_weights`], whose messages use `names`), so that no
    mixture runs without end.
    """
    if stopping_strategy not in STOPPING_STRATEGIES:
        raise ValueError(f"Unknown stopping_strategy {stopping_strategy!r}; expected one of {STOPPING_STRATEGIES}.")
    if not _is_seed(seed):
        raise ValueError(f"The mixture's `seed` must be an integer >= 0, got {seed!r}.")
    check_mixture_weights(lengths, weights, stopping_strategy, names)
    total = float(sum(weights))
    indices = [
        datasets.Dataset.from_dict({"source": [source] * length, "row": list(range(length))})
        for source, length in enumerate(lengths)
    ]
    mixed = datasets.interleave_datasets(
        indices, probabilities=[w / total for w in weights], seed=seed, stopping_strategy=stopping_strategy
    )
    return list(zip(mixed["source"], mixed["row"]))


# -- the dataset -----------------------------------------------------------------------------------------------------


class BagelMixtureDataset(torch.utils.data.Dataset):
    """
    Map-style dataset of samples mixed from the sources of a data config (see the module docstring), ready for
    [`BagelPackedDataset`] and [`BagelDataCollator`]. Item `i` is the sample of the `i`-th `(source, row)` pair of
    the seeded mixture order; it carries `source` (the source's name) and `row` (`"<source>:<row> @<i>"`, named in
    errors and keying the collator's seeded condition dropout).

    Args:
        config (`str`, `Path` or `dict`): the data config ([`load_mixture_config`]).
        image_processor ([`BagelImageProcessor`], *optional*): needed when a source sets image sizes (their strides
            and the processor's range).
        seed (`int`, defaults to 0): seed of the mixing order (and of `shuffle`); the config's own `seed` wins.
        stopping_strategy (`str`, defaults to `"all_exhausted"`): see `datasets.interleave_datasets`; the config's
            own `stopping_strategy` wins.
        base_dir (`str` or `Path`, *optional*): see [`load_mixture_config`].
    """

    def __init__(
        self,
        config,
        image_processor=None,
        seed: int = 0,
        stopping_strategy: str = "all_exhausted",
        base_dir: str | Path | None = None,
    ):
        self.config = load_mixture_config(config, base_dir)
        self.seed = self.config["seed"] if self.config["seed"] is not None else seed
        self.stopping_strategy = self.config["stopping_strategy"] or stopping_strategy
        if self.stopping_strategy not in STOPPING_STRATEGIES:
            raise ValueError(
                f"Unknown stopping_strategy {self.stopping_strategy!r}; expected one of {STOPPING_STRATEGIES}."
            )
        if not _is_seed(self.seed):
            raise ValueError(f"The mixture's `seed` must be an integer >= 0, got {self.seed!r}.")
        self.sources = self.config["sources"]
        self.image_processor = image_processor
        self._sizes = [self._source_sizes(source) for source in self.sources]
        self.rows = [load_source_rows(source, self.seed) for source in self.sources]
        self.order = mixture_order(
            [len(rows) for rows in self.rows],
            [s["weight"] for s in self.sources],
            self.seed,
            self.stopping_strategy,
            names=[s["name"] for s in self.sources],
        )
        counts = self.source_counts()
        logger.info(
            f"Mixture of {len(self.sources)} sources, {len(self.order)} samples per epoch: "
            + ", ".join(f"{s['name']} {counts[s['name']]} (of {len(r)} rows)" for s, r in zip(self.sources, self.rows))
        )

    def _source_sizes(self, source: dict) -> dict | None:
        """Per-target (`vae`, `vit`) resize arguments of a source that sets image sizes, checked against the
        processor's own range (which the collator applies afterwards)."""
        if all(source.get(key) is None for key in _SIZE_KEYS):
            return None
        name = source["name"]
        processor = self.image_processor
        if processor is None:
            raise ValueError(f"Source {name!r} sets image sizes: pass `image_processor=` to BagelMixtureDataset.")
        sizes = {}
        for target, prefix, stride in (("vae", "", processor.vae_stride), ("vit", "vit_", processor.vit_patch_size)):
            low = source.get(f"{prefix}min_image_size") or getattr(processor, f"{target}_min_image_size")
            high = source.get(f"{prefix}max_image_size") or getattr(processor, f"{target}_max_image_size")
            for key, value in ((f"{prefix}min_image_size", low), (f"{prefix}max_image_size", high)):
                lo, hi = getattr(processor, f"{target}_min_image_size"), getattr(processor, f"{target}_max_image_size")
                if not lo <= value <= hi:
                    raise ValueError(
                        f"Source {name!r}: `{key}` {value} is outside the image processor's {target} range "
                        f"[{lo}, {hi}], which the collator applies after it; widen the processor's "
                        f"{target}_min/max_image_size or narrow the source."
                    )
            if low > high:
                raise ValueError(f"Source {name!r}: the {target} min size {low} is larger than its max size {high}.")
            max_pixels = min(source.get("max_pixels") or processor.max_pixels, processor.max_pixels)
            sizes[target] = dict(max_size=high, min_size=low, stride=stride, max_pixels=max_pixels)
        return sizes

    def __len__(self) -> int:
        return len(self.order)

    def source_of(self, index: int) -> str:
        """The name of the source of item `index` (no row is read)."""
        return self.sources[self.order[index][0]]["name"]

    def source_counts(self, num_samples: int | None = None) -> dict[str, int]:
        """How many of the first `num_samples` items (default: all) come from each source."""
        counts = {source["name"]: 0 for source in self.sources}
        for source, _ in self.order[:num_samples]:
            counts[self.sources[source]["name"]] += 1
        return counts

    def __getitem__(self, index: int) -> dict:
        source_index, row_index = self.order[index]
        source = self.sources[source_index]
        name = f"{source['name']}:{row_index} @{index}"
        try:
            row = self.rows[source_index][row_index]
        except Exception as error:  # e.g. an image column whose bytes do not decode
            raise ValueError(f"Row {name} could not be read (image failed to decode?): {type(error).__name__}: {error}") from error
        sample = row_to_sample(
            row, source["task"], name, source["columns"], source["image_dir"], num_frames=source.get("num_frames")
        )
        sample["source"] = source["name"]
        sizes = self._sizes[source_index]
        if sizes is not None:
            sample["segments"] = [self._resize(segment, sizes, name) for segment in sample["segments"]]
        return sample

    @staticmethod
    def _resize(segment: dict, sizes: dict, name: str) -> dict:
        kind = segment["type"]
        if kind == "text" or not isinstance(segment.get("image"), PIL.Image.Image):
            if kind == "vae_image" and segment.get("image") is None:
                logger.warning_once(
                    f"Row {name}: a VAE image given as cached latents keeps the size it was cached at; the source's "
                    "image sizes do not apply to it."
                )
            return segment
        image = segment["image"]
        width, height = bagel_resize_size(image.width, image.height, **sizes["vae" if kind == "vae_image" else "vit"])
        if (width, height) != image.size:
            segment = {**segment, "image": image.resize((width, height), PIL.Image.Resampling.BICUBIC)}
        return segment


def read_data_config(path: str | Path, dataset_info: dict | None = None) -> dict:
    """
    A data config file as a dict of this module's format: our own format as it is, or the original BAGEL format
    (top-level dataset groups with `dataset_names`) converted with [`original_data_config_to_mixture`] (logged).
    Relative paths stay relative to the file's folder (pass `base_dir=Path(path).parent` on).
    """
    config = _read_config_file(Path(path))
    if isinstance(config, dict) and "sources" not in config and any(
        isinstance(value, dict) and "dataset_names" in value for value in config.values()
    ):
        logger.info(f"{path}: the original BAGEL data config format; converting it.")
        return original_data_config_to_mixture(config, dataset_info=dataset_info)
    return config


# -- the original's format -------------------------------------------------------------------------------------------

ORIGINAL_GROUP_TASKS = {"t2i_pretrain": "text_to_image", "unified_edit": "edit", "vlm_sft": "understanding"}
# Keys of an original group this converter reads; any other key is reported as not mapped.
_ORIGINAL_READ = {
    "dataset_names",
    "weight",
    "num_used_data",
    "data_dir_list",
    "jsonl_path_list",
    "image_transform_args",
    "vit_image_transform_args",
    "shuffle_lines",
    "shuffle_seed",
    "frame_sampler_args",
}


def _original_int(group: str, key: str, value, minimum: int = 1) -> int:
    """An integer field of the original's config (e.g. `image_transform_args.max_image_size`), refused naming the
    group and the field when it is not a whole number >= `minimum`."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"Group {group!r}: `{key}` must be {kind}, got {value!r}.")
    return value


def _transform_sizes(group: str, key: str, args: dict, prefix: str, stride: int) -> dict:
    if not isinstance(args, dict):
        raise ValueError(f"Group {group!r}: `{key}` must be a mapping, got {args!r}.")
    out = {}
    for name in ("max_image_size", "min_image_size"):
        if args.get(name) is not None:
            out[prefix + name] = _original_int(group, f"{key}.{name}", args[name])
    if args.get("max_pixels") is not None:
        out["max_pixels"] = _original_int(group, f"{key}.max_pixels", args["max_pixels"])
    image_stride = args.get("image_stride")
    if image_stride is not None and _original_int(group, f"{key}.image_stride", image_stride) != stride:
        logger.warning(
            f"Group {group!r}: `{key}.image_stride` {args['image_stride']} is not mapped: the stride comes from the "
            f"model ({stride} for this transform)."
        )
    for extra in sorted(set(args) - {"max_image_size", "min_image_size", "max_pixels", "image_stride"}):
        logger.warning(f"Group {group!r}: `{key}.{extra}` is not mapped.")
    return out


def _original_frames(group: str, task: str, args) -> int | None:
    """The frame count of a group's `frame_sampler_args`: the original draws between `min_num_frames` and
    `max_num_frames` frames per video in training; a fixed count (the largest) is taken here, sampled at the middle
    of equal intervals. Only understanding groups read videos: elsewhere it is dropped with a warning."""
    if not args:
        return None
    if not isinstance(args, dict):
        raise ValueError(f"Group {group!r}: `frame_sampler_args` must be a mapping, got {args!r}.")
    if args.get("max_num_frames") is None:
        return None
    frames = _original_int(group, "frame_sampler_args.max_num_frames", args["max_num_frames"])
    if task != "understanding":
        logger.warning(f"Group {group!r}: `frame_sampler_args` is dropped: a {task!r} group reads no video.")
        return None
    return frames


def original_data_config_to_mixture(
    config, dataset_info: dict | None = None, group_tasks: dict[str, str] | None = None
) -> dict:
    """
    Converts the original BAGEL data config (YAML: one entry per dataset group, e.g. `t2i_pretrain`,
    `unified_edit`, `vlm_sft`) into this module's format, one source per dataset of a group.

    Mapped: the group's task (`t2i_pretrain` -> `text_to_image`, `unified_edit` -> `edit`, `vlm_sft` ->
    `understanding`; others through `group_tasks`); each dataset's data from `jsonl_path_list` (JSON lines, with
    `data_dir_list` as the image folder) or `data_dir_list` (a folder of parquet files), or from `dataset_info`
    (the original's `DATASET_INFO` table: `{group: {dataset: {"data_dir"/"jsonl_path": ...}}}`); `num_used_data`
    (`num_rows` of JSON lines, `num_files` of parquet folders); `weight` (split evenly over the group's datasets, since
    the original weights groups); `image_transform_args` (VAE sizes, or the ViT sizes of `vlm_sft`),
    `vit_image_transform_args`, `max_pixels`; `shuffle_lines` / `shuffle_seed`; `frame_sampler_args` (its
    `max_num_frames` as `num_frames`). A dataset with no path (the original's example names datasets only) is
    converted with `data` left empty and a warning: loading the result names it until it is filled in. Anything else
    (`is_mandatory`, `resume_data_status`, strides, ...) is reported with a warning and dropped.

    Args:
        config (`str`, `Path` or `dict`): the original YAML file or its content. Relative paths stay relative (to the
            original YAML's folder when the result is given to [`BagelMixtureDataset`] with `base_dir`).
        dataset_info (`dict`, *optional*): the original's `DATASET_INFO`, for groups without explicit paths.
        group_tasks (`dict`, *optional*): tasks of groups beyond the three above.

    Returns:
        `dict`: a data config for [`load_mixture_config`] / [`BagelMixtureDataset`].
    """
    if isinstance(config, (str, Path)):
        config = _read_config_file(Path(config))
    if not isinstance(config, dict) or not config:
        raise ValueError("The original data config must be a non-empty mapping of dataset groups.")
    tasks = {**ORIGINAL_GROUP_TASKS, **(group_tasks or {})}
    dataset_info = dataset_info or {}
    sources = []
    for group, args in config.items():
        if not isinstance(args, dict):
            raise ValueError(f"Group {group!r} of the original data config must be a mapping, got {args!r}.")
        if group not in tasks:
            raise ValueError(
                f"Group {group!r}: unknown dataset group; pass its task with `group_tasks={{{group!r}: ...}}` (one of "
                f"{TASKS})."
            )
        task = tasks[group]
        names = args.get("dataset_names")
        if not isinstance(names, list) or not names:
            raise ValueError(f"Group {group!r}: `dataset_names` must be a non-empty list.")
        for key in sorted(set(args) - _ORIGINAL_READ):
            logger.warning(f"Group {group!r}: `{key}` is not mapped (no equivalent here); it is dropped.")
        weight = args.get("weight", 0.0)
        if not _is_number(weight) or weight <= 0:
            logger.warning(f"Group {group!r}: `weight` {weight!r} is not positive; the group is left out.")
            continue
        num_used = args.get("num_used_data")
        if num_used is not None and (not isinstance(num_used, list) or len(num_used) != len(names)):
            raise ValueError(f"Group {group!r}: `num_used_data` must list one number per dataset of `dataset_names`.")
        if num_used is not None:
            num_used = [_original_int(group, f"num_used_data[{k}]", value) for k, value in enumerate(num_used)]
        frames = _original_frames(group, task, args.get("frame_sampler_args"))
        jsonl_paths = list(args.get("jsonl_path_list") or [])
        data_dirs = list(args.get("data_dir_list") or [])
        sizes = {}
        if "image_transform_args" in args:
            is_vit = task == "understanding"
            sizes.update(_transform_sizes(group, "image_transform_args", args["image_transform_args"],
                                          "vit_" if is_vit else "", 14 if is_vit else 16))  # fmt: skip
        if "vit_image_transform_args" in args:
            sizes.update(_transform_sizes(group, "vit_image_transform_args", args["vit_image_transform_args"], "vit_", 14))
        if len(names) > 1:
            logger.warning(
                f"Group {group!r}: its weight {weight} is split evenly over its {len(names)} datasets (the original "
                "reads a group's datasets in turn); set per-source weights to change it."
            )
        for k, dataset in enumerate(names):
            info = (dataset_info.get(group) or {}).get(dataset, {})
            for key in sorted(set(info) - {"data_dir", "jsonl_path", "num_files", "num_total_samples"}):
                logger.warning(f"Group {group!r}, dataset {dataset!r}: dataset_info key `{key}` is not mapped.")
            jsonl = jsonl_paths[k] if k < len(jsonl_paths) else info.get("jsonl_path")
            folder = data_dirs[k] if k < len(data_dirs) else info.get("data_dir")
            source = {"name": f"{group}/{dataset}", "task": task, "weight": float(weight) / len(names)}
            if jsonl is None and folder is None:
                # The original resolves names through DATASET_INFO (Python code, not read here): convert anyway and
                # leave `data` for the user; loading the result names the source until it is filled in.
                logger.warning(
                    f"Group {group!r}, dataset {dataset!r}: no data path (`jsonl_path_list` / `data_dir_list`, or "
                    "`dataset_info`); its `data` is left empty, fill it in before training."
                )
                source["data"] = None
                if num_used is not None:
                    source["num_rows" if task == "understanding" else "num_files"] = num_used[k]
            elif jsonl is not None:
                source["data"] = str(jsonl)
                if folder is not None:
                    source["image_dir"] = str(folder)
                if num_used is not None:
                    source["num_rows"] = num_used[k]
            else:
                source["data"] = str(folder)
                if num_used is not None:
                    source["num_files"] = num_used[k]
            if args.get("shuffle_lines"):
                source["shuffle"] = True
                if args.get("shuffle_seed") is not None:
                    source["shuffle_seed"] = _original_int(group, "shuffle_seed", args["shuffle_seed"], minimum=0)
            source.update(copy.deepcopy(sizes))
            if frames is not None:
                source["num_frames"] = frames
            sources.append(source)
    if not sources:
        raise ValueError("The original data config has no group with a positive weight.")
    return {"sources": sources}


__all__ = [
    "MAX_EPOCH_FACTOR",
    "MIXTURE_KEYS",
    "SOURCE_KEYS",
    "STOPPING_STRATEGIES",
    "BagelMixtureDataset",
    "check_mixture_weights",
    "load_mixture_config",
    "load_source_rows",
    "mixture_order",
    "original_data_config_to_mixture",
    "read_data_config",
]
