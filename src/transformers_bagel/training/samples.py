"""
Training samples for BAGEL.

A sample is a plain dict (JSON-friendly apart from images) holding an ordered list of segments, the original's
"sequence plan":

    {"segments": [
        {"type": "text", "text": "a red cat", "loss": False, "enable_cfg": True},
        {"type": "vit_image", "image": <PIL.Image | path | array>, "enable_cfg": True},
        {"type": "vae_image", "image": ..., "loss": False, "enable_cfg": True},   # clean conditioning image
        {"type": "vae_image", "image": ..., "loss": True},                        # generation target (noised)
     ],
     "row": 12}                                                                   # optional, named in errors

- `text`: `<|im_start|>` + tokens + `<|im_end|>`. With `loss=True` every token after `<|im_start|>` (the end token
  included) is a next-token target.
- `vit_image`: an understanding image (SigLIP patches).
- `vae_image`: a VAE latent image; `loss=True` makes it a flow-matching target: noised, hidden from every other
  token, and it does not advance the position counter.
- `enable_cfg`: the segment may be dropped by the collator's condition dropout (classifier-free guidance training).
- A `vae_image` may carry `"latents"` (a `(16, H/8, W/8)` tensor or nested list) instead of, or besides, `"image"`:
  the latent cache (see [`cache_vae_latents`]).

Builders for the three task kinds of the original (`text_to_image_sample`, `edit_sample`, `understanding_sample`)
produce exactly the original datasets' sequence plans; `samples_from_rows` turns `datasets` rows into samples.
"""

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from transformers.utils import logging


logger = logging.get_logger(__name__)

SEGMENT_TYPES = ("text", "vit_image", "vae_image")


def text_segment(text: str, loss: bool = False, enable_cfg: bool = False) -> dict:
    return {"type": "text", "text": text, "loss": bool(loss), "enable_cfg": bool(enable_cfg)}


def vit_segment(image, enable_cfg: bool = False) -> dict:
    return {"type": "vit_image", "image": image, "enable_cfg": bool(enable_cfg)}


def vae_segment(image, loss: bool = False, enable_cfg: bool = False) -> dict:
    return {"type": "vae_image", "image": image, "loss": bool(loss), "enable_cfg": bool(enable_cfg)}


def text_to_image_sample(prompt: str, image, row=None) -> dict:
    """Prompt (droppable for CFG) then the target image, as the original `t2i_dataset`."""
    return {"segments": [text_segment(prompt, enable_cfg=True), vae_segment(image, loss=True)], "row": row}


def edit_sample(source_images, instruction: str, target_image, row=None) -> dict:
    """Each source image as a clean VAE block and a ViT block (both droppable), the instruction (droppable), then the
    target image, as the original `edit_dataset` with one edit step."""
    if not isinstance(source_images, (list, tuple)):
        source_images = [source_images]
    segments = []
    for image in source_images:
        segments += [vae_segment(image, enable_cfg=True), vit_segment(image, enable_cfg=True)]
    segments += [text_segment(instruction, enable_cfg=True), vae_segment(target_image, loss=True)]
    return {"segments": segments, "row": row}


def understanding_sample(images, question: str, answer: str, row=None) -> dict:
    """ViT images, the question, then the answer with a text loss, as the original `vlm_dataset` (no dropout)."""
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    segments = [vit_segment(image) for image in images]
    segments += [text_segment(question), text_segment(answer, loss=True)]
    return {"segments": segments, "row": row}


def load_image(image, row=None, base_dir: str | Path | None = None) -> PIL.Image.Image:
    """Opens an image given as PIL, path, bytes, `{"bytes"|"path": ...}` (datasets' Image feature) or array; errors
    name the row."""
    where = f" (row {row})" if row is not None else ""
    if image is None:
        raise ValueError(f"Missing image{where}.")
    try:
        if isinstance(image, PIL.Image.Image):
            return image
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (bytes, bytearray)):
            import io

            return _decoded(PIL.Image.open(io.BytesIO(image)))
        if isinstance(image, (str, Path)):
            path = Path(image)
            if base_dir is not None and not path.is_absolute():
                path = Path(base_dir) / path
            if not path.is_file():
                raise ValueError(f"Missing image file {path}{where}.")
            return _decoded(PIL.Image.open(path))
        if isinstance(image, np.ndarray):
            return PIL.Image.fromarray(image)
        if isinstance(image, torch.Tensor):
            array = image.detach().cpu().numpy()
            if array.ndim == 3 and array.shape[0] in (1, 3, 4):
                array = array.transpose(1, 2, 0)
            if array.dtype != np.uint8:
                array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
            return PIL.Image.fromarray(array.squeeze())
    except ValueError:
        raise
    except Exception as error:  # PIL raises many types for undecodable data
        raise ValueError(f"Image failed to decode{where}: {error}") from error
    raise TypeError(f"Unsupported image type {type(image).__name__}{where}.")


