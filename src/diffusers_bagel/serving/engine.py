"""
What the server's worker thread runs: a batch of image jobs as one pipeline call, a batch of chat jobs as one
[`~transformers_bagel.chat.generate_answers`] call. Each job's images are decoded here, job by job: one whose pixel
data is broken fails alone and the others run.
"""

from __future__ import annotations

import dataclasses
import secrets

import torch
from transformers import StoppingCriteriaList

from transformers_bagel.chat import generate_answers

from .errors import APIError
from .payloads import ChatRequest, ImageRequest
from .requests import decode_message_images
from .worker import Job


__all__ = ["Engine", "cut_at_stop"]


class _RowStops:
    """
    A transformers stopping criterion for a batch of chat requests: row `r` is done once its generated text holds one
    of `stops[r]`, it has `max_tokens[r]` new tokens, it ended with an end-of-sequence token, or its job was
    cancelled (its client went away, its time ran out). `ended_at[r]` keeps how many new tokens it had then, and
    `ended_by_eos[r]` whether an end-of-sequence token ended it.
    """

    def __init__(self, tokenizer, stops: list[list[str]], max_tokens: list[int], jobs: list[Job], eos: set[int]):
        self.tokenizer, self.stops, self.max_tokens, self.jobs, self.eos = tokenizer, stops, max_tokens, jobs, eos
        self.generated = 0
        self.ended_at: list[int | None] = [None] * len(stops)
        self.ended_by_eos = [False] * len(stops)

    def __call__(self, input_ids, scores, **kwargs):
        self.generated += 1  # called once per generated token
        for row, stops in enumerate(self.stops):
            if self.ended_at[row] is not None:
                continue
            if self.jobs[row].cancelled:
                self.ended_at[row] = self.generated
                continue
            new_tokens = input_ids[row, -self.generated :]
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True) if stops else ""
            self.ended_by_eos[row] = int(new_tokens[-1]) in self.eos
            if self.ended_by_eos[row] or self.generated >= self.max_tokens[row] or any(stop in text for stop in stops):
                self.ended_at[row] = self.generated
        done = [ended is not None for ended in self.ended_at]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cuts = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _end_stream(payload) -> None:
    """Ends the streamer of a streamed chat job that will not run, so that its response stops waiting."""
    if getattr(payload, "streamer", None) is not None:
        payload.streamer.end()


def _decoded(job: Job):
    """The job's payload with its images decoded (a copy: the queued payload keeps the compressed bytes only)."""
    payload = job.payload
    if job.kind == "chat":
        return dataclasses.replace(payload, messages=decode_message_images(payload.messages))
    if not payload.images:
        return payload
    return dataclasses.replace(payload, images=[image.decode() for image in payload.images])


class Engine:
    """
    The executor of the server's [`BatchWorker`]: pipeline calls for image jobs, `generate` for chat jobs.

    Args:
        pipe ([`BagelPipeline`]): the pipeline; only the worker thread runs it.
    """

    def __init__(self, pipe):
        self.pipe = pipe

    def execute(self, jobs: list[Job]) -> list:
        """The results of `jobs` (same kind and batching key), in order: a result or an exception per job."""
        results, ready = [None] * len(jobs), []
        for index, job in enumerate(jobs):
            try:
                ready.append((index, job, _decoded(job)))
            except APIError as error:
                _end_stream(job.payload)
                results[index] = error
        if ready:
            run = self._chat if jobs[0].kind == "chat" else self._images
            outputs = run([job for _, job, _ in ready], [payload for _, _, payload in ready])
            for (index, _, _), output in zip(ready, outputs):
                results[index] = output
        return results

    def _images(self, jobs: list[Job], requests: list[ImageRequest]) -> list:
        """One pipeline call for the requests (the same arguments: their batching key), with one generator per
        image; returns each request's `(image, thinking)` pairs."""
        prompts, images, generators = [], [], []
        for request in requests:
            for index in range(request.n):
                prompts.append(request.prompt)
                images.append(request.images)
                generators.append(torch.Generator().manual_seed(request.seed + index))

        def stop_when_abandoned(pipe, step, timestep, callback_kwargs):
            if all(job.cancelled for job in jobs):  # nobody waits for these images any more
                pipe._interrupt = True
            return {}

        # batch_invariant: a seeded request gives the same image whether it ran alone or in a batch.
        output = self.pipe(
            prompts, image=images if jobs[0].kind == "edit" else None, generator=generators, batch_invariant=True,
            callback_on_step_end=stop_when_abandoned, callback_on_step_end_tensor_inputs=[], **requests[0].arguments,
        )  # fmt: skip
        results, start = [], 0
        for request in requests:
            stop = start + request.n
            results.append(list(zip(output.images[start:stop], (output.text or [None] * len(prompts))[start:stop])))
            start = stop
        return results

    def _chat(self, jobs: list[Job], requests: list[ChatRequest]) -> list[dict]:
        """One `generate` call for the requests (several only when greedy and not streamed: see the chat route),
        their prompts left-padded into one batch; each row stops on its own stop strings and `max_tokens`, or when
        its client has gone."""
        model, processor = self.pipe.model, self.pipe.processor
        first = requests[0]
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
        stops = _RowStops(processor.tokenizer, [request.stop for request in requests],
                          [request.max_tokens for request in requests], jobs, eos)  # fmt: skip
        try:
            if first.temperature > 0:  # a sampled request runs alone: its seed sets the generator
                torch.manual_seed(first.seed if first.seed is not None else secrets.randbits(63))
            answers = generate_answers(
                model, processor, [request.messages for request in requests],
                max(request.max_tokens for request in requests), do_sample=first.temperature > 0,
                temperature=first.temperature, streamer=first.streamer, top_p=first.top_p,
                stopping_criteria=StoppingCriteriaList([stops]),
            )  # fmt: skip
        except BaseException:
            _end_stream(first)  # the streaming response stops waiting
            raise
        results = []
        for row, request in enumerate(requests):
            length = stops.ended_at[row] if stops.ended_at[row] is not None else stops.generated
            text, stopped = cut_at_stop(answers.texts[row], request.stop)
            finish = "stop" if stopped or stops.ended_by_eos[row] or length < request.max_tokens else "length"
            prompt_tokens = answers.prompt_tokens[row]
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": length,
                     "total_tokens": prompt_tokens + length}  # fmt: skip
            results.append({"text": text, "finish_reason": finish, "usage": usage})
        return results
