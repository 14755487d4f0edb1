"""BAGEL (ByteDance-Seed) as a transformers model. Importing this package registers it with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .configuration_bagel import BagelConfig, BagelTextConfig
from .context_bagel import BagelContext, BagelContextSpan
from .image_processing_bagel import BagelImageProcessor
from .modeling_bagel import (
    BagelForConditionalGeneration,
    BagelModel,
    BagelPreTrainedModel,
    BagelTextModel,
    bagel_token_layout,
    pack_latents,
    unpack_latents,
)
from .modeling_bagel_vision import BagelVisionModel
from .processing_bagel import BagelProcessor
from .sequence_layout import BagelSequence
from .video_utils import load_video_frames, sample_frame_indices


AutoConfig.register("bagel", BagelConfig, exist_ok=True)
AutoConfig.register("bagel_text", BagelTextConfig, exist_ok=True)
AutoModel.register(BagelConfig, BagelModel, exist_ok=True)
AutoModel.register(BagelTextConfig, BagelTextModel, exist_ok=True)
AutoModelForImageTextToText.register(BagelConfig, BagelForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(BagelConfig, BagelForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(BagelConfig, image_processor_classes={"pil": BagelImageProcessor}, exist_ok=True)
AutoProcessor.register(BagelConfig, BagelProcessor, exist_ok=True)


def register_for_hub():
    """
    Marks the classes for the Hub's `auto_map` route: after this, `save_pretrained` writes `auto_map` and copies the
    code files, so the folder loads with `trust_remote_code=True` without installing this package.
    """
    BagelConfig.register_for_auto_class()
    BagelModel.register_for_auto_class("AutoModel")
    BagelForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    BagelImageProcessor.register_for_auto_class("AutoImageProcessor")
    BagelProcessor.register_for_auto_class("AutoProcessor")


__all__ = [
    "BagelConfig",
    "BagelTextConfig",
    "BagelPreTrainedModel",
    "BagelTextModel",
    "BagelVisionModel",
    "BagelModel",
    "BagelForConditionalGeneration",
    "BagelImageProcessor",
    "BagelProcessor",
    "BagelContext",
    "BagelContextSpan",
    "BagelSequence",
    "bagel_token_layout",
    "pack_latents",
    "unpack_latents",
    "register_for_hub",
    "load_video_frames",
    "sample_frame_indices",
]
