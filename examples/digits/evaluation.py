"""
Evaluation of a digits BAGEL: a classifier trained on real held-out digits judges generated and edited images, and
understanding answers are compared with the labels.
"""

from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from transformers.utils import logging

from .callbacks import image_grid
from .data import (
    UNDERSTANDING_QUESTION,
    digit_from_text,
    downscale_digit,
    edit_instruction,
    text_to_image_prompt,
    to_pil,
)


logger = logging.get_logger(__name__)

__all__ = [
    "DigitClassifier",
    "TaskResult",
    "editing_accuracy",
    "generation_accuracy",
    "results_grid",
    "understanding_accuracy",
]


class DigitClassifier:
    """
    The judge: an RBF support-vector classifier (sklearn `SVC`) on images brought back to the 8x8 grey scale of
    `load_digits` ([`downscale_digit`]).

    Args:
        images (`np.ndarray`): `uint8` `(N, H, W, 3)` real digits to fit on.
        labels (`np.ndarray`): their labels.
        probability (`bool`, defaults to `False`): also fit sklearn's Platt scaling (a seeded internal
            cross-validation), for [`~DigitClassifier.probabilities`].
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, probability: bool = False):
        from sklearn.svm import SVC

        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"Need as many labels as images, at least one (got {len(images)} and {len(labels)}).")
        svc = SVC(gamma=0.001, C=10.0, probability=probability, random_state=0 if probability else None)
        self.svc = svc.fit(self.features(images), np.asarray(labels))

    @staticmethod
    def features(images) -> np.ndarray:
        """`(N, 64)` features of PIL images or `uint8` arrays."""
        return np.stack([downscale_digit(image) for image in images])

    def predict(self, images) -> np.ndarray:
        """Predicted digits of PIL images or `uint8` arrays."""
        return self.svc.predict(self.features(images))

    def probabilities(self, images) -> np.ndarray:
        """`(N, 10)` probabilities of the ten digits for PIL images or `uint8` arrays (needs `probability=True`)."""
        if not self.svc.probability:
            raise ValueError("This DigitClassifier was fitted without `probability=True`.")
        probabilities = np.zeros((len(images), 10))
        probabilities[:, self.svc.classes_] = self.svc.predict_proba(self.features(images))
        return probabilities

    def accuracy(self, images, labels) -> float:
        """Fraction of `images` classified as `labels`."""
        return float(np.mean(self.predict(images) == np.asarray(labels)))


@dataclass
class TaskResult:
    """Accuracy of one task, the per-digit accuracies and what was produced (images or answers), per digit."""

    accuracy: float
    per_digit: dict[int, float]
    outputs: dict[int, list] = field(default_factory=dict)


def _result(targets: list[int], predictions: list, outputs: list) -> TaskResult:
    targets, predictions = np.asarray(targets), np.asarray(predictions, dtype=object)
    correct = predictions == targets
    per_digit, by_digit = {}, {}
    for digit in sorted(set(targets.tolist())):
        mask = targets == digit
        per_digit[digit] = float(correct[mask].mean())
        by_digit[digit] = [output for output, m in zip(outputs, mask) if m]
    return TaskResult(float(correct.mean()), per_digit, by_digit)


def _check_count(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def generation_accuracy(
    pipe,
    classifier: DigitClassifier,
    images_per_digit: int = 10,
    digits=range(10),
    num_inference_steps: int = 16,
    seed: int = 0,
    batch_size: int = 100,
    **pipeline_kwargs,
) -> TaskResult:
    """
    Draws `images_per_digit` images of each digit from its text-to-image prompt with `pipe` and returns the fraction
    the classifier recognises as the prompted digit.
    """
    _check_count("images_per_digit", images_per_digit)
    targets = [digit for digit in digits for _ in range(images_per_digit)]
    images = []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(targets), batch_size):
        prompts = [text_to_image_prompt(digit) for digit in targets[start : start + batch_size]]
        images += pipe(prompts, num_inference_steps=num_inference_steps, generator=generator, **pipeline_kwargs).images
    return _result(targets, classifier.predict(images).tolist(), images)


def editing_accuracy(
    pipe,
    classifier: DigitClassifier,
    source_images: np.ndarray,
    source_labels: np.ndarray,
    edits_per_digit: int = 10,
    num_inference_steps: int = 16,
    seed: int = 0,
    batch_size: int = 100,
    **pipeline_kwargs,
) -> TaskResult:
    """
    For each target digit, edits `edits_per_digit` source images of other digits (drawn with `seed`) with
    "change the digit to <target>" and returns the fraction the classifier recognises as the target. The outputs are
    `(source, edited)` pairs.
    """
    _check_count("edits_per_digit", edits_per_digit)
    rng = np.random.default_rng(seed)
    source_labels = np.asarray(source_labels)
    jobs = []
    for target in range(10):
        candidates = np.flatnonzero(source_labels != target)
        for index in rng.choice(candidates, size=edits_per_digit, replace=False):
            jobs.append((target, to_pil(source_images[index])))
    edited = []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        edited += pipe(
            [edit_instruction(target) for target, _ in chunk],
            image=[[source] for _, source in chunk],
            num_inference_steps=num_inference_steps,
            generator=generator,
            **pipeline_kwargs,
        ).images
    targets = [target for target, _ in jobs]
    pairs = [(source, image) for (_, source), image in zip(jobs, edited)]
    return _result(targets, classifier.predict(edited).tolist(), pairs)


@torch.no_grad()
def understanding_accuracy(model, processor, images: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> TaskResult:
    """
    Asks "Which digit is this?" about each image through `processor.apply_chat_template` and greedy
    `model.generate`, and returns the fraction of answers naming the right digit. The outputs are the answers.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"Need as many labels as images, at least one (got {len(images)} and {len(labels)}).")
    answers = []
    for start in range(0, len(images), batch_size):
        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": to_pil(image)}, {"type": "text", "text": UNDERSTANDING_QUESTION}]}]
            for image in images[start : start + batch_size]
        ]
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id,
        )
        answers += processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    predictions = [digit_from_text(answer) for answer in answers]
    return _result([int(label) for label in labels], predictions, [answer.strip() for answer in answers])


def results_grid(generation: TaskResult, editing: TaskResult | None = None, columns: int = 8) -> PIL.Image.Image:
    """One row per digit: generated images, then (with `editing`) source / edited pairs towards that digit."""
    rows = []
    for digit in range(10):
        row = list(generation.outputs.get(digit, []))[:columns]
        if editing is not None:
            for source, edited in list(editing.outputs.get(digit, []))[: columns // 2]:
                row += [source, edited]
        if row:
            rows.append(row)
    return image_grid(rows)

