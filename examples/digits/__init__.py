"""
A tiny BAGEL for scikit-learn's handwritten digits, the demo world of the examples (not part of the library): data and
sample builders, a word-level tokenizer, tiny configs, VAE training, training callbacks and evaluation. Used by
`examples/train_digits_vae.py`, `examples/train_digits.py`, `examples/eval_digits.py` and `examples/quickstart.py`
(which run with `examples/` on `sys.path`, so this imports as `digits`); needs scikit-learn
(`pip install -e ".[digits]"`). The training itself is the library's: `BagelTrainer`, `BagelDataCollator`,
`BagelEMACallback`, `latents_from_vae_inputs`.
"""

from .callbacks import SampleGridCallback, TimeBudgetCallback, image_grid
from .configs import DIGITS_IMAGE_SIZE, digits_bagel_config, digits_image_processor, digits_vae_config
from .data import (
    DIGIT_NAMES,
    TASK_KINDS,
    UNDERSTANDING_QUESTION,
    DigitsSplit,
    DigitsTaskDataset,
    answer_text,
    augment_digit,
    digit_from_text,
    downscale_digit,
    edit_instruction,
    encode_latents,
    load_digits_images,
    split_digits,
    text_to_image_prompt,
    to_pil,
)
from .evaluation import DigitClassifier, TaskResult, editing_accuracy, generation_accuracy, results_grid, understanding_accuracy
from .tokenizer import BAGEL_SPECIAL_TOKENS, DIGITS_WORDS, build_digits_tokenizer
from .vae import latent_statistics, train_digits_vae


__all__ = [
    "BAGEL_SPECIAL_TOKENS",
    "DIGITS_IMAGE_SIZE",
    "DIGITS_WORDS",
    "DIGIT_NAMES",
    "TASK_KINDS",
    "UNDERSTANDING_QUESTION",
    "DigitClassifier",
    "DigitsSplit",
    "DigitsTaskDataset",
    "SampleGridCallback",
    "TaskResult",
    "TimeBudgetCallback",
    "answer_text",
    "augment_digit",
    "build_digits_tokenizer",
    "digit_from_text",
    "digits_bagel_config",
    "digits_image_processor",
    "digits_vae_config",
    "downscale_digit",
    "edit_instruction",
    "editing_accuracy",
    "encode_latents",
    "generation_accuracy",
    "image_grid",
    "latent_statistics",
    "load_digits_images",
    "results_grid",
    "split_digits",
    "text_to_image_prompt",
    "to_pil",
    "train_digits_vae",
    "understanding_accuracy",
]
