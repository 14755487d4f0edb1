"""BAGEL model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config, SiglipVisionConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.utils import logging


logger = logging.get_logger(__name__)

SPECIAL_TOKENS = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image_token_id": "<|vision_start|>",
    "end_of_image_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "latent_token_id": "<|vision_pad|>",
    "pad_token_id": "<|endoftext|>",
}
"""BAGEL's special tokens (Qwen2's), by the `BagelConfig` field holding each one's id: the one table of them."""


def special_token_ids(tokenizer, fields=tuple(SPECIAL_TOKENS)) -> dict[str, int]:
    """
    The ids of BAGEL's special tokens in `tokenizer`, by config field (`fields`: which of `SPECIAL_TOKENS`).

    Raises:
        `ValueError` naming the tokens the tokenizer lacks (a word-level tokenizer maps them to its unknown token).
    """
    ids, missing = {}, []
    for field in fields:
        token_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[field])
        if token_id is None or token_id == tokenizer.unk_token_id:
            missing.append(SPECIAL_TOKENS[field])
        ids[field] = token_id
    if missing:
        raise ValueError(
            f"The tokenizer lacks BAGEL's special tokens {missing}; add them with "
            "`tokenizer.add_special_tokens({'additional_special_tokens': [...]})` and resize the embeddings."
        )
    return ids


PIPELINE_FOLDER_KEY = "bagel_pipeline_folder"
"""Key of the root `config.json` of a converted pipeline folder (its components' subfolders), see `from_dict`."""


@strict
class BagelTextConfig(Qwen2Config):
    r"""
    Configuration of BAGEL's Mixture-of-Transformer-Experts decoder.

    It is a [`Qwen2Config`] (the 7B checkpoint starts from Qwen2.5-7B-Instruct) with two extra fields:

    qk_norm (`bool`, *optional*, defaults to `True`):
        Whether queries and keys go through an RMSNorm over the head dimension before RoPE. BAGEL always uses it.
    freeze_und (`bool`, *optional*, defaults to `False`):
        Training option of the original (`--freeze_und`): every activation of understanding tokens (text and ViT)
        is detached, so no gradient reaches the understanding expert, the text embeddings, the ViT or the connector,
        and the generation loss does not flow back through understanding tokens. No effect without gradients.

    Every decoder layer holds two sets of weights built from this config: the understanding expert (text and ViT
    tokens) and the generation expert (`*_moe_gen`, VAE latent tokens).
    """

    model_type = "bagel_text"
    base_config_key = "text_config"

    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun), Qwen2's plan for both experts:
    # q/k/v/gate/up split by output features (whole heads: the per-head q/k RMSNorm stays local), o/down by input
    # features and summed. The embeddings stay replicated (transformers would otherwise split the vocabulary), and so
    # do the norms; the ViT, the connector and the heads on `BagelForConditionalGeneration` have no plan.
    base_model_tp_plan = {
        "embed_tokens": "replicate",
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.self_attn.q_proj_moe_gen": "colwise",
        "layers.*.self_attn.k_proj_moe_gen": "colwise",
        "layers.*.self_attn.v_proj_moe_gen": "colwise",
        "layers.*.self_attn.o_proj_moe_gen": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp_moe_gen.gate_proj": "colwise",
        "layers.*.mlp_moe_gen.up_proj": "colwise",
        "layers.*.mlp_moe_gen.down_proj": "rowwise",
    }
    # Qwen2's pipeline plan does not fit: BAGEL's layer stack is one module taking the experts' routing.
    base_model_pp_plan = None

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = None
    qk_norm: bool = True
    freeze_und: bool = False

    def __post_init__(self, **kwargs):
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 1000000.0)}
        super().__post_init__(**kwargs)


# The 7B release's values (BAGEL-7B-MoT): Qwen2.5-7B decoder, SigLIP so400m-14-980 with its last layer dropped.
BAGEL_7B_TEXT_CONFIG = {"model_type": "bagel_text"}
BAGEL_7B_VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 980,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


