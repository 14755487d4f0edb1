"""BagelDataCollator: packs several samples into one padding-free training sequence, as the original PackedDataset."""

import random
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from transformers.utils import logging

from ..configuration_bagel import BagelConfig
from .samples import load_image, validate_sample


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


class BagelDataCollator:
    """
    Packs a list of samples (see `transformers_bagel.training.samples`) into ONE sequence of shape `(1, total_tokens)`
    with no padding: each sample attends only to itself (`document_ids`), text is causal, clean image blocks are
    bidirectional, and noised target images are invisible to every other token and do not advance the position
    counter. Use it with `Trainer(..., data_collator=collator)` and `TrainingArguments(remove_unused_columns=False)`.

    Args:
        processor ([`BagelProcessor`]): tokenizer and image processor (its VAE and ViT sizes are used).
        config ([`BagelConfig`]): the model config (special tokens, position tables).
        max_tokens (`int`, *optional*): token budget of one packed batch; a sample longer than it, or a batch that
            exceeds it, is refused (use [`pack_samples`] to group samples under the budget).
        text_cond_dropout_prob, vit_cond_dropout_prob, vae_cond_dropout_prob (`float`): probability of dropping a
            segment marked `enable_cfg` (the original training script's defaults: 0.1, 0.3, 0.3).
        seed (`int`, *optional*): seed of the dropout draws, for reproducible batches.

    The returned batch holds `input_ids`, `position_ids`, `document_ids`, `labels` and, when present, `pixel_values`,
    `image_grid_hw` (ViT), `latent_grid_hw`, `noised_latent_images` and either `latents` (from a latent cache) or
    `vae_pixel_values` (to be encoded by the VAE in the training step, see [`BagelTrainer`]).
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
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if max_tokens is not None and max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}.")
        self.processor = processor
        self.config = config
        self.max_tokens = max_tokens
        self.dropout = {"text": text_cond_dropout_prob, "vit_image": vit_cond_dropout_prob, "vae_image": vae_cond_dropout_prob}
        self.rng = random.Random(seed)

    # -- sizes ------------------------------------------------------------------------------------------------------

    def _vae_size(self, image) -> tuple[int, int]:
        resized = self.processor.image_processor.vae_resize(image)
        return resized.height, resized.width

    def num_tokens(self, sample: dict) -> int:
        """Tokens the sample takes in a packed sequence (before condition dropout)."""
        total = 0
        for segment in sample["segments"]:
            if segment["type"] == "text":
                total += len(self.processor.tokenizer.encode(segment["text"], add_special_tokens=False)) + 2
            elif segment["type"] == "vit_image":
                image = load_image(segment["image"], sample.get("row"))
                gh, gw = self.processor.image_processor.num_vit_patches(image.height, image.width, resize_with_vae_rule_first=False)
                total += gh * gw + 2
            else:
                h, w = self._latent_grid(segment, sample.get("row"))
                total += h * w + 2
        return total

    def _latent_grid(self, segment, row) -> tuple[int, int]:
        p = self.config.latent_patch_size
        if segment.get("latents") is not None:
            latents = torch.as_tensor(segment["latents"])
            return latents.shape[-2] // p, latents.shape[-1] // p
        height, width = self._vae_size(load_image(segment["image"], row))
        return height // self.config.latent_downsample, width // self.config.latent_downsample

    # -- packing ----------------------------------------------------------------------------------------------------

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if isinstance(samples, dict):
            samples = [samples]
        if len(samples) == 1 and isinstance(samples[0], list):  # a pack from pack_samples
            samples = samples[0]
        config = self.config
        tokenizer = self.processor.tokenizer
        image_processor = self.processor.image_processor

        input_ids, positions, labels, documents = [], [], [], []
        vit_images, vae_images, cached_latents, latent_grids, noised = [], [], [], [], []
        for doc, sample in enumerate(samples):
            validate_sample(sample)
            row = sample.get("row", doc)
            where = f" (row {row})"
            rope = 0
            start = len(input_ids)
            for segment in sample["segments"]:
                kind = segment["type"]
                droppable = segment.get("enable_cfg", False) and not segment.get("loss", False)
                if droppable and self.rng.random() < self.dropout[kind]:
                    if kind != "text":
                        rope += 1  # a dropped image still advances the position, as the original
                    continue
                if kind == "text":
                    ids = tokenizer.encode(segment["text"], add_special_tokens=False)
                    tokens = [config.bos_token_id] + ids + [config.eos_token_id]
                    input_ids += tokens
                    positions += list(range(rope, rope + len(tokens)))
                    labels += [IGNORE_INDEX] + (ids + [config.eos_token_id] if segment.get("loss") else [IGNORE_INDEX] * (len(ids) + 1))
                    rope += len(tokens)
                elif kind == "vit_image":
                    image = load_image(segment["image"], row)
                    gh, gw = image_processor.num_vit_patches(image.height, image.width, resize_with_vae_rule_first=False)
                    side = config.vit_max_num_patch_per_side
                    if gh > side or gw > side:
                        raise ValueError(f"A ViT image of {gh}x{gw} patches exceeds the {side}x{side} table{where}.")
                    vit_images.append(image)
                    tokens = [config.start_of_image_token_id] + [config.image_token_id] * (gh * gw)
                    tokens += [config.end_of_image_token_id]
                    input_ids += tokens
                    positions += [rope] * len(tokens)
                    labels += [IGNORE_INDEX] * len(tokens)
                    rope += 1
                else:
                    h, w = self._latent_grid(segment, row)
                    side = config.max_latent_size
                    if h > side or w > side:
                        raise ValueError(
                            f"A target/VAE image of {h}x{w} latent tokens exceeds the latent position table "
                            f"({side}x{side}, i.e. {config.max_image_size}px per side){where}."
                        )
                    if segment.get("latents") is not None:
                        cached_latents.append(torch.as_tensor(segment["latents"], dtype=torch.float32))
                        vae_images.append(None)
                    else:
                        vae_images.append(image_processor.vae_resize(load_image(segment["image"], row)))
                        cached_latents.append(None)
                    latent_grids.append((h, w))
                    is_target = bool(segment.get("loss", False))
                    noised.append(is_target)
                    tokens = [config.start_of_image_token_id] + [config.latent_token_id] * (h * w)
                    tokens += [config.end_of_image_token_id]
                    input_ids += tokens
                    positions += [rope] * len(tokens)
                    labels += [IGNORE_INDEX] * len(tokens)
                    if not is_target:
                        rope += 1  # a noised target does not advance the position
            length = len(input_ids) - start
            documents += [doc] * length
            if self.max_tokens is not None and length > self.max_tokens:
                raise ValueError(f"A sample of {length} tokens is longer than the token budget {self.max_tokens}{where}.")
        if self.max_tokens is not None and len(input_ids) > self.max_tokens:
            raise ValueError(
                f"The batch packs {len(input_ids)} tokens, over the budget of {self.max_tokens}; group samples with "
                "`pack_samples` or lower the batch size."
            )

        batch = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "document_ids": torch.tensor([documents], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
        }
        if vit_images:
            vit = image_processor.preprocess(vit_images, return_tensors="pt", resize_with_vae_rule_first=False)
            batch["pixel_values"] = vit["pixel_values"]
            batch["image_grid_hw"] = vit["image_grid_hw"]
        if latent_grids:
            batch["latent_grid_hw"] = torch.tensor(latent_grids, dtype=torch.long)
            batch["noised_latent_images"] = torch.tensor(noised, dtype=torch.bool)
            if all(latent is not None for latent in cached_latents):
                p = config.latent_patch_size
                from ..modeling_bagel import pack_latents

                batch["latents"] = torch.cat([pack_latents(latent[None], p)[0] for latent in cached_latents])
            elif all(image is not None for image in vae_images):
                batch["vae_pixel_values"] = pad_images(
                    image_processor.preprocess_vae(vae_images, return_tensors="pt")["vae_pixel_values"]
                )
            else:
                raise ValueError("A batch mixes cached latents and raw VAE images; cache all or none.")
        return batch


def pad_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Zero-pads `(3, H, W)` images to one `(N, 3, H_max, W_max)` batch, as the original encodes them."""
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    return torch.stack([F.pad(image, (0, width - image.shape[2], 0, height - image.shape[1])) for image in images])


def pack_samples(samples: Iterable[dict], collator: BagelDataCollator, max_tokens: int) -> Iterator[list[dict]]:
    """Groups samples greedily, in order, into packs of at most `max_tokens` tokens (one pack = one training batch).
    A sample longer than the budget is refused, naming its row."""
    pack, used = [], 0
    for index, sample in enumerate(samples):
        length = collator.num_tokens(sample)
        if length > max_tokens:
            raise ValueError(f"A sample of {length} tokens is longer than the token budget {max_tokens} (row {sample.get('row', index)}).")
        if used + length > max_tokens and pack:
            yield pack
            pack, used = [], 0
        pack.append(sample)
        used += length
    if pack:
        yield pack


__all__ = ["BagelDataCollator", "pack_samples", "pad_images", "IGNORE_INDEX"]
