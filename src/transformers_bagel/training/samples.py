"""
Training samples for BAGEL and builders that make them from `datasets` rows.

A sample is a plain dict holding an ordered list of segments (the original's "sequence plan"):

```python
{
    "segments": [
        {"type": "text", "text": "a red cat", "loss": False, "enable_cfg": True},
        {"type": "vit_image", "image": image, "enable_cfg": True},                 # understanding (SigLIP) image
        {"type": "vae_image", "image": image, "loss": False, "enable_cfg": True},  # clean VAE image (condition)
        {"type": "vae_image", "image": image, "loss": True},                       # generation target (noised)
    ],
    "row": 12,  # optional: where the sample came from; named in every error and keys the condition dropout
}
```

- `text`: packed as `<|im_start|>` + tokens + `<|im_end|>`, causal, one position per token. With `loss=True` every
  token after `<|im_start|>` is a next-token target, `<|im_end|>` included (it is the end label).
- `vit_image`: an understanding image (NaViT patches). One bidirectional block at one position.
- `vae_image` with `loss=False`: a clean VAE-latent image (editing source), a bidirectional block at one position,
  encoded at flow time 0.
- `vae_image` with `loss=True`: a flow-matching target. It is noised, no other token can see it, and it does not
  advance the position counter (the original's `PackedDataset.pack_sequence`, `data/dataset_base.py`).
- `special_token_loss` (any segment, defaults to off): the original's flag of the same name. The segment's closing
  token (`<|im_end|>` of a text, `<|vision_end|>` of an image) becomes a CE position: its logits are trained to predict
  `special_token_label` (a token id or token string; by default the token that opens the next segment kept in the
  sample, e.g. `<|vision_start|>` when a generated image follows a text). In the aligned labels this sets the label of
  the token after the closing one. It needs a following segment; without one (or when condition dropout removed every
  following segment) there is no position to label and the flag is refused / skipped with a warning. Off, the labels
  are exactly those above.
- `enable_cfg`: the collator drops the segment with the text / ViT / VAE condition-dropout probability, for
  classifier-free guidance training (a dropped image still advances the position counter, a dropped text does not, as
  in the original).
- An image may be a PIL image, a path, bytes, a `datasets.Image` value (`{"bytes": ..., "path": ...}`), a numpy array
  or a `(3, H, W)` tensor in [0, 1]. A `vae_image` may instead carry `"vae_moments"`: the VAE posterior's mean and
  log-variance, `(2 * latent_channels, H / 8, W / 8)`, from the latent cache ([`cache_vae_latents`]), or fixed
  `"latents"`: an already normalised clean latent `(latent_channels, H / 8, W / 8)` (synthetic data, tests).

Builders for the three task kinds of the original data sets produce their sequence plans:

| builder | segments |
|---|---|
| [`text_to_image_sample`] | prompt (droppable), target image |
| [`edit_sample`] | per source image: clean VAE block (droppable) + ViT block (droppable); instruction (droppable); target image |
| [`understanding_sample`] | ViT image(s), question, answer (CE loss); nothing droppable |

General interleaved sequences are written directly in the format above (`task="interleaved"` reads them from a
`segments` column).

[`samples_from_rows`] and [`BagelSampleDataset`] turn `datasets` rows into samples: parquet files with image bytes,
JSON lines with image paths relative to an image folder (`image_dir=`), or the `imagefolder` builder (`image` plus
`text` / metadata columns; rename with `columns=`):

```python
from datasets import load_dataset
from transformers_bagel.training import BagelSampleDataset

rows = load_dataset("json", data_files="train.jsonl", split="train")          # {"prompt": ..., "image": "cats/1.png"}
train_dataset = BagelSampleDataset(rows, task="text_to_image", image_dir="images/")
```
"""

from collections.abc import Iterable, Iterator
from pathlib import Path

import PIL.Image
import torch
from transformers.utils import logging

from ..image_processing_bagel import to_rgb_image
from ..video_utils import load_video_frames


logger = logging.get_logger(__name__)

