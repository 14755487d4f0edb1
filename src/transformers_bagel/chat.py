"""
Image (and video) understanding as a chat: the messages of a turn (with the original's reasoning prompt for thinking
mode) and the greedy or sampled answer of the model to them. Used by the `bagel chat` command, the examples and the
app.
"""

from __future__ import annotations

import math

import torch


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GEN_THINK_SYSTEM_PROMPT",
    "VLM_THINK_SYSTEM_PROMPT",
    "generate_answer",
    "understanding_messages",
]

# The original inferencer's system prompts of thinking mode, for image generation and for understanding.
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here"
)
VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here"
)


def understanding_messages(
    question: str,
    images=(),
    history=(),
    think: bool = False,
    video=None,
    num_frames: int | None = None,
    fps: float | None = None,
) -> list[dict]:
    """
    Chat messages of an understanding turn, for [`BagelProcessor.apply_chat_template`]: the reasoning system prompt
    first when `think` is set (as the original inferencer puts it), then the earlier `(question, answer)` pairs of
    `history`, then `question`. The `images`, then the `video`, go before the first question of the conversation.

    Args:
        question (`str`): the question of this turn.
        images: images of the conversation (anything the processor loads).
        history: earlier `(question, answer)` pairs.
        think (`bool`, defaults to `False`): thinking mode.
        video (*optional*): a video file, a folder of frames or a list of frames (see
            [`~video_utils.load_video_frames`]); the processor decodes it and each sampled frame becomes an image.
        num_frames (`int`, *optional*), fps (`float`, *optional*): how the video's frames are sampled (the
            processor's default when unset).

    Raises:
        `ValueError` for an empty question, or `num_frames` / `fps` without a `video`.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError("The question is empty; ask something about the image(s).")
    if video is None and (num_frames is not None or fps is not None):
        raise ValueError("`num_frames` and `fps` sample a video: pass `video` too.")
    first = [{"type": "image", "image": image} for image in images]
    if video is not None:
        part = {"type": "video", "video": video}
        part.update({key: value for key, value in (("num_frames", num_frames), ("fps", fps)) if value is not None})
        first.append(part)
    messages = [{"role": "system", "content": VLM_THINK_SYSTEM_PROMPT}] if think else []
    for index, (text, reply) in enumerate([*history, (question, None)]):
        content = list(first) if index == 0 else []
        content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    return messages


DEFAULT_MAX_NEW_TOKENS = 512


def generate_answer(
    model,
    processor,
    messages: list[dict],
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 0.3,
    streamer=None,
) -> str:
    """
    The answer of `model` ([`BagelForConditionalGeneration`]) to chat `messages` (see [`understanding_messages`]),
    tokenised by `processor`: greedy by default; with `do_sample`, softmax(logits / temperature) over the whole
    vocabulary as the original samples (no top-k / top-p). The text is streamed to `streamer` (a transformers
    streamer) as it is generated. Returns the decoded answer. The answer is at most `max_new_tokens` tokens: by default
    512, quietly lowered to what the model's position table leaves after the prompt (a given value that does not fit
    is lowered by `generate`, with a warning).

    Raises:
        `ValueError` for a `max_new_tokens` that is not a positive integer, or a sampling temperature that is not a
        finite number > 0.
    """
    if max_new_tokens is not None and (
        not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1
    ):
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")
    if do_sample and not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"`temperature` must be a finite number > 0 when sampling, got {temperature!r}.")
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if max_new_tokens is None:
        room = model.position_room(inputs["input_ids"], inputs.get("attention_mask"))
        max_new_tokens = max(1, min(DEFAULT_MAX_NEW_TOKENS, room))
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, streamer=streamer, **sampling
        )
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
