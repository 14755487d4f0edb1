"""
BAGEL's understanding side as an [lmms-eval](https://github.com/EvolvingLMMs-Lab/lmms-eval) model: MME, MMBench, MMMU,
MM-Vet, MathVista, ... through lmms-eval's own tasks and scorers.

lmms-eval already ships a `bagel` model for the original code base; this one is `bagel_hf` and runs
[`BagelForConditionalGeneration`] with its [`BagelProcessor`] from a converted folder. It is registered the way
lmms-eval 0.7 loads external models: a `ModelManifest` under the Python entry-point group `lmms_eval.models` (declared
in this distribution's `pyproject.toml`, active once the package is installed), and, for a process that imported this
module before lmms-eval built its registry, [`register_bagel_model`].

    lmms-eval --model bagel_hf --model_args pretrained=bagel-7b-hf,think=False --tasks mme --batch_size 8

Needs the `eval` extra (`pip install "bagel-hf[eval]"`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers.utils import logging

from .chat import generate_answers, understanding_messages


try:
    from lmms_eval.api.model import lmms
except ImportError as error:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError(
        "transformers_bagel.lmms_eval_bagel needs lmms-eval: pip install 'bagel-hf[eval]' (or `pip install lmms-eval`)."
    ) from error


logger = logging.get_logger(__name__)

__all__ = ["MODEL_ID", "BagelLmms", "lmms_eval_manifest", "register_bagel_model"]

MODEL_ID = "bagel_hf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lmms_eval_manifest():
    """The `ModelManifest` of the `lmms_eval.models` entry point: `bagel_hf` -> [`BagelLmms`]."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.BagelLmms")


def register_bagel_model() -> None:
    """Registers `bagel_hf` in lmms-eval's model registry of this process (what the entry point does at start-up)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"model_args `{name}` must be True or False, got {value!r}.")


def _positive(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1 or isinstance(value, bool):
        raise ValueError(f"model_args `{name}` must be a positive integer, got {value!r}.")
    return number


class BagelLmms(lmms):
    """
    lmms-eval model for a converted BAGEL folder: greedy (unless a task's `gen_kwargs` ask for sampling), batched
    `generate_until`, optional thinking (the original's reasoning system prompt; the `<think>...</think>` part is
    cut from the answer handed to the scorer).

    Args (lmms-eval `--model_args`):
        pretrained (`str`): the converted folder (holds `model_index.json`, `model/` and `processor/`), or a
            `BagelForConditionalGeneration` folder with its processor files.
        device (`str`, *optional*): default CUDA when available, else CPU.
        dtype (`str`, defaults to `"auto"`): bfloat16 on CUDA, float32 on CPU, or `float32` / `bfloat16` / `float16`.
        batch_size (`int`, defaults to 1): requests per `generate` call.
        max_new_tokens (`int`, defaults to 512): default answer length when a task does not set it.
        think (`bool`, defaults to `False`): thinking mode.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 512,
        think: bool | str = False,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown model_args for {MODEL_ID}: {sorted(kwargs)}.")
        from . import BagelForConditionalGeneration, BagelProcessor

        folder = Path(pretrained)
        model_folder = folder / "model" if (folder / "model_index.json").is_file() else folder
        processor_folder = folder / "processor" if (folder / "processor").is_dir() else folder
        if not (model_folder / "config.json").is_file():
            raise ValueError(f"model_args pretrained={pretrained!r}: no BAGEL model there (no config.json).")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        elif dtype in DTYPES:
            torch_dtype = DTYPES[dtype]
        else:
            raise ValueError(f"model_args dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}.")
        self.model = BagelForConditionalGeneration.from_pretrained(model_folder, dtype=torch_dtype).to(device).eval()
        self.processor = BagelProcessor.from_pretrained(processor_folder)
        self.batch_size_per_gpu = _positive(batch_size, "batch_size")
        self.max_new_tokens = _positive(max_new_tokens, "max_new_tokens")
        self.think = _bool(think, "think")

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.model.device

    def loglikelihood(self, requests):
        """Not supported: BAGEL's reported understanding benchmarks are all generative."""
        raise NotImplementedError(
            f"{MODEL_ID} implements generate_until only; loglikelihood (multiple-choice by likelihood) tasks are not "
            "supported. Use the generative variant of the task."
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{MODEL_ID} does not implement multi-round generation.")

    def _visuals(self, request) -> list:
        from PIL import Image

        from .image_processing_bagel import to_rgb_image

        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        images = []
        for visual in visuals or []:
            if isinstance(visual, (Image.Image, str, Path)):
                images.append(to_rgb_image(visual))
            else:
                raise ValueError(f"task {task!r} doc {doc_id}: {type(visual).__name__} visuals are not supported.")
        return images

    def _messages(self, request) -> list[dict]:
        context = request.args[0]
        images = self._visuals(request)
        text = context.replace("<image>", "").strip() if "<image>" in context else context
        return understanding_messages(text, images, think=self.think)

    def _answer(self, text: str, until: list[str]) -> str:
        if self.think and "</think>" in text:
            text = text.split("</think>", 1)[1]
        for stop in until:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return text.strip()

    def generate_until(self, requests) -> list[str]:
        """Answers `requests` in batches of `batch_size` (requests with identical `gen_kwargs` share a batch)."""
        from tqdm.auto import tqdm

        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(position)
        bar = tqdm(total=len(requests), desc="bagel_hf", disable=self.rank != 0)
        for positions in groups.values():
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start : start + self.batch_size]
                texts = self._generate([requests[p] for p in chunk])
                for position, text in zip(chunk, texts):
                    answers[position] = text
                    self.cache_hook.add_partial("generate_until", requests[position].args[:2], text)
                bar.update(len(chunk))
        bar.close()
        return answers

    def _generate(self, batch) -> list[str]:
        gen_kwargs = dict(batch[0].args[1])
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens))
        if self.think:  # the reasoning comes on top of the task's answer length
            max_new_tokens = max(max_new_tokens, 2048)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.pop("do_sample", False)) and temperature > 0
        if do_sample and not math.isfinite(temperature):
            raise ValueError(f"gen_kwargs temperature must be finite, got {temperature}.")
        conversations = [self._messages(request) for request in batch]
        answers = generate_answers(self.model, self.processor, conversations, max_new_tokens, do_sample, temperature)
        return [self._answer(text, until) for text in answers.texts]