SEGMENT_TYPES = ("text", "vit_image", "vae_image")
TASKS = ("text_to_image", "edit", "understanding", "interleaved")
# Column names each task reads by default; `columns=` renames them.
DEFAULT_COLUMNS = {
    "prompt": "prompt",
    "image": "image",
    "source": "source",
    "instruction": "instruction",
    "target": "target",
    "question": "question",
    "answer": "answer",
    "video": "video",
    "segments": "segments",
}
MOMENTS_SUFFIX = "_vae_moments"


def _where(row) -> str:
    return f" (row {row})" if row is not None else ""


# -- segments and samples --------------------------------------------------------------------------------------------


def _with_special_token_loss(segment: dict, special_token_loss: bool, special_token_label) -> dict:
    # The keys are only written when asked for, so default samples stay exactly as before.
    if special_token_loss:
        segment["special_token_loss"] = True
        if special_token_label is not None:
            segment["special_token_label"] = special_token_label
    elif special_token_label is not None:
        raise ValueError("`special_token_label` is given but `special_token_loss` is off: pass special_token_loss=True.")
    return segment


def text_segment(
    text: str, loss: bool = False, enable_cfg: bool = False, special_token_loss: bool = False, special_token_label=None
) -> dict:
    """A text segment; `loss=True` trains next-token prediction on it. `special_token_loss=True` also trains its
    closing `<|im_end|>` to predict `special_token_label` (default: the next segment's opening token)."""
    segment = {"type": "text", "text": text, "loss": bool(loss), "enable_cfg": bool(enable_cfg)}
    return _with_special_token_loss(segment, special_token_loss, special_token_label)


def vit_segment(image, enable_cfg: bool = False, special_token_loss: bool = False, special_token_label=None) -> dict:
    """An understanding image (SigLIP NaViT patches); `special_token_loss` as in [`text_segment`], on its
    `<|vision_end|>`."""
    segment = {"type": "vit_image", "image": image, "enable_cfg": bool(enable_cfg)}
    return _with_special_token_loss(segment, special_token_loss, special_token_label)


def vae_segment(
    image=None,
    loss: bool = False,
    enable_cfg: bool = False,
    vae_moments=None,
    latents=None,
    special_token_loss: bool = False,
    special_token_label=None,
) -> dict:
    """A VAE-latent image: a clean condition (`loss=False`) or a flow-matching target (`loss=True`), given as an
    image, as cached posterior moments or as a fixed normalised latent. `special_token_loss` as in [`text_segment`],
    on its `<|vision_end|>` (e.g. after a generated image, predict the text that follows)."""
    segment = {"type": "vae_image", "image": image, "loss": bool(loss), "enable_cfg": bool(enable_cfg)}
    if vae_moments is not None:
        segment["vae_moments"] = vae_moments
    if latents is not None:
        segment["latents"] = latents
    return _with_special_token_loss(segment, special_token_loss, special_token_label)


def text_to_image_sample(prompt: str, image, row=None, vae_moments=None) -> dict:
    """The prompt (droppable for CFG) then the target image, as the original `t2i` data set."""
    return {
        "segments": [text_segment(prompt, enable_cfg=True), vae_segment(image, loss=True, vae_moments=vae_moments)],
        "row": row,
    }


def edit_sample(source_images, instruction: str, target_image, row=None, source_moments=None, target_moments=None) -> dict:
    """Each source image as a clean VAE block then a ViT block (both droppable), the instruction (droppable), then the
    target image: the original `edit` data set's plan for one editing step."""
    sources = list(source_images) if isinstance(source_images, (list, tuple)) else [source_images]
    if source_moments is None:
        moments = [None] * len(sources)
    else:
        moments = list(source_moments) if isinstance(source_moments, (list, tuple)) else [source_moments]
    if len(moments) != len(sources):
        raise ValueError(f"Got {len(moments)} cached latents for {len(sources)} source images{_where(row)}.")
    segments = []
    for image, moment in zip(sources, moments):
        segments += [vae_segment(image, enable_cfg=True, vae_moments=moment), vit_segment(image, enable_cfg=True)]
    segments += [
        text_segment(instruction, enable_cfg=True),
        vae_segment(target_image, loss=True, vae_moments=target_moments),
    ]
    return {"segments": segments, "row": row}


