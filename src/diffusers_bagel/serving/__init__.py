"""
An OpenAI-compatible HTTP server for BAGEL (`bagel serve`): chat completions about images, image generation and
editing, with request batching. Needs the `serve` extra (`pip install bagel-hf[serve]`: FastAPI, uvicorn,
python-multipart); importing `diffusers_bagel` alone does not import it.

    from diffusers_bagel import BagelPipeline
    from diffusers_bagel.serving import ServerConfig, check_port, create_app, resolve_api_key, run_server

    config = ServerConfig(model_name="tiny-bagel-digits", api_key=resolve_api_key(None))  # options checked here
    check_port("127.0.0.1", 8000)  # before the model loads
    pipe = BagelPipeline.from_pretrained("checkpoints/tiny-bagel-digits")
    run_server(pipe, config, host="127.0.0.1", port=8000)
"""

from .app import ServerConfig, create_app, run_server
from .errors import APIError
from .metrics import ServerMetrics
from .options import check_api_key, check_port, check_timing, resolve_api_key
from .remote import is_public_address
from .requests import EncodedImage, ServerLimits
from .worker import BatchWorker, Job, QueueFullError


__all__ = [
    "APIError",
    "BatchWorker",
    "EncodedImage",
    "Job",
    "QueueFullError",
    "ServerConfig",
    "ServerLimits",
    "ServerMetrics",
    "check_api_key",
    "check_port",
    "check_timing",
    "create_app",
    "is_public_address",
    "resolve_api_key",
    "run_server",
]
