"""BAGEL's token layout (positions, image blocks, experts, derived from `input_ids`) and the text decoder's attention
mask: causal text, bidirectional image blocks, packed training samples, contexts packed in one cache row."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.cache_utils import Cache
from transformers.masking_utils import and_masks, create_causal_mask
from transformers.utils.generic import is_flash_attention_requested

from .configuration_bagel import BagelConfig, BagelTextConfig


__all__ = [
    "TokenLayout",
    "bagel_token_layout",
    "check_image_slots",
    "check_input_ids",
    "check_position_limit",
    "packed_sample_mask",
    "flash_attention_segments",
    "text_attention_mask",
]


@dataclass
class TokenLayout:
    """BAGEL's per-token structure, derived from `input_ids`."""

    position_ids: torch.LongTensor
    block_ids: torch.LongTensor
    gen_token_mask: torch.BoolTensor
    next_position: torch.LongTensor


def bagel_token_layout(
    input_ids: torch.LongTensor,
    config: BagelConfig,
    attention_mask: torch.Tensor | None = None,
    position_offset: torch.Tensor | int = 0,
    text_only: bool = False,
) -> TokenLayout:
    """
    Positions and image blocks of BAGEL: text tokens advance the position by one; an image block
    (`<|vision_start|>` ... `<|vision_end|>`, boundary tokens included) shares one position and advances it by one.
    Padding (attention_mask == 0) does not advance it.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, seq)`).
        config ([`BagelConfig`]).
        attention_mask (`torch.Tensor` of shape `(batch, seq)`, *optional*): 1 for real tokens.
        position_offset (`int` or `torch.Tensor` of shape `(batch,)`): position of the first token (a cached context's
            next position).
        text_only (`bool`, defaults to `False`): every token is text, whatever its id (tokens sampled by `generate`):
            no image blocks, no latent tokens, each token advances the position.
    """
    if text_only:
        is_start = is_end = is_latent = torch.zeros_like(input_ids, dtype=torch.bool)
    else:
        is_start = input_ids == config.start_of_image_token_id
        is_end = input_ids == config.end_of_image_token_id
        is_latent = input_ids == config.latent_token_id
    starts_so_far = is_start.long().cumsum(-1)
    ends_before = is_end.long().cumsum(-1) - is_end.long()
    inside = (starts_so_far - ends_before) > 0
    advance = (~inside | is_end).long()
    if attention_mask is not None:
        advance = advance * attention_mask[:, -input_ids.shape[1] :].long()
    offset = torch.as_tensor(position_offset, device=input_ids.device).reshape(-1, 1)
    running = advance.cumsum(-1)
    position_ids = running - advance + offset
    block_ids = torch.where(inside, starts_so_far, torch.full_like(starts_so_far, -1))
    return TokenLayout(
        position_ids=position_ids,
        block_ids=block_ids,
        gen_token_mask=is_latent,
        next_position=running[:, -1] + offset[:, 0] if input_ids.shape[1] else offset[:, 0].expand(input_ids.shape[0]),
    )


def check_input_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int, read_values: bool
) -> None:
    """Refuses ids the embedding table cannot hold and masks that do not fit them, before the embedding's
    IndexError or a broadcast error deep inside. Shapes and dtypes are always checked; the id values only with
    `read_values` (one read of two numbers from the device): not for the tokens `generate` sampled, which come
    from the model's own vocabulary, so that a decoding step reads nothing back."""
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be (batch, sequence), got shape {tuple(input_ids.shape)}.")
    if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise TypeError(f"`input_ids` must hold integer token ids, got {input_ids.dtype}.")
    if not input_ids.numel():
        raise ValueError(
            f"`input_ids` of shape {tuple(input_ids.shape)} holds no tokens: give at least one (a prompt from "
            "`processor.apply_chat_template(..., add_generation_prompt=True)` ends with `<|im_start|>`)."
        )
    if read_values:
        low, high = (int(value) for value in torch.stack(torch.aminmax(input_ids)).tolist())  # one host read
        if low < 0 or high >= vocab_size:
            raise ValueError(f"`input_ids` holds ids in [{low}, {high}], outside the vocabulary [0, {vocab_size}).")
    if attention_mask is not None and (
        attention_mask.dim() != 2
        or attention_mask.shape[0] != input_ids.shape[0]
        or attention_mask.shape[1] < input_ids.shape[1]
    ):
        raise ValueError(
            f"`attention_mask` of shape {tuple(attention_mask.shape)} does not fit `input_ids` of shape "
            f"{tuple(input_ids.shape)} (expected (batch, cached + new tokens))."
        )