def understanding_sample(images, question: str, answer: str, row=None) -> dict:
    """ViT image(s), the question, then the answer with a text loss, as the original `vlm` data set (no dropout).
    `images` may be one image, a list, or None for a text-only sample."""
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    segments = [vit_segment(image) for image in images]
    segments += [text_segment(question), text_segment(answer, loss=True)]
    return {"segments": segments, "row": row}


# -- images ----------------------------------------------------------------------------------------------------------


def load_image(image, row=None, base_dir: str | Path | None = None) -> PIL.Image.Image:
    """
    One training image as an RGB PIL image: anything [`to_rgb_image`] takes (PIL, path, bytes, numpy array, tensor)
    or a `datasets.Image` value (`{"bytes"|"path": ...}`). Relative paths are resolved against `base_dir`. A missing
    file, data that does not decode or an unusable array raises `ValueError` naming `row`.
    """
    where = _where(row)
    if image is None:
        raise ValueError(f"Missing image{where}.")
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
        if image is None:
            raise ValueError(f"Missing image: the image value has neither bytes nor a path{where}.")
    if isinstance(image, (str, Path)) and base_dir is not None and not Path(image).is_absolute():
        image = Path(base_dir) / image
    try:
        return to_rgb_image(image)
    except ValueError as error:
        raise ValueError(f"{str(error).rstrip('.')}{where}.") from error
    except TypeError:
        raise TypeError(
            f"Unsupported image type {type(image).__name__}{where}; expected a PIL image, a path, bytes, a datasets "
            "Image value, a numpy array or a tensor."
        ) from None


def validate_sample(sample: dict) -> dict:
    """Checks a sample's structure and returns it; errors name the sample's row."""
    if not isinstance(sample, dict):
        raise TypeError(f"A sample must be a dict with a 'segments' list, got {type(sample).__name__}.")
    where = _where(sample.get("row"))
    segments = sample.get("segments")
    if not isinstance(segments, list) or not segments:
        raise ValueError(f"A sample needs a non-empty 'segments' list{where}.")
    for index, segment in enumerate(segments):
        if not isinstance(segment, dict):
            raise TypeError(f"Segment {index} must be a dict, got {type(segment).__name__}{where}.")
        kind = segment.get("type")
        if kind not in SEGMENT_TYPES:
            raise ValueError(f"Segment {index} has type {kind!r}; expected one of {SEGMENT_TYPES}{where}.")
        if kind == "text" and not isinstance(segment.get("text"), str):
            raise ValueError(f"Text segment {index} needs a 'text' string{where}.")
        if kind == "text" and not segment["text"].strip():
            raise ValueError(
                f"Text segment {index} is empty{where}: an empty prompt would be trained on as a condition (leave "
                "condition dropout to the collator's text_cond_dropout_prob instead)."
            )
        if kind == "vit_image" and segment.get("image") is None:
            raise ValueError(f"Missing image in segment {index} (vit_image){where}.")
        if kind == "vae_image" and all(segment.get(key) is None for key in ("image", "vae_moments", "latents")):
            raise ValueError(f"Missing image in segment {index} (vae_image){where}.")
        if kind == "vit_image" and segment.get("loss"):
            raise ValueError(f"A vit_image segment cannot carry a loss (segment {index}){where}.")
        if segment.get("special_token_loss"):
            label = segment.get("special_token_label")
            if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
                raise ValueError(
                    f"Segment {index} has special_token_label {label!r}; expected a token id or a token string{where}."
                )
            if index == len(segments) - 1:
                raise ValueError(
                    f"Segment {index} ({kind}) asks for special_token_loss but is the last segment{where}: its closing "
                    "token predicts the next token, and nothing follows it in the sample."
                )
        elif segment.get("special_token_label") is not None:
            raise ValueError(
                f"Segment {index} has a special_token_label but special_token_loss is off{where}: set "
                "special_token_loss=True."
            )
    if not any(segment.get("loss") or segment.get("special_token_loss") for segment in segments):
        logger.warning_once(f"A sample has no segment with a loss{where}: it only adds compute.")
    return sample


