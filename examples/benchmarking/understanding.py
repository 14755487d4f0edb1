"""The understanding task: one image and a question prefilled, then greedy tokens through `model.generate`."""

from transformers.generation.streamers import BaseStreamer

from .flops import FlopModel
from .generation import random_image
from .timing import Clock, Memory


__all__ = ["run_understanding", "understanding_inputs"]


class TokenTimes(BaseStreamer):
    """Streamer that timestamps every generated token (the first `put` is the prompt)."""

    def __init__(self, clock: Clock):
        self.clock, self.times, self.prompt_seen = clock, [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(self.clock.now())

    def end(self):
        pass


def understanding_inputs(pipe, args, device=None) -> dict:
    """The chat inputs of the understanding task: one `--width` x `--height` image and a question."""
    image = random_image(args.width, args.height, seed=1)
    question = "Describe this picture in detail: what objects are there and what colours do they have?"
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = pipe.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return {k: v.to(device) for k, v in inputs.items()} if device is not None else dict(inputs)


def run_understanding(pipe, args, flops: FlopModel, clock: Clock, memory: Memory) -> dict:
    """Prefill of one image and a question, then `--decode_tokens` greedy tokens through `model.generate`."""
    inputs = understanding_inputs(pipe, args, clock.device)
    model = pipe.model
    new_tokens = args.decode_tokens
    generate = {"do_sample": False, "pad_token_id": model.config.pad_token_id}
    generate["eos_token_id"] = model.config.eos_token_id  # min_new_tokens keeps it from ending the answer early
    model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **generate)  # warm-up

    memory.reset()
    streamer = TokenTimes(clock)
    start = clock.now()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=streamer, **generate)
    times = streamer.times
    first = times[0] - start
    decode_rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")

    prompt_tokens = int(inputs["attention_mask"].sum())
    vit_patches = int(inputs["image_grid_hw"].prod(-1).sum())
    prefill_flops = (
        vit_patches * flops.vit_patch
        + vit_patches**2 * flops.vit_attn_per_key
        + prompt_tokens * flops.und_token
        + prompt_tokens * (prompt_tokens + 1) / 2 * flops.attn_per_key
        + flops.lm_head
    )
    decode_flops = sum(
        flops.und_token + flops.lm_head + (prompt_tokens + k) * flops.attn_per_key for k in range(1, len(times))
    )
    total = times[-1] - start
    return {
        "task": "understand",
        "image": f"{args.width}x{args.height}",
        "context_tokens": [prompt_tokens],
        "prefill_s": first,
        "first_token_s": first,
        "decode_tok_s": decode_rate,
        "peak_mem_gib": memory.peak_gib(),
        "tflops": (prefill_flops + decode_flops) / total / 1e12,
        "prefill_tflops": prefill_flops / first / 1e12,
    }