def _decoded(image: PIL.Image.Image) -> PIL.Image.Image:
    image.load()  # decode now, so a broken file fails here and not deep inside the collator
    return image


def validate_sample(sample: dict) -> dict:
    """Checks a sample's structure; errors name the row."""
    row = sample.get("row")
    where = f" (row {row})" if row is not None else ""
    segments = sample.get("segments")
    if not isinstance(segments, list) or not segments:
        raise ValueError(f"A sample needs a non-empty 'segments' list{where}.")
    for index, segment in enumerate(segments):
        kind = segment.get("type")
        if kind not in SEGMENT_TYPES:
            raise ValueError(f"Segment {index} has type {kind!r}; expected one of {SEGMENT_TYPES}{where}.")
        if kind == "text" and not isinstance(segment.get("text"), str):
            raise ValueError(f"Text segment {index} needs a 'text' string{where}.")
        if kind != "text" and segment.get("image") is None and segment.get("latents") is None:
            raise ValueError(f"Missing image in segment {index} ({kind}){where}.")
        if kind == "vit_image" and segment.get("loss"):
            raise ValueError(f"A vit_image segment cannot carry a loss (segment {index}){where}.")
    return sample


def samples_from_rows(
    rows: Iterable[dict],
    task: str,
    columns: dict[str, str] | None = None,
    image_dir: str | Path | None = None,
) -> Iterable[dict]:
    """
    Turns `datasets` rows (parquet, JSON lines with image paths, `imagefolder`) into samples.

    Args:
        rows: an iterable of dicts, e.g. a `datasets.Dataset`.
        task: `"text_to_image"` (columns `prompt`, `image`), `"edit"` (`source`, `instruction`, `target`; `source`
            may be a list), `"understanding"` (`image`, `question`, `answer`; `image` may be a list or absent), or
            `"interleaved"` (a `segments` column already in the sample format).
        columns: renames, e.g. `{"prompt": "text"}` to read the prompt from a `text` column.
        image_dir: base folder for relative image paths.
    """
    names = {"prompt": "prompt", "image": "image", "source": "source", "instruction": "instruction",
             "target": "target", "question": "question", "answer": "answer", "segments": "segments"}  # fmt: skip
    names.update(columns or {})
    builders: dict[str, Callable] = {
        "text_to_image": lambda r, i: text_to_image_sample(r[names["prompt"]], _img(r, names["image"], i, image_dir), i),
        "edit": lambda r, i: edit_sample(
            _img(r, names["source"], i, image_dir), r[names["instruction"]], _img(r, names["target"], i, image_dir), i
        ),
        "understanding": lambda r, i: understanding_sample(
            _img(r, names["image"], i, image_dir, optional=True), r[names["question"]], r[names["answer"]], i
        ),
        "interleaved": lambda r, i: {"segments": r[names["segments"]], "row": i},
    }
    if task not in builders:
        raise ValueError(f"Unknown task {task!r}; expected one of {sorted(builders)}.")
    for index, row in enumerate(rows):
        missing = [c for c in _required_columns(task, names) if c not in row]
        if missing:
            raise ValueError(f"Row {index} lacks the column(s) {missing} needed for {task!r} samples.")
        yield validate_sample(builders[task](row, index))


def _required_columns(task, names):
    return {
        "text_to_image": [names["prompt"], names["image"]],
        "edit": [names["source"], names["instruction"], names["target"]],
        "understanding": [names["question"], names["answer"]],
        "interleaved": [names["segments"]],
    }[task]


def _img(row, column, index, image_dir, optional=False):
    value = row.get(column)
    if value is None:
        if optional:
            return None
        raise ValueError(f"Missing image in column {column!r} (row {index}).")
    if isinstance(value, (list, tuple)):
        return [load_image(v, index, image_dir) for v in value]
    return load_image(value, index, image_dir)


__all__ = [
    "SEGMENT_TYPES",
    "text_segment",
    "vit_segment",
    "vae_segment",
    "text_to_image_sample",
    "edit_sample",
    "understanding_sample",
    "load_image",
    "validate_sample",
    "samples_from_rows",
]
