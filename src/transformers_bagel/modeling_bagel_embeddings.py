"""BAGEL's input modules outside the decoder: the fixed 2-D sin-cos position tables, the flow-time embedder, the ViT
connector, and the packing of VAE latents into latent tokens."""

import numpy as np
import torch
from torch import nn
from transformers.activations import ACT2FN


__all__ = [
    "BagelConnector",
    "BagelPositionEmbedding",
    "BagelTimestepEmbedder",
    "pack_latents",
    "sincos_2d_position_table",
    "unpack_latents",
]


def pack_latents(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(batch, channels, H, W)` VAE latents -> `(batch, (H/p) * (W/p), p * p * channels)` tokens in BAGEL's
    `(h, w, p, q, c)` order."""
    batch, channels, height, width = latents.shape
    p = patch_size
    tokens = latents.reshape(batch, channels, height // p, p, width // p, p)
    return tokens.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)


def unpack_latents(tokens: torch.Tensor, grid_hw: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Inverse of [`pack_latents`]: `(batch, h * w, p * p * channels)` -> `(batch, channels, h * p, w * p)`."""
    batch = tokens.shape[0]
    (h, w), p = grid_hw, patch_size
    channels = tokens.shape[-1] // (p * p)
    latents = tokens.reshape(batch, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return latents.reshape(batch, channels, h * p, w * p)


def sincos_2d_position_table(hidden_size: int, side: int) -> torch.Tensor:
    """
    Fixed 2-D sin-cos table of shape `(side * side, hidden_size)` for positions `row * side + col`: the first half of
    the features encodes the column, the second half the row, each as `[sin, cos]` over 10000^(-2i/d) frequencies
    (computed in float64 like the original's numpy code, returned as float32).
    """
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32), indexing="ij")

    def encode(coords):
        angles = np.einsum("m,d->md", coords.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return torch.from_numpy(np.concatenate([encode(cols), encode(rows)], axis=1)).float()


class BagelPositionEmbedding(nn.Module):
    """
    Fixed 2-D sin-cos table indexed by flattened 2-D ids. A persistent buffer: it is saved with the weights under the
    release's key (`*.pos_embed`), and unlike a frozen parameter it cannot become trainable again (loading resets a
    parameter's `requires_grad`) or reach an optimiser or a LoRA / FSDP wrapper.
    """

    def __init__(self, side: int, hidden_size: int):
        super().__init__()
        self.side = side
        self.hidden_size = hidden_size
        self.register_buffer("pos_embed", torch.zeros(side * side, hidden_size), persistent=True)

    def forward(self, position_ids: torch.LongTensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class BagelTimestepEmbedder(nn.Module):
    """DiT-style embedding of flow time t in [0, 1]: a 256-d `[cos, sin]` sinusoid, then Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def sinusoid(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        exponent = -np.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
        angles = timesteps.float()[:, None] * torch.exp(exponent)[None]
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if self.frequency_embedding_size % 2:
            embedding = torch.nn.functional.pad(embedding, (0, 1))
        return embedding

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(timesteps).to(self.mlp[0].weight.dtype))


class BagelConnector(nn.Module):
    """MLP from ViT features to the decoder width: fc1 -> activation -> fc2."""

    def __init__(self, in_features: int, out_features: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[activation]
        self.fc2 = nn.Linear(out_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))
