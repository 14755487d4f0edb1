"""SigLIP NaViT encoder used by BAGEL for understanding: variable-size images, no padding to a square."""

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import SiglipVisionConfig
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipEncoder, SiglipEncoderLayer, SiglipMLP
from transformers.utils import logging


logger = logging.get_logger(__name__)


def patch_grids(image_grid_hw) -> list[tuple[int, int]]:
    """The (rows, columns) of each image of `image_grid_hw`, refusing anything but an integer `(num_images, 2)`
    tensor of grids of at least 1x1 (read from the device once)."""
    if (
        not isinstance(image_grid_hw, torch.Tensor)
        or image_grid_hw.dim() != 2
        or image_grid_hw.shape[-1] != 2
        or image_grid_hw.is_floating_point()
    ):
        described = (
            f"{image_grid_hw.dtype} tensor of shape {tuple(image_grid_hw.shape)}"
            if isinstance(image_grid_hw, torch.Tensor)
            else type(image_grid_hw).__name__
        )
        raise ValueError(f"image_grid_hw must be an integer tensor of shape (num_images, 2), got a {described}.")
    grids = [(int(rows), int(cols)) for rows, cols in image_grid_hw.tolist()]
    if any(rows < 1 or cols < 1 for rows, cols in grids):
        raise ValueError(f"image_grid_hw holds a patch grid below 1x1: {[list(grid) for grid in grids]}.")
    return grids


def flattened_grid_position_ids(
    grid_hw: torch.Tensor, max_side: int, interpolate: bool = False, device=None
) -> torch.Tensor:
    """
    2-D position ids of every patch of every image, flattened into one index of a `max_side x max_side` table.

    Args:
        grid_hw (`torch.Tensor` of shape `(num_images, 2)`): patch grid (rows, columns) of each image.
        max_side (`int`): side of the position table.
        interpolate (`bool`): `False` gives `row * max_side + col` (BAGEL's default, "extrapolate");
            `True` maps fractional coordinates onto the table by bucketing.

    Returns:
        `torch.LongTensor` of shape `(sum(rows * cols),)`, images concatenated in order.
    """
    device = device if device is not None else grid_hw.device
    return grid_position_ids(patch_grids(grid_hw), max_side, interpolate, device)


def grid_position_ids(grids: list[tuple[int, int]], max_side: int, interpolate: bool, device) -> torch.Tensor:
    """[`flattened_grid_position_ids`] of grids known on the host, as `(rows, columns)` pairs: nothing is read from
    the device."""
    ids = []
    for rows, cols in grids:
        if rows > max_side or cols > max_side:
            raise ValueError(
                f"An image of {rows}x{cols} patches does not fit the {max_side}x{max_side} position table; "
                "resize it to a smaller size."
            )
        if interpolate:
            boundaries = torch.arange(1 / max_side, 1.0, 1 / max_side, device=device)
            row_ids = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / rows, device=device), boundaries, right=True)
            col_ids = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / cols, device=device), boundaries, right=True)
        else:
            row_ids = torch.arange(rows, device=device)
            col_ids = torch.arange(cols, device=device)
        ids.append((row_ids[:, None] * max_side + col_ids[None, :]).flatten())
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device)


def in_tree_initialize_weights(parent, module) -> None:
    """
    `PreTrainedModel._initialize_weights` as transformers runs it for its own models. For code outside transformers
    it skips every module without parameters of its own (a guard for remote code that writes weights in place), so the
    rules written for containers (attention, MLP, embeddings) would never run. BAGEL's `_init_weights` writes only
    through `transformers.initialization`, which leaves loaded weights alone, so the guard is not needed.
    """
    parent._initialize_weights(module, is_custom_code=False)


class BagelVisionEmbeddings(nn.Module):
    """
    Patch embedding as a linear layer over already-patchified pixels (flatten order `(p, q, c)`), plus SigLIP's learned
    position table indexed by 2-D position ids. The release stores the patch embedding this way (a convolution
    reshaped into a matrix), so no conversion happens at load time.
    """

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.num_patches_per_side = config.image_size // config.patch_size
        patch_dim = config.num_channels * config.patch_size**2
        self.patch_embedding = nn.Linear(patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.LongTensor) -> torch.Tensor:
        patch_embeds = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return patch_embeds + self.position_embedding(position_ids)


