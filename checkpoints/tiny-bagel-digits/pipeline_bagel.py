"""BAGEL's pipeline class for `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`: the code is the installed diffusers_bagel package."""

from diffusers_bagel import BagelPipeline  # noqa: F401