@strict
class BagelConfig(PreTrainedConfig):
    r"""
    Configuration of a BAGEL model ([`BagelModel`], [`BagelForConditionalGeneration`]). Defaults reproduce
    `ByteDance-Seed/BAGEL-7B-MoT`.

    text_config (`dict` or [`BagelTextConfig`], *optional*):
        The Mixture-of-Transformer-Experts decoder.
    vision_config (`dict` or [`SiglipVisionConfig`], *optional*):
        The SigLIP NaViT encoder. `num_hidden_layers` is the number of layers actually run (the release's
        `vit_config.json` lists one more; the converter drops it).
    latent_patch_size (`int`, *optional*, defaults to 2):
        Side of the square of VAE latent pixels packed into one generation token.
    max_latent_size (`int`, *optional*, defaults to 64):
        Side of the latent position table, in generation tokens: the largest image is
        `max_latent_size * latent_patch_size * vae_downsample` pixels per side.
    latent_channels (`int`, *optional*, defaults to 16):
        Channels of the VAE latent.
    vae_downsample (`int`, *optional*, defaults to 8):
        Spatial down-sampling factor of the VAE.
    vit_max_num_patch_per_side (`int`, *optional*, defaults to 70):
        Side of the ViT position tables, in patches.
    connector_act (`str`, *optional*, defaults to `"gelu_pytorch_tanh"`):
        Activation of the ViT-to-decoder MLP connector.
    interpolate_pos (`bool`, *optional*, defaults to `False`):
        Whether 2-D position ids are bucketised fractional coordinates instead of `row * side + col`.
    timestep_shift (`float`, *optional*, defaults to 1.0):
        Shift applied to training timesteps (`t' = s t / (1 + (s - 1) t)`). Inference takes its own shift.
    bos_token_id, eos_token_id (`int`):
        `<|im_start|>` and `<|im_end|>`: every text segment is wrapped in them, and `<|im_end|>` ends generation.
    start_of_image_token_id, end_of_image_token_id (`int`):
        `<|vision_start|>` and `<|vision_end|>`, the boundary tokens of an image block.
    image_token_id (`int`):
        Placeholder (`<|image_pad|>`) for one ViT patch token in `input_ids`.
    latent_token_id (`int`):
        Placeholder (`<|vision_pad|>`) for one VAE latent token in `input_ids`; these tokens use the generation expert.
    pad_token_id (`int`):
        Padding token (`<|endoftext|>`).
    """

    model_type = "bagel"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=BagelTextConfig, init_kwargs=BAGEL_7B_TEXT_CONFIG),
        "vision_config": SubConfigSpec(config_class=SiglipVisionConfig, init_kwargs=BAGEL_7B_VISION_CONFIG),
    }

    text_config: dict | BagelTextConfig | None = None
    vision_config: dict | SiglipVisionConfig | None = None
    latent_patch_size: int = 2
    max_latent_size: int = 64
    latent_channels: int = 16
    vae_downsample: int = 8
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float = 1.0
    bos_token_id: int | None = 151644
    eos_token_id: int | None = 151645
    start_of_image_token_id: int = 151652
    end_of_image_token_id: int = 151653
    image_token_id: int = 151655
    latent_token_id: int = 151654
    pad_token_id: int | None = 151643
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_values()

    @property
    def latent_downsample(self) -> int:
        """Pixels per generation token along one side (`vae_downsample * latent_patch_size`)."""
        return self.vae_downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        """Features of one packed latent token (`latent_patch_size**2 * latent_channels`)."""
        return self.latent_patch_size**2 * self.latent_channels

    @property
    def max_image_size(self) -> int:
        """Largest generated image side in pixels."""
        return self.max_latent_size * self.latent_downsample

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """[`~PreTrainedConfig.from_dict`], refusing the root `config.json` of a converted pipeline folder (which
        only marks the folder: the model's configuration is in its `model` subfolder)."""
        if PIPELINE_FOLDER_KEY in config_dict:
            raise ValueError(
                "This is the root of a converted BAGEL pipeline folder: load the model with "
                "`from_pretrained(path, subfolder='model')`, the processor with `subfolder='processor'`, or the whole "
                "pipeline with `diffusers_bagel.BagelPipeline.from_pretrained(path)`."
            )
        return super().from_dict(config_dict, **kwargs)

    def _check_values(self):
        def refuse(field, value, why):
            raise ValueError(f"BagelConfig.{field}={value!r} is invalid: {why}")

        for field in ("latent_patch_size", "max_latent_size", "latent_channels", "vae_downsample"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                refuse(field, value, "must be a positive integer")
        if self.vit_max_num_patch_per_side <= 0:
            refuse("vit_max_num_patch_per_side", self.vit_max_num_patch_per_side, "must be a positive integer")
        if self.connector_act not in ACT2FN:
            refuse("connector_act", self.connector_act, f"must be one of {sorted(ACT2FN)}")
        if not self.timestep_shift > 0:
            refuse("timestep_shift", self.timestep_shift, "must be > 0")

        text, vision = self.text_config, self.vision_config
        sizes = {
            "text_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "max_position_embeddings"),
            "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_channels", "image_size", "patch_size"),
        }  # fmt: skip
        for name, fields in sizes.items():
            for field in fields:
                value = getattr(getattr(self, name), field)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    refuse(f"{name}.{field}", value, "must be a positive integer")
        if text.hidden_size % 4 != 0:
            refuse("text_config.hidden_size", text.hidden_size, "the 2-D sin-cos tables need a multiple of 4")
        if text.hidden_size % text.num_attention_heads != 0:
            refuse("text_config.num_attention_heads", text.num_attention_heads, "must divide hidden_size")
        if text.num_attention_heads % text.num_key_value_heads != 0:
            refuse("text_config.num_key_value_heads", text.num_key_value_heads, "must divide num_attention_heads")
        table_side = vision.image_size // vision.patch_size
        if table_side != self.vit_max_num_patch_per_side:
            refuse(
                "vit_max_num_patch_per_side",
                self.vit_max_num_patch_per_side,
                f"must equal vision_config.image_size // patch_size = {table_side}, the side of SigLIP's learned "
                "position table",
            )
        seen = {}
        for field in (field for field in SPECIAL_TOKENS if field != "pad_token_id"):  # pad may share an id
            value = getattr(self, field)
            if value is None or not 0 <= value < text.vocab_size:
                refuse(field, value, f"must be a token id in [0, {text.vocab_size})")
            if value in seen:
                refuse(field, value, f"must differ from {seen[value]}")
            seen[value] = field


__all__ = ["BagelConfig", "BagelTextConfig", "PIPELINE_FOLDER_KEY", "SPECIAL_TOKENS", "special_token_ids"]