class BagelVisionPreTrainedModel(PreTrainedModel):
    config: SiglipVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SiglipEncoderLayer"]
    _supports_flash_attn = True  # images are packed with a key-padding mask: flash attention unpads it (varlen)
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": SiglipEncoderLayer, "attentions": SiglipAttention}

    @torch.no_grad()
    def _init_weights(self, module):
        """SigLIP's rules: LeCun-normal linear layers (the patch embedding included) with zero biases, the position
        table with std `hidden_size**-0.5`, Xavier-uniform attention and MLP weights, MLP biases of std 1e-6, unit
        LayerNorms. Leaves first, then their containers (transformers' order), so a container's rule wins."""
        if isinstance(module, nn.Linear):
            init.lecun_normal_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, BagelVisionEmbeddings):
            init.normal_(module.position_embedding.weight, std=self.config.hidden_size**-0.5)
        elif isinstance(module, SiglipAttention):
            for proj in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                init.xavier_uniform_(proj.weight)
                init.zeros_(proj.bias)
        elif isinstance(module, SiglipMLP):
            for fc in (module.fc1, module.fc2):
                init.xavier_uniform_(fc.weight)
                init.normal_(fc.bias, std=1e-6)

    def _initialize_weights(self, module, is_custom_code: bool = False):
        in_tree_initialize_weights(super(), module)


class BagelVisionModel(BagelVisionPreTrainedModel):
    """
    SigLIP encoder over packed variable-size images. Each image attends only to its own patches; images are run side
    by side with a key-padding mask (no resize to a square, no cross-image attention), like the original's varlen
    flash-attention.
    """

    def __init__(self, config: SiglipVisionConfig):
        super().__init__(config)
        self.embeddings = BagelVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def check_patches(self, pixel_values: torch.Tensor, image_grid_hw: torch.LongTensor) -> list[int]:
        """The number of patches of each image, refusing `pixel_values` that are not packed patches of this encoder or
        whose count differs from what `image_grid_hw` describes."""
        patch_dim = self.config.num_channels * self.config.patch_size**2
        if pixel_values.dim() != 2 or pixel_values.shape[-1] != patch_dim:
            raise ValueError(
                f"pixel_values must be packed patches of shape (total_patches, {patch_dim}) (num_channels x "
                f"patch_size**2), as BagelImageProcessor returns them; got {tuple(pixel_values.shape)}."
            )
        lengths = [rows * cols for rows, cols in patch_grids(image_grid_hw)]
        if sum(lengths) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but image_grid_hw describes {sum(lengths)}."
            )
        return lengths

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_grid_hw: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        r"""
        pixel_values (`torch.Tensor` of shape `(total_patches, num_channels * patch_size**2)`):
            Patches of all images, concatenated, as [`BagelImageProcessor`] returns them.
        image_grid_hw (`torch.LongTensor` of shape `(num_images, 2)`):
            Patch grid (rows, columns) of each image.
        position_ids (`torch.LongTensor` of shape `(total_patches,)`, *optional*):
            Flattened 2-D position ids; computed from `image_grid_hw` when omitted.

        Returns a [`BaseModelOutput`] whose `last_hidden_state` is packed like the input: `(total_patches, hidden)`.
        """
        lengths = self.check_patches(pixel_values, image_grid_hw)
        if position_ids is None:
            position_ids = flattened_grid_position_ids(
                image_grid_hw, self.embeddings.num_patches_per_side, device=pixel_values.device
            )
        packed = self.embeddings(pixel_values, position_ids)

        # Pad the packed patches into (num_images, longest, hidden) with a key-padding mask. The lengths are known on
        # the host, so padding and unpadding are slices: nothing is read back from the device.
        hidden_states = pad_sequence(packed.split(lengths), batch_first=True)
        attention_mask = None
        if len(set(lengths)) > 1:
            longest, device = max(lengths), packed.device
            valid = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
            attention_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=valid.long()
            )
        hidden_states = self.encoder(inputs_embeds=hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = self.post_layernorm(hidden_states.last_hidden_state)
        if len(lengths) == 1:
            return BaseModelOutput(last_hidden_state=hidden_states[0])
        unpadded = torch.cat([image[:length] for image, length in zip(hidden_states, lengths)])
        return BaseModelOutput(last_hidden_state=unpadded)


__all__ = [
    "BagelVisionModel",
    "BagelVisionPreTrainedModel",
    "flattened_grid_position_ids",
    "grid_position_ids",
    "in_tree_initialize_weights",
    "patch_grids",
]