# -- datasets rows -> samples ----------------------------------------------------------------------------------------


def row_to_sample(
    row: dict, task: str, index=None, columns: dict | None = None, image_dir=None, num_frames: int | None = None
) -> dict:
    """
    Turns one `datasets` row into a validated sample.

    Args:
        row (`dict`): the row.
        task (`str`): `"text_to_image"` (columns `prompt`, `image`), `"edit"` (`source` (one image or a list),
            `instruction`, `target`), `"understanding"` (`image` (optional, one or a list), `video` (optional: a
            video file, a folder of frames or a list of frames), `question`, `answer`) or
            `"interleaved"` (a `segments` column already in the sample format).
        index: the row's index, named in errors.
        columns (`dict`, *optional*): renames, e.g. `{"prompt": "text"}` reads the prompt from a `text` column.
        image_dir (`str` or `Path`, *optional*): base folder of relative image and video paths.
        num_frames (`int`, *optional*): frames taken from a `video` ([`~video_utils.load_video_frames`]'s default
            when omitted); each frame is one ViT image segment, after the row's images, as the original puts a
            video's frames where it stands. Understanding rows only: refused for the other tasks.

    Cached VAE latents ([`cache_vae_latents`]) are picked up from `<column>_vae_moments` columns.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
    if num_frames is not None and task != "understanding":
        raise ValueError(
            f"`num_frames` samples a `video` column, which only understanding rows read; {task!r} rows have no "
            f"video (row {index})."
        )
    unknown = set(columns or {}) - set(DEFAULT_COLUMNS)
    if unknown:
        raise ValueError(f"Unknown column role(s) {sorted(unknown)} in `columns`; the roles are {sorted(DEFAULT_COLUMNS)}.")
    names = {**DEFAULT_COLUMNS, **(columns or {})}
    required = {
        "text_to_image": ["prompt", "image"],
        "edit": ["source", "instruction", "target"],
        "understanding": ["question", "answer"],
        "interleaved": ["segments"],
    }[task]
    missing = [names[role] for role in required if names[role] not in row]
    if missing:
        raise ValueError(f"Row {index} lacks the column(s) {missing} needed for {task!r} samples; it has {sorted(row)}.")

    def image(role, optional=False):
        value = row.get(names[role])
        if value is None:
            if optional:
                return None
            raise ValueError(f"Missing image in column {names[role]!r} (row {index}).")
        if isinstance(value, (list, tuple)):
            return [load_image(v, index, image_dir) for v in value]
        return load_image(value, index, image_dir)

    def moments(role):
        return row.get(names[role] + MOMENTS_SUFFIX)

    # With cached latents a target image is not decoded at all; edit sources still feed the ViT.
    if task == "text_to_image":
        cached = moments("image")
        target = image("image") if cached is None else None
        sample = text_to_image_sample(row[names["prompt"]], target, index, vae_moments=cached)
    elif task == "edit":
        cached = moments("target")
        target = image("target") if cached is None else None
        sample = edit_sample(image("source"), row[names["instruction"]], target, index, moments("source"), cached)
    elif task == "understanding":
        images = image("image", optional=True)
        images = [] if images is None else images if isinstance(images, list) else [images]
        if row.get(names["video"]) is not None:
            video = row[names["video"]]
            if isinstance(video, (str, Path)) and image_dir is not None and not Path(video).is_absolute():
                video = Path(image_dir) / video
            try:
                images += load_video_frames(video, num_frames=num_frames)
            except ValueError as error:
                raise ValueError(f"{str(error).rstrip('.')} (column {names['video']!r}, row {index}).") from error
        sample = understanding_sample(images or None, row[names["question"]], row[names["answer"]], index)
    else:
        segments = row[names["segments"]]
        if not isinstance(segments, list):
            raise ValueError(f"Column {names['segments']!r} must hold a list of segments (row {index}).")
        sample = {"segments": [_load_segment(dict(s), index, image_dir) for s in segments], "row": index}
    return validate_sample(sample)


def _load_segment(segment: dict, index, image_dir) -> dict:
    if segment.get("type") in ("vit_image", "vae_image") and segment.get("image") is not None:
        segment["image"] = load_image(segment["image"], index, image_dir)
    return segment


def samples_from_rows(
    rows: Iterable[dict], task: str, columns: dict[str, str] | None = None, image_dir: str | Path | None = None
) -> Iterator[dict]:
    """Lazily turns an iterable of rows (a `datasets.Dataset`, a list of dicts) into samples; see [`row_to_sample`]."""
    for index, row in enumerate(rows):
        yield row_to_sample(row, task, index, columns, image_dir)


class BagelSampleDataset(torch.utils.data.Dataset):
    """
    Map-style dataset of samples built lazily from rows (images are decoded when a sample is read), ready for
    `Trainer(train_dataset=..., data_collator=BagelDataCollator(...))`.

    Args:
        rows: a `datasets.Dataset` or any indexable sequence of dicts.
        task, columns, image_dir: see [`row_to_sample`].
    """

    def __init__(self, rows, task: str, columns: dict[str, str] | None = None, image_dir: str | Path | None = None):
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
        self.rows = rows
        self.task = task
        self.columns = columns
        self.image_dir = image_dir

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        try:
            row = self.rows[index]
        except Exception as error:  # e.g. a `datasets.Image` column whose bytes do not decode
            raise ValueError(f"Row {index} could not be read (image failed to decode?): {type(error).__name__}: {error}") from error
        return row_to_sample(row, self.task, index, self.columns, self.image_dir)


# -- latent cache ----------------------------------------------------------------------------------------------------


def cache_vae_latents(
    dataset,
    vae,
    image_processor,
    image_columns: Iterable[str] = ("image",),
    image_dir: str | Path | None = None,
    batch_size: int = 8,
    **map_kwargs,
):
    """
    Encodes the images of `image_columns` with the frozen VAE ahead of time, as a `datasets.Dataset.map` step: each
    column `c` gets a companion `c_vae_moments` holding the VAE posterior's mean and log-variance
    (`(2 * latent_channels, H / 8, W / 8)` per image, or a list for list columns). Samples built from the result
    carry the moments, and the training step draws the latent from them (a fresh posterior sample per step, as the
    original; `BagelTrainer(sample_posterior=False)` takes the mean), so the VAE never runs during training.

    Args:
        dataset (`datasets.Dataset`): the rows.
        vae (`AutoencoderKL`): the FLUX autoencoder.
        image_processor ([`BagelImageProcessor`]): resizes images with the VAE rule first.
        image_columns: the columns whose images are VAE inputs (for edits: `("source", "target")`).
        image_dir: base folder of relative image paths.
        batch_size (`int`): rows per map batch.
        **map_kwargs: forwarded to `Dataset.map` (e.g. `cache_file_name=`).

    Returns:
        The mapped `datasets.Dataset`.
    """
    image_columns = list(image_columns)
    missing = [column for column in image_columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"The dataset has no column(s) {missing}; it has {dataset.column_names}.")
    parameter = next(vae.parameters())

    @torch.no_grad()
    def encode(image, index):
        pixels = image_processor.preprocess_vae(load_image(image, index, image_dir))["vae_pixel_values"][0]
        moments = vae.encode(pixels[None].to(device=parameter.device, dtype=parameter.dtype)).latent_dist.parameters
        return moments[0].float().cpu().numpy()

    def encode_batch(batch, indices):
        out = {}
        for column in image_columns:
            values = []
            for value, index in zip(batch[column], indices):
                if isinstance(value, (list, tuple)):
                    values.append([encode(v, index) for v in value])
                else:
                    values.append(encode(value, index))
            out[column + MOMENTS_SUFFIX] = values
        return out

    return dataset.map(encode_batch, batched=True, batch_size=batch_size, with_indices=True, **map_kwargs)


__all__ = [
    "SEGMENT_TYPES",
    "TASKS",
    "text_segment",
    "vit_segment",
    "vae_segment",
    "text_to_image_sample",
    "edit_sample",
    "understanding_sample",
    "load_image",
    "validate_sample",
    "row_to_sample",
    "samples_from_rows",
    "BagelSampleDataset",
    "cache_vae_latents",
]
