"""
An OpenAI-compatible HTTP server for BAGEL (`bagel serve`): chat completions about images, image generation and
editing, with request batching. Needs the `serve` extra (`pip install bagel-hf[serve]`: FastAPI, uvicorn,
python-multipart); importing `diffusers_bagel` alone does not import it.

    from diffusers_bagel import BagelPipeline
    from diffusers_bagel.serving import ServerConfig, create_app, run_server

    pipe = BagelPipeline.from_pretrained("checkpoints/tiny-bagel-digits")
    run_server(pipe, ServerConfig(model_name="tiny-bagel-digits"), host="127.0.0.1", port=8000)
"""

from .app import ServerConfig, create_app, run_server
from .errors import APIError
from .metrics import ServerMetrics
from .requests import ServerLimits
from .worker import BatchWorker, Job, QueueFullError


__all__ = [
    "APIError",
    "BatchWorker",
    "Job",
    "QueueFullError",
    "ServerConfig",
    "ServerLimits",
    "ServerMetrics",
    "create_app",
    "run_server",
]
