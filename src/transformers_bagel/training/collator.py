"""
[`BagelDataCollator`]: packs samples (see `transformers_bagel.training.samples`) into one padding-free training
sequence, the way the original `PackedDataset.pack_sequence` does, and [`BagelPackedDataset`], which groups samples
under a token budget so that one dataset item is one packed batch.

```python
from transformers_bagel.training import BagelDataCollator, BagelPackedDataset, BagelSampleDataset

collator = BagelDataCollator(processor, model.config, max_tokens=8192)
train_dataset = BagelPackedDataset(BagelSampleDataset(rows, task="text_to_image"), collator)   # one item = one pack
trainer = BagelTrainer(model=model, args=bagel_training_arguments("out"), train_dataset=train_dataset,
                       data_collator=collator, vae=vae)
```
"""

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from transformers.utils import logging

from ..configuration_bagel import BagelConfig
from ..modeling_bagel import pack_latents
from ..sequence_layout import IGNORE_INDEX, BagelSequence
from .samples import load_image, validate_sample


logger = logging.get_logger(__name__)


class BagelDataCollator:
    """
    Packs a list of samples into ONE sequence of shape `(1, total_tokens)` with no padding:

    - samples are block-diagonal (`document_ids`): a token attends only to tokens of its own sample;
    - text is causal; a clean image block (ViT or VAE, boundary tokens included) is bidirectional and shares one
      position; a noised target image is seen by no other token and does not advance the position counter;
    - labels are aligned with `input_ids` (transformers convention: the logits at `i` predict `labels[i + 1]`); a text
      segment with a loss labels its tokens and its `<|im_end|>`, which is exactly the original's
      `ce_loss_indexes` / `packed_label_ids`;
    - a segment with `special_token_loss` (the original's flag) also makes its closing token (`<|im_end|>` /
      `<|vision_end|>`) a CE position: the label of the token after it is set to the segment's
      `special_token_label` (default: that next token, the opening token of the following segment). Without the flag
      the labels are unchanged.

    Segments marked `enable_cfg` are dropped with the text / ViT / VAE condition-dropout probabilities (classifier-free
    guidance training). Use it with `Trainer(..., data_collator=collator)` and
    `TrainingArguments(remove_unused_columns=False)`.

    Args:
        processor ([`BagelProcessor`]): tokenizer and image processor.
        config ([`BagelConfig`]): the model config (special tokens, position tables, latent patch size).
        max_tokens (`int`, *optional*): token budget of one packed batch. A sample or a batch over it is refused
            (group samples with [`BagelPackedDataset`]).
        text_cond_dropout_prob, vit_cond_dropout_prob, vae_cond_dropout_prob (`float`, defaults to 0.1, 0.3, 0.3):
            drop probabilities of droppable segments (the original training script's values).
        seed (`int`, *optional*): with a seed, each sample's dropout draws depend only on `(seed, epoch, row)`, so
            batches are reproducible and a resumed run sees the same dropout as an uninterrupted one ([`BagelTrainer`]
            calls [`~BagelDataCollator.set_epoch`]). Without one, Python's global `random` is used, as the original.

    Returns (from `__call__`) a dict of tensors: `input_ids`, `position_ids`, `document_ids`, `labels`; with ViT
    images `pixel_values`, `image_grid_hw`; with VAE images `latent_grid_hw`, `noised_latent_images` and one of
    `vae_pixel_values` (zero-padded `(N, 3, H, W)` batch to encode in the training step), `vae_moments` (padded
    `(N, 2 * C, H / 8, W / 8)` posterior parameters from the latent cache) or `latents` (packed clean latents, when the
    samples carry fixed `"latents"` of shape `(C, H / 8, W / 8)`).
    """

    def __init__(
        self,
        processor,
        config: BagelConfig,
        max_tokens: int | None = None,
        text_cond_dropout_prob: float = 0.1,
        vit_cond_dropout_prob: float = 0.3,
        vae_cond_dropout_prob: float = 0.3,
        seed: int | None = None,
    ):
        for name, value in (
            ("text_cond_dropout_prob", text_cond_dropout_prob),
            ("vit_cond_dropout_prob", vit_cond_dropout_prob),
            ("vae_cond_dropout_prob", vae_cond_dropout_prob),
        ):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}.")
        self.processor = processor
        self.config = config
        self.max_tokens = max_tokens
        self.dropout = {
            "text": text_cond_dropout_prob,
            "vit_image": vit_cond_dropout_prob,
            "vae_image": vae_cond_dropout_prob,
        }
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        """Sets the epoch that, with the seed and the row, keys the condition-dropout draws."""
        self.epoch = int(epoch)

    def _rng(self, row, ordinal: int):
        if self.seed is None:
            return random
        return random.Random(f"{self.seed}:{self.epoch}:{row if row is not None else f'#{ordinal}'}")

    # -- sizes ------------------------------------------------------------------------------------------------------

    def _vit_grid(self, image) -> tuple[int, int]:
        return self.processor.image_processor.num_vit_patches(image.height, image.width, resize_with_vae_rule_first=False)

    def _latent_grid(self, segment: dict, row) -> tuple[int, int]:
        p = self.config.latent_patch_size
        for key, channels in (("latents", self.config.latent_channels), ("vae_moments", 2 * self.config.latent_channels)):
            if segment.get(key) is not None:
                shape = tuple(np.shape(segment[key]))
                if len(shape) != 3 or shape[0] != channels or shape[1] % p or shape[2] % p:
                    raise ValueError(
                        f"A vae_image's {key!r} must have shape ({channels}, H, W) with H and W multiples of {p}, got "
                        f"{shape} (row {row})."
                    )
                return shape[1] // p, shape[2] // p
        image = load_image(segment["image"], row)
        width, height = self.processor.image_processor.get_resize_size(image.width, image.height, "vae")
        return height // self.config.latent_downsample, width // self.config.latent_downsample

    def num_tokens(self, sample: dict) -> int:
        """Tokens the sample takes in a packed sequence when nothing is dropped."""
        row = sample.get("row")
        total = 0
        for segment in validate_sample(sample)["segments"]:
            if segment["type"] == "text":
                total += len(self.processor.tokenizer.encode(segment["text"], add_special_tokens=False)) + 2
            elif segment["type"] == "vit_image":
                rows, cols = self._vit_grid(load_image(segment["image"], row))
                total += rows * cols + 2
            else:
                h, w = self._latent_grid(segment, row)
                total += h * w + 2
        return total

    # -- packing ----------------------------------------------------------------------------------------------------

    def __call__(self, samples: Sequence[dict] | dict) -> dict[str, torch.Tensor]:
        if isinstance(samples, dict):
            samples = [samples]
        if any(isinstance(item, (list, tuple)) for item in samples):  # items of BagelPackedDataset: packs
            samples = [sample for item in samples for sample in (item if isinstance(item, (list, tuple)) else [item])]
        if not samples:
            raise ValueError("Got no samples to pack.")
        config = self.config

        input_ids, positions, labels, documents = [], [], [], []
        vit_images, vae_inputs, latent_grids, noised = [], [], [], []
        for doc, sample in enumerate(samples):
            validate_sample(sample)
            row = sample.get("row")
            where = f" (row {row})" if row is not None else f" (sample {doc} of the batch)"
            rng = self._rng(row, doc)
            sequence = BagelSequence(config)
            special = []  # (label slot, requested label) of the segments with special_token_loss
            for segment in sample["segments"]:
                kind = segment["type"]
                if segment.get("enable_cfg", False) and rng.random() < self.dropout[kind]:
                    if kind != "text":
                        sequence.skip_image()
                    continue
                if kind == "text":
                    ids = self.processor.encode_text(segment["text"])
                    sequence.add_text(ids, loss=bool(segment.get("loss", False)))
                    self._mark_special(segment, sequence, special, where)
                    continue
                if kind == "vit_image":
                    image = load_image(segment["image"], row)
                    rows, cols = self._vit_grid(image)
                    side = config.vit_max_num_patch_per_side
                    if rows > side or cols > side:
                        raise ValueError(f"A ViT image of {rows}x{cols} patches exceeds the {side}x{side} table{where}.")
                    vit_images.append(image)
                    sequence.add_image(rows * cols, latent=False)
                    self._mark_special(segment, sequence, special, where)
                    continue
                h, w = self._latent_grid(segment, row)
                side = config.max_latent_size
                if h > side or w > side:
                    raise ValueError(
                        f"A VAE image of {h}x{w} latent tokens exceeds the latent position table ({side}x{side} "
                        f"tokens, {config.max_image_size}px per side){where}; use smaller images or lower the "
                        "image processor's vae_max_image_size."
                    )
                vae_inputs.append(self._vae_input(segment, row))
                latent_grids.append((h, w))
                is_target = bool(segment.get("loss", False))
                noised.append(is_target)
                sequence.add_image(h * w, latent=True, noised=is_target)
                self._mark_special(segment, sequence, special, where)
            self._apply_special(sequence, special, where)
            input_ids += sequence.input_ids
            positions += sequence.position_ids
            labels += sequence.labels
            documents += [doc] * len(sequence)
            if self.max_tokens is not None and len(sequence) > self.max_tokens:
                raise ValueError(
                    f"A sample of {len(sequence)} tokens is longer than the token budget of {self.max_tokens}{where}."
                )
        if self.max_tokens is not None and len(input_ids) > self.max_tokens:
            raise ValueError(
                f"The batch packs {len(input_ids)} tokens, over the budget of {self.max_tokens}: group samples with "
                "`BagelPackedDataset` (one item = one pack, per_device_train_batch_size=1) or lower the batch size."
            )

        batch = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "document_ids": torch.tensor([documents], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
        }
        if vit_images:
            vit = self.processor.image_processor.preprocess(vit_images, return_tensors="pt", resize_with_vae_rule_first=False)
            batch["pixel_values"] = vit["pixel_values"]
            batch["image_grid_hw"] = vit["image_grid_hw"]
        if latent_grids:
            batch["latent_grid_hw"] = torch.tensor(latent_grids, dtype=torch.long)
            batch["noised_latent_images"] = torch.tensor(noised, dtype=torch.bool)
            batch.update(self._latent_inputs(vae_inputs))
        return batch

    # -- special-token loss -----------------------------------------------------------------------------------------

    def _token_id(self, label, where: str) -> int:
        if isinstance(label, str):
            token_id = self.processor.tokenizer.convert_tokens_to_ids(label)
            if token_id is None or token_id == self.processor.tokenizer.unk_token_id:
                raise ValueError(f"special_token_label {label!r} is not a token of the tokenizer{where}.")
            return int(token_id)
        vocab = self.config.text_config.vocab_size
        if not 0 <= int(label) < vocab:
            raise ValueError(f"special_token_label {label} is outside the vocabulary (0..{vocab - 1}){where}.")
        return int(label)

    def _mark_special(self, segment: dict, sequence: BagelSequence, special: list, where: str):
        """Right after a kept segment is added its closing token is the last one: the slot after it is labelled."""
        if segment.get("special_token_loss"):
            label = segment.get("special_token_label")
            special.append((len(sequence), None if label is None else self._token_id(label, where)))

    def _apply_special(self, sequence: BagelSequence, special: list, where: str):
        for slot, label in special:
            if slot >= len(sequence):
                logger.warning_once(
                    f"A special_token_loss segment is the last one kept in its sample{where} (condition dropout "
                    "removed what followed): its closing token has no next token, so that label is skipped."
                )
                continue
            if sequence.labels[slot] != IGNORE_INDEX:  # cannot happen: every segment opens with an unlabelled token
                raise ValueError(f"The special-token label would overwrite a text label{where}.")
            sequence.labels[slot] = sequence.input_ids[slot] if label is None else label

    def _vae_input(self, segment: dict, row) -> tuple[str, object]:
        if segment.get("latents") is not None:
            return "latents", torch.as_tensor(np.asarray(segment["latents"], dtype=np.float32))
        if segment.get("vae_moments") is not None:
            return "vae_moments", torch.as_tensor(np.asarray(segment["vae_moments"], dtype=np.float32))
        return "image", load_image(segment["image"], row)

    def _latent_inputs(self, vae_inputs: list[tuple[str, object]]) -> dict[str, torch.Tensor]:
        kinds = {kind for kind, _ in vae_inputs}
        if len(kinds) > 1:
            raise ValueError(
                f"A batch mixes VAE inputs of different kinds ({sorted(kinds)}): cache the latents of every row or of "
                "none (`cache_vae_latents`)."
            )
        kind = kinds.pop()
        values = [value for _, value in vae_inputs]
        if kind == "latents":
            p = self.config.latent_patch_size
            return {"latents": torch.cat([pack_latents(latent[None], p)[0] for latent in values])}
        if kind == "vae_moments":
            return {"vae_moments": pad_images(values)}
        pixels = self.processor.image_processor.preprocess_vae(values, return_tensors="pt")["vae_pixel_values"]
        return {"vae_pixel_values": pad_images(pixels)}


