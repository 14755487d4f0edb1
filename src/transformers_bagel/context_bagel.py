"""Prefilled BAGEL contexts: several token sequences packed one after another in the single row of a transformers
`Cache`, and the step-invariant inputs of denoising against them."""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache


__all__ = ["BagelContext", "BagelContextSpan", "BranchKeys"]


@dataclass(frozen=True)
class BagelContextSpan:
    """
    One prefilled context of a [`BagelContext`]: its keys are `[start, start + length)` of the packed cache row, and
    the next token after it takes BAGEL position `next_position` (the original's "rope" counter).

    A context that is a prefix of another (the text-guidance context of an edit is the full context before its
    instruction) is a shorter span over the same keys: its tokens are prefilled once.
    """

    start: int
    length: int
    next_position: int

    @property
    def end(self) -> int:
        return self.start + self.length

    def shifted(self, offset: int) -> "BagelContextSpan":
        """The same context with its keys `offset` further along the cache row (see [`BagelContext.append_context`])."""
        return BagelContextSpan(self.start + offset, self.length, self.next_position)


@dataclass
class BranchKeys:
    """
    How the query rows of one denoising forward see the cache: row `r` attends to the keys of `spans[r]` and to its
    own block, nothing else. Rows whose spans have equal lengths form one group and share one attention call, so no
    row is padded to a longer context (attention "per length group": every call is a plain unmasked attention, which
    every backend runs at full speed).

    The cached keys and values of each group are read from the cache once, by [`~BranchKeys.gather`] (through the
    Cache API, so any Cache class works), and kept for every step: a step reads no cache and copies no context key
    (a group of one row holds views of the cache's tensors).
    """

    spans: tuple[BagelContextSpan, ...]
    groups: tuple[tuple[int, int, tuple[int, ...]], ...] = field(init=False)  # (first row, last row + 1, starts)
    context_key_values: list = field(init=False, default_factory=list)  # [layer][group] -> (keys, values) or None

    def __post_init__(self):
        groups, first = [], 0
        for row in range(1, len(self.spans) + 1):
            if row == len(self.spans) or self.spans[row].length != self.spans[first].length:
                groups.append((first, row, tuple(span.start for span in self.spans[first:row])))
                first = row
        self.groups = tuple(groups)

    def gather(self, cache: Cache, num_layers: int, empty_key: torch.Tensor, empty_value: torch.Tensor) -> None:
        """Reads every layer's context keys and values for each group. `empty_key` / `empty_value`: tensors of shape
        `(1, kv_heads, 0, head_dim)` in the cache's dtype (an update with no token returns the cached states)."""
        self.context_key_values = []
        needed = any(span.length for span in self.spans)
        for layer_idx in range(num_layers):
            keys, values = cache.update(empty_key, empty_value, layer_idx) if needed else (None, None)
            per_group = []
            for first, _, starts in self.groups:
                length = self.spans[first].length
                if not length:
                    per_group.append(None)
                    continue
                if len(starts) == 1:
                    per_group.append((keys[:, :, starts[0] : starts[0] + length], values[:, :, starts[0] : starts[0] + length]))
                else:
                    per_group.append((torch.cat([keys[:, :, s : s + length] for s in starts]),
                                      torch.cat([values[:, :, s : s + length] for s in starts])))  # fmt: skip
            self.context_key_values.append(per_group)


class BagelContext:
    """
    Prefilled contexts of one generation call, packed one after another in batch row 0 of a standard transformers
    [`~transformers.Cache`] (any class that implements the Cache API: `DynamicCache`, `StaticCache`, quantized or
    offloaded caches). A context is a [`BagelContextSpan`] of that row. Prefilling appends tokens to the last span
    (tokens of a context never see another context's keys); a denoising forward runs one query row per guidance branch,
    each attending to its own span, and leaves the cache as it was.

    The state BAGEL needs besides the keys lives here, not on the cache: the number of cached keys, and the
    step-invariant inputs of denoising (RoPE tables, expert routing, latent position embeddings, boundary ids), built on
    the first step for a given set of spans and reused by every later step.

    Args:
        cache (`Cache`, *optional*): the cache to fill; a new `DynamicCache` by default.
        batch_invariant (`bool`, defaults to `False`): denoise so that a row's result does not depend on the other
            rows of the forward, bit for bit on CPU: the two boundary tokens of each row get their linear layers as
            one small matmul per row instead of one over all rows (a matmul over few rows takes a kernel that rounds
            differently). It costs one read of those weights per row (a few percent of a step on CPU).
    """

    def __init__(self, cache: Cache | None = None, batch_invariant: bool = False):
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"`cache` must be a transformers Cache, got {type(cache).__name__}.")
        self.cache = cache if cache is not None else DynamicCache()
        self.batch_invariant = batch_invariant
        self.num_keys = 0
        self._step_inputs: dict = {}

    def new_span(self) -> BagelContextSpan:
        """An empty context placed after every cached key (its first token takes position 0)."""
        return BagelContextSpan(start=self.num_keys, length=0, next_position=0)

    def append_context(self, other: "BagelContext") -> int:
        """
        Appends every cached key and value of `other` (prefilled on its own) after this context's keys, through the
        Cache API, and returns the offset to add to the `start` of `other`'s spans ([`BagelContextSpan.shifted`]).

        A context prefilled alone and appended gives exactly the keys it has alone, whatever was cached before it;
        prefilling it into this context directly gives the same keys up to float rounding (its attention runs over
        the earlier contexts' keys, masked out). Batched generation appends each prompt's context this way, so a
        seeded image is the same whether it was generated alone or in a batch.
        """
        offset = self.num_keys
        if other.num_keys:
            for layer_idx, layer in enumerate(other.cache.layers):
                self.cache.update(layer.keys[:, :, : other.num_keys], layer.values[:, :, : other.num_keys], layer_idx)
            self.num_keys += other.num_keys
            self._step_inputs.clear()
        return offset

    def check_extendable(self, span: BagelContextSpan) -> None:
        if span.end != self.num_keys:
            raise ValueError(
                f"Only the last context of a BagelContext can grow: the span ends at key {span.end}, but the cache "
                f"holds {self.num_keys} keys. Start a new span with `context.new_span()`."
            )

    def step_inputs(self, key, build: Callable):
        """The memoised step-invariant inputs for `key` (spans, grid, device, dtype, backend), built once."""
        inputs = self._step_inputs.get(key)
        if inputs is None:
            inputs = self._step_inputs[key] = build()
        return inputs
