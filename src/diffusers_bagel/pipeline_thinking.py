"""
Thinking mode of [`BagelPipeline`]: the plan the model writes from each full context before drawing (the original's
`gen_text` in `inferencer.py` of ByteDance-Seed/Bagel), and the position check that sizes its budget before any work.
"""

import re
from dataclasses import replace

import torch
from diffusers.utils import logging

from .defaults import DEFAULT_MAX_THINK_TOKENS, DEFAULT_THINK_TEMPERATURE
from .pipeline_contexts import ContextEncoder
from .pipeline_inputs import Context, GuidanceContexts, image_structure_tokens_in


__all__ = ["check_positions", "generate_thinking"]

logger = logging.get_logger(__name__)


def check_positions(
    encoder: ContextEncoder, contexts: list[GuidanceContexts], think: bool, max_think_tokens: int | None
) -> int | None:
    """
    Refuses, before any work, a context that would run past the model's position table (each text token takes a
    position, each image block one), and returns the thinking budget that fits: `max_think_tokens`, or
    `DEFAULT_MAX_THINK_TOKENS` when None, lowered to the positions the longest context leaves (the plan, then the
    image block), as `generate` lowers `max_new_tokens`; a given budget is lowered with one warning.
    """
    limit = encoder.model.config.text_config.max_position_embeddings
    # Positions only: the layout runs no model (an image block takes one position whatever its size).
    longest = max(encoder.layout(c.full.segments).position for c in {id(c): c for c in contexts}.values())
    # The image block takes one position; a plan needs its two boundary tokens and at least one token.
    room = limit - longest - 1 - (3 if think else 0)
    if room < 0:
        plan = " and a plan of at least one token" if think else ""
        raise ValueError(
            f"The context takes {longest} positions: with the image{plan} it does not fit the model's {limit} "
            "(text_config.max_position_embeddings); shorten the prompt."
        )
    if not think:
        return max_think_tokens
    budget = DEFAULT_MAX_THINK_TOKENS if max_think_tokens is None else max_think_tokens
    fits = room + 1
    if budget > fits:
        if max_think_tokens is not None:
            logger.warning(
                f"max_think_tokens={max_think_tokens} would run past the model's {limit} positions after a context "
                f"of {longest}; the plan gets at most {fits} tokens."
            )
        budget = fits
    return budget


def generate_thinking(
    encoder: ContextEncoder,
    contexts: list[GuidanceContexts],
    max_think_tokens: int,
    do_sample: bool = False,
    temperature: float = DEFAULT_THINK_TEMPERATURE,
) -> tuple[list[str], list[GuidanceContexts]]:
    """
    Generates the planning text from each full context and appends it to that context, as the original's `gen_text`:
    from `<|im_start|>` after the context, greedy or sampled from softmax(logits / temperature) over the whole
    vocabulary, up to `<|im_end|>` or `max_think_tokens` tokens. The image inputs are the VAE posterior's mean, as the
    original's. `contexts` holds one entry per image, the images of one prompt sharing its contexts: a greedy plan is
    the prompt's, written once; sampled, each image plans on a copy of its prompt's contexts.

    Returns:
        The plan of each image, and the contexts (one per image) that hold them.
    """
    if do_sample:
        contexts = [replace(c, full=Context(list(c.full.segments))) for c in contexts]
    distinct = list({id(c): c for c in contexts}.values())
    model, tokenizer = encoder.model, encoder.processor.tokenizer
    config = model.config
    inputs = encoder.batch([c.full for c in distinct], sample_posterior=False)
    start = torch.full((inputs["input_ids"].shape[0], 1), config.bos_token_id, device=inputs["input_ids"].device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], start], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(start)], dim=1)
    sampling = {"do_sample": do_sample}
    if do_sample:
        sampling.update(temperature=temperature, top_k=0, top_p=1.0)
    output = model.generate(
        **inputs,
        max_new_tokens=max_think_tokens,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        **sampling,
    )
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
    eos = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    pad = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    thoughts = [text.split(eos)[0].replace(pad, "") for text in texts]
    for i, thought in enumerate(thoughts):
        # The thought goes back into the context as text; only images may hold image slots there.
        found = image_structure_tokens_in(thought, encoder.processor, config)
        if found:
            logger.warning(f"The thinking text holds image tokens {found}; they are removed before generating.")
            thoughts[i] = re.sub("|".join(map(re.escape, found)), "", thought)
    for context, thought in zip(distinct, thoughts):
        context.full.segments.append(("text", thought))
    plans = {id(context): thought for context, thought in zip(distinct, thoughts)}
    return [plans[id(c)] for c in contexts], contexts