def pad_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Zero-pads `(C, H, W)` tensors at the bottom and right into one `(N, C, H_max, W_max)` batch, as the original
    pads its VAE inputs."""
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    return torch.stack([F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2])) for image in images])


class BagelPackedDataset(torch.utils.data.Dataset):
    """
    Groups the samples of `dataset` greedily, in order, into packs of at most `max_tokens` tokens; one item is one
    pack (a list of samples) for [`BagelDataCollator`], so train with `per_device_train_batch_size=1`. The lengths are
    measured once, up front (images are decoded then); a sample longer than the budget is refused, naming its row.

    Args:
        dataset: a map-style dataset of samples (e.g. [`BagelSampleDataset`]).
        collator ([`BagelDataCollator`]): measures the samples.
        max_tokens (`int`, *optional*): the budget; defaults to `collator.max_tokens`.
    """

    def __init__(self, dataset, collator: BagelDataCollator, max_tokens: int | None = None):
        max_tokens = max_tokens or collator.max_tokens
        if not max_tokens or max_tokens <= 0:
            raise ValueError("BagelPackedDataset needs a positive token budget (`max_tokens` or `collator.max_tokens`).")
        self.dataset = dataset
        self.max_tokens = max_tokens
        self.packs: list[list[int]] = []
        self.lengths: list[int] = []
        pack, used = [], 0
        for index in range(len(dataset)):
            sample = dataset[index]
            length = collator.num_tokens(sample)
            if length > max_tokens:
                row = sample.get("row", index)
                raise ValueError(f"A sample of {length} tokens is longer than the token budget of {max_tokens} (row {row}).")
            if pack and used + length > max_tokens:
                self.packs.append(pack)
                self.lengths.append(used)
                pack, used = [], 0
            pack.append(index)
            used += length
        if pack:
            self.packs.append(pack)
            self.lengths.append(used)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.dataset[i] for i in self.packs[index]]


__all__ = ["BagelDataCollator", "BagelPackedDataset", "pad_images", "IGNORE_INDEX"]
