"""
The defaults and bounds of BAGEL's image generation, in one place: the pipeline resolves its defaults from them and
checks its arguments against them. The `bagel` command and the server pass on only the arguments they are given (the
pipeline's defaults apply to the others); `bagel --help` and the app show these. This module imports nothing heavy,
so that `bagel --help` answers before torch is loaded.
"""

__all__ = [
    "CFG_RENORM_TYPES",
    "DEFAULT_CFG_RENORM_MIN",
    "DEFAULT_MAX_THINK_TOKENS",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "DEFAULT_THINK_TEMPERATURE",
    "DEFAULT_TIMESTEP_SHIFT",
    "EDIT_PRESET",
    "GEN_THINK_SYSTEM_PROMPT",
    "MAX_GUIDANCE_SCALE",
    "MAX_IMAGES_PER_CALL",
    "MAX_INFERENCE_STEPS",
    "MAX_TIMESTEP_SHIFT",
    "MIN_TIMESTEP_SHIFT",
    "OUTPUT_TYPES",
    "TEXT_TO_IMAGE_PRESET",
]

# Presets of the original app: text-to-image runs `interleave_inference` with its image-guidance default of 1.5 (a
# no-text context equals the full one there, so it sharpens text guidance); editing uses the app's edit tab.
TEXT_TO_IMAGE_PRESET = {
    "cfg_text_scale": 4.0,
    "cfg_img_scale": 1.5,
    "cfg_interval": (0.4, 1.0),
    "cfg_renorm_type": "global",
}
EDIT_PRESET = {"cfg_text_scale": 4.0, "cfg_img_scale": 2.0, "cfg_interval": (0.0, 1.0), "cfg_renorm_type": "text_channel"}
CFG_RENORM_TYPES = ("global", "channel", "text_channel")
"""The renormalisation rules `FlowMatchEulerScheduler.apply_guidance` accepts."""
MAX_GUIDANCE_SCALE = 1000.0
MIN_TIMESTEP_SHIFT, MAX_TIMESTEP_SHIFT = 1e-3, 1000.0
# Bounds that keep a mistyped argument from running for hours or exhausting memory before any error.
MAX_INFERENCE_STEPS = 10_000
MAX_IMAGES_PER_CALL = 256
# The call's defaults that do not depend on the task (the original's `inferencer.py` / `app.py` values).
DEFAULT_NUM_INFERENCE_STEPS = 50
DEFAULT_TIMESTEP_SHIFT = 3.0
DEFAULT_CFG_RENORM_MIN = 0.0
DEFAULT_THINK_TEMPERATURE = 0.3
DEFAULT_MAX_THINK_TOKENS = 1000  # the original's max_think_token_n
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The system prompt of thinking mode for image generation (the original's `inferencer.py`): the plan comes first.
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here"
)