def check_image_slots(input_ids: torch.LongTensor, token_id: int, sizes: list[int], what: str, name: str) -> None:
    """
    Refuses images whose token counts (`sizes`, from `name`) do not match the placeholder blocks of `input_ids`,
    block by block (one image per run of `token_id`, in order): not only the total, which a wrong grid or a wrong
    number of images can meet while giving every image the wrong patches. One read from the device (a prefill's,
    once per call).
    """
    edges = F.pad(input_ids == token_id, (1, 1)).to(torch.int8).diff(dim=1)  # +1 where a run starts, -1 after it
    starts, ends = (edges == 1).nonzero()[:, 1], (edges == -1).nonzero()[:, 1]
    runs = (ends - starts).tolist()
    if runs != sizes:
        raise ValueError(
            f"input_ids hold {len(runs)} {what} blocks of {runs} placeholder tokens (id {token_id}), but `{name}` "
            f"describes {len(sizes)} {what}s of {sizes} tokens; the processor's placeholders and the images must "
            "match."
        )


def check_position_limit(max_position: int, limit: int) -> None:
    """Refuses a sequence reaching position `max_position` with a position table of `limit` positions."""
    if max_position >= limit:
        raise ValueError(
            f"The sequence reaches position {max_position}, beyond the model's limit of {limit} positions "
            "(text_config.max_position_embeddings); shorten the prompt."
        )


def packed_sample_mask(
    layout: TokenLayout, document_ids: torch.LongTensor | None, noised_latent_images: torch.BoolTensor | None
) -> Callable:
    """
    Mask restriction for packed training sequences (combined with the causal mask and bidirectional image blocks):
    a token sees only tokens of its own sample, and a noised target image block is seen by no token outside it.
    """
    block_ids = layout.block_ids
    noise_block = torch.full_like(block_ids, -1)
    if noised_latent_images is not None and bool(noised_latent_images.any()):
        # The k-th latent block (in sequence order) holds the k-th latent image.
        latent_blocks = torch.unique_consecutive(block_ids[layout.gen_token_mask])
        if latent_blocks.numel() != noised_latent_images.numel():
            raise ValueError(
                f"noised_latent_images has {noised_latent_images.numel()} entries for {latent_blocks.numel()} latent "
                "image blocks."
            )
        noised_blocks = latent_blocks[noised_latent_images.to(latent_blocks.device)]
        is_noised = torch.isin(block_ids, noised_blocks)
        noise_block = torch.where(is_noised, block_ids, noise_block)
    documents = document_ids if document_ids is not None else torch.zeros_like(block_ids)

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        same_sample = documents[batch_idx, q_idx] == documents[batch_idx, kv_idx]
        kv_noise = noise_block[batch_idx, kv_idx]
        visible = (kv_noise < 0) | (kv_noise == block_ids[batch_idx, q_idx])
        return same_sample & visible

    return inner_mask


