"""
NaN / inf results refused instead of returned.

A model with a non-finite weight (a corrupt checkpoint, an overflowing float16 conversion) or non-finite inputs gives
NaN logits and latents: greedy decoding then picks token 0 for ever and the VAE decodes a black image, without any
error. The checks here run once per generation (one device synchronisation), and only when they fail do they look for
the parameters to blame.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.generation import LogitsProcessor


__all__ = ["non_finite_parameters", "non_finite_message", "FiniteLogitsCheck"]


def non_finite_parameters(module: nn.Module, limit: int = 3) -> list[str]:
    """Names of (at most `limit`) parameters and buffers of `module` holding NaN or infinite values."""
    found = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found.append(name)
            if len(found) >= limit:
                break
    return found


def non_finite_message(what: str, module: nn.Module, component: str) -> str:
    """The error message for non-finite `what`, naming the parameters of `module` (the `component`) to blame."""
    names = non_finite_parameters(module)
    if names:
        cause = f"the {component}'s weights hold NaN or inf ({', '.join(names)}): the checkpoint is corrupt"
    else:
        cause = (
            f"the {component}'s weights are finite, so an input holds NaN / inf or its dtype overflows "
            "(float16: load in bfloat16 or float32)"
        )
    return f"{what} NaN or infinite values: {cause}."


class FiniteLogitsCheck(LogitsProcessor):
    """
    Raises `RuntimeError` when the logits of the first generated token hold NaN or +inf (-inf is how other logits
    processors mask tokens). Checked once: later steps would cost a device synchronisation each, and non-finite
    weights or inputs already show at the first.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.checked = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.checked:
            self.checked = True
            if not bool((scores < float("inf")).all()):  # False for NaN and +inf
                raise RuntimeError(non_finite_message("The model's logits hold", self.model, "model"))
        return scores