def _keys_from(key_start: int | list[int], past_seen: int, device) -> Callable:
    """Mask restriction: keys before `key_start` (other contexts of a packed cache row) are invisible; a list gives
    each new token its own first key (several contexts prefilled in one forward)."""
    if isinstance(key_start, int):

        def inside_span(batch_idx, head_idx, q_idx, kv_idx):
            return kv_idx >= key_start

        return inside_span
    starts = torch.tensor(key_start, device=device)

    def inside_own_span(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx >= starts[q_idx - past_seen]  # mask functions take absolute query indices

    return inside_own_span


def flash_attention_segments(
    block_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    past_seen: int,
    key_start: int | list[int],
    shape: tuple[int, int],
) -> list[tuple[int, int, int, int, int, bool]]:
    """
    BAGEL's attention as flash-attention calls without a mask, as the original runs it: each run of text tokens is
    causal and each image block is full, over every earlier key of its row (flash attention's bottom-right causal
    alignment), from `key_start` (one index, or one per new token: a run ends where it changes) and from the row's
    first unpadded key. Returns `(row, q_start, q_end, k_start, k_end, causal)` per segment, key indices in the
    cache's keys (`past_seen` cached tokens, then the new ones). Left padding only (as `generate` pads).
    """
    batch, length = shape
    ids = block_ids.tolist() if block_ids is not None else [[-1] * length for _ in range(batch)]
    starts = key_start if isinstance(key_start, list) else [key_start] * length
    valid = attention_mask.bool().tolist() if attention_mask is not None else None
    segments = []
    for row in range(batch):
        first_key = 0
        first_query = 0
        if valid is not None:
            row_valid = valid[row]
            if True not in row_valid:
                continue
            first_key = row_valid.index(True)
            if not all(row_valid[first_key:]):
                raise ValueError("flash_attention_2 takes left-padded inputs only (the attention mask has a gap).")
            first_query = max(0, first_key - (len(row_valid) - length))
        start = first_query
        while start < length:
            end = start + 1
            while end < length and ids[row][end] == ids[row][start] and starts[end] == starts[start]:
                end += 1
            segments.append((row, start, end, max(starts[start], first_key), past_seen + end, ids[row][start] < 0))
            start = end
    return segments


def text_attention_mask(
    config: BagelTextConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
    block_ids: torch.LongTensor | None = None,
    and_mask_function: Callable | None = None,
    key_start: int | list[int] = 0,
) -> tuple[torch.Tensor | None, dict]:
    """
    The text decoder's attention for new tokens after `cache`'s keys: causal text, bidirectional image blocks
    (`block_ids`, -1 for text), keys before `key_start` hidden (other contexts of a packed cache row), and an extra
    restriction `and_mask_function` (packed training samples). Returns the mask for the attention interface and the
    keyword arguments the layers' attention takes with it:

    - the new tokens are one image block that sees every key (an image prefilled alone, as the original prefills
      them): no mask, `is_causal=False`, an unmasked attention;
    - flash attention, which takes no mask: `segments` (see [`flash_attention_segments`]), one call per segment;
    - otherwise transformers' `create_causal_mask` with `block_sequence_ids`.
    """
    hides_keys = any(key_start) if isinstance(key_start, list) else bool(key_start)
    past_seen = int(cache.get_seq_length()) if cache is not None else 0
    if block_ids is not None and not bool((block_ids >= 0).any()):
        block_ids = None
    one_full_block = (
        block_ids is not None and not hides_keys and attention_mask is None and and_mask_function is None
        and bool((block_ids == block_ids[:, :1]).all())
        # and the cache returns only filled keys (a static cache returns its unused slots too, to be masked)
        and (cache is None or cache.get_mask_sizes(block_ids.shape[1], 0)[0] == past_seen + block_ids.shape[1])
    )  # fmt: skip
    if one_full_block:
        return None, {"is_causal": False}
    if is_flash_attention_requested(config) and (block_ids is not None or hides_keys or and_mask_function):
        # Flash attention takes no mask: the original's formulation, one call per segment (causal text runs, full
        # image blocks, bottom-right aligned over every earlier key).
        if and_mask_function is not None:
            raise ValueError(
                "flash_attention_2 cannot run packed training samples (per-sample and noised-image masks); use "
                "attn_implementation='sdpa' or 'flex_attention' for training."
            )
        return None, {"segments": flash_attention_segments(block_ids, attention_mask, past_seen, key_start,
                                                           inputs_embeds.shape[:2])}  # fmt: skip
    if hides_keys:
        hidden_keys = _keys_from(key_start, past_seen, inputs_embeds.device)
        and_mask_function = and_masks(*filter(None, (hidden_keys, and_mask_function)))
    if block_ids is not None and cache is not None:
        # The mask functions index blocks by absolute key position: cached tokens are never in a new block (and a
        # static cache's unused slots neither).
        kv_length = cache.get_mask_sizes(inputs_embeds.shape[1], 0)[0]
        before, after = past_seen, kv_length - past_seen - block_ids.shape[1]
        block_ids = torch.cat(
            [block_ids.new_full((block_ids.shape[0], before), -1), block_ids,
             block_ids.new_full((block_ids.shape[0], max(after, 0)), -1)], dim=1,
        )  # fmt: skip
    # position_ids=None on purpose: image blocks repeat one position, which transformers would mistake for packed
    # sequences.
    mask = create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=None,
        block_sequence_ids=block_ids,
        and_mask_function=and_mask_function,
    )
    return mask, {}
